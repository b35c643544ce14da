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
same sampler (sketchtune's default: multivariate TPE) and storage, suggesting the same
parameters (in one study over every layer, each layer's ``enabled`` switch first and its
sketch parameters only when it is on, as sketchtune's study does), with one user attr and one
constraint written per trial and the heartbeat on for sqlite as sketchtune sets it.
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
from typing import Any

import optuna
import torch
from torch import nn

from sketchtune import Categorical, Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune.search import default_sampler, open_rdb_storage

#: seconds spent inside the sampler's methods since the counter was last read
_SAMPLER = [0.0]
_SAMPLER_METHODS = (
    "infer_relative_search_space",
    "sample_relative",
    "sample_independent",
    "before_trial",
    "after_trial",
)


def _time_the_sampler() -> None:
    """Count the time spent in Optuna's TPE sampler: the sampler's cost is Optuna's, not ours."""
    cls = optuna.samplers.TPESampler
    for name in _SAMPLER_METHODS:
        method = getattr(cls, name)

        def timed(*args: Any, __method: Any = method, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return __method(*args, **kwargs)
            finally:
                _SAMPLER[0] += time.perf_counter() - begin

        setattr(cls, name, timed)


def _sampler_seconds() -> float:
    spent, _SAMPLER[0] = _SAMPLER[0], 0.0
    return spent


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


def run(
    strategy: str, storage: str | None, trials: int
) -> tuple[float, float, float, float, float, int, float]:
    model = mlp()
    x = torch.randn(8, 256)
    speed_calls = [0]
    starts: list[float] = []
    inside: list[float] = []  # seconds spent in evaluation functions since the last accuracy start
    sampled: list[float] = []  # seconds spent in the sampler before each accuracy start

    def accuracy(m: nn.Module) -> float:
        t0 = time.perf_counter()
        sampled.append(_sampler_seconds())
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
    _sampler_seconds()
    begin = time.perf_counter()
    tuner.tune()
    total = time.perf_counter() - begin
    # interval i = from the start of accuracy eval i to the start of eval i+1 (eval 0 is the baseline)
    overheads = [(starts[i + 1] - starts[i]) - inside[i] for i in range(1, len(starts) - 1)]
    in_sampler = [sampled[i + 1] for i in range(1, len(starts) - 1)]
    without_sampler = [o - s for o, s in zip(overheads, in_sampler, strict=True)]
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
        statistics.median(in_sampler) * 1e3,
        statistics.median(without_sampler) * 1e3,
        (total - sum(inside)) / trials * 1e3,
        duplicates,
        speed_calls[0] / trials,
    )


def bare_optuna(strategy: str, storage: str | None, trials: int) -> tuple[float, float, float]:
    """A plain Optuna loop suggesting the same parameters: median ms per trial, median ms
    of it in the sampler, median ms per trial outside the sampler."""
    layers = ["0", "2", "4", "6"]
    names = [f"{layer}." for layer in layers] if strategy != "separate" else [""]
    per_study = trials if strategy != "separate" else trials // len(layers)
    studies = 1 if strategy != "separate" else len(layers)
    optional = strategy != "separate"
    store = (
        None
        if storage is None
        else open_rdb_storage(storage, heartbeat_interval=10, grace_period=None, max_retry=2)
    )

    def objective(trial: optuna.Trial) -> float:
        value = 0.0
        for prefix in names:
            # one study over several layers lets each layer stay dense, as sketchtune's does
            if optional and not trial.suggest_categorical(f"{prefix}enabled", [True, False]):
                continue
            value += trial.suggest_categorical(f"{prefix}num_terms", [1, 2, 3]) * trial.suggest_int(
                f"{prefix}low_rank", 4, 64
            )
        trial.set_user_attr("sketchtune", {"accuracy": 1.0})
        trial.set_constraint("accuracy", -1.0)
        return value

    times, in_sampler = [], []
    for _ in range(studies):
        study = optuna.create_study(
            storage=store, sampler=default_sampler(0, per_study), direction="maximize"
        )
        for _ in range(per_study):
            _sampler_seconds()
            begin = time.perf_counter()
            study.optimize(objective, n_trials=1)
            times.append(time.perf_counter() - begin)
            in_sampler.append(_sampler_seconds())
    without = [t - s for t, s in zip(times, in_sampler, strict=True)]
    return (
        statistics.median(times) * 1e3,
        statistics.median(in_sampler) * 1e3,
        statistics.median(without) * 1e3,
    )


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
    _time_the_sampler()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in (args.strategy, "separate"):
            for label, storage in (
                ("in memory", None),
                ("sqlite", f"sqlite:///{Path(tmp) / strategy}.db"),
            ):
                median, p90, sampler, rest, mean, dups, calls = run(strategy, storage, args.trials)
                bare_storage = None if storage is None else storage.replace(".db", "-bare.db")
                bare, bare_sampler, bare_rest = bare_optuna(strategy, bare_storage, args.trials)
                own = rest - bare_rest
                row = (strategy, label, median, p90, mean, sampler, bare, bare_sampler, own)
                rows.append((*row, dups, calls))
    print(
        f"\nTuner overhead per trial, 4-layer MLP, {args.trials} trials, torch {torch.__version__}\n"
    )
    print(
        "| strategy | storage | median ms/trial | p90 ms/trial | mean ms/trial (incl. setup) "
        "| of which sampler | bare Optuna median ms/trial | of which sampler "
        "| own (outside the sampler, over bare) | duplicates answered "
        "| timing: speed calls per trial |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for strategy, label, median, p90, mean, sampler, bare, bare_sampler, own, dups, calls in rows:
        print(
            f"| {strategy} | {label} | {median:.2f} | {p90:.2f} | {mean:.2f} | {sampler:.2f} "
            f"| {bare:.2f} | {bare_sampler:.2f} | {own:.2f} | {dups} | {calls:.1f} |"
        )
    print(
        "\nThe timing column is the cost of speed measurement in the user's unit: the speed "
        "function's calls per trial (a timing round calls it once for the dense model and once "
        "for the plan; every timed trial gets 3 rounds, a would-be best up to 9). The ms columns "
        "exclude the time spent inside the evaluation functions. The sampler columns are the median "
        "time inside the TPE sampler's methods (Optuna's cost, which grows with the parameters "
        "and the trials it models); own is the median time outside the sampler minus the bare "
        "loop's median time outside the sampler."
    )


if __name__ == "__main__":
    main()
