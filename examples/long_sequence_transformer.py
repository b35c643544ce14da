"""A Transformer encoder on 1024-token sequences: tune its attention (RandMultiHeadAttention).

The task (generated, no downloads): does marker token 1 occur more often than
marker token 2? Both encoder layers' self-attention are candidates for
random-feature attention, linear in the sequence length.

    python examples/long_sequence_transformer.py            # trains, tunes, writes runs/long_sequence/
    python examples/long_sequence_transformer.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.sequences import MajorityDataModule, TransformerClassifier


def main(argv: list[str] | None = None) -> SketchTuneCallback:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--out", default="runs/long_sequence")
    parser.add_argument(
        "--quick", action="store_true", help="short sequences, a few batches, 3 trials"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    seed_everything(0, workers=True)
    tuner = SketchTuneCallback(
        LayerConfig(
            {"type": "MultiheadAttention"},
            {"num_random_features": [16, 32, 64, 128], "kernel_fn": ["softmax", "relu"]},
        ),
        monitor="val_acc",
        max_accuracy_drop=0.01,
        n_trials=3 if quick else args.trials,
        strategy="global",
        storage=f"sqlite:///{out / 'study.db'}",
        study_name=f"long_sequence-{time.strftime('%Y%m%d-%H%M%S')}",
        speed_batches=2 if quick else 8,
        warmup_batches=1 if quick else 2,
        seed=0,
        output_dir=str(out),
    )
    limits = {"limit_train_batches": 4, "limit_val_batches": 2} if quick else {}
    trainer = Trainer(
        max_epochs=1 if quick else args.epochs,
        callbacks=[tuner],
        default_root_dir=str(out),
        logger=False,
        enable_checkpointing=False,
        deterministic=True,
        **limits,  # type: ignore[arg-type]
    )
    data = MajorityDataModule(length=128 if quick else args.length, train_size=2048)
    trainer.fit(TransformerClassifier(), data)
    return tuner


if __name__ == "__main__":
    main()
