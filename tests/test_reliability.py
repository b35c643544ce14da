"""Trust boundaries of the core: resume only what matches, no secrets in outputs, bounded plan
files, safe storage start-up, aliased and tied modules, atomic writes, clean interrupts."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from torch import nn

from sketchtune import (
    Categorical,
    LayerConfig,
    OptunaSearch,
    SKAutoTuner,
    SketchPlan,
    TuningConfigs,
    apply_plan,
    estimate_speedup,
)
from sketchtune._atomic import write_text_atomic
from sketchtune._search._confirm import MIN_ROUNDS
from sketchtune.nn import SKLinear
from sketchtune.results import RunSummary
from sketchtune.search import open_rdb_storage, redact
from tests.conftest import MLP

SECRET = "s3cr@t:pw/x"


def search(storage: str, name: str = "study", **kw: Any) -> OptunaSearch:
    return OptunaSearch(
        n_trials=kw.pop("n_trials", 3), storage=storage, study_name=name, seed=0, **kw
    )


def tuner_for(
    model: nn.Module,
    params: dict[str, Any],
    storage: str,
    *,
    names: tuple[str, ...] = ("fc2",),
    accuracy: Any = None,
    strategy: Any = None,
    **kw: Any,
) -> SKAutoTuner:
    return SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(list(names), params)]),
        accuracy or (lambda m: 1.0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        strategy=strategy,
        search_algorithm=search(storage, load_if_exists=True, **kw),
    )


# -- 1. resume only a compatible study ---------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"names": ("fc2",)}, r"layers no longer selected: \['fc1'\]"),
        (
            {"model": lambda: MLP(width=48)},
            r"layer 'fc2' was Linear\(64->64\), is Linear\(48->48\)",
        ),
        (
            {"params": {"num_terms": 1, "low_rank": [4, 16]}},
            r"the search space of 'fc1' was \{.*\}, is \{.*'choices': \[4, 16\]",
        ),
    ],
)
def test_a_resume_that_searches_something_else_is_refused_before_any_work(
    tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    params = {"num_terms": 1, "low_rank": [4, 8]}
    # one study over both layers (strategy="global"), as the callback runs by default
    tuner_for(MLP(), params, storage, names=("fc1", "fc2"), strategy="global").tune()
    calls: list[int] = []

    def counting(model: nn.Module) -> float:
        calls.append(1)
        return 1.0

    other = tuner_for(
        change.get("model", MLP)(),
        change.get("params", params),
        storage,
        names=change.get("names", ("fc1", "fc2")),
        accuracy=counting,
        strategy="global",
    )
    with pytest.raises(ValueError, match=match) as caught:
        other.tune()
    assert "Use a new study_name" in str(caught.value)
    assert calls == []  # refused before the dense baseline


def test_a_resume_with_another_accuracy_function_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    params = {"num_terms": 1, "low_rank": [4, 8]}
    model = MLP()  # the same model throughout: only the evaluation changes
    tuner_for(model, params, storage, accuracy=lambda m: 0.9).tune()
    again = tuner_for(model, params, storage, accuracy=lambda m: 0.9, n_trials=4)
    again.tune()  # the same evaluation resumes
    other = tuner_for(model, params, storage, accuracy=lambda m: 0.6)
    with pytest.raises(ValueError, match=r"scores 0.6 now, but study 'study/fc2' recorded 0.9"):
        other.tune()


def test_a_changed_categorical_space_is_our_error_not_optunas(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    tuner_for(MLP(), {"num_terms": 1, "low_rank": Categorical([4, 8])}, storage).tune()
    with pytest.raises(ValueError, match=r"was created for a different search") as caught:
        tuner_for(MLP(), {"num_terms": 1, "low_rank": Categorical([4, 8, 16])}, storage).tune()
    assert "dynamic value space" not in str(caught.value)


# -- 2. secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql+psycopg://me:{SECRET}@db:5432/tune",
            "postgresql+psycopg://me:***@db:5432/tune",
        ),
        (
            "postgresql://me@db/tune?password=hunter2&sslmode=require",
            "postgresql://me@db/tune?password=***&sslmode=require",
        ),
        ("mysql://db/tune?user=me&PASSWORD=a@b", "mysql://db/tune?user=me&PASSWORD=***"),
        ("sqlite:///runs/tune.db", "sqlite:///runs/tune.db"),
    ],
)
def test_redact_hides_every_form_of_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_urls_are_redacted_in_messages_summaries_and_errors() -> None:
    url = f"postgresql+psycopg://me:{SECRET}@127.0.0.1:1/none"
    assert SECRET not in repr(OptunaSearch(storage=url))
    summary = RunSummary(
        monitor="val_acc",
        floor=">= 0.9",
        dense_accuracy=1.0,
        tuned_accuracy=1.0,
        dense_throughput=None,
        tuned_throughput=None,
        dense_weights=1,
        tuned_weights=1,
        plan=SketchPlan(),
        trials=0,
        feasible=0,
        storage=url,
        study_name="s",
    )
    assert SECRET not in summary.dashboard_hint() and "me:***@" in summary.dashboard_hint()
    with pytest.raises(ValueError, match="could not open the Optuna storage") as caught:
        open_rdb_storage(url, heartbeat_interval=None, grace_period=None, max_retry=0)
    assert SECRET not in str(caught.value) and "s3cr" not in str(caught.value)


# -- 4. plan files are bounded and strict ------------------------------------------------------


def plan_file(tmp_path: Path, layer: dict[str, Any], **top: Any) -> Path:
    data = {"_type": "sketchtune.SketchPlan", "_version": 1, "layers": {"fc2": layer}, **top}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


LAYER = {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8}, "seed": 0}


@pytest.mark.parametrize(
    ("layer", "top", "match"),
    [
        (
            {**LAYER, "params": {"num_terms": 1000000, "low_rank": 8}},
            {},
            r"num_terms=1000000, low_rank=8 make a sketch of 2,048,000,000 values, more than the "
            r"4,096 of Linear\(64->64\).*num_terms \* low_rank must be at most 16",
        ),
        (
            {**LAYER, "copy_weights": "false"},
            {},
            r"copy_weights must be true or false, got 'false'",
        ),
        ({**LAYER, "seed": "7"}, {}, r"seed must be a non-negative int, got '7'"),
        ({**LAYER, "rank": 8}, {}, r"has unknown key\(s\) \['rank'\]"),
        (LAYER, {"_version": 0}, r"no valid _version, got 0; this sketchtune reads version 1"),
        (LAYER, {"extra": 1}, r"plan has unknown key\(s\) \['extra'\]"),
        (
            {"type": "RandMultiHeadAttention", "params": {"num_random_features": 10**7}, "seed": 0},
            {},
            r"makes 'fc2' a RandMultiHeadAttention, but the model's 'fc2' is a Linear",
        ),
    ],
)
def test_bad_plan_files_are_refused_before_anything_is_built(
    tmp_path: Path, layer: dict[str, Any], top: dict[str, Any], match: str
) -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_plan(model, plan_file(tmp_path, layer, **top))
    assert isinstance(model.fc2, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attention_features_from_a_file_are_bounded() -> None:
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    plan = {
        "0": {"type": "RandMultiHeadAttention", "params": {"num_random_features": 10**6}, "seed": 0}
    }
    with pytest.raises(ValueError, match=r"num_random_features must be at most 128"):
        apply_plan(model, plan)


def test_non_numeric_accuracies_are_errors() -> None:
    for value in ("0.38", True):
        tuner = SKAutoTuner(
            MLP(),
            LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [8]}),
            lambda m, v=value: v,
            search_algorithm=OptunaSearch(n_trials=1),
        )
        with pytest.raises(TypeError, match=r"accuracy_eval_func must return a number, got"):
            tuner.tune()


def test_silent_coercions_are_errors() -> None:
    with pytest.raises(TypeError, match=r"`load_if_exists` must be True or False, got 'no'"):
        OptunaSearch(load_if_exists="no")  # type: ignore[arg-type]


# -- 5, 6, 7. storage start-up ---------------------------------------------------------------


def test_a_grace_period_shorter_than_the_heartbeat_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`grace_period`=1 must exceed `heartbeat_interval`=10"):
        OptunaSearch(heartbeat_interval=10, grace_period=1)


def test_workers_creating_a_new_sqlite_study_at_once_all_start(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from sketchtune import OptunaSearch
        start = float(sys.argv[2])
        while time.time() < start:
            pass
        search = OptunaSearch(storage=sys.argv[1], study_name="race", load_if_exists=True)
        search.open_study(None)
        print("ok")
        """
    )
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        import time

        start = str(time.time() + 3.0)
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", script, url, start],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0 and out.strip() == "ok", err[-2000:]


