"""OptunaSearch: the study, its storage, sampler and pruner, and the trial budget.

Optuna is the search engine; this class only configures it for sketch tuning:

- ``storage`` may be an RDB URL (``sqlite:///tune.db``, ``postgresql+psycopg://...``).
  Such storages get Optuna's heartbeat, so a trial left RUNNING by a crashed or
  killed process is failed once its heartbeat is stale, and its parameters are
  retried (``RetryFailedTrialCallback``).
- ``n_trials`` is the study's **total** budget: counted are COMPLETE and PRUNED
  trials and trials that failed for a recorded reason (a non-finite metric, say),
  never crashed ones. Re-running the same command against the same storage and
  ``study_name`` (with ``load_if_exists=True``) therefore finishes the budget,
  and several processes sharing one study share one budget.
- With several studies (one per layer for the ``separate`` strategy) each study
  is named ``f"{study_name}/{layer}"``, so storages never see duplicate names.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sketchtune._redact import redact
from sketchtune._search._trialinfo import counts_against_budget
from sketchtune._storage import open_rdb_storage
from sketchtune._validation import check_bool, check_choice, check_float, check_int, check_seed

__all__ = ["OptunaSearch", "open_rdb_storage", "redact"]


class OptunaSearch:
    """Optuna-backed search (the default): TPE unless another sampler is given.

    Args:
        n_trials: total trials per study (see the module doc for what counts).
        sampler: any Optuna sampler (TPE, CMA-ES, Random, Grid, NSGA-II, ...);
            ``None`` is ``TPESampler(seed=seed)``.
        pruner: an Optuna pruner, used when trials report intermediate values
            (per-trial fine-tuning in the Lightning callback).
        direction: must be ``"maximize"`` (speedup, or accuracy without a speed function).
        study_name: study name; with several studies, the prefix of their names.
        storage: ``None`` (in memory), an RDB URL, or an ``optuna.storages.BaseStorage``.
        load_if_exists: resume an existing study of the same name instead of failing.
        seed: seed of the default sampler and of the sketched layers' random matrices.
        timeout: wall-clock limit in seconds for the whole ``tune()`` call.
        heartbeat_interval: seconds between heartbeats of RDB storages (``None``: off).
        grace_period: seconds without heartbeat after which a RUNNING trial counts as
            crashed (default: ``2 * heartbeat_interval``).
        max_retry: how many times a crashed trial's parameters are retried.

    Attributes:
        study: the study being tuned (the most recently started one).
        studies: every study opened by the last ``tune()``, by key (layer or group name).
        snapshot: the current study's trials as read just before the running trial
            (one storage read per trial; the objective finds duplicates in it).

    Example:
        >>> from optuna.samplers import RandomSampler
        >>> search = OptunaSearch(n_trials=20, sampler=RandomSampler(seed=0))
        >>> search.n_trials
        20
    """

    def __init__(
        self,
        n_trials: int | None = 100,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
        direction: str = "maximize",
        study_name: str | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        load_if_exists: bool = False,
        seed: int | None = None,
        timeout: float | None = None,
        *,
        heartbeat_interval: int | None = 10,
        grace_period: int | None = None,
        max_retry: int = 2,
    ) -> None:
        self.n_trials = None if n_trials is None else check_int("n_trials", n_trials, minimum=1)
        if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
            raise TypeError(f"`sampler` must be an Optuna sampler, got {type(sampler).__name__}.")
        if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"`pruner` must be an Optuna pruner, got {type(pruner).__name__}.")
        check_choice("direction", direction, ("maximize",))
        if study_name is not None and (not isinstance(study_name, str) or not study_name):
            raise ValueError(f"`study_name` must be a non-empty string, got {study_name!r}.")
        if storage is not None and not isinstance(storage, (str, optuna.storages.BaseStorage)):
            raise TypeError(
                f"`storage` must be None, an RDB URL string or an Optuna storage, got {type(storage).__name__}."
            )
        self.seed = check_seed("seed", seed)
        self.timeout = (
            None
            if timeout is None
            else check_float("timeout", timeout, minimum=0.0, min_inclusive=False)
        )
        self.heartbeat_interval = (
            None
            if heartbeat_interval is None
            else check_int("heartbeat_interval", heartbeat_interval, minimum=1)
        )
        self.grace_period = (
            None if grace_period is None else check_int("grace_period", grace_period, minimum=1)
        )
        if (
            self.grace_period is not None
            and self.heartbeat_interval is not None
            and self.grace_period <= self.heartbeat_interval
        ):
            raise ValueError(
                f"`grace_period`={self.grace_period} must exceed `heartbeat_interval`="
                f"{self.heartbeat_interval}: a live trial beats only every heartbeat_interval "
                "seconds, so a shorter grace period fails trials that are still running. Use "
                f"grace_period >= {2 * self.heartbeat_interval} (or leave it None for that default)."
            )
        self.max_retry = check_int("max_retry", max_retry, minimum=0)
        self.uses_default_sampler = sampler is None
        self.sampler = sampler if sampler is not None else default_sampler(seed, self.n_trials)
        self.pruner = pruner
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.load_if_exists = check_bool("load_if_exists", load_if_exists)
        self.study: optuna.Study | None = None
        self.studies: dict[str, optuna.Study] = {}
        self._storage_obj: optuna.storages.BaseStorage | None = None
        self.snapshot: list[FrozenTrial] = []
        self._warned_shared_sampler = False

    @classmethod
    def coerce(cls, value: Any) -> OptunaSearch:
        """``value`` itself, or the default search for ``None`` (``search_algorithm=`` of the tuner)."""
        if value is None:
            return cls()
        if not isinstance(value, cls):
            raise TypeError(
                f"`search_algorithm` must be an OptunaSearch, got {type(value).__name__} "
                f"{value!r}; pass OptunaSearch(n_trials=..., sampler=...) or leave it out."
            )
        return value

    def __repr__(self) -> str:
        return (
            f"OptunaSearch(n_trials={self.n_trials}, sampler={type(self.sampler).__name__}, "
            f"study_name={self.study_name!r}, storage={redact(self.storage)!r})"
        )

    # -- storage and studies -------------------------------------------------------------

    def start(self) -> None:
        """Forget the studies of an earlier search (called when a search begins)."""
        self.study = None
        self.studies = {}

    def set_current(self, study: optuna.Study) -> None:
        """Mark ``study`` as the one being tuned (``search.study``, as in the seed)."""
        self.study = study

    def open_storage(self) -> optuna.storages.BaseStorage | None:
        """The storage object, created once (``None`` means in memory)."""
        if self.storage is None or isinstance(self.storage, optuna.storages.BaseStorage):
            return self.storage
        if self._storage_obj is None:
            self._storage_obj = open_rdb_storage(
                self.storage,
                heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period,
                max_retry=self.max_retry,
            )
        return self._storage_obj

    def check_storage(self) -> None:
        """Open the storage now (a wrong URL or a missing driver is an error before any work)."""
        self.open_storage()

    def study_name_for(self, key: str | None) -> str | None:
        if key is None:
            return self.study_name
        if self.study_name is None:
            return None if self.storage is None else f"sketchtune/{key}"
        return f"{self.study_name}/{key}"

    def open_studies(self, keys: Sequence[str | None]) -> list[optuna.Study]:
        """Open one study per key (:meth:`open_study`), each with a sampler of its own.

        A single study runs the configured sampler itself. Several studies (one per
        layer) each get a copy: samplers keep state that belongs to one study (TPE's
        and CMA-ES's intersection search space refuses a second study; NSGA-II's
        generation cache and GP's fitted models are per study), see :func:`clone_sampler`.
        """
        if len(keys) <= 1:
            return [self.open_study(key) for key in keys]
        return [self.open_study(key, sampler=self._sampler_copy(len(keys))) for key in keys]

    def _sampler_copy(self, studies: int) -> optuna.samplers.BaseSampler:
        clone = clone_sampler(self.sampler)
        if clone is not None:
            return clone
        if not self._warned_shared_sampler:
            self._warned_shared_sampler = True
            warnings.warn(
                f"`sampler` ({type(self.sampler).__name__}) cannot be copied, so its one instance "
                f"serves all {studies} studies in turn and any per-study state it keeps is "
                "shared. Give the class a __deepcopy__ (or make it copyable), or use "
                "strategy='global' (one study).",
                UserWarning,
                stacklevel=3,
            )
        return self.sampler

    def open_study(
        self, key: str | None, *, sampler: optuna.samplers.BaseSampler | None = None
    ) -> optuna.Study:
        """Create (or, with ``load_if_exists``, load) the study for ``key`` (``None``: the only one).

        Args:
            key: the layer or group the study tunes (``None``: the only study).
            sampler: the study's sampler (default: the configured one itself).
        """
        name = self.study_name_for(key)
        if sampler is None:
            sampler = self.sampler
        try:
            study = optuna.create_study(
                storage=self.open_storage(),
                sampler=sampler,
                pruner=self.pruner,
                study_name=name,
                direction="maximize",
                load_if_exists=self.load_if_exists,
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise ValueError(
                f"study {name!r} already exists in storage {redact(self.storage)!r}; pass "
                "load_if_exists=True to resume it, or choose another study_name."
            ) from None
        if self.uses_default_sampler and self.seed is not None:
            # A resumed study with a re-seeded sampler would replay the first run's
            # suggestions; continue the seeded sequence from where the study stands instead.
            done = len(study.get_trials(deepcopy=False))
            if done:
                study.sampler = default_sampler((self.seed + done) % 2**32, self.n_trials)
        self.study = study
        self.studies[key or name or "study"] = study
        return study

    # -- budget ----------------------------------------------------------------------------

    def counted_trials(self, study: optuna.Study) -> int:
        """Trials that used up budget: COMPLETE, PRUNED, and FAIL with a recorded reason."""
        return sum(1 for t in study.get_trials(deepcopy=False) if counts_against_budget(t))

    def remaining(self, trials: Sequence[FrozenTrial]) -> int | None:
        """Trials still to run given the study's ``trials`` (``None``: unlimited); RUNNING ones count as used."""
        if self.n_trials is None:
            return None
        used = sum(1 for t in trials if counts_against_budget(t) or t.state == TrialState.RUNNING)
        return max(0, self.n_trials - used)

    def run(
        self,
        study: optuna.Study,
        objective: Callable[[optuna.Trial], float],
        *,
        deadline: float | None,
        catch: tuple[type[Exception], ...],
        after_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        """Run trials of ``study`` until its budget, the deadline or the grid is exhausted.

        Before each trial the study's trials are read once; ``snapshot`` keeps them
        for the objective (duplicate detection), so a trial costs one storage read.
        """
        callbacks = [] if after_trial is None else [after_trial]
        while True:
            self.snapshot = study.get_trials(deepcopy=False)
            left = self.remaining(self.snapshot)
            if left is not None and left <= 0:
                if not self._wait_for_running(study, deadline):
                    return
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return
            if grid_exhausted(study.sampler, study):
                return
            study.optimize(
                objective, n_trials=1, catch=catch, callbacks=callbacks, gc_after_trial=False
            )

    def over_budget(self, trial: optuna.Trial) -> bool:
        """Whether ``trial``, just asked, lies beyond the budget because other processes asked first.

        The check before asking counts RUNNING trials, but two processes can still
        ask at the same moment; the trial numbers settle who was first.
        """
        if self.n_trials is None or self.storage is None:
            return False  # one process per in-memory study: nobody else asks
        used = 0
        for other in trial.study.get_trials(deepcopy=False):
            if other.number < trial.number and (
                counts_against_budget(other)
                or other.state in (TrialState.RUNNING, TrialState.WAITING)
            ):
                used += 1
        return used >= self.n_trials

    def _wait_for_running(self, study: optuna.Study, deadline: float | None) -> bool:
        """With the budget used up but trials still RUNNING elsewhere, wait for them to end.

        A RUNNING trial may belong to a live worker (it will finish) or to a
        crashed one (its heartbeat goes stale, Optuna fails it, and the retry
        callback re-enqueues its parameters, which frees budget for this process).
        Returns whether the loop should continue. Without a heartbeat nothing
        can tell a crashed trial from a live one, so it does not wait.
        """
        if self._storage_obj is None or self.heartbeat_interval is None:
            return False
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or (deadline is not None and time.monotonic() >= deadline):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        time.sleep(min(1.0, float(self.heartbeat_interval)))
        return True


def default_sampler(seed: int | None, n_trials: int | None = None) -> optuna.samplers.BaseSampler:
    """Multivariate TPE, its random start-up scaled to the budget.

    Layer parameters interact (and a layer's switch decides whether its other
    parameters exist), so the sampler models them jointly (``multivariate``,
    ``group``). Optuna's default of 10 random start-up trials would leave a
    12-trial budget nearly unguided; a quarter of the budget (3 to 10) is used.
    The floor violation each trial records (``Trial.set_constraint``) steers it.
    """
    startup = 10 if n_trials is None else max(3, min(10, n_trials // 4))
    kwargs: dict[str, Any] = {
        "seed": seed,
        "n_startup_trials": startup,
        "multivariate": True,
        "group": True,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(**kwargs)


# Process resources a sampler may hold: they guard its state across threads, they do not
# belong to a study, and they cannot be copied (Optuna 5.1's NSGA-II/III hold a Lock).
_SHARED_TYPES: tuple[type, ...] = (
    type(threading.Lock()),
    type(threading.RLock()),
    threading.Condition,
    threading.Event,
    threading.Semaphore,
)


def clone_sampler(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler | None:
    """A copy of ``sampler`` with per-study state of its own, or ``None`` when it cannot be copied.

    Everything is deep-copied (search-space caches, generation caches, random state)
    except thread locks and other synchronization objects, which are shared: they hold
    no study's state, and a lock cannot be copied.
    """
    memo: dict[int, Any] = {id(obj): obj for obj in _shared_parts(sampler)}
    try:
        return copy.deepcopy(sampler, memo)
    except Exception:  # a user's sampler holding a socket, a connection, ...
        return None


def _shared_parts(root: Any) -> list[Any]:
    """The synchronization objects reachable from ``root``'s attributes and containers."""
    found: list[Any] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _SHARED_TYPES):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return found


def grid_exhausted(sampler: optuna.samplers.BaseSampler, study: optuna.Study) -> bool:
    if isinstance(sampler, optuna.samplers.GridSampler):
        return bool(sampler.is_exhausted(study))
    return False
