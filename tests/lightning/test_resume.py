"""A checkpoint saved after tuning resumes training of the sketched model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from sketchtune import SketchedModule
from sketchtune.lightning import PLAN_CHECKPOINT_KEY
from sketchtune.nn import SKLinear

from .boring import Classifier, DataModule
from .test_callback import callback, trainer


class Steps(Callback):
    """Records the global step each fit starts from and how many optimizer steps it ran."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.batches = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = trainer.global_step

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by the Trainer that trained (1 epoch of 8 steps) and then tuned."""
    seed_everything(0)
    model = Classifier()
    t = trainer(callbacks=[callback()], max_epochs=1)
    t.fit(model, DataModule())
    assert isinstance(model.net[2], SKLinear)
    path = tmp_path_factory.mktemp("resume") / "tuned.ckpt"
    t.save_checkpoint(path)
    return path


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("wrap", [False, True], ids=["bare+callback", "SketchedModule+callback"])
def test_fit_resumes_the_sketched_model_with_the_callback(tuned: Path, wrap: bool) -> None:
    saved = torch.load(tuned, weights_only=False)
    assert saved["optimizer_states"] == []  # the dense layers' optimizer state is not kept
    model: LightningModule = SketchedModule(Classifier()) if wrap else Classifier()
    steps, cb = Steps(), callback()
    trainer(callbacks=[steps, cb], max_epochs=2).fit(model, DataModule(), ckpt_path=tuned)
    inner: Any = model.module if wrap else model
    assert isinstance(inner.net[2], SKLinear)
    assert steps.start == 8 and steps.batches == 8  # went on from the checkpoint's step
    assert cb.results is None  # the plan came from the checkpoint: no second search
    assert cb.applied_plan is not None and list(cb.applied_plan) == ["net.2"]
    prefix = "module." if wrap else ""
    trained = inner.net[2].state_dict()
    assert not torch.equal(trained["S1"], saved["state_dict"]["net.2.S1"])  # it trained
    assert prefix + "net.2.S1" in model.state_dict()


def test_sketched_module_resumes_without_the_callback_and_again_from_its_own_checkpoint(
    tuned: Path, tmp_path: Path
) -> None:
    model = SketchedModule(Classifier())
    steps = Steps()
    t = trainer(callbacks=[steps], max_epochs=2)
    t.fit(model, DataModule(), ckpt_path=tuned)
    assert isinstance(model.module.net[2], SKLinear) and steps.start == 8
    second = tmp_path / "second.ckpt"
    t.save_checkpoint(second)
    saved = torch.load(second, weights_only=False)
    assert saved["optimizer_states"][0]["state"]  # the sketched model's Adam state is kept
    assert PLAN_CHECKPOINT_KEY in saved
    again, steps = SketchedModule(Classifier()), Steps()
    trainer(callbacks=[steps], max_epochs=3).fit(again, DataModule(), ckpt_path=second)
    assert steps.start == 16 and steps.batches == 8


def test_validate_from_a_tuned_checkpoint_applies_its_plan(tuned: Path) -> None:
    model = Classifier()
    cb = callback(run_on="validate")
    out = trainer(callbacks=[cb]).validate(model, DataModule(), ckpt_path=tuned, verbose=False)
    assert isinstance(model.net[2], SKLinear) and cb.results is None
    reference = SketchedModule.load_from_checkpoint(tuned, module=Classifier())
    expected = trainer().validate(reference, DataModule(), verbose=False)
    assert out[0]["val_acc"] == pytest.approx(expected[0]["val_acc"])
    assert "on_load_checkpoint" not in vars(model)  # the lent hook is taken back


def test_a_bare_module_without_the_callback_cannot_load_it(tuned: Path) -> None:
    # No hook of ours runs here; PyTorch's own error says which keys differ.
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*net\.2\.weight"):
        Classifier.load_from_checkpoint(tuned)


def test_a_checkpoint_with_the_dense_optimizer_state_resumes_with_a_fresh_optimizer(
    tuned: Path, tmp_path: Path
) -> None:
    # as sketchtune 0.1 saved them: the optimizer state of the dense layers
    old = torch.load(tuned, weights_only=False)
    dense = torch.optim.Adam(Classifier().parameters())
    old["optimizer_states"] = [dense.state_dict()]
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    for model in (SketchedModule(Classifier()), Classifier()):
        steps = Steps()
        extra = [] if isinstance(model, SketchedModule) else [callback()]
        trainer(callbacks=[steps, *extra], max_epochs=2).fit(model, DataModule(), ckpt_path=path)
        assert steps.start == 8 and steps.batches == 8


def test_the_lent_hook_is_taken_back_after_an_error() -> None:
    model = Classifier()
    cb = callback(run_on="validate", monitor="val_accuracy")
    with pytest.raises(ValueError, match=r"`monitor`='val_accuracy' was not logged"):
        trainer(callbacks=[cb]).validate(model, DataModule(), verbose=False)
    assert "on_load_checkpoint" not in vars(model)


def _misplanned(tuned: Path, tmp_path: Path) -> Path:
    """The tuned checkpoint with its plan edited: another rank than its weights were saved for."""
    saved = torch.load(tuned, weights_only=False)
    layer = saved[PLAN_CHECKPOINT_KEY]["layers"]["net.2"]
    layer["params"]["low_rank"] = 2 if layer["params"]["low_rank"] != 2 else 4
    path = tmp_path / "misplanned.ckpt"
    torch.save(saved, path)
    return path


def test_a_checkpoint_whose_plan_misfits_its_weights_leaves_the_model_dense(
    tuned: Path, tmp_path: Path
) -> None:
    path = _misplanned(tuned, tmp_path)
    misfit = r"the checkpoint's sketch plan does not fit its weights: at 'net\.2' the plan builds"
    model = Classifier()
    with pytest.raises(ValueError, match=misfit + r".*the model is left as it was"):
        SketchedModule.load_from_checkpoint(path, module=model)
    assert type(model.net[2]) is torch.nn.Linear  # the caller's model, as it was given
    fresh, cb = Classifier(), callback()
    with pytest.raises(ValueError, match=misfit):
        trainer(callbacks=[cb], max_epochs=2).fit(fresh, DataModule(), ckpt_path=path)
    assert type(fresh.net[2]) is torch.nn.Linear and cb.applied_plan is None
    assert "on_load_checkpoint" not in vars(fresh)  # the callback's hook was taken back
