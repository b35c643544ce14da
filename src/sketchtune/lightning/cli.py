"""The ``sketchtune`` console script: a LightningCLI with a ``sketch:`` section.

``sketchtune fit --config cfg.yaml`` trains the configured model and then tunes
it with the :class:`SketchTuneCallback` described by the config's ``sketch:``
section (every argument of the callback; see the README). Without a
``sketch:`` section it is a plain LightningCLI.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from sketchtune.lightning.callback import SketchTuneCallback

__all__ = ["SketchTuneCLI", "main"]


class SketchTuneCLI(LightningCLI):
    """LightningCLI whose ``sketch:`` section configures a :class:`SketchTuneCallback`."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SketchTuneCallback, "sketch", required=False)


def main(args: Any = None) -> None:
    """Entry point of the ``sketchtune`` command."""
    SketchTuneCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
