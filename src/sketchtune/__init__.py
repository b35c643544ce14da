"""sketchtune: faster trained PyTorch models through sketched layers tuned with Optuna.

Public names are imported lazily, so ``import sketchtune.nn`` needs only torch,
and ``import sketchtune`` stays cheap until the tuner or the Lightning
integration is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AccuracyFloor": "sketchtune.evaluate",
    "Categorical": "sketchtune.space",
    "Evaluator": "sketchtune.evaluate",
    "Float": "sketchtune.space",
    "Int": "sketchtune.space",
    "LayerConfig": "sketchtune.config",
    "LayerPlan": "sketchtune.plan",
    "OptunaSearch": "sketchtune.search",
    "ParamSpec": "sketchtune.space",
    "RandMultiHeadAttention": "sketchtune.nn.attention",
    "SKAutoTuner": "sketchtune.tuner",
    "SKConv2d": "sketchtune.nn.conv",
    "SKLinear": "sketchtune.nn.linear",
    "SketchKind": "sketchtune.kinds",
    "SketchPlan": "sketchtune.plan",
    "SketchTuneCLI": "sketchtune.lightning.cli",
    "SketchTuneCallback": "sketchtune.lightning.callback",
    "SketchedModule": "sketchtune.lightning.module",
    "TuningConfigs": "sketchtune.config",
    "apply_plan": "sketchtune.plan",
    "estimate_speedup": "sketchtune.measure",
    "export_plain": "sketchtune.export",
    "format_model_tree": "sketchtune.results",
    "measure_throughput": "sketchtune.measure",
    "register_kind": "sketchtune.registry",
    "select_layers": "sketchtune.select",
}

__all__ = [
    "AccuracyFloor",
    "Categorical",
    "Evaluator",
    "Float",
    "Int",
    "LayerConfig",
    "LayerPlan",
    "OptunaSearch",
    "ParamSpec",
    "RandMultiHeadAttention",
    "SKAutoTuner",
    "SKConv2d",
    "SKLinear",
    "SketchKind",
    "SketchPlan",
    "SketchTuneCLI",
    "SketchTuneCallback",
    "SketchedModule",
    "TuningConfigs",
    "__version__",
    "apply_plan",
    "estimate_speedup",
    "export_plain",
    "format_model_tree",
    "measure_throughput",
    "register_kind",
    "select_layers",
]

if TYPE_CHECKING:
    from sketchtune.config import LayerConfig, TuningConfigs
    from sketchtune.evaluate import AccuracyFloor, Evaluator
    from sketchtune.export import export_plain
    from sketchtune.kinds import SketchKind
    from sketchtune.lightning.callback import SketchTuneCallback
    from sketchtune.lightning.cli import SketchTuneCLI
    from sketchtune.lightning.module import SketchedModule
    from sketchtune.measure import estimate_speedup, measure_throughput
    from sketchtune.nn.attention import RandMultiHeadAttention
    from sketchtune.nn.conv import SKConv2d
    from sketchtune.nn.linear import SKLinear
    from sketchtune.plan import LayerPlan, SketchPlan, apply_plan
    from sketchtune.registry import register_kind
    from sketchtune.results import format_model_tree
    from sketchtune.search import OptunaSearch
    from sketchtune.select import select_layers
    from sketchtune.space import Categorical, Float, Int, ParamSpec
    from sketchtune.tuner import SKAutoTuner


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sketchtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
