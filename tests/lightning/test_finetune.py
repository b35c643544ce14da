"""Per-trial fine-tuning: one optimizer per trial, the user's scheduler stepped, and the
accuracy reported is the accuracy of the model left behind."""

from __future__ import annotations

import copy
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
