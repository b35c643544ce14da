"""A transformers GPT-2 language model: train -> tune -> recover -> test.

``GPT2LMHeadModel(GPT2Config(...))`` built from a small config (bytes as tokens, n_embd
256, 4 layers, 4 heads, context 128; nothing downloaded) learns to continue the Python
standard library's own source files (``Lib/*.py`` of the interpreter running it); whole
files are held out: every 10th file is validation, the next one test.

1. ``trainer.fit`` trains it and, when training ends, ``SketchTuneCallback`` tunes the
   blocks' 16 ``Conv1D`` layers (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
   ``mlp.c_proj``) on the validation split: ``strategy="global"``, measured speed at
   8 x 128 tokens, ``monitor="val_loss"`` (``mode="min"``) at most 1% higher (relative).
   ``lm_head`` is tied to the embedding and stays dense. The callback reports the dense
   and tuned models' test loss.
2. A short recovery: ``trainer.fit`` again on the sketched model at a lower learning rate.
3. ``trainer.test`` on the held-out test files (loss in nats per byte; perplexity = exp).

    python examples/gpt2_lm.py           # about 10 minutes on 2 CPU cores
    python examples/gpt2_lm.py --quick   # a smoke run: a narrow model, 3 trials
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning.pytorch import seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.text import GPT2ByteLM, StdlibBytesDataModule
from sketchtune.examples.workflow import Outcome, quiet_trainer_args, run_workflow

#: the blocks' Conv1D layers (attention in and out projections, MLP)
BLOCKS = r"model\.transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)"


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-blocks", type=int, default=2048)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--recovery-blocks", type=int, default=512)
    parser.add_argument("--recovery-lr", type=float, default=2e-4)
    parser.add_argument("--out", default="runs/gpt2_lm")
    parser.add_argument("--quick", action="store_true", help="a narrow model, 3 trials")
    args = parser.parse_args(argv)
    out = Path(args.out)
    quiet = quiet_trainer_args(out)
    if args.quick:
        args.n_embd, args.layers, args.trials = 64, 2, 3
        quiet.update(limit_train_batches=4, limit_val_batches=3, limit_test_batches=3)

    # the recovery reads a few hundred windows (a quick run's limits stay as they are)
    recovery: dict[str, Any] = {"max_epochs": 1}
    if not args.quick:
        recovery["limit_train_batches"] = args.recovery_blocks // 16
    seed_everything(0, workers=True)
    data = StdlibBytesDataModule(block=128, batch_size=16, train_blocks=args.train_blocks)
    model = GPT2ByteLM(n_embd=args.n_embd, n_layer=args.layers, n_head=4, block=128)
    tuner = SketchTuneCallback(
        LayerConfig(BLOCKS, "auto"),
        monitor="val_loss",
        mode="min",
        max_accuracy_drop="1%",
        metric_range=None,  # a loss has no upper bound
        n_trials=args.trials,
        strategy="global",
        speed="measure",
        speed_batches=3 if args.quick else 12,
        warmup_batches=1 if args.quick else 3,
        seed=0,
        output_dir=str(out),
    )

    return run_workflow(
        f"GPT-2 {args.layers}x{args.n_embd} / stdlib bytes",
        model,
        data,
        tuner,
        BLOCKS,
        key="loss",
        epochs=args.epochs,
        recovery_lr=args.recovery_lr,
        recovery=recovery,
        quiet=quiet,
        example_input=lambda batch: batch[0][:, :-1],
    )


if __name__ == "__main__":
    main()
