"""Sketched layers vs the dense layers they replace, measured side by side in one process.

Every row times the dense and the sketched module interleaved (dense, sketched,
dense, ...), after warm-up, and reports medians; the FLOP ratio is the
multiply-add count of the dense layer over the sketched one, so
``speedup / FLOP ratio`` says how much of the theoretical gain is realized.
Attention rows are followed by a peak-memory table showing memory growth with
sequence length (on the CPU each point runs in a fresh subprocess and reads the
peak RSS; on CUDA it reads the allocator's peak).

On an accelerator every timed call is synchronized (CUDA events, see
``sketchtune.measure.time_interleaved``) after a warm-up that covers lazy
initialization, cuDNN autotuning and compilation.

Usage::

    python benchmarks/layers.py            # full table (a few minutes on 2 cores)
    python benchmarks/layers.py --quick    # small sizes, a smoke run in seconds
    python benchmarks/layers.py --device cuda --dtype bfloat16            # batches 1/32/256
    python benchmarks/layers.py --device cuda --dtype float16 --compile   # + compiled rows
    python benchmarks/layers.py --quick --dtype bfloat16 --only SKLinear  # a few rows
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sketchtune.measure import time_interleaved
from sketchtune.nn import RandMultiHeadAttention, SKConv2d, SKLinear

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    workload: str
    dense_ms: float
    sketch_ms: float
    flop_ratio: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sketch_ms


@dataclass(frozen=True)
class Setup:
    """Where and how the rows run."""

    device: torch.device
    dtype: torch.dtype
    repeats: int
    compile: bool = False
    only: tuple[str, ...] = ()

    def wanted(self, name: str) -> bool:
        return not self.only or any(part in name for part in self.only)

    def place(self, module: nn.Module) -> nn.Module:
        return module.to(device=self.device, dtype=self.dtype)

    def tensor(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape).to(device=self.device, dtype=self.dtype)

    @property
    def timing_device(self) -> torch.device | None:
        return None if self.device.type == "cpu" else self.device


def _compare(
    setup: Setup,
    name: str,
    dense: Callable[[], object],
    sketch: Callable[[], object],
    flop_ratio: float,
) -> Row:
    d, s = time_interleaved(
        [dense, sketch], repeats=setup.repeats, warmup=3, device=setup.timing_device
    )
    row = Row(name, statistics.median(d) * 1e3, statistics.median(s) * 1e3, flop_ratio)
    print(f"  measured {name}: {row.speedup:.2f}x", file=sys.stderr, flush=True)
    return row


def _call(fn: Callable[..., object], *args: object, **kwargs: object) -> Callable[[], object]:
    return lambda: fn(*args, **kwargs)


def _variants(
    setup: Setup, name: str, dense: nn.Module, sketch: nn.Module
) -> Iterator[tuple[str, Callable[..., object], Callable[..., object]]]:
    """The eager pair, then (with ``--compile``) both modules compiled."""
    yield name, dense, sketch
    if setup.compile:
        yield f"{name}, compiled", torch.compile(dense), torch.compile(sketch)


def linear_rows(
    setup: Setup, size: int, batch: int, configs: list[tuple[int, int]]
) -> Iterator[Row]:
    torch.manual_seed(0)
    dense = setup.place(nn.Linear(size, size))
    x = setup.tensor(batch, size)
    for L, k in configs:
        base = f"SKLinear fwd {size}x{size}, batch {batch}, L={L} k={k}"
        if not setup.wanted(base):
            continue
        sk = SKLinear.from_dense(dense, num_terms=L, low_rank=k, seed=0)  # type: ignore[arg-type]
        ratio = size * size / (2 * L * k * 2 * size)
        for name, d, s in _variants(setup, base, dense, sk):
            with torch.inference_mode():
                row = _compare(setup, name, _call(d, x), _call(s, x), ratio)
            yield row


def linear_train_row(setup: Setup, size: int, batch: int, L: int, k: int) -> Iterator[Row]:
    name = f"SKLinear fwd+bwd {size}x{size}, batch {batch}, L={L} k={k}"
    if not setup.wanted(name):
        return
    torch.manual_seed(0)
    dense = setup.place(nn.Linear(size, size))
    sk = SKLinear.from_dense(dense, num_terms=L, low_rank=k, seed=0)  # type: ignore[arg-type]
    x = setup.tensor(batch, size)

    def step(module: nn.Module) -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    r = L * k
    sketch_macs = 2 * r * 2 * size + r * 3 * size  # forward + (grad_h1, grad_S1, grad_S2)
    yield _compare(
        setup, name, lambda: step(dense), lambda: step(sk), 2 * size * size / sketch_macs
    )


def conv_rows(setup: Setup, batch: int, channels: int, hw: int, L: int, k: int) -> Iterator[Row]:
    base = f"SKConv2d batch {batch}, {channels}->{channels}, 3x3, {hw}x{hw}, L={L} k={k}"
    if not setup.wanted(base):
        return
    torch.manual_seed(0)
    dense = setup.place(nn.Conv2d(channels, channels, 3, padding=1))
    sk = SKConv2d.from_dense(dense, num_terms=L, low_rank=k, seed=0)  # type: ignore[arg-type]
    x = setup.tensor(batch, channels, hw, hw)
    d_in = channels * 9
    ratio = d_in * channels / (2 * L * k * d_in + channels * 2 * L * k)
    for name, d, s in _variants(setup, base, dense, sk):
        with torch.inference_mode():
            row = _compare(setup, name, _call(d, x), _call(s, x), ratio)
        yield row


def _attention_pair(
    setup: Setup, embed: int, heads: int, m: int, kernel: str
) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = setup.place(nn.MultiheadAttention(embed, heads, batch_first=True)).eval()
    sk = RandMultiHeadAttention.from_dense(
        dense,  # type: ignore[arg-type]
        num_random_features=m,
        kernel_fn=kernel,
        seed=0,
    ).eval()
    return dense, sk


def _attention_macs(n: int, embed: int, m: int, causal: bool, dense: bool) -> float:
    projections = 4 * n * embed * embed
    if dense:
        return projections + (1 if causal else 2) * n * n * embed
    # features of q and k, phi(K)^T V state, phi(Q) state (+ intra-chunk causal part, ignored)
    return projections + 4 * n * m * embed


def attention_rows(
    setup: Setup, batch: int, embed: int, heads: int, m: int, seq: int, kernel: str, causal: bool
) -> Iterator[Row]:
    base = f"RandMHA {kernel}{' causal' if causal else ''}, batch {batch}, E={embed}, {heads} heads, m={m}, seq {seq}"
    if not setup.wanted(base):
        return
    dense, sk = _attention_pair(setup, embed, heads, m, kernel)
    x = setup.tensor(batch, seq, embed)
    mask = (
        nn.Transformer.generate_square_subsequent_mask(seq, device=setup.device, dtype=setup.dtype)
        if causal
        else None
    )
    ratio = _attention_macs(seq, embed, m, causal, True) / _attention_macs(
        seq, embed, m, causal, False
    )
    for name, d, s in _variants(setup, base, dense, sk):
        with torch.inference_mode():
            row = _compare(
                setup,
                name,
                _call(d, x, x, x, need_weights=False, attn_mask=mask, is_causal=causal),
                _call(s, x, x, x, need_weights=False, is_causal=causal),
                ratio,
            )
        yield row


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _attention_forward(setup: Setup, kind: str, seq: int, causal: bool) -> Callable[[], object]:
    dense, sk = _attention_pair(setup, 256, 4, 64, "softmax")
    x = setup.tensor(4, seq, 256)
    if kind == "dense":
        mask = (
            nn.Transformer.generate_square_subsequent_mask(
                seq, device=setup.device, dtype=setup.dtype
            )
            if causal
            else None
        )
        return lambda: dense(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
    return lambda: sk(x, x, x, need_weights=False, is_causal=causal)


def _memory_probe(kind: str, seq: int, causal: bool, dtype: str) -> None:
    """Runs in a subprocess: print the peak RSS growth (MiB) of one attention forward.

    Inputs (and the dense layer's causal mask) are allocated first; then the
    kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, Linux), so the
    peak counts only what the forward itself holds at once.
    """
    setup = Setup(torch.device("cpu"), _DTYPES[dtype], repeats=1)
    forward = _attention_forward(setup, kind, seq, causal)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident set size
    before = _rss_kib("VmRSS")
    with torch.inference_mode():
        forward()
    print((_rss_kib("VmHWM") - before) / 1024)


def _cuda_peak_mib(setup: Setup, kind: str, seq: int, causal: bool) -> float:
    forward = _attention_forward(setup, kind, seq, causal)
    torch.cuda.synchronize(setup.device)
    before = torch.cuda.memory_allocated(setup.device)
    torch.cuda.reset_peak_memory_stats(setup.device)
    with torch.inference_mode():
        forward()
    torch.cuda.synchronize(setup.device)
    return (torch.cuda.max_memory_allocated(setup.device) - before) / 2**20


def memory_table(setup: Setup, seqs: list[int]) -> list[tuple[str, int, float]]:
    rows = []
    dtype = str(setup.dtype).replace("torch.", "")
    for causal in (False, True):
        for kind in ("dense", "sketch"):
            for seq in seqs:
                if setup.device.type == "cuda":
                    peak = _cuda_peak_mib(setup, kind, seq, causal)
                else:
                    probe = ["--probe", kind, str(seq), str(int(causal)), "--dtype", dtype]
                    out = subprocess.run(
                        [sys.executable, __file__, *probe],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    peak = float(out.stdout.strip().splitlines()[-1])
                label = f"{'nn.MultiheadAttention' if kind == 'dense' else 'RandMultiHeadAttention'}{' causal' if causal else ''}"
                rows.append((label, seq, peak))
    return rows


def _default_rows(setup: Setup) -> Iterator[Row]:
    """Today's table: the sizes the README quotes."""
    yield from linear_rows(setup, 4096, 256, [(1, 64), (2, 32), (4, 16)])
    yield from linear_rows(setup, 4096, 256, [(1, 8)])
    yield from linear_rows(setup, 1024, 256, [(1, 32), (1, 8), (1, 4)])
    yield from linear_train_row(setup, 4096, 256, 1, 64)
    yield from conv_rows(setup, 32, 256, 32, 1, 16)
    for seq in (1024, 4096):
        for kernel, causal in (("relu", False), ("softmax", False), ("softmax", True)):
            yield from attention_rows(setup, 4, 256, 4, 64, seq, kernel, causal)


