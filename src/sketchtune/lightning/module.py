"""SketchedModule: a LightningModule wrapper whose checkpoints carry their SketchPlan."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from sketchtune.lightning._checkpoint import (
    PLAN_CHECKPOINT_KEY,
    count_parameters,
    drop_dense_optimizer_state,
    drop_stale_optimizer_state,
    plan_in,
    sketch_pending,
    with_prefix,
)
from sketchtune.plan import SketchPlan, as_plan

__all__ = ["SketchedModule"]


class SketchedModule(LightningModule):
    """Wraps a LightningModule (or a plain ``nn.Module``) and keeps its sketch plan in checkpoints.

    Training, validation, test and predict steps, optimizers and the epoch hooks
    are the wrapped module's. The plan is written to every checkpoint, so
    ``SketchedModule.load_from_checkpoint(path, module=FreshModel())`` rebuilds
    the sketched architecture on a fresh dense model *before* the weights load,
    and reproduces the saved model's outputs exactly. It also reads checkpoints
    that a Trainer with :class:`SketchTuneCallback` saved for the bare
    LightningModule, and ``trainer.fit(SketchedModule(MyModel()), ckpt_path=...)``
    resumes training the sketched model (an optimizer state saved for the dense
    layers is dropped, so the optimizer starts fresh; the loops' progress is kept).

    A tuned checkpoint does not fit the dense architecture: ``MyModel.load_from_checkpoint``
    fails with PyTorch's missing/unexpected keys. Load it with
    ``SketchedModule.load_from_checkpoint(path, module=MyModel())``, or fit/validate
    ``MyModel()`` with ``ckpt_path=`` on a Trainer that has the callback.

    Args:
        module: the model; a LightningModule, or an ``nn.Module`` (then only
            ``forward``/``predict_step`` are provided: subclass to add the steps).
        plan: a :class:`SketchPlan` (or its dict / JSON path) to apply now, if the
            module is still dense; layers it already sketches are left as they are.

    Example::

        trainer = Trainer(callbacks=[SketchTuneCallback(configs, run_on="validate")])
        trainer.validate(model, datamodule)
        trainer.save_checkpoint("tuned.ckpt")
        tuned = SketchedModule.load_from_checkpoint("tuned.ckpt", module=MyModel())
        predictions = Trainer().predict(tuned, datamodule)
    """

    def __init__(
        self,
        module: nn.Module,
        plan: SketchPlan | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        self.module = module
        self.plan = SketchPlan()
        if isinstance(module, LightningModule):
            # The wrapped module's self.log() must reach the Trainer through this wrapper,
            # which is the module the Trainer drives.
            module.log = self.log  # type: ignore[method-assign]
            module.log_dict = self.log_dict  # type: ignore[method-assign]
        if plan is not None:
            self.apply_plan(plan)

    def apply_plan(self, plan: SketchPlan | Mapping[str, Any] | str | os.PathLike[str]) -> None:
        """Sketch the wrapped module's layers that ``plan`` names and are still dense."""
        plan = as_plan(plan)
        sketch_pending(self.module, plan)
        self.plan = plan

    # -- delegation ------------------------------------------------------------------

    @property
    def _inner(self) -> LightningModule:
        if not isinstance(self.module, LightningModule):
            raise NotImplementedError(
                f"SketchedModule wraps a plain {type(self.module).__name__}; training, validation and "
                "test steps come from a wrapped LightningModule. Wrap your LightningModule, or "
                "subclass SketchedModule and implement the steps."
            )
        return self.module

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.training_step(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.test_step(*args, **kwargs)

    @override
    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        inner = self.module
        if isinstance(inner, LightningModule) and is_overridden(
            "predict_step", inner, LightningModule
        ):
            return inner.predict_step(batch, batch_idx)
        if isinstance(batch, (list, tuple)):
            return self.module(batch[0])  # (inputs, targets) batches: predict from the inputs
        return self.module(batch)

    @override
    def configure_optimizers(self) -> Any:
        return self._inner.configure_optimizers()

    @override
    def on_train_epoch_start(self) -> None:
        if isinstance(self.module, LightningModule):
            self.module.on_train_epoch_start()

    @override
    def on_train_epoch_end(self) -> None:
        if isinstance(self.module, LightningModule):
            self.module.on_train_epoch_end()

    @override
    def on_validation_epoch_start(self) -> None:
        if isinstance(self.module, LightningModule):
            self.module.on_validation_epoch_start()

    @override
    def on_validation_epoch_end(self) -> None:
        if isinstance(self.module, LightningModule):
            self.module.on_validation_epoch_end()

    @override
    def on_test_epoch_end(self) -> None:
        if isinstance(self.module, LightningModule):
            self.module.on_test_epoch_end()

    # -- checkpoints -----------------------------------------------------------------

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PLAN_CHECKPOINT_KEY] = self.plan.to_dict()
        if self._trainer is not None:
            drop_stale_optimizer_state(checkpoint, self.trainer.optimizers, self)
        if isinstance(self.module, LightningModule):
            self.module.on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        plan = plan_in(checkpoint)
        if plan is None:
            raise ValueError(
                "this checkpoint holds no sketchtune plan, so the sketched architecture cannot be "
                "rebuilt: save it from a Trainer that ran SketchTuneCallback (or from a "
                "SketchedModule), or load it into your dense model instead."
            )
        dense = count_parameters(self)
        # checked against the weights before they load: a misfit leaves the module dense
        sketch_pending(self.module, plan, checkpoint.get("state_dict"))
        self.plan = plan
        # a resumed fit restores the optimizer next: its saved state may be the dense model's
        drop_dense_optimizer_state(checkpoint, dense, count_parameters(self))
        if checkpoint.get("state_dict"):
            # saved for the bare LightningModule (by SketchTuneCallback): add our prefix
            checkpoint["state_dict"] = with_prefix(checkpoint["state_dict"])
        if isinstance(self.module, LightningModule):
            self.module.on_load_checkpoint(checkpoint)
