"""The FLOP-count speed model: recorded call shapes, multiply-adds per layer, plan speedups.

Noise-free and machine-independent, for tests, CI and ``speed_model="flops"``.
Each layer kind prices one call of its dense layer and of its sketch from the
shapes of that call (a convolution's output size, attention's sequence
lengths); a model's cost is the sum over every call of every priced layer, so
a layer applied twice per forward pass counts twice. Other operations are
ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sketchtune._modes import eval_mode
from sketchtune.kinds import SketchKind
from sketchtune.kinds._base import CallShapes
from sketchtune.registry import kind_named, kind_of, sketch_of
from sketchtune.select import sketchable_layers

if TYPE_CHECKING:
    from sketchtune.plan import LayerPlan

__all__ = [
    "ShapeRecorder",
    "estimate_speedup",
    "layer_macs",
    "plan_flops_speedup",
]

_BASE = SketchKind()


class ShapeRecorder:
    """Records the shapes of every call of named submodules during one forward pass of the model.

    The FLOP model needs them (a convolution's cost depends on its output size,
    attention's on the sequence lengths). Shapes are the same whether a name
    holds the dense layer or its sketch, so recording may happen in any trial.
    A name's calls are those of the first forward pass of ``model`` that calls
    it; when ``model`` itself is never called (an evaluator that calls a
    submodule directly), only a name's first call is kept.

    Attributes:
        shapes: ``name -> shapes of its first call`` (what the layer's kind
            records: the first input's and the output's; attention's query and key).
        calls: ``name -> shapes of each of its calls`` in that forward pass.

    Example:
        >>> import torch
        >>> from sketchtune.flops import ShapeRecorder
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> with ShapeRecorder(model, ["0"]) as recorder:
        ...     _ = model(torch.randn(2, 8))
        >>> recorder.shapes["0"]
        ((2, 8), (2, 4))
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.shapes: dict[str, CallShapes] = {}
        self.calls: dict[str, list[CallShapes]] = {}
        self._pass = 0
        self._first_pass: dict[str, int] = {}
        self._done: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ShapeRecorder:
        todo = [name for name in self.names if name not in self._done]
        if todo:
            self._handles.append(self.model.register_forward_pre_hook(self._next_pass))
        for name in todo:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._done.update(self.shapes)  # the pass that recorded them is over

    def _next_pass(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._pass += 1

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if name in self._done:
                return
            if self._first_pass.setdefault(name, self._pass) != self._pass:
                self._done.add(name)
                return
            sketched = sketch_of(module)
            kind = sketched[0] if sketched is not None else (kind_of(module) or _BASE)
            shapes = kind.call_shapes(module, args, kwargs, output)
            self.shapes.setdefault(name, shapes)
            self.calls.setdefault(name, []).append(shapes)
            if self._pass == 0:  # no forward pass of the model seen: calls cannot be grouped
                self._done.add(name)

        return hook


def layer_macs(module: nn.Module, shapes: CallShapes) -> tuple[float, float]:
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


def _calls_of(
    shapes: ShapeRecorder | Mapping[str, Sequence[CallShapes]], name: str
) -> list[CallShapes]:
    calls = shapes.calls if isinstance(shapes, ShapeRecorder) else shapes
    return list(calls.get(name, ())) or [()]  # never called: priced as one row


def plan_flops_speedup(
    dense_modules: Mapping[str, nn.Module],
    shapes: ShapeRecorder | Mapping[str, Sequence[CallShapes]],
    plan: Mapping[str, LayerPlan],
) -> float:
    """FLOP-model speedup of the layers ``dense_modules`` when ``plan`` sketches some of them.

    Args:
        dense_modules: ``name -> dense layer``: the layers priced (the others of
            the model are left out of both totals).
        shapes: a :class:`ShapeRecorder` that saw a forward pass, or
            ``name -> [shapes of each call]``; a name with no recorded call
            counts as one call of one row.
        plan: ``name -> LayerPlan`` (a :class:`~sketchtune.SketchPlan`).

    Returns:
        ``dense multiply-adds / multiply-adds with the plan``, over every call.
    """
    dense_total = sketch_total = 0.0
    for name, module in dense_modules.items():
        layer = plan.get(name)
        kind = kind_named(layer.type) if layer is not None else None
        for call in _calls_of(shapes, name):
            dense, current = layer_macs(module, call)
            dense_total += dense
            if kind is not None:
                assert layer is not None
                current = kind.sketch_macs(module, dict(layer.params), call)
            sketch_total += current
    return dense_total / sketch_total if sketch_total else 1.0


def estimate_speedup(model: nn.Module, example_input: Any = None) -> float:
    """FLOP-model speedup of ``model`` over its dense version (noise-free, for tests and CI).

    Counts the multiply-adds of every sketchable layer (Linear, Conv2d,
    MultiheadAttention, and any registered kind) and of their sketched
    replacements, over every call; other operations are ignored. With
    ``example_input`` one forward pass records each layer's real shapes
    (spatial sizes, sequence lengths) and how often it is called; without it
    every layer counts as one call of one output position, which is exact for
    MLPs on flat inputs.

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
        with eval_mode(model), recorder, torch.inference_mode():
            model(*args)
    dense = current = 0.0
    for name in names:
        module = model.get_submodule(name)
        for call in _calls_of(recorder, name):
            d, c = layer_macs(module, call)
            dense += d
            current += c
    return dense / current if current else 1.0
