"""int8 layers: a dense Linear with int8 weights, and a sketch whose two factors are int8.

Weights are stored as plain tensors: ``qweight`` (``torch.int8``, ``out x in``) and
``scale`` (float32, one per output row, symmetric: ``weight ~ qweight * scale[:, None]``),
so a ``state_dict`` holds only ordinary dtypes and loads with
``torch.load(weights_only=True)`` anywhere.

The product runs on the best kernel the input allows (:func:`int8_kernel`):

- ``"fbgemm"``: float32 inputs on a CPU whose quantized engine is ``x86`` or
  ``fbgemm``: ``torch.ops.quantized.linear_dynamic``, torch's dynamic int8 kernel
  (activations quantized per call, 7-bit as torch's own dynamic Linear does on x86),
  on weights packed once (with the bias, at inference) and re-packed whenever
  ``qweight``, ``scale`` or the bias change (``load_state_dict``, ``copy_``, an
  optimizer step, a replaced tensor, ``.to()``; not a write through ``.data``, which
  no version counter sees: call ``set_weight`` instead);
- ``"reference"``: every other case (CUDA, float64, bfloat16, no quantized engine):
  the dequantized weight times the unquantized input. Same weights, no speedup.

Gradients flow to the input and the bias (the int8 weights are frozen): the
backward multiplies by the dequantized weight, so a trial may fine-tune the layers
around an int8 layer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sketchtune._validation import check_bool, check_int
from sketchtune.nn import _sketch

__all__ = ["Int8Linear", "Int8SKLinear", "int8_kernel", "quantize_rows", "to_torch_dynamic"]

_ENGINES = ("x86", "fbgemm")


def int8_kernel(x: torch.Tensor) -> str:
    """Which kernel an int8 layer uses for input ``x``: ``"fbgemm"`` or ``"reference"``."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.quantized.engine in _ENGINES
        and hasattr(torch.ops.quantized, "linear_dynamic")
    ):
        return "fbgemm"
    return "reference"


@torch.no_grad()
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight, scale)``: symmetric per-row int8 of a 2-D ``weight`` (``|q| <= 127``)."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Int8Matmul(torch.autograd.Function):
    """``x @ W^T`` on the int8 kernel; the backward multiplies by the dequantized weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: Any, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.ops.quantized.linear_dynamic(x, packed, True)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 (per output row), with dynamic int8 activations on CPU.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether the layer has a (float, trainable) bias.
        dtype: the bias's dtype and the dtype of the outputs (float32 by default).
        device: where the tensors live.

    Example:
        >>> import torch
        >>> from sketchtune.nn import Int8Linear
        >>> dense = torch.nn.Linear(256, 128)
        >>> layer = Int8Linear.from_dense(dense)
        >>> x = torch.randn(4, 256)
        >>> error = (layer(x) - dense(x)).norm() / dense(x).norm()
        >>> bool(error < 0.02), layer.qweight.dtype
        (True, torch.int8)
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: nn.Parameter | None
    quant = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        check_bool("bias", bias)
        place = _sketch.resolve_device(device)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=place)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=place))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=place))
            if bias
            else None
        )
        #: packed kernels by whether they hold the bias: ``(what they were packed from, packed)``
        self._packed: dict[bool, tuple[tuple[Any, ...], Any]] = {}

    @classmethod
    def from_dense(cls, linear: nn.Module) -> Int8Linear:
        """The int8 form of ``linear`` (an ``nn.Linear``, or any layer with ``weight``/``bias``)."""
        weight = linear.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                "`linear` must have a 2-D `weight` (out_features x in_features), like nn.Linear; "
                f"got {type(linear).__name__}."
            )
        bias = getattr(linear, "bias", None)
        return cls.from_weight(weight, bias if isinstance(bias, torch.Tensor) else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """The int8 layer computing ``x @ weight.T + bias`` (``weight``: ``out x in``)."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            dtype=weight.dtype if weight.is_floating_point() else None,
            device=weight.device,
        )
        layer.set_weight(weight)
        if bias is not None:
            assert layer.bias is not None
            with torch.no_grad():
                layer.bias.copy_(bias.detach())
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (``out_features x in_features``) into this layer."""
        _sketch.check_weight("weight", weight, (self.out_features, self.in_features))
        q, scale = quantize_rows(weight)
        self.qweight.copy_(q)
        self.scale.copy_(scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``out_features x in_features`` float weight the int8 one stands for."""
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        shape = input.shape
        x = input.reshape(-1, self.in_features)
        bias = self.bias
        if int8_kernel(x) == "fbgemm":
            y: torch.Tensor
            grads = torch.is_grad_enabled() and (
                x.requires_grad or (bias is not None and bias.requires_grad)
            )
            if not grads:  # inference: the bias is added inside the kernel
                return torch.ops.quantized.linear_dynamic(  # type: ignore[no-any-return]
                    x, self._packed_weight(with_bias=True), True
                ).reshape(*shape[:-1], self.out_features)
            packed = self._packed_weight(with_bias=False)
            if x.requires_grad:
                y = _Int8Matmul.apply(x, packed, self.dequantized_weight())
            else:
                y = torch.ops.quantized.linear_dynamic(x, packed, True)
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            y = F.linear(
                x, self.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype)
            )
        return y.reshape(*shape[:-1], self.out_features)

    def _packed_weight(self, *, with_bias: bool) -> Any:
        """The weights (and the bias) packed for the fbgemm kernel, packed again when changed."""
        q, scale, bias = self.qweight, self.scale, self.bias
        key: tuple[Any, ...] = (q.data_ptr(), q._version, scale.data_ptr(), scale._version)
        if with_bias and bias is not None:
            key += (bias.data_ptr(), bias._version, bias.dtype)
        cached = self._packed.get(with_bias)
        if cached is None or cached[0] != key:
            with warnings.catch_warnings():
                # torch 2.13 deprecates qint8 tensors (pytorch#184982); this is the only use,
                # to pack for the kernel: nothing is stored in that dtype
                warnings.simplefilter("ignore", UserWarning)
                qint8 = torch._make_per_channel_quantized_tensor(
                    q.cpu(),
                    scale.detach().cpu().double(),
                    torch.zeros(self.out_features, dtype=torch.long),
                    0,
                )
                fused = bias.detach().float().cpu() if with_bias and bias is not None else None
                packed = torch.ops.quantized.linear_prepack(qint8, fused)
            cached = self._packed[with_bias] = (key, packed)
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_packed"] = {}  # packed kernels are a cache: rebuilt on the next call
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant='int8'"
        )


