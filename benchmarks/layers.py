"""Sketched layers vs the dense layers they replace, measured side by side in one process.

Every row times the dense and the sketched module interleaved (dense, sketched,
dense, ...), after warm-up, and reports medians; the FLOP ratio is the
multiply-add count of the dense layer over the sketched one, so
``speedup / FLOP ratio`` says how much of the theoretical gain is realized.
Attention rows are followed by a peak-memory table (each point measured in a
fresh subprocess) showing memory growth with sequence length.

Usage::

    python benchmarks/layers.py            # full table (a few minutes on 2 cores)
    python benchmarks/layers.py --quick    # small sizes, a smoke run in seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sketchtune.measure import time_interleaved
from sketchtune.nn import RandMultiHeadAttention, SKConv2d, SKLinear


@dataclass
class Row:
    workload: str
    dense_ms: float
    sketch_ms: float
    flop_ratio: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sketch_ms


def _compare(
    name: str,
    dense: Callable[[], object],
    sketch: Callable[[], object],
    flop_ratio: float,
    repeats: int,
) -> Row:
    d, s = time_interleaved([dense, sketch], repeats=repeats, warmup=3)
    row = Row(name, statistics.median(d) * 1e3, statistics.median(s) * 1e3, flop_ratio)
    print(f"  measured {name}: {row.speedup:.2f}x", file=sys.stderr, flush=True)
    return row


def linear_rows(size: int, batch: int, configs: list[tuple[int, int]], repeats: int) -> list[Row]:
    torch.manual_seed(0)
    dense = nn.Linear(size, size)
    x = torch.randn(batch, size)
    rows = []
    with torch.inference_mode():
        for L, k in configs:
            sk = SKLinear.from_dense(dense, num_terms=L, low_rank=k, seed=0)
            ratio = size * size / (2 * L * k * 2 * size)
            rows.append(
                _compare(
                    f"SKLinear fwd {size}x{size}, batch {batch}, L={L} k={k}",
                    lambda: dense(x),
                    lambda sk=sk: sk(x),
                    ratio,
                    repeats,
                )
            )
    return rows


def linear_train_row(size: int, batch: int, L: int, k: int, repeats: int) -> Row:
    torch.manual_seed(0)
    dense = nn.Linear(size, size)
    sk = SKLinear.from_dense(dense, num_terms=L, low_rank=k, seed=0)
    x = torch.randn(batch, size)

    def step(module: nn.Module) -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    r = L * k
    sketch_macs = 2 * r * 2 * size + r * 3 * size  # forward + (grad_h1, grad_S1, grad_S2)
    return _compare(
        f"SKLinear fwd+bwd {size}x{size}, batch {batch}, L={L} k={k}",
        lambda: step(dense),
        lambda: step(sk),
        2 * size * size / sketch_macs,
        repeats,
    )


def conv_row(batch: int, channels: int, hw: int, L: int, k: int, repeats: int) -> Row:
    torch.manual_seed(0)
    dense = nn.Conv2d(channels, channels, 3, padding=1)
    sk = SKConv2d.from_dense(dense, num_terms=L, low_rank=k, seed=0)
    x = torch.randn(batch, channels, hw, hw)
    d_in = channels * 9
    ratio = d_in * channels / (2 * L * k * d_in + channels * 2 * L * k)
    with torch.inference_mode():
        return _compare(
            f"SKConv2d batch {batch}, {channels}->{channels}, 3x3, {hw}x{hw}, L={L} k={k}",
            lambda: dense(x),
            lambda: sk(x),
            ratio,
            repeats,
        )


def _attention_pair(embed: int, heads: int, m: int, kernel: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    sk = RandMultiHeadAttention.from_dense(
        dense, num_random_features=m, kernel_fn=kernel, seed=0
    ).eval()
    return dense, sk


def _attention_macs(n: int, embed: int, m: int, causal: bool, dense: bool) -> float:
    projections = 4 * n * embed * embed
    if dense:
        return projections + (1 if causal else 2) * n * n * embed
    # features of q and k, phi(K)^T V state, phi(Q) state (+ intra-chunk causal part, ignored)
    return projections + 4 * n * m * embed


def attention_row(
    batch: int, embed: int, heads: int, m: int, seq: int, kernel: str, causal: bool, repeats: int
) -> Row:
    dense, sk = _attention_pair(embed, heads, m, kernel)
    x = torch.randn(batch, seq, embed)
    mask = nn.Transformer.generate_square_subsequent_mask(seq) if causal else None
    name = f"RandMHA {kernel}{' causal' if causal else ''}, batch {batch}, E={embed}, {heads} heads, m={m}, seq {seq}"
    with torch.inference_mode():
        return _compare(
            name,
            lambda: dense(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal),
            lambda: sk(x, x, x, need_weights=False, is_causal=causal),
            _attention_macs(seq, embed, m, causal, True)
            / _attention_macs(seq, embed, m, causal, False),
            repeats,
        )


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_probe(kind: str, seq: int, causal: bool) -> None:
    """Runs in a subprocess: print the peak RSS growth (MiB) of one attention forward.

    Inputs (and the dense layer's causal mask) are allocated first; then the
    kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, Linux), so the
    peak counts only what the forward itself holds at once.
    """
    dense, sk = _attention_pair(256, 4, 64, "softmax")
    x = torch.randn(4, seq, 256)
    mask = (
        nn.Transformer.generate_square_subsequent_mask(seq) if causal and kind == "dense" else None
    )
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident set size
    before = _rss_kib("VmRSS")
    with torch.inference_mode():
        if kind == "dense":
            dense(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
        else:
            sk(x, x, x, need_weights=False, is_causal=causal)
    print((_rss_kib("VmHWM") - before) / 1024)


def memory_table(seqs: list[int]) -> list[tuple[str, int, float]]:
    rows = []
    for causal in (False, True):
        for kind in ("dense", "sketch"):
            for seq in seqs:
                out = subprocess.run(
                    [sys.executable, __file__, "--probe", kind, str(seq), str(int(causal))],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                label = f"{'nn.MultiheadAttention' if kind == 'dense' else 'RandMultiHeadAttention'}{' causal' if causal else ''}"
                rows.append((label, seq, float(out.stdout.strip().splitlines()[-1])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (smoke run)"
    )
    parser.add_argument(
        "--probe", nargs=3, metavar=("KIND", "SEQ", "CAUSAL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.probe:
        _memory_probe(args.probe[0], int(args.probe[1]), bool(int(args.probe[2])))
        return

    repeats = 3 if args.quick else 21
    rows: list[Row] = []
    if args.quick:
        rows += linear_rows(256, 32, [(1, 16)], repeats)
        rows.append(linear_train_row(256, 32, 1, 16, repeats))
        rows.append(conv_row(2, 32, 8, 1, 4, repeats))
        for causal in (False, True):
            rows.append(attention_row(1, 32, 2, 16, 256, "softmax", causal, repeats))
        seqs = [256, 512]
    else:
        rows += linear_rows(4096, 256, [(1, 64), (2, 32), (4, 16)], repeats)
        rows += linear_rows(1024, 256, [(1, 32)], repeats)
        rows.append(linear_train_row(4096, 256, 1, 64, repeats))
        rows.append(conv_row(32, 256, 32, 1, 16, repeats))
        for seq in (1024, 4096):
            for kernel, causal in (("relu", False), ("softmax", False), ("softmax", True)):
                rows.append(attention_row(4, 256, 4, 64, seq, kernel, causal, repeats))
        seqs = [1024, 2048, 4096, 8192]

    print(
        f"\nMachine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32, eval forward unless noted; "
        f"median of {repeats} interleaved runs after 3 warm-up rounds.\n"
    )
    print("| workload | dense ms | sketched ms | speedup | FLOP ratio | speedup / FLOP ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.workload} | {r.dense_ms:.2f} | {r.sketch_ms:.2f} | {r.speedup:.2f}x | "
            f"{r.flop_ratio:.1f}x | {r.speedup / r.flop_ratio:.2f} |"
        )
    print("\nPeak memory growth of one attention forward (MiB, fresh process per point):\n")
    mem = memory_table(seqs)
    print("| layer | " + " | ".join(f"seq {s}" for s in seqs) + " |")
    print("|---|" + "---:|" * len(seqs))
    for label in dict.fromkeys(r[0] for r in mem):
        values = [f"{v:.0f}" for (lab, _, v) in mem if lab == label]
        print(f"| {label} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
