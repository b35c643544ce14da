"""Trust boundaries of the callback: no credentials in checkpoints, a checkpoint never picks the
storage, bad storage URLs and output folders fail before training, failures restore modes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.nn import SKLinear
from tests.lightning.boring import Classifier, DataModule

SECRET = "hunter2@x"
URL = f"postgresql+psycopg://me:{SECRET}@127.0.0.1:1/tune"


def callback(**kw: Any) -> SketchTuneCallback:
    return SketchTuneCallback(
        LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8]}),
        speed="flops",
        n_trials=2,
        **kw,
    )


def trainer(cb: SketchTuneCallback, **kw: Any) -> Trainer:
    settings: dict[str, Any] = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 2,
    }
    return Trainer(callbacks=[cb], **{**settings, **kw})


class Counting(Classifier):
    def __init__(self) -> None:
        super().__init__(width=32)
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_checkpoint_state_carries_no_credentials() -> None:
    state = callback(storage=URL, study_name="s").state_dict()
    assert SECRET not in str(state) and "hunter2" not in str(state)
    assert state["storage"] == "postgresql+psycopg://me:***@127.0.0.1:1/tune"


def test_a_checkpoint_never_chooses_the_storage() -> None:
    received = {"storage": "sqlite:///somewhere/else.db", "study_name": "theirs", "best_plan": None}
    cb = callback()
    cb.load_state_dict(received)
    assert cb.storage is None and cb.study_name is None
    mine = callback(storage="sqlite:///mine.db")
    mine.load_state_dict(received)  # another storage: its study name is not adopted either
    assert mine.storage == "sqlite:///mine.db" and mine.study_name is None
    mine.load_state_dict({**received, "storage": "sqlite:///mine.db"})
    assert mine.study_name == "theirs"  # saved for this very storage: resumed


def test_a_wrong_storage_url_fails_before_training() -> None:
    model = Counting()
    with pytest.raises(ValueError, match="could not open the Optuna storage") as caught:
        trainer(callback(storage=URL)).fit(model, DataModule())
    assert model.steps == 0
    assert "hunter2" not in str(caught.value)


def test_an_unwritable_output_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = Counting()
    with pytest.raises(ValueError, match=r"`output_dir`=.*file/runs' cannot be written"):
        trainer(callback(output_dir=str(blocker / "runs"))).fit(model, DataModule())
    assert model.steps == 0


class FailsInValidation(Classifier):
    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        raise RuntimeError("evaluation bug")


def test_a_failed_validate_search_leaves_the_model_in_its_mode() -> None:
    model = FailsInValidation(width=32)
    model.train()
    with pytest.raises(RuntimeError, match="evaluation bug"):
        trainer(callback(run_on="validate")).validate(model, DataModule(), verbose=False)
    assert model.training and all(m.training for m in model.modules())


def test_the_search_runs_under_the_trainers_bf16_precision() -> None:
    torch.manual_seed(0)
    model = Classifier(width=64)
    cb = SketchTuneCallback(
        LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8]}),
        speed="measure",
        speed_batches=2,
        warmup_batches=1,
        n_trials=2,
        max_accuracy_drop=1.0,
        strategy="sampler",
    )
    t = trainer(cb, precision="bf16-mixed")
    t.fit(model, DataModule())  # trains, then tunes: every trial validates and predicts in bf16
    assert cb.results is not None and len(cb.results) == 2
    assert cb.results.state.eq("COMPLETE").all()
    assert cb.dense_accuracy is not None


def test_the_summary_shows_the_confirmed_speedup() -> None:
    torch.manual_seed(0)
    cb = SketchTuneCallback(
        LayerConfig(["net.2", "net.4"], {"num_terms": 1, "low_rank": [2]}),
        speed="measure",
        speed_batches=2,
        warmup_batches=1,
        n_trials=2,
        max_accuracy_drop=1.0,
        strategy="sampler",
    )
    trainer(cb).fit(Classifier(width=512), DataModule())
    assert cb.summary is not None and cb.tuner is not None
    if cb.best_plan:  # kept only when confirmed faster
        assert cb.tuner.confirmation is not None
        assert cb.summary.speedup == cb.best_speedup == cb.tuner.confirmation["speedup"]
    else:
        assert cb.summary.speedup is None and cb.best_speedup is None


def test_the_dashboard_line_of_summary_md_is_shell_quoted(tmp_path: Path) -> None:
    folder = tmp_path / "it's my $HOME"
    folder.mkdir()
    storage = f"sqlite:///{folder / 'tune.db'}"
    cb = callback(storage=storage, output_dir=str(tmp_path / "out"), accuracy_threshold=0.0)
    trainer(cb).fit(Classifier(width=32), DataModule())
    line = (tmp_path / "out" / "summary.md").read_text().strip().splitlines()[-1]
    prefix = "Browse the study: "
    assert line.startswith(prefix)
    assert shlex.split(line[len(prefix) :]) == ["optuna-dashboard", storage]


def test_a_report_that_cannot_be_written_warns_and_the_result_is_kept(tmp_path: Path) -> None:
    """A full disk (here: a folder where the report's file must go) while the report is written."""
    out = tmp_path / "out"
    (out / "results.csv").mkdir(parents=True)  # output_dir is writable; results.csv is not
    log_dir = tmp_path / "logs" / "run" / "version_0"
    (log_dir / "sketchtune_plan.json").mkdir(parents=True)
    torch.manual_seed(0)
    model = Classifier(width=32)
    cb = callback(output_dir=str(out), accuracy_threshold=0.0)
    t = trainer(cb, logger=CSVLogger(tmp_path / "logs", name="run", version=0))
    with pytest.warns(UserWarning, match="could not write") as caught:
        t.fit(model, DataModule())
    unwritten = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert len(unwritten) == 2
    assert (
        f"could not write '{out / 'results.csv'}' (Is a directory)" in unwritten[0] + unwritten[1]
    )
    assert f"'{log_dir / 'sketchtune_plan.json'}'" in unwritten[0] + unwritten[1]
    assert "The result is kept" in unwritten[0]
    # the model and the callback agree, and a checkpoint saved now carries the plan
    assert cb.best_plan and cb.applied_plan == cb.best_plan and cb.summary is not None
    assert isinstance(model.net[2], SKLinear)
    path = tmp_path / "tuned.ckpt"
    t.save_checkpoint(path)
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    fresh = Classifier(width=32)
    # rebuilt from the checkpoint's plan by a Trainer with the callback (no new search)
    again = callback(accuracy_threshold=0.0)
    trainer(again, max_epochs=1, limit_train_batches=0).fit(fresh, DataModule(), ckpt_path=path)
    assert isinstance(fresh.net[2], SKLinear) and again.applied_plan == cb.best_plan
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
