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

This module is the front end (arguments, ``tune``, results). The work is done by
the private subpackages ``sketchtune._search`` (studies, plan building, judging,
the objective, timing and confirmation, choosing the kept plan; see its
``__init__``) and ``sketchtune._planner`` (the planned global search).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import optuna
from torch import nn

from sketchtune._planner import Planner
from sketchtune._search._best import BestTracker, Decision, finish
from sketchtune._search._builder import PlanBuilder
from sketchtune._search._events import Events, Listener, Phase
from sketchtune._search._judge import Judge
from sketchtune._search._kept import KeptTrial, record_kept
from sketchtune._search._objective import (
    WORKER,
    quiet_optuna,
    resume_hint,
    sigterm_as_interrupt,
)
from sketchtune._search._outcome import TuningOutcome
from sketchtune._search._resume import check_baseline, open_studies
from sketchtune._search._strategies import observed_layers_for, run_search
from sketchtune._search._studies import Strategy, StudyLayout, StudySpec, check_configs
from sketchtune._validation import check_choice, check_float, check_int, check_seed, warn
from sketchtune.config import LayerConfig, TuningConfigs
from sketchtune.evaluate import (
    Evaluator,
    Mode,
    check_floor_args,
    make_evaluator,
)
from sketchtune.nn import INITS
from sketchtune.plan import SketchPlan, Swap, apply_plan, build_replacements
from sketchtune.registry import BuildAids
from sketchtune.results import TrialRecord
from sketchtune.search import OptunaSearch

__all__ = ["SKAutoTuner", "check_configs"]

SpeedSpec = Callable[[nn.Module], Any] | Literal["flops"] | None


