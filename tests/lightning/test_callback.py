from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from sketchtune import LayerConfig, SketchedModule, SketchTuneCallback
from sketchtune.nn import SKLinear

from .boring import Classifier, DataModule

SPACE = {"num_terms": 1, "low_rank": [4, 8, 16]}


def trainer(**kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "limit_train_batches": 8,
        "limit_val_batches": 4,
        "deterministic": True,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return Trainer(**defaults)


def callback(**kwargs: Any) -> SketchTuneCallback:
    defaults: dict[str, Any] = {
        "configs": LayerConfig(["net.2"], SPACE),
        "accuracy_threshold": 0.0,
        "n_trials": 3,
        "seed": 0,
        "speed": "flops",
        "strategy": "sampler",  # the grid below decides the trials (as the seed's global search did)
        "sampler": optuna.samplers.GridSampler(
            {"net.2.num_terms": [1], "net.2.low_rank": [4, 8, 16]}
        ),
    }
    defaults.update(kwargs)
    return SketchTuneCallback(**defaults)


@pytest.fixture
def trained() -> Classifier:
    seed_everything(0)
    model = Classifier()
    trainer().fit(model, DataModule())
    return model


class Recorder(Callback):
    """Counts hooks that trials must not trigger (checkpointing, early stopping listen here)."""

    def __init__(self) -> None:
        self.validation_ends = 0

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.validation_ends += 1


def test_fit_then_tune_uses_the_validation_loop_and_restores_the_trainer(tmp_path: Path) -> None:
    seed_everything(0)
    model, recorder = Classifier(), Recorder()
    cb = callback()
    t = trainer(callbacks=[recorder, cb])
    t.fit(model, DataModule())
    assert recorder.validation_ends == 2  # one per epoch: no trial reached the user's callbacks
    assert t.callbacks[:2] == [recorder, cb]
    assert cb.results is not None and len(cb.results) == 3
    # the Trainer's own validation loop produced the accuracies: the dense one equals a fresh validate()
    dense_accuracy = cb.dense_accuracy
    assert cb.best_plan is not None and list(cb.best_plan) == ["net.2"]
    assert isinstance(model.net[2], SKLinear) and model.net[2].low_rank == 4  # best FLOP speedup
    assert t.callback_metrics["val_acc"] == pytest.approx(dense_accuracy)  # metrics put back
    sketched_acc = t.validate(model, DataModule(), verbose=False)[0]["val_acc"]
    assert sketched_acc == pytest.approx(cb.results.set_index("net.2.low_rank").accuracy[4])


def test_validate_mode_tunes_an_already_trained_model(trained: Classifier) -> None:
    trained.train()
    cb = callback(run_on="validate")
    t = trainer(callbacks=[cb])
    out = t.validate(trained, DataModule(), verbose=False)
    assert cb.results is not None and len(cb.results) == 3
    assert isinstance(trained.net[2], SKLinear)
    # validate() reports the tuned model, and leaves the module in the mode it found it in
    assert out[0]["val_acc"] == pytest.approx(
        float(cb.results.set_index("net.2.low_rank").accuracy[4])
    )
    assert trained.training


def test_measured_speed_and_a_relative_floor(trained: Classifier) -> None:
    cb = callback(
        run_on="validate",
        speed="measure",
        speed_batches=3,
        warmup_batches=1,
        accuracy_threshold=None,
        max_accuracy_drop=1.0,
    )
    trainer(callbacks=[cb]).validate(trained, DataModule(), verbose=False)
    df = cb.results
    assert df is not None
    assert df.speed.notna().all() and df.speedup.notna().all()  # every trial keeps a 1.0 drop
    assert cb.tuner is not None and cb.tuner.floor.value == pytest.approx(cb.dense_accuracy - 1.0)


def test_mode_min_inverts_the_floor(trained: Classifier) -> None:
    cb = callback(
        run_on="validate",
        monitor="val_loss",
        mode="min",
        accuracy_threshold=None,
        max_accuracy_drop=0.05,
    )
    trainer(callbacks=[cb]).validate(trained, DataModule(), verbose=False)
    assert cb.tuner is not None and cb.dense_accuracy is not None
    assert cb.tuner.floor.mode == "min" and cb.tuner.floor.value == pytest.approx(
        cb.dense_accuracy + 0.05
    )
    df = cb.results
    assert df is not None
    assert (df.feasible == (df.accuracy <= cb.tuner.floor.value)).all()


def test_missing_monitor_lists_the_logged_metrics(trained: Classifier) -> None:
    cb = callback(run_on="validate", monitor="val_accuracy")
    with pytest.raises(
        ValueError, match=r"`monitor`='val_accuracy' was not logged.*\['val_acc', 'val_loss'\]"
    ):
        trainer(callbacks=[cb]).validate(trained, DataModule(), verbose=False)
    assert not isinstance(trained.net[2], SKLinear)


class StepLogged(Classifier):
    """Logs the monitored metric per validation batch only."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", accuracy, on_step=True, on_epoch=False)
        self.log_dict({"val_size": float(len(y))})


def test_a_monitor_logged_per_step_only_is_explained() -> None:
    seed_everything(0)
    model = StepLogged()
    model.load_state_dict(Classifier().state_dict())
    cb = callback(run_on="validate")
    with pytest.raises(
        ValueError,
        match=r"`monitor`='val_acc' is logged with on_step=True, on_epoch=False.*epoch metrics "
        r"are \['val_size'\]\)\. Log it per epoch: self\.log\('val_acc', value, on_epoch=True\)",
    ):
        trainer(callbacks=[cb]).validate(model, DataModule(), verbose=False)
    assert "log" not in vars(model)  # the module's own log() is back
    assert not isinstance(model.net[2], SKLinear)


def test_loggers_get_one_step_per_trial_and_the_plan(trained: Classifier, tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    cb = callback(run_on="validate")
    trainer(callbacks=[cb], logger=logger).validate(trained, DataModule(), verbose=False)
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "sketchtune/accuracy" in metrics and "sketchtune/best_speedup" in metrics
    assert metrics.count("\n") >= 4  # header + three trials + summary rows
    assert (Path(logger.log_dir) / "sketchtune_plan.json").exists()


def test_early_stop_proves_the_floor_unreachable(trained: Classifier) -> None:
    trained.hparams.return_metrics = True  # validation_step returns the batch metric
    t = trainer()
    t.validate(trained, DataModule(), verbose=False)
    dense = float(t.callback_metrics["val_acc"])
    cb = callback(run_on="validate", accuracy_threshold=dense - 1e-6)
    trainer(callbacks=[cb]).validate(trained, DataModule(), verbose=False)
    study = cb.study
    assert study is not None
    stopped = [t for t in study.trials if t.user_attrs["sketchtune"].get("early_stop")]
    assert stopped, "low-rank sketches should be stopped before the last validation batch"
    for trial in stopped:
        info = trial.user_attrs["sketchtune"]
        assert info["feasible"] is False and info["accuracy"] < dense  # a bound below the floor


def test_finetune_with_pruning_reports_intermediate_values(trained: Classifier) -> None:
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    cb = callback(
        run_on="validate",
        finetune_steps=4,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        sampler=optuna.samplers.GridSampler({"net.2.num_terms": [1], "net.2.low_rank": [16, 8, 4]}),
        apply_best=False,
    )
    trainer(callbacks=[cb], limit_train_batches=4).validate(trained, DataModule(), verbose=False)
    study = cb.study
    assert study is not None
    first = study.trials[0]
    assert sorted(first.intermediate_values) == [0, 2, 4]
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in study.trials) or all(
        t.intermediate_values[0] <= t.intermediate_values[4] for t in study.trials
    )
    # the trials' fine-tuned weights are discarded; the dense model is untouched
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_study_continues_across_trainer_runs_and_checkpoints(
    trained: Classifier, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    grid = {"net.2.num_terms": [1], "net.2.low_rank": [4, 8, 16]}
    first = callback(
        run_on="validate",
        storage=storage,
        study_name="runs",
        n_trials=2,
        apply_best=False,
        sampler=optuna.samplers.GridSampler(grid, seed=0),
    )
    trainer(callbacks=[first]).validate(trained, DataModule(), verbose=False)
    assert first.study is not None and len(first.study.trials) == 2
    state = first.state_dict()
    assert state["storage"] == storage and state["study_name"] == "runs"

    second = callback(
        run_on="validate",
        n_trials=3,
        apply_best=False,
        sampler=optuna.samplers.GridSampler(grid, seed=0),
    )
    second.load_state_dict(state)  # as when resuming a Trainer from a checkpoint
    trainer(callbacks=[second]).validate(trained, DataModule(), verbose=False)
    assert second.study is not None
    assert [t.number for t in second.study.trials] == [0, 1, 2]
    assert sorted(t.params["net.2.low_rank"] for t in second.study.trials) == [4, 8, 16]


def test_in_memory_study_lives_as_long_as_the_callback(trained: Classifier) -> None:
    cb = callback(run_on="validate", n_trials=2, apply_best=False)
    trainer(callbacks=[cb]).validate(trained, DataModule(), verbose=False)
    cb.n_trials = 3
    trainer(callbacks=[cb]).validate(trained, DataModule(), verbose=False)
    assert cb.study is not None and len(cb.study.trials) == 3


def test_checkpoint_from_the_tuning_trainer_reloads_exactly_without_the_callback(
    trained: Classifier, tmp_path: Path
) -> None:
    cb = callback(run_on="validate")
    t = trainer(callbacks=[cb])
    t.validate(trained, DataModule(), verbose=False)
    path = tmp_path / "tuned.ckpt"
    t.save_checkpoint(path)
    reloaded = SketchedModule.load_from_checkpoint(path, module=Classifier())
    assert isinstance(reloaded.module.net[2], SKLinear)
    x = torch.randn(5, 32)
    trained.eval()
    reloaded.eval()
    assert torch.equal(reloaded(x), trained(x))
    assert torch.equal(reloaded.predict_step((x, None), 0), trained(x))


def test_sketched_module_trains_saves_and_reloads(trained: Classifier, tmp_path: Path) -> None:
    plan = {"net.2": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8}, "seed": 1}}
    wrapped = SketchedModule(trained, plan)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(callbacks=[checkpoint], enable_checkpointing=True, max_epochs=1)
    t.fit(
        wrapped, DataModule()
    )  # training_step, validation_step and self.log go through the wrapper
    assert "val_acc" in t.callback_metrics
    reloaded = SketchedModule.load_from_checkpoint(tmp_path / "last.ckpt", module=Classifier())
    x = torch.randn(3, 32)
    assert torch.equal(reloaded.eval()(x), wrapped.eval()(x))
    plain = tmp_path / "plain.ckpt"
    t2 = trainer(max_epochs=1)
    t2.fit(Classifier(), DataModule())
    t2.save_checkpoint(plain)
    with pytest.raises(ValueError, match=r"holds no sketchtune plan"):
        SketchedModule.load_from_checkpoint(plain, module=Classifier())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"monitor": ""}, ValueError, r"`monitor` must be the name of a logged metric"),
        ({"mode": "up"}, ValueError, r"`mode` must be one of 'max', 'min'; got 'up'"),
        ({"speed": "fast"}, ValueError, r"`speed` must be one of 'measure', 'flops'; got 'fast'"),
        (
            {"run_on": "test"},
            ValueError,
            r"`run_on` must be one of 'fit_end', 'validate'; got 'test'",
        ),
        ({"n_trials": 0}, ValueError, r"`n_trials` must be a positive int, got 0"),
        (
            {"accuracy_threshold": 95.0},
            ValueError,
            r"`accuracy_threshold`=95.0 is outside `metric_range`=\(0.0, 1.0\)",
        ),
        ({"output_dir": 3}, TypeError, r"`output_dir` must be a directory path or None, got 3"),
        ({"speed_batches": 0}, ValueError, r"`speed_batches` must be a positive int, got 0"),
        (
            {"finetune_steps": -1},
            ValueError,
            r"`finetune_steps` must be a non-negative int, got -1",
        ),
        (
            {"max_accuracy_drop": 0.01},
            ValueError,
            r"give `accuracy_threshold` or `max_accuracy_drop`, not both",
        ),
        ({"metric_range": (1.0, 0.0)}, ValueError, r"`metric_range` must have low < high"),
        (
            {"strategy": "best"},
            ValueError,
            r"`strategy` must be one of 'global', 'separate', 'joint'",
        ),
        (
            {"storage": 5},
            TypeError,
            r"`storage` must be None, an RDB URL string or an Optuna storage",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        callback(**kwargs)


def test_a_pruner_without_finetuning_is_reported() -> None:
    with pytest.warns(UserWarning, match=r"`pruner` is only used with finetune_steps > 0"):
        callback(pruner=optuna.pruners.MedianPruner())


class NanClassifier(Classifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", float("nan"))


def test_a_nan_monitor_is_an_error_before_any_trial() -> None:
    cb = callback(run_on="validate")
    with pytest.raises(
        ValueError, match=r"the dense model's accuracy is not finite .*val_acc.* returned nan"
    ):
        trainer(callbacks=[cb]).validate(NanClassifier(), DataModule(), verbose=False)
    assert cb.study is None or len(cb.study.trials) == 0


def test_configs_are_checked_before_training_starts() -> None:
    trained_batches = []

    class Counting(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            trained_batches.append(batch_idx)
            return super().training_step(batch, batch_idx)

    cb = callback(configs=LayerConfig(["net.9"], SPACE))
    with pytest.raises(ValueError, match=r"names 'net.9', which is not a layer of the model"):
        trainer(callbacks=[cb]).fit(Counting(), DataModule())
    assert trained_batches == []


def test_tensorboard_logger_gets_the_trials(trained: Classifier, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = callback(run_on="validate")
    trainer(callbacks=[cb], logger=logger).validate(trained, DataModule(), verbose=False)
    log_dir = Path(logger.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "sketchtune_plan.json").exists()
    assert (log_dir / "sketchtune_trials.csv").read_text().count("\n") == 4  # header + 3 trials
