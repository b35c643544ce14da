"""Per-layer options of the planner: each candidate's predicted output error and cost.

For the low-rank kinds (Linear, Conv2d, Conv1D) with ``init="svd"`` or
``"activation"`` the output error of every rank follows in closed form from one
spectrum per layer (relative to the layer's output energy on the calibration
inputs, bias excluded):

- ``activation``: ``sum_{i > r} sigma_i^2 / sum_i sigma_i^2``, ``sigma`` the singular
  values of ``L^T W^T`` with ``C = L L^T`` the input covariance (ASVD / SVD-LLM);
- ``svd``: ``sum_{i > r} s_i^2 u_i^T C u_i / tr(W C W^T)`` from the SVD ``W^T = U S V^T``
  (``C = I`` when no covariance was gathered).

Every other candidate (attention's random features, the seed's ``"sketch"``
init, kinds without a weight matrix) is measured: the layer alone, built at the
candidate, on the call recorded during the dense baseline.

Costs are multiply-adds of every recorded call, or, when speed is measured,
the layer timed alone on its recorded call, dense and at each candidate;
candidates no faster than the dense layer are dropped.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sketchtune._modes import eval_mode
from sketchtune._studies import Group, StudyLayout
from sketchtune.kinds._base import CallShapes
from sketchtune.kinds._lowrank import LowRankKind
from sketchtune.nn import InputCovariance
from sketchtune.plan import SketchPlan

__all__ = [
    "Candidate",
    "GroupOptions",
    "Recorded",
    "candidate_params",
    "closed_form_errors",
    "observed_layers",
]

#: the most candidates one layer offers the planner (a longer grid is thinned geometrically)
MAX_CANDIDATES = 64
_CLOSED_FORM = ("svd", "activation")
_TIMING_BUDGET = 0.2  # seconds of samples per timed module, after the first three
_STEADY = 1.5  # the dense layer timed before and after its candidates agrees within this


@dataclass(frozen=True)
class Candidate:
    """One way to sketch a group: its parameters, predicted relative output error and cost."""

    params: dict[str, Any]
    error: float
    cost: float


@dataclass(frozen=True)
class GroupOptions:
    """What the planner may do with one group: stay dense (``dense_cost``) or take a candidate."""

    key: str
    dense_cost: float
    candidates: tuple[Candidate, ...]
    steady: bool = True  # timed costs: the dense layer timed the same before and after

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dense_cost": self.dense_cost,
            "candidates": [[c.params, c.error, c.cost] for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupOptions:
        return cls(
            str(data["key"]),
            float(data["dense_cost"]),
            tuple(Candidate(dict(p), float(e), float(c)) for p, e, c in data["candidates"]),
        )


@dataclass
class Recorded:
    """What the dense baseline left for the planner, per layer name."""

    calls: dict[str, list[CallShapes]]  # every call's shapes (the FLOP model's record)
    covariance: dict[str, InputCovariance]  # gathered input statistics
    samples: dict[str, tuple[tuple[Any, ...], dict[str, Any]]]  # a recorded call's arguments


def candidate_params(group: Group) -> list[dict[str, Any]]:
    """Every parameter set of ``group``'s space, deduplicated and capped at :data:`MAX_CANDIDATES`.

    For low-rank kinds ``num_terms * low_rank`` is what matters (cost and
    factorized error depend on the total rank only), so each product keeps its
    smallest ``num_terms``.

    Raises:
        ValueError: a parameter has no finite grid (a continuous ``Float``).
    """
    grids = {name: spec.grid() for name, spec in group.space.items()}
    combos = [
        dict(zip(grids, values, strict=True)) for values in itertools.product(*grids.values())
    ]
    if isinstance(group.kind, LowRankKind) and {"num_terms", "low_rank"} <= set(grids):
        kept: dict[tuple[Any, ...], dict[str, Any]] = {}
        for params in sorted(combos, key=lambda p: p["num_terms"]):
            others = tuple(
                sorted(
                    (k, repr(v)) for k, v in params.items() if k not in ("num_terms", "low_rank")
                )
            )
            kept.setdefault((params["num_terms"] * params["low_rank"], others), params)
        combos = list(kept.values())
    if len(combos) > MAX_CANDIDATES:
        step = len(combos) / MAX_CANDIDATES
        combos = [combos[int(i * step)] for i in range(MAX_CANDIDATES)]
    return combos


# ---------------------------------------------------------------------------- errors


def closed_form_errors(
    weight_t: torch.Tensor, covariance: InputCovariance | None, *, ridge: float = 1e-4
) -> dict[str, list[float]]:
    """Relative output error of the best rank-``r`` factorization, for ``r = 0 .. min(d_in, d_out)``.

    Returns ``{"svd": [...], "activation": [...]}`` (index ``r``; the last entry is 0).
    Without a covariance both are the plain weight's tail energies.

    Only eigenvalues (and, for ``svd`` with a covariance, the singular directions
    on the input side) are needed, so everything comes from symmetric
    eigenproblems of the smaller side's Gram matrix, in float32 for float32
    weights: about 2.5x faster than the SVDs they replace (0.16 s against
    0.43 s for a 1024x1024 layer), with tails equal to theirs within 1e-6.
    """
    dtype = torch.float64 if weight_t.dtype == torch.float64 else torch.float32
    w = weight_t.detach().to(dtype)
    d_in, d_out = w.shape
    k = min(d_in, d_out)
    if covariance is None or covariance.gram is None or covariance.count == 0:
        gram = w.t() @ w if d_out <= d_in else w @ w.t()
        plain = _tails(_top_eigenvalues(gram, k))
        return {"svd": plain, "activation": plain}
    cov = covariance.matrix().to(device=w.device, dtype=dtype)
    # svd: the tail energies s_i^2 weighted by u_i^T C u_i, the input energy along the
    # weight's i-th singular direction on the input side (u_i: left singular vector of W^T)
    if d_in <= d_out:
        energy, u = torch.linalg.eigh(w @ w.t())
        energy, u = energy.flip(0)[:k].clamp_min(0), u.flip(1)[:, :k]
    else:
        energy, v = torch.linalg.eigh(w.t() @ w)
        energy, v = energy.flip(0)[:k].clamp_min(0), v.flip(1)[:, :k]
        u = (w @ v) / energy.sqrt().clamp_min(torch.finfo(dtype).tiny)
    along = ((cov @ u) * u).sum(0)
    svd = _tails(energy * along)
    # activation: the spectrum of W^T (C + jitter I) W, from the smaller side
    jitter = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    ridged = cov + jitter * torch.eye(d_in, dtype=dtype, device=w.device)
    if d_out <= d_in:
        weighted = w.t() @ (ridged @ w)
    else:
        chol, info = torch.linalg.cholesky_ex(ridged)
        if int(info) != 0:
            return {"svd": svd, "activation": svd}
        weighted = chol.t() @ (w @ w.t()) @ chol
    activation = _tails(_top_eigenvalues(weighted, k))
    # the activation-aware truncation is never worse on these inputs than the plain one
    return {"svd": svd, "activation": [min(a, b) for a, b in zip(activation, svd, strict=True)]}


def _top_eigenvalues(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest eigenvalues of a symmetric PSD matrix, descending (rounding clipped at 0)."""
    values: torch.Tensor = torch.linalg.eigvalsh(gram)
    return values.flip(0)[:k].clamp_min(0)


