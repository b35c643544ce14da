"""The planner behind strategy="global": closed-form sensitivity, the allocation frontier,
calibration with real trials, and resume (real Optuna studies, tiny trained models)."""

from __future__ import annotations

import copy
import itertools
import random
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, SketchPlan, TuningConfigs
from sketchtune._planner import (
    STUDY_ATTR,
    TAG,
    Candidate,
    GroupOptions,
    allocate,
    closed_form_errors,
)
from sketchtune.flops import estimate_speedup
from sketchtune.nn import InputCovariance, LowRankFactors
from sketchtune.plan import apply_plan

WIDTH = 96


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Correlated inputs (a few strong directions), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(48, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(
        0, -2, 48
    )
    return torch.randn(n, 48, generator=g) @ mix


@pytest.mark.parametrize("out_features", [40, 64])  # the Gram of either side
@pytest.mark.parametrize("init", ["svd", "activation"])
def test_closed_form_error_matches_the_measured_output_error_on_held_out_inputs(
    init: str, out_features: int
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, out_features, bias=False)
    calibration, held_out = _inputs(4096, 1), _inputs(4096, 2)
    cov = InputCovariance(48)
    cov.update(calibration)
    predicted = closed_form_errors(layer.weight.t(), cov)[init]
    weight_t = layer.weight.detach().t().double()
    reference = held_out.double() @ weight_t
    for rank in (2, 6, 12, 24):
        factors = LowRankFactors.compute(
            weight_t, rank, calibration=cov if init == "activation" else None
        )
        approx = held_out.double() @ (factors.P @ factors.Q)
        measured = float((approx - reference).square().sum() / reference.square().sum())
        assert predicted[rank] == pytest.approx(measured, rel=0.1), rank
    rank = min(48, out_features)
    assert len(predicted) == rank + 1
    assert predicted[0] == pytest.approx(1.0) and predicted[rank] == 0.0
    # the errors fall with the rank
    assert all(a >= b for a, b in itertools.pairwise(predicted))


def _random_options(groups: int, per_group: int, seed: int) -> list[GroupOptions]:
    rng = random.Random(seed)
    options = []
    for g in range(groups):
        dense = rng.uniform(50, 150)
        candidates = tuple(
            Candidate({"low_rank": i}, rng.uniform(0, 1) ** 2, rng.uniform(1, dense * 1.2))
            for i in range(per_group)
        )
        options.append(GroupOptions(f"g{g}", dense, candidates))
    return options


def _totals(options: list[GroupOptions], choice: list[int | None]) -> tuple[float, float]:
    error = cost = 0.0
    for option, chosen in zip(options, choice, strict=True):
        if chosen is None:
            cost += option.dense_cost
        else:
            error += option.candidates[chosen].error
            cost += option.candidates[chosen].cost
    return error, cost


def test_the_frontier_is_monotone_and_each_point_is_pareto_optimal() -> None:
    options = _random_options(3, 4, seed=3)
    frontier = allocate(options)
    assert frontier.errors[0] == 0.0 and frontier.costs[0] == sum(o.dense_cost for o in options)
    assert all(a <= b for a, b in itertools.pairwise(frontier.errors))
    assert all(a > b for a, b in itertools.pairwise(frontier.costs))
    # brute force over every assignment: nothing loses less and costs less than a frontier point
    every = [
        _totals(options, list(product))
        for product in itertools.product(*[[None, *range(len(o.candidates))] for o in options])
    ]
    for point in range(len(frontier)):
        error, cost = _totals(options, frontier.choice(point, len(options)))
        assert error == pytest.approx(frontier.errors[point])
        assert cost == pytest.approx(frontier.costs[point])
        # Pareto-optimal: no assignment loses no more and costs less
        assert not any(e <= error + 1e-12 and c < cost - 1e-9 for e, c in every)
    # a budget picks the most aggressive point within it, never one beyond it
    for budget in (0.0, 0.05, 0.3, 1.0, 10.0):
        point = max(j for j in range(len(frontier)) if frontier.errors[j] <= budget)
        assert frontier.errors[point] <= budget


def test_allocation_for_100_layers_takes_well_under_a_second() -> None:
    options = _random_options(100, 24, seed=0)
    start = time.perf_counter()
    frontier = allocate(options)
    assert time.perf_counter() - start < 0.25
    assert len(frontier) > 100


# ---------------------------------------------------------------------------- end to end


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(48, WIDTH)
        self.h1 = nn.Linear(WIDTH, WIDTH)
        self.h2 = nn.Linear(WIDTH, WIDTH)
        self.h3 = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in (self.h1, self.h2, self.h3):
            h = torch.relu(layer(h))
        out: torch.Tensor = self.out(h)
        return out


@pytest.fixture(scope="module")
def trained() -> tuple[Net, torch.Tensor, torch.Tensor]:
    """A small network trained on a synthetic 8-class task (fixed seeds, about a second)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 8))
    x = _inputs(3000, 5)
    with torch.no_grad():
        y = teacher(x * 3).argmax(1)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(0, 2000, (128,))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), x[2000:], y[2000:]


def _accuracy(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return accuracy


HIDDEN = ["h1", "h2", "h3"]


def _tuner(net: nn.Module, x: torch.Tensor, y: torch.Tensor, trials: int, **search) -> SKAutoTuner:  # type: ignore[no-untyped-def]
    return SKAutoTuner(
        net,
        TuningConfigs([LayerConfig(HIDDEN, "auto")]),
        _accuracy(x, y),
        max_accuracy_drop=0.01,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=trials, seed=0, **search),
    )


def test_the_planner_beats_the_best_uniform_rank_under_the_flop_model(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    accuracy = _accuracy(x, y)
    dense = accuracy(net)
    uniform = 1.0
    for rank in (1, 2, 3, 4, 6, 8, 12, 16, 24):  # the 'auto' ladder of a 96x96 layer
        plan = SketchPlan(
            {
                n: {
                    "type": "SKLinear",
                    "params": {"num_terms": 1, "low_rank": rank, "init": "svd"},
                    "seed": 0,
                }
                for n in HIDDEN
            }
        )
        model = apply_plan(copy.deepcopy(net), plan)
        if accuracy(model) >= dense - 0.01:
            uniform = max(uniform, estimate_speedup(model, x))
    tuner = _tuner(net, x, y, trials=12)
    tuner.tune()
    assert tuner.best_speedup is not None and tuner.best_accuracy is not None
    assert tuner.best_accuracy >= dense - 0.01
    assert tuner.best_speedup >= uniform > 1.0
    # every evaluation is a trial of the study, the planner's first ones tagged as frontier points
    study = tuner.search_algorithm.study
    assert study is not None and len(study.trials) == 12
    phases = [t.user_attrs.get(TAG, {}).get("phase") for t in study.trials]
    assert phases[0] == "frontier"
    assert tuner.planner is not None and not tuner.planner.loaded
    assert tuner.planner.allocate_seconds < 0.1
    assert len(tuner.get_results_dataframe()) == 12


def test_resume_reads_the_frontier_from_the_study_and_continues(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    storage = optuna.storages.InMemoryStorage()
    first = _tuner(net, x, y, trials=4, storage=storage, study_name="planned")
    first.tune()
    study = first.search_algorithm.study
    assert study is not None and STUDY_ATTR in study.user_attrs
    second = _tuner(net, x, y, trials=8, storage=storage, study_name="planned", load_if_exists=True)
    second.tune()
    assert second.planner is not None and second.planner.loaded
    assert second.planner.prepare_seconds == 0.0
    assert first.planner is not None and second.planner.frontier == first.planner.frontier
    resumed = second.search_algorithm.study
    assert resumed is not None and [t.number for t in resumed.trials] == list(range(8))
    # the bisection went on where it stood: no frontier point was evaluated twice
    points = [
        t.user_attrs[TAG]["point"]
        for t in resumed.trials
        if t.user_attrs.get(TAG, {}).get("phase") == "frontier"
    ]
    assert len(points) == len(set(points))


def test_the_sampler_strategy_keeps_the_raw_search(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    tuner = SKAutoTuner(
        net,
        TuningConfigs([LayerConfig(HIDDEN, "auto")]),
        _accuracy(x, y),
        max_accuracy_drop=0.01,
        optimization_eval_func="flops",
        strategy="sampler",
        search_algorithm=OptunaSearch(n_trials=3, seed=0),
    )
    tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None and tuner.planner is None
    assert not any(TAG in t.user_attrs for t in study.trials)
    assert study.trials[0].params["h1.low_rank"] == 16  # the most accurate plan first, as before


def test_attention_candidates_are_measured_and_priced_at_the_recorded_length() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    model = nn.Sequential()
    model.add_module("attn", attn)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.attn(x, x, x, need_weights=False)[0]
            return out

    wrapped = Wrap()
    x = torch.randn(4, 40, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = wrapped(x)

    def closeness(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - reference).square().mean())

    tuner = SKAutoTuner(
        wrapped,
        TuningConfigs([LayerConfig(["attn"], "auto")]),
        closeness,
        accuracy_threshold=-1.0,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=3, seed=0),
    )
    tuner.tune()
    assert tuner.planner is not None
    (option,) = tuner.planner.options
    features = sorted({c.params["num_random_features"] for c in option.candidates})
    # m * (2 Lq + 2 Lk) < 2 Lq Lk saves multiply-adds only below m = 20 at 40 tokens
    assert features and max(features) < 20
    assert all(0 < c.error < float("inf") for c in option.candidates)
    assert all(c.cost < option.dense_cost for c in option.candidates)


def test_a_worker_bisects_beside_a_point_another_worker_is_evaluating(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    storage = optuna.storages.InMemoryStorage()
    tuner = _tuner(net, x, y, trials=1, storage=storage, study_name="shared")
    tuner.tune()
    planner, study = tuner.planner, tuner.search_algorithm.study
    assert planner is not None and study is not None
    # another worker takes the next bisection point and is evaluating it (a RUNNING trial)
    first = planner.next(study.get_trials(deepcopy=False))
    assert first is not None and first.tag["phase"] == "frontier"
    study.enqueue_trial(first.params, user_attrs={TAG: first.tag})
    running = study.ask()
    assert running.user_attrs[TAG]["point"] == first.tag["point"]
    # this worker bisects one side of it instead of waiting on the same point
    second = planner.next(study.get_trials(deepcopy=False))
    assert second is not None and second.tag["phase"] == "frontier"
    assert second.tag["point"] != first.tag["point"]
    # when the running point finishes, the bisection goes on from what both found
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    assert planner.next(study.get_trials(deepcopy=False)).tag["point"] == first.tag["point"]  # type: ignore[union-attr]


class _Contended(optuna.storages.InMemoryStorage):
    """A storage where another worker's planner data lands right after this worker stores its own
    (two workers that started on one study together, the other one a moment slower)."""

    def __init__(self, theirs: dict[str, Any]) -> None:
        super().__init__()
        self.theirs = theirs

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        super().set_study_user_attr(study_id, key, value)
        if key == STUDY_ATTR and value is not self.theirs:
            super().set_study_user_attr(study_id, key, self.theirs)


def test_workers_starting_together_plan_from_the_options_the_study_holds(
    trained: tuple[Net, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    first = _tuner(net, x, y, trials=1)
    first.tune()
    study = first.search_algorithm.study
    assert study is not None and first.planner is not None
    theirs = copy.deepcopy(study.user_attrs[STUDY_ATTR])
    # the other worker's frontier differs (as timed costs can): one point fewer
    for key in ("errors", "costs"):
        theirs["frontier"][key] = theirs["frontier"][key][:-1]
    theirs["frontier"]["moves"] = theirs["frontier"]["moves"][:-1]
    storage = _Contended(theirs)
    second = _tuner(net, x, y, trials=6, storage=storage, study_name="together")
    second.tune()
    assert second.planner is not None and second.planner.loaded
    assert len(second.planner.frontier) == len(first.planner.frontier) - 1
    shared = second.search_algorithm.study
    assert shared is not None and shared.user_attrs[STUDY_ATTR] == theirs  # not overwritten
    for trial in shared.trials:  # every planned trial is read the same way by both workers
        tag = trial.user_attrs.get(TAG)
        if tag:
            assert trial.params == second.planner.params_of(tag["choice"])


def test_a_proposal_nobody_ran_is_failed_by_the_worker_that_enqueued_it(tmp_path: Path) -> None:
    from sketchtune._planner._run import ENQUEUED_BY, _drop_own_waiting
    from sketchtune._search._objective import WORKER

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.enqueue_trial({"x": 1}, user_attrs={ENQUEUED_BY: WORKER})
    study.enqueue_trial({"x": 2}, user_attrs={ENQUEUED_BY: "other-host:1"})
    _drop_own_waiting(study, storage)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # only its own