def test_a_wrong_storage_url_fails_before_any_evaluation() -> None:
    calls: list[int] = []
    tuner = SKAutoTuner(
        MLP(),
        LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [8]}),
        lambda m: calls.append(1) or 1.0,
        search_algorithm=OptunaSearch(storage="postgresql+psycopg://u:pw@127.0.0.1:1/x"),
    )
    with pytest.raises(ValueError, match="could not open the Optuna storage"):
        tuner.tune()
    assert calls == []
    with pytest.raises(ValueError, match="could not open the Optuna storage"):
        OptunaSearch(storage="postgresql+psycopg://u:pw@127.0.0.1:1/x").check_storage()


def test_a_sqlite_file_in_a_folder_not_made_yet_is_created_with_its_folder(tmp_path: Path) -> None:
    # the main job's config keeps its study in runs/<name>/study.db; a fresh clone has no runs/
    url = f"sqlite:///{tmp_path}/runs/new/study.db"
    OptunaSearch(storage=url).check_storage()
    assert (tmp_path / "runs" / "new" / "study.db").is_file()
    study = optuna.create_study(storage=url, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1
    # a folder that cannot be made (a file is in the way) is still our one-line error
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="could not open the Optuna storage"):
        OptunaSearch(storage=f"sqlite:///{tmp_path}/a_file/sub/study.db").check_storage()


