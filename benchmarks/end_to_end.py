"""End to end: train once, tune with SketchTuneCallback, report what the user gets.

For the digits MLP (the README's main job) and the long-sequence Transformer
example: dense vs tuned accuracy and measured throughput (the callback's final
confirmation), tuning wall time and trials; on the same trial budget and the same
trained model: the planner (``strategy="global"``, the default) vs the 0.1 search
(``strategy="sampler"``: one study, TPE) vs ``separate`` (TPE, one study per layer,
then the validated combination) vs random search (``"sampler"`` with Optuna's
RandomSampler).

Usage::

    python benchmarks/end_to_end.py [--mlp-trials 40] [--transformer-trials 16] [--workloads mlp,transformer]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback, select_layers
from sketchtune.examples.digits import DigitsDataModule, DigitsMLP
from sketchtune.examples.sequences import MajorityDataModule, TransformerClassifier

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def train(
    build: Callable[[], LightningModule], data: LightningDataModule, epochs: int
) -> tuple[LightningModule, float]:
    seed_everything(0, workers=True)
    model = build()  # built after seeding: the same initial weights in every run
    start = time.perf_counter()
    Trainer(max_epochs=epochs, deterministic=True, **QUIET).fit(model, data)
    return model, time.perf_counter() - start


def tune(
    model: LightningModule,
    data: LightningDataModule,
    config: LayerConfig,
    *,
    strategy: str,
    sampler: optuna.samplers.BaseSampler | None,
    trials: int,
    speed_batches: int,
) -> tuple[SketchTuneCallback, float]:
    if strategy == "separate":  # the same total budget, split over the per-layer studies
        trials = max(1, trials // len(select_layers(model, config.layer_names)))
    callback = SketchTuneCallback(
        config,
        run_on="validate",
        max_accuracy_drop=0.01,
        n_trials=trials,
        strategy=strategy,  # type: ignore[arg-type]
        sampler=sampler,
        seed=0,
        speed_batches=speed_batches,
    )
    start = time.perf_counter()
    Trainer(callbacks=[callback], **QUIET).validate(copy.deepcopy(model), data, verbose=False)
    return callback, time.perf_counter() - start


def row(
    name: str, label: str, cb: SketchTuneCallback, seconds: float, train_s: float | None = None
) -> str:
    summary = cb.summary
    assert summary is not None
    results = cb.results
    trials = len(results) if results is not None else 0
    feasible = int(results.feasible.sum()) if results is not None else 0
    speedup = summary.speedup or 1.0
    dense_tp = f"{summary.dense_throughput:,.0f}" if summary.dense_throughput else "n/a"
    tuned_tp = f"{summary.tuned_throughput:,.0f}" if summary.tuned_throughput else dense_tp
    train = f"{train_s:.0f}" if train_s is not None else "-"
    return (
        f"| {name} | {label} | {summary.dense_accuracy:.4f} | {summary.tuned_accuracy:.4f} | {dense_tp} "
        f"| {tuned_tp} | {speedup:.2f}x | {len(summary.plan)} | {trials} ({feasible} feasible) | {train} | {seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mlp-trials", type=int, default=40)
    parser.add_argument("--transformer-trials", type=int, default=16)
    parser.add_argument(
        "--workloads", default="mlp,transformer", help="comma-separated: mlp, transformer"
    )
    args = parser.parse_args()
    chosen = set(args.workloads.split(","))
    if not chosen or not chosen <= {"mlp", "transformer"}:
        parser.error(
            f"--workloads={args.workloads!r}: give a comma-separated subset of mlp,transformer "
            "(e.g. --workloads transformer)"
        )
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    workloads = [
        (
            "digits MLP",
            DigitsMLP,
            DigitsDataModule(),
            20,
            LayerConfig(r"net\.\d+", "auto"),
            args.mlp_trials,
            20,
        ),
        (
            "Transformer, seq 1024",
            TransformerClassifier,
            MajorityDataModule(length=1024, train_size=2048),
            3,
            LayerConfig(
                {"type": "MultiheadAttention"},
                {"num_random_features": [16, 32, 64, 128], "kernel_fn": ["softmax", "relu"]},
            ),
            args.transformer_trials,
            8,
        ),
    ]
    rows = []
    for name, build, data, epochs, config, trials, speed_batches in workloads:
        if ("mlp" if build is DigitsMLP else "transformer") not in chosen:
            continue
        trained, train_s = train(build, data, epochs)
        runs = [
            ("planner (global)", "global", None),
            ("sampler, TPE", "sampler", None),
            ("separate, TPE", "separate", None),
            ("sampler, random", "sampler", optuna.samplers.RandomSampler(seed=0)),
        ]
        for i, (label, strategy, sampler) in enumerate(runs):
            cb, seconds = tune(
                trained,
                data,
                config,
                strategy=strategy,
                sampler=sampler,
                trials=trials,
                speed_batches=speed_batches,
            )
            rows.append(row(name, label, cb, seconds, train_s if i == 0 else None))
    print(
        "\nFloor: 1 point below the dense model. Throughput in samples/s, measured interleaved.\n"
    )
    print(
        "| workload | search | dense acc | tuned acc | dense throughput | tuned throughput | speedup "
        "| layers sketched | trials | train s | tune s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
