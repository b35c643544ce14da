"""Cost of a layer candidate when speed is measured: the layer timed alone on its recorded call.

Candidates that differ only in ``init`` cost the same; within a family (the
same parameters but the sizes) every other size is timed and the ones between
are interpolated (:func:`candidate_seconds`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sketchtune._modes import eval_mode
from sketchtune._search._studies import Group
from sketchtune.kinds._base import CallShapes
from sketchtune.plan import SketchPlan

if TYPE_CHECKING:
    from sketchtune._planner._options import Recorded

__all__ = [
    "call_for_timing",
    "candidate_seconds",
    "family",
    "layer_seconds",
    "recorded_calls",
    "shape_key",
    "sketch_macs",
    "synthetic_call",
]

_TIMING_BUDGET = 0.2  # seconds of samples per timed module, after the first three


def layer_seconds(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, repeats: int = 5
) -> float:
    """Seconds of one call of ``module`` alone: the fastest of ``repeats`` samples.

    The minimum, not the median: on a shared machine a sample is only ever slowed
    down by others (page faults, preempted threads), never sped up.
    """
    device = next((t.device for t in args if isinstance(t, torch.Tensor)), torch.device("cpu"))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode(), eval_mode(module):
        for _ in range(2):
            module(*args, **kwargs)
        sync()
        calls = 1
        while True:  # enough calls per sample to rise above the timer's resolution
            start = time.perf_counter()
            for _ in range(calls):
                module(*args, **kwargs)
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= 2e-3 or calls >= 64:
                break
            calls *= 4
        samples = [elapsed / calls]
        deadline = time.perf_counter() + _TIMING_BUDGET
        for _ in range(repeats - 1):
            if len(samples) >= 3 and time.perf_counter() > deadline:
                break  # a loaded machine: the fastest of three samples will do
            start = time.perf_counter()
            for _ in range(calls):
                module(*args, **kwargs)
            sync()
            samples.append((time.perf_counter() - start) / calls)
    return min(samples)


def synthetic_call(
    dense: nn.Module, shapes: CallShapes
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A call of a one-input layer with random data of its recorded input shape."""
    if not shapes:
        return None
    reference = next(iter(dense.parameters()), None)
    if reference is None:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shapes[0], generator=generator).to(
        device=reference.device, dtype=reference.dtype
    )
    return (x,), {}


def shape_key(params: dict[str, Any]) -> str:
    """What a candidate's speed depends on: its parameters but ``init``."""
    return repr(sorted((k, v) for k, v in params.items() if k != "init"))


def sketch_macs(
    group: Group, name: str, dense: dict[str, nn.Module], recorded: Recorded, params: dict[str, Any]
) -> float:
    return sum(
        group.kind.sketch_macs(dense[name], params, c) for c in recorded_calls(recorded, name)
    )


def candidate_seconds(
    group: Group,
    params_list: Sequence[dict[str, Any]],
    dense: dict[str, nn.Module],
    recorded: Recorded,
    build: Callable[[SketchPlan], dict[str, nn.Module]],
    plan_of: Callable[[dict[str, Any]], SketchPlan],
    dense_seconds: dict[str, float],
) -> dict[tuple[str, str], float]:
    """Seconds of one call of each layer at each candidate shape, ``{(name, shape): s}``.

    Candidates that differ only in ``init`` cost the same. Within a family (the
    same parameters but the sizes), of the shapes ordered by multiply-adds every
    other one is timed (the smallest and the largest always), and the ones
    between are interpolated linearly in multiply-adds from their timed
    neighbours: on a geometric rank ladder that halves the
    timing (about 1 s on the main job) for costs within a few percent of timing
    them all (the trials and the confirmation measure the real speed).
    """
    shapes: dict[str, dict[str, Any]] = {}
    for params in params_list:
        shapes.setdefault(shape_key(params), params)
    names = [n for n in group.names if math.isfinite(dense_seconds.get(n, math.nan))]
    if not names:
        return {}

    def macs(name: str, key: str) -> float:
        return sketch_macs(group, name, dense, recorded, shapes[key])

    # a family shares every parameter but the sizes (attention's kernel_fn, for one):
    # its cost grows with the multiply-adds; another family's need not be comparable
    families: dict[str, list[str]] = {}
    for key, params in shapes.items():
        families.setdefault(family(params), []).append(key)
    seconds: dict[tuple[str, str], float] = {}
    for members in families.values():
        order = sorted(members, key=lambda key: macs(names[0], key))
        timed = set(range(0, len(order), 2)) | {len(order) - 1}
        for i in sorted(timed):
            modules = build(plan_of(shapes[order[i]]))
            for name in names:
                call = call_for_timing(name, dense[name], recorded)
                assert call is not None  # dense_seconds is finite: the dense layer was timed on it
                seconds[name, order[i]] = layer_seconds(modules[name], *call)
        for i in set(range(len(order))) - timed:  # strictly between two timed shapes
            lo, here, hi = order[i - 1], order[i], order[i + 1]
            for name in names:
                m_lo, m, m_hi = macs(name, lo), macs(name, here), macs(name, hi)
                t_lo, t_hi = seconds[name, lo], seconds[name, hi]
                share = (m - m_lo) / (m_hi - m_lo) if m_hi > m_lo else 0.0
                seconds[name, here] = t_lo + share * (t_hi - t_lo)
    return seconds


def family(params: dict[str, Any]) -> str:
    """A candidate's parameters but its sizes (ints) and ``init``."""
    return repr(
        sorted(
            (k, v)
            for k, v in params.items()
            if k != "init" and (isinstance(v, bool) or not isinstance(v, int))
        )
    )


def recorded_calls(recorded: Recorded, name: str) -> Sequence[CallShapes]:
    return recorded.calls.get(name) or [()]


def call_for_timing(
    name: str, layer: nn.Module, recorded: Recorded
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if name in recorded.samples:
        return recorded.samples[name]
    calls = recorded.calls.get(name)
    return synthetic_call(layer, calls[0]) if calls else None
