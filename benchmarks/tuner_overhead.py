"""The tuner's own time per trial: everything except the user's evaluation functions.

A 4-layer MLP (512 wide) is tuned for 100 trials with the ``sampler`` strategy
(one study over every layer searched by the sampler alone; each
trial builds up to four sketched layers; ``--strategy global`` runs the planned search
instead, whose trials are chosen by the planner rather than the sampler) and
with ``separate`` (four studies of 25 trials), in memory and in a sqlite file.
The evaluation functions are cheap and timed; a trial's overhead is the time
between the starts of two consecutive accuracy evaluations (ask, build, swap,
restore, tell, bookkeeping) minus the time spent inside the evaluation
functions in that interval. The table shows the median and the 90th percentile.

For reference, the same number of trials is run as a bare Optuna loop on the
same sampler (sketchtune's default: multivariate TPE) and storage (same parameters suggested, one user attr and one
constraint written per trial, heartbeat on for sqlite as sketchtune sets it).
``own`` is the difference: what sketchtune adds on top of Optuna itself.

Usage::

    python benchmarks/tuner_overhead.py [--trials 100] [--strategy sampler]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch
from torch import nn

from sketchtune import Categorical, Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune.search import default_sampler, open_rdb_storage


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 64),
    )


def run(strategy: str, storage: str | None, trials: int) -> tuple[float, float, float, int, float]:
    model = mlp()
    x = torch.randn(8, 256)
    speed_calls = [0]
    starts: list[float] = []
    inside: list[float] = []  # seconds spent in evaluation functions since the last accuracy start

    def accuracy(m: nn.Module) -> float:
        t0 = time.perf_counter()
        starts.append(t0)
        inside.append(0.0)
        with torch.no_grad():
            m(x)
        inside[-1] += time.perf_counter() - t0
        return 1.0

    def speed(m: nn.Module) -> float:
        speed_calls[0] += 1
        t0 = time.perf_counter()
        with torch.no_grad():
            m(x)
        inside[-1] += time.perf_counter() - t0
        return 1.0

    layers = ["0", "2", "4", "6"]
    per_study = trials if strategy != "separate" else trials // len(layers)
    space = {"num_terms": Categorical([1, 2, 3]), "low_rank": Int(4, 64)}
    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(layers, space)]),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func=speed,
        strategy=strategy,  # type: ignore[arg-type]
        search_algorithm=OptunaSearch(n_trials=per_study, storage=storage, seed=0),
    )
    begin = time.perf_counter()
    tuner.tune()
    total = time.perf_counter() - begin
    # interval i = from the start of accuracy eval i to the start of eval i+1 (eval 0 is the baseline)
    overheads = [(starts[i + 1] - starts[i]) - inside[i] for i in range(1, len(starts) - 1)]
    duplicates = sum(
        "duplicate_of" in t.user_attrs.get("sketchtune", {})
        for s in tuner.search_algorithm.studies.values()
        for t in s.trials
    )
    overheads.sort()
    p90 = overheads[int(0.9 * (len(overheads) - 1))]
    return (
        statistics.median(overheads) * 1e3,
        p90 * 1e3,
        (total - sum(inside)) / trials * 1e3,
        duplicates,
        speed_calls[0] / trials,
    )


def bare_optuna(strategy: str, storage: str | None, trials: int) -> float:
    """Median ms per trial of a plain Optuna loop suggesting the same parameters."""
    layers = ["0", "2", "4", "6"]
    names = [f"{layer}." for layer in layers] if strategy != "separate" else [""]
    per_study = trials if strategy != "separate" else trials // len(layers)
    studies = 1 if strategy != "separate" else len(layers)
    store = (
        None
        if storage is None
        else open_rdb_storage(storage, heartbeat_interval=10, grace_period=None, max_retry=2)
    )

    def objective(trial: optuna.Trial) -> float:
        value = 0.0
        for prefix in names:
            value += trial.suggest_categorical(f"{prefix}num_terms", [1, 2, 3]) * trial.suggest_int(
                f"{prefix}low_rank", 4, 64
            )
        trial.set_user_attr("sketchtune", {"accuracy": 1.0})
        trial.set_constraint("accuracy", -1.0)
        return value

    times = []
    for _ in range(studies):
        study = optuna.create_study(
            storage=store, sampler=default_sampler(0, per_study), direction="maximize"
        )
        for _ in range(per_study):
            begin = time.perf_counter()
            study.optimize(objective, n_trials=1)
            times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument(
        "--strategy",
        default="sampler",
        choices=("sampler", "global"),
        help="the one-study strategy",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in (args.strategy, "separate"):
            for label, storage in (
                ("in memory", None),
                ("sqlite", f"sqlite:///{Path(tmp) / strategy}.db"),
            ):
                median, p90, mean, dups, calls = run(strategy, storage, args.trials)
                bare_storage = None if storage is None else storage.replace(".db", "-bare.db")
                bare = bare_optuna(strategy, bare_storage, args.trials)
                rows.append((strategy, label, median, p90, mean, dups, bare, calls))
    print(
        f"\nTuner overhead per trial, 4-layer MLP, {args.trials} trials, torch {torch.__version__}\n"
    )
    print(
        "| strategy | storage | median ms/trial | p90 ms/trial | mean ms/trial (incl. setup) "
        "| bare Optuna median ms/trial | own (median - bare) | duplicates answered "
        "| timing: speed calls per trial |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for strategy, label, median, p90, mean, dups, bare, calls in rows:
        print(
            f"| {strategy} | {label} | {median:.2f} | {p90:.2f} | {mean:.2f} | {bare:.2f} "
            f"| {median - bare:.2f} | {dups} | {calls:.1f} |"
        )
    print(
        "\nThe timing column is the cost of speed measurement in the user's unit: the speed "
        "function's calls per trial (a timing round calls it once for the dense model and once "
        "for the plan; every timed trial gets 3 rounds, a would-be best up to 9). The ms columns "
        "exclude the time spent inside the evaluation functions."
    )


if __name__ == "__main__":
    main()
