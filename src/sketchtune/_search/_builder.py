"""Plan building: sketched modules for a plan, reused across trials, with calibration.

Building a sketched layer costs random draws and, for ``init="svd"`` /
``"activation"``, a factorization of the dense weight. The builder keeps the
modules of recent trials (reused while nothing has trained them), one nested
factorization per layer and init (computed once for the largest rank the
search can ask for), and the input statistics gathered for ``"activation"``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
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
    ) -> None:
        self.dense = dense
        self._max_rank = max_rank
        self.calibrate = calibrate
        self.capture = list(capture or [])
        #: the first call's arguments of each layer in ``capture`` (the planner replays them)
        self.samples: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.aids: dict[str, BuildAids] = {}
        self.calibrated = False
        self._cache: OrderedDict[tuple[str, tuple[Any, ...]], tuple[nn.Module, list[int]]] = (
            OrderedDict()
        )

    def build(self, plan: SketchPlan) -> dict[str, nn.Module]:
        """Sketched modules for ``plan``, reused from earlier trials when untouched since."""
        built: dict[str, nn.Module] = {}
        for name, layer in plan.items():
            key = (name, _hashable(layer))
            cached = self._cache.get(key)
            if cached is not None and cached[1] == _versions(cached[0]):
                self._cache.move_to_end(key)
                module = cached[0]
                module.train(self.dense[name].training)
            else:
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
                self._cache[key] = (module, _versions(module))
                while len(self._cache) > max(8, 2 * len(self.dense)):
                    self._cache.popitem(last=False)
            built[name] = module
        return built

    def _aids_for(self, name: str, layer: LayerPlan) -> BuildAids:
        """Calibration and a nested factorization per layer, computed once for the largest rank."""
        aids = self.aids.setdefault(name, BuildAids())
        init = layer.params.get("init", "sketch")
        if init in ("svd", "activation") and layer.copy_weights and init not in aids.factors:
            if init == "activation" and aids.calibration is None:
                return aids  # not gathered (results loaded from a file): the kind falls back to svd
            weight_t = kind_named(layer.type).weight_matrix(self.dense[name]).detach()
            aids.factors[init] = LowRankFactors.compute(
                weight_t,
                self._max_rank(name),
                calibration=aids.calibration if init == "activation" else None,
            )
        return aids

    @contextmanager
    def calibration_hooks(
        self, kinds: dict[str, SketchKind], reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[None]:
        """Gather the input covariance of the layers that need it during one dense evaluation.

        ``reduce_sum`` adds every process's share (DDP); the statistics count as
        gathered only when the block ends without an error.
        """
        handles = []
        for name in self.calibrate:
            dense = self.dense[name]
            cov = InputCovariance(kinds[name].fan_in(dense))
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
        for name in self.calibrate:
            gathered = self.aids[name].calibration
            assert gathered is not None
            if gathered.gram is not None:
                gathered.gram = reduce_sum(gathered.gram)
            gathered.count = int(reduce_sum(torch.tensor(float(gathered.count))).item())
        self.calibrated = True

    @property
    def observes(self) -> bool:
        """Whether the dense baseline gathers anything (input statistics, recorded calls)."""
        return bool(self.calibrate or self.capture)

    def _keep_first(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in self.samples:
                self.samples[name] = (
                    tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                    {
                        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                        for k, v in kwargs.items()
                    },
                )

        return hook


def _hashable(layer: LayerPlan) -> tuple[Any, ...]:
    return (layer.type, frozen_params_key(layer.params), layer.seed, layer.copy_weights)


def _versions(module: nn.Module) -> list[int]:
    """In-place version counters of a module's parameters: they change when anything trains it."""
    return [p._version for p in module.parameters()]
