"""PEFT's mixed-adapter batches (``model(..., adapter_names=[...])``) on :func:`vfm.functional.lora_linear_multi`.

PEFT runs a batch whose items use different LoRA adapters (``"__base__"``: none) with a Python loop
over the adapters named in it: for each one it gathers that adapter's items, runs lora_A and lora_B on
them and scatters the result back into the base output.  A layer swapped by :func:`vfm.peft.accelerate`
instead stacks the named adapters (zero-padded to the largest rank) and runs the base matmul and every
adapter's low-rank term in one grouped call, each row with its own adapter.

The stacks are cached on the layer while the adapters' tensors are unchanged (same objects, same
in-place version counters, same scalings) and nothing needs their gradient; with a gradient to
compute they are rebuilt differentiably on every call.  The adapter-index tensor is shared between
the layers of one forward (they all receive the same ``adapter_names``) through a small cache, so a
GPU forward copies it to the device once, not once per layer.

Whatever the grouped call cannot reproduce goes to PEFT's own mixed-batch forward, with the reason
logged once per layer: LoRA variants other than plain LoRA, ``lora_bias``, adapters with active
dropout (PEFT allows mixed batches in eval mode only), adapters of different dtypes, disabled
adapters, hooks on the base layer.  PEFT's own argument checks (length of ``adapter_names``, merged
adapters, DoRA) run first and raise PEFT's errors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vfm.ops.lora_api import lora_linear_multi

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_IDS_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_IDS_CACHE_SIZE = 16


def _ids_tensor(per_item: Tuple[int, ...], rows_per_item: int, device: torch.device) -> torch.Tensor:
    """(len(per_item) * rows_per_item,) int64 adapter index per row of x, cached by value."""
    key = (per_item, rows_per_item, device)
    ids = _IDS_CACHE.get(key)
    if ids is None:
        ids = torch.tensor(per_item, dtype=torch.long).repeat_interleave(rows_per_item).to(device)
        _IDS_CACHE[key] = ids
        if len(_IDS_CACHE) > _IDS_CACHE_SIZE:
            _IDS_CACHE.popitem(last=False)
    else:
        _IDS_CACHE.move_to_end(key)
    return ids


def _used(layer: nn.Module, adapter_names: Sequence[str]) -> Tuple[List[str], Tuple[int, ...]]:
    """The layer's adapters named in the batch (in order of first use) and each item's index among them
    (-1 for ``"__base__"`` and for names this layer has no adapter for, which PEFT skips too)."""
    adapters = layer._modules["lora_A"]
    index: Dict[str, int] = {}
    used: List[str] = []
    per_item = []
    for name in adapter_names:
        k = index.get(name)
        if k is None:
            k = -1
            if name != BASE and name in adapters:
                k = len(used)
                used.append(name)
            index[name] = k
        per_item.append(k)
    return used, tuple(per_item)


def _reason(layer: nn.Module, names: List[str], x: torch.Tensor, adapter_reason, hooked, base) -> Optional[str]:
    """Why this mixed batch needs PEFT's forward (None when the grouped call reproduces it)."""
    if layer.disable_adapters:
        return "adapters are disabled"
    if hooked(base):
        return "the base layer has forward hooks (e.g. accelerate offloading) that vfm would bypass"
    if not x.is_floating_point():
        return "non-floating input"
    if x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} differs from the base weight's {base.weight.dtype}"
    mods = layer._modules
    dtypes = set()
    for name in names:
        if name in getattr(layer, "lora_variant", {}):
            return f"adapter {name!r} is a LoRA variant (mixed batches run plain LoRA adapters only)"
        why = adapter_reason(layer, name)
        if why is not None:
            return why
        if mods["lora_B"][name].bias is not None:
            return f"adapter {name!r} has lora_bias=True (a per-adapter bias)"
        drop = mods["lora_dropout"][name]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            return f"adapter {name!r} has active dropout (PEFT runs mixed batches in eval mode)"
        dtypes.add(mods["lora_A"][name].weight.dtype)
    if len(dtypes) > 1:
        return f"the adapters in the batch have different dtypes {sorted(str(d) for d in dtypes)}"
    if dtypes and next(iter(dtypes)) != x.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting is disabled and the adapter dtype differs from the input's"
    return None


