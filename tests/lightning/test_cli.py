"""The LightningCLI entry points, run as a user would: in a subprocess, from YAML."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sketchtune import SketchTuneCallback

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


def test_the_int8_forms_are_values_of_the_space_in_yaml(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    # each form once: a float sketch, int8 factors, the int8 weight, the dense layer itself
    space = {"num_terms": [1], "low_rank": [4, "full"], "quant": ["none", "int8"]}
    config["sketch"]["configs"] = [{"layer_names": ["net.2"], "params": space}]
    config["sketch"]["sampler"] = {
        "class_path": "optuna.samplers.BruteForceSampler",
        "init_args": {"seed": 0},
    }
    config["sketch"]["strategy"] = "sampler"  # the sampler alone: every combination once
    config["sketch"]["n_trials"] = 4
    config["sketch"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "int8.yaml"
    path.write_text(yaml.safe_dump(config))
    done = _run([*_sketchtune(), "fit", "--config", str(path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # the plan entry's parameters: a float sketch has no quant, the int8 weight no rank
    forms = {(row["net.2.form"], row["net.2.low_rank"], row["net.2.quant"]) for row in rows}
    assert len(rows) == 4  # the four forms, each a trial
    assert forms == {
        ("low-rank", "4", ""),
        ("low-rank, int8 factors", "4", "int8"),
        ("int8", "", "int8"),
        ("dense", "", ""),
    }


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


# In this process jsonargparse's notice that SketchTuneCLI's add_instantiator is deprecated
# (jsonargparse 4.49) is attributed to sketchtune, which pyproject turns into an error.
IN_PROCESS = pytest.mark.filterwarnings("ignore::DeprecationWarning:sketchtune.lightning.cli")


# -- secrets: a storage password never lands in a saved config ----------------------------


def _with_password(url: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user}:{password}@{host}"


@IN_PROCESS
def test_the_saved_config_and_the_summary_hold_no_storage_password(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cret-Pa55"  # trust authentication: the server accepts any password
    storage = _with_password(postgres_url, secret)
    study = "cli-secret-" + tmp_path.name
    args = ["fit", "--config", str(CONFIG), f"--sketch.storage={storage}"]
    # the sketchtune command, logger: false -> config.yaml in the run directory
    done = _run([*_sketchtune(), *args, f"--sketch.study_name={study}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = (tmp_path / "config.yaml").read_text()
    assert secret not in saved
    assert yaml.safe_load(saved)["sketch"]["storage"] == storage.replace(secret, "***")
    assert secret not in done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("`storage` holds a password") == 1
    assert "PGPASSWORD" in done.stderr

    # in this process, with a logger -> config.yaml in lightning_logs/version_0
    from sketchtune.lightning.cli import SketchTuneCLI

    monkeypatch.setattr(sys, "argv", ["sketchtune"])  # as the console script: args= alone
    with pytest.warns(UserWarning, match=r"`storage` holds a password.*PGPASSWORD"):
        cli = SketchTuneCLI(
            args=[
                *args,
                f"--sketch.study_name={study}-2",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.save_dir={tmp_path / 'logs'}",
            ],
            save_config_kwargs={"overwrite": True},
        )
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, SketchTuneCallback)]
    assert cb.summary is not None and cb.summary.storage == storage
    assert secret not in repr(cb.summary) and "postgres:***@" in repr(cb.summary)
    [logged] = list((tmp_path / "logs").rglob("config.yaml"))
    assert logged.parent.name == "version_0"
    assert secret not in logged.read_text()
    assert "postgres:***@" in logged.read_text()


def test_a_password_from_pgpassword_or_pgpass_connects_with_a_url_without_it(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the warning advises, checked against a server that requires the password."""
    import optuna
    import psycopg
    import psycopg.sql

    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    role, password = f"tuner_{os.getpid()}", "Pa55-w0rd"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {role} OWNER {role}")
        hba = conn.execute("SHOW hba_file").fetchone()[0]  # type: ignore[index]
        # the postgres role keeps trust (the other tests use it); every other role needs a password
        lines = [
            "local all all trust",
            "host all postgres 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 scram-sha-256",
        ]
        copy = psycopg.sql.SQL("COPY (SELECT unnest({}::text[])) TO {}")
        conn.execute(copy.format(psycopg.sql.Literal(lines), psycopg.sql.Literal(hba)))
        conn.execute("SELECT pg_reload_conf()")
    host = postgres_url.split("@", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+psycopg://{role}@{host}/{role}"
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(Exception, match=r"password"):
        optuna.storages.RDBStorage(url)  # the server does ask for it
    monkeypatch.setenv("PGPASSWORD", password)
    optuna.create_study(storage=url, study_name="from-env")
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"{host}:{role}:{role}:{password}\n")  # host:port:database:user:password
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    assert optuna.load_study(storage=url, study_name="from-env").study_name == "from-env"
    # and the sketchtune command tunes with it, saving a config that re-runs as it is
    env_run = ["fit", "--config", str(CONFIG), f"--sketch.storage={url}"]
    done = _run([*_sketchtune(), *env_run], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sketchtune: best plan sketches 1 layer(s)" in done.stderr + done.stdout
    assert "holds a password" not in done.stderr
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sketch"]["storage"] == url


# -- typos inside sketch.configs: one parser error before anything runs -------------------


@IN_PROCESS
@pytest.mark.parametrize(
    ("typo", "message"),
    [
        (
            lambda layer: layer.update(layer_name=layer.pop("layer_names")),
            r"error: sketch\.configs\[0\]: layer config has unknown key\(s\) \['layer_name'\] "
            r"\(did you mean 'layer_names'\?\); valid keys: layer_names, params",
        ),
        (
            lambda layer: layer.update(params="atuo"),
            r"error: sketch\.configs\[0\]: `params` must be a dict of specs, 'auto' or 'auto\+int8', got 'atuo'\.",
        ),
    ],
)
def test_a_typo_in_sketch_configs_is_a_parser_error_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    typo: Any,
    message: str,
) -> None:
    from sketchtune.lightning.cli import main

    config = yaml.safe_load(CONFIG.read_text())
    typo(config["sketch"]["configs"][0])
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["sketchtune"])
    args = [
        "fit",
        "--config",
        str(path),
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_checkpointing=true",
    ]
    with pytest.raises(SystemExit) as exited:
        main(args=args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-2000:]
    assert "Traceback" not in err and len(re.findall(r"^error: ", err, re.MULTILINE)) == 1
    assert not (tmp_path / "run").exists()  # no trainer ran: no config saved, no checkpoint


@IN_PROCESS
def test_a_typo_in_a_sketchtune_callback_under_trainer_callbacks_is_caught_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sketchtune.lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["sketchtune"])
    args = [
        "fit",
        "--config",
        str(_without_sketch(tmp_path)),
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.callbacks+=SketchTuneCallback",
        "--trainer.callbacks.configs=[{layer_names: [net.2], params: atuo}]",
    ]
    with pytest.raises(SystemExit) as exited:
        main(args=args)
    assert exited.value.code == 2
    assert re.search(
        r"error: trainer\.callbacks\[0\]\.init_args\.configs\[0\]: `params` must be a dict of "
        r"specs, 'auto' or 'auto\+int8', got 'atuo'\.",
        capsys.readouterr().err,
    )
    assert not (tmp_path / "run").exists()
