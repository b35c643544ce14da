"""Why a speedup timed on a busy machine is high: per-batch times of the main job's model.

The main job's dense MLP (64 -> 1024 x 3 -> 10) and a plan like the one it keeps
(``net.0``, ``net.3``, ``net.6`` at low rank 12, SVD-initialized) are timed as the
callback times them: 20 batches of 256 samples, slices sized to 50 ms of the dense model,
interleaved rounds whose order alternates. This is done quietly and then beside ``--busy``
processes spinning on the CPUs. Per condition the table gives the median per-batch time of
each model, the speedup (median of per-round wall-clock ratios), the same from process CPU
time, this process's CPU seconds per wall second during each model's slices, and the share
of the CPUs other processes took, as sketchtune's meter reads it. Each condition is run
``--repeats`` times.

Usage::

    python benchmarks/under_load.py [--busy 2] [--rounds 9] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
import time

import torch
from torch import nn

from sketchtune._search._contention import CpuMeter
from sketchtune.examples.digits import DigitsMLP
from sketchtune.nn import SKLinear

_SLICE_SECONDS = 0.05


def _spin() -> None:
    while True:
        pass


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = DigitsMLP(hidden=1024, depth=3).eval()
    tuned = copy.deepcopy(dense)
    for name in ("net.0", "net.3", "net.6"):
        parent, attr = name.rsplit(".", 1)
        holder = tuned.get_submodule(parent)
        layer = getattr(holder, attr)
        setattr(holder, attr, SKLinear.from_dense(layer, num_terms=1, low_rank=12, init="svd"))
    return dense, tuned


def _slice(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float, list[float]]:
    """Wall seconds, process CPU seconds and per-batch wall seconds of one slice."""
    per_batch = []
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            begin = time.perf_counter()
            model(batch)
            per_batch.append(time.perf_counter() - begin)
    return time.perf_counter() - wall, time.process_time() - cpu, per_batch


def measure(rounds: int) -> dict[str, float]:
    dense, tuned = models()
    batches = [torch.randn(256, 64) for _ in range(20)]
    with torch.inference_mode():
        for _ in range(3):
            dense(batches[0])
            tuned(batches[0])
    size = max(1, min(20, round(_SLICE_SECONDS / _slice(dense, batches[-1:])[0])))
    meter = CpuMeter()
    before = meter.read()
    timed: dict[bool, list[tuple[float, float, list[float]]]] = {True: [], False: []}
    for index in range(rounds):
        start = index * size % len(batches)
        chosen = [batches[(start + i) % len(batches)] for i in range(size)]
        for dense_turn in (True, False) if index % 2 == 0 else (False, True):
            timed[dense_turn].append(_slice(dense if dense_turn else tuned, chosen))
    others = meter.others_share(before, meter.read())

    def ratio(clock: str) -> float:
        pairs = zip(timed[True], timed[False], strict=True)
        if clock == "wall":
            return statistics.median(d[0] / t[0] for d, t in pairs)
        return statistics.median(d[1] / t[1] for d, t in pairs)

    def batch_ms(runs: list[tuple[float, float, list[float]]]) -> float:
        return statistics.median(b for run in runs for b in run[2]) * 1e3

    def cpu_per_wall(runs: list[tuple[float, float, list[float]]]) -> float:
        return statistics.median(run[1] / run[0] for run in runs)

    return {
        "dense_ms": batch_ms(timed[True]),
        "tuned_ms": batch_ms(timed[False]),
        "wall": ratio("wall"),
        "cpu": ratio("cpu"),
        "dense_cpu": cpu_per_wall(timed[True]),
        "tuned_cpu": cpu_per_wall(timed[False]),
        "others": others,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="CPU-spinning processes")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for busy in (0, args.busy):
        spinners = [mp.Process(target=_spin, daemon=True) for _ in range(busy)]
        for proc in spinners:
            proc.start()
        time.sleep(0.3 if busy else 0.0)
        try:
            rows += [(busy, measure(args.rounds)) for _ in range(args.repeats)]
        finally:
            for proc in spinners:
                proc.terminate()
    print(
        f"\nMain job's MLP, dense vs low rank 12 on its three hidden layers, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds\n"
    )
    print(
        "| busy loops | dense ms/batch | sketched ms/batch | speedup (wall) | speedup (CPU time) "
        "| CPU s per wall s, dense | CPU s per wall s, sketched | others' CPU share |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for busy, r in rows:
        print(
            f"| {busy} | {r['dense_ms']:.2f} | {r['tuned_ms']:.2f} | {r['wall']:.2f}x "
            f"| {r['cpu']:.2f}x | {r['dense_cpu']:.2f} | {r['tuned_cpu']:.2f} "
            f"| {r['others']:.0%} |"
        )


if __name__ == "__main__":
    main()