def _factors(layer: nn.Module, names: List[str]) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[float]]:
    mods = layer._modules
    a = [mods["lora_A"][n].weight for n in names]
    b = [mods["lora_B"][n].weight for n in names]
    return a, b, [float(layer.scaling[n]) for n in names]


def _stacks(layer: nn.Module, names: List[str], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
    """(K, r, in) A, (K, out, r) B zero-padded to the largest rank, and the (K,) fp32 scalings."""
    a, b, scales = _factors(layer, names)
    rank = max(t.shape[0] for t in a)
    if torch.is_grad_enabled() and any(t.requires_grad for t in a + b):  # differentiable, never cached
        a_stack = torch.stack([nn.functional.pad(t, (0, 0, 0, rank - t.shape[0])) for t in a])
        b_stack = torch.stack([nn.functional.pad(t, (0, rank - t.shape[1])) for t in b])
        return a_stack, b_stack, torch.tensor(scales, dtype=torch.float32).to(device)
    key = (tuple(names), tuple(scales),
           tuple((id(t), t._version, t.data_ptr(), t.dtype, tuple(t.shape)) for t in a + b))
    cached = layer.__dict__.get("_vfm_mixed_stacks")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        a_stack = a[0].new_zeros((len(a), rank, a[0].shape[1]))
        b_stack = b[0].new_zeros((len(b), b[0].shape[0], rank))
        for k, (ta, tb) in enumerate(zip(a, b)):
            a_stack[k, : ta.shape[0]].copy_(ta)
            b_stack[k, :, : tb.shape[1]].copy_(tb)
    value = (a_stack, b_stack, torch.tensor(scales, dtype=torch.float32).to(device))
    layer.__dict__["_vfm_mixed_stacks"] = (key, value)  # replaces the previous entry: one per layer
    return value


def mixed_batch_forward(layer: nn.Module, peft_cls: type, x: torch.Tensor, adapter_names: Sequence[str],
                        kwargs: Dict[str, Any], helpers) -> torch.Tensor:
    """Forward of an accelerated PEFT LoRA layer called with ``adapter_names`` (one name per item of x).

    Args:
        layer: the swapped PEFT ``lora.Linear``.
        peft_cls: PEFT's class, whose forward runs what vfm does not take over.
        x: (B, *, in) input; item ``i`` (``x[i]``) uses adapter ``adapter_names[i]``.
        adapter_names: B adapter names, ``"__base__"`` for the base layer alone.
        kwargs: the call's keyword arguments (``adapter_names`` among them), passed on to PEFT on fallback.
        helpers: (adapter_reason, hooked, base_of, base_weight, note_fallback) from :mod:`vfm.peft`.

    Returns:
        (B, *, out): PEFT's mixed-batch output.
    """
    adapter_reason, hooked, base_of, base_weight, note_fallback = helpers
    layer._check_forward_args(x, **kwargs)  # PEFT's errors: length, merged adapters, DoRA
    base = base_of(layer)
    names, per_item = _used(layer, adapter_names)
    why = _reason(layer, names, x, adapter_reason, hooked, base)
    if why is not None:
        note_fallback(layer, why + " (adapter_names: mixed-adapter batch)")
        return peft_cls.forward(layer, x, **kwargs)
    if not names:  # every item uses the base layer alone
        return base(x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, *, in_features) with adapter_names, got {tuple(x.shape)}")
    weight, bias = base_weight(base)
    a_stack, b_stack, scales = _stacks(layer, names, x.device)
    ids = _ids_tensor(per_item, math.prod(x.shape[1:-1]), x.device)
    return lora_linear_multi(x, weight, bias, a_stack, b_stack, scales, ids, dropout_p=0.0, training=False)
