"""What a search costs: phases with progress, reused timings, bounded statistics and modules."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner
from sketchtune._planner._options import Candidate, GroupOptions, dense_macs
from sketchtune._planner._prepare import _steady_costs
from sketchtune._search._events import Listener, Phase
from sketchtune.nn import InputCovariance, LowRankFactors, SKLinear

from .lightning.boring import Classifier, DataModule
from .lightning.test_callback import callback, trainer

X = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 256)
        self.c = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Recorder(Listener):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, float, float | None]] = []
        self.etas: list[float | None] = []

    def phase_start(self, phase: Phase) -> None:
        self.events.append(("start", phase.name, phase.done, phase.total))

    def phase_advance(self, phase: Phase) -> None:
        self.events.append(("advance", phase.name, phase.done, phase.total))
        self.etas.append(phase.eta)

    def phase_end(self, phase: Phase) -> None:
        self.events.append(("end", phase.name, phase.done, phase.total))


def agreement(model: nn.Module) -> object:
    with torch.no_grad():
        target = model(X).argmax(1)
    return lambda m: float((m(X).argmax(1) == target).float().mean())


def test_every_phase_reports_progress_in_order() -> None:
    torch.manual_seed(0)
    model = Wide()
    recorder = Recorder()
    tuner = SKAutoTuner(
        model,
        LayerConfig(["a", "b"], "auto"),
        agreement(model),  # type: ignore[arg-type]
        max_accuracy_drop=0.05,
        optimization_eval_func=lambda m: 200.0 if isinstance(m.b, SKLinear) else 100.0,
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=6, seed=0),
    )
    tuner.tune(listeners=[recorder])
    starts = [name for kind, name, *_ in recorder.events if kind == "start"]
    assert starts == ["baseline", "planner", "trials", "confirmation"]
    ends = {name: (done, total) for kind, name, done, total in recorder.events if kind == "end"}
    assert ends["baseline"] == (1, 1)  # one pass of a plain accuracy function
    assert ends["planner"] == (2, 2)  # one step per layer group priced
    assert ends["trials"] == (6, 6)
    assert [p.name for p in tuner.phases] == starts
    assert all(p.ended is not None and p.elapsed >= 0 for p in tuner.phases)
    took = [p.elapsed for p in tuner.phases]
    time.sleep(0.05)
    assert [p.elapsed for p in tuner.phases] == took  # a finished phase's time is frozen
    assert any(eta is not None and eta >= 0 for eta in recorder.etas)  # a pace, so an ETA


def test_the_callback_logs_one_line_per_phase_without_bars(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed_everything(0)
    model = Classifier()
    cb = callback(run_on="validate", strategy="global", sampler=None, n_trials=3)
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[cb]).validate(model, DataModule())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sketchtune: ")]
    for phase, count in [
        ("baseline", "4/4 batch(s)"),  # limit_val_batches=4: the validation loop's batches
        ("planner", "1/1 layer(s)"),
        ("trials", "3/3 trial(s)"),
        ("confirmation", "0 round(s)"),  # the FLOP model confirms nothing
    ]:
        assert any(line.startswith(f"sketchtune: {phase}: {count} in ") for line in lines), lines


def option(key: str, dense: float, costs: list[float], *, steady: bool) -> GroupOptions:
    candidates = tuple(
        Candidate({"num_terms": 1, "low_rank": r}, 0.1, c)
        for r, c in zip([2, 4, 8], costs, strict=True)
    )
    return GroupOptions(key, dense, candidates, steady=steady)


def test_an_unsteady_group_is_timed_again_then_priced_from_the_steady_ones() -> None:
    """Steady timings are kept; an unsteady group gets a second timing, then an estimate."""
    torch.manual_seed(0)
    model = Wide()
    tuner = SKAutoTuner(model, LayerConfig(["a", "b"], "auto"), lambda m: 1.0)
    groups = tuner._layout.groups
    recorded_calls = {"a": [((256, 64),)], "b": [((256, 256),)]}
    from sketchtune._planner._options import Recorded

    recorded = Recorded(calls=recorded_calls, covariance={}, samples={})
    priced: Counter[str] = Counter()

    def price(group: object, timed: bool) -> GroupOptions:
        key = group.key  # type: ignore[attr-defined]
        priced[key] += 1
        return option(key, 1e-3, [1e-4, 2e-4, 4e-4], steady=False)  # still unsteady

    steady = option("a", 2e-3, [1e-4, 2e-4, 4e-4], steady=True)
    first = [steady, option("b", 5.0, [0.1, 0.2, 0.3], steady=False)]
    out = _steady_costs(first, groups, price, tuner._layout.dense, recorded)
    assert out[0] is steady  # kept as timed
    assert priced == Counter({"b": 1})  # only the unsteady group, once more
    rate = steady.dense_cost / dense_macs(groups[0], tuner._layout.dense, recorded)
    assert out[1].estimated and out[1].steady
    assert out[1].dense_cost == pytest.approx(rate * 256 * 256 * 256)  # b's MACs at a's rate
    assert all(c.cost < out[1].dense_cost for c in out[1].candidates)


def test_a_sketched_covariance_is_small_and_serves_the_factorization() -> None:
    torch.manual_seed(0)
    features, d_out, rank = 512, 256, 48
    basis = torch.linalg.qr(torch.randn(features, features))[0]
    inputs = (torch.randn(2048, features) * torch.logspace(0, -3, features)) @ basis.t()
    weight_t = torch.randn(features, d_out) / features**0.5
    full, sketched = InputCovariance(features), InputCovariance(features, rank=rank)
    for chunk in inputs.split(256):  # streamed, batch by batch
        full.update(chunk)
        sketched.update(chunk)
    assert sketched.nbytes == features * (rank + InputCovariance.OVERSAMPLE) * 4
    assert full.nbytes == features * features * 4
    assert sketched.mean_eigenvalue == pytest.approx(full.mean_eigenvalue, rel=1e-5)

    def error(factors: LowRankFactors, r: int) -> float:
        approx = factors.P[:, :r].float() @ factors.Q[:r].float()
        residual = inputs @ (weight_t - approx)
        return float(residual.square().sum() / (inputs @ weight_t).square().sum())

    for r in (8, 32):
        exact = error(LowRankFactors.compute(weight_t, r, calibration=full), r)
        streamed = error(LowRankFactors.compute(weight_t, r, calibration=sketched), r)
        plain = error(LowRankFactors.compute(weight_t, r), r)
        assert streamed <= exact * 1.15  # nearly as good as the full statistics
        assert streamed < plain * 0.9  # and better than the weight's SVD alone


def test_statistics_are_freed_once_factorized_and_modules_kept_one_per_layer() -> None:
    torch.manual_seed(0)
    model = Wide()
    tuner = SKAutoTuner(
        model,
        LayerConfig(["a", "b"], "auto"),
        agreement(model),  # type: ignore[arg-type]
        max_accuracy_drop=0.05,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=8, seed=0),
    )
    tuner.tune()
    aids = tuner._builder.aids
    assert {"a", "b"} <= set(aids)
    assert all(a.calibration is not None and a.calibration.empty for a in aids.values())
    assert all(a.calibration.count == X.shape[0] for a in aids.values())  # one pass, freed
    assert all("activation" in a.factors for a in aids.values())  # what builds still need
    assert all(a.factors["activation"].P.dtype == torch.float32 for a in aids.values())
    assert len(tuner._builder._cache) <= 2  # one sketch per layer, however many trials


def test_a_layer_over_the_statistics_budget_is_planned_from_its_weight(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    model = Wide()
    tuner = SKAutoTuner(
        model,
        LayerConfig(["a", "b"], "auto"),
        agreement(model),  # type: ignore[arg-type]
        max_accuracy_drop=0.05,
        optimization_eval_func="flops",
        strategy="global",
        statistics_budget=0.01,
        verbose=True,
        search_algorithm=OptunaSearch(n_trials=4, seed=0),
    )
    tuner.tune()
    out = capsys.readouterr().out
    assert "2 layer(s) would need input statistics above statistics_budget=0.01x" in out
    assert set(tuner._builder.over_budget) == {"a", "b"}
    assert tuner.best_plan is not None


def test_a_conv_with_65536_inputs_per_output_tunes_under_6_gib(tmp_path: Path) -> None:
    """The second layer of the full CREPE pitch tracker: 1024 channels, a 64 x 1 kernel."""
    script = textwrap.dedent(
        """
        import resource, torch
        from torch import nn
        from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1024, 128, (64, 1)), nn.ReLU(), nn.Flatten(1))
        x = torch.randn(4, 1024, 96, 1)
        with torch.no_grad():
            target = model(x)
        def closeness(m):
            with torch.no_grad():
                out = m(x)
            return 1.0 - float((out - target).square().sum() / target.square().sum())
        tuner = SKAutoTuner(model, LayerConfig(["0"], "auto"), closeness, max_accuracy_drop=0.5,
                            optimization_eval_func="flops", strategy="global",
                            search_algorithm=OptunaSearch(n_trials=3, seed=0))
        tuner.tune()
        cov = tuner._builder.aids["0"]
        print("KEPT", dict(tuner.best_plan["0"].params) if tuner.best_plan else None)
        print("PEAK_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kept = next(line for line in done.stdout.splitlines() if line.startswith("KEPT"))
    assert "low_rank" in kept
    peak = int(
        next(line for line in done.stdout.splitlines() if line.startswith("PEAK")).split()[1]
    )
    assert peak < 6 * 1024 and math.isfinite(peak)
