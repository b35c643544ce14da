"""Per-trial fine-tuning: one optimizer per trial, the user's scheduler stepped, and the
accuracy reported is the accuracy of the model left behind."""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch import seed_everything

from sketchtune import LayerConfig, apply_plan
from sketchtune.nn import SKLinear

from .boring import Classifier, DataModule
from .test_callback import callback, trainer
from .test_early_stop import _accuracy

LR = 0.1
STEPS = 4


class Scheduled(Classifier):
    """SGD with a per-step StepLR; remembers every optimizer it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_out: list[torch.optim.Optimizer] = []

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        self.handed_out.append(optimizer)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_finetuned_trials_report_what_is_left_behind() -> None:
    seed_everything(0)
    trained = Classifier()
    trainer(max_epochs=2).fit(trained, DataModule())
    model = Scheduled()
    model.load_state_dict(trained.state_dict())
    dense = copy.deepcopy(model).eval()
    cb = callback(
        run_on="validate",
        configs=LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8, 16]}),
        default_init="sketch",  # far from the dense layer: fine-tuning matters
        finetune_steps=STEPS,
        sampler=optuna.samplers.GridSampler({"net.2.num_terms": [1], "net.2.low_rank": [4, 8, 16]}),
    )
    out = trainer(callbacks=[cb], limit_train_batches=4).validate(
        model, DataModule(), verbose=False
    )
    assert cb.study is not None and cb.best_plan
    ran = [t for t in cb.study.trials if "duplicate_of" not in t.user_attrs["sketchtune"]]
    # one optimizer per trial and one for fine-tuning the chosen plan, each stepped 4 times
    assert len(model.handed_out) == len(ran) + 1
    for optimizer in model.handed_out:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5**STEPS)
    # the model left behind is fine-tuned, and its accuracy is the one reported
    assert isinstance(model.net[2], SKLinear)
    model.eval()
    left_behind = _accuracy(model)
    assert cb.best_accuracy == pytest.approx(left_behind, abs=1e-6)
    assert out[0]["val_acc"] == pytest.approx(left_behind, abs=1e-6)
    assert cb.summary is not None and cb.summary.tuned_accuracy == pytest.approx(left_behind)
    zero_shot = apply_plan(copy.deepcopy(dense), cb.best_plan)
    assert not torch.equal(zero_shot.net[2].S1, model.net[2].S1)


class StagedDataModule(DataModule):
    """Makes each split only for the stage that needs it, as Lightning's docs show."""

    def setup(self, stage: str) -> None:
        from .boring import make_data

        if stage == "fit":
            self.train = make_data(1024, seed=0)
        self.val = make_data(256, seed=1)


def test_validate_mode_fine_tuning_sets_up_the_training_split() -> None:
    seed_everything(0)
    model = Classifier()
    trainer(max_epochs=1).fit(model, DataModule())
    cb = callback(
        run_on="validate",
        configs=LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [8]}),
        finetune_steps=2,
        n_trials=1,
    )
    # trainer.validate runs setup("validate") only: the training split is not made yet
    trainer(callbacks=[cb], limit_train_batches=2).validate(
        model, StagedDataModule(), verbose=False
    )
    assert cb.best_plan and isinstance(model.net[2], SKLinear)


class Watched(Classifier):
    """Records what fine-tuning does: the batches it drew, and each optimizer step's gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[weakref.ref[torch.Tensor]] = []
        self.calls = 0
        self.calls_per_step: list[int] = []
        self.grads_at_step: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.batches.append(weakref.ref(batch[0]))
        self.calls += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)

        def before_step(optimizer: torch.optim.Optimizer, *args: Any) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
            self.grads_at_step.append(torch.cat([g.flatten() for g in grads if g is not None]))
            self.calls_per_step.append(self.calls)
            self.calls = 0

        optimizer.register_step_pre_hook(before_step)
        return optimizer


def _finetune(model: Watched, **trainer_kwargs: Any) -> None:
    seed_everything(0)
    model.load_state_dict(Classifier().state_dict())
    cb = callback(
        run_on="validate",
        configs=LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8, 16]}),
        finetune_steps=STEPS,
    )
    trainer(callbacks=[cb], **trainer_kwargs).validate(model, DataModule(), verbose=False)
    assert cb.best_plan and isinstance(model.net[2], SKLinear)


def test_fine_tuning_keeps_no_training_batch_it_has_used() -> None:
    model = Watched()
    _finetune(model)  # 3 trials and the applied plan, 4 steps each: an epoch (16 batches)
    assert len(model.batches) >= 16
    gc.collect()
    alive = [ref for ref in model.batches if ref() is not None]
    assert len(alive) <= 1  # at most the batch the iterator is paused at


def test_fine_tuning_accumulates_the_trainers_accumulate_grad_batches() -> None:
    model = Watched()
    _finetune(model, accumulate_grad_batches=3)
    assert len(model.calls_per_step) >= 2 * STEPS
    assert set(model.calls_per_step) == {3}  # three training_step calls per optimizer step


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fine_tuning_clips_gradients_as_the_trainer_says(algorithm: str) -> None:
    model = Watched()
    _finetune(model, gradient_clip_val=1e-4, gradient_clip_algorithm=algorithm)
    assert len(model.grads_at_step) >= 2 * STEPS
    for grads in model.grads_at_step:
        if algorithm == "norm":
            assert 0 < float(grads.norm()) <= 1e-4 * (1 + 1e-4)
        else:
            assert 0 < float(grads.abs().max()) <= 1e-4
