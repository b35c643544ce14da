"""How a sketch plan travels in Lightning checkpoints, shared by SketchedModule and the callback.

Kept free of Optuna and the tuner: loading a tuned model for inference needs
only this, :mod:`sketchtune.plan` and torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from sketchtune.plan import SketchPlan, Swap, build_replacements
from sketchtune.registry import is_sketched

__all__ = [
    "PLAN_CHECKPOINT_KEY",
    "STATE_PREFIX",
    "PlanLoader",
    "count_parameters",
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


def sketch_pending(
    model: nn.Module, plan: SketchPlan, state: Mapping[str, Any] | None = None
) -> int:
    """Sketch the layers of ``model`` that ``plan`` names and that are still dense.

    Args:
        model: the model to sketch, in place.
        plan: the plan, e.g. a checkpoint's.
        state: the checkpoint's weights (``state_dict``, bare or ``module.``-prefixed keys),
            if any: each new layer must have exactly the tensors and shapes saved for it.

    Returns:
        How many layers were replaced (0 when the model is already sketched as planned).

    Raises:
        ValueError: the plan does not fit ``state`` (a checkpoint saved for another plan, or
            edited); ``model`` is left as it was.
    """
    pending = {name: layer for name, layer in plan.items() if not _has_sketched(model, name)}
    if not pending:
        return 0
    swap = Swap(model, build_replacements(model, SketchPlan(pending)))
    swap.apply()
    problem = _misfit(model, list(pending), state) if state else None
    if problem is not None:
        swap.restore()
        raise ValueError(
            f"the checkpoint's sketch plan does not fit its weights: {problem}. The checkpoint "
            "was saved for another plan, or edited; the model is left as it was (dense there). "
            "Load it with the plan it was saved with."
        )
    return len(pending)


def _misfit(model: nn.Module, names: list[str], state: Mapping[str, Any]) -> str | None:
    """The first planned layer whose saved tensors differ from what the plan built, or ``None``."""
    for name in names:
        built = {k: tuple(v.shape) for k, v in model.get_submodule(name).state_dict().items()}
        saved: dict[str, tuple[int, ...]] = {}
        for prefix in (f"{name}.", f"{STATE_PREFIX}{name}."):
            saved = {
                key[len(prefix) :]: tuple(value.shape)
                for key, value in state.items()
                if key.startswith(prefix) and isinstance(value, torch.Tensor)
            }
            if saved:
                break
        if saved != built:
            differ = sorted(k for k in set(built) | set(saved) if built.get(k) != saved.get(k))
            shown = ", ".join(
                f"{k} {built.get(k, 'none')} vs {saved.get(k, 'none')}" for k in differ
            )
            return f"at {name!r} the plan builds / the checkpoint holds: {shown}"
    return None


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


class PlanLoader:
    """Lends a LightningModule an ``on_load_checkpoint`` that rebuilds the sketched layers first.

    Lightning loads a checkpoint's weights (``restore_model``) right after the
    LightningModule's ``on_load_checkpoint`` and before any callback hears of the
    checkpoint, so the module's own hook is the only place where a tuned
    checkpoint's plan can be applied in time. :class:`SketchedModule` has that
    hook; a bare module gets this one (an instance attribute, removed again by
    :meth:`detach`) while a Trainer with the callback runs it. The module's own
    ``on_load_checkpoint`` still runs, after the plan is applied.

    Args:
        on_plan: called with the checkpoint's plan once it is in the model.
    """

    def __init__(self, on_plan: Callable[[SketchPlan], None]) -> None:
        self.on_plan = on_plan
        self.module: LightningModule | None = None

    def attach(self, module: LightningModule) -> None:
        """Lend ``module`` the hook (not when it already has one of its own on the instance)."""
        if self.module is module or "on_load_checkpoint" in vars(module):
            return
        own = module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self.load(module, checkpoint)
            own(checkpoint)

        module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self.module = module

    def detach(self) -> None:
        """Take the hook back."""
        if self.module is not None:
            vars(self.module).pop("on_load_checkpoint", None)
            self.module = None

    def load(self, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Apply the checkpoint's plan to ``module`` (if it is still dense there)."""
        plan = plan_in(checkpoint)
        if not plan:
            return
        dense = count_parameters(module)
        if sketch_pending(module, plan, checkpoint.get("state_dict")):
            # the optimizer is restored next: its saved state may be the dense model's
            drop_dense_optimizer_state(checkpoint, dense, count_parameters(module))
        self.on_plan(plan)


def count_parameters(module: nn.Module) -> int:
    """How many parameter tensors ``module`` has (what an optimizer over it holds)."""
    return sum(1 for _ in module.parameters())