def _tails(energy: torch.Tensor) -> list[float]:
    """``tails[r] = sum_{i >= r} energy_i / sum energy`` for ``r = 0 .. len(energy)``."""
    total = float(energy.sum())
    if total <= 0:
        return [0.0] * (len(energy) + 1)
    suffix = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    return [float(v) / total for v in suffix] + [0.0]


def measured_error(
    dense: nn.Module, sketch: nn.Module, sample: tuple[tuple[Any, ...], dict[str, Any]]
) -> float:
    """``||y_sketch - y||^2 / ||y||^2`` of one layer alone on a recorded call."""
    args, kwargs = sample
    with torch.no_grad(), eval_mode(dense), eval_mode(sketch):
        reference = _first_tensor(dense(*args, **kwargs)).double()
        approx = _first_tensor(sketch(*args, **kwargs)).double()
    energy = float(reference.square().sum())
    error = float((approx - reference).square().sum())
    if not math.isfinite(error):
        return math.inf
    return error / energy if energy > 0 else error


def _first_tensor(output: Any) -> torch.Tensor:
    first = output[0] if isinstance(output, tuple) else output
    assert isinstance(first, torch.Tensor)
    return first


# ---------------------------------------------------------------------------- costs


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


def group_options(
    group: Group,
    dense: dict[str, nn.Module],
    recorded: Recorded,
    build: Callable[[SketchPlan], dict[str, nn.Module]],
    plan_of: Callable[[dict[str, Any]], SketchPlan],
    *,
    timed: bool,
) -> GroupOptions:
    """The candidates of ``group`` with their predicted error and cost (dense cost alongside)."""
    kind = group.kind
    spectra: dict[str, dict[str, list[float]]] = {}
    closed = isinstance(kind, LowRankKind) and group.copy_weights
    if closed:
        for name in group.names:
            weight_t = kind.weight_matrix(dense[name])
            spectra[name] = closed_form_errors(weight_t, recorded.covariance.get(name))

    dense_seconds: dict[str, float] = {}
    if timed:
        for name in group.names:
            call = _call_for_timing(name, dense[name], recorded)
            dense_seconds[name] = math.nan if call is None else layer_seconds(dense[name], *call)
    dense_cost = sum(
        _dense_cost(group, name, dense, recorded, dense_seconds) for name in group.names
    )

    params_list = [
        params
        for params in candidate_params(group)
        if timed
        or sum(
            kind.sketch_macs(dense[n], params, c) for n in group.names for c in _calls(recorded, n)
        )
        < dense_cost  # saves no multiply-adds at the recorded shapes: not worth measuring
    ]
    seconds = (
        _candidate_seconds(group, params_list, dense, recorded, build, plan_of, dense_seconds)
        if timed
        else {}
    )
    candidates: list[Candidate] = []
    for params in params_list:
        cost = error = 0.0
        modules: dict[str, nn.Module] | None = None
        for name in group.names:
            init = params.get("init", kind.defaults.get("init"))
            if closed and init in _CLOSED_FORM:
                rank = 2 * int(params["num_terms"]) * int(params["low_rank"])
                tails = spectra[name][str(init)]
                error += tails[min(rank, len(tails) - 1)]
            else:
                sample = recorded.samples.get(name)
                if sample is None:
                    error = math.inf
                else:
                    modules = modules if modules is not None else build(plan_of(params))
                    error += measured_error(dense[name], modules[name], sample)
            if (name, _shape(params)) in seconds:
                calls = max(1, len(recorded.calls.get(name, ())))
                cost += seconds[name, _shape(params)] * calls
            else:
                cost += _sketch_macs(group, name, dense, recorded, params)
        if math.isfinite(error):
            candidates.append(Candidate(params, error, cost))
    if timed:
        candidates = _monotone_costs(candidates)
    steady = True
    for name, first in dense_seconds.items():
        call = _call_for_timing(name, dense[name], recorded)
        if call is not None and math.isfinite(first):
            again = layer_seconds(dense[name], *call)
            steady = steady and max(again, first) <= _STEADY * min(again, first)
    kept = tuple(c for c in candidates if c.cost < dense_cost)
    return GroupOptions(group.key, dense_cost, kept, steady)


