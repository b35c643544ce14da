"""Fine-tuning a trial's sketched layers with the user's ``training_step``, optimizer and LR schedulers."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.utilities.model_helpers import is_overridden

from sketchtune._modes import preserve_modes
from sketchtune.registry import is_sketched

__all__ = ["FineTuner", "iterate", "training_batches"]


class FineTuner:
    """Optimizer steps on the sketched layers only, with one optimizer for the whole trial.

    ``configure_optimizers`` is called once, when the tuner is made, as Lightning
    calls it once per fit; its first optimizer steps the sketched layers (every
    other parameter is frozen meanwhile) and its LR schedulers are stepped as
    Lightning steps them: ``interval="step"`` schedulers every ``frequency``
    optimizer steps, ``interval="epoch"`` ones every ``frequency`` passes over the
    training batches, plateau schedulers with their monitored metric when it
    has been logged. Each optimizer step follows the Trainer's settings as its
    training loop does: ``accumulate_grad_batches`` batches (each loss divided by
    that number), then ``configure_gradient_clipping`` with the Trainer's
    ``gradient_clip_val`` and ``gradient_clip_algorithm``.

    Args:
        trainer: the Trainer whose strategy and precision the steps use.
        pl_module: the LightningModule, with the trial's sketched layers in place.
        batches: an endless iterator of training batches.
        epoch_length: batches per epoch (for ``interval="epoch"`` schedulers).
    """

    def __init__(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batches: Iterator[Any],
        epoch_length: int,
    ) -> None:
        self.trainer = trainer
        self.module = pl_module
        self.batches = batches
        self.epoch_length = max(1, epoch_length)
        self.steps = 0
        self.batches_seen = 0
        self.accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        optimizers, self.schedulers = _init_optimizers_and_lr_schedulers(pl_module)
        if not optimizers or not isinstance(optimizers[0], torch.optim.Optimizer):
            raise TypeError(
                "finetune_steps > 0 needs configure_optimizers to return an optimizer (or a "
                f"list/dict holding one), got {optimizers!r}. Return one, or set finetune_steps=0."
            )
        self.optimizer = optimizers[0]
        self.schedulers = [c for c in self.schedulers if c.scheduler.optimizer is self.optimizer]

    def run(self, steps: int) -> None:
        """``steps`` more optimizer steps of the user's ``training_step``."""
        module = self.module
        sketched = [m for m in module.modules() if is_sketched(m)]
        trainable = {id(p) for m in sketched for p in m.parameters()}
        frozen = [p for p in module.parameters() if id(p) not in trainable and p.requires_grad]
        # training_step may self.log(); outside the Trainer's loops that would raise, and
        # a trial's training curves are not the user's, so logging is silenced here.
        saved_log = vars(module).get("log"), vars(module).get("log_dict")
        module.log = _ignore  # type: ignore[method-assign]
        module.log_dict = _ignore  # type: ignore[method-assign]
        try:
            for p in frozen:
                p.requires_grad_(False)
            with preserve_modes(module), torch.enable_grad(), torch.inference_mode(False):
                module.eval()
                for m in sketched:
                    m.train()
                for _ in range(steps):
                    self._step(sketched)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for name, value in zip(("log", "log_dict"), saved_log, strict=True):
                if value is None:
                    vars(module).pop(name, None)
                else:
                    vars(module)[name] = value

    def _step(self, sketched: list[torch.nn.Module]) -> None:
        trainer = self.trainer
        for _ in range(self.accumulate):
            self._backward(self.batches_seen % self.epoch_length)
            self.batches_seen += 1
        if trainer.world_size > 1:
            for p in (p for m in sketched for p in m.parameters()):
                if p.grad is not None:
                    p.grad = trainer.strategy.reduce(p.grad, reduce_op="mean")
        # the user's hook, as Lightning calls it before each step (it clips with the
        # precision plugin: gradient_clip_val=None or 0 clips nothing)
        self.module.configure_gradient_clipping(
            self.optimizer,
            gradient_clip_val=trainer.gradient_clip_val,
            gradient_clip_algorithm=trainer.gradient_clip_algorithm,
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._update_schedulers()

    def _backward(self, batch_idx: int) -> None:
        """One batch's ``training_step`` and backward pass (the loss scaled for accumulation)."""
        trainer = self.trainer
        # as Lightning's training loop prepares a batch: the precision's input dtype first
        batch = trainer.precision_plugin.convert_input(next(self.batches))
        batch = self.module.on_before_batch_transfer(batch, 0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        with trainer.precision_plugin.train_step_context():
            out = self.module.training_step(batch, batch_idx)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                "finetune_steps needs training_step to return the loss (a tensor or a dict with "
                f"'loss'), got {type(out).__name__}."
            )
        (loss / self.accumulate if self.accumulate > 1 else loss).backward()

    def _update_schedulers(self) -> None:
        # an epoch is epoch_length batches; with accumulation one step draws several
        epoch = self.batches_seen // self.epoch_length
        epoch_end = epoch > (self.batches_seen - self.accumulate) // self.epoch_length
        for config in self.schedulers:
            if config.interval == "step":
                due = self.steps % config.frequency == 0
            else:
                due = epoch_end and epoch % config.frequency == 0
            if not due:
                continue
            metric = None
            if config.reduce_on_plateau:
                metric = self.trainer.callback_metrics.get(config.monitor or "")
                if metric is None:
                    continue  # nothing to compare yet; Lightning would wait for it too
            self.module.lr_scheduler_step(config.scheduler, metric)


def training_batches(trainer: Trainer, pl_module: LightningModule) -> tuple[Iterator[Any], int]:
    """An endless iterator of training batches, and how many batches make an epoch.

    Each epoch iterates the dataloader afresh (reshuffled, as Lightning's epochs
    are) and nothing is kept: a batch is freed once its step is done.
    """
    loader = trainer.train_dataloader
    if loader is None:
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None else pl_module
        if not is_overridden("train_dataloader", source):
            raise ValueError(
                "finetune_steps > 0 needs training data: give the Trainer a datamodule or "
                "module with train_dataloader(), or set finetune_steps=0."
            )
        try:
            loader = source.train_dataloader()
        except AttributeError:
            # trainer.validate() ran setup("validate") only, and a datamodule that makes
            # each split for the stage that needs it has no training split yet
            source.setup("fit")
            loader = source.train_dataloader()
    length = trainer.num_training_batches  # honours limit_train_batches after a fit
    limit: int | None = None
    if 0 < length < float("inf"):
        limit = int(length)
    else:
        try:
            length = limit = len(iterate_source(loader))
        except TypeError:
            length = 1  # an iterable dataset: each epoch runs until it ends
    return _epochs(loader, limit), int(length)


def _epochs(loader: Any, limit: int | None) -> Iterator[Any]:
    """Batches of ``loader``, epoch after epoch (at most ``limit`` each), none of them kept.

    ``itertools.cycle`` would keep every batch of the first epoch for replaying.
    """
    while True:
        drawn = 0
        for batch in itertools.islice(iterate(loader), limit):
            drawn += 1
            yield batch
        if not drawn:
            raise ValueError(
                "finetune_steps > 0 needs training batches, but the training dataloader gave "
                "none; give it data (and limit_train_batches > 0), or set finetune_steps=0."
            )


def iterate_source(loader: Any) -> Any:
    """The first DataLoader of a list/dict of them, or ``loader`` itself."""
    if isinstance(loader, (list, tuple)):
        return loader[0]
    if isinstance(loader, dict):
        return next(iter(loader.values()))
    return loader


def iterate(loader: Any) -> Iterator[Any]:
    """Batches of a DataLoader, or of the first of a list/dict of them."""
    return iter(iterate_source(loader))


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
