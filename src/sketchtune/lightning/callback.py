"""SketchTuneCallback: tune sketched layers inside ``trainer.fit`` / ``trainer.validate``.

A thin callback over :class:`~sketchtune.tuner.SKAutoTuner` (as Lightning's
``BatchSizeFinder`` is over ``tuner/batch_size_scaling.py``): it reads hooks and
trainer state, hands the tuner an evaluator built on the Trainer's own loops,
restores the trainer afterwards, and applies and logs the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from sketchtune._modes import restore_modes, save_modes
from sketchtune._search._resume import check_stored_searches
from sketchtune._search._studies import StudyLayout
from sketchtune._validation import check_choice, check_int, check_seed, warn
from sketchtune.config import LayerConfig, TuningConfigs
from sketchtune.evaluate import check_floor_args
from sketchtune.lightning._checkpoint import (
    PLAN_CHECKPOINT_KEY,
    PlanLoader,
    drop_stale_optimizer_state,
)
from sketchtune.lightning._checks import check_range, check_writable, without_password
from sketchtune.lightning._evaluator import missing_monitor
from sketchtune.lightning._search import SearchResult, run_search, tuned_module
from sketchtune.lightning._trainer_state import (
    check_launcher,
)
from sketchtune.lightning.module import SketchedModule
from sketchtune.plan import SketchPlan
from sketchtune.results import RunSummary
from sketchtune.search import OptunaSearch, redact
from sketchtune.tuner import SKAutoTuner

if TYPE_CHECKING:
    import pandas as pd
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
    from torch import nn

__all__ = ["DEFAULT_MAX_ACCURACY_DROP", "PLAN_CHECKPOINT_KEY", "SketchTuneCallback"]

#: the floor when neither ``accuracy_threshold`` nor ``max_accuracy_drop`` is given
DEFAULT_MAX_ACCURACY_DROP = 0.01


class SketchTuneCallback(Callback):
    """Search sketched replacements of chosen layers with Optuna, using the Trainer's loops.

    With ``run_on="fit_end"`` the search runs once ``trainer.fit`` has finished
    training (fine-tune, then tune); with ``run_on="validate"`` it runs when
    ``trainer.validate(model, datamodule)`` starts, on an already trained model.
    Each trial swaps a candidate plan into the LightningModule, runs the
    Trainer's validation loop and reads ``trainer.callback_metrics[monitor]``
    (what your ``validation_step`` logs) as its accuracy; trials that keep the
    floor are timed with ``predict_step`` over ``speed_batches`` batches of the
    predict (else validation) dataloader, interleaved with the dense model. The
    model, callbacks, loggers, loop state and metrics are restored afterwards;
    then the best plan is applied (``apply_best``) and logged.

    Checkpoints saved afterwards carry the plan. ``trainer.fit(MyModel(), dm,
    ckpt_path="tuned.ckpt")`` on a Trainer with this callback (or with
    :class:`SketchedModule`) rebuilds the sketched layers before the weights
    load and goes on training them, without searching again. The model may be a
    :class:`SketchedModule`; ``configs`` then name the layers of the module it wraps.
    Under DDP use ``strategy="ddp"`` or torchrun: spawn-based strategies hand only
    weights back to the main process, so they are refused before training starts.

    Args:
        configs: a :class:`TuningConfigs`, a :class:`LayerConfig`, or a list of
            them or of dicts (YAML): which layers, and the space of their parameters.
        monitor: the validation metric that measures accuracy.
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` for a loss.
        accuracy_threshold: absolute floor on ``monitor``.
        max_accuracy_drop: floor relative to the dense model (``0.01`` or ``"1%"``). When
            neither this nor ``accuracy_threshold`` is given, the floor is
            ``max_accuracy_drop=0.01`` (said in the run's log), never "any plan".
        n_trials: total trials of each study (kept across runs of the same study).
        timeout: seconds the search may take.
        sampler: an Optuna sampler (default TPE, seeded with ``seed``).
        pruner: an Optuna pruner for ``finetune_steps > 0`` (e.g. ``HyperbandPruner``).
        storage: Optuna storage URL (``sqlite:///tune.db``, ``postgresql+psycopg://...``);
            ``None`` keeps the study in this callback's memory, across Trainer runs.
        study_name: the study's name (default ``"sketchtune"``).
        strategy: ``"global"`` (one study over every layer, planned from per-layer
            error and cost predictions, then bisected and refined with real trials),
            ``"sampler"`` (one study over every layer, searched by ``sampler`` alone),
            ``"separate"`` or ``"joint"``; see :class:`SKAutoTuner`.
        speed: ``"measure"`` (timed predict loop) or ``"flops"`` (FLOP model, noise-free).
        speed_batches: timed batches per measurement.
        warmup_batches: untimed batches first.
        finetune_steps: optimizer steps of the user's ``training_step`` on the
            sketched layers in each trial, with one optimizer per trial from
            ``configure_optimizers`` and its LR schedulers stepped as Lightning
            steps them; intermediate accuracies go to the pruner. A trial's weights
            are discarded; the plan applied at the end is fine-tuned once more the
            same way, and ``best_accuracy`` (and the summary) is that model's
            accuracy: what is reported is what is left behind.
        run_on: ``"fit_end"`` or ``"validate"``.
        apply_best: swap the best plan into the model after the search.
        seed: seed of the default sampler and of the sketches' random matrices.
        default_init: how Linear/Conv2d sketches start when the space does not
            search ``init``: ``"svd"`` (truncated SVD; it won the end-to-end
            benchmark in ``benchmarks/init_quality.py``, needs no extra pass),
            ``"activation"`` (activation-aware SVD from input statistics gathered
            once during the dense validation; lowest per-layer error) or ``"sketch"``.
        output_dir: where to write the run's ``results.csv``, ``plan.json``,
            ``summary.md``, ``pareto.png`` and ``history.png`` (``None``: write nothing;
            the dense-vs-tuned table is printed either way).
        metric_range: the monitored metric's possible range, used to stop a trial's
            validation once it cannot reach the floor; needs ``validation_step`` to
            return the batch's metric (``return {"val_acc": acc}``). ``None`` disables that.

    Attributes:
        best_plan: the plan found (a :class:`SketchPlan`; empty when nothing kept the floor).
        best_speedup: its measured speedup over the dense model.
        best_accuracy: its accuracy.
        dense_accuracy: the dense model's accuracy.
        dense_test_metrics: what ``test_step`` logged for the dense model over the
            datamodule's (or model's) test dataloader, run after the search; ``None``
            without test batches. The search selects on the validation split, so this
            is the unbiased figure.
        tuned_test_metrics: the same for the tuned model (the applied plan).
        results: a pandas DataFrame, one row per trial.
        study: the (last) Optuna study.
        tuner: the :class:`SKAutoTuner` that ran the search.

    Example::

        trainer = Trainer(
            max_epochs=5,
            callbacks=[SketchTuneCallback(LayerConfig(r"layers\\.\\d+", "auto"), max_accuracy_drop=0.01)],
        )
        trainer.fit(model, datamodule)  # trains, then tunes; the model ends up sketched
        print(trainer.callbacks[0].best_speedup)
    """

    def __init__(
        self,
        configs: TuningConfigs | LayerConfig | Sequence[LayerConfig | Mapping[str, Any]],
        *,
        monitor: str = "val_acc",
        mode: Literal["max", "min"] = "max",
        accuracy_threshold: float | None = None,
        max_accuracy_drop: float | str | None = None,
        n_trials: int = 50,
        timeout: float | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        strategy: Literal["global", "sampler", "separate", "joint"] = "global",
        speed: Literal["measure", "flops"] = "measure",
        speed_batches: int = 20,
        warmup_batches: int = 3,
        finetune_steps: int = 0,
        run_on: Literal["fit_end", "validate"] = "fit_end",
        apply_best: bool = True,
        seed: int | None = None,
        metric_range: tuple[float, float] | None = (0.0, 1.0),
        default_init: Literal["sketch", "svd", "activation"] = "svd",
        output_dir: str | None = None,
    ) -> None:
        self.configs = TuningConfigs.coerce(configs)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be the name of a logged metric, got {monitor!r}.")
        self.monitor = monitor
        self.mode: Literal["max", "min"] = check_choice("mode", mode, ("max", "min"))
        check_floor_args(accuracy_threshold, max_accuracy_drop)
        #: the floor was not given: max_accuracy_drop=DEFAULT_MAX_ACCURACY_DROP stands in
        self.default_floor = accuracy_threshold is None and max_accuracy_drop is None
        self.accuracy_threshold = accuracy_threshold
        self.max_accuracy_drop = (
            DEFAULT_MAX_ACCURACY_DROP if self.default_floor else max_accuracy_drop
        )
        self.n_trials = check_int("n_trials", n_trials, minimum=1)
        self.timeout = timeout
        self.sampler = sampler
        self.pruner = pruner
        self.storage = storage
        if isinstance(storage, str) and redact(storage) != storage:
            rank_zero_warn(
                "sketchtune: `storage` holds a password. sketchtune shows and saves it as *** "
                "(logs, checkpoints, summary.md, the sketchtune command's config.yaml), but a "
                "plain LightningCLI's config.yaml, shell history and process lists keep it in "
                "clear, and a config saved with *** cannot reconnect. Leave it out of the URL: "
                "the PostgreSQL driver reads PGPASSWORD or ~/.pgpass, so "
                f"storage={without_password(storage)!r} with PGPASSWORD set connects.",
                category=UserWarning,
            )
        self.study_name = study_name
        self.strategy = check_choice(
            "strategy", strategy, ("global", "separate", "joint", "sampler")
        )
        self.speed = check_choice("speed", speed, ("measure", "flops"))
        self.speed_batches = check_int("speed_batches", speed_batches, minimum=1)
        self.warmup_batches = check_int("warmup_batches", warmup_batches, minimum=0)
        self.finetune_steps = check_int("finetune_steps", finetune_steps, minimum=0)
        self.run_on = check_choice("run_on", run_on, ("fit_end", "validate"))
        self.apply_best = bool(apply_best)
        self.seed = check_seed("seed", seed)
        self.metric_range = check_range(metric_range)
        if (
            accuracy_threshold is not None
            and self.metric_range is not None
            and not self.metric_range[0] <= float(accuracy_threshold) <= self.metric_range[1]
        ):
            raise ValueError(
                f"`accuracy_threshold`={accuracy_threshold!r} is outside `metric_range`="
                f"{self.metric_range}: no model can reach it. Give a threshold within the metric's "
                "range (accuracy is 0..1), or set metric_range=None for an unbounded metric."
            )
        self.default_init = check_choice(
            "default_init", default_init, ("sketch", "svd", "activation")
        )
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"`output_dir` must be a directory path or None, got {output_dir!r}.")
        self.output_dir = output_dir
        if pruner is not None and finetune_steps == 0:
            warn(
                "`pruner` is only used with finetune_steps > 0 (trials report intermediate "
                "accuracies while fine-tuning); it is ignored."
            )
        # Validate the search settings now, before any Trainer runs.
        self._search_settings()
        # An in-memory study lives as long as this callback, so later Trainer runs resume it.
        self._memory = optuna.storages.InMemoryStorage()

        self.best_plan: SketchPlan | None = None
        self.best_speedup: float | None = None
        self.best_accuracy: float | None = None
        self.dense_accuracy: float | None = None
        self.results: pd.DataFrame | None = None
        self.study: optuna.Study | None = None
        self.tuner: SKAutoTuner | None = None
        self.applied_plan: SketchPlan | None = None
        self.summary: RunSummary | None = None
        self.dense_test_metrics: dict[str, float] | None = None
        self.tuned_test_metrics: dict[str, float] | None = None
        self._searching = False
        self._plan_loader = PlanLoader(self._on_plan_loaded)
        self._modes: dict[nn.Module, bool] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, study_name=self.study_name)

    def _search_settings(self) -> OptunaSearch:
        return OptunaSearch(
            n_trials=self.n_trials,
            sampler=self.sampler,
            pruner=self.pruner,
            study_name=self.study_name or "sketchtune",
            storage=self.storage if self.storage is not None else getattr(self, "_memory", None),
            load_if_exists=True,
            seed=self.seed,
            timeout=self.timeout,
        )

    # -- hooks -------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        runs_here = (stage == TrainerFn.FITTING and self.run_on == "fit_end") or (
            stage == TrainerFn.VALIDATING and self.run_on == "validate"
        )
        if runs_here:
            check_launcher(trainer)
        if runs_here and not self.applied_plan:
            # Check the configs, the storage and the output folder now, not after hours of training.
            if trainer.limit_val_batches == 0:
                raise ValueError(
                    "`limit_val_batches`=0 leaves SketchTuneCallback no validation batches to "
                    "measure accuracy on; give the Trainer limit_val_batches > 0 (and a "
                    "val_dataloader)."
                )
            layout = StudyLayout(
                tuned_module(pl_module),
                self.configs,
                strategy=self.strategy,
                default_init=self.default_init,
                seed=0,
            )
            if trainer.is_global_zero:
                search = self._search_settings()
                search.check_storage()
                check_stored_searches(
                    search,
                    layout.specs,
                    layout,
                    strategy=self.strategy,
                    metric=self.monitor,
                    mode=self.mode,
                    speed_model="flops" if self.speed == "flops" else "measured",
                )
                if self.output_dir is not None:
                    check_writable(self.output_dir)
        if not isinstance(pl_module, SketchedModule):  # SketchedModule reads plans itself
            self._plan_loader.attach(pl_module)
        if stage == TrainerFn.VALIDATING and self.run_on == "validate":
            # validate() ends by restoring the mode it found; our nested runs would change
            # what it found, so remember the modes from before it started.
            self._modes = save_modes(pl_module)

    @override
    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The sanity check shows what validation_step logs: a monitor it does not log would
        # otherwise fail the search only after training.
        if (
            self.run_on == "fit_end"
            and trainer.state.fn == TrainerFn.FITTING
            and not self.applied_plan
            and self.monitor not in trainer.callback_metrics
        ):
            raise ValueError(
                missing_monitor(self.monitor, trainer.callback_metrics, step_only=False)
            )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.run_on == "fit_end"
            and trainer.state.fn == TrainerFn.FITTING
            and not self._searching
        ):
            self._search(trainer, pl_module, trainer.fit_loop.epoch_loop.val_loop)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.run_on == "validate"
            and trainer.state.fn == TrainerFn.VALIDATING
            and not trainer.sanity_checking
            and not self._searching
        ):
            self._search(trainer, pl_module, trainer.validate_loop)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._modes is not None and stage == TrainerFn.VALIDATING:
            restore_modes(self._modes)
            self._modes = None
        self._plan_loader.detach()

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._plan_loader.detach()  # teardown does not run after an exception
        if self._modes is not None:  # a failed trainer.validate() leaves the modes it found
            restore_modes(self._modes)
            self._modes = None

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.applied_plan is not None:
            checkpoint[PLAN_CHECKPOINT_KEY] = self.applied_plan.to_dict()
            # the Trainer's optimizer may still hold the dense layers: a resumed fit starts fresh
            drop_stale_optimizer_state(checkpoint, trainer.optimizers, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the storage only as it may be shown: a checkpoint never carries credentials
        return {
            "storage": redact(self.storage),
            "study_name": self.study_name,
            "best_plan": None if self.best_plan is None else self.best_plan.to_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint never chooses where the study lives: its study name is resumed only
        # when it was saved for the storage configured here (compared without credentials).
        if (
            self.storage is not None
            and self.study_name is None
            and state_dict.get("study_name")
            and state_dict.get("storage") == redact(self.storage)
        ):
            self.study_name = state_dict["study_name"]
        plan = state_dict.get("best_plan")
        if plan is not None and self.best_plan is None:
            self.best_plan = SketchPlan.from_dict(plan)

    def _on_plan_loaded(self, plan: SketchPlan) -> None:
        """A tuned checkpoint's plan is in the model now: remember it, never search again."""
        self.applied_plan = plan
        if self.best_plan is None:
            self.best_plan = plan

    # -- the search --------------------------------------------------------------------

    def _search(self, trainer: Trainer, pl_module: LightningModule, loop: _EvaluationLoop) -> None:
        if isinstance(pl_module, SketchedModule) and pl_module.plan and not self.applied_plan:
            self.applied_plan = pl_module.plan  # e.g. restored from a tuned checkpoint
        if self.applied_plan:  # a non-empty plan is in the model already
            rank_zero_info(
                "sketchtune: the model is already sketched (by an earlier search, a tuned "
                "checkpoint or SketchedModule's plan); not searching again."
            )
            return
        if self.default_floor:
            rank_zero_info(
                "sketchtune: no accuracy floor given; using max_accuracy_drop="
                f"{DEFAULT_MAX_ACCURACY_DROP} (plans may lose at most {DEFAULT_MAX_ACCURACY_DROP} "
                f"of the dense {self.monitor}). Set accuracy_threshold or max_accuracy_drop "
                "to choose another floor."
            )
        self._searching = True
        try:
            found = run_search(
                self,
                trainer,
                pl_module,
                loop,
                self._search_settings(),
                keep=self._keep,
            )
        finally:
            self._searching = False
        self._keep(found)  # now with the summary

    def _keep(self, found: SearchResult) -> None:
        """Hold what the search found; called as soon as the model holds the plan, and again."""
        self.tuner, self.study = found.tuner, found.search.study
        self.best_plan, self.best_speedup = found.plan, found.speedup
        self.best_accuracy, self.dense_accuracy = found.accuracy, found.tuner.dense_accuracy
        self.results, self.summary = found.results, found.summary
        self.dense_test_metrics, self.tuned_test_metrics = found.dense_test, found.tuned_test
        if self.apply_best:
            self.applied_plan = found.plan  # possibly empty: checkpoints then say "dense"
