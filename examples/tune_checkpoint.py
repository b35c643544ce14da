"""Tune an already trained model: checkpoint in, sketched checkpoint out, reloaded and used.

1. trains the digits MLP and saves ``trained.ckpt`` (skipped when it exists);
2. loads it, runs ``trainer.validate(model, datamodule)`` with
   ``SketchTuneCallback(run_on="validate")``, which tunes it, and saves ``tuned.ckpt``;
3. rebuilds the sketched model from ``tuned.ckpt`` with ``SketchedModule`` on a fresh
   dense model (no callback involved) and predicts with it;
4. goes on training the sketched model from ``tuned.ckpt`` (``trainer.fit(..., ckpt_path=)``:
   the plan is rebuilt before the weights load; the optimizer starts fresh).

    python examples/tune_checkpoint.py [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchedModule, SketchTuneCallback
from sketchtune.examples.digits import DigitsDataModule, DigitsMLP


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/tune_checkpoint")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    limits = {"limit_train_batches": 4} if args.quick else {}
    seed_everything(0, workers=True)
    data = DigitsDataModule()

    trained = out / "trained.ckpt"
    if not trained.exists():
        trainer = Trainer(max_epochs=2 if args.quick else 20, deterministic=True, **quiet, **limits)  # type: ignore[arg-type]
        trainer.fit(DigitsMLP(), data)
        trainer.save_checkpoint(trained)
        print(f"trained and saved {trained}")

    model = DigitsMLP.load_from_checkpoint(trained)
    tuner = SketchTuneCallback(
        LayerConfig(r"net\.\d+", "auto"),
        run_on="validate",
        max_accuracy_drop=0.01,
        n_trials=4 if args.quick else 40,
        speed_batches=3 if args.quick else 20,
        seed=0,
        output_dir=str(out),
    )
    trainer = Trainer(callbacks=[tuner], deterministic=True, **quiet)
    (metrics,) = trainer.validate(model, data)  # tunes first, then validates the tuned model
    tuned_path = out / "tuned.ckpt"
    trainer.save_checkpoint(tuned_path)
    print(
        f"tuned val_acc {metrics['val_acc']:.4f}; saved {tuned_path} with plan {tuner.best_plan!r}"
    )

    reloaded = SketchedModule.load_from_checkpoint(tuned_path, module=DigitsMLP())
    labels = torch.cat(Trainer(**quiet).predict(reloaded, data))  # type: ignore[arg-type]
    data.setup("predict")
    assert data.val_set is not None
    accuracy = float((labels == data.val_set.tensors[1]).float().mean())
    print(f"reloaded from {tuned_path} without the callback: prediction accuracy {accuracy:.4f}")

    resumed = SketchedModule(DigitsMLP())
    trainer = Trainer(max_epochs=1, deterministic=True, **quiet, **limits)  # type: ignore[arg-type]
    trainer.fit(resumed, data, ckpt_path=tuned_path)
    print(
        f"trained the sketched model on from {tuned_path}: val_acc {trainer.callback_metrics['val_acc']:.4f}"
    )
    return accuracy


if __name__ == "__main__":
    main()
