"""Plan building: sketched modules for a plan, reused across trials, with calibration.

Building a sketched layer costs random draws and, for ``init="svd"`` /
``"activation"``, a factorization of the dense weight. The builder keeps each
layer's latest sketch (reused by the next trial that asks for the same, while
nothing has trained it; never more than one per layer), one nested factorization
per layer and init (computed once for the largest rank the search can ask for,
kept in the weight's dtype), and the input statistics gathered for
``"activation"`` and the planner, freed once factorized. A layer whose statistics
would exceed ``statistics_budget`` times its weight bytes is planned from its
weight alone (:attr:`PlanBuilder.over_budget`).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sketchtune._search._trialinfo import frozen_params_key
from sketchtune.nn import InputCovariance, LowRankFactors
from sketchtune.plan import LayerPlan, SketchPlan
from sketchtune.registry import BuildAids, SketchKind, kind_named

__all__ = ["PlanBuilder"]


class PlanBuilder:
    """Builds the sketched modules of plans over one dense model's layers.

    Args:
        dense: the selected dense layers, by qualified name.
        max_rank: the largest total rank the search can ask of a layer (sizes factorizations).
        calibrate: layers whose input statistics are gathered (``init="activation"``).
        capture: layers whose first call's arguments are kept during the dense baseline.
    """

    def __init__(
        self,
        dense: dict[str, nn.Module],
        max_rank: Callable[[str], int],
        calibrate: list[str],
        capture: list[str] | None = None,
        *,
        statistics_budget: float = 4.0,
    ) -> None:
        self.dense = dense
        self._max_rank = max_rank
        self.calibrate = calibrate
        self.capture = list(capture or [])
        self.statistics_budget = statistics_budget
        #: layers planned from their weight alone: their statistics would exceed the budget
        self.over_budget: dict[str, int] = {}
        #: keep gathered statistics after a factorization (the planner still reads them)
        self.keep_statistics = False
        self._kinds: dict[str, SketchKind] = {}
        self._copies: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        #: the first call's arguments of each layer in ``capture`` (the planner replays them)
        self.samples: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.aids: dict[str, BuildAids] = {}
        self.calibrated = False
        #: each layer's most recently built sketch: a plan's modules, no more
        self._cache: dict[str, tuple[tuple[Any, ...], nn.Module, list[int]]] = {}

    def build(self, plan: SketchPlan) -> dict[str, nn.Module]:
        """Sketched modules for ``plan``, reused from earlier trials when untouched since."""
        built: dict[str, nn.Module] = {}
        for name, layer in plan.items():
            key = _hashable(layer)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key and cached[2] == _versions(cached[1]):
                module = cached[1]
                module.train(self.dense[name].training)
            else:
                self._cache.pop(name, None)  # free the old sketch before building the new one
                with warnings.catch_warnings():
                    # costly values were reported once, when the space was checked
                    warnings.filterwarnings(
                        "ignore", message=".*slower and larger", category=UserWarning
                    )
                    module = kind_named(layer.type).build(
                        self.dense[name],
                        dict(layer.params),
                        layer.seed,
                        layer.copy_weights,
                        self._aids_for(name, layer),
                    )
                self._cache[name] = (key, module, _versions(module))
            built[name] = module
        return built

    def _aids_for(self, name: str, layer: LayerPlan) -> BuildAids:
        """Calibration and a nested factorization per layer, computed once for the largest rank."""
        aids = self.aids.setdefault(name, BuildAids())
        init = layer.params.get("init", "sketch")
        if init in ("svd", "activation") and layer.copy_weights and init not in aids.factors:
            if init == "activation" and (aids.calibration is None or aids.calibration.empty):
                return aids  # not gathered (results loaded from a file): the kind falls back to svd
            weight_t = kind_named(layer.type).weight_matrix(self.dense[name]).detach()
            aids.factors[init] = _in_dtype(
                LowRankFactors.compute(
                    weight_t,
                    self._max_rank(name),
                    calibration=aids.calibration if init == "activation" else None,
                ),
                weight_t.dtype,
            )
            if init == "activation" and not self.keep_statistics:
                self.release_statistics([name])
        return aids

    def release_statistics(
        self, names: Collection[str] | None = None, *, activation: Collection[str] = ()
    ) -> None:
        """Free the input statistics of ``names`` (default: every layer).

        A layer in ``activation`` (it may still start from ``init="activation"``) gets
        its factorization first, at the largest rank: all a later build needs.
        """
        for name in list(self.aids) if names is None else names:
            aids = self.aids.get(name)
            if aids is None or aids.calibration is None or aids.calibration.empty:
                continue
            wanted = name in activation or names is not None
            if wanted and "activation" not in aids.factors and not aids.calibration.empty:
                weight_t = self._kinds[name].weight_matrix(self.dense[name])
                aids.factors["activation"] = _in_dtype(
                    LowRankFactors.compute(
                        weight_t.detach(), self._max_rank(name), calibration=aids.calibration
                    ),
                    weight_t.dtype,
                )
            aids.calibration.release()

    @contextmanager
    def calibration_hooks(
        self, kinds: dict[str, SketchKind], reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[None]:
        """Gather the input covariance of the layers that need it during one dense evaluation.

        ``reduce_sum`` adds every process's share (DDP); the statistics count as
        gathered only when the block ends without an error.
        """
        handles = []
        self._kinds = kinds
        for name in self.calibrate:
            dense = self.dense[name]
            features, rank = kinds[name].fan_in(dense), self._max_rank(name)
            needed = InputCovariance.nbytes_for(features, rank)
            weight_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
            if needed > self.statistics_budget * weight_bytes:
                self.over_budget[name] = needed  # planned from its weight alone
                self.aids.setdefault(name, BuildAids()).quiet = True  # said once, by the tuner
                continue
            cov = InputCovariance(features, rank=rank, seed=_stable_seed(name))
            self.aids.setdefault(name, BuildAids()).calibration = cov
            hook = kinds[name].calibration_hook(dense, cov)
            if hook is not None:
                handles.append(dense.register_forward_pre_hook(hook))
        handles.extend(
            self.dense[name].register_forward_pre_hook(self._keep_first(name), with_kwargs=True)
            for name in self.capture
        )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._copies.clear()
        for name in self.calibrate:
            gathered = self.aids.get(name, BuildAids()).calibration
            if gathered is not None:
                gathered.reduce(reduce_sum)
        self.calibrated = True

    @property
    def observes(self) -> bool:
        """Whether the dense baseline gathers anything (input statistics, recorded calls)."""
        return bool(self.calibrate or self.capture)

    def _keep_first(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in self.samples:
                self.samples[name] = (
                    tuple(self._copy(a) for a in args),
                    {k: self._copy(v) for k, v in kwargs.items()},
                )

        return hook

    def _copy(self, value: Any) -> Any:
        """A kept copy of a call argument; one copy for a tensor several layers receive
        (a transformer's q, k and v projections read the same hidden states)."""
        if not isinstance(value, torch.Tensor):
            return value
        held = self._copies.get(id(value))
        if held is not None and held[0]() is value:
            return held[1]
        copy = value.detach().clone()
        self._copies[id(value)] = (weakref.ref(value), copy)
        return copy


def _in_dtype(factors: LowRankFactors, dtype: torch.dtype) -> LowRankFactors:
    """The factors stored in the weight's floating dtype (float32: half of float64), row-major
    (an SVD's are column-major): each build's slices of them are then copied as they lie."""
    if not dtype.is_floating_point:
        dtype = factors.P.dtype
    return LowRankFactors(
        factors.P.to(dtype).contiguous(), factors.Q.to(dtype).contiguous(), factors.kind
    )


def _stable_seed(name: str) -> int:
    """A seed from a layer's name, the same in every process (DDP ranks sketch alike)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _hashable(layer: LayerPlan) -> tuple[Any, ...]:
    return (layer.type, frozen_params_key(layer.params), layer.seed, layer.copy_weights)


def _versions(module: nn.Module) -> list[int]:
    """In-place version counters of a module's parameters: they change when anything trains it."""
    return [p._version for p in module.parameters()]
