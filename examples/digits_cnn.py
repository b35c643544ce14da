"""A CNN on the digits upsampled to 32x32: tune its 3x3 convolutions (SKConv2d).

python examples/digits_cnn.py            # trains, tunes, writes runs/digits_cnn/
python examples/digits_cnn.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.digits import DigitsCNN, DigitsDataModule


def main(argv: list[str] | None = None) -> SketchTuneCallback:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--out", default="runs/digits_cnn")
    parser.add_argument("--quick", action="store_true", help="a few batches, 1 epoch, 3 trials")
    args = parser.parse_args(argv)
    epochs, trials = (1, 3) if args.quick else (args.epochs, args.trials)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(0, workers=True)
    tuner = SketchTuneCallback(
        # the three widest convolutions; the first one (1 input channel) is already cheap
        LayerConfig({"type": "Conv2d", "pattern": r"features\.[468]"}, "auto"),
        monitor="val_acc",
        max_accuracy_drop=0.01,
        n_trials=trials,
        strategy="global",
        storage=f"sqlite:///{out / 'study.db'}",
        study_name=f"digits_cnn-{time.strftime('%Y%m%d-%H%M%S')}",
        speed_batches=2 if args.quick else 5,
        warmup_batches=1 if args.quick else 2,
        seed=0,
        output_dir=str(out),
    )
    limits = {"limit_train_batches": 4, "limit_val_batches": 2} if args.quick else {}
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[tuner],
        default_root_dir=str(out),
        logger=False,
        enable_checkpointing=False,
        deterministic=True,
        **limits,  # type: ignore[arg-type]
    )
    model = DigitsCNN(width=32)  # quick runs too: narrower convolutions never pay for a sketch
    trainer.fit(model, DigitsDataModule(image_size=32, predict_batch_size=128))
    return tuner


if __name__ == "__main__":
    main()
