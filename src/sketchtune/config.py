"""LayerConfig and TuningConfigs: which layers to sketch, and the space of their parameters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, overload

from sketchtune._validation import check_bool
from sketchtune.space import ParamSpec, as_spec

__all__ = ["AUTO_SPECS", "LayerConfig", "TuningConfigs"]

#: the string forms of ``params``: the low-rank forms, or those and the int8 forms
AUTO_SPECS = ("auto", "auto+int8")


class LayerConfig:
    """Layers to sketch and the search space of their parameters.

    Only types are checked here, as in the seed; whether the selector matches
    anything and whether the values suit the selected layers is checked by
    ``SKAutoTuner(...)`` (and the callback's setup), before any work. One range
    may serve layers of different sizes: each layer searches the values it can take.

    Args:
        layer_names: a selector: a regex string (full match on the qualified
            name), a list of exact names (or ``.suffix``), a dict selector
            (``pattern``, ``type``, ``contains``, ``exclude``, ``indices``,
            ``range``) or a callable ``(name, module) -> bool``. See
            :mod:`sketchtune.select`.
        params: ``{name: spec}`` where a spec is ``Categorical``, ``Int``,
            ``Float``, a list (Categorical) or a single fixed value; or
            ``"auto"``, a space derived from each layer's size holding only
            values that save compute (ranks and inits); or ``"auto+int8"``, the same
            plus the int8 forms where torch's int8 kernel can pay (``quant`` and
            ``low_rank="full"``, see ``docs/int8.md``).
        separate: tune each selected layer on its own (``True``) or share one
            parameter set among them (``False``, "joint").
        copy_weights: start each sketch from the dense layer's weights (``True``)
            or from a fresh initialization.

    Example:
        >>> from sketchtune import Categorical, Int, LayerConfig
        >>> LayerConfig(["fc1", "fc2"], {"num_terms": Categorical([1, 2]), "low_rank": Int(8, 64, step=8)})
        LayerConfig(layer_names=['fc1', 'fc2'], params={'num_terms': Categorical([1, 2]), 'low_rank': Int(8, 64, step=8)}, separate=True, copy_weights=True)
    """

    def __init__(
        self,
        layer_names: Any,
        params: Mapping[str, Any] | str = "auto",
        separate: bool = True,
        copy_weights: bool = True,
    ) -> None:
        if not (
            isinstance(layer_names, (str, list, tuple, dict)) or callable(layer_names)
        ) or isinstance(layer_names, bytes):
            raise TypeError(
                "`layer_names` must be a regex string, a list of names, a dict selector or a "
                f"callable, got {layer_names!r} ({type(layer_names).__name__})."
            )
        self.layer_names = list(layer_names) if isinstance(layer_names, tuple) else layer_names
        self.params: dict[str, ParamSpec] | str
        if isinstance(params, str):
            if params not in AUTO_SPECS:
                raise ValueError(
                    f"`params` must be a dict of specs, 'auto' or 'auto+int8', got {params!r}."
                )
            self.params = params
        elif isinstance(params, Mapping):
            specs: dict[str, ParamSpec] = {}
            for name, value in params.items():
                if not isinstance(name, str):
                    raise TypeError(f"`params` keys must be parameter names (str), got {name!r}.")
                specs[name] = as_spec(value, name=f"params[{name!r}]")
            self.params = specs
        else:
            raise TypeError(
                "`params` must be a dict of specs, 'auto' or 'auto+int8', got "
                f"{type(params).__name__}."
            )
        self.separate = check_bool("separate", separate)
        self.copy_weights = check_bool("copy_weights", copy_weights)

    def __repr__(self) -> str:
        return (
            f"LayerConfig(layer_names={self.layer_names!r}, params={self.params!r}, "
            f"separate={self.separate}, copy_weights={self.copy_weights})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON); a callable selector is written by its qualified name."""
        selector = self.layer_names
        if callable(selector) and not isinstance(selector, (str, list, dict)):
            selector = f"<callable {getattr(selector, '__qualname__', repr(selector))}>"
        params = (
            self.params
            if isinstance(self.params, str)
            else {k: v.to_dict() for k, v in self.params.items()}
        )
        return {
            "layer_names": selector,
            "params": params,
            "separate": self.separate,
            "copy_weights": self.copy_weights,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"a layer config must be a mapping, got {data!r}.")
        valid = ("layer_names", "params", "separate", "copy_weights")
        unknown = sorted(set(data) - set(valid), key=str)
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"layer config has unknown key(s) {unknown}{hint}; valid keys: {', '.join(valid)}."
            )
        if "layer_names" not in data:
            raise ValueError(f"layer config needs `layer_names`, got {dict(data)!r}.")
        return cls(**dict(data))


class TuningConfigs:
    """The complete tuning configuration: a list of :class:`LayerConfig`.

    Iterable, sized and indexable. Dicts (as written in YAML) are read as LayerConfigs.

    Example:
        >>> from sketchtune import LayerConfig, TuningConfigs
        >>> configs = TuningConfigs([LayerConfig("fc.*", "auto")])
        >>> len(configs), configs[0].params
        (1, 'auto')
    """

    def __init__(self, configs: Iterable[LayerConfig | Mapping[str, Any]] | LayerConfig) -> None:
        if isinstance(configs, LayerConfig):
            configs = [configs]
        if isinstance(configs, (str, bytes, Mapping)) or not isinstance(configs, Iterable):
            raise TypeError(
                f"`configs` must be a list of LayerConfig, got {type(configs).__name__}."
            )
        items: list[LayerConfig] = []
        for i, item in enumerate(configs):
            if isinstance(item, LayerConfig):
                items.append(item)
            elif isinstance(item, Mapping):
                items.append(LayerConfig.from_dict(item))
            else:
                raise TypeError(
                    f"`configs[{i}]` must be a LayerConfig or a dict, got {type(item).__name__}."
                )
        self.configs = items

    def __iter__(self) -> Iterator[LayerConfig]:
        return iter(self.configs)

    def __len__(self) -> int:
        return len(self.configs)

    @overload
    def __getitem__(self, index: int) -> LayerConfig: ...
    @overload
    def __getitem__(self, index: slice) -> list[LayerConfig]: ...
    def __getitem__(self, index: int | slice) -> LayerConfig | list[LayerConfig]:
        return self.configs[index]

    def __repr__(self) -> str:
        return f"TuningConfigs({self.configs!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TuningConfigs) and self.configs == other.configs

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.configs]

    @classmethod
    def coerce(cls, value: Any) -> TuningConfigs:
        """A TuningConfigs from itself, one LayerConfig, or a list of them / of dicts."""
        return value if isinstance(value, TuningConfigs) else cls(value)
