"""Low-rank, int8 and both under one accuracy floor: the same trained model, three searches.

For each model the dense model is trained once; then three searches run on copies of
it with the same floor, trial budget, seed and speed measurement
(``SketchTuneCallback(run_on="validate")``, ``strategy="global"``):

- ``low-rank``: ``params="auto"`` (ranks and inits: the low-rank forms);
- ``int8``: each layer int8 or dense (``low_rank="full", quant="int8"``, where
  ``"auto+int8"`` offers it);
- ``mixed``: ``params="auto+int8"`` (ranks, int8 factors and the int8 weight per layer).

Each row: the confirmed speedup (the callback's interleaved measurement, wall time),
the validation metric, the test metric (``trainer.test`` right after tuning, no
recovery), the layers in each form, the tuned and the folded model's speed measured
again here (``export_plain``, eager, against the dense model, interleaved, median of
``--rounds``; the thread's CPU time with ``--threads 1``) and the search's wall time;
per model, the ceiling: the speedup with every selected layer free (its recorded
output returned at no cost), which no plan of those layers can beat.

Usage::

    python benchmarks/mixed_search.py --only digits_mlp bert gpt2 [--quick] [--trials 24]
        [--threads 1] [--out runs/mixed_search]

Writes ``mixed_search.json`` and ``mixed_search.md`` to ``--out`` after each search.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from sketchtune import LayerConfig, SketchTuneCallback, export_plain, select_layers
from sketchtune.kinds._quant import FULL
from sketchtune.measure import time_interleaved
from sketchtune.registry import kind_named, kind_of

METHODS = ("low-rank", "int8", "mixed")


@dataclass
class Job:
    """One model: how to build, train and tune it (the settings of its example)."""

    name: str
    make: Callable[[], tuple[LightningModule, LightningDataModule]]
    selector: Any
    epochs: int
    tuner: dict[str, Any]
    example_input: Callable[[Any], Any]
    limits: dict[str, Any]


@dataclass
class Row:
    model: str
    method: str
    speedup: float
    dense_val: float | None
    tuned_val: float | None
    dense_test: float | None
    tuned_test: float | None
    forms: dict[str, int]
    layers: dict[str, str]
    eager_speedup: float | None
    folded_speedup: float | None
    search_seconds: float
    trials: int
    planner: str = ""
    plan: dict[str, Any] | None = None
    ceiling: float | None = None


def _jobs(quick: bool) -> dict[str, Job]:
    from sketchtune.examples.digits import DigitsDataModule, DigitsMLP
    from sketchtune.examples.text import (
        BertDigitsClassifier,
        DigitTokensDataModule,
        GPT2ByteLM,
        StdlibBytesDataModule,
    )

    limits = {"limit_train_batches": 4, "limit_val_batches": 3, "limit_test_batches": 3}
    q: dict[str, Any] = limits if quick else {}
    return {
        "digits_mlp": Job(
            "digits MLP 64-1024x3-10",
            lambda: (DigitsMLP(hidden=1024, depth=3), DigitsDataModule()),
            r"net\.\d+",
            2 if quick else 20,
            {"monitor": "val_acc", "max_accuracy_drop": 0.01, "speed_batches": 20},
            lambda batch: batch[0],
            q,
        ),
        "bert": Job(
            "BERT 2x256 / digits",
            lambda: (
                BertDigitsClassifier(hidden=64 if quick else 256, layers=2, heads=4),
                DigitTokensDataModule(batch_size=32, eval_batch_size=16),
            ),
            {"type": "Linear", "pattern": r"model\.bert\.encoder\.layer\.\d+\..*"},
            1 if quick else 6,
            {"monitor": "val_acc", "max_accuracy_drop": 0.01, "speed_batches": 12},
            lambda batch: batch[0],
            q,
        ),
        "gpt2": Job(
            "GPT-2 4x256 / stdlib bytes",
            lambda: (
                GPT2ByteLM(n_embd=64 if quick else 256, n_layer=2 if quick else 4, n_head=4),
                StdlibBytesDataModule(block=128, batch_size=16, train_blocks=2048),
            ),
            r"model\.transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)",
            1,
            {
                "monitor": "val_loss",
                "mode": "min",
                "max_accuracy_drop": "1%",
                "metric_range": None,
                "speed_batches": 12,
            },
            lambda batch: batch[0][:, :-1],
            q,
        ),
    }


def configs_for(method: str, model: nn.Module, selector: Any) -> list[LayerConfig]:
    """``"auto+int8"`` for ``mixed``; ``"auto"`` (low-rank forms) for ``low-rank``; int8 only."""
    if method == "mixed":
        return [LayerConfig(selector, "auto+int8")]
    if method == "low-rank":
        return [LayerConfig(selector, "auto")]
    configs = []
    for name in select_layers(model, selector):
        module = model.get_submodule(name)
        kind = kind_of(module)
        assert kind is not None
        if "quant" in kind.auto_int8_space(module):
            configs.append(
                LayerConfig([name], {"num_terms": 1, "low_rank": [FULL], "quant": ["int8"]})
            )
    return configs


def _quiet(out: Path, limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "deterministic": True,
        "default_root_dir": str(out),
        **limits,
    }


class _Free(nn.Module):
    """Returns a layer's recorded output: the layer at no cost (for the ceiling)."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


