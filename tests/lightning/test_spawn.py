"""Spawn-based strategies are refused before any work: their result never reaches the main process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).parent / "spawn_script.py"


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_ddp_spawn_is_refused_before_training_with_the_supported_strategies(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "SketchTuneCallback cannot search under the DDPStrategy" in done.stderr
    assert "Use strategy='ddp'" in done.stderr
    assert not (tmp_path / "trained").exists()  # refused in setup, before any training step
