"""Search cost at scale: the whole search in dense validation passes, its phases, its memory.

Each model is a transformers causal LM built from its config (random weights, nothing
downloaded) over byte-level standard-library text (``StdlibBytesDataModule``: 8 x 128
tokens per validation batch), wrapped in a LightningModule that logs ``val_loss``. The
search is the callback a user would write::

    SketchTuneCallback(LayerConfig(<attention and MLP projections>, "auto"),
                       monitor="val_loss", mode="min", max_accuracy_drop="20%",
                       n_trials=8, run_on="validate")

One process per model (so peak memory is its own). Printed per model: parameters, one
dense ``Trainer.validate`` pass in seconds (the unit: what a user pays per trial at
least), the whole search (from the start of the baseline to the kept plan) in seconds
and in dense validation passes, the share of each phase (baseline and statistics,
planner, trials, confirmation, as the search reports them), peak resident memory
(sampled every 20 ms): a dense validation pass's own peak over the loaded model, the
search's peak over the loaded model (against the target, 1.5x the fp32 weights + 96
MiB) and over the validation pass's peak (what tuning adds to the process's peak), and
the plan kept.

Usage::

    python benchmarks/search_cost.py                    # LLaMA 2/4/8/16 x 256, GPT-2 small
    python benchmarks/search_cost.py --depth 4 --hidden 512 --trials 8
    python benchmarks/search_cost.py --only llama --depths 2 4
    python benchmarks/search_cost.py --depth 8 --forms auto auto+int8   # with int8 forms
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

BLOCK = 128
VAL_BATCHES = 32


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The peak resident memory while the ``with`` block runs (sampled)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build(kind: str, depth: int, hidden: int) -> tuple[Any, list[str]]:
    from lightning.pytorch import LightningModule
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=BLOCK))  # GPT-2 small's defaults
        names = [r"model\.transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"]
    else:
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3 // 32 * 32,
            num_hidden_layers=depth,
            num_attention_heads=max(1, hidden // 64),
            num_key_value_heads=max(1, hidden // 64),
            max_position_embeddings=BLOCK,
        )
        model = LlamaForCausalLM(config)
        names = [r"model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"]

    class CausalLM(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.model(input_ids=tokens).logits
            return out

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            (window,) = batch
            logits = self(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
            self.log("val_loss", loss)

        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return self(batch[0][:, :-1])

    return CausalLM().eval(), names


def one(kind: str, depth: int, hidden: int, trials: int, forms: str = "auto") -> dict[str, Any]:
    """Run one model's search in this process; the row of the table."""
    warnings.filterwarnings("ignore")
    from lightning.pytorch import Trainer, seed_everything

    from sketchtune import LayerConfig, SketchTuneCallback
    from sketchtune._memory import release_freed_memory
    from sketchtune.examples.text import StdlibBytesDataModule

    seed_everything(0)
    torch.set_num_threads(torch.get_num_threads())
    module, names = build(kind, depth, hidden)
    params = sum(p.numel() for p in module.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    data = StdlibBytesDataModule(block=BLOCK, eval_batch_size=8, eval_blocks=8 * VAL_BATCHES)
    quiet: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    Trainer(**quiet).validate(module, data, verbose=False)  # warm: data, allocator, kernels
    release_freed_memory()
    loaded = rss_bytes()
    with PeakRSS() as dense_peak:  # what a dense validation pass itself peaks at
        start = time.perf_counter()
        Trainer(**quiet).validate(module, data, verbose=False)
        dense_val = time.perf_counter() - start

    callback = SketchTuneCallback(
        LayerConfig(names[0], forms),
        monitor="val_loss",
        mode="min",
        max_accuracy_drop="20%",
        n_trials=trials,
        run_on="validate",
        metric_range=None,
        seed=0,
    )
    release_freed_memory()
    before = rss_bytes()
    with PeakRSS() as peak:
        start = time.perf_counter()
        Trainer(**quiet, callbacks=[callback]).validate(module, data, verbose=False)
        search = time.perf_counter() - start
    tuner = callback.tuner
    assert tuner is not None
    phases = {p.name: p.elapsed for p in getattr(tuner, "phases", [])}
    kept = callback.best_plan or {}
    return {
        "model": ("GPT-2 small" if kind == "gpt2" else f"LLaMA {depth}x{hidden}")
        + ("" if forms == "auto" else f", {forms}"),
        "params": params,
        "weights_mib": weight_bytes / 2**20,
        "dense_val_s": dense_val,
        "search_s": search,
        "passes": search / dense_val,
        "phases": {k: v / search for k, v in phases.items()},
        "rss_added_mib": (peak.peak - before) / 2**20,
        # the search's peak over a dense validation pass's own peak: what tuning adds to
        # the process's peak (a validation pass of an LM holds its logits, for one)
        "rss_over_val_mib": (peak.peak - dense_peak.peak) / 2**20,
        "val_peak_mib": (dense_peak.peak - loaded) / 2**20,
        "rss_bound_mib": 1.5 * weight_bytes / 2**20 + 96,
        "kept": len(kept),
        "speedup": callback.best_speedup,
    }


def table(rows: list[dict[str, Any]]) -> str:
    names = ["baseline", "planner", "trials", "confirmation"]
    lines = [
        "| model | params | dense val | search | in val passes | "
        + " | ".join(names)
        + " | a val pass's own peak | search's peak added (bound) | over a val pass's peak "
        "| kept | speedup |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shares = " | ".join(
            f"{100 * r['phases'][n]:.0f}%" if n in r["phases"] else "-" for n in names
        )
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['dense_val_s']:.2f} s | "
            f"{r['search_s']:.0f} s | {r['passes']:.1f} | {shares} | "
            f"+{r['val_peak_mib']:.0f} MiB | +{r['rss_added_mib']:.0f} MiB ({r['rss_bound_mib']:.0f}) "
            f"| {r['rss_over_val_mib']:+.0f} MiB | {r['kept']} layers | "
            f"{speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["llama", "gpt2"], nargs="*", default=["llama", "gpt2"])
    parser.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--depth", type=int, help="one LLaMA depth (overrides --depths)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--forms",
        choices=["auto", "auto+int8"],
        nargs="*",
        default=["auto"],
        help="the params of the search: 'auto' (low-rank forms) and/or 'auto+int8'",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print JSON
    args = parser.parse_args()
    if args.one:
        kind, depth, hidden, forms = args.one.split(":")
        row = one(kind, int(depth), int(hidden), args.trials, forms)
        print("ROW " + json.dumps(row), flush=True)
        return
    jobs = []
    if "llama" in args.only:
        depths = [args.depth] if args.depth else args.depths
        jobs.extend(f"llama:{d}:{args.hidden}:{f}" for d in depths for f in args.forms)
    if "gpt2" in args.only:
        jobs.extend(f"gpt2:12:768:{f}" for f in args.forms)
    rows = []
    for job in jobs:
        done = subprocess.run(
            [sys.executable, __file__, "--one", job, "--trials", str(args.trials)],
            capture_output=True,
            text=True,
            check=False,
        )
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            print(f"{job} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(found[0]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.trials} trials")
    print(table(rows))


if __name__ == "__main__":
    main()