class SKAutoTuner(TuningOutcome):
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
            config, shared parameters), ``"global"`` (one study over every layer,
            planned from predicted per-layer error and cost, then bisected and
            refined with real trials) or ``"sampler"`` (one study over every layer,
            the sampler alone). ``None`` follows each config's ``separate`` flag.
        seed: base seed of the sketches' random matrices (default: the search's
            seed, else 0). Each layer's seed is derived from it and the layer name.
        mode: ``"max"`` if higher accuracy is better, ``"min"`` for a loss.
        default_init: the ``init`` of Linear/Conv2d sketches whose space does not
            search one (and whose config copies the dense weights): ``"svd"`` (truncated
            SVD of the trained weight, the callback's default too), ``"activation"``
            (input statistics are then gathered once, during the dense baseline) or
            ``"sketch"`` (the seed's random-projection start, which on trained layers
            rarely keeps a floor: see the README's init table).
        statistics_budget: the input statistics kept for a layer (``init="activation"``,
            the planner's error predictions) may take this many times the layer's
            weight bytes; a layer over it is planned from its weight's SVD alone, said
            once. Layers with many inputs keep a streamed low-rank sketch sized by the
            largest rank searched, not the full Gram (see :class:`InputCovariance`).
        optmization_eval_func: deprecated misspelling of ``optimization_eval_func``.

    Attributes:
        best_plan: the validated best :class:`SketchPlan` after ``tune()``.
        best_accuracy: its accuracy (``None`` when nothing was kept).
        best_speedup: its speedup over the dense model (``None`` without a speed objective).
        dense_accuracy: the dense model's accuracy (when it was measured).
        floor: the resolved :class:`AccuracyFloor`.
        interrupted: ``True`` when the last ``tune()`` was stopped by Ctrl-C.
        confirmation: with timed speed, the interleaved measurement that confirmed the
            kept plan (``speedup`` = ``best_speedup``, ``lower``, ``upper``, throughputs,
            ``rounds``), on this machine in this run.
        kept: a :class:`~sketchtune._search._kept.KeptTrial`: the kept plan, its trial and
            its confirmed figures, as written to the study's ``"sketchtune:kept"`` user
            attribute (Optuna's ``study.best_trial`` may name another trial: see the README).
        verdict: one line: what was kept, or why the model stays dense.
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
        >>> best = tuner.tune()
        >>> sorted(best["0"]["params"].items())
        [('low_rank', 16), ('num_terms', 1)]
        >>> tuner.best_params["0"]["params"] == best["0"]["params"]
        True
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
        default_init: str = "svd",
        statistics_budget: float = 4.0,
        optmization_eval_func: SpeedSpec = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.configs = TuningConfigs.coerce(configs)
        self.search_algorithm = OptunaSearch.coerce(search_algorithm)
        self.verbose = bool(verbose)
        self.num_runs_per_param = check_int("num_runs_per_param", num_runs_per_param, minimum=1)
        self.strategy = (
            None
            if strategy is None
            else check_choice("strategy", strategy, ("separate", "joint", "global", "sampler"))
        )
        self.mode: Mode = check_choice("mode", mode, ("max", "min"))
        check_floor_args(accuracy_threshold, max_accuracy_drop)
        self.accuracy_threshold = None if accuracy_threshold is None else float(accuracy_threshold)
        self.max_accuracy_drop = max_accuracy_drop
        evaluator, speed_model = make_evaluator(
            accuracy_eval_func, optimization_eval_func, misspelled=optmization_eval_func
        )
        self.default_init = check_choice("default_init", default_init, INITS)
        base = check_seed("seed", seed)
        self.seed = base if base is not None else (self.search_algorithm.seed or 0)

        # Resolve everything that can be wrong before any trial runs.
        self._layout = StudyLayout(
            model,
            self.configs,
            strategy=self.strategy,
            default_init=self.default_init,
            seed=self.seed,
        )
        self._studies: list[StudySpec] = self._layout.specs
        calibrate, capture = observed_layers_for(self.strategy, self._layout)
        budget = check_float("statistics_budget", statistics_budget, minimum=0.0)
        self._builder = PlanBuilder(
            self._layout.dense,
            self._layout.max_rank,
            calibrate,
            capture=capture,
            statistics_budget=budget,
        )
        #: the planner of a ``strategy="global"`` search (options, frontier, timings) after tune()
        self.planner: Planner | None = None
        self._judge = Judge(
            model,
            evaluator,
            self._builder,
            self._layout.kinds,
            speed_model=speed_model,
            runs=self.num_runs_per_param,
            mode=self.mode,
        )
        self.dense_accuracy: float | None = None
        self.interrupted = False
        self._records: list[TrialRecord] | None = None
        self._optuna_studies: dict[str, optuna.Study] = {}
        self._events = Events(verbose=self.verbose)
        #: what the last tune() kept, as recorded in its study (``study.user_attrs["sketchtune:kept"]``)
        self.kept: KeptTrial | None = None
        #: the last tune()'s decision (or the one a results file holds)
        self.decision: Decision | None = None

    # ------------------------------------------------------------------ read-only views

    @property
    def evaluator(self) -> Evaluator:
        return self._judge.evaluator

    @property
    def speed_model(self) -> Literal["flops"] | None:
        return self._judge.speed_model

    @property
    def _speed_kind(self) -> str | None:
        """``"flops"``, ``"measured"`` or ``None``: what a trial's speedup is."""
        if self.speed_model is not None:
            return self.speed_model
        return "measured" if self.evaluator.has_throughput else None

    @property
    def phases(self) -> list[Phase]:
        """The phases of the last ``tune()`` (baseline, planner, trials, confirmation), timed."""
        return list(self._events.finished)

    @property
    def study_labels(self) -> list[str]:
        """One label per Optuna study the search runs (a layer, a joint group, or ``"global"``)."""
        return [spec.label for spec in self._studies]

    @property
    def _aids(self) -> dict[str, BuildAids]:
        return self._builder.aids

    def layer_seed(self, name: str) -> int:
        """The seed of ``name``'s random matrices: a stable hash of the base seed and the name."""
        return self._layout.layer_seed(name)

    def build(self, plan: SketchPlan) -> dict[str, nn.Module]:
        """Sketched modules for ``plan``, reused from earlier trials when untouched since."""
        return self._builder.build(plan)

    def flops_speedup(self, plan: SketchPlan) -> float:
        """FLOP-model speedup of the whole model with ``plan`` applied (needs recorded shapes)."""
        return self._judge.flops_speedup(plan)

    def _say(self, message: str) -> None:
        self._events.say(message)

    # ------------------------------------------------------------------ tuning

    def tune(
        self,
        *,
        callbacks: Sequence[Callable[[TrialRecord], None]] = (),
        listeners: Sequence[Listener] = (),
    ) -> dict[str, dict[str, Any]]:
        """Run the search. The model is left as it was; apply the result with :meth:`apply_best_params`.

        Args:
            callbacks: called with each finished trial's :class:`TrialRecord`
                (for loggers and progress displays).
            listeners: receive the search's lines, trials and phase progress
                (:class:`sketchtune._search._events.Listener`; the Lightning callback's progress bars).

        Returns:
            The seed's per-layer mapping (:attr:`best_params`): for every tuned layer,
            ``{"params": {...}, "copy_weights", "accuracy", "speed", "score", "trial"}`` of the
            kept plan (joint groups: each member gets the shared params); a layer
            the kept plan leaves dense maps to ``{"params": None, ..., "score": -inf}``.
        """
        self._events = Events(verbose=self.verbose, listeners=listeners, trial_callbacks=callbacks)
        self.evaluator.progress = lambda unit: self._events.advance(unit=unit)
        self._judge.progress = lambda: self._events.advance(unit="round")
        self.interrupted = False
        search = self.search_algorithm
        search.start()
        self._judge.run_id = f"{WORKER}:{uuid.uuid4().hex[:8]}"
        best = BestTracker(self.mode, self._judge)
        deadline = None if search.timeout is None else time.monotonic() + search.timeout
        try:
            with quiet_optuna(), sigterm_as_interrupt():
                self._optuna_studies = open_studies(
                    search,
                    self._studies,
                    self._layout,
                    self.model,
                    self._events,
                    strategy=self.strategy,
                    metric=self.evaluator.metric_name,
                    mode=self.mode,
                    speed_model=self._speed_kind,
                )
                try:
                    self._baseline()
                    self.planner = run_search(
                        self.strategy,
                        self._layout,
                        self._optuna_studies,
                        self._judge,
                        self._builder,
                        search,
                        best,
                        seed=self.seed,
                        dense_accuracy=self.dense_accuracy,
                        deadline=deadline,
                        events=self._events,
                    )
                except KeyboardInterrupt:
                    self.interrupted = True
                    self._say(resume_hint(search))
            self._records = None
            try:
                self._finish(best)
            except KeyboardInterrupt:  # during a confirmation or the combination check
                self.interrupted = True
                self._say(resume_hint(search))
                self._finish(best)  # nothing more is measured once interrupted
        finally:
            self.evaluator.finish()
            self.evaluator.progress = None
            self._judge.progress = None
        return self.layer_results

    def follow(self) -> None:
        """Run the evaluations another process announces, until it finishes (DDP followers).

        Every other process builds the same tuner and calls ``follow()`` while the
        coordinator calls :meth:`tune`, so collective operations line up.
        """
        self._judge.follow()

    def _baseline(self) -> None:
        """The dense accuracy (measured; on resume, compared with the study's record) and the floor."""
        batches = self.evaluator.pass_batches()
        with self._events.phase("baseline", batches or 1, "batch" if batches else "pass"):
            self.dense_accuracy = self._judge.dense_accuracy()
            self._events.advance(unit="pass")
        over = self._builder.over_budget
        if over:
            shown = ", ".join(f"{n!r} ({b / 2**20:.0f} MiB)" for n, b in list(over.items())[:3])
            self._events.note(
                f"{len(over)} layer(s) would need input statistics above statistics_budget="
                f"{self._builder.statistics_budget:g}x their weight bytes ({shown}"
                f"{', ...' if len(over) > 3 else ''}); they are planned from their weights' "
                "SVD, and init='activation' falls back to 'svd' for them."
            )
        self._say(f"dense accuracy {self.dense_accuracy:.6g}")
        floor = self._judge.resolve_floor(
            self.dense_accuracy, threshold=self.accuracy_threshold, max_drop=self.max_accuracy_drop
        )
        self._say(f"accuracy floor: {floor.describe()}")
        check_baseline(
            self._optuna_studies, self._studies, self.dense_accuracy, floor, self._events
        )

    def _finish(self, best: BestTracker) -> None:
        """Pick the best plan: the global winner, or the validated combination of per-study winners."""
        with self._events.phase("confirmation", None, "round"):
            self._decide(best)

    def _decide(self, best: BestTracker) -> None:
        decision = finish(
            best,
            self._studies,
            self._optuna_studies,
            self.records,
            self._judge,
            selected=self._layout.dense.keys(),
            interrupted=self.interrupted,
            dense_accuracy=self.dense_accuracy,
            say=self._say,
        )
        self.decision = decision
        self.kept = record_kept(
            self._optuna_studies,
            plan=decision.plan.to_dict(),
            number=decision.trial,
            speedup=decision.speedup,
            confirmation=decision.confirmation,
            accuracy=decision.accuracy,
            floor=self.floor.describe(),
            speed_model=self._speed_kind,
            device=next((p.device for p in self.model.parameters()), None),
            verdict=decision.verdict,
        )

    def apply_best_params(self) -> nn.Module:
        """Swap the best sketched layers into the model (in place) and return it."""
        if self.best_plan is None:
            raise RuntimeError("call tune() (or load_tuning_results()) before apply_best_params().")
        if not self.best_plan:
            warn(f"the kept plan is empty: {self.verdict or 'the model stays dense.'}")
            return self.model
        return self.apply(self.best_plan)

    def apply(self, plan: SketchPlan) -> nn.Module:
        """Swap ``plan``'s layers into the model (in place), built exactly as in the trials.

        Unlike :func:`~sketchtune.apply_plan`, this reuses the input statistics and
        factorizations gathered during the search, so ``init="activation"``
        layers are the ones that were measured.
        """
        replacements = build_replacements(self.model, plan, build=self.build, bounded=False)
        Swap(self.model, replacements).apply()
        return self.model

    def replace_without_tuning(self) -> nn.Module:
        """Swap in every selected layer with the first value of each parameter space, untuned."""
        return apply_plan(self.model, self._layout.first_values_plan(), bounded=False)
