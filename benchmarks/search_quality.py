"""Search quality: the planned global search vs the pure-sampler searches vs a uniform-rank sweep.

Same budget (40 evaluations), FLOP speed model, floor 1 point below the dense
accuracy, on models trained here with fixed seeds:

- digits MLPs (``DigitsMLP``, hidden 512) of depth 4/8/16/32; the tuned layers
  are the 512x512 hidden ones (depth - 1 of them), ``params="auto"``;
- the digits CNN (``DigitsCNN``, its five convolutions);
- the Transformer example (``TransformerClassifier``, 2 layers, 256 tokens): its
  attention and feed-forward layers.

Per search: the best speedup that keeps the floor, its accuracy, the
evaluations it took to reach 95% of its own final result, and for the
planner its own time (allocation + choosing each next plan; the one-time
spectra are reported apart). The uniform sweep gives every layer the same
rank (``init`` svd or activation), one evaluation per rank of the 'auto'
ladder. A last row times the planner alone on an untrained 100-layer MLP.

Usage::

    python benchmarks/search_quality.py [--trials 40] [--models mlp4,mlp8,mlp16,mlp32,cnn,transformer]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import torch
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune._planner import TAG
from sketchtune.examples.digits import DigitsCNN, DigitsDataModule, DigitsMLP
from sketchtune.examples.sequences import MajorityDataModule, TransformerClassifier

Accuracy = Callable[[nn.Module], float]


def _fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def _accuracy(tensors: tuple[torch.Tensor, ...], batch: int = 512) -> Accuracy:
    x, y = tensors

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            hits = sum(
                int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
                for i in range(0, len(x), batch)
            )
        return hits / len(x)

    return accuracy


def mlp(depth: int) -> tuple[nn.Module, list[str], Accuracy]:
    torch.manual_seed(0)
    data = DigitsDataModule()
    data.setup("fit")
    assert data.train_set is not None
    assert data.val_set is not None
    model = DigitsMLP(hidden=512, depth=depth, dropout=0.0)
    for module in model.modules():  # He init: a plain 32-layer ReLU MLP trains from it
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    _fit(model, *data.train_set.tensors, epochs=10, lr=3e-4, batch=64)
    names = [f"net.{3 * i}" for i in range(1, depth)]
    return model, names, _accuracy(data.val_set.tensors)


def cnn() -> tuple[nn.Module, list[str], Accuracy]:
    torch.manual_seed(0)
    data = DigitsDataModule(image_size=32)
    data.setup("fit")
    assert data.train_set is not None
    assert data.val_set is not None
    model = DigitsCNN(width=32)
    _fit(model, *data.train_set.tensors, epochs=12, lr=2e-3, batch=64)
    return model, [f"features.{i}" for i in (0, 2, 4, 6, 8)], _accuracy(data.val_set.tensors)


def transformer() -> tuple[nn.Module, list[str], Accuracy]:
    torch.manual_seed(0)
    data = MajorityDataModule(length=256, train_size=2048, val_size=512)
    data.setup("fit")
    assert data.train_set is not None
    assert data.val_set is not None
    model = TransformerClassifier(d_model=64, nhead=4, layers=2, dim_feedforward=128)
    _fit(model, *data.train_set.tensors, epochs=6, lr=2e-3, batch=32)
    names = [
        f"encoder.layers.{i}.{part}"
        for i in range(2)
        for part in ("self_attn", "linear1", "linear2")
    ]
    return model, names, _accuracy(data.val_set.tensors, batch=128)


def _history(tuner: SKAutoTuner) -> list[float]:
    """Best feasible speedup after each evaluation (1.0 before any)."""
    best, out = 1.0, []
    for record in sorted(tuner.records, key=lambda r: r.trial):
        if record.feasible and record.speedup is not None:
            best = max(best, float(record.speedup))
        out.append(best)
    return out


def _search(
    model: nn.Module,
    configs: TuningConfigs,
    accuracy: Accuracy,
    *,
    strategy: str,
    trials: int,
    sampler: optuna.samplers.BaseSampler | None = None,
    storage: optuna.storages.BaseStorage | None = None,
) -> dict[str, Any]:
    tuner = SKAutoTuner(
        model,
        configs,
        accuracy,
        max_accuracy_drop=0.01,
        optimization_eval_func="flops",
        strategy=strategy,  # type: ignore[arg-type]
        search_algorithm=OptunaSearch(
            n_trials=trials,
            seed=0,
            sampler=sampler,
            storage=storage,
            study_name=None if storage is None else "uniform",
            load_if_exists=storage is not None,
        ),
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.tune()
    wall = time.perf_counter() - start
    history = _history(tuner)
    final = history[-1] if history else 1.0
    reach = next((i + 1 for i, v in enumerate(history) if v >= 0.95 * final), len(history))
    out = {
        "speedup": final,
        "accuracy": tuner.best_accuracy,
        "evals": len(history),
        "reach95": reach,
        "wall": wall,
    }
    if tuner.planner is not None:
        out["own_ms"] = 1000 * (tuner.planner.allocate_seconds + tuner.planner.propose_seconds)
        out["prepare_s"] = tuner.planner.prepare_seconds
        out["frontier"] = len(tuner.planner.frontier)
    return out


def _uniform(model: nn.Module, names: list[str], accuracy: Accuracy, trials: int) -> dict[str, Any]:
    """Every layer at the same rung of the 'auto' ladder (init svd, then activation).

    One plan per rung, evaluated as enqueued trials of a sampler-only study; a
    layer whose ladder stops below the rung stays dense (that rank would not
    save compute there).
    """
    configs = TuningConfigs([LayerConfig(names, "auto")])
    probe = SKAutoTuner(model, configs, accuracy, strategy="sampler")
    groups = probe._layout.groups
    # the rank of a low-rank layer, the number of random features of attention
    ladder = {g.key: "low_rank" if "low_rank" in g.space else "num_random_features" for g in groups}
    rungs = sorted({v for g in groups for v in g.space[ladder[g.key]].grid()})
    inits = ["svd", "activation"] if any("init" in g.space for g in groups) else [None]
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="uniform", direction="maximize")
    plans = 0
    for init in inits:
        for rung in rungs:
            params: dict[str, Any] = {}
            for group in groups:
                fits = group.space[ladder[group.key]].contains(rung)
                params[f"{group.key}.enabled"] = fits
                if fits:
                    for name, spec in group.space.items():
                        params[f"{group.key}.{name}"] = spec.first()
                    params[f"{group.key}.{ladder[group.key]}"] = rung
                    if init is not None and "init" in group.space:
                        params[f"{group.key}.init"] = init
            study.enqueue_trial(params)
            plans += 1
    return _search(
        model,
        configs,
        accuracy,
        strategy="sampler",
        trials=min(trials, plans),
        sampler=optuna.samplers.RandomSampler(seed=0),
        storage=storage,
    )


def _timing_only(trials: int) -> dict[str, Any]:
    """The planner's own time on an untrained 100-layer MLP.

    The "accuracy" is minus the relative error of the model's output against the
    dense one, with a floor at 5%: every frontier point and every refinement is
    a real evaluation with a real boundary.
    """
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(100):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10)).eval()
    for module in model.modules():  # He init: the signal reaches the output
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    x = torch.randn(256, 256)
    with torch.no_grad():
        reference = model(x)

    def closeness(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - reference).norm() / reference.norm())

    names = [str(2 * i) for i in range(100)]
    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(names, "auto")]),
        closeness,
        accuracy_threshold=-0.05,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=trials, seed=0),
    )
    tuner.tune()
    assert tuner.planner is not None
    study = tuner.search_algorithm.study
    assert study is not None
    refined = len([t for t in study.trials if t.user_attrs.get(TAG, {}).get("phase") == "refine"])
    return {
        "speedup": tuner.best_speedup or 1.0,
        "evals": len(tuner.records),
        "refined": refined,
        "own_ms": 1000 * (tuner.planner.allocate_seconds + tuner.planner.propose_seconds),
        "prepare_s": tuner.planner.prepare_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--models", default="mlp4,mlp8,mlp16,mlp32,cnn,transformer,timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    builders: dict[str, Callable[[], tuple[nn.Module, list[str], Accuracy]]] = {
        "mlp4": lambda: mlp(4),
        "mlp8": lambda: mlp(8),
        "mlp16": lambda: mlp(16),
        "mlp32": lambda: mlp(32),
        "cnn": cnn,
        "transformer": transformer,
    }
    print(
        "| model | layers | dense acc | planner | TPE (sampler) | random | uniform sweep | "
        "planner / TPE | planner own time | spectra |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        if key == "timing":
            t = _timing_only(args.trials)
            print(
                f"| 100-layer MLP (timing only) | 100 | - | {t['speedup']:.1f}x, {t['evals']} evals "
                f"({t['refined']} refinements) | - | - | - | - "
                f"| {t['own_ms']:.0f} ms | {t['prepare_s']:.1f} s |",
                flush=True,
            )
            continue
        model, names, accuracy = builders[key]()
        dense = accuracy(model)
        configs = TuningConfigs([LayerConfig(names, "auto")])
        planned = _search(model, configs, accuracy, strategy="global", trials=args.trials)
        tpe = _search(model, configs, accuracy, strategy="sampler", trials=args.trials)
        rnd = _search(
            model,
            configs,
            accuracy,
            strategy="sampler",
            trials=args.trials,
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
        uniform = _uniform(model, names, accuracy, args.trials)

        def cell(r: dict[str, Any]) -> str:
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            return f"{r['speedup']:.2f}x @ {acc} ({r['reach95']}/{r['evals']})"

        print(
            f"| {key} | {len(names)} | {dense:.4f} | {cell(planned)} | {cell(tpe)} | {cell(rnd)} | "
            f"{cell(uniform)} | {planned['speedup'] / tpe['speedup']:.2f} | {planned['own_ms']:.0f} ms | "
            f"{planned['prepare_s']:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
