"""How much accuracy each sketch initialization keeps: "sketch" (the seed's) vs "svd" vs "activation".

1. Relative output error ``||y_sketch - y|| / ||y||`` of every trained layer of the
   digits MLP and of the digits CNN, on held-out inputs, against the total rank
   ``2Lk`` (calibration statistics from the training split).
2. Accuracy of the whole model with every eligible layer sketched at one total
   rank, no fine-tuning.
3. What it buys end to end: SketchTuneCallback (``run_on="validate"``) on the trained
   digits MLP with the same floor (1 point) and trial budget for each init, over
   ``--seeds`` seeds of the sampler; the measured speedup of the plan it keeps.

Usage::

    python benchmarks/init_quality.py [--trials 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.digits import DigitsCNN, DigitsDataModule, DigitsMLP
from sketchtune.nn import SKConv2d, SKLinear

INITS = ("sketch", "svd", "activation")
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def train(model: LightningModule, data: DigitsDataModule, epochs: int) -> LightningModule:
    seed_everything(0, workers=True)
    Trainer(max_epochs=epochs, deterministic=True, **QUIET).fit(model, data)
    return model.eval()


def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, a[0].detach())
        )
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def sketch(dense: nn.Module, total_rank: int, init: str, calibration: torch.Tensor) -> nn.Module:
    kwargs: dict[str, Any] = {
        "num_terms": 1,
        "low_rank": max(1, total_rank // 2),
        "init": init,
        "seed": 0,
    }
    if init == "activation":
        kwargs["calibration"] = calibration
    cls = SKConv2d if isinstance(dense, nn.Conv2d) else SKLinear
    return cls.from_dense(dense, **kwargs).eval()  # type: ignore[attr-defined, no-any-return]


def max_rank(dense: nn.Module) -> int:
    if isinstance(dense, nn.Conv2d):
        return min(
            dense.in_channels * dense.kernel_size[0] * dense.kernel_size[1], dense.out_channels
        )
    assert isinstance(dense, nn.Linear)
    return min(dense.in_features, dense.out_features)


def output_errors(
    model: nn.Module,
    names: list[str],
    train_x: torch.Tensor,
    test_x: torch.Tensor,
    ranks: list[int],
) -> list[str]:
    calib = layer_inputs(model, names, train_x)
    held = layer_inputs(model, names, test_x)
    rows = []
    for name in names:
        dense = model.get_submodule(name)
        x = held[name]
        bias: torch.Tensor | float = 0.0
        if dense.bias is not None:
            bias = dense.bias.view(-1, 1, 1) if isinstance(dense, nn.Conv2d) else dense.bias
        with torch.no_grad():
            ref = dense(x) - bias  # the linear part: what the sketch approximates
        for rank in ranks:
            if rank // 2 > max_rank(dense):
                continue
            errors = []
            for init in INITS:
                layer = sketch(dense, rank, init, calib[name])
                with torch.no_grad():
                    out = layer(x) - bias
                errors.append(float((out - ref).norm() / ref.norm()))
            rows.append(
                f"| {name} | {describe(dense)} | {rank} | "
                + " | ".join(f"{e:.3f}" for e in errors)
                + " |"
            )
    return rows


def describe(dense: nn.Module) -> str:
    if isinstance(dense, nn.Conv2d):
        return f"Conv2d {dense.in_channels}->{dense.out_channels} {dense.kernel_size[0]}x{dense.kernel_size[1]}"
    assert isinstance(dense, nn.Linear)
    return f"Linear {dense.in_features}->{dense.out_features}"


def whole_model(
    model: nn.Module,
    names: list[str],
    train_x: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    ranks: list[int],
) -> list[str]:
    calib = layer_inputs(model, names, train_x)
    x, y = test
    rows = []
    with torch.no_grad():
        dense_acc = float((model(x).argmax(1) == y).float().mean())
    for rank in ranks:
        accs = []
        for init in INITS:
            sketched = copy.deepcopy(model)
            for name in names:
                dense = model.get_submodule(name)
                if rank // 2 > max_rank(dense):
                    continue
                parent, _, attr = name.rpartition(".")
                setattr(
                    sketched.get_submodule(parent), attr, sketch(dense, rank, init, calib[name])
                )
            with torch.no_grad():
                accs.append(float((sketched(x).argmax(1) == y).float().mean()))
        rows.append(f"| {rank} | {dense_acc:.4f} | " + " | ".join(f"{a:.4f}" for a in accs) + " |")
    return rows


def end_to_end(trials: int, seeds: int) -> list[str]:
    """One tuning run per (init, seed) on the same trained MLP; the median over seeds."""
    seed_everything(0, workers=True)
    data = DigitsDataModule()
    trained = train(DigitsMLP(), data, 20)
    rows = []
    for init in INITS:
        speedups, accuracies, feasible = [], [], []
        for seed in range(seeds):
            tuner = SketchTuneCallback(
                # the two 1024x1024 layers hold 95% of the multiply-adds
                LayerConfig(
                    ["net.3", "net.6"],
                    {"num_terms": 1, "low_rank": [2, 4, 8, 16, 32, 64, 128], "init": [init]},
                ),
                run_on="validate",
                max_accuracy_drop=0.01,
                n_trials=trials,
                seed=seed,
                speed_batches=20,
                apply_best=False,
            )
            Trainer(callbacks=[tuner], **QUIET).validate(
                copy.deepcopy(trained), data, verbose=False
            )
            summary = tuner.summary
            speedups.append(summary.speedup if summary is not None and summary.speedup else 1.0)
            accuracies.append(tuner.best_accuracy if tuner.best_plan else tuner.dense_accuracy)
            feasible.append(int(tuner.results.feasible.sum()) if tuner.results is not None else 0)
        med = statistics.median
        rows.append(
            f"| {init} | {tuner.dense_accuracy:.4f} | {med(accuracies):.4f} | {med(speedups):.2f}x "
            f"| {', '.join(f'{x:.2f}' for x in speedups)} | {med(feasible):.0f}/{trials} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    mlp_data = DigitsDataModule()
    mlp = train(DigitsMLP(), mlp_data, 20)
    cnn_data = DigitsDataModule(image_size=32)
    cnn = train(DigitsCNN(), cnn_data, 8)
    ranks = [8, 16, 32, 64]
    print("\n1. Relative output error on held-out inputs (lower is better), total rank 2Lk:\n")
    print("| layer | shape | rank | sketch | svd | activation |")
    print("|---|---|---:|---:|---:|---:|")
    mlp_names = ["net.0", "net.3", "net.6", "net.9"]
    cnn_names = ["features.2", "features.4", "features.6", "features.8"]
    for model, data, names in ((mlp, mlp_data, mlp_names), (cnn, cnn_data, cnn_names)):
        assert data.train_set is not None
        assert data.val_set is not None
        print(
            "\n".join(
                output_errors(
                    model, names, data.train_set.tensors[0], data.val_set.tensors[0], ranks
                )
            )
        )
    print(
        "\n2. Accuracy with every layer sketched at the rank (capped per layer), no fine-tuning:\n"
    )
    for label, model, data, names in (
        ("digits MLP", mlp, mlp_data, mlp_names),
        ("digits CNN", cnn, cnn_data, cnn_names),
    ):
        assert data.train_set is not None
        assert data.val_set is not None
        print(f"{label}:\n")
        print("| rank | dense | sketch | svd | activation |")
        print("|---:|---:|---:|---:|---:|")
        print(
            "\n".join(
                whole_model(model, names, data.train_set.tensors[0], data.val_set.tensors, ranks)
            )
        )
        print()
    print(
        f"3. SketchTuneCallback on the trained digits MLP, floor 1 point below dense, "
        f"{args.trials} trials, {args.seeds} seeds per init (medians):\n"
    )
    print(
        "| init | dense accuracy | tuned accuracy | measured speedup | per seed | feasible trials |"
    )
    print("|---|---:|---:|---:|---|---:|")
    print("\n".join(end_to_end(args.trials, args.seeds)))


if __name__ == "__main__":
    main()
