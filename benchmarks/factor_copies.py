"""What SKLinear's per-call concatenation of its factors costs at inference.

``SKLinear`` multiplies by its factors concatenated in each call (``[S1 | U2]`` and
``[U1 ; S2]``), so that writes through ``.data`` always reach the next forward. This
times, interleaved and side by side in one run, for 1024x1024 and 4096x4096 layers at
batch 256: the dense layer, ``SKLinear`` itself, the same two products on
concatenations made once beforehand (what a cache would give), and the four narrow
products without any concatenation. Median of ``--repeats`` rounds, each round calling
every variant ``--calls`` times in turn.

Usage::

    python benchmarks/factor_copies.py [--repeats 15] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sketchtune.nn import SKLinear


def variants(size: int, rank: int) -> dict[str, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    dense = torch.nn.Linear(size, size)
    layer = SKLinear.from_dense(dense, num_terms=1, low_rank=rank, init="svd", seed=0)
    x = torch.randn(256, size)
    s1, s2, u1, u2 = (t.detach() for t in (layer.S1, layer.S2, layer.U1, layer.U2))
    bias, scale = dense.bias.detach(), layer._scale
    left, right = torch.cat([s1, u2], dim=1), torch.cat([u1, s2])
    return {
        "dense": lambda: dense(x),
        "SKLinear": lambda: layer(x),
        "concatenated once": lambda: torch.addmm(bias, x @ left, right, alpha=scale),
        "four narrow products": lambda: torch.addmm(bias, x @ s1, u1, alpha=scale).addmm_(
            x @ u2, s2, alpha=scale
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print(
        f"\nSKLinear inference, batch 256, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ms per call, median of {args.repeats} rounds\n"
    )
    names = list(variants(64, 4))
    print("| layer | rank k | " + " | ".join(names) + " | SKLinear / concatenated once |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for size, ranks in ((1024, (4, 8, 32)), (4096, (8, 64))):
        for rank in ranks:
            fns = variants(size, rank)
            times: dict[str, list[float]] = {name: [] for name in fns}
            with torch.inference_mode():
                for fn in fns.values():
                    for _ in range(5):
                        fn()
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        begin = time.perf_counter()
                        for _ in range(args.calls):
                            fn()
                        times[name].append((time.perf_counter() - begin) / args.calls * 1e3)
            ms = {name: statistics.median(values) for name, values in times.items()}
            cells = " | ".join(f"{ms[name]:.3f}" for name in names)
            ratio = ms["SKLinear"] / ms["concatenated once"]
            print(f"| {size}x{size} | {rank} | {cells} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
