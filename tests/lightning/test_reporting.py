"""The callback's written report, end to end on a real Trainer, checked against its study."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.lightning import _evaluator

from .boring import Classifier, DataModule

#: seconds each dense Linear adds to a predict_step, on the clock the evaluator times with
DENSE_COST = 0.003


class Clock:
    """The evaluator's ``time``: it moves only when a predict_step says what it cost.

    Real sleeps overshoot by tens of milliseconds on a loaded machine; this clock makes
    every timing round exact, so the figures the report shows are known in advance.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Metered(Classifier):
    def __init__(self, clock: Clock) -> None:
        super().__init__(width=32)
        self.clock = clock

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        self.clock.now += DENSE_COST * sum(type(m) is nn.Linear for m in self.modules())
        return self(batch[0])


def test_the_written_report_is_the_study_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(_evaluator, "time", clock)
    seed_everything(0)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cb = SketchTuneCallback(
        LayerConfig(["net.0", "net.2"], {"num_terms": 1, "low_rank": [4, 8]}),
        accuracy_threshold=0.0,
        n_trials=4,
        seed=0,
        strategy="global",
        speed="measure",
        speed_batches=4,
        warmup_batches=1,
        storage=storage,
        study_name="e2e",
        output_dir=str(tmp_path / "out"),
    )
    trainer = Trainer(
        callbacks=[cb],
        logger=CSVLogger(tmp_path / "logs", name="run", version=0),
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Metered(clock), DataModule())
    study = optuna.load_study(study_name="e2e", storage=storage)
    kept = study.user_attrs["sketchtune:kept"]
    # 3 dense Linear layers cost 9 ms a batch: sketching net.2 saves 3 ms (1.5x), both 6 (3x)
    assert kept["number"] is not None
    assert kept["speedup"] in (pytest.approx(1.5), pytest.approx(3.0))
    assert kept["lower"] == pytest.approx(kept["speedup"]) == kept["upper"]
    trials = [t for t in study.trials if t.state != optuna.trial.TrialState.RUNNING]

    out = tmp_path / "out"
    results = (out / "results.csv").read_text()
    # the loggers' table is the same table
    assert (
        tmp_path / "logs" / "run" / "version_0" / "sketchtune_trials.csv"
    ).read_text() == results
    table = pd.read_csv(out / "results.csv")
    assert table["trial"].tolist() == [t.number + 1 for t in trials]
    assert set(table["study"]) == {"global"}
    for row, trial in zip(table.to_dict("records"), trials, strict=True):
        stored = trial.user_attrs["sketchtune"]
        if stored.get("speedup") is not None:
            assert row["speedup_x"] == pytest.approx(stored["speedup"], rel=1e-9)
        assert row["rounds"] == len(stored.get("rounds") or [])
        assert row["kept"] == (trial.number == kept["number"])
    kept_row = table[table["kept"]].iloc[0]
    assert kept_row["confirmed_speedup_x"] == pytest.approx(kept["speedup"], rel=1e-9)
    assert cb.summary is not None
    assert cb.best_speedup == kept["speedup"] == cb.summary.speedup

    text = (out / "summary.md").read_text()
    assert f"| {kept['speedup']:.2f}x |" in text
    assert f"{kept['speedup']:.2f}x is the confirmed median of {kept['rounds']} interleaved" in text
    assert f"95% interval {kept['lower']:.2f}x-{kept['upper']:.2f}x" in text
    assert re.search(
        r"Timing: each model's timing slice runs \d+ batch\(es\) of 64 samples \(4 batches read "
        r"once and cycled\), on cpu, float32, precision 32-true\.",
        text,
    )
    assert f"Confirmed on {kept['machine']}, {kept['date']}." in text
    assert f"Kept: trial {kept['number'] + 1} of study 'e2e'" in text
    assert text.rstrip().splitlines()[-1].startswith("Browse the study: optuna-dashboard ")
    for name in ("plan.json", "pareto.png", "history.png"):
        assert (out / name).exists()


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_the_trials_progress_marks_a_trial_timed_on_a_busy_machine(
    bar: str, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from sketchtune._search._events import Phase
    from sketchtune.lightning._reporting import Progress
    from sketchtune.results import TrialRecord

    trainer = Trainer(
        logger=False,
        callbacks=[RichProgressBar() if bar == "rich" else TQDMProgressBar()],
        enable_checkpointing=False,
    )
    progress = Progress(trainer, total=2)

    def timed(trial: int, others: float) -> TrialRecord:
        # five rounds of [dense, plan, share of the CPUs other processes took]
        rounds = [[100.0, 300.0, others] for _ in range(5)]
        return TrialRecord(
            "global", {}, 0.9, 300.0, 3.0, 3.0, True, trial, "COMPLETE", 0.1,
            rounds=rounds, confirmed=True,
        )  # fmt: skip

    caplog.set_level("INFO")
    trials = Phase("trials", 2, "trial")
    progress.phase_start(trials)
    progress.trial(timed(0, 0.5))
    if bar == "tqdm":
        assert "busy=50%" in progress.bar.postfix and "best=3.00x" in progress.bar.postfix
    progress.trial(timed(1, 0.01))  # a quiet timing: no mark
    if bar == "tqdm":
        assert "busy" not in progress.bar.postfix
    progress.phase_end(trials)
    if bar == "rich":
        lines = [r.getMessage() for r in caplog.records if "sketchtune trial" in r.getMessage()]
        assert len(lines) == 2
        assert lines[0].endswith("; busy machine: others took 50% of the CPUs")
        assert "busy" not in lines[1]
