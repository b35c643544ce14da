"""PyTorch Lightning integration: :class:`SketchTuneCallback`, :class:`SketchedModule` and the CLI.

Names are imported on first use, so ``import sketchtune.lightning.module`` (loading
a tuned model) never imports Optuna or the tuner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "PLAN_CHECKPOINT_KEY": "sketchtune.lightning._checkpoint",
    "SketchTuneCLI": "sketchtune.lightning.cli",
    "SketchTuneCallback": "sketchtune.lightning.callback",
    "SketchedModule": "sketchtune.lightning.module",
}

__all__ = ["PLAN_CHECKPOINT_KEY", "SketchTuneCLI", "SketchTuneCallback", "SketchedModule"]

if TYPE_CHECKING:
    from sketchtune.lightning._checkpoint import PLAN_CHECKPOINT_KEY
    from sketchtune.lightning.callback import SketchTuneCallback
    from sketchtune.lightning.cli import SketchTuneCLI
    from sketchtune.lightning.module import SketchedModule


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sketchtune.lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
