"""Saving and restoring the train/eval mode of every submodule of a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "preserve_modes", "restore_modes", "save_modes"]


def save_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """The ``training`` flag of ``model`` and of each of its submodules."""
    return {module: module.training for module in model.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Put back flags saved by :func:`save_modes` (modules added since are left alone)."""
    for module, training in modes.items():
        module.training = training


@contextmanager
def preserve_modes(model: nn.Module) -> Iterator[None]:
    """Every submodule's ``training`` flag is as it was when the block exits, even on errors."""
    modes = save_modes(model)
    try:
        yield
    finally:
        restore_modes(modes)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; the previous flags are restored afterwards."""
    with preserve_modes(model):
        model.eval()
        yield