class Int8SKLinear(nn.Module):
    """A sketch ``y = b + x A B`` whose factors ``A`` (``d_in x 2Lk``) and ``B`` (``2Lk x d_out``) are int8.

    Built from a float sketch (:meth:`from_sketch`): the two factors of its
    folded form, each an :class:`Int8Linear` (``down``: ``d_in -> 2Lk``,
    ``up``: ``2Lk -> d_out`` with the bias). ``num_terms``, ``low_rank``, ``init``
    and ``seed`` are the float sketch's, for plans and reports.

    Example:
        >>> import torch
        >>> from sketchtune.nn import Int8SKLinear, SKLinear
        >>> dense = torch.nn.Linear(256, 256)
        >>> sketch = SKLinear.from_dense(dense, num_terms=1, low_rank=32, init="svd", seed=0)
        >>> layer = Int8SKLinear.from_sketch(sketch)
        >>> layer(torch.randn(4, 256)).shape, layer.up.qweight.shape
        (torch.Size([4, 256]), torch.Size([256, 64]))
    """

    quant = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_terms: int,
        low_rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        init: str = "sketch",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.num_terms, self.low_rank = _sketch.check_sketch_sizes(
            type(self).__name__,
            self.in_features,
            self.out_features,
            num_terms,
            low_rank,
            d_in_text="in_features",
            d_out_text="out_features",
        )
        self.init = init
        self.seed = seed
        rank = 2 * self.num_terms * self.low_rank
        self.down = Int8Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = Int8Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.up.bias

    @classmethod
    def from_sketch(cls, sketch: nn.Module) -> Int8SKLinear:
        """The int8-factor form of an :class:`~sketchtune.nn.SKLinear` (or a subclass)."""
        with torch.no_grad():
            first = torch.cat([sketch.S1, sketch.U2], dim=1)  # type: ignore[list-item]
            second = torch.cat([sketch.U1, sketch.S2], dim=0) / (2 * sketch.num_terms)  # type: ignore[list-item, operator]
        bias = getattr(sketch, "bias", None)
        layer = cls(
            int(sketch.in_features),  # type: ignore[arg-type]
            int(sketch.out_features),  # type: ignore[arg-type]
            int(sketch.num_terms),  # type: ignore[arg-type]
            int(sketch.low_rank),  # type: ignore[arg-type]
            bias=bias is not None,
            dtype=first.dtype,
            device=first.device,
            init=str(getattr(sketch, "init", "sketch")),
            seed=getattr(sketch, "seed", None),
        )
        layer.down.set_weight(first.t())
        layer.up.set_weight(second.t())
        if bias is not None:
            assert layer.up.bias is not None
            with torch.no_grad():
                layer.up.bias.copy_(bias)
        layer.train(sketch.training)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.up(self.down(input))
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_terms={self.num_terms}, low_rank={self.low_rank}, init={self.init!r}, "
            f"seed={self.seed}, quant='int8'"
        )


def to_torch_dynamic(layer: Int8Linear) -> nn.Module:
    """torch's own dynamic int8 Linear (``torch.ao.nn.quantized.dynamic.Linear``) computing ``layer``.

    Same int8 weights and scales, same kernel: a module torch alone loads, scripts
    and traces (the deployed form :func:`~sketchtune.export_plain` writes).
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # qint8 tensors: see _packed_weight
        qint8 = torch._make_per_channel_quantized_tensor(
            layer.qweight.detach().cpu(),
            layer.scale.detach().cpu().double(),
            torch.zeros(layer.out_features, dtype=torch.long),
            0,
        )
        plain = DynamicLinear(
            layer.in_features, layer.out_features, bias_=layer.bias is not None, dtype=torch.qint8
        )
        bias = None if layer.bias is None else layer.bias.detach().cpu().float()
        plain.set_weight_bias(qint8, bias)
    return plain.train(layer.training)
