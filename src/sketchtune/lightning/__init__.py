"""PyTorch Lightning integration: :class:`SketchTuneCallback`, :class:`SketchedModule` and the CLI."""

from __future__ import annotations

from sketchtune.lightning.callback import PLAN_CHECKPOINT_KEY, SketchTuneCallback
from sketchtune.lightning.cli import SketchTuneCLI
from sketchtune.lightning.module import SketchedModule

__all__ = ["PLAN_CHECKPOINT_KEY", "SketchTuneCLI", "SketchTuneCallback", "SketchedModule"]
