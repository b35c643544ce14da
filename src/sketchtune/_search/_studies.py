"""Study planning: configs -> layer groups -> study specs, and Optuna trials <-> plans.

A *group* is the set of layers that share one parameter set (one layer, unless
tuned jointly); a *study spec* is one Optuna study and the groups whose
parameters it searches (one per group for ``separate``/``joint``, a single one
over every group for ``global``). Nothing here evaluates a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from torch import nn

from sketchtune._search._fit import fit_space, without_tied
from sketchtune._validation import check_choice, warn
from sketchtune.config import AUTO_SPECS, LayerConfig, TuningConfigs
from sketchtune.nn import INITS
from sketchtune.plan import LayerPlan, SketchPlan
from sketchtune.registry import SketchKind
from sketchtune.select import select_layers, sketchable_layers
from sketchtune.space import Categorical, ParamSpec

__all__ = [
    "ENABLED",
    "Group",
    "Strategy",
    "StudyLayout",
    "StudySpec",
    "check_configs",
    "fit_space",
]

Strategy = Literal["separate", "joint", "global", "sampler"]

#: per-layer switch of a study over several layers (False: the layer stays dense)
ENABLED = "enabled"


@dataclass
class Group:
    """Layers that share one parameter set (one layer, unless tuned jointly)."""

    key: str
    names: list[str]
    kind: SketchKind
    space: dict[str, ParamSpec]
    copy_weights: bool


@dataclass(frozen=True)
class StudySpec:
    """One Optuna study and the groups whose parameters it searches."""

    key: str | None  # None: the single global study
    groups: list[Group]
    prefixed: bool  # parameter names carry the group key ("fc1.low_rank")

    @property
    def label(self) -> str:
        return self.key or "global"

    @property
    def optional(self) -> bool:
        """In one study over several layers, each layer may also stay dense.

        A sketch that costs accuracy for little speed (a classifier head, say)
        must not be forced on the model.
        """
        return self.prefixed and len(self.groups) > 1

    def param_name(self, group: Group, param: str) -> str:
        return f"{group.key}.{param}" if self.prefixed else param


class StudyLayout:
    """The studies a search runs over ``model``'s selected layers, and the trial <-> plan mapping.

    Args:
        model: the dense model.
        configs: which layers, with which search spaces.
        strategy: ``"separate"``, ``"joint"``, ``"global"`` / ``"sampler"`` (one study
            over every layer: planned, or the sampler alone), or ``None`` (each
            config's ``separate`` flag decides).
        default_init: the ``init`` of layers whose space searches none.
        seed: base seed of the sketches' random matrices.

    Raises:
        ValueError: a config selects nothing, a layer twice, or values a layer cannot take.
    """

    def __init__(
        self,
        model: nn.Module,
        configs: TuningConfigs,
        *,
        strategy: Strategy | None,
        default_init: str,
        seed: int,
    ) -> None:
        on_meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
        if on_meta is not None:
            raise ValueError(
                f"`model` has parameters on the meta device (e.g. {on_meta!r}): it holds no "
                "weights to evaluate or sketch. Load the trained weights first "
                "(model.to_empty(device=...) + load_state_dict, or load_state_dict(..., assign=True))."
            )
        layers = sketchable_layers(model)
        self.dense: dict[str, nn.Module] = {name: module for name, module, _ in layers}
        self.kinds: dict[str, SketchKind] = {name: kind for name, _, kind in layers}
        self.seed = seed
        self._default_init = default_init
        groups = self._groups(model, configs, strategy)
        if strategy in ("global", "sampler"):
            self.specs = [StudySpec(None, groups, prefixed=True)]
        else:
            self.specs = [StudySpec(g.key, [g], prefixed=False) for g in groups]

    # -- planning ----------------------------------------------------------------------

    def _groups(
        self, model: nn.Module, configs: TuningConfigs, strategy: Strategy | None
    ) -> list[Group]:
        if not len(configs):
            raise ValueError(
                "`configs` holds no LayerConfig; give at least one, e.g. "
                "TuningConfigs([LayerConfig(['fc1'], 'auto')])."
            )
        owner: dict[str, int] = {}
        groups: list[Group] = []
        for index, config in enumerate(configs):
            where = f"configs[{index}].layer_names"
            if isinstance(config.layer_names, (list, tuple)) and not config.layer_names:
                raise ValueError(
                    f"`{where}` is empty: no layer names were given; "
                    "name at least one layer, or give a regex / dict selector."
                )
            if isinstance(config.params, dict) and not config.params:
                raise ValueError(
                    f"configs[{index}] has no parameters to tune (params={{}}); give at least one, "
                    "e.g. {'num_terms': 1, 'low_rank': Int(8, 64, step=8)}, or params='auto'."
                )
            names = without_tied(
                model, select_layers(model, config.layer_names, where=where), config, where
            )
            for name in names:
                if name in owner:
                    raise ValueError(
                        f"layer {name!r} is selected by configs[{owner[name]}] and configs[{index}]; "
                        "each layer may be tuned by one config only."
                    )
                owner[name] = index
            joint = strategy == "joint" or (strategy != "separate" and not config.separate)
            units = [names] if joint else [[n] for n in names]
            narrowed: list[str] = []
            for unit in units:
                group, notes = self._group(unit, config, index)
                groups.append(group)
                narrowed.extend(notes)
            if narrowed:
                warn(
                    f"configs[{index}].params allows values that some selected layers cannot "
                    "take; those layers search only the values they can: "
                    + "; ".join(narrowed)
                    + "."
                )
        return groups

    def _group(self, names: list[str], config: LayerConfig, index: int) -> tuple[Group, list[str]]:
        """The group of ``names`` and, for the config's warning, how its space was narrowed."""
        kinds = {self.kinds[n] for n in names}
        if len(kinds) > 1:
            described = ", ".join(f"{n!r} ({self.kinds[n].describe(self.dense[n])})" for n in names)
            raise ValueError(
                f"configs[{index}] tunes layers of different types jointly ({described}); one "
                "parameter set cannot fit them all. Use separate=True or one config per type."
            )
        kind = kinds.pop()
        where = f"configs[{index}].params"
        if config.params in AUTO_SPECS:
            auto = kind.auto_int8_space if config.params == "auto+int8" else kind.auto_space
            spaces = [auto(self.dense[n]) for n in names]
            space = _joint_auto_space(spaces, names, where)
        else:
            assert isinstance(config.params, dict)
            space = dict(config.params)
        if (
            "init" in kind.params
            and "init" not in space
            and self._default_init != "sketch"
            and config.copy_weights  # without the dense weights only the random sketch exists
        ):
            space["init"] = Categorical([self._default_init])
        if "init" in space and not config.copy_weights and set(space["init"].grid()) - {"sketch"}:
            raise ValueError(
                f"{where}: init={space['init']!r} starts from the dense weights, but the config has "
                "copy_weights=False; use init='sketch' or copy_weights=True."
            )
        given = dict(space)
        for name in names:  # a joint group keeps the values valid for every member
            space = fit_space(kind, self.dense[name], space, where=f"{where} for layer {name!r}")
        for name in names:
            _warn_costly(kind, name, self.dense[name], space, where)
        notes = [
            f"{_members(names)} {param}={space[param]!r}"
            for param in given
            if space[param] is not given[param]
        ]
        key = names[0] if len(names) == 1 else _joint_key(names)
        return Group(key, names, kind, space, config.copy_weights), notes

    # -- questions about the layout ------------------------------------------------------

    @property
    def groups(self) -> list[Group]:
        return [g for spec in self.specs for g in spec.groups]

    def layer_seed(self, name: str) -> int:
        """The seed of ``name``'s random matrices: a stable hash of the base seed and the name."""
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

    def max_rank(self, name: str) -> int:
        """The largest total rank ``2 * num_terms * low_rank`` the search can ask of ``name``."""
        for group in self.groups:
            if name in group.names:
                terms = max(group.space["num_terms"].grid())
                rank = max(_ranks(group.space["low_rank"]), default=1)
                return int(2 * terms * rank)
        raise KeyError(name)  # pragma: no cover - only selected layers are built

    def layers_to_calibrate(self) -> list[str]:
        """Layers whose space holds ``init="activation"`` (their input statistics are gathered once)."""
        return sorted(
            name
            for group in self.groups
            if "init" in group.space and "activation" in group.space["init"].grid()
            for name in group.names
        )

    # -- trials <-> plans ----------------------------------------------------------------

    def plan_from(
        self, groups: Sequence[Group], values: Mapping[str, Mapping[str, Any]]
    ) -> SketchPlan:
        """The plan giving each group in ``values`` (by key) those parameter values."""
        layers: dict[str, LayerPlan] = {}
        for group in groups:
            if group.key not in values:
                continue
            # the form the values select (an int8 form may be a type of its own); None: dense
            entry = group.kind.plan_entry(values[group.key])
            if entry is None:
                continue
            for name in group.names:
                layers[name] = LayerPlan(
                    type=entry[0],
                    params=dict(entry[1]),
                    seed=self.layer_seed(name),
                    copy_weights=group.copy_weights,
                    dense=group.kind.describe(self.dense[name]),
                )
        return SketchPlan(layers)

    def suggest(self, spec: StudySpec, trial: optuna.Trial) -> SketchPlan:
        """Ask ``trial`` for every parameter of ``spec`` and return the plan it describes."""
        values: dict[str, dict[str, Any]] = {}
        for group in spec.groups:
            if spec.optional and not trial.suggest_categorical(
                spec.param_name(group, ENABLED), [True, False]
            ):
                continue
            values[group.key] = {
                p: param.suggest(trial, spec.param_name(group, p))
                for p, param in group.space.items()
            }
        return self.plan_from(spec.groups, values)

    def most_accurate_params(self, spec: StudySpec) -> dict[str, Any]:
        """Trial parameters of the most accurate plan in ``spec``: every layer on, largest ranks."""
        params: dict[str, Any] = {}
        for group in spec.groups:
            if spec.optional:
                params[spec.param_name(group, ENABLED)] = True
            for name, param in group.space.items():
                params[spec.param_name(group, name)] = group.kind.most_accurate(name, param)
        return params

    def first_values_plan(self) -> SketchPlan:
        """Every selected layer with the first value of each parameter space (untuned)."""
        values = {g.key: {p: spec.first() for p, spec in g.space.items()} for g in self.groups}
        return self.plan_from(self.groups, values)


def check_configs(
    model: nn.Module,
    configs: TuningConfigs | LayerConfig | Sequence[LayerConfig],
    *,
    strategy: Strategy | None = None,
    default_init: str = "sketch",
) -> list[str]:
    """Check ``configs`` against ``model`` as :class:`~sketchtune.SKAutoTuner` would, before any work.

    Raises the same errors the tuner's constructor raises (no layer matched,
    values a layer cannot take, ...). Nothing is built or evaluated.

    Returns:
        The label of each study the search would run.
    """
    if strategy is not None:
        check_choice("strategy", strategy, ("separate", "joint", "global", "sampler"))
    layout = StudyLayout(
        model,
        TuningConfigs.coerce(configs),
        strategy=strategy,
        default_init=check_choice("default_init", default_init, INITS),
        seed=0,
    )
    return [spec.label for spec in layout.specs]


def _members(names: list[str]) -> str:
    return repr(names[0]) if len(names) == 1 else f"the joint group {names!r}"


def _joint_auto_space(
    spaces: list[dict[str, ParamSpec]], names: list[str], where: str
) -> dict[str, ParamSpec]:
    """The 'auto' space shared by several layers: for each parameter, the values valid for all."""
    if len(spaces) == 1:
        return spaces[0]
    joint: dict[str, ParamSpec] = {}
    for param in spaces[0]:
        common = [
            v for v in spaces[0][param].grid() if all(s[param].contains(v) for s in spaces[1:])
        ]
        if not common:
            raise ValueError(
                f"{where}: 'auto' finds no {param} value that suits all of {names}; tune them separately."
            )
        joint[param] = Categorical(common)
    return joint


def _warn_costly(
    kind: SketchKind, name: str, dense: nn.Module, space: dict[str, ParamSpec], where: str
) -> None:
    """One warning per layer whose space reaches values that cost as much as the dense layer."""
    if not {"num_terms", "low_rank"} <= set(space):
        return
    try:
        top = {p: max(_ranks(space[p])) for p in ("num_terms", "low_rank")}
    except (ValueError, TypeError):
        return
    if kind.sketch_macs(dense, top, ()) >= kind.dense_macs(dense, ()):
        budget = kind.dense_macs(dense, ()) / kind.sketch_macs(
            dense, {"num_terms": 1, "low_rank": 1}, ()
        )
        warn(
            f"{where} for layer {name!r} ({kind.describe(dense)}) reaches num_terms*low_rank >= "
            f"{budget:.1f}, where the sketch costs as much as the dense layer; those trials are "
            "measured but cannot be faster. Narrow the space, or use params='auto'."
        )


def _ranks(spec: ParamSpec) -> list[int]:
    """The numeric values of a size parameter (``low_rank`` may also be ``"full"``: no factorization)."""
    return [v for v in spec.grid() if isinstance(v, int) and not isinstance(v, bool)]


def _joint_key(names: list[str]) -> str:
    return "+".join(names) if len(names) <= 3 else f"{names[0]}+...+{names[-1]}[{len(names)}]"
