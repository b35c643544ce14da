from __future__ import annotations

import pytest
import torch
from torch import nn

from sketchtune import SketchPlan, apply_plan, estimate_speedup, measure_throughput
from sketchtune.measure import ShapeRecorder, time_interleaved
from sketchtune.nn import SKConv2d, SKLinear

from .conftest import MLP, TinyTransformer


def test_time_interleaved_calls_round_robin_after_warmup() -> None:
    order: list[str] = []
    times = time_interleaved(
        [lambda: order.append("a"), lambda: order.append("b")], repeats=3, warmup=2
    )
    assert order == ["a", "b"] * 5
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)


def test_measure_throughput_restores_training_mode_and_validates() -> None:
    model = nn.Linear(8, 8).train()
    rate = measure_throughput(model, torch.randn(16, 8), repeats=3, warmup=1)
    assert rate > 0 and model.training
    with pytest.raises(
        ValueError, match=r"`batch_size` must be given when `example_input` holds no batched tensor"
    ):
        measure_throughput(model, {"x": 1})
    with pytest.raises(ValueError, match=r"`repeats` must be a positive int, got 0"):
        measure_throughput(model, torch.randn(2, 8), repeats=0)


def test_estimate_speedup_counts_sketched_and_dense_layers() -> None:
    assert estimate_speedup(MLP()) == 1.0
    model = nn.Sequential(SKLinear(1024, 1024, 1, 32, seed=0), nn.Linear(1024, 1024))
    # layer 0: 1024^2 -> 2*32*2048; layer 1 dense: total 2*1024^2 over (131072 + 1024^2)
    assert estimate_speedup(model) == pytest.approx(2 * 1024**2 / (2 * 32 * 2048 + 1024**2))


def test_conv_cost_uses_the_recorded_output_size() -> None:
    conv = nn.Conv2d(32, 64, 3, padding=1)
    sketch = SKConv2d.from_dense(conv, num_terms=1, low_rank=4, seed=0)
    model = nn.Sequential(sketch, nn.Conv2d(64, 64, 1))
    d_in = 32 * 9
    positions = 2 * 16 * 16
    dense = positions * (d_in * 64 + 64 * 64)
    sketched = positions * (8 * (d_in + 64) + 64 * 64)
    assert estimate_speedup(model, torch.randn(2, 32, 16, 16)) == pytest.approx(dense / sketched)


def test_shape_recorder_sees_attention_lengths() -> None:
    model = TinyTransformer().eval()
    recorder = ShapeRecorder(model, ["attn", "head", "encoder.layers.0.self_attn"])
    with recorder, torch.no_grad():
        model(torch.randn(2, 7, 16))
    assert recorder.shapes["attn"][:2] == ((2, 7, 16), (2, 7, 16))
    assert recorder.shapes["head"] == ((2, 16), (2, 3))
    assert "encoder.layers.0.self_attn" in recorder.shapes
    plan = SketchPlan(
        {
            "attn": {
                "type": "RandMultiHeadAttention",
                "params": {"num_random_features": 4},
                "seed": 0,
            }
        }
    )
    sketched = apply_plan(TinyTransformer(), plan)
    assert estimate_speedup(sketched, torch.randn(2, 64, 16)) > 1.0
