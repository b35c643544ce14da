"""transformers' Conv1D (GPT-2 family) through the kind registry: tune, reload, fold, save_pretrained.

A tiny GPT2LMHeadModel built from its config (no downloads).
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sketchtune import (
    LayerConfig,
    OptunaSearch,
    SKAutoTuner,
    SketchPlan,
    TuningConfigs,
    apply_plan,
    export_plain,
)
from sketchtune.export import load_folded_state_dict
from sketchtune.registry import kind_of, sketch_of
from sketchtune.select import sketchable_layers

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 128, "n_positions": 64}
IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**CONFIG, bos_token_id=0, eos_token_id=0)).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def tuned() -> tuple[SKAutoTuner, GPT2LMHeadModel, torch.Tensor]:
    model = gpt2()
    reference = logits(model).argmax(-1)

    def agreement(m: torch.nn.Module) -> float:
        return float((logits(m).argmax(-1) == reference).float().mean())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner = SKAutoTuner(
            model,
            TuningConfigs([LayerConfig(r".*", "auto")]),
            agreement,
            max_accuracy_drop=0.3,
            optimization_eval_func="flops",
            strategy="global",
            search_algorithm=OptunaSearch(n_trials=6, seed=0),
        )
    messages = [str(w.message) for w in caught]
    # r".*" reaches the embeddings (no kind) and lm_head, tied to the token embedding
    assert any(re.search(r"also matches 2 layer\(s\) .*: 2 Embedding", m) for m in messages)
    assert any("'lm_head' (tied to 'transformer.wte')" in m for m in messages)
    tuner.tune()
    return tuner, tuner.apply_best_params(), reference


def test_a_conv1d_sketch_computes_x_at_w_plus_b() -> None:
    conv = Conv1D(96, 64)  # nf=96 outputs, nx=64 inputs, weight (64, 96)
    torch.nn.init.normal_(conv.bias)
    kind = kind_of(conv)
    assert kind is not None
    assert kind.name == "SKConv1D"
    assert kind.describe(conv) == "Conv1D(64->96)"
    # at full rank the svd init is exact: the sketch applies W (nx x nf), not W^T
    sketch = kind.build(conv, {"num_terms": 1, "low_rank": 32, "init": "svd"}, seed=0)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(sketch(x), x @ conv.weight + conv.bias, rtol=1e-4, atol=1e-4)
    assert (sketch.nx, sketch.nf) == (64, 96)
    assert sketch_of(sketch) == (kind, {"num_terms": 1, "low_rank": 32, "init": "svd"})
    assert kind.weight_matrix(conv).shape == (64, 96)
    assert kind.fan_in(conv) == 64


def test_gpt2_tunes_its_conv1d_projections(
    tuned: tuple[SKAutoTuner, GPT2LMHeadModel, torch.Tensor],
) -> None:
    tuner, model, reference = tuned
    kinds = [kind.name for _, _, kind in sketchable_layers(gpt2())]
    assert kinds == ["SKConv1D"] * 8 + ["SKLinear"]  # 2 x (c_attn, c_proj, c_fc, c_proj), lm_head
    types = {layer.type for layer in tuner.best_plan.values()}
    assert "SKConv1D" in types
    assert tuner.best_speedup is not None and tuner.best_speedup > 1.0
    agreement = float((logits(model).argmax(-1) == reference).float().mean())
    assert agreement == pytest.approx(tuner.best_accuracy)


def test_a_tuned_gpt2_reloads_from_its_plan_with_one_warning_at_most(
    tuned: tuple[SKAutoTuner, GPT2LMHeadModel, torch.Tensor],
) -> None:
    tuner, model, _ = tuned
    plan = SketchPlan.from_json(tuner.best_plan.to_json())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = apply_plan(gpt2(), plan)
        fresh.load_state_dict(model.state_dict())
    assert len([w for w in caught if "input statistics" in str(w.message)]) <= 1
    assert torch.equal(logits(fresh), logits(model))


def test_a_folded_gpt2_saves_and_loads_without_sketchtune(
    tuned: tuple[SKAutoTuner, GPT2LMHeadModel, torch.Tensor], tmp_path: Path
) -> None:
    _, model, _ = tuned
    plain = export_plain(model)
    assert not any(sketch_of(m) for m in plain.modules())
    torch.testing.assert_close(logits(plain), logits(model), rtol=1e-5, atol=1e-5)

    plain.save_pretrained(tmp_path)
    # from_pretrained rebuilds the dense architecture from the config: it cannot take the
    # folded weights by itself (they are reported as unexpected, the dense ones re-drawn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_again = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert not torch.allclose(logits(dense_again), logits(model), atol=1e-3)
    # what works: the config's model + the saved weights through the plain-torch loader
    weights = safetensors_torch.load_file(tmp_path / "model.safetensors")
    config = GPT2Config.from_pretrained(tmp_path)
    # strict=False: a dense lm_head tied to the embedding is saved once, as the embedding
    rebuilt = load_folded_state_dict(GPT2LMHeadModel(config).eval(), weights, strict=False)
    torch.testing.assert_close(logits(rebuilt), logits(model), rtol=1e-5, atol=1e-5)

    # and a torch.export program of the folded model runs where sketchtune cannot be imported
    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(ids, use_cache=False).logits

    program = torch.export.export(Logits(plain), (IDS,))
    torch.export.save(program, tmp_path / "gpt2.pt2")
    torch.save({"ids": IDS, "logits": logits(model)}, tmp_path / "io.pt")
    script = (
        "import sys\nsys.modules['sketchtune'] = None\nimport torch\n"
        f"root = {str(tmp_path)!r}\n"
        "io = torch.load(f'{root}/io.pt', weights_only=True)\n"
        "program = torch.export.load(f'{root}/gpt2.pt2').module()\n"
        "torch.testing.assert_close(program(io['ids']), io['logits'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