# -- 8. aliased and tied modules ----------------------------------------------------------------


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a  # the same module under two names, called twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_every_path_of_an_aliased_module_is_swapped_and_every_call_counted() -> None:
    x = torch.randn(8, 64)
    tuner = SKAutoTuner(
        Aliased(),
        LayerConfig(["a"], {"num_terms": 1, "low_rank": [8]}),
        lambda m: float(m(x).abs().mean() >= 0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=1),
    )
    tuner.tune()
    model = tuner.apply_best_params()
    assert isinstance(model.a, SKLinear) and model.b is model.a
    # two calls of 64x64 (8192 MACs/row) vs two of rank 16 (2 * 16 * 128): both calls count
    assert tuner.best_speedup == pytest.approx(4096 / (16 * 128))
    assert estimate_speedup(model, x) == pytest.approx(tuner.best_speedup)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.hidden = nn.Linear(64, 64)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.embed.weight  # tied, as in language models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.embed(x)))


def test_tied_weights_are_never_untied_silently() -> None:
    with pytest.raises(ValueError, match=r"names 'head' \(tied to 'embed'\): these layers share"):
        SKAutoTuner(Tied(), LayerConfig(["head"], "auto"), lambda m: 1.0)
    with pytest.warns(UserWarning, match=r"matches 'head' \(tied to 'embed'\).*they stay dense"):
        tuner = SKAutoTuner(
            Tied(), LayerConfig(r"hidden|head", {"num_terms": 1, "low_rank": [8]}), lambda m: 1.0
        )
    assert tuner.study_labels == ["hidden"]


# -- 9. atomic writes, standard JSON ------------------------------------------------------------


def test_a_failed_plan_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    good = SketchPlan({"fc2": LAYER})
    good.save(path)
    bad = SketchPlan({"fc2": {**LAYER, "params": {"num_terms": 1, "low_rank": object()}}})
    with pytest.raises(TypeError):
        bad.save(path)
    assert SketchPlan.load(path) == good
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "{" + "\ud800")  # fails while writing
    assert SketchPlan.load(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporary left


def test_results_files_are_standard_json(tmp_path: Path) -> None:
    accuracies = iter([1.0, float("nan"), 0.0, 1.0, 1.0])
    tuner = SKAutoTuner(
        MLP(),
        LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [4, 8, 16]}),
        lambda m: next(accuracies),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(
            sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8, 16]}, seed=0)
        ),
    )
    tuner.tune()
    path = tmp_path / "results.json"
    tuner.save_tuning_results(path)

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert {r["state"] for r in data["records"]} == {"COMPLETE", "FAIL"}


# -- 10. interrupts, devices, speeds, Optuna's tracebacks --------------------------------------


def test_ctrl_c_during_the_final_confirmation_ends_cleanly() -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def speed(m: nn.Module) -> float:
        calls["n"] += 1
        # each layer's trial takes 5 rounds (2 calls each) to confirm its 2x; after both,
        # the confirmation of the combined plan is running
        if calls["n"] > 2 * 2 * MIN_ROUNDS:
            raise KeyboardInterrupt
        sketched = isinstance(m.fc1, SKLinear) or isinstance(m.fc2, SKLinear)
        return 200.0 if sketched else 100.0

    tuner = SKAutoTuner(
        model,
        LayerConfig(["fc1", "fc2"], {"num_terms": 1, "low_rank": [8]}),
        lambda m: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func=speed,
        verbose=True,
        search_algorithm=OptunaSearch(n_trials=1),
    )
    tuner.tune()
    assert tuner.interrupted
    assert calls["n"] > 2 * 2 * MIN_ROUNDS  # it was interrupted in the final confirmation
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)  # restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(tuner.get_results_dataframe()) == 2  # every finished trial kept


def test_a_model_on_the_meta_device_is_refused_up_front() -> None:
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(ValueError, match=r"parameters on the meta device \(e.g. 'fc1.weight'\)"):
        SKAutoTuner(model, LayerConfig(["fc2"], "auto"), lambda m: 1.0)


def test_a_dense_speed_of_zero_stops_the_search_at_once() -> None:
    tuner = SKAutoTuner(
        MLP(),
        LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [4, 8, 16]}),
        lambda m: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func=lambda m: 0.0,
        search_algorithm=OptunaSearch(n_trials=10, seed=0),
    )
    with pytest.raises(ValueError, match=r"returned 0.0 for the dense model; speeds must be > 0"):
        tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None and len(study.trials) == 1


def test_failed_trials_with_a_reason_print_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    values = iter([1.0] + [float("nan")] * 5)
    tuner = SKAutoTuner(
        MLP(),
        LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [4, 8, 16]}),
        lambda m: next(values),
        search_algorithm=OptunaSearch(n_trials=3, seed=0),
    )
    with caplog.at_level(logging.WARNING, logger="optuna"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.tune()
    assert set(tuner.get_results_dataframe().state) == {"FAIL"}
    optuna_lines = [r for r in caplog.records if r.name.startswith("optuna")]
    assert not [r for r in optuna_lines if r.exc_info]
    # nor Optuna's follow-up line for them ("Trial N failed with value None.")
    assert not [r for r in optuna_lines if "failed with value" in r.getMessage()]
