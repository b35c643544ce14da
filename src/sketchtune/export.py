"""Deploying a tuned model without sketchtune: fold every sketch into plain torch modules.

A sketched Linear (or transformers ``Conv1D``) computes ``y = x A B + b`` with
``A`` of shape ``d_in x 2Lk`` and ``B`` of shape ``2Lk x d_out``: exactly
``nn.Sequential(nn.Linear(d_in, 2Lk, bias=False), nn.Linear(2Lk, d_out))``, at
the same cost. A sketched Conv2d is a ``2Lk``-channel convolution followed by
a 1x1 convolution. :func:`export_plain` swaps each sketch for that plain form
(each kind defines its own fold, :meth:`~sketchtune.kinds.SketchKind.fold`),
so the result holds only torch modules (and the model's own classes):

- ``torch.save(plain.state_dict(), path)`` loads with
  ``torch.load(path, weights_only=True)`` into the dense architecture through
  :func:`load_folded_state_dict`, a function that uses only torch (copy it
  where sketchtune is not installed);
- ``torch.export.export(plain, args)`` and ``torch.jit.trace(plain, args)``
  produce programs that run with torch alone;
- ``plain.save_pretrained(path)`` (transformers) writes the folded weights,
  but ``from_pretrained`` rebuilds the *dense* architecture from the config,
  so it cannot load them by itself (transformers reports the unexpected and
  missing keys and initializes the dense layers afresh). Build the model from
  the config and call :func:`load_folded_state_dict` with the saved weights
  instead (see the README, "Deploying without sketchtune").

The int8 forms fold to torch's own dynamic int8 Linear
(``torch.ao.nn.quantized.dynamic.Linear``, the module ``quantize_dynamic`` makes,
with the same int8 weights and kernel): an ``Int8Linear`` to one, a sketch with
int8 factors to two in an ``nn.Sequential``. Such a model loads its
``state_dict`` through :func:`load_folded_state_dict` and runs under
``torch.jit.script`` / ``torch.jit.trace`` (saved with ``torch.jit.save``) with
torch alone; ``torch.export`` cannot trace torch's packed int8 weights (torch
2.13: ``LinearPackedParamsBase ... does not have a field with name
'__obj_flatten__'``), and neither can the ONNX exporter (see ``docs/int8.md``).

Random-feature attention (``RandMultiHeadAttention``) has no plain-torch form;
:func:`export_plain` says so, or leaves it in place with ``strict=False``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sketchtune.registry import sketch_of

__all__ = ["export_plain", "load_folded_state_dict"]


def export_plain(model: nn.Module, *, inplace: bool = False, strict: bool = True) -> nn.Module:
    """``model`` with every sketched layer folded into plain torch modules computing the same function.

    Args:
        model: a tuned model (e.g. after ``apply_best_params()``, or ``apply_plan``
            followed by ``load_state_dict``).
        inplace: fold ``model`` itself instead of a deep copy.
        strict: raise when a sketched layer has no plain form (random-feature
            attention); with ``False`` such layers stay as they are, and the
            result still needs sketchtune to load.

    Returns:
        The folded model (``model`` itself when ``inplace``), in the same
        train/eval mode; outputs equal the sketched model's up to float rounding.

    Raises:
        ValueError: ``strict`` and some sketched layer has no plain-torch form.

    Example:
        >>> import torch
        >>> from sketchtune import SKLinear, export_plain
        >>> model = torch.nn.Sequential(SKLinear(64, 32, num_terms=1, low_rank=4, seed=0))
        >>> plain = export_plain(model)
        >>> plain
        Sequential(
          (0): Sequential(
            (0): Linear(in_features=64, out_features=8, bias=False)
            (1): Linear(in_features=8, out_features=32, bias=True)
          )
        )
        >>> x = torch.randn(2, 64)
        >>> torch.allclose(plain(x), model(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    # every path, aliases included (named_modules() lists a shared module once): a module
    # held at two paths is folded once and the folded module put at both, still shared
    paths = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if sketch_of(m)]
    folded: dict[int, nn.Module] = {}
    where: dict[int, list[str]] = {}
    kept: list[str] = []
    unfoldable: set[int] = set()
    for name, module in paths:
        if any(name.startswith(f"{done}.") for ids in where.values() for done in ids):
            continue  # inside a layer folded whole
        if id(module) in where:
            where[id(module)].append(name)
            continue
        if id(module) in unfoldable:
            continue
        found = sketch_of(module)
        assert found is not None
        try:
            plain = found[0].fold(module)
        except NotImplementedError:
            unfoldable.add(id(module))
            kept.append(f"{name!r} ({type(module).__name__})")
            continue
        folded[id(module)] = plain.train(module.training)
        where[id(module)] = [name]
    if kept and strict:
        raise ValueError(
            f"export_plain: {len(kept)} sketched layer(s) have no plain-torch form: "
            f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}. Keep sketchtune "
            "installed to load them (apply_plan + load_state_dict), or pass strict=False to "
            "fold the others and leave these as they are."
        )
    target = model if inplace else copy.deepcopy(model)
    for key, plain in folded.items():
        for name in where[key]:
            if not name:  # the model itself is one sketched layer
                return plain
            parent_name, _, attr = name.rpartition(".")
            setattr(target.get_submodule(parent_name), attr, plain)
    return target


