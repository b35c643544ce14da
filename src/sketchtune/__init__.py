"""sketchtune: faster trained PyTorch models through sketched layers tuned with Optuna.

Public names are imported lazily, so ``import sketchtune.nn`` needs only torch,
and ``import sketchtune`` stays cheap until the tuner or the Lightning
integration is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "RandMultiHeadAttention": "sketchtune.nn.attention",
    "SKConv2d": "sketchtune.nn.conv",
    "SKLinear": "sketchtune.nn.linear",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from sketchtune.nn.attention import RandMultiHeadAttention
    from sketchtune.nn.conv import SKConv2d
    from sketchtune.nn.linear import SKLinear


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sketchtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
