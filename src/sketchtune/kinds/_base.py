"""The :class:`SketchKind` base class: everything sketchtune knows about one dense layer type."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sketchtune.nn import InputCovariance, LowRankFactors
from sketchtune.space import Categorical, Float, Int, ParamSpec

__all__ = [
    "BuildAids",
    "CallShapes",
    "Override",
    "Shape",
    "SketchKind",
    "Validator",
    "positive_int",
]

Shape = tuple[int, ...]
#: The tensor shapes of one call of a layer, as :meth:`SketchKind.call_shapes` records them.
CallShapes = tuple[Shape, ...]
#: ``(dense layer, value) -> None`` when the value is fine for the layer, else the reason it is not.
Validator = Callable[[nn.Module, Any], "str | None"]


@dataclass
class BuildAids:
    """What a caller knows about a dense layer beyond its weights, to build sketches faster or better.

    Attributes:
        calibration: covariance of the layer's inputs, for ``init="activation"``.
        factors: precomputed factorizations by init kind (``"svd"``, ``"activation"``),
            reused across ranks (the top part of a nested factorization).
        quiet: build without the warning that ``init="activation"`` falls back to
            ``"svd"`` (set when a state_dict is loaded right after, which makes the
            init irrelevant, as in :func:`~sketchtune.apply_plan`).
    """

    calibration: InputCovariance | None = None
    factors: dict[str, LowRankFactors] = field(default_factory=dict)
    quiet: bool = False


@dataclass(frozen=True)
class Override:
    """An attribute of some object of the model that must hold ``value`` while a sketch is in.

    :class:`~sketchtune.plan.Swap` sets it when it swaps the sketch in and puts the
    original value back when it restores the dense layer.
    """

    target: object
    attribute: str
    value: Any


class SketchKind:
    """How one dense layer type is sketched: one complete unit, registered with ``register_kind``.

    A subclass sets the class attributes and implements :meth:`create`,
    :meth:`dense_macs` and :meth:`sketch_macs`; everything else has a default
    that it may override (``auto_space``, ``describe``, ``unsupported``,
    ``fold``, calibration, shape recording, accuracy order, model switches).
    Lookups pick the kind registered for the most specific class in a module's
    MRO, so a kind for a subclass of ``nn.Linear`` wins over the Linear kind.

    Attributes:
        name: the sketched type's name, as written in plans (``"SKLinear"``); unique.
        dense_type: the dense type it replaces.
        sketch_type: the sketched module class it builds.
        params: accepted parameter names -> validator for a given dense layer.
        defaults: parameters that may be left out, with the value used then.
        accuracy_order: for categorical parameters, values from the most to the
            least accurate (numbers default to "larger is more accurate").
        form_of: for a kind that is another *form* of the layers a primary kind
            sketches (the int8 form of an ``nn.Linear``), that kind's name. A form
            kind is never looked up by dense type: selection and the search go
            through the primary kind, whose :meth:`plan_entry` names the form.
        form_params: parameters that select another form rather than size the sketch
            (``quant``); listed apart in error messages.
        extra_sketch_types: further module classes this kind builds (the int8-factor
            form of a sketch), so that ``sketch_of`` finds the kind for them too.

    Example:
        A kind for a toy layer is one subclass and one ``register_kind`` call
        (``tests/test_kinds.py`` tunes one end to end)::

            class AffineKind(SketchKind):
                name = "LowRankAffine"
                dense_type = Affine
                sketch_type = LowRankAffine
                params = {"rank": positive_int}

                def create(self, dense, params, seed, copy_weights, aids):
                    return LowRankAffine.from_dense(dense, params["rank"])

                def dense_macs(self, dense, shapes):
                    return dense.d_in * dense.d_out

                def sketch_macs(self, dense, params, shapes):
                    return params["rank"] * (dense.d_in + dense.d_out)

            register_kind(AffineKind())
    """

    name: ClassVar[str]
    dense_type: ClassVar[type[nn.Module]]
    sketch_type: ClassVar[type[nn.Module]]
    params: ClassVar[Mapping[str, Validator]]
    defaults: ClassVar[Mapping[str, Any]] = {}
    accuracy_order: ClassVar[Mapping[str, Sequence[Any]]] = {}
    form_of: ClassVar[str | None] = None
    form_params: ClassVar[tuple[str, ...]] = ()
    extra_sketch_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    # ------------------------------------------------------------------ identity

    def describe(self, dense: nn.Module) -> str:
        """A short description of the dense layer, e.g. ``Linear(64->32)`` (checked when a plan is applied)."""
        return type(dense).__name__

    def unsupported(self, dense: nn.Module) -> str | None:
        """Why this dense layer of ``dense_type`` cannot be sketched after all, or ``None``."""
        return None

    def params_of(self, sketched: nn.Module) -> dict[str, Any]:
        """The parameters a sketched layer was built with."""
        return {name: getattr(sketched, name) for name in self.params}

    def form(self, params: Mapping[str, Any]) -> str:
        """A layer's form in words, for tables (``"low-rank"``, ``"int8"``, ...)."""
        return "sketch"

    def plan_entry(self, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """The plan's ``(type, params)`` for a search's parameter values, or ``None``.

        ``None`` means the values describe the dense layer itself: the layer is left
        out of the plan. The default writes the values as they are under :attr:`name`;
        a kind with several forms names the form they select (see
        :mod:`sketchtune.kinds._quant`).
        """
        return self.name, dict(params)

    # ------------------------------------------------------------------ parameters

    def check_params(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        """Raise ``ValueError`` unless ``params`` holds exactly valid values for ``dense``."""
        missing = self._check_names(dense, params, where=where)
        if missing:
            raise ValueError(f"{where}: {self.name} needs a value for {missing}.")
        for name, value in params.items():
            reason = self.validate(name, dense, value)
            if reason is not None:
                raise ValueError(
                    f"{where}: {name}={value!r} is not valid for {self.describe(dense)}: {reason}."
                )

    def check_size(self, dense: nn.Module, params: Mapping[str, Any], *, where: str) -> None:
        """Raise ``ValueError`` if the sketch would store more values than ``dense`` does.

        Applied to plans read from files and checkpoints (the tuner may explore
        costly values; a file must not make us allocate more than the layer it
        replaces). The default checks nothing; kinds with a size model override it.
        """

    def check_space(self, dense: nn.Module, space: Mapping[str, ParamSpec], *, where: str) -> None:
        """Raise ``ValueError`` unless every value ``space`` can produce is valid for ``dense``."""
        missing = self._check_names(dense, space, where=where)
        if missing:
            raise ValueError(f"{where}: the space needs a value for {missing} ({self.name}).")
        for name, spec in space.items():
            for value in _extremes(spec):
                reason = self.validate(name, dense, value)
                if reason is not None:
                    raise ValueError(
                        f"{where}: {name}={spec!r} allows {value!r}, which is not valid for "
                        f"{self.describe(dense)}: {reason}."
                    )

    def validate(self, param: str, dense: nn.Module, value: Any) -> str | None:
        """``None`` when ``value`` of ``param`` is fine for ``dense``, else the reason it is not."""
        return self.params[param](dense, value)

    def _check_names(self, dense: nn.Module, given: Mapping[str, Any], *, where: str) -> list[str]:
        """Raise on unknown names; return the required names ``given`` lacks."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            own = sorted(set(self.params) - set(self.form_params))
            forms = f" (and {', '.join(self.form_params)} for its other forms)"
            raise ValueError(
                f"{where}: parameter(s) {unknown} not valid for {self.describe(dense)}, which is "
                f"sketched as {self.name} and takes {own}{forms if self.form_params else ''}."
            )
        return sorted(set(self.params) - set(given) - set(self.defaults))

    def auto_space(self, dense: nn.Module) -> dict[str, ParamSpec]:
        """The ``params="auto"`` search space: values that actually save compute on ``dense``."""
        raise ValueError(
            f"{self.name} has no 'auto' search space; give `params` explicitly "
            f"(it takes {sorted(self.params)})."
        )

    def auto_int8_space(self, dense: nn.Module) -> dict[str, ParamSpec]:
        """The ``params="auto+int8"`` space: :meth:`auto_space` plus int8 forms where they pay.

        A kind without int8 forms offers its ``"auto"`` space.
        """
        return self.auto_space(dense)

    def most_accurate(self, param: str, spec: ParamSpec) -> Any:
        """The value of ``spec`` for ``param`` that loses the least accuracy.

        The first value of :attr:`accuracy_order` that ``spec`` holds, else the
        largest number (the largest rank), else the first choice.
        """
        if isinstance(spec, Categorical):
            choices = spec.choices
            for preferred in self.accuracy_order.get(param, ()):
                if preferred in choices:
                    return preferred
            numbers = [
                c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)
            ]
            return max(numbers) if numbers else choices[0]
        try:
            return spec.grid()[-1]
        except ValueError:  # a continuous Float has no grid
            return getattr(spec, "high", spec.first())

    # ------------------------------------------------------------------ building

    def build(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool = True,
        aids: BuildAids | None = None,
    ) -> nn.Module:
        """The sketched replacement of ``dense`` (same device, dtype and train/eval mode).

        Built outside inference mode even when called inside it (e.g. during a
        Trainer's validation), so its parameters stay trainable.
        """
        with torch.inference_mode(False):
            module = self.create(dense, params, seed, copy_weights, aids or BuildAids())
        module.train(dense.training)
        return module

    def create(
        self,
        dense: nn.Module,
        params: dict[str, Any],
        seed: int,
        copy_weights: bool,
        aids: BuildAids,
    ) -> nn.Module:
        """Build the sketched module (called by :meth:`build`); ``copy_weights=False`` starts fresh."""
        raise NotImplementedError(f"{type(self).__name__} must implement create()")

    def fold(self, sketched: nn.Module) -> nn.Module:
        """Plain torch modules that compute what ``sketched`` computes (for deployment).

        The default has no plain form; kinds whose sketches are products of
        matrices override it (see :func:`sketchtune.export.fold`).
        """
        raise NotImplementedError(
            f"{self.name} has no plain-torch form; {type(self).__name__} does not implement fold()."
        )

    # ------------------------------------------------------------------ cost model

    def dense_macs(self, dense: Any, shapes: CallShapes) -> float:
        """Multiply-adds of one call of the dense layer (``shapes`` may be empty: one row)."""
        raise NotImplementedError(f"{type(self).__name__} must implement dense_macs()")

    def sketch_macs(self, dense: Any, params: dict[str, Any], shapes: CallShapes) -> float:
        """Multiply-adds of one call of its sketch with ``params``.

        ``dense`` may be the dense layer or the sketched one: cost functions read
        only attributes both share (``in_features``, ``kernel_size``, ...).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement sketch_macs()")

    def call_shapes(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> CallShapes:
        """The shapes the cost model needs from one call: the first input's and the output's."""
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        out = output[0] if isinstance(output, tuple) else output
        return tuple(tuple(t.shape) for t in (first, out) if isinstance(t, torch.Tensor))

    # ------------------------------------------------------------------ calibration

    def fan_in(self, dense: nn.Module) -> int:
        """Features of the rows the layer multiplies (the size of its input covariance)."""
        raise NotImplementedError(f"{self.name} gathers no input statistics")

    def weight_matrix(self, dense: nn.Module) -> torch.Tensor:
        """The ``d_in x d_out`` matrix a factorization (``init="svd"``/``"activation"``) starts from."""
        raise NotImplementedError(f"{self.name} has no weight matrix to factorize")

    def calibration_hook(
        self, dense: nn.Module, cov: InputCovariance
    ) -> Callable[[nn.Module, tuple[Any, ...]], None] | None:
        """A forward pre-hook that adds the layer's inputs to ``cov``, or ``None`` (no calibration)."""
        return None

    # ------------------------------------------------------------------ model-level quirks

    def overrides(self, model: nn.Module, names: Sequence[str]) -> list[Override]:
        """Attributes of ``model`` to set while sketches of this kind sit at ``names``.

        The default turns off torch's Transformer fast paths above one of
        ``names``, which read the layers' dense weights (``linear1.weight``,
        ``self_attn.in_proj_weight``) directly: the nested-tensor path of
        ``nn.TransformerEncoder`` and the fused path of
        ``nn.TransformerEncoderLayer`` (through its ``activation_relu_or_gelu``
        flag, which only that path reads).
        """
        found = []
        for prefix, module in model.named_modules():
            if not any(n.startswith(f"{prefix}." if prefix else "") for n in names):
                continue
            if isinstance(module, nn.TransformerEncoder) and getattr(
                module, "use_nested_tensor", False
            ):
                found.append(Override(module, "use_nested_tensor", False))
            if isinstance(module, nn.TransformerEncoderLayer) and module.activation_relu_or_gelu:
                found.append(Override(module, "activation_relu_or_gelu", 0))
        return found


def positive_int(_: nn.Module, value: Any) -> str | None:
    """A validator: ``value`` must be an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"it must be an int, got {type(value).__name__}"
    return None if value >= 1 else "it must be >= 1"


def _extremes(spec: ParamSpec) -> list[Any]:
    """The values worth validating: every choice, or the ends of a range (validators are monotone)."""
    if isinstance(spec, Categorical):
        return list(spec.choices)
    if isinstance(spec, Int):
        return [spec.low, spec.grid()[-1]]
    if isinstance(spec, Float):
        return [spec.low, spec.high]
    return spec.grid()