def _shape(params: dict[str, Any]) -> str:
    """What a candidate's speed depends on: its parameters but ``init``."""
    return repr(sorted((k, v) for k, v in params.items() if k != "init"))


def _sketch_macs(
    group: Group, name: str, dense: dict[str, nn.Module], recorded: Recorded, params: dict[str, Any]
) -> float:
    return sum(group.kind.sketch_macs(dense[name], params, c) for c in _calls(recorded, name))


def _candidate_seconds(
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
        shapes.setdefault(_shape(params), params)
    names = [n for n in group.names if math.isfinite(dense_seconds.get(n, math.nan))]
    if not names:
        return {}

    def macs(name: str, key: str) -> float:
        return _sketch_macs(group, name, dense, recorded, shapes[key])

    # a family shares every parameter but the sizes (attention's kernel_fn, for one):
    # its cost grows with the multiply-adds; another family's need not be comparable
    families: dict[str, list[str]] = {}
    for key, params in shapes.items():
        families.setdefault(_family(params), []).append(key)
    seconds: dict[tuple[str, str], float] = {}
    for members in families.values():
        order = sorted(members, key=lambda key: macs(names[0], key))
        timed = set(range(0, len(order), 2)) | {len(order) - 1}
        for i in sorted(timed):
            modules = build(plan_of(shapes[order[i]]))
            for name in names:
                call = _call_for_timing(name, dense[name], recorded)
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


def _family(params: dict[str, Any]) -> str:
    """A candidate's parameters but its sizes (ints) and ``init``."""
    return repr(
        sorted(
            (k, v)
            for k, v in params.items()
            if k != "init" and (isinstance(v, bool) or not isinstance(v, int))
        )
    )


def _monotone_costs(candidates: list[Candidate]) -> list[Candidate]:
    """Timed costs made non-decreasing in the size of the sketch (pool-adjacent-violators).

    A larger rank (or more random features) never runs faster; single timings
    on a busy machine say otherwise now and then, and one lucky sample would
    otherwise steer the allocation.
    """

    def size(c: Candidate) -> float:
        numbers = [v for v in c.params.values() if isinstance(v, int) and not isinstance(v, bool)]
        return float(math.prod(numbers)) if numbers else 0.0

    smoothed: dict[int, float] = {}
    for name in {_family(c.params) for c in candidates}:
        members = sorted(
            (i for i, c in enumerate(candidates) if _family(c.params) == name),
            key=lambda i: size(candidates[i]),
        )
        blocks: list[list[float]] = []  # [sum, count] of pooled neighbours
        for i in members:
            blocks.append([candidates[i].cost, 1.0])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                total, count = blocks.pop()
                blocks[-1][0] += total
                blocks[-1][1] += count
        values = [total / count for total, count in blocks for _ in range(int(count))]
        smoothed.update(zip(members, values, strict=True))
    return [Candidate(c.params, c.error, smoothed.get(i, c.cost)) for i, c in enumerate(candidates)]


def _calls(recorded: Recorded, name: str) -> Sequence[CallShapes]:
    return recorded.calls.get(name) or [()]


def _call_for_timing(
    name: str, layer: nn.Module, recorded: Recorded
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if name in recorded.samples:
        return recorded.samples[name]
    calls = recorded.calls.get(name)
    return synthetic_call(layer, calls[0]) if calls else None


def _dense_cost(
    group: Group,
    name: str,
    dense: dict[str, nn.Module],
    recorded: Recorded,
    seconds: dict[str, float],
) -> float:
    if name in seconds and math.isfinite(seconds[name]):
        return seconds[name] * max(1, len(recorded.calls.get(name, ())))
    return sum(group.kind.dense_macs(dense[name], c) for c in _calls(recorded, name))


def observed_layers(layout: StudyLayout) -> tuple[list[str], list[str]]:
    """``(covariance, capture)``: layers whose input statistics / first call the baseline keeps.

    Every low-rank layer that may start from the dense weights gets its input
    covariance (closed-form errors on real inputs); every layer with a
    candidate that has no closed form gets its first call recorded.
    """
    covariance = set(layout.layers_to_calibrate())
    capture: set[str] = set()
    for group in layout.groups:
        inits = set(group.space["init"].grid()) if "init" in group.space else {"sketch"}
        low_rank = isinstance(group.kind, LowRankKind) and group.copy_weights
        if low_rank and inits & {"svd", "activation"}:
            covariance.update(group.names)
        if not low_rank or "sketch" in inits:
            capture.update(group.names)
    return sorted(covariance), sorted(capture)
