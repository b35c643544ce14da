"""Speed measurement: interleaved wall-clock timing and a FLOP-count speed model.

Wall-clock comparisons follow three rules, because machines drift (turbo,
thermal throttling, other processes) on the time scale of a tuning run:

1. warm-up calls are excluded (allocator, caches, lazy initialization);
2. the device is synchronized before each clock read, so asynchronous CUDA
   kernels are counted;
3. candidates are timed *interleaved* (A, B, A, B, ...) and summarized by the
   median, so a slow phase of the machine hits every candidate alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from sketchtune._validation import check_int
from sketchtune.registry import kind_of, sketch_of
from sketchtune.select import sketchable_layers

__all__ = [
    "ShapeRecorder",
    "interleaved_rates",
    "estimate_speedup",
    "measure_throughput",
    "synchronize",
    "time_interleaved",
]

Shape = tuple[int, ...]


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> list[list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Args:
        fns: zero-argument callables to compare.
        repeats: timed rounds; each round calls every function once.
        warmup: untimed rounds before the first timed one.
        device: device to synchronize before each clock read (``None``: CUDA if initialized).

    Returns:
        One list of ``repeats`` durations in seconds per function, in input order.
    """
    repeats = check_int("repeats", repeats, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
    return times


class Toggle(Protocol):
    """Something that swaps a model between two states (a :class:`~sketchtune.plan.Swap`)."""

    applied: bool

    def apply(self) -> None: ...

    def restore(self) -> None: ...


def interleaved_rates(
    rate: Callable[[], float], swap: Toggle, *, rounds: int
) -> tuple[list[float], list[float]]:
    """``rate()`` of the dense and of the swapped-in model, alternating, ``rounds`` times each.

    Each round measures the dense model first, then the swapped one, so a slow
    phase of the machine hits both alike. ``swap`` is left as it was found,
    even on errors.

    Returns:
        ``(dense_rates, swapped_rates)``, one entry per round.
    """
    rounds = check_int("rounds", rounds, minimum=1)
    was_applied = swap.applied
    dense: list[float] = []
    swapped: list[float] = []
    try:
        for _ in range(rounds):
            swap.restore()
            dense.append(rate())
            swap.apply()
            swapped.append(rate())
    finally:
        if was_applied and not swap.applied:
            swap.apply()
        elif not was_applied and swap.applied:
            swap.restore()
    return dense, swapped


def measure_throughput(
    model: nn.Module,
    example_input: Any,
    *,
    repeats: int = 20,
    warmup: int = 3,
    batch_size: int | None = None,
) -> float:
    """Median inference throughput of ``model`` on ``example_input``, in samples per second.

    The model runs in eval mode under ``torch.inference_mode`` (its training
    flag is restored afterwards). ``example_input`` is passed as the single
    positional argument, or unpacked when it is a tuple or list.

    Args:
        model: the model to time.
        example_input: a tensor, or a tuple/list of positional arguments.
        repeats: timed calls (the median is reported).
        warmup: untimed calls first.
        batch_size: samples per call; by default the first dimension of the
            first tensor argument.

    Returns:
        Samples per second (median over ``repeats`` calls).

    Example:
        >>> import torch
        >>> from sketchtune import measure_throughput
        >>> rate = measure_throughput(torch.nn.Linear(64, 64), torch.randn(32, 64), repeats=5)
        >>> rate > 0
        True
    """
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if batch_size is None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.dim() == 0:
            raise ValueError(
                "`batch_size` must be given when `example_input` holds no batched tensor, "
                f"got example_input of type {type(example_input).__name__}."
            )
        batch_size = int(first.shape[0])
    batch_size = check_int("batch_size", batch_size, minimum=1)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            (times,) = time_interleaved(
                [lambda: model(*args)], repeats=repeats, warmup=warmup, device=device
            )
    finally:
        model.train(was_training)
    return batch_size / statistics.median(times)


def _device_of(model: nn.Module) -> torch.device | None:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return None


class ShapeRecorder:
    """Records the argument and output shapes of the first call of named submodules.

    The FLOP model needs them (a convolution's cost depends on its output size,
    attention's on the sequence lengths). Shapes are the same whether a name
    holds the dense layer or its sketch, so recording may happen in any trial.

    Attributes:
        shapes: ``name -> (first tensor arg shape, second tensor arg or output shape, ...)``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.shapes: dict[str, tuple[Shape, ...]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ShapeRecorder:
        for name in self.names:
            if name in self.shapes:
                continue
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if name in self.shapes:
                return
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if isinstance(module, nn.MultiheadAttention) or hasattr(module, "num_random_features"):
                tensors += [
                    kwargs[k] for k in ("query", "key") if isinstance(kwargs.get(k), torch.Tensor)
                ]
            else:
                out = output[0] if isinstance(output, tuple) else output
                tensors = tensors[:1] + ([out] if isinstance(out, torch.Tensor) else [])
            self.shapes[name] = tuple(tuple(t.shape) for t in tensors)

        return hook


def layer_macs(module: nn.Module, shapes: Sequence[Shape]) -> tuple[float, float]:
    """``(dense, current)`` multiply-adds of one call of a dense or sketched layer."""
    sketched = sketch_of(module)
    if sketched is not None:
        kind, params = sketched
        return kind.dense_macs(module, shapes), kind.sketch_macs(module, params, shapes)
    dense_kind = kind_of(module)
    if dense_kind is None:
        return 0.0, 0.0
    macs = dense_kind.dense_macs(module, shapes)
    return macs, macs


def estimate_speedup(model: nn.Module, example_input: Any = None) -> float:
    """FLOP-model speedup of ``model`` over its dense version (noise-free, for tests and CI).

    Counts the multiply-adds of every Linear, Conv2d and MultiheadAttention
    layer and of their sketched replacements; other operations are ignored.
    With ``example_input`` one forward pass records each layer's real shapes
    (spatial sizes, sequence lengths); without it every layer counts as one
    output position, which is exact for MLPs on flat inputs.

    Example:
        >>> import torch
        >>> from sketchtune import estimate_speedup
        >>> from sketchtune.nn import SKLinear
        >>> model = torch.nn.Sequential(SKLinear(1024, 1024, num_terms=1, low_rank=32, seed=0))
        >>> round(estimate_speedup(model), 2)
        8.0
    """
    names = [name for name, _, _ in sketchable_layers(model, include_sketched=True)]
    recorder = ShapeRecorder(model, names)
    if example_input is not None:
        args = (
            tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        )
        was_training = model.training
        model.eval()
        try:
            with recorder, torch.inference_mode():
                model(*args)
        finally:
            model.train(was_training)
    dense = current = 0.0
    for name in names:
        d, c = layer_macs(model.get_submodule(name), recorder.shapes.get(name, ()))
        dense += d
        current += c
    return dense / current if current else 1.0
