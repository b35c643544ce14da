"""Real models: ResNet-18, a BERT classifier and GPT-2, each trained, tuned, recovered and tested.

Runs ``examples/resnet18_mnist.py``, ``examples/bert_classifier.py`` and
``examples/gpt2_lm.py`` (their full modes unless ``--quick``) and, for each, reports:

- dense vs tuned validation and test metric, before and after the recovery fine-tune
  (accuracy; for GPT-2 the loss in nats per byte and the perplexity exp(loss));
- the speedup the callback confirmed (7 interleaved rounds inside the search), and one
  measured here on the final (recovered) model against the dense copy, interleaved,
  median of ``--rounds``: eager, the folded model (``export_plain``) eager, under
  ``torch.export`` (``.module()`` of the exported program) and under ONNX Runtime
  (``torch.onnx.export`` then an ``InferenceSession``, one thread per core) when
  onnxruntime is installed;
- layers selected, sketched and left dense; tuning wall time;
- a per-layer latency profile: each selected layer timed alone on the input it sees in
  the model, dense vs as tuned, and the rest of the model (the Amdahl part).

Usage::

    python benchmarks/real_models.py [--only resnet18_mnist bert_classifier gpt2_lm]
        [--quick] [--out runs/real_models]

Writes ``real_models.json`` and ``real_models.md`` to ``--out`` after each model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sketchtune import export_plain
from sketchtune.examples.workflow import Outcome

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = ("resnet18_mnist", "bert_classifier", "gpt2_lm")


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def interleaved(
    first: Callable[[], Any], second: Callable[[], Any], rounds: int, repeat: int
) -> tuple[float, float]:
    """Median seconds per call of ``first`` and ``second``, timed alternately."""
    for fn in (first, second):
        fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            out.append((time.perf_counter() - start) / repeat)
    return statistics.median(times[0]), statistics.median(times[1])


def _runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _exported(model: nn.Module, x: torch.Tensor) -> nn.Module:
    program = torch.export.export(model, (x,))
    module: nn.Module = program.module()
    return module


def _onnx_session(model: nn.Module, x: torch.Tensor, folder: str, name: str) -> Any:
    import onnxruntime as ort

    path = f"{folder}/{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, input_names=["x"], dynamo=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def speedups(dense: nn.Module, tuned: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Dense / tuned seconds per batch in each runtime (interleaved, median of ``rounds``)."""
    dense, tuned = dense.eval(), tuned.eval()
    folded = export_plain(tuned).eval()
    rows: dict[str, Any] = {}
    d, t = interleaved(_runner(dense, x), _runner(tuned, x), rounds, 2)
    rows["eager"] = (d, t)
    d, t = interleaved(_runner(dense, x), _runner(folded, x), rounds, 2)
    rows["folded eager"] = (d, t)
    try:
        d, t = interleaved(
            _runner(_exported(dense, x), x), _runner(_exported(folded, x), x), rounds, 2
        )
        rows["torch.export"] = (d, t)
    except Exception as exc:
        rows["torch.export"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        rows["onnxruntime"] = "not installed"
        return rows
    try:
        with tempfile.TemporaryDirectory() as folder:
            sessions = [_onnx_session(m, x, folder, n) for m, n in ((dense, "d"), (folded, "t"))]
            feed = {"x": x.numpy()}
            d, t = interleaved(
                lambda: sessions[0].run(None, feed), lambda: sessions[1].run(None, feed), rounds, 2
            )
        rows["onnxruntime"] = (d, t)
    except Exception as exc:
        rows["onnxruntime"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    return rows


def layer_profile(
    dense: nn.Module, tuned: nn.Module, x: torch.Tensor, names: list[str], rounds: int
) -> dict[str, Any]:
    """Each selected layer alone on its recorded input, dense vs tuned; whole models too."""
    inputs: dict[str, tuple[Any, ...]] = {}
    hooks = [
        dense.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: inputs.setdefault(n, args)
        )
        for n in names
    ]
    with torch.inference_mode():
        dense(x)
    for hook in hooks:
        hook.remove()
    layers: dict[str, tuple[float, float]] = {}
    for n in names:
        a, b = dense.get_submodule(n), tuned.get_submodule(n)
        args = inputs[n]

        def call(m: nn.Module = a, args: tuple[Any, ...] = args) -> Any:
            with torch.inference_mode():
                return m(*args)

        def call_tuned(m: nn.Module = b, args: tuple[Any, ...] = args) -> Any:
            with torch.inference_mode():
                return m(*args)

        layers[n] = interleaved(call, call_tuned, rounds, 3)
    total = interleaved(_runner(dense, x), _runner(tuned, x), rounds, 2)
    return {"layers": layers, "total": total}


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def row(name: str, outcome: Outcome, runtimes: dict[str, Any]) -> dict[str, Any]:
    sketched = sorted(outcome.plan)  # the plan's layers: {name: {"type", "params", ...}}
    record: dict[str, Any] = {
        "model": outcome.name,
        "metric": outcome.metric,
        "dense_val": outcome.dense_val,
        "tuned_val": outcome.tuned_val,
        "recovered_val": outcome.recovered_val,
        "dense_test": outcome.dense_test,
        "tuned_test": outcome.tuned_test,
        "recovered_test": outcome.recovered_test,
        "confirmed_speedup": outcome.speedup,
        "layers_selected": len(outcome.layers_selected),
        "layers_sketched": len(sketched),
        "layers_dense": sorted(set(outcome.layers_selected) - set(sketched)),
        "plan": outcome.plan,
        "train_seconds": outcome.train_seconds,
        "tune_seconds": outcome.tune_seconds,
        "recovery_seconds": outcome.recovery_seconds,
        "trials": outcome.trials,
        "runtimes": {
            k: (v if isinstance(v, str) else {"dense_s": v[0], "tuned_s": v[1], "x": v[0] / v[1]})
            for k, v in runtimes.items()
        },
    }
    return record


def markdown(records: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | metric | dense val | tuned val | dense test | tuned test | recovered test "
        "| confirmed | eager | folded | torch.export | ORT | sketched | tuning |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records.values():

        def x(key: str, r: dict[str, Any] = r) -> str:
            v = r["runtimes"].get(key)
            return "n/a" if not isinstance(v, dict) else f"{v['x']:.2f}x"

        speedup = r["confirmed_speedup"]
        confirmed = "1.00x (dense)" if not r["plan"] or speedup is None else f"{speedup:.2f}x"
        tuned_val = r["tuned_val"] if r["plan"] else r["dense_val"]
        lines.append(
            f"| {r['model']} | {r['metric']} | {_fmt(r['dense_val'])} | {_fmt(tuned_val)} "
            f"| {_fmt(r['dense_test'])} | {_fmt(r['tuned_test'])} | {_fmt(r['recovered_test'])} "
            f"| {confirmed} | {x('eager')} | {x('folded eager')} "
            f"| {x('torch.export')} | {x('onnxruntime')} "
            f"| {r['layers_sketched']}/{r['layers_selected']} | {r['tune_seconds']:.0f} s |"
        )
    for r in records.values():
        profile = r.get("profile")
        if not profile:
            continue
        lines += ["", f"Per-layer latency, {r['model']} (ms per batch, dense -> tuned):", ""]
        lines += ["| layer | dense | tuned | x |", "|---|---:|---:|---:|"]
        layer_sum = [0.0, 0.0]
        for n, (d, t) in profile["layers"].items():
            layer_sum[0] += d
            layer_sum[1] += t
            lines.append(f"| {n} | {d * 1e3:.2f} | {t * 1e3:.2f} | {d / t:.2f}x |")
        d, t = profile["total"]
        lines.append(
            f"| selected layers | {layer_sum[0] * 1e3:.1f} | {layer_sum[1] * 1e3:.1f} "
            f"| {layer_sum[0] / layer_sum[1]:.2f}x |"
        )
        lines.append(
            f"| rest of the model | {(d - layer_sum[0]) * 1e3:.1f} | "
            f"{(t - layer_sum[1]) * 1e3:.1f} | |"
        )
        lines.append(f"| whole model | {d * 1e3:.1f} | {t * 1e3:.1f} | {d / t:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--quick", action="store_true", help="the examples' smoke runs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="runs/real_models")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for name in args.only:
        example = load_example(name)
        flags = ["--out", str(out / name)] + (["--quick"] if args.quick else [])
        outcome: Outcome = example.main(flags)
        assert outcome.model is not None
        assert outcome.dense_model is not None
        x = outcome.example_input
        tuned = copy.deepcopy(outcome.model).eval()
        dense = outcome.dense_model.eval()
        try:
            runtimes = speedups(dense, tuned, x, args.rounds)
        except Exception as exc:  # the tuning outcome is still worth a row
            runtimes = {"eager": f"failed: {type(exc).__name__}: {exc}"}
        record = row(name, outcome, runtimes)
        try:
            record["profile"] = layer_profile(dense, tuned, x, outcome.layers_selected, args.rounds)
        except Exception as exc:
            record["profile"] = None
            print(f"{name}: no per-layer profile ({type(exc).__name__}: {exc})")
        records[name] = record
        (out / "real_models.json").write_text(json.dumps(records, indent=1, default=str))
        (out / "real_models.md").write_text(markdown(records))
        print(markdown({name: record}), flush=True)
    return records


if __name__ == "__main__":
    main()
