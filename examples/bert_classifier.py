"""A transformers BERT classifier: train -> tune -> recover -> test.

``BertForSequenceClassification(BertConfig(...))`` built from a small config (hidden 256,
feed-forward 1024, 2 layers, 4 heads; nothing downloaded) reads scikit-learn's 8x8
digits as 65-token sequences (``[CLS]`` then the 64 pixel intensities, row by row) and
classifies them. Split 60/20/20 into train / validation / test with a fixed seed.

1. ``trainer.fit`` trains it and, when training ends, ``SketchTuneCallback`` tunes the
   encoder's 12 Linear layers (query/key/value, attention output, intermediate, output)
   on the validation split: ``strategy="global"``, measured speed at 16 x 65 tokens, at
   most 1 point of validation accuracy lost. The callback reports the dense and tuned
   models' test accuracy.
2. A short recovery: ``trainer.fit`` again on the sketched model at a lower learning rate.
3. ``trainer.test`` on the held-out test split.

    python examples/bert_classifier.py           # about 10 minutes on 2 CPU cores
    python examples/bert_classifier.py --quick   # a smoke run: a narrow model, 3 trials
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning.pytorch import seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.text import BertDigitsClassifier, DigitTokensDataModule
from sketchtune.examples.workflow import Outcome, quiet_trainer_args, run_workflow

#: the encoder's Linear layers; the pooler and classifier see one token per sequence
ENCODER = {"type": "Linear", "pattern": r"model\.bert\.encoder\.layer\.\d+\..*"}


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/bert_classifier")
    parser.add_argument("--quick", action="store_true", help="a narrow model, 3 trials")
    args = parser.parse_args(argv)
    out = Path(args.out)
    quiet = quiet_trainer_args(out)
    if args.quick:
        args.hidden, args.layers, args.epochs, args.trials, args.recovery_epochs = 64, 2, 1, 3, 1
        quiet.update(limit_train_batches=4, limit_val_batches=3, limit_test_batches=3)

    seed_everything(0, workers=True)
    data = DigitTokensDataModule(batch_size=32, eval_batch_size=16)
    model = BertDigitsClassifier(hidden=args.hidden, layers=args.layers, heads=4)
    tuner = SketchTuneCallback(
        LayerConfig(ENCODER, "auto"),
        monitor="val_acc",
        max_accuracy_drop=0.01,
        n_trials=args.trials,
        strategy="global",
        speed="measure",
        speed_batches=3 if args.quick else 12,
        warmup_batches=1 if args.quick else 3,
        seed=0,
        output_dir=str(out),
    )

    return run_workflow(
        f"BERT {args.layers}x{args.hidden} / digits",
        model,
        data,
        tuner,
        ENCODER,
        key="acc",
        epochs=args.epochs,
        recovery_lr=args.recovery_lr,
        recovery={"max_epochs": args.recovery_epochs},
        quiet=quiet,
        example_input=lambda batch: batch[0],
    )


if __name__ == "__main__":
    main()
