"""How a sketch plan travels in Lightning checkpoints, shared by SketchedModule and the callback.

Kept free of Optuna and the tuner: loading a tuned model for inference needs
only this, :mod:`sketchtune.plan` and torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sketchtune.plan import SketchPlan, apply_plan
from sketchtune.registry import is_sketched

__all__ = [
    "PLAN_CHECKPOINT_KEY",
    "STATE_PREFIX",
    "drop_dense_optimizer_state",
    "drop_stale_optimizer_state",
    "plan_in",
    "sketch_pending",
    "with_prefix",
]

#: where the applied plan is stored in checkpoints (read by SketchedModule.load_from_checkpoint)
PLAN_CHECKPOINT_KEY = "sketchtune_plan"

#: SketchedModule keeps the wrapped model as ``self.module``, so its state-dict keys carry this
STATE_PREFIX = "module."


def plan_in(checkpoint: Mapping[str, Any]) -> SketchPlan | None:
    """The plan a checkpoint carries, or ``None`` when it was saved without sketchtune."""
    data = checkpoint.get(PLAN_CHECKPOINT_KEY)
    return None if data is None else SketchPlan.from_dict(data)


def with_prefix(state: Mapping[str, Any], prefix: str = STATE_PREFIX) -> dict[str, Any]:
    """``state`` with ``prefix`` in front of every key that lacks it.

    A Trainer that tuned a bare LightningModule saves keys like ``net.2.S1``;
    the SketchedModule that wraps the same model expects ``module.net.2.S1``.
    """
    if all(key.startswith(prefix) for key in state):
        return dict(state)
    return {prefix + key: value for key, value in state.items()}


def sketch_pending(model: nn.Module, plan: SketchPlan) -> int:
    """Sketch the layers of ``model`` that ``plan`` names and that are still dense.

    Returns:
        How many layers were replaced (0 when the model is already sketched as planned).
    """
    pending = {name: layer for name, layer in plan.items() if not _has_sketched(model, name)}
    if pending:
        apply_plan(model, SketchPlan(pending))
    return len(pending)


def drop_stale_optimizer_state(
    checkpoint: dict[str, Any], optimizers: Iterable[torch.optim.Optimizer], model: nn.Module
) -> bool:
    """Empty the checkpoint's optimizer and scheduler states when they belong to swapped-out layers.

    After a search swaps sketched layers in, the Trainer's optimizer still holds
    the dense layers' parameters; a resumed run could not load that state into
    an optimizer of the sketched model. Empty lists make Lightning start fresh
    optimizers and schedulers (the loops' progress is still restored).

    Returns:
        Whether the states were dropped.
    """
    own = {id(p) for p in model.parameters()}
    held = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if all(id(p) in own for p in held):
        return False
    checkpoint["optimizer_states"] = []
    checkpoint["lr_schedulers"] = []
    return True


def drop_dense_optimizer_state(checkpoint: dict[str, Any], dense: int, sketched: int) -> bool:
    """Empty the optimizer state of a checkpoint whose optimizer held the dense model's parameters.

    Args:
        checkpoint: a Lightning checkpoint whose plan was just applied.
        dense: how many parameters the model had before the plan was applied.
        sketched: how many it has now.

    Returns:
        Whether the states were dropped (saved for ``dense`` parameters, not ``sketched``).
    """
    states = checkpoint.get("optimizer_states") or []
    saved = sum(len(g["params"]) for s in states for g in s.get("param_groups", []))
    if not states or dense == sketched or saved != dense:
        return False
    checkpoint["optimizer_states"] = []
    checkpoint["lr_schedulers"] = []
    return True


def _has_sketched(module: nn.Module, name: str) -> bool:
    try:
        return is_sketched(module.get_submodule(name))
    except AttributeError:
        return False
