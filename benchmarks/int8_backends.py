"""int8 backends on this machine, side by side: which one should sketchtune's int8 forms use?

Every row runs in a process of its own (one backend's thread pool, compiled
kernels or ONNX Runtime session cannot slow another's calls) and is timed there
against the dense layer, interleaved (dense, row, dense, row, ...) after warm-up;
ratios are the median dense fp32 ``nn.Linear`` seconds over the row's median
seconds, so ``2.00x`` is twice as fast as dense. With ``--threads 1`` the seconds
are the thread's CPU time (a shared machine's time slices do not count; see
:func:`interleaved`), otherwise wall time. The rows:

- ``torch.ao dynamic (per-tensor / per-channel)``: ``torch.ao.quantization.quantize_dynamic``
  (fbgemm / x86 kernels: int8 weights, activations quantized per call);
- ``sketchtune Int8Linear``: the module sketchtune builds (the same kernels, weights kept
  as plain int8 + scale tensors and packed once);
- ``plain int8 dtypes, torch._int_mm``: no quantized dtype at all (what pytorch#184982
  points to): activations quantized per row with ordinary ops, ``torch._int_mm``
  (int8 x int8 -> int32), rescaled in float;
- ``torchao ...``: torchao's ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``
  and ``Int8WeightOnlyConfig``, eager and under ``torch.compile`` (when torchao imports);
- ``ONNX Runtime fp32 / int8``: the layer exported with ``torch.onnx.export`` and run by an
  ``InferenceSession``, and the same graph after ``onnxruntime.quantization.quantize_dynamic``
  (when onnxruntime, onnx and onnxscript import);
- ``low-rank r`` and ``low-rank r, int8 factors``: the folded sketch (two Linears) in fp32
  and with both factors int8 (what the planner weighs against int8 alone).

Usage::

    python benchmarks/int8_backends.py                 # 1024x1024 and 4096x4096, batch 256
    python benchmarks/int8_backends.py --quick         # 512x512 only, a smoke run
    python benchmarks/int8_backends.py --no-compile    # skip the torch.compile rows

Optional packages (torchao, onnxruntime) are imported when present; a missing one is a
row that says so. Timings on a shared machine are noisy: run it twice and compare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sketchtune.measure import time_interleaved
from sketchtune.nn import Int8Linear

Runner = Callable[[], Any]


def _ao_dynamic(dense: nn.Module, per_channel: bool) -> nn.Module:
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # quantize_dynamic swaps submodules, never the module it is given: wrap the layer
        model = quantize_dynamic(nn.Sequential(dense), {nn.Linear: qconfig}, dtype=torch.qint8)
    assert not isinstance(model[0], nn.Linear), "quantize_dynamic left the layer in float"
    return model


def _torchao(dense: nn.Module, config: str, compiled: bool) -> nn.Module:
    import copy

    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    model = nn.Sequential(copy.deepcopy(dense))  # quantize_ swaps submodules too
    made = (
        Int8DynamicActivationInt8WeightConfig() if config == "dynamic" else Int8WeightOnlyConfig()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, made)
    return torch.compile(model) if compiled else model


def _onnx(dense: nn.Module, x: torch.Tensor, folder: str, name: str, int8: bool) -> Runner:
    import onnxruntime as ort

    path = os.path.join(folder, f"{name}.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(dense, (x,), path, input_names=["x"], dynamo=True)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = os.path.join(folder, f"{name}.int8.onnx")
        quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, per_channel=True)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ORT's threads spin after each run by default, stealing the cores from the next row
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


class _IntMM(nn.Module):
    """int8 weights and per-row int8 activations on ``torch._int_mm``, in plain dtypes."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        layer = Int8Linear.from_dense(dense)
        self.weight_t = layer.qweight.t().contiguous()
        self.scale = layer.scale
        self.bias = dense.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        q = torch.round(x / step).to(torch.int8)
        return torch._int_mm(q, self.weight_t).float() * step * self.scale + self.bias


def _eager(module: nn.Module, x: torch.Tensor) -> Runner:
    def run() -> Any:
        with torch.inference_mode():
            return module(x)

    return run


def _low_rank(d_in: int, d_out: int, rank: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out)).eval()


