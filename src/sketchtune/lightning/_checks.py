"""Argument checks of :class:`~sketchtune.lightning.SketchTuneCallback` that need no Trainer."""

from __future__ import annotations

import os
from typing import Any

from sketchtune._redact import redact
from sketchtune._validation import check_float

__all__ = ["check_range", "check_writable", "without_password"]


def without_password(storage: str) -> str:
    """``storage`` without its password (``user:***@`` and ``password=***`` dropped): what to write."""
    head, qmark, query = str(redact(storage)).replace(":***@", "@", 1).partition("?")
    kept = [part for part in query.split("&") if part and not part.endswith("=***")]
    return head + (qmark + "&".join(kept) if kept else "")


def check_range(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"`metric_range` must be (low, high) or None, got {value!r}.")
    low = check_float("metric_range[0]", value[0])
    high = check_float("metric_range[1]", value[1])
    if low >= high:
        raise ValueError(f"`metric_range` must have low < high, got {value!r}.")
    return (low, high)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` and write a file in it now, so a bad ``output_dir`` fails before training."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".sketchtune-write-check")
        with open(probe, "w", encoding="utf-8") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ValueError(
            f"`output_dir`={os.fspath(folder)!r} cannot be written ({exc.strerror or exc}); "
            "give a folder this process can create and write, or output_dir=None."
        ) from None
