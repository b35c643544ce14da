"""Files sketchtune writes are readable by others as the umask allows (as ``open`` would make them)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune.results import RunSummary, write_report

from .conftest import MLP


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_output_gets_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    with open(tmp_path / "reference.txt", "w") as fh:
        fh.write("x")
    assert mode(tmp_path / "reference.txt") == expected

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = MLP()
    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [8]})]),
        lambda m: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=1),
    )
    tuner.tune()
    assert tuner.best_plan
    tuner.best_plan.save(tmp_path / "plan.json")
    tuner.save_tuning_results(tmp_path / "results.json")
    summary = RunSummary(
        monitor="acc",
        floor=">= 0.5",
        dense_accuracy=1.0,
        tuned_accuracy=1.0,
        dense_throughput=None,
        tuned_throughput=None,
        dense_weights=1,
        tuned_weights=1,
        plan=tuner.best_plan,
        trials=1,
        feasible=1,
        storage=None,
        study_name=None,
    )
    paths = write_report(tmp_path / "report", summary, tuner.records)
    written = [tmp_path / "plan.json", tmp_path / "results.json", *map(Path, paths.values())]
    for path in written:
        if path.suffix == ".png":
            continue  # matplotlib writes its own files
        assert mode(path) == expected, path
    # no temporary file is left beside them
    leftovers = [p for p in tmp_path.rglob(".*") if p.suffix == ".tmp"]
    assert not leftovers