def candidates_for(size: int, batch: int, rank: int) -> dict[str, Callable[[], Runner]]:
    """Every row's runner factory, by name, for one layer size."""
    torch.manual_seed(0)
    dense = nn.Linear(size, size).eval()
    x = torch.randn(batch, size)
    low = _low_rank(size, size, rank)
    candidates: dict[str, Callable[[], Runner]] = {
        "torch.ao dynamic, per-tensor": lambda: _eager(_ao_dynamic(dense, False), x),
        "torch.ao dynamic, per-channel": lambda: _eager(_ao_dynamic(dense, True), x),
        "sketchtune Int8Linear": lambda: _eager(Int8Linear.from_dense(dense).eval(), x),
        "plain int8 dtypes, torch._int_mm": lambda: _eager(_IntMM(dense), x),
        "torchao int8 dynamic, eager": lambda: _eager(_torchao(dense, "dynamic", False), x),
        "torchao int8 weight-only, eager": lambda: _eager(_torchao(dense, "weight", False), x),
        f"low-rank r={rank}": lambda: _eager(low, x),
        f"low-rank r={rank}, int8 factors": lambda: _eager(
            nn.Sequential(*(Int8Linear.from_dense(m) for m in low)).eval(), x
        ),
    }
    candidates["fp32 nn.Linear, torch.compile"] = lambda: _eager(torch.compile(dense), x)
    candidates["torchao int8 dynamic, torch.compile"] = lambda: _eager(
        _torchao(dense, "dynamic", True), x
    )
    candidates["torchao int8 weight-only, torch.compile"] = lambda: _eager(
        _torchao(dense, "weight", True), x
    )
    folder = tempfile.mkdtemp(prefix="int8_backends_")
    candidates["ONNX Runtime fp32"] = lambda: _onnx(dense, x, folder, "fp32", False)
    candidates["ONNX Runtime int8 (quantize_dynamic)"] = lambda: _onnx(
        dense, x, folder, "int8", True
    )
    candidates["fp32 nn.Linear (dense)"] = lambda: _eager(dense, x)  # the noise floor
    return candidates


def time_row(name: str, size: int, batch: int, rank: int, repeats: int) -> float | str:
    """Dense seconds / the row's seconds (medians, interleaved), or why it could not run."""
    candidates = candidates_for(size, batch, rank)
    reference = candidates["fp32 nn.Linear (dense)"]()
    try:
        runner = candidates[name]()
        runner()  # compiles, exports, packs: before any timing
    except Exception as exc:  # an optional package or backend missing here
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:70]})"
    times = interleaved([reference, runner], repeats)
    return statistics.median(times[0]) / statistics.median(times[1])


def interleaved(fns: list[Runner], repeats: int) -> list[list[float]]:
    """Seconds per call of each function, round-robin after warm-up.

    With one torch thread, the calling thread's CPU time (``time.thread_time``): on a
    shared machine wall time stretches a long call over the other processes' time
    slices more than a short one, which inflates the speedup of short calls; CPU time
    counts only this thread's work. With more threads, wall time
    (:func:`sketchtune.measure.time_interleaved`).
    """
    if torch.get_num_threads() != 1:
        return time_interleaved(fns, repeats=repeats, warmup=2)
    for fn in fns * 2:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.thread_time()
            fn()
            out.append(time.thread_time() - start)
    return times


def rows_for(
    size: int, batch: int, rank: int, *, compile_rows: bool, repeats: int, threads: int | None
) -> list[tuple[str, float | str]]:
    """``[(row, dense seconds / row seconds or why it is missing)]``, each row in its own process."""
    out: list[tuple[str, float | str]] = []
    for name in candidates_for(size, batch, rank):
        if "torch.compile" in name and not compile_rows:
            continue
        args = [sys.executable, __file__, "--row", name, "--size", str(size), "--batch"]
        args += [str(batch), "--rank", str(rank), "--repeats", str(repeats)]
        args += ["--threads", str(threads)] if threads else []
        done = subprocess.run(args, capture_output=True, text=True, env=os.environ.copy())
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            out.append((name, f"n/a (exit {done.returncode}: {done.stderr.strip()[-120:]})"))
            continue
        value = lines[-1]
        out.append((name, float(value) if value[0].isdigit() else value))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512x512 only, few repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in a child process
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        print(time_row(args.row, args.size, args.batch, args.rank, args.repeats))
        return
    sizes = [(512, 16)] if args.quick else [(1024, 16), (4096, 64)]
    repeats = 5 if args.quick else args.repeats
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"quantized engine {torch.backends.quantized.engine}, batch {args.batch}; "
        "ratio = dense fp32 seconds / row seconds (median, interleaved)\n"
    )
    for size, rank in sizes:
        rows = rows_for(
            size,
            args.batch,
            rank,
            compile_rows=not args.no_compile,
            repeats=repeats,
            threads=args.threads,
        )
        print(f"| {size}x{size}, batch {args.batch} | vs dense |\n|---|---:|")
        for name, value in rows:
            shown = f"{value:.2f}x" if isinstance(value, float) else value
            print(f"| {name} | {shown} |")
        print()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