def _batch_rows(setup: Setup, batches: list[int]) -> Iterator[Row]:
    """The same layers at each batch size (attention at most 32 sequences of 1024)."""
    for batch in batches:
        yield from linear_rows(setup, 4096, batch, [(1, 64)])
        yield from linear_rows(setup, 1024, batch, [(1, 32)])
        yield from linear_train_row(setup, 4096, batch, 1, 64)
        yield from conv_rows(setup, batch, 256, 32, 1, 16)
    for batch in sorted({min(b, 32) for b in batches}):
        for kernel, causal in (("relu", False), ("softmax", False), ("softmax", True)):
            yield from attention_rows(setup, batch, 256, 4, 64, 1024, kernel, causal)
    for kernel, causal in (("softmax", False), ("softmax", True)):
        yield from attention_rows(setup, 4, 256, 4, 64, 4096, kernel, causal)


def _quick_rows(setup: Setup, batches: list[int] | None) -> Iterator[Row]:
    for batch in batches or [32]:
        yield from linear_rows(setup, 256, batch, [(1, 16)])
        yield from linear_train_row(setup, 256, batch, 1, 16)
    yield from conv_rows(setup, 2, 32, 8, 1, 4)
    for causal in (False, True):
        yield from attention_rows(setup, 1, 32, 2, 16, 256, "softmax", causal)


