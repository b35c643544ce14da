"""Loading a tuned model needs neither Optuna nor the tuner."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import sketchtune.lightning.module
from sketchtune.lightning import PLAN_CHECKPOINT_KEY, SketchedModule
heavy = sorted(m for m in ("optuna", "sketchtune.tuner", "sketchtune.lightning.callback") if m in sys.modules)
print(",".join(heavy) or "clean")
"""


def test_importing_sketched_module_leaves_optuna_and_the_tuner_out() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "clean"
