"""The ``sketchtune`` console script: a LightningCLI with an optional ``sketch:`` section.

``sketchtune fit --config cfg.yaml`` trains the configured model and then tunes
it with the :class:`SketchTuneCallback` described by the config's ``sketch:``
section (every argument of the callback; see the README). Without a
``sketch:`` section (or without its ``configs``) it is a plain LightningCLI.
Because this module imports the callback, ``--trainer.callbacks+=SketchTuneCallback``
works here by its short name; a plain ``LightningCLI`` script needs the full
path ``sketchtune.SketchTuneCallback`` (or to import the class) for that.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from sketchtune._redact import redact
from sketchtune.config import TuningConfigs
from sketchtune.lightning.callback import SketchTuneCallback

__all__ = ["RedactedSaveConfigCallback", "SketchTuneCLI", "main"]

_SECTION = "sketch"


class RedactedSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` writer, with passwords in URLs written as ``***``.

    A ``storage: postgresql+psycopg://user:secret@host/db`` is saved as
    ``user:***@host``: a run directory must not hold credentials. Leave the
    password out of the URL (the driver reads ``PGPASSWORD`` or ``~/.pgpass``)
    and the saved config re-runs as it is.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, **kwargs: Any) -> None:
        super().__init__(parser, _redacted(config.clone()), **kwargs)


def _redacted(value: Any) -> Any:
    """``value`` (a config, in place) with every URL's password replaced by ``***``."""
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, _redacted(item))
        return value
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return redact(value)
    return value


class SketchTuneCLI(LightningCLI):
    """LightningCLI whose optional ``sketch:`` section configures a :class:`SketchTuneCallback`.

    The ``config.yaml`` it saves holds no password (see :class:`RedactedSaveConfigCallback`).

    Example::

        sketchtune fit --config cfg.yaml               # trains, then tunes (with a sketch: section)
        sketchtune fit --config cfg.yaml --sketch.n_trials=20
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) < 3:  # LightningCLI's third positional argument is save_config_callback
            kwargs.setdefault("save_config_callback", RedactedSaveConfigCallback)
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SketchTuneCallback, _SECTION, required=False)
        # Without a sketch: section the callback's one required argument is missing: that
        # means "no tuning", so it is not required here and no callback is made.
        for action in parser._actions:
            if action.dest == f"{_SECTION}.configs":
                action.required = False
        parser.add_instantiator(_callback_if_configured, SketchTuneCallback, subclasses=False)

    @override
    def before_instantiate_classes(self) -> None:
        # The callback's `configs` is typed loosely (dicts from YAML): check it as the Python
        # API does, now, so a typo is one parser error line, not a traceback after set-up.
        config = self.config.get(str(self.subcommand), self.config)
        places: list[tuple[str, Any]] = []
        sketch = config.get(_SECTION)
        if sketch is not None and sketch.get("configs") is not None:
            places.append((f"{_SECTION}.configs", sketch.get("configs")))
        callbacks = config.get("trainer.callbacks")
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else []):
            init = getattr(callback, "init_args", None)
            path = str(getattr(callback, "class_path", ""))
            if path.endswith("SketchTuneCallback") and init is not None:
                places.append((f"trainer.callbacks[{i}].init_args.configs", init.get("configs")))
        for where, configs in places:
            problem = _config_problem(configs)
            if problem is not None:
                self._parser(self.subcommand).error(f"{where}{problem}")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        parser = self._parser(self.subcommand)
        if self._get(self.config_init, _SECTION) is None and _SECTION in parser.callback_keys:
            parser.callback_keys.remove(_SECTION)  # no sketch: section, no callback
        return super().instantiate_trainer(**kwargs)


def _config_problem(configs: Any) -> str | None:
    """``"[i]: what is wrong"`` (``": ..."`` for the whole) with ``configs``, or ``None``."""
    items = configs if isinstance(configs, list) else [configs]
    for i, item in enumerate(items):
        if isinstance(item, Namespace):  # a LayerConfig written as class_path + init_args
            item = item.get("init_args", Namespace()).as_dict()
        try:
            TuningConfigs.coerce([item])
        except (TypeError, ValueError) as exc:
            return f"{f'[{i}]' if isinstance(configs, list) else ''}: {exc}"
    return None


def _callback_if_configured(
    cls: type[SketchTuneCallback], *args: Any, **kwargs: Any
) -> SketchTuneCallback | None:
    """The callback, or ``None`` when the config names no layers to tune."""
    if not args and kwargs.get("configs") is None:
        return None
    return cls(*args, **kwargs)


def main(args: Any = None) -> None:
    """Entry point of the ``sketchtune`` command."""
    SketchTuneCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