def _machine(setup: Setup) -> str:
    where = f"{platform.machine()} {os.cpu_count()} cores"
    if setup.device.type == "cuda":
        where += f", {torch.cuda.get_device_name(setup.device)}"
    return (
        f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{str(setup.dtype).replace('torch.', '')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (smoke run)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated batch sizes (default: the README's sizes on the CPU, 1,32,256 elsewhere)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd dense vs sketched"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="keep rows whose name contains TEXT (repeatable)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument(
        "--probe", nargs=3, metavar=("KIND", "SEQ", "CAUSAL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.probe:
        _memory_probe(args.probe[0], int(args.probe[1]), bool(int(args.probe[2])), args.dtype)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine.")
    batches = (
        [int(b) for b in args.batch_sizes.split(",")]
        if args.batch_sizes
        else (None if device.type == "cpu" else [1, 32, 256])
    )
    repeats = 3 if args.quick else 21
    setup = Setup(device, _DTYPES[args.dtype], repeats, args.compile, tuple(args.only))
    if args.quick:
        rows = list(_quick_rows(setup, batches))
        seqs = [256, 512]
    else:
        rows = list(_default_rows(setup) if batches is None else _batch_rows(setup, batches))
        seqs = [1024, 2048, 4096, 8192]

    print(
        f"\nMachine: {_machine(setup)}, eval forward unless noted; "
        f"median of {repeats} interleaved runs after 3 warm-up rounds.\n"
    )
    print("| workload | dense ms | sketched ms | speedup | FLOP ratio | speedup / FLOP ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.workload} | {r.dense_ms:.2f} | {r.sketch_ms:.2f} | {r.speedup:.2f}x | "
            f"{r.flop_ratio:.1f}x | {r.speedup / r.flop_ratio:.2f} |"
        )
    if args.no_memory or (args.only and not any("RandMHA" in r.workload for r in rows)):
        return
    where = "allocator peak" if device.type == "cuda" else "fresh process per point"
    print(f"\nPeak memory growth of one attention forward (MiB, {where}):\n")
    mem = memory_table(setup, seqs)
    print("| layer | " + " | ".join(f"seq {s}" for s in seqs) + " |")
    print("|---|" + "---:|" * len(seqs))
    for label in dict.fromkeys(r[0] for r in mem):
        values = [f"{v:.0f}" for (lab, _, v) in mem if lab == label]
        print(f"| {label} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