def ceiling(dense: nn.Module, selector: Any, x: Any, rounds: int) -> float:
    """The speedup with every selected layer free: no plan of those layers can beat it."""
    names = select_layers(dense, selector)
    outs: dict[str, Any] = {}
    hooks = [
        dense.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: outs.setdefault(n, o)  # type: ignore[misc]
        )
        for n in names
    ]
    with torch.inference_mode():
        dense.eval()(x)
    for hook in hooks:
        hook.remove()
    free = copy.deepcopy(dense)
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(free.get_submodule(parent), attr, _Free(outs[name]))
    return _time_pair(dense, free, x=x, rounds=rounds)[0]


def _time_pair(dense: nn.Module, *others: nn.Module, x: Any, rounds: int) -> list[float]:
    """Dense seconds over each other model's, per batch, interleaved, medians."""

    def run(model: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return model(x)

        return call

    fns = [run(dense.eval()), *(run(m.eval()) for m in others)]
    if torch.get_num_threads() != 1:
        times = time_interleaved(fns, repeats=rounds, warmup=2)
    else:
        for fn in fns * 2:
            fn()
        times = [[] for _ in fns]
        for _ in range(rounds):
            for fn, out in zip(fns, times, strict=True):
                start = time.thread_time()
                fn()
                out.append(time.thread_time() - start)
    base = statistics.median(times[0])
    return [base / statistics.median(t) for t in times[1:]]


def speedups(dense: nn.Module, tuned: nn.Module, x: Any, rounds: int) -> tuple[float, float]:
    """Dense over tuned and over folded (``export_plain``) seconds per batch, eager.

    Interleaved (dense, tuned, folded, ...), medians of ``rounds``. With one torch
    thread the seconds are the thread's CPU time: on a shared machine wall time
    stretches a long call over other processes' time slices more than a short one.
    """
    folded = export_plain(tuned.eval(), strict=False).eval()
    eager, plain = _time_pair(dense, tuned, folded, x=x, rounds=rounds)
    return eager, plain


def _metric(results: list[dict[str, float]], key: str) -> float | None:
    return float(results[0][key]) if results and key in results[0] else None


def run_job(job: Job, trials: int, rounds: int, out: Path, on_row: Callable[[Row], None]) -> None:
    seed_everything(0, workers=True)
    model, data = job.make()
    quiet = _quiet(out, job.limits)
    Trainer(max_epochs=job.epochs, **quiet).fit(model, data)
    dense = copy.deepcopy(model).eval()
    key = job.tuner["monitor"].split("_", 1)[1]
    testable = is_overridden("test_step", model, LightningModule)  # the digits have no test split

    def test(tuned: LightningModule) -> list[dict[str, float]]:
        return Trainer(**quiet).test(tuned, data, verbose=False) if testable else []

    dense_test = test(copy.deepcopy(dense))
    batch = next(iter(data.predict_dataloader()))
    x = job.example_input(batch)
    bound = ceiling(dense, job.selector, x, rounds)
    for method in METHODS:
        tuned = copy.deepcopy(dense)
        configs = configs_for(method, tuned, job.selector)
        if not configs:  # auto offers int8 on none of the layers (too small): nothing to search
            on_row(Row(job.name, method, 1.0, None, None, None, None, {}, {}, None, None, 0.0, 0))
            continue
        callback = SketchTuneCallback(
            configs,
            n_trials=trials,
            strategy="global",
            speed="measure",
            warmup_batches=3,
            run_on="validate",
            seed=0,
            **job.tuner,
        )
        start = time.perf_counter()
        Trainer(callbacks=[callback], **quiet).validate(tuned, data, verbose=False)
        seconds = time.perf_counter() - start
        tested = test(tuned)
        plan = callback.best_plan or {}
        layers = {n: kind_named(p.type).form(p.params) for n, p in plan.items()}
        forms: dict[str, int] = {}
        for form in layers.values():
            forms[form] = forms.get(form, 0) + 1
        eager, folded = speedups(dense, tuned, x, rounds) if plan else (None, None)
        planner = callback.tuner.planner if callback.tuner is not None else None
        priced = ""
        if planner is not None:
            candidates = [c.params for o in planner.options for c in o.candidates]
            int8 = sum(p.get("quant", "none") == "int8" for p in candidates)
            priced = (
                f"{planner.unit}, {len(candidates)} candidates ({int8} int8), "
                f"prepared in {planner.prepare_seconds:.0f} s"
            )
        on_row(
            Row(
                model=job.name,
                method=method,
                speedup=callback.best_speedup or 1.0,
                dense_val=callback.dense_accuracy,
                tuned_val=callback.best_accuracy,
                dense_test=_metric(dense_test, f"test_{key}"),
                tuned_test=_metric(tested, f"test_{key}"),
                forms=forms,
                layers=layers,
                eager_speedup=eager,
                folded_speedup=folded,
                search_seconds=seconds,
                trials=0 if callback.results is None else len(callback.results),
                planner=priced,
                plan={n: [p.type, dict(p.params)] for n, p in plan.items()},
                ceiling=bound,
            )
        )


def markdown(rows: list[Row]) -> str:
    def num(value: float | None, fmt: str = ".4f") -> str:
        return "n/a" if value is None else format(value, fmt)

    cpu = " (CPU time)" if torch.get_num_threads() == 1 else ""
    lines = [
        "| model | search | confirmed speedup | val dense -> tuned | test dense -> tuned "
        f"| layers by form | re-measured{cpu}: eager / folded | search wall time | trials |",
        "|---|---|---:|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        forms = ", ".join(f"{n} {f}" for f, n in sorted(r.forms.items())) or "none (dense)"
        lines.append(
            f"| {r.model} | {r.method} | {r.speedup:.2f}x | {num(r.dense_val)} -> "
            f"{num(r.tuned_val)} | {num(r.dense_test)} -> {num(r.tuned_test)} | {forms} "
            f"| {num(r.eager_speedup, '.2f')}x / {num(r.folded_speedup, '.2f')}x "
            f"| {r.search_seconds:.0f} s | {r.trials} |"
        )
    by_model: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_model.setdefault(r.model, {})[r.method] = r

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or b is None else f"{a / b:.2f}x"

    lines += [
        "",
        "| model | mixed / low-rank: confirmed, re-measured | mixed / int8: confirmed, "
        "re-measured | mixed / low-rank search wall time | ceiling (selected layers free) |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, got in by_model.items():
        if {"mixed", "low-rank", "int8"} <= set(got):
            m, lr, q = got["mixed"], got["low-rank"], got["int8"]
            lines.append(
                f"| {model} | {ratio(m.speedup, lr.speedup)}, "
                f"{ratio(m.eager_speedup or 1.0, lr.eager_speedup or 1.0)} "
                f"| {ratio(m.speedup, q.speedup)}, "
                f"{ratio(m.eager_speedup or 1.0, q.eager_speedup or 1.0)} "
                f"| {ratio(m.search_seconds, lr.search_seconds)} | {num(m.ceiling, '.2f')}x |"
            )
    lines += ["", "Planner (cost unit, candidates kept, preparation):", ""]
    lines += [f"- {r.model}, {r.method}: {r.planner or 'n/a'}" for r in rows]
    lines += ["", "Per-layer forms of the plans:", ""]
    for r in rows:
        layers = ", ".join(f"{n}: {f}" for n, f in r.layers.items()) or "dense"
        lines.append(f"- {r.model}, {r.method}: {layers}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["digits_mlp", "bert", "gpt2"])
    parser.add_argument("--quick", action="store_true", help="narrow models, few batches")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="runs/mixed_search")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all); 1 on a shared machine, where two threads wait on "
        "each other through the scheduler's time slices",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(args.quick)
    rows: list[Row] = []

    def on_row(row: Row) -> None:
        rows.append(row)
        (out / "mixed_search.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        (out / "mixed_search.md").write_text(markdown(rows))
        print(markdown(rows), flush=True)

    for name in args.only:
        run_job(jobs[name], 3 if args.quick else args.trials, args.rounds, out, on_row)


if __name__ == "__main__":
    main()
