"""Several workers on one PostgreSQL-backed study, and per-trial storage overhead.

Part 1: ``--trials`` trials of one study shared by 1, 2 and 4 worker processes on
a throwaway PostgreSQL server. Each trial's evaluation sleeps ``--eval-ms``
(standing for a validation pass on an accelerator or another machine), so the
table shows how close the workers come to the ideal ``workers x`` rate and what
the shared storage costs.

Part 2: the same tuner, one process, 40 trials with a near-free evaluation, in
memory vs sqlite vs PostgreSQL: wall time per trial.

Usage::

    python benchmarks/scale_out.py [--trials 60] [--eval-ms 200]

Needs the PostgreSQL server binaries (``apt-get install postgresql``) and
``psycopg`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from sketchtune.testing import postgres_cluster


def worker(
    storage: str | optuna.storages.BaseStorage, study_name: str, trials: int, eval_ms: float
) -> None:
    """One worker: tune a small MLP against the shared study until its budget is used."""
    import torch
    from torch import nn

    from sketchtune import Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )

    def accuracy(m: nn.Module) -> float:
        time.sleep(eval_ms / 1000)
        return 1.0

    SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["0", "2"], {"num_terms": 1, "low_rank": Int(2, 100)})]),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(
            n_trials=trials, storage=storage, study_name=study_name, load_if_exists=True
        ),
    ).tune()


def shared_study(url: str, workers: int, trials: int, eval_ms: float) -> tuple[float, int]:
    """Wall seconds for ``workers`` processes to finish a ``trials`` budget, and COMPLETE trials."""
    name = f"scale{workers}"
    optuna.storages.RDBStorage(url)  # tables exist before the workers race to create them
    command = [sys.executable, __file__, "--worker", url, name, str(trials), str(eval_ms)]
    start = time.perf_counter()
    processes = [subprocess.Popen(command) for _ in range(workers)]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"a worker failed with exit code {process.returncode}")
    elapsed = time.perf_counter() - start
    study = optuna.load_study(study_name=f"{name}", storage=url)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return elapsed, complete


def per_trial(storage: str | optuna.storages.BaseStorage, trials: int = 40) -> float:
    """Milliseconds per trial of one process with a near-free evaluation."""
    start = time.perf_counter()
    worker(storage, f"overhead-{time.time_ns()}", trials, 0.0)
    return (time.perf_counter() - start) / trials * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--eval-ms", type=float, default=200.0)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        url, name, trials, eval_ms = args.worker
        worker(url, name, int(trials), float(eval_ms))
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    rows = []
    with postgres_cluster() as url:
        for workers in (1, 2, 4):
            elapsed, complete = shared_study(url, workers, args.trials, args.eval_ms)
            rows.append((workers, elapsed, complete))
        with tempfile.TemporaryDirectory() as tmp:
            overhead = {
                "in memory": per_trial(optuna.storages.InMemoryStorage()),
                "sqlite": per_trial(f"sqlite:///{Path(tmp) / 'o.db'}"),
                "PostgreSQL": per_trial(url),
            }
    base = rows[0][1]
    print(
        f"\nOne study, {args.trials} trials, evaluation {args.eval_ms:.0f} ms, "
        f"{os.cpu_count()} CPU cores, PostgreSQL on 127.0.0.1\n"
    )
    print("| workers | wall s | COMPLETE trials | trials/min | speedup vs 1 worker | ideal |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers, elapsed, complete in rows:
        print(
            f"| {workers} | {elapsed:.1f} | {complete} | {complete / elapsed * 60:.0f} "
            f"| {base / elapsed:.2f}x | {workers}.00x |"
        )
    print(
        "\nOne process, 40 trials, near-free evaluation (wall ms per trial, incl. study setup):\n"
    )
    print("| storage | ms/trial |")
    print("|---|---:|")
    for label, ms in overhead.items():
        print(f"| {label} | {ms:.1f} |")


if __name__ == "__main__":
    main()
