"""SKAutoTuner: search each selected layer's sketch parameters with Optuna under an accuracy floor.

The API is the seed's (``SKAutoTuner``, ``TuningConfigs``, ``LayerConfig``,
``OptunaSearch``); the semantics are stricter:

- infeasible trials are told to Optuna as constraint violations (and a penalty
  value below every feasible one), never as ``-inf``; the results table still
  shows ``score = -inf`` for them;
- speed is a speedup over the dense model timed interleaved in the same run,
  measured only when the accuracy passes;
- sketches are seeded per layer, so the same parameters give the same layer in
  every trial and every process;
- the model is restored after every trial, also on errors and Ctrl-C;
- after per-layer tuning, the combination of the per-layer winners is
  validated, and backed off layer by layer if it breaks the floor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import socket
import statistics
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from sketchtune._validation import check_choice, check_int, check_seed
from sketchtune.config import LayerConfig, TuningConfigs
from sketchtune.evaluate import (
    REMOTE_TRIAL,
    AccuracyFloor,
    Command,
    Evaluator,
    FloorUnreachable,
    FunctionEvaluator,
    Mode,
    NonFiniteMetric,
    RemoteTrial,
    parse_drop,
)
from sketchtune.measure import ShapeRecorder, layer_macs
from sketchtune.nn import INITS, InputCovariance, LowRankFactors
from sketchtune.plan import LayerPlan, SketchPlan, Swap, apply_plan, build_replacements
from sketchtune.registry import BuildAids, SketchKind, kind_named
from sketchtune.results import TrialRecord, json_ready, record_from_trial
from sketchtune.search import (
    ATTR,
    OptunaSearch,
    frozen_params_key,
    redact,
    trial_info,
)
from sketchtune.select import select_layers, sketchable_layers
from sketchtune.space import Categorical, ParamSpec

__all__ = ["SKAutoTuner", "check_configs"]

log = logging.getLogger("sketchtune")

Strategy = Literal["separate", "joint", "global"]
SpeedSpec = Callable[[nn.Module], Any] | Literal["flops"] | None

_STUDY_DENSE = "sketchtune:dense_accuracy"
_WORKER = (
    f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial (several may share a study)
)
_ENABLED = "enabled"  # per-layer switch of the global strategy (False: the layer stays dense)
_RESULTS_TYPE = "sketchtune.TuningResults"
_RESULTS_VERSION = 1


class _TrialFailed(Exception):
    """A trial failed for a recorded reason (non-finite metric, ...); the study continues."""


class _OverBudget(Exception):
    """Another worker took the last slot of the budget first; this trial is not run."""


@dataclass
class _Group:
    """Layers that share one parameter set (one layer, unless tuned jointly)."""

    key: str
    names: list[str]
    kind: SketchKind
    space: dict[str, ParamSpec]
    copy_weights: bool


@dataclass
class _StudyPlan:
    """One Optuna study and the groups whose parameters it searches."""

    key: str | None  # None: the single global study
    groups: list[_Group]
    prefixed: bool  # parameter names carry the group key ("fc1.low_rank")
    study: optuna.Study | None = None

    @property
    def label(self) -> str:
        return self.key or "global"


@dataclass
class _Outcome:
    accuracy: float
    speed: float | None
    speedup: float | None
    feasible: bool
    violation: float
    speed_measured: bool
    flops_speedup: float
    early_stop: bool = False

    def value(self, mode: Mode) -> float:
        """What Optuna is told (maximized): the speedup, or the accuracy when speed is not measured.

        An infeasible trial with a speed objective gets ``-1 - violation``: below every
        feasible speedup (> 0) and better the closer it came to the floor, which
        guides samplers that ignore constraints. Without speed, the (signed)
        accuracy itself is already below every feasible one.
        """
        if self.speedup is not None:
            return self.speedup
        if not self.feasible and self.speed_measured:
            return -1.0 - self.violation
        return self.accuracy if mode == "max" else -self.accuracy


class SKAutoTuner:
    """Tunes the sketch parameters of selected layers with Optuna, keeping accuracy above a floor.

    Args:
        model: the trained model; it is left exactly as it was after ``tune()``.
        configs: a :class:`TuningConfigs` (or one ``LayerConfig``, or a list of them).
        accuracy_eval_func: ``model -> float``, higher is better (see ``mode``);
            or an :class:`~sketchtune.evaluate.Evaluator`.
        search_algorithm: an :class:`OptunaSearch` (default: TPE, 100 trials per study).
        verbose: print one line per trial and a summary.
        accuracy_threshold: absolute accuracy floor.
        optimization_eval_func: ``model -> float`` speed, higher is faster (e.g.
            throughput); the objective is the speedup over the dense model,
            timed interleaved. ``"flops"`` uses the FLOP model instead (noise-free).
            ``None``: the score is the accuracy.
        num_runs_per_param: evaluations per trial; the median is reported.
        max_accuracy_drop: floor relative to the dense model's accuracy, measured
            first: an absolute drop (``0.01``) or a relative one (``"1%"``).
        strategy: ``"separate"`` (a study per layer), ``"joint"`` (a study per
            config, one parameter set shared by its layers) or ``"global"`` (one
            study over every layer's parameters). ``None`` follows each config's
            ``separate`` flag, as the seed did.
        seed: base seed of the sketches' random matrices (default: the search's
            seed, else 0). Each layer's seed is derived from it and the layer name.
        mode: ``"max"`` if higher accuracy is better, ``"min"`` for a loss.
        default_init: the ``init`` of Linear/Conv2d sketches whose space does not
            search one: ``"sketch"`` (the seed's), ``"svd"`` or ``"activation"``
            (input statistics are then gathered once, during the dense baseline).
        optmization_eval_func: deprecated misspelling of ``optimization_eval_func``.

    Attributes:
        best_plan: the validated best :class:`SketchPlan` after ``tune()``.
        best_accuracy: its accuracy (``None`` when nothing was kept).
        best_speedup: its speedup over the dense model (``None`` without a speed objective).
        dense_accuracy: the dense model's accuracy (when it was measured).
        floor: the resolved :class:`AccuracyFloor`.
        interrupted: ``True`` when the last ``tune()`` was stopped by Ctrl-C.
        combination_log: the steps of the combined-plan validation.

    Example:
        >>> import torch
        >>> from sketchtune import SKAutoTuner, TuningConfigs, LayerConfig, OptunaSearch
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        >>> x = torch.randn(64, 256)
        >>> reference = model(x).argmax(1)
        >>> def accuracy(m):
        ...     with torch.no_grad():
        ...         return (m(x).argmax(1) == reference).float().mean().item()
        >>> tuner = SKAutoTuner(
        ...     model,
        ...     TuningConfigs([LayerConfig(["0"], {"num_terms": [1], "low_rank": [16, 64, 128]})]),
        ...     accuracy,
        ...     accuracy_threshold=0.0,
        ...     optimization_eval_func="flops",
        ...     search_algorithm=OptunaSearch(n_trials=3, seed=0),
        ... )
        >>> tuner.tune()
        >>> sorted(tuner.best_params["0"].items())
        [('low_rank', 16), ('num_terms', 1)]
    """

    def __init__(
        self,
        model: nn.Module,
        configs: TuningConfigs | LayerConfig | Sequence[LayerConfig],
        accuracy_eval_func: Callable[[nn.Module], Any] | Evaluator,
        search_algorithm: OptunaSearch | None = None,
        verbose: bool = False,
        accuracy_threshold: float | None = None,
        optimization_eval_func: SpeedSpec = None,
        num_runs_per_param: int = 1,
        *,
        max_accuracy_drop: float | str | None = None,
        strategy: Strategy | None = None,
        seed: int | None = None,
        mode: Mode = "max",
        default_init: str = "sketch",
        optmization_eval_func: SpeedSpec = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if optmization_eval_func is not None:
            warnings.warn(
                "`optmization_eval_func` is a misspelling kept for compatibility; use `optimization_eval_func`.",
                DeprecationWarning,
                stacklevel=2,
            )
            if optimization_eval_func is not None:
                raise ValueError(
                    "give `optimization_eval_func` only once (not also as `optmization_eval_func`)."
                )
            optimization_eval_func = optmization_eval_func
        self.model = model
        self.configs = TuningConfigs.coerce(configs)
        self.search_algorithm = search_algorithm if search_algorithm is not None else OptunaSearch()
        if not isinstance(self.search_algorithm, OptunaSearch):
            raise TypeError(
                f"`search_algorithm` must be an OptunaSearch, got {type(self.search_algorithm).__name__}."
            )
        self.verbose = bool(verbose)
        self.num_runs_per_param = check_int("num_runs_per_param", num_runs_per_param, minimum=1)
        self.strategy = (
            None
            if strategy is None
            else check_choice("strategy", strategy, ("separate", "joint", "global"))
        )
        self.mode: Mode = check_choice("mode", mode, ("max", "min"))
        if accuracy_threshold is not None and max_accuracy_drop is not None:
            raise ValueError(
                "give `accuracy_threshold` or `max_accuracy_drop`, not both "
                f"(got {accuracy_threshold!r} and {max_accuracy_drop!r})."
            )
        if max_accuracy_drop is not None:
            parse_drop(max_accuracy_drop)  # validate now, before any work
        self.accuracy_threshold = (
            None
            if accuracy_threshold is None
            else AccuracyFloor.resolve(
                threshold=accuracy_threshold, max_drop=None, baseline=None, mode=self.mode
            ).value
        )
        self.max_accuracy_drop = max_accuracy_drop
        self.speed_model: Literal["flops"] | None = None
        if isinstance(optimization_eval_func, str):
            check_choice("optimization_eval_func", optimization_eval_func, ("flops",))
            self.speed_model = "flops"
            optimization_eval_func = None
        if isinstance(accuracy_eval_func, Evaluator):
            self.evaluator = accuracy_eval_func
        else:
            self.evaluator = FunctionEvaluator(accuracy_eval_func, optimization_eval_func)
        self.default_init = check_choice("default_init", default_init, INITS)
        base = check_seed("seed", seed)
        self.seed = base if base is not None else (self.search_algorithm.seed or 0)

        # Resolve everything that can be wrong before any trial runs.
        layers = sketchable_layers(model)
        self._dense = {name: module for name, module, _ in layers}
        self._kinds = {name: kind for name, _, kind in layers}
        self._studies = self._plan_studies()
        self._cache: OrderedDict[tuple[str, tuple[Any, ...]], tuple[nn.Module, list[int]]] = (
            OrderedDict()
        )
        self._shapes = ShapeRecorder(model, sorted(self._dense))
        # layers whose space holds init="activation" get their input statistics gathered once
        self._aids: dict[str, BuildAids] = {}
        self._calibrated = False
        self._calibrate = sorted(
            name
            for run in self._studies
            for group in run.groups
            if "init" in group.space and "activation" in group.space["init"].grid()
            for name in group.names
        )

        self.best_plan: SketchPlan | None = None
        self.best_accuracy: float | None = None
        self.best_speedup: float | None = None
        self.dense_accuracy: float | None = None
        self.floor = AccuracyFloor(self.accuracy_threshold, self.mode)
        self.interrupted = False
        self.combination_log: list[dict[str, Any]] = []
        self.confirmation_log: list[dict[str, Any]] = []
        self._records: list[TrialRecord] | None = None
        self._best_by_study: dict[str, TrialRecord] = {}

    @property
    def study_labels(self) -> list[str]:
        """One label per Optuna study the search runs (a layer, a joint group, or ``"global"``)."""
        return [run.label for run in self._studies]

    # ------------------------------------------------------------------ configuration

    def _plan_studies(self) -> list[_StudyPlan]:
        owner: dict[str, int] = {}
        groups: list[_Group] = []
        for index, config in enumerate(self.configs):
            where = f"configs[{index}].layer_names"
            names = select_layers(self.model, config.layer_names, where=where)
            for name in names:
                if name in owner:
                    raise ValueError(
                        f"layer {name!r} is selected by configs[{owner[name]}] and configs[{index}]; "
                        "each layer may be tuned by one config only."
                    )
                owner[name] = index
            joint = self.strategy == "joint" or (
                self.strategy != "separate" and not config.separate
            )
            units = [names] if joint else [[n] for n in names]
            for unit in units:  # a plain loop keeps warning stack levels stable across Pythons
                groups.append(self._group(unit, config, index))  # noqa: PERF401
        if self.strategy == "global":
            return [_StudyPlan(None, groups, prefixed=True)]
        return [_StudyPlan(g.key, [g], prefixed=False) for g in groups]

    def _group(self, names: list[str], config: LayerConfig, index: int) -> _Group:
        kinds = {self._kind(n) for n in names}
        if len(kinds) > 1:
            described = ", ".join(
                f"{n!r} ({self._kind(n).describe(self._dense[n])})" for n in names
            )
            raise ValueError(
                f"configs[{index}] tunes layers of different types jointly ({described}); one "
                "parameter set cannot fit them all. Use separate=True or one config per type."
            )
        kind = kinds.pop()
        where = f"configs[{index}].params"
        if config.params == "auto":
            space = _joint_auto_space(
                [kind.auto_space(self._dense[n]) for n in names], names, where
            )
        else:
            assert isinstance(config.params, dict)
            space = dict(config.params)
        if "init" in kind.params and "init" not in space and self.default_init != "sketch":
            space["init"] = Categorical([self.default_init])
        if "init" in space and not config.copy_weights and set(space["init"].grid()) - {"sketch"}:
            raise ValueError(
                f"{where}: init={space['init']!r} starts from the dense weights, but the config has "
                "copy_weights=False; use init='sketch' or copy_weights=True."
            )
        for name in names:
            kind.check_space(self._dense[name], space, where=f"{where} for layer {name!r}")
            _warn_costly(kind, name, self._dense[name], space, where)
        key = names[0] if len(names) == 1 else _joint_key(names)
        return _Group(key, names, kind, space, config.copy_weights)

    def _kind(self, name: str) -> SketchKind:
        return self._kinds[name]

    def layer_seed(self, name: str) -> int:
        """The seed of ``name``'s random matrices: a stable hash of the base seed and the name."""
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

    def _plan_from(
        self, groups: Sequence[_Group], values: Mapping[str, Mapping[str, Any]]
    ) -> SketchPlan:
        layers: dict[str, LayerPlan] = {}
        for group in groups:
            if group.key not in values:
                continue
            for name in group.names:
                layers[name] = LayerPlan(
                    type=group.kind.name,
                    params=dict(values[group.key]),
                    seed=self.layer_seed(name),
                    copy_weights=group.copy_weights,
                    dense=group.kind.describe(self._dense[name]),
                )
        return SketchPlan(layers)

    def _suggest(self, run: _StudyPlan, trial: optuna.Trial) -> SketchPlan:
        values: dict[str, dict[str, Any]] = {}
        # In one study over several layers, each layer may also stay dense: a sketch
        # that costs accuracy for little speed (a classifier head, say) must not be forced.
        optional = run.prefixed and len(run.groups) > 1
        for group in run.groups:
            if optional and not trial.suggest_categorical(f"{group.key}.{_ENABLED}", [True, False]):
                continue
            values[group.key] = {
                p: spec.suggest(trial, f"{group.key}.{p}" if run.prefixed else p)
                for p, spec in group.space.items()
            }
        return self._plan_from(run.groups, values)

    def _safest(self, run: _StudyPlan) -> dict[str, Any]:
        """Parameters of the most accurate plan in ``run``'s space: every layer on, largest ranks."""
        params: dict[str, Any] = {}
        optional = run.prefixed and len(run.groups) > 1
        for group in run.groups:
            prefix = f"{group.key}." if run.prefixed else ""
            if optional:
                params[f"{prefix}{_ENABLED}"] = True
            for name, spec in group.space.items():
                params[prefix + name] = _most_accurate(spec)
        return params

    # ------------------------------------------------------------------ building and evaluating

    def build(self, plan: SketchPlan) -> dict[str, nn.Module]:
        """Sketched modules for ``plan``, reused from earlier trials when untouched since."""
        built: dict[str, nn.Module] = {}
        for name, layer in plan.items():
            key = (name, _hashable(layer))
            cached = self._cache.get(key)
            if cached is not None and cached[1] == _versions(cached[0]):
                self._cache.move_to_end(key)
                module = cached[0]
                module.train(self._dense[name].training)
            else:
                kind = kind_named(layer.type)
                with warnings.catch_warnings():
                    # costly values were reported once, when the space was checked
                    warnings.filterwarnings(
                        "ignore", message=".*slower and larger", category=UserWarning
                    )
                    module = kind.build(
                        self._dense[name],
                        dict(layer.params),
                        layer.seed,
                        layer.copy_weights,
                        self._build_aids(name, layer),
                    )
                self._cache[key] = (module, _versions(module))
                while len(self._cache) > max(8, 2 * len(self._dense)):
                    self._cache.popitem(last=False)
            built[name] = module
        return built

    def _build_aids(self, name: str, layer: LayerPlan) -> BuildAids:
        """Calibration and a nested factorization per layer, computed once for the largest rank searched."""
        aids = self._aids.setdefault(name, BuildAids())
        init = layer.params.get("init", "sketch")
        if init in ("svd", "activation") and layer.copy_weights and init not in aids.factors:
            if init == "activation" and aids.calibration is None:
                return aids  # not gathered (results loaded from a file): the registry falls back to svd
            weight = cast(torch.Tensor, self._dense[name].weight).detach()
            weight_t = weight.reshape(weight.shape[0], -1).t()
            aids.factors[init] = LowRankFactors.compute(
                weight_t,
                self._max_rank(name),
                calibration=aids.calibration if init == "activation" else None,
            )
        return aids

    def _max_rank(self, name: str) -> int:
        """The largest total rank ``2 * num_terms * low_rank`` the search can ask of ``name``."""
        for run in self._studies:
            for group in run.groups:
                if name in group.names:
                    terms = max(group.space["num_terms"].grid())
                    rank = max(group.space["low_rank"].grid())
                    return int(2 * terms * rank)
        raise KeyError(name)  # pragma: no cover - only selected layers are built

    @contextmanager
    def _calibration_hooks(self) -> Iterator[None]:
        """Gather the input covariance of the layers that need it during one dense evaluation."""
        handles = []
        for name in self._calibrate:
            dense = self._dense[name]
            cov = InputCovariance(_fan_in(dense))
            self._aids.setdefault(name, BuildAids()).calibration = cov
            handles.append(dense.register_forward_pre_hook(_covariance_hook(dense, cov)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for name in self._calibrate:  # every process adds its share (DDP)
            gathered = self._aids[name].calibration
            assert gathered is not None
            if gathered.gram is not None:
                gathered.gram = self.evaluator.reduce_sum(gathered.gram)
            total = self.evaluator.reduce_sum(torch.tensor(float(gathered.count)))
            gathered.count = int(total.item())

    def _accuracy(self, trial: optuna.Trial | RemoteTrial | None) -> float:
        runs = []
        for _ in range(self.num_runs_per_param):
            with self._shapes:
                runs.append(self.evaluator.accuracy(self.model, trial=trial, floor=self.floor))
        return float(statistics.median(runs))

    def _speed(self, swap: Swap, plan: SketchPlan) -> tuple[float | None, float | None]:
        """``(speed, speedup)`` of the swapped-in plan; the dense model is re-timed interleaved."""
        if self.speed_model == "flops":
            speedup = self.flops_speedup(plan)
            return speedup, speedup
        if not self.evaluator.has_throughput:
            return None, None
        dense_runs, sketch_runs = [], []
        for _ in range(self.num_runs_per_param):
            swap.restore()
            dense_runs.append(self.evaluator.throughput(self.model))
            swap.apply()
            sketch_runs.append(self.evaluator.throughput(self.model))
        dense, speed = statistics.median(dense_runs), statistics.median(sketch_runs)
        if dense <= 0:
            raise _TrialFailed(
                f"optimization_eval_func returned {dense} for the dense model; speeds must be > 0"
            )
        return speed, speed / dense

    def flops_speedup(self, plan: SketchPlan) -> float:
        """FLOP-model speedup of the whole model with ``plan`` applied (needs recorded shapes)."""
        dense_total = sketch_total = 0.0
        for name, module in self._dense.items():
            shapes = self._shapes.shapes.get(name, ())
            d, _ = layer_macs(module, shapes)
            dense_total += d
            if name in plan:
                layer = plan[name]
                sketch_total += kind_named(layer.type).sketch_macs(
                    module, dict(layer.params), shapes
                )
            else:
                sketch_total += d
        return dense_total / sketch_total if sketch_total else 1.0

    def _evaluate(
        self, plan: SketchPlan, trial: optuna.Trial | None, *, measure_speed: bool = True
    ) -> _Outcome:
        """Swap ``plan`` in, measure it, swap it out. The one place where the model is evaluated."""
        self.evaluator.announce(
            Command(plan.to_dict()["layers"], trial is not None, measure_speed, self.floor.value)
        )
        return self._run_evaluation(plan, trial, measure_speed=measure_speed)

    def _run_evaluation(
        self, plan: SketchPlan, trial: optuna.Trial | RemoteTrial | None, *, measure_speed: bool
    ) -> _Outcome:
        modules = self.build(plan)
        early_stop = False
        calibrating = not plan and bool(self._calibrate) and not self._calibrated
        with Swap(self.model, modules) as swap:
            try:
                if calibrating:
                    with self._calibration_hooks():
                        accuracy = self._accuracy(trial)
                    self._calibrated = True
                else:
                    accuracy = self._accuracy(trial)
            except NonFiniteMetric as exc:
                raise _TrialFailed(str(exc)) from None
            except FloorUnreachable as exc:
                accuracy, early_stop = exc.bound, True
            violation = self.floor.violation(accuracy)
            feasible = violation <= 0.0 and not early_stop
            speed = speedup = None
            if feasible and measure_speed:
                try:
                    speed, speedup = self._speed(swap, plan)
                except NonFiniteMetric as exc:
                    raise _TrialFailed(str(exc)) from None
        measured = self._speed_measured
        return _Outcome(
            accuracy,
            speed,
            speedup,
            feasible,
            violation,
            measured,
            self.flops_speedup(plan),
            early_stop,
        )

    @property
    def _speed_measured(self) -> bool:
        return self.speed_model is not None or self.evaluator.has_throughput

    def follow(self) -> None:
        """Run the evaluations another process announces, until it finishes (DDP followers).

        The coordinating process calls :meth:`tune`; every other process builds
        the same tuner and calls ``follow()``, so collective operations inside the
        evaluator (metric reduction, broadcasts) line up across processes.
        """
        while True:
            command = self.evaluator.receive()
            if command is None:
                return
            self.floor = AccuracyFloor(command.floor, self.mode)
            trial = REMOTE_TRIAL if command.has_trial else None
            try:
                self._run_evaluation(
                    SketchPlan(command.plan), trial, measure_speed=command.measure_speed
                )
            except (_TrialFailed, optuna.TrialPruned):
                continue  # the coordinator records the outcome; followers just keep in step

    # ------------------------------------------------------------------ the Optuna objective

    def _objective(self, run: _StudyPlan) -> Callable[[optuna.Trial], float]:
        def objective(trial: optuna.Trial) -> float:
            if self.search_algorithm.over_budget(trial):
                trial.set_user_attr(
                    ATTR, {"skipped": "the study's budget was used up by other workers"}
                )
                raise _OverBudget
            plan = self._suggest(run, trial)
            twin = _finished_twin(trial, self.search_algorithm.snapshot)
            if twin is not None:
                trial.set_user_attr(ATTR, {**trial_info(twin), "duplicate_of": twin.number})
                _set_constraint(trial, _constraint_of(twin))
                assert twin.value is not None
                return twin.value
            info: dict[str, Any] = {"plan": plan.to_dict()["layers"], "worker": _WORKER}
            if not plan and self.dense_accuracy is not None:
                # every layer left dense: that is the baseline, already measured
                outcome = _Outcome(
                    self.dense_accuracy,
                    None,
                    1.0 if self._speed_measured else None,
                    self.floor.feasible(self.dense_accuracy),
                    self.floor.violation(self.dense_accuracy),
                    self._speed_measured,
                    1.0,
                )
            else:
                outcome = None
            try:
                if outcome is None:
                    outcome = self._evaluate(plan, trial)
            except _TrialFailed as exc:
                trial.set_user_attr(ATTR, {**info, "reason": str(exc)})
                raise
            info.update(
                accuracy=outcome.accuracy,
                speed=outcome.speed,
                speedup=outcome.speedup,
                feasible=outcome.feasible,
                flops_speedup=outcome.flops_speedup,
            )
            if outcome.early_stop:
                info["early_stop"] = True
            if not hasattr(trial, "set_constraint"):  # Optuna 4: read by constraints_func
                info["constraint"] = outcome.violation
            trial.set_user_attr(ATTR, info)
            _set_constraint(trial, outcome.violation)
            return outcome.value(self.mode)

        return objective

    def _report(
        self, run: _StudyPlan, callbacks: Sequence[Callable[[TrialRecord], None]] = ()
    ) -> Callable[[optuna.Study, FrozenTrial], None]:
        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            if "skipped" in trial_info(trial):
                return
            record = self._remember(run, trial)
            for callback in callbacks:
                callback(record)
            if not self.verbose:
                return
            total = self.search_algorithm.n_trials
            params = " ".join(f"{k}={v}" for k, v in record.params.items())
            if record.state != "COMPLETE":
                outcome = f"{record.state.lower()}" + (
                    f" ({record.reason})" if record.reason else ""
                )
            else:
                accuracy = f"accuracy {record.accuracy:.4f} ({self.floor.describe()})"
                if not record.feasible:
                    outcome = f"{accuracy} -> infeasible"
                elif record.speedup is not None:
                    outcome = f"{accuracy}, speedup {record.speedup:.2f}x"
                else:
                    outcome = accuracy
                twin = trial_info(trial).get("duplicate_of")
                if twin is not None:
                    outcome += f" (same as trial {twin})"
            best = self._best_by_study.get(run.label)
            best_text = f" | best {_score_text(best)}" if best else ""
            self._say(
                f"[{run.label}] trial {trial.number + 1}/{total or '-'}: {params} -> {outcome}{best_text}"
            )

        return after_trial

    def _say(self, message: str) -> None:
        log.info(message)
        if self.verbose:
            print(message, flush=True)

    # ------------------------------------------------------------------ tuning

    def tune(self, *, callbacks: Sequence[Callable[[TrialRecord], None]] = ()) -> None:
        """Run the search. The model is left as it was; apply the result with :meth:`apply_best_params`.

        Args:
            callbacks: called with each finished trial's :class:`TrialRecord`
                (for loggers and progress displays).
        """
        self.interrupted = False
        self.combination_log = []
        self._best_by_study = {}
        search = self.search_algorithm
        search.studies = {}
        deadline = None if search.timeout is None else time.monotonic() + search.timeout
        try:
            with _quiet_optuna(), _sigterm_as_interrupt():
                for run in self._studies:
                    run.study = search.open_study(run.key)
                try:
                    self._baseline()
                    for run in self._studies:
                        assert run.study is not None
                        if search.uses_default_sampler and not run.study.get_trials(deepcopy=False):
                            # warm start: the most accurate plan first, so the sampler learns
                            # early where the floor lies (its speed is then the one to beat)
                            run.study.enqueue_trial(self._safest(run))
                    for run in self._studies:
                        assert run.study is not None
                        search.study = run.study  # the study being tuned, as in the seed
                        for trial in run.study.get_trials(
                            deepcopy=False, states=(TrialState.COMPLETE,)
                        ):
                            self._remember(run, trial)
                        search.run(
                            run.study,
                            self._objective(run),
                            deadline=deadline,
                            catch=(_TrialFailed, _OverBudget),
                            after_trial=self._report(run, callbacks),
                        )
                except KeyboardInterrupt:
                    self.interrupted = True
                    self._say(self._resume_hint())
            self._records = None
            self._finish()
        finally:
            self.evaluator.finish()

    def _remember(self, run: _StudyPlan, trial: FrozenTrial) -> TrialRecord:
        """Keep ``trial`` as its study's best if it is feasible and beats the best so far."""
        record = record_from_trial(run.label, trial)
        best = self._best_by_study.get(run.label)
        # A sketch that is not faster than the dense layer is never worth adopting.
        useful = record.feasible and (record.speedup is None or record.speedup > 1.0)
        if useful and (best is None or self._rank(record) > self._rank(best)):
            self._best_by_study[run.label] = record
        return record

    def _rank(self, record: TrialRecord) -> float:
        """Larger is better: the speedup, else the accuracy (negated for ``mode='min'``)."""
        if record.speedup is not None:
            return float(record.speedup)
        accuracy = float(record.accuracy if record.accuracy is not None else -math.inf)
        return accuracy if self.mode == "max" else -accuracy

    def _baseline(self) -> None:
        stored = [
            run.study.user_attrs[_STUDY_DENSE]
            for run in self._studies
            if run.study is not None and _STUDY_DENSE in run.study.user_attrs
        ]
        if stored and not (self._calibrate and not self._calibrated):
            self.dense_accuracy = float(stored[0])
            self._say(f"dense accuracy {self.dense_accuracy:.6g} (stored in the study)")
        else:
            self.floor = AccuracyFloor(None, self.mode)  # nothing to stop early against yet
            try:
                self.dense_accuracy = self._evaluate(
                    SketchPlan(), None, measure_speed=False
                ).accuracy
            except _TrialFailed as exc:
                raise ValueError(
                    f"the dense model's accuracy is not finite ({exc}); check the evaluation."
                ) from None
            for run in self._studies:
                assert run.study is not None
                run.study.set_user_attr(_STUDY_DENSE, self.dense_accuracy)
            self._say(f"dense accuracy {self.dense_accuracy:.6g}")
        self.floor = AccuracyFloor.resolve(
            threshold=self.accuracy_threshold,
            max_drop=self.max_accuracy_drop,
            baseline=self.dense_accuracy,
            mode=self.mode,
        )
        if self.floor.value is not None and not self.floor.feasible(self.dense_accuracy):
            raise ValueError(
                f"accuracy_threshold={self.floor.value:.6g} is out of reach: the dense model itself "
                f"scores {self.dense_accuracy:.6g}. Use a threshold the dense model meets, or "
                "max_accuracy_drop for a floor relative to it."
            )
        if self.floor.value is None and (self.evaluator.has_throughput or self.speed_model):
            warnings.warn(
                "no accuracy floor is set (accuracy_threshold / max_accuracy_drop): the fastest "
                "configuration wins whatever its accuracy.",
                UserWarning,
                stacklevel=3,
            )
        self._say(f"accuracy floor: {self.floor.describe()}")

    def _resume_hint(self) -> str:
        search = self.search_algorithm
        kept = sum(search.counted_trials(s) for s in search.studies.values())
        if search.storage is None:
            where = "in memory (tuner.search_algorithm.studies); pass a storage URL to resume in a later run"
        else:
            where = (
                f"in {redact(search.storage)!r}; run again with the same storage, "
                f"study_name={search.study_name!r} and load_if_exists=True to resume"
            )
        return f"interrupted: the model is restored and {kept} finished trial(s) are kept {where}."

    def _finish(self) -> None:
        """Pick the best plan: the global winner, or the validated combination of per-study winners."""
        # Other workers may have finished trials of the same studies: judge all of them.
        for run in self._studies:
            if run.study is not None:
                for trial in run.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                    if "skipped" not in trial_info(trial):
                        self._remember(run, trial)
        bests = dict(self._best_by_study)
        self.best_accuracy = self.best_speedup = None
        if not bests:
            self.best_plan = SketchPlan()
            self._say(
                "no feasible configuration faster than the dense model was found; it stays dense."
            )
            return
        if len(self._studies) == 1 or len(bests) == 1:
            record = next(iter(bests.values()))
            study = self._studies[0].study if len(self._studies) == 1 else None
            agreed = _agreed_best(study) if study is not None else None
            if agreed is not None:
                record = agreed  # another worker already settled it for this study's trials
            elif (
                not self.interrupted and self.evaluator.has_throughput and self.speed_model is None
            ):
                record = self._confirm(record)
            if study is not None and not self.interrupted:
                record = _agree_on_best(study, record)
            self.best_plan = SketchPlan(record.plan)
            self.best_accuracy, self.best_speedup = record.accuracy, record.speedup
            self._say(f"best: {self.best_plan!r} ({_score_text(record)})")
            return
        if self.interrupted:
            self.best_plan = _union(bests.values())
            self._say("interrupted: the combined plan of the per-layer winners was not validated.")
            return
        self.best_plan = self._validated_combination(bests)
        if self.best_plan and self.combination_log:
            last = self.combination_log[-1]
            self.best_accuracy, self.best_speedup = last["accuracy"], last["speedup"]

    def _confirm(self, best: TrialRecord, candidates: int = 3) -> TrialRecord:
        """Re-measure the fastest feasible plans once more and keep the fastest.

        A single timed measurement per trial is noisy, and the maximum of many noisy
        measurements favours lucky ones (the winner's curse). The top ``candidates``
        distinct plans are measured again, interleaved with the dense model; their
        speedup is the mean of both measurements.
        """
        pool: dict[str, TrialRecord] = {}
        for record in sorted(self.records, key=lambda r: -(r.speedup or 0.0)):
            key = json.dumps(record.plan, sort_keys=True)
            if (
                record.feasible
                and record.plan
                and (record.speedup or 0.0) > 1.0
                and key not in pool
            ):
                pool[key] = record
            if len(pool) == candidates:
                break
        if len(pool) < 2:
            return best
        confirmed: list[TrialRecord] = []
        for record in pool.values():
            try:
                outcome = self._evaluate(SketchPlan(record.plan), None)
            except _TrialFailed:
                continue
            if outcome.feasible and outcome.speedup is not None:
                speedup = (outcome.speedup + (record.speedup or outcome.speedup)) / 2
                confirmed.append(dataclasses.replace(record, speedup=speedup, score=speedup))
        self.confirmation_log = [
            {"trial": r.trial, "layers": sorted(r.plan), "speedup": r.speedup} for r in confirmed
        ]
        if not confirmed:
            return best
        winner = max(confirmed, key=lambda r: r.speedup or 0.0)
        if winner.trial != best.trial:
            self._say(
                f"re-measured the {len(confirmed)} fastest plans: trial {winner.trial} "
                f"({winner.speedup:.2f}x) beats trial {best.trial}"
            )
        return winner

    def _validated_combination(self, bests: dict[str, TrialRecord]) -> SketchPlan:
        """Evaluate the union of per-study winners; drop the least efficient until it passes."""
        members = dict(bests)
        dense_acc = self.dense_accuracy if self.dense_accuracy is not None else 0.0
        while members:
            plan = _union(members.values())
            reason = ""
            try:
                outcome = self._evaluate(plan, None)
            except _TrialFailed as exc:
                outcome = None
                reason = str(exc)
            step: dict[str, Any] = {
                "layers": sorted(members),
                "accuracy": None,
                "speedup": None,
                "feasible": False,
            }
            if outcome is not None:
                step.update(
                    accuracy=outcome.accuracy, speedup=outcome.speedup, feasible=outcome.feasible
                )
            self.combination_log.append(step)
            if outcome is not None and outcome.feasible:
                speed_text = (
                    f", speedup {outcome.speedup:.2f}x" if outcome.speedup is not None else ""
                )
                self._say(
                    f"combined plan of {len(members)} study winner(s) passes: accuracy "
                    f"{outcome.accuracy:.4f} ({self.floor.describe()}){speed_text}"
                )
                return plan
            what = (
                f"accuracy {outcome.accuracy:.4f}" if outcome is not None else f"failed ({reason})"
            )
            drop = min(members, key=lambda label: self._efficiency(members[label], dense_acc))
            self._say(
                f"combined plan of {len(members)} winner(s) breaks the floor ({what}, "
                f"{self.floor.describe()}); backing off {drop!r}"
            )
            del members[drop]
        self._say("no combination of per-layer winners keeps the floor; the model stays dense.")
        return SketchPlan()

    def _efficiency(self, record: TrialRecord, dense_accuracy: float) -> float:
        """Speed gained per accuracy lost by one study's winner (the least efficient is backed off first)."""
        speedup = (
            record.speedup
            if record.speedup is not None
            else self.flops_speedup(SketchPlan(record.plan))
        )
        lost = abs(
            dense_accuracy - (record.accuracy if record.accuracy is not None else dense_accuracy)
        )
        return (speedup - 1.0) / max(lost, 1e-12)

    # ------------------------------------------------------------------ results

    @property
    def best_params(self) -> dict[str, dict[str, Any]]:
        """``{layer: {param: value}}`` of the best plan (empty before ``tune()``)."""
        if self.best_plan is None:
            return {}
        return {name: dict(layer.params) for name, layer in self.best_plan.items()}

    def get_best_params(self) -> dict[str, dict[str, Any]]:
        """Same as :attr:`best_params`."""
        return self.best_params

    def apply_best_params(self) -> nn.Module:
        """Swap the best sketched layers into the model (in place) and return it."""
        if self.best_plan is None:
            raise RuntimeError("call tune() (or load_tuning_results()) before apply_best_params().")
        if not self.best_plan:
            warnings.warn(
                "the best plan is empty (nothing kept the accuracy floor); the model stays dense.",
                UserWarning,
                stacklevel=2,
            )
            return self.model
        return self.apply(self.best_plan)

    def apply(self, plan: SketchPlan) -> nn.Module:
        """Swap ``plan``'s layers into the model (in place), built exactly as in the trials.

        Unlike :func:`~sketchtune.apply_plan`, this reuses the input statistics and
        factorizations gathered during the search, so ``init="activation"``
        layers are the ones that were measured.
        """
        Swap(self.model, build_replacements(self.model, plan, build=self.build)).apply()
        return self.model

    def replace_without_tuning(self) -> nn.Module:
        """Swap in every selected layer with the first value of each parameter space, untuned."""
        groups = [g for run in self._studies for g in run.groups]
        values = {g.key: {p: spec.first() for p, spec in g.space.items()} for g in groups}
        return apply_plan(self.model, self._plan_from(groups, values))

    @property
    def records(self) -> list[TrialRecord]:
        """Every trial of every study (including resumed ones), as rows of the results table."""
        if self._records is None:
            self._records = [
                record_from_trial(run.label, t)
                for run in self._studies
                if run.study is not None
                for t in run.study.get_trials(deepcopy=False)
                if t.state not in (TrialState.RUNNING, TrialState.WAITING)
                and "skipped" not in trial_info(t)
            ]
        return self._records

    def get_results_dataframe(self) -> Any:
        """A pandas DataFrame, one row per trial.

        Columns: ``layer_name``, one per parameter, ``accuracy``, ``speed``,
        ``speedup``, ``score`` (``-inf`` when infeasible), ``feasible``,
        ``trial``, ``state``, ``duration`` (seconds) and ``reason`` (why a trial failed).
        """
        from sketchtune.results import records_dataframe

        return records_dataframe(self.records)

    def print_model_tree(self) -> None:
        """Print the model with its sketched layers marked."""
        from sketchtune.results import format_model_tree

        print(format_model_tree(self.model))

    def save_tuning_results(self, path: str | os.PathLike[str]) -> None:
        """Write the results (every trial, the floor, the best plan) as JSON (never pickle)."""
        data = {
            "_type": _RESULTS_TYPE,
            "_version": _RESULTS_VERSION,
            "strategy": self.strategy,
            "dense_accuracy": self.dense_accuracy,
            "floor": {"value": self.floor.value, "mode": self.floor.mode},
            "records": [json_ready(asdict(r)) for r in self.records],
            "best_plan": None if self.best_plan is None else self.best_plan.to_dict(),
            "combination_log": self.combination_log,
        }
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=True)
            fh.write("\n")

    def load_tuning_results(self, path: str | os.PathLike[str]) -> None:
        """Read results written by :meth:`save_tuning_results` (no code is executed)."""
        where = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}.") from None
        if not isinstance(data, dict) or data.get("_type") != _RESULTS_TYPE:
            raise ValueError(
                f"{where} is not a sketchtune results file (no _type={_RESULTS_TYPE!r})."
            )
        version = data.get("_version")
        if not isinstance(version, int) or version > _RESULTS_VERSION:
            raise ValueError(
                f"{where} has results format version {version!r}; this sketchtune reads up to "
                f"{_RESULTS_VERSION}. Upgrade sketchtune to load it."
            )
        try:
            records = [TrialRecord(**{**r, "score": float(r["score"])}) for r in data["records"]]
            plan = None if data["best_plan"] is None else SketchPlan.from_dict(data["best_plan"])
            floor = AccuracyFloor(data["floor"]["value"], data["floor"]["mode"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is malformed: {exc}.") from None
        if plan is not None:
            missing = [n for n in plan if n not in self._dense]
            if missing:
                raise ValueError(
                    f"{where} was made for another model: it sketches {missing}, which this model "
                    "lacks (or has already sketched)."
                )
        self._records = records
        self.best_plan = plan
        self.floor = floor
        self.dense_accuracy = data.get("dense_accuracy")
        self.combination_log = list(data.get("combination_log") or [])


# ---------------------------------------------------------------------- helpers


def check_configs(
    model: nn.Module,
    configs: TuningConfigs | LayerConfig | Sequence[LayerConfig],
    *,
    strategy: Strategy | None = None,
    default_init: str = "sketch",
) -> list[str]:
    """Check ``configs`` against ``model`` as :class:`SKAutoTuner` would, before any work.

    Raises the same errors the tuner's constructor raises (no layer matched,
    values a layer cannot take, ...). Nothing is built or evaluated.

    Returns:
        The label of each study the search would run.
    """
    return SKAutoTuner(
        model, configs, lambda m: 0.0, strategy=strategy, default_init=default_init
    ).study_labels


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
        top = {p: max(space[p].grid()) for p in ("num_terms", "low_rank")}
    except (ValueError, TypeError):
        return
    if kind.sketch_macs(dense, top, ()) >= kind.dense_macs(dense, ()):
        budget = kind.dense_macs(dense, ()) / kind.sketch_macs(
            dense, {"num_terms": 1, "low_rank": 1}, ()
        )
        warnings.warn(
            f"{where} for layer {name!r} ({kind.describe(dense)}) reaches num_terms*low_rank >= "
            f"{budget:.1f}, where the sketch costs as much as the dense layer; those trials are "
            "measured but cannot be faster. Narrow the space, or use params='auto'.",
            UserWarning,
            stacklevel=5,
        )


_ACCURACY_ORDER = ("activation", "svd", "softmax", "relu", "sketch")


def _most_accurate(spec: ParamSpec) -> Any:
    """The value of ``spec`` that loses the least accuracy: the largest rank, the best init/kernel."""
    if isinstance(spec, Categorical):
        choices = spec.choices
        for preferred in _ACCURACY_ORDER:
            if preferred in choices:
                return preferred
        numbers = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        return max(numbers) if numbers else choices[0]
    try:
        return spec.grid()[-1]
    except ValueError:
        return getattr(spec, "high", spec.first())


_STUDY_BEST = "sketchtune:best"


def _agreed_best(study: optuna.Study) -> TrialRecord | None:
    """The best plan a worker stored for the study's current set of finished trials, if any."""
    stored = study.user_attrs.get(_STUDY_BEST)
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
    if not isinstance(stored, dict) or stored.get("finished") != finished:
        return None
    try:
        return TrialRecord(**stored["record"])
    except (KeyError, TypeError):
        return None


def _agree_on_best(study: optuna.Study, record: TrialRecord) -> TrialRecord:
    """Store ``record`` as the study's best unless a worker stored one first; return the stored one.

    Workers sharing a study finish together (they wait for each other's last
    trials), and re-measuring the fastest plans is noisy; this makes every
    worker report the same plan.
    """
    agreed = _agreed_best(study)
    if agreed is not None:
        return agreed
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
    study.set_user_attr(_STUDY_BEST, {"finished": finished, "record": json_ready(asdict(record))})
    return _agreed_best(study) or record


def _fan_in(dense: nn.Module) -> int:
    weight = dense.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight[0].numel())


def _covariance_hook(dense: nn.Module, cov: InputCovariance) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        if isinstance(dense, nn.Conv2d):
            cov.update_conv(args[0], dense.kernel_size, dense.stride, dense.padding, dense.dilation)  # type: ignore[arg-type]
        else:
            cov.update(args[0])

    return hook


def _joint_key(names: list[str]) -> str:
    return "+".join(names) if len(names) <= 3 else f"{names[0]}+...+{names[-1]}[{len(names)}]"


def _hashable(layer: LayerPlan) -> tuple[Any, ...]:
    return (layer.type, frozen_params_key(layer.params), layer.seed, layer.copy_weights)


def _versions(module: nn.Module) -> list[int]:
    """In-place version counters of a module's parameters: they change when anything trains it."""
    return [p._version for p in module.parameters()]


def _set_constraint(trial: optuna.Trial, violation: float) -> None:
    if hasattr(trial, "set_constraint"):
        trial.set_constraint("accuracy", violation)


def _constraint_of(trial: FrozenTrial) -> float:
    constraints = getattr(trial, "constraints", None)
    if constraints:
        return float(
            next(iter(constraints.values())) if isinstance(constraints, dict) else constraints[0]
        )
    return float(trial_info(trial).get("constraint", 0.0))


def _finished_twin(trial: optuna.Trial, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """A COMPLETE trial among ``trials`` (the study, read just before this trial) with the same parameters."""
    key = frozen_params_key(trial.params)
    for other in trials:
        if (
            other.state == TrialState.COMPLETE
            and other.number != trial.number
            and "accuracy" in trial_info(other)
            and frozen_params_key(other.params) == key
        ):
            return other
    return None


def _union(records: Iterator[TrialRecord] | Any) -> SketchPlan:
    layers: dict[str, Any] = {}
    for record in records:
        layers.update(record.plan)
    return SketchPlan(layers)


def _score_text(record: TrialRecord) -> str:
    if record.speedup is not None:
        return f"speedup {record.speedup:.2f}x at accuracy {record.accuracy:.4f}"
    return f"accuracy {record.accuracy:.4f}"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (a scheduler stopping the job, ``kill``) into Ctrl-C for the search's duration.

    The search then ends the way Ctrl-C ends it: the running trial is failed,
    the model is restored, finished trials stay in the study.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DropOurFailures(logging.Filter):
    """Optuna logs every failed trial with a traceback; ours carry a recorded reason instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (_TrialFailed, _OverBudget))


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's per-trial INFO lines (the tuner reports trials itself) for the duration."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna_logger = logging.getLogger("optuna")
    filt = _DropOurFailures()
    optuna_logger.addFilter(filt)
    try:
        yield
    finally:
        optuna_logger.removeFilter(filt)
        optuna.logging.set_verbosity(verbosity)
