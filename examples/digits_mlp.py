"""The main job: train a wide MLP on the digits, then tune its Linear layers with SketchTuneCallback.

Runs on a laptop CPU in a few minutes, downloads nothing (scikit-learn ships the
data), and ends with a dense-vs-tuned table plus ``results.csv``, ``plan.json``,
``summary.md``, ``pareto.png`` and ``history.png`` in ``--out``.

    python examples/digits_mlp.py                 # full run
    python examples/digits_mlp.py --quick         # a smoke run in seconds

The same job from a LightningCLI config: ``sketchtune fit --config examples/digits_mlp.yaml``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.digits import DigitsDataModule, DigitsMLP


def main(argv: list[str] | None = None) -> SketchTuneCallback:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--out", default="runs/digits_mlp")
    parser.add_argument(
        "--quick", action="store_true", help="2 epochs, 4 trials: checks that it runs"
    )
    args = parser.parse_args(argv)
    epochs, trials = (2, 4) if args.quick else (args.epochs, args.trials)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(0, workers=True)
    tuner = SketchTuneCallback(
        LayerConfig(r"net\.\d+", "auto"),  # every Linear: rank and init searched per layer
        monitor="val_acc",
        max_accuracy_drop=0.01,  # keep accuracy within 1 point of the dense model
        n_trials=trials,
        strategy="global",
        storage=f"sqlite:///{out / 'study.db'}",
        study_name=f"digits_mlp-{time.strftime('%Y%m%d-%H%M%S')}",
        speed_batches=20,
        seed=0,
        output_dir=str(out),
    )
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[tuner],
        default_root_dir=str(out),
        logger=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    trainer.fit(DigitsMLP(), DigitsDataModule())
    return tuner


if __name__ == "__main__":
    main()
