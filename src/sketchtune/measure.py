"""Speed measurement: interleaved wall-clock timing (the FLOP model is in :mod:`sketchtune.flops`).

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

# The FLOP model lives in sketchtune.flops; its names stay importable from here.
from sketchtune.flops import ShapeRecorder, estimate_speedup, layer_macs

__all__ = [
    "ShapeRecorder",
    "interleaved_rates",
    "estimate_speedup",
    "layer_macs",
    "measure_throughput",
    "synchronize",
    "time_interleaved",
]

Shape = tuple[int, ...]


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU and on ``meta``).

    ``None`` means the current CUDA device, when CUDA has been initialized.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
    elif dev.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.synchronize(dev)


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> list[list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    On the CPU each call is timed with ``time.perf_counter``. On an accelerator
    (``device`` given, e.g. ``"cuda"``) at least one warm-up round always runs,
    synchronized, because the first calls pay for lazy initialization, cuDNN and
    cuBLAS autotuning and ``torch.compile``; each timed call then starts on an idle
    device and is timed until its queued work has finished: with CUDA events on
    the current stream for CUDA (host-side launch time included, since the
    device is idle when the start event is recorded), with a synchronized clock
    read elsewhere.

    Args:
        fns: zero-argument callables to compare.
        repeats: timed rounds; each round calls every function once.
        warmup: untimed rounds before the first timed one.
        device: device the callables run on, synchronized around each timed call
            (``None``: wall clock, synchronizing CUDA if it is initialized).

    Returns:
        One list of ``repeats`` durations in seconds per function, in input order.
    """
    repeats = check_int("repeats", repeats, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    dev = torch.device(device) if device is not None else None
    accelerator = dev is not None and dev.type not in ("cpu", "meta")
    for _ in range(max(warmup, 1) if accelerator else warmup):
        for fn in fns:
            fn()
        if accelerator:
            synchronize(dev)
    synchronize(device)
    if dev is not None and dev.type == "cuda":
        return _time_cuda_events(fns, repeats, dev)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
    return times


def _time_cuda_events(
    fns: Sequence[Callable[[], Any]], repeats: int, device: torch.device
) -> list[list[float]]:
    """:func:`time_interleaved`'s timed rounds on a CUDA device, with CUDA events."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.cuda.device(device):
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                # Work fn queued on other streams must not spill into the next timed call.
                torch.cuda.synchronize(device)
                times[i].append(start.elapsed_time(end) / 1e3)  # milliseconds -> seconds
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
    positional argument, or unpacked when it is a tuple or list, and must be on
    the model's device. On an accelerator each call is timed until the device
    has finished it (see :func:`time_interleaved`).

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
    # Only for a model wholly on one device: a model split over devices may take inputs anywhere.
    placed = {t.device for t in (*model.parameters(), *model.buffers())}
    for arg in args:
        if isinstance(arg, torch.Tensor) and len(placed) == 1 and arg.device not in placed:
            raise ValueError(
                f"`example_input` is on {arg.device} but the model is on {device}; move it "
                f"first (example_input.to({str(device)!r})) so the timing measures the model."
            )
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
