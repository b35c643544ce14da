"""Every snippet of the seed's README runs with only its import lines changed to ``sketchtune``.

The README is vendored as ``tests/data/SKAutoTuner-README.md``. Snippets run in
order in one namespace (later ones use ``model``, ``configs`` and the evaluation
functions of the first), which holds the names the README leaves to the reader:
``MyNeuralNetwork``, ``accuracy_score`` and ``throughput``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

README = Path(__file__).parent / "data" / "SKAutoTuner-README.md"
_IMPORT = re.compile(r"^from panther\.tuner\.SkAutoTuner(?:\.\w+)* import (.+)$", re.MULTILINE)


def _snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    return [_IMPORT.sub(r"from sketchtune import \1", block) for block in blocks]


class MyNeuralNetwork(nn.Module):
    """conv1/conv2 allow low_rank up to 128 (the README's Int(8, 128)); fc1 up to 64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(128, 128, 3, padding=1)
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


class RGBNetwork(MyNeuralNetwork):
    """An ordinary network: conv1 sees 3 channels (ranks up to 27), fc1 is 128 -> 48 (up to 48)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 128, 3, padding=1)
        self.fc1 = nn.Linear(128, 48)
        self.fc2 = nn.Linear(48, 10)


def test_the_snippets_use_only_panther_imports_that_we_rewrite() -> None:
    snippets = _snippets()
    assert len(snippets) == 5
    for snippet in snippets:
        assert "panther" not in snippet


@pytest.mark.parametrize("network", [MyNeuralNetwork, RGBNetwork])
def test_every_seed_snippet_runs(
    capsys: pytest.CaptureFixture[str], network: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    namespace: dict[str, Any] = {
        "MyNeuralNetwork": network,
        "accuracy_score": 0.95,  # what the README's evaluate_accuracy returns
        "throughput": 1000.0,  # what its evaluate_speed returns
    }
    basic, legacy, customizing, grid_random, param_specs = _snippets()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CMA-ES warns about categorical params; costly spaces warn
        exec(compile(basic, "README basic usage", "exec"), namespace)
        out = capsys.readouterr().out
        assert "accuracy" in out and "score" in out  # the printed results table
        df = namespace["results_df"]
        assert {"layer_name", "num_terms", "low_rank", "accuracy", "speed", "score"} <= set(
            df.columns
        )
        assert set(df.layer_name) == {"conv1", "conv2"} and len(df) == 200
        assert (df.score > 0).all()  # constant accuracy 0.95 >= 0.90: every trial is feasible
        assert isinstance(namespace["optimized_model"], nn.Module)

        exec(compile(legacy, "README legacy lists", "exec"), namespace)
        assert namespace["configs"][0].params["low_rank"].choices == [8, 16, 32, 64]

        # The seed's snippet reads tuner.search_algorithm.study without tuning first (the seed
        # itself fails there, its study being None); we tune where it says "access ... study".
        customizing = customizing.replace(
            "# Access the underlying Optuna study",
            "tuner.tune()\n# Access the underlying Optuna study",
        )
        exec(compile(customizing, "README customizing", "exec"), namespace)
        study = namespace["study"]
        assert len(study.trials) == 200  # the last per-layer study: n_trials=200

        exec(compile(grid_random, "README grid and random", "exec"), namespace)
        exec(compile(param_specs, "README param specs", "exec"), namespace)
        assert repr(namespace["params"]["learning_rate"]) == "Float(1e-05, 0.01, log=True)"


def test_grid_snippet_exhausts_cleanly_and_random_runs() -> None:
    from optuna.samplers import GridSampler, RandomSampler

    from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs

    model = MyNeuralNetwork()
    configs = TuningConfigs(
        [LayerConfig(["fc1"], {"num_terms": [1, 2, 3], "low_rank": [8, 16, 32, 64]})]
    )
    search_space = {"num_terms": [1, 2, 3], "low_rank": [8, 16, 32, 64]}
    tuner = SKAutoTuner(
        model=model,
        configs=configs,
        accuracy_eval_func=lambda m: 1.0,
        search_algorithm=OptunaSearch(sampler=GridSampler(search_space)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.tune()
    df = tuner.get_results_dataframe()
    assert len(df) == 12  # the whole grid once, then a clean stop (n_trials=100 not reached)
    assert sorted(zip(df.num_terms, df.low_rank, strict=True)) == sorted(
        (n, k) for n in (1, 2, 3) for k in (8, 16, 32, 64)
    )
    tuner = SKAutoTuner(
        model=model,
        configs=configs,
        accuracy_eval_func=lambda m: 1.0,
        search_algorithm=OptunaSearch(n_trials=5, sampler=RandomSampler(seed=42)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.tune()
    assert len(tuner.get_results_dataframe()) == 5
