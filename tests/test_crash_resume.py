"""A tuning process killed with SIGKILL mid-trial, then restarted with the same command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from sketchtune import Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
    sys.path.insert(0, {tests!r})
    from conftest import MLP

    storage, kill_at = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = MLP()
    calls = 0

    def accuracy(m):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash in the middle of a trial
        return 1.0

    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["fc2"], {{"num_terms": 1, "low_rank": Int(2, 32)}})]),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(
            n_trials=6, storage=storage, study_name="crash", load_if_exists=True, seed=0,
            heartbeat_interval=1, grace_period=2,
        ),
    )
    tuner.tune()
    print("BEST", tuner.best_params)
    """
)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crash.db'}"
    url: str = request.getfixturevalue("postgres_url")
    database = f"crash_{os.getpid()}"
    _create_database(url, database)
    return url.rsplit("/", 1)[0] + "/" + database


def _create_database(url: str, name: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()


def test_killed_trial_is_failed_by_heartbeat_and_retried_and_nothing_is_lost(
    tmp_path: Path, storage: str
) -> None:
    script = tmp_path / "tune.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    first = subprocess.run(
        [sys.executable, str(script), storage, "4"], env=env, capture_output=True, text=True
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    study = optuna.load_study(study_name="crash/fc2", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 2 + [
        TrialState.RUNNING
    ]  # baseline + 2 done, killed in the 3rd
    killed = study.trials[2]

    second = subprocess.run(
        [sys.executable, str(script), storage, "0"], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr
    assert "BEST" in second.stdout
    study = optuna.load_study(study_name="crash/fc2", storage=storage)
    trials = study.trials
    assert [t.number for t in trials] == list(range(len(trials)))
    assert trials[2].state == TrialState.FAIL  # failed by its stale heartbeat
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6  # the whole budget, no more
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    first_two = {t.number for t in trials[:2]}
    assert all(
        t.state == TrialState.COMPLETE for t in trials if t.number in first_two
    )  # kept, not redone


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from sketchtune import Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
    sys.path.insert(0, {tests!r})
    from conftest import MLP

    storage, ready = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    model = MLP()
    dense = dict(model.named_modules())
    calls = 0

    def accuracy(m):
        global calls
        calls += 1
        if calls == 4:
            ready.write_text("in trial 3")
            time.sleep(60)  # SIGTERM arrives here
        return 1.0

    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["fc2"], {{"num_terms": 1, "low_rank": Int(2, 32)}})]),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        verbose=True,
        search_algorithm=OptunaSearch(n_trials=10, storage=storage, study_name="term", seed=0),
    )
    tuner.tune()
    print("INTERRUPTED", tuner.interrupted)
    print("RESTORED", dict(model.named_modules()) == dense)
    """
)


def test_sigterm_during_a_trial_stops_cleanly_and_keeps_the_study(tmp_path: Path) -> None:
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent)))
    storage = f"sqlite:///{tmp_path / 'term.db'}"
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, str(script), storage, str(ready)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "INTERRUPTED True" in out and "RESTORED True" in out
    assert (
        "interrupted: the model is restored and 2 finished trial(s) are kept in 'sqlite:///" in out
    )
    assert "load_if_exists=True to resume" in out
    study = optuna.load_study(study_name="term/fc2", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