# Plain torch only below: this function is meant to be copied where sketchtune is not
# installed (tests/test_export.py runs its source in a process that cannot import sketchtune).
def load_folded_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> nn.Module:
    """Load the ``state_dict`` of a folded model into a fresh *dense* model of the same architecture.

    Every leaf layer whose weight the ``state_dict`` holds as ``<name>.0.weight``
    and ``<name>.1.weight`` (the two factors of a fold) is first replaced by the
    two plain layers (one pair for a layer the model holds at several paths, so
    it stays shared), sized from those tensors: two ``nn.Linear`` for a Linear
    (or a transformers ``Conv1D``), a convolution with the dense layer's stride,
    padding and dilation then a 1x1 convolution for a Conv2d. A Linear (or
    ``Conv1D``) saved as torch's dynamic int8 Linear (``<name>._packed_params``),
    or as two of them (``<name>.0._packed_params``, ``<name>.1._packed_params``),
    becomes those. Then the ``state_dict`` is loaded. Uses only torch.

    Args:
        model: the dense model, built as it was before tuning (weights do not matter).
        state_dict: the folded model's state_dict, e.g. from
            ``torch.load(path, weights_only=True)`` or ``safetensors.torch.load_file``.
        strict: passed to ``load_state_dict``.

    Returns:
        ``model``, changed in place.
    """

    def int8(key: str) -> nn.Module | None:
        """torch's dynamic int8 Linear sized from the packed weight saved at ``key``, if any."""
        packed = state_dict.get(f"{key}._packed_params._packed_params")
        if packed is None:
            return None
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        qweight, bias = packed
        return DynamicLinear(
            qweight.shape[1], qweight.shape[0], bias_=bias is not None, dtype=torch.qint8
        )

    def plain_form(name: str, module: nn.Module, own: torch.Tensor) -> nn.Module | None:
        """The folded form the ``state_dict`` holds for the dense layer ``module``, if any."""
        quantized = int8(name)
        if quantized is not None:
            return quantized
        down, up = int8(f"{name}.0"), int8(f"{name}.1")
        if down is not None and up is not None:
            return nn.Sequential(down, up)
        first, second = state_dict.get(f"{name}.0.weight"), state_dict.get(f"{name}.1.weight")
        if first is None or second is None:
            return None
        dtype, device = own.dtype, own.device
        has_bias = f"{name}.1.bias" in state_dict
        if first.dim() == 2:
            down = nn.Linear(first.shape[1], first.shape[0], False, device, dtype)
            up = nn.Linear(second.shape[1], second.shape[0], has_bias, device, dtype)
            return nn.Sequential(down, up)
        assert isinstance(module, nn.Conv2d)
        spread = nn.Conv2d(
            first.shape[1],
            first.shape[0],
            (first.shape[2], first.shape[3]),
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            bias=False,
            device=device,
            dtype=dtype,
        )
        combine = nn.Conv2d(
            second.shape[1], second.shape[0], 1, bias=has_bias, device=device, dtype=dtype
        )
        return nn.Sequential(spread, combine)

    # every path, aliases included: a layer shared by two paths gets one plain pair at both
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        own = getattr(module, "_parameters", {}).get("weight")
        if not name or own is None or f"{name}.weight" in state_dict:
            continue
        plain = replaced.get(id(module))
        if plain is None:
            plain = plain_form(name, module, own)
            if plain is None:
                continue
            plain.train(module.training)
            replaced[id(module)] = plain
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
        # torch's Transformer fast paths read linear1.weight etc. directly: turn them off above
        for prefix, outer in model.named_modules():
            if name.startswith(f"{prefix}." if prefix else ""):
                if getattr(outer, "use_nested_tensor", False):
                    outer.use_nested_tensor = False
                if getattr(outer, "activation_relu_or_gelu", 0):
                    outer.activation_relu_or_gelu = 0
    model.load_state_dict(state_dict, strict=strict)
    return model
