"""The sketched layers and the timing helpers on CUDA (skipped on machines without a GPU).

Mirrors ``test_precision.py``: layers built on the GPU stay there in their dtype, the
same seed gives bit-identical random matrices on CPU and GPU, autocast (float16 and
bfloat16) works forward and backward, channels-last convolutions keep their format,
and timing counts the asynchronous GPU work.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from sketchtune.measure import measure_throughput, synchronize, time_interleaved
from sketchtune.nn import RandMultiHeadAttention, SKConv2d, SKLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    # float32 comparisons below are tighter than TF32 (cuDNN's default for convolutions).
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _dense_layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(96, 64),
        "conv": nn.Conv2d(16, 32, 3, padding=1),
        "attention": nn.MultiheadAttention(64, 4, batch_first=True),
    }


def _sketch(name: str, dense: nn.Module) -> nn.Module:
    if name == "linear":
        return SKLinear.from_dense(dense, num_terms=2, low_rank=8, seed=5)  # type: ignore[arg-type]
    if name == "conv":
        return SKConv2d.from_dense(dense, num_terms=1, low_rank=12, seed=5)  # type: ignore[arg-type]
    return RandMultiHeadAttention.from_dense(dense, num_random_features=32, seed=5)  # type: ignore[arg-type]


def _inputs(name: str, device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    if name == "linear":
        return (torch.randn(8, 96, generator=gen).to(device, dtype),)
    if name == "conv":
        return (torch.randn(4, 16, 20, 20, generator=gen).to(device, dtype),)
    x = torch.randn(2, 50, 64, generator=gen).to(device, dtype)
    return (x, x, x)


def _output(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = layer(*args)
    return out[0] if isinstance(out, tuple) else out


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return float((actual - expected).abs().max() / expected.abs().max())


NAMES = ["linear", "conv", "attention"]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_bit_identical_random_matrices_on_cpu_and_cuda(name: str) -> None:
    dense = _dense_layers()[name]
    cpu = _sketch(name, dense)
    gpu = _sketch(name, dense.cuda())
    gpu_buffers = dict(gpu.named_buffers())
    for buffer_name, buffer in cpu.named_buffers():
        assert gpu_buffers[buffer_name].is_cuda
        assert torch.equal(gpu_buffers[buffer_name].cpu(), buffer), buffer_name


@pytest.mark.parametrize("dtype", [torch.float32, *_HALF], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_built_on_cuda_stays_there_in_its_dtype(name: str, dtype: torch.dtype) -> None:
    dense = _dense_layers()[name]
    reference = _sketch(name, dense).eval()
    layer = _sketch(name, dense.to("cuda", dtype)).eval()
    for tensor_name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.is_cuda and tensor.dtype == dtype, tensor_name
    out = _output(layer, _inputs(name, "cuda", dtype))
    assert out.is_cuda and out.dtype == dtype
    tolerance = 1e-3 if dtype == torch.float32 else 0.05
    assert _relative_error(out, _output(reference, _inputs(name, "cpu"))) < tolerance


@pytest.mark.parametrize("init", ["svd", "activation"])
def test_factorizations_run_on_the_gpu_and_agree_with_the_cpu(init: str) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(96, 64)
    calibration = torch.randn(256, 96)
    kwargs = {"num_terms": 1, "low_rank": 8, "seed": 0, "init": init}
    cpu = SKLinear.from_dense(
        dense, **kwargs, calibration=calibration if init == "activation" else None
    )
    gpu = SKLinear.from_dense(
        dense.cuda(), **kwargs, calibration=calibration.cuda() if init == "activation" else None
    )
    assert gpu.S1.is_cuda
    x = torch.randn(16, 96)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", _HALF, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_autocast_forward_and_backward_match_float32(name: str, dtype: torch.dtype) -> None:
    layer = _sketch(name, _dense_layers()[name].cuda()).train()
    args = _inputs(name, "cuda")
    x = args[0].clone().requires_grad_(True)
    rest = args[1:] if name != "attention" else (x, x)
    reference = _output(layer, (x, *rest))
    reference.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        out = _output(layer, (x, *rest))
    assert out.dtype == dtype
    assert _relative_error(out, reference) < 0.03
    out.float().square().sum().backward()
    for param_name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, param_name
        assert _relative_error(param.grad, expected[param_name]) < 0.05, param_name


@pytest.mark.parametrize("dtype", [torch.float32, *_HALF], ids=str)
def test_channels_last_convolution_keeps_its_format(dtype: torch.dtype) -> None:
    layer = _sketch("conv", _dense_layers()["conv"].to("cuda", dtype)).eval()
    (x,) = _inputs("conv", "cuda", dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y, y_cl = layer(x), layer(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y_cl, y, rtol=tolerance, atol=tolerance)


def test_timing_counts_the_asynchronous_gpu_work() -> None:
    # torch.cuda._sleep queues a kernel that spins for a number of cycles and returns at
    # once on the host: only a synchronized timer sees its duration.
    torch.cuda.synchronize()
    short, long = 1_000_000, 50_000_000
    times = time_interleaved(
        [lambda: torch.cuda._sleep(short), lambda: torch.cuda._sleep(long)],
        repeats=5,
        warmup=0,
        device="cuda",
    )
    fast, slow = statistics.median(times[0]), statistics.median(times[1])
    assert 0 < fast < slow
    assert slow / fast > 5  # 50x the cycles; launch overhead keeps the ratio below 50
    synchronize("cuda")


def test_measure_throughput_of_a_sketched_model_on_cuda() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).cuda()
    sketched = nn.Sequential(
        SKLinear.from_dense(dense[0], num_terms=1, low_rank=32, seed=0),  # type: ignore[arg-type]
        nn.ReLU(),
        SKLinear.from_dense(dense[2], num_terms=1, low_rank=32, seed=0),  # type: ignore[arg-type]
    )
    x = torch.randn(256, 1024, device="cuda")
    rates = [measure_throughput(m, x, repeats=10) for m in (dense, sketched)]
    assert all(r > 0 for r in rates)
    with pytest.raises(ValueError, match=r"`example_input` is on cpu but the model is on cuda"):
        measure_throughput(dense, x.cpu(), repeats=1)


def test_compiled_sketched_linear_agrees_with_eager() -> None:
    layer = _sketch("linear", _dense_layers()["linear"].cuda()).eval()
    (x,) = _inputs("linear", "cuda")
    compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(layer, backend="aot_eager")  # type: ignore[assignment]
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
