"""Several workers, one PostgreSQL-backed study: the trial budget is shared, nothing is done twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from sketchtune._planner._run import ENQUEUED_BY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).parent / "lightning" / "data" / "cli.yaml"


def _worker_command(config: Path, storage: str, out: Path) -> list[str]:
    script = shutil.which("sketchtune")
    base = [script] if script else [sys.executable, "-m", "sketchtune.lightning.cli"]
    return [
        *base,
        "fit",
        "--config",
        str(config),
        f"--sketch.storage={storage}",
        "--sketch.study_name=shared",
        f"--sketch.output_dir={out}",
    ]


def test_three_workers_share_a_30_trial_study(postgres_url: str, tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    # The workers meet before they fit, each trial's validation takes wall time, and an
    # unseeded sampler gives each worker its own proposals (a seeded one, or the planner,
    # proposes the same plans in every worker, and a duplicate is answered at once from its
    # twin), so every worker takes part however the machine's load staggers their start-up.
    config["model"] = {
        "class_path": "tests.lightning.boring.PacedClassifier",
        "init_args": {"width": 64, "barrier_dir": str(tmp_path / "barrier"), "parties": 3},
    }
    config["sketch"].update(
        n_trials=30,
        speed="measure",
        speed_batches=4,
        warmup_batches=1,
        strategy="sampler",
        sampler={"class_path": "optuna.samplers.RandomSampler"},
        configs=[
            {
                "layer_names": {"type": "Linear", "pattern": r"net\.[02]"},
                "params": {
                    "num_terms": 1,
                    "low_rank": {"type": "Int", "low": 2, "high": 32},
                    "init": ["svd"],
                },
            }
        ],
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # Create the study's tables once, as `optuna create-study` would, before the workers start.
    optuna.storages.RDBStorage(postgres_url)
    workers = [
        subprocess.Popen(
            _worker_command(path, postgres_url, tmp_path / f"worker{i}"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 30  # the budget, shared, not 30 per worker
    assert len({t.number for t in trials}) == len(trials)
    # no proposal is left WAITING once every worker has finished
    assert not [t.number for t in trials if t.state == TrialState.WAITING]
    # a trial that lost the race for the last slot is not run, and says so; a proposal its
    # worker enqueued but nobody ran is failed by that worker (and uses no budget)
    for t in trials:
        if t.state != TrialState.COMPLETE:
            assert (
                "skipped" in t.user_attrs.get("sketchtune", {})
                or t.user_attrs.get(ENQUEUED_BY) is not None
            ), t
    by_worker = Counter(t.user_attrs["sketchtune"].get("worker") for t in complete)
    assert len(by_worker) >= 2 and sum(by_worker.values()) == 30
    assert study.user_attrs["sketchtune:dense_accuracy"] > 0  # the accuracy baseline, stored once
    plans = {
        json.dumps(json.loads((tmp_path / f"worker{i}" / "plan.json").read_text()), sort_keys=True)
        for i in range(3)
    }
    assert len(plans) == 1  # every worker reports the same best plan
