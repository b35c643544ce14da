"""The LightningCLI entry points, run as a user would: in a subprocess, from YAML."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).parent / "data" / "cli.yaml"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _sketchtune() -> list[str]:
    script = shutil.which("sketchtune")
    return [script] if script else [sys.executable, "-m", "sketchtune.lightning.cli"]


def test_sketchtune_console_script_trains_then_tunes_from_yaml(tmp_path: Path) -> None:
    done = _run([*_sketchtune(), "fit", "--config", str(CONFIG)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune: best plan sketches 1 layer(s)" in done.stderr + done.stdout
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["sketch"]["n_trials"] == 3  # LightningCLI saved the resolved config


def test_callback_from_trainer_callbacks_in_plain_lightning_cli(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    sketch = config.pop("sketch")
    config["trainer"]["callbacks"] = [
        {"class_path": "sketchtune.SketchTuneCallback", "init_args": sketch}
    ]
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(config))
    script = "from lightning.pytorch.cli import LightningCLI\nLightningCLI()\n"
    done = _run([sys.executable, "-c", script, "fit", "--config", str(path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune: best plan sketches 1 layer(s)" in done.stderr + done.stdout


def test_callback_added_on_the_command_line(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config.pop("sketch")
    path = tmp_path / "nosketch.yaml"
    path.write_text(yaml.safe_dump(config))
    # importing the class makes its short name known to jsonargparse (sketchtune.lightning's
    # names are lazy, so that loading a tuned model never imports Optuna)
    script = "from sketchtune import SketchTuneCallback\nfrom lightning.pytorch.cli import LightningCLI\nLightningCLI()\n"
    args = [
        "fit",
        "--config",
        str(path),
        "--trainer.callbacks+=SketchTuneCallback",
        "--trainer.callbacks.configs=[{layer_names: [net.2], params: {num_terms: 1, low_rank: [4, 8]}}]",
        "--trainer.callbacks.accuracy_threshold=0.0",
        "--trainer.callbacks.n_trials=2",
        "--trainer.callbacks.speed=flops",
    ]
    done = _run([sys.executable, "-c", script, *args], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune: best plan sketches 1 layer(s)" in done.stderr + done.stdout


def _without_sketch(tmp_path: Path) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config.pop("sketch")
    path = tmp_path / "nosketch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CALLBACK_ARGS = [
    "--trainer.callbacks.configs=[{layer_names: [net.2], params: {num_terms: 1, low_rank: [4, 8]}}]",
    "--trainer.callbacks.accuracy_threshold=0.0",
    "--trainer.callbacks.n_trials=2",
    "--trainer.callbacks.speed=flops",
]


def test_sketchtune_command_without_a_sketch_section_is_a_plain_lightning_cli(
    tmp_path: Path,
) -> None:
    done = _run([*_sketchtune(), "fit", "--config", str(_without_sketch(tmp_path))], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune:" not in done.stderr + done.stdout  # trained, nothing tuned
    assert "`Trainer.fit` stopped" in done.stderr + done.stdout


def test_short_name_in_the_sketchtune_command_and_full_path_in_a_plain_lightning_cli(
    tmp_path: Path,
) -> None:
    path = str(_without_sketch(tmp_path))
    short = ["fit", "--config", path, "--trainer.callbacks+=SketchTuneCallback", *CALLBACK_ARGS]
    done = _run([*_sketchtune(), *short], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune: best plan sketches 1 layer(s)" in done.stderr + done.stdout
    # a script that never imports sketchtune resolves the class by its full path
    script = "from lightning.pytorch.cli import LightningCLI\nLightningCLI()\n"
    full = [*short[:3], "--trainer.callbacks+=sketchtune.SketchTuneCallback", *CALLBACK_ARGS]
    (tmp_path / "plain").mkdir()  # its own run directory (LightningCLI saves config.yaml there)
    done = _run([sys.executable, "-c", script, *full], tmp_path / "plain")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune: best plan sketches 1 layer(s)" in done.stderr + done.stdout
