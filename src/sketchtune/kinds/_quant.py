"""int8 forms of the Linear-like kinds: int8 weights (no low rank), and a sketch with int8 factors.

A layer's form is chosen in the search by two parameters of its kind
(:class:`Int8Forms`, mixed into ``LinearKind`` and ``Conv1DKind``):

- ``quant``: ``"none"`` or ``"int8"``, the precision of what the layer stores (the
  sketch's two factors, or the full weight);
- ``low_rank``: a rank, or ``"full"``: no factorization (the full weight).

They map to plan entries (:meth:`Int8Forms.plan_entry`) whose ``type`` names the
module that is built:

============================  ====================================================
search values                 plan entry
============================  ====================================================
``low_rank=32, quant=none``   ``{"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 32, ...}}``
``low_rank=32, quant=int8``   ``{"type": "SKLinear", "params": {..., "quant": "int8"}}`` (int8 factors)
``low_rank=full, quant=int8`` ``{"type": "Int8Linear", "params": {"quant": "int8"}}``
``low_rank=full, quant=none`` no entry: the dense layer itself, left as it is
============================  ====================================================

so a float sketch's entry is exactly what it was before int8 existed. The int8 form
of the dense layer is a kind of its own (:class:`Int8DenseKind`, registered as a
*form* of the primary kind: same dense type, never selected by it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from sketchtune.kinds._base import BuildAids, CallShapes, SketchKind, Validator, positive_int
from sketchtune.kinds._lowrank import LowRankKind
from sketchtune.nn.int8 import Int8Linear, Int8SKLinear, int8_kernel, to_torch_dynamic
from sketchtune.space import Categorical, ParamSpec

__all__ = ["FULL", "QUANTS", "Int8DenseKind", "Int8Forms", "int8_pays"]

#: the ``low_rank`` value meaning "no factorization: the full weight"
FULL = "full"
QUANTS = ("none", "int8")
#: ``params="auto+int8"`` offers int8 on layers with both sides at least this wide ...
INT8_MIN_SIDE = 64
#: ... and at least this many multiply-adds per row: measured on an AVX-512 VNNI CPU
#: (docs/int8.md), 256x256 ran 2.2x faster at 64 rows and 4x at 1,040, while 128x128
#: at 64 rows and a 1024->10 head did not gain (the per-call activation quantization
#: costs about what the int8 product saves); the planner times every offer anyway
INT8_MIN_MACS = 256 * 256


def _quant(_: nn.Module, value: Any) -> str | None:
    return None if value in QUANTS else f"quant must be one of {list(QUANTS)}"


def _rank_or_full(dense: nn.Module, value: Any) -> str | None:
    return None if value == FULL else positive_int(dense, value)


def _int8_only(_: nn.Module, value: Any) -> str | None:
    return None if value == "int8" else "an int8 layer has quant='int8'"


def int8_pays(weight: torch.Tensor, d_in: int, d_out: int) -> bool:
    """Whether ``params="auto+int8"`` offers int8 for a layer of this weight and size.

    Only where the int8 kernel runs (float32 weights on a CPU with the x86/fbgemm
    quantized engine and torch's dynamic int8 ops: :func:`~sketchtune.nn.int8.int8_kernel`)
    and the layer is large enough for it to be faster.
    """
    return (
        int8_kernel(weight) == "fbgemm"
        and min(d_in, d_out) >= INT8_MIN_SIDE
        and d_in * d_out >= INT8_MIN_MACS
    )


class Int8Forms(LowRankKind):
    """A low-rank kind whose layers may also be int8 (dense, or the sketch's factors).

    Subclasses set :attr:`int8_form` (the name of the int8-dense kind) and
    :attr:`int8_sketch_type` (the module of a sketch with int8 factors, built by
    its ``from_sketch`` from the float sketch).
    """

    int8_form: ClassVar[str]
    int8_sketch_type: ClassVar[type[Int8SKLinear]]
    params: ClassVar[dict[str, Validator]] = {
        **LowRankKind.params,
        "low_rank": _rank_or_full,
        "quant": _quant,
    }
    defaults: ClassVar[dict[str, Any]] = {**LowRankKind.defaults, "quant": "none"}
    form_params = ("quant",)
    accuracy_order: ClassVar[dict[str, tuple[Any, ...]]] = {
        **LowRankKind.accuracy_order,
        "quant": QUANTS,
    }

    def params_of(self, sketched: nn.Module) -> dict[str, Any]:
        params = {name: getattr(sketched, name) for name in ("num_terms", "low_rank", "init")}
        quant = getattr(sketched, "quant", "none")
        if quant != "none":
            params["quant"] = quant
        return params

    def form(self, params: Mapping[str, Any]) -> str:
        if params.get("low_rank") == FULL:
            return "int8" if params.get("quant") == "int8" else "dense"
        return "low-rank, int8 factors" if params.get("quant") == "int8" else "low-rank"

    def plan_entry(self, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        if params.get("low_rank") == FULL:
            return (self.int8_form, {"quant": "int8"}) if params.get("quant") == "int8" else None
        return self.name, {k: v for k, v in params.items() if not (k == "quant" and v == "none")}

    def validate(self, param: str, dense: nn.Module, value: Any) -> str | None:
        if param == "low_rank" and value == FULL:
            return None
        return super().validate(param, dense, value)

    def check_params(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        if params.get("low_rank") == FULL:
            raise ValueError(
                f"{where}: low_rank='full' (no factorization) is not a {self.name}; write the "
                f'layer as {{"type": "{self.int8_form}", "params": {{"quant": "int8"}}}} for '
                "int8 weights, or leave it out of the plan to keep it dense."
            )
        super().check_params(dense, params, where=where)

    def check_size(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        if params.get("low_rank") != FULL:
            super().check_size(dense, params, where=where)

    def auto_int8_space(self, dense: nn.Module) -> dict[str, ParamSpec]:
        """The ``"auto"`` space plus ``quant`` and ``low_rank="full"`` where int8 can pay."""
        space = self.auto_space(dense)
        d_in, d_out = self.io(dense)
        if int8_pays(self.init_weight(dense), d_in, d_out):
            # the full weight in int8 after the ranks (first() stays the smallest rank)
            space["low_rank"] = Categorical([*space["low_rank"].grid(), FULL])
            space["quant"] = Categorical(list(QUANTS))
        return space

    def sketch_macs(self, dense: Any, params: dict[str, Any], shapes: CallShapes) -> float:
        # the FLOP model counts multiply-adds, not their precision: int8 saves none
        if params.get("low_rank") == FULL:
            return self.dense_macs(dense, shapes)
        return super().sketch_macs(dense, params, shapes)

    def create(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool,
        aids: BuildAids,
    ) -> nn.Module:
        if params.get("low_rank") == FULL:
            raise ValueError(
                f"low_rank='full' builds no {self.name}: it is the layer's {self.int8_form} "
                "form (quant='int8') or the dense layer itself; build plans with plan_entry()."
            )
        sketch = super().create(dense, params, seed, copy_weights, aids)
        if params.get("quant", "none") == "int8":
            return self.int8_sketch_type.from_sketch(sketch)
        return sketch

    def fold(self, sketched: nn.Module) -> nn.Module:
        if isinstance(sketched, Int8SKLinear):
            return nn.Sequential(to_torch_dynamic(sketched.down), to_torch_dynamic(sketched.up))
        return super().fold(sketched)


class Int8DenseKind(SketchKind):
    """The int8 form of a low-rank kind's dense layer (``Int8Linear``, ``Int8Conv1D``).

    Registered as a form (:attr:`~SketchKind.form_of`) of :attr:`base`: plans name
    it, the search reaches it through the base kind's ``low_rank="full", quant="int8"``.
    Everything about the dense layer (description, geometry, cost) is the base kind's.
    """

    base: ClassVar[type[LowRankKind]]
    sketch_type: ClassVar[type[Int8Linear]]
    params: ClassVar[dict[str, Validator]] = {"quant": _int8_only}
    defaults: ClassVar[dict[str, Any]] = {"quant": "int8"}

    def __init__(self) -> None:
        self._base = self.base()

    def describe(self, dense: nn.Module) -> str:
        return self._base.describe(dense)

    def unsupported(self, dense: nn.Module) -> str | None:
        return self._base.unsupported(dense)

    def params_of(self, sketched: nn.Module) -> dict[str, Any]:
        return {"quant": "int8"}

    def form(self, params: Mapping[str, Any]) -> str:
        return "int8"

    def create(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool,
        aids: BuildAids,
    ) -> nn.Module:
        weight = self._base.init_weight(dense)  # (out, in)
        bias = getattr(dense, "bias", None)
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        if not copy_weights:  # drawn fresh like nn.Linear's default initialization
            generator = torch.Generator(device=weight.device).manual_seed(seed)
            bound = 1 / math.sqrt(weight.shape[1])
            weight = torch.empty_like(weight).uniform_(-bound, bound, generator=generator)
            if bias is not None:
                bias = torch.empty_like(bias).uniform_(-bound, bound, generator=generator)
        return self.sketch_type.from_weight(weight, bias)

    def fold(self, sketched: nn.Module) -> nn.Module:
        assert isinstance(sketched, Int8Linear)
        return to_torch_dynamic(sketched)

    def dense_macs(self, dense: Any, shapes: CallShapes) -> float:
        return self._base.dense_macs(dense, shapes)

    def sketch_macs(self, dense: Any, params: dict[str, Any], shapes: CallShapes) -> float:
        return self._base.dense_macs(dense, shapes)  # as many multiply-adds, in int8

    def fan_in(self, dense: nn.Module) -> int:
        return self._base.fan_in(dense)

    def weight_matrix(self, dense: nn.Module) -> torch.Tensor:
        return self._base.weight_matrix(dense)
