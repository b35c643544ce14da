"""DDP: every rank evaluates the same trial; rank 0 alone asks and tells Optuna."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).parent / "ddp_script.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_two_ranks_see_identical_trials_and_the_study_holds_n_not_2n(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'ddp.db'}"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PYTHONWARNINGS": "ignore",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), storage],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = (tmp_path / "rank0.txt").read_text().splitlines()
    rank1 = (tmp_path / "rank1.txt").read_text().splitlines()
    assert rank0 == rank1  # same plans (same sizes and seeds) in the same order
    study = optuna.load_study(study_name="ddp", storage=storage)
    assert len(study.trials) == 4  # not 8: only rank 0 asks and tells
    distinct = {
        t.params["net.2.low_rank"] for t in study.trials
    }  # repeats are answered, not re-run
    assert rank0[:2] == ["dense", "dense"]  # fit's own validation, then the dense baseline
    evaluated = [int(line.split(":")[0]) for line in rank0[2:]]
    # each distinct plan once, then the fastest ones re-measured, in lockstep on both ranks
    assert sorted(evaluated[: len(distinct)]) == sorted(distinct)
    assert set(evaluated[len(distinct) :]) <= distinct
    assert (tmp_path / "final0.txt").read_text() == (tmp_path / "final1.txt").read_text()
