"""PEFT layers with more than one adapter at work: mixed-adapter batches and several active adapters.

Several active LoRA adapters (``set_adapter([...])``, summed on every row) are one adapter of the
concatenated ranks (:func:`several_active_forward`).  The rest of this module is about mixed-adapter
batches (``model(..., adapter_names=[...])``) on :func:`vfm.functional.lora_linear_multi`.

PEFT runs a batch whose items use different LoRA adapters (``"__base__"``: none) with a Python loop
over the adapters named in it: for each one it gathers that adapter's items, runs lora_A and lora_B on
them and scatters the result back into the base output.  A layer swapped by :func:`vfm.peft.accelerate`
instead stacks the named adapters (zero-padded to the largest rank) and runs the base matmul and every
adapter's low-rank term in one grouped call, each row with its own adapter.

The stacks are built on every call (differentiably when a gradient is needed).  With
``vfm.peft.accelerate(model, mixed_batch_cache=True)`` a layer keeps them between calls while the
adapters' tensors look unchanged (same objects, in-place version counters, storage, scalings): as
much memory again as the named adapters' factors, and blind to writes that bypass the version
counter (``param.data``, fused optimizers, PEFT's adapter hot-swap), after which
``vfm.peft.clear_mixed_batch_cache(model)`` must be called.  The checks of the named adapters are
cached on the same fingerprint either way (they depend on no tensor values).  The adapter-index tensor is shared between
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
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vfm.ops.lora_api import _lora_linear_multi_prepared, lora_linear, lora_linear_multi

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_IDS_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_IDS_CACHE_SIZE = 16
_IDS_LOCK = threading.Lock()


def _ids_tensor(per_item: Tuple[int, ...], rows_per_item: int, device: torch.device) -> torch.Tensor:
    """(len(per_item) * rows_per_item,) int64 adapter index per row of x, cached by value (a value is never
    stale: the tensor depends on nothing else; the lock keeps concurrent forwards from racing on the LRU)."""
    key = (per_item, rows_per_item, device)
    with _IDS_LOCK:
        ids = _IDS_CACHE.get(key)
        if ids is not None and _usable(ids, device):
            _IDS_CACHE.move_to_end(key)
            return ids
    ids = torch.tensor(per_item, dtype=torch.long).repeat_interleave(rows_per_item).to(device)
    with _IDS_LOCK:
        _IDS_CACHE[key] = ids
        _IDS_CACHE.move_to_end(key)
        while len(_IDS_CACHE) > _IDS_CACHE_SIZE:
            _IDS_CACHE.popitem(last=False)
    return ids


def _used(layer: nn.Module, adapter_names: Sequence[str]) -> Tuple[List[str], Tuple[int, ...]]:
    """The layer's adapters named in the batch (in order of first use) and each item's index among them
    (-1 for ``"__base__"`` and for names this layer has no adapter for, which PEFT skips too)."""
    adapters = layer._modules["lora_A"]._modules
    index: Dict[str, int] = dict.fromkeys(adapter_names, -1)  # the distinct names, in order of first use
    used: List[str] = [name for name in index if name != BASE and name in adapters]
    for k, name in enumerate(used):
        index[name] = k
    return used, tuple(map(index.__getitem__, adapter_names))


def _layer_reason(layer: nn.Module, x: torch.Tensor, hooked, base: nn.Module) -> Optional[str]:
    """Why the layer's state or the input needs PEFT's forward (checked on every call)."""
    if layer.disable_adapters:
        return "adapters are disabled"
    if hooked(base):
        return "the base layer has forward hooks (e.g. accelerate offloading) that vfm would bypass"
    if not x.is_floating_point():
        return "non-floating input"
    if x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} differs from the base weight's {base.weight.dtype}"
    return None


def _scaling_key(value) -> Any:
    # a tensor scaling (PEFT's prepare_model_for_compiled_hotswap) is refused by _adapters_reason
    return ("tensor", id(value)) if isinstance(value, torch.Tensor) else float(value)


def _fingerprint(layer: nn.Module, names: List[str], hooked) -> Tuple[tuple, list]:
    """Everything the adapters' checks and stacks depend on, per named adapter: the objects (by id;
    they are returned too, for the cache to keep alive so that no id is reused), their types and
    hooks, the factors' version counters and storage, the dropout state and the scaling."""
    mods = layer._modules
    am, bm, dm = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
    variants = getattr(layer, "lora_variant", {})
    scaling = layer.scaling
    key, keep = [], []
    for n in names:
        a, b, drop = am[n], bm[n], dm[n]
        wa, wb, bb = a._parameters.get("weight"), b._parameters.get("weight"), b._parameters.get("bias")
        keep += (a, b, drop, wa, wb, bb)
        key.append((n, id(a), id(b), id(drop), id(wa), id(wb), id(bb), type(a), type(b), type(drop),
                    hooked(a) or hooked(b) or hooked(drop), drop.training, drop.__dict__.get("p"),
                    n in variants, _scaling_key(scaling[n]),
                    None if wa is None else (wa._version, wa.data_ptr(), wa.dtype, wa.requires_grad),
                    None if wb is None else (wb._version, wb.data_ptr(), wb.dtype, wb.requires_grad)))
    return tuple(key), keep


def _adapters_reason(layer: nn.Module, names: List[str], adapter_reason, several_active: bool = False
                     ) -> Tuple[Optional[str], Optional[torch.dtype]]:
    """Why the named adapters need PEFT's forward (None when vfm reproduces it), and their common dtype.

    ``several_active``: the adapters are the layer's active ones, summed on every row
    (:func:`several_active_forward`), not a mixed batch; a ``lora_bias`` is then allowed.
    """
    what = "several active adapters" if several_active else "mixed batches"
    mods = layer._modules
    dtypes = set()
    for name in names:
        if name in getattr(layer, "lora_variant", {}):
            return f"adapter {name!r} is a LoRA variant ({what} run plain LoRA adapters only)", None
        why = adapter_reason(layer, name)
        if why is not None:
            return why, None
        if isinstance(layer.scaling[name], torch.Tensor):
            return f"adapter {name!r} has a tensor-valued scaling (PEFT's compiled hot-swap preparation)", None
        if not several_active and mods["lora_B"][name].bias is not None:
            return f"adapter {name!r} has lora_bias=True (a per-adapter bias)", None
        drop = mods["lora_dropout"][name]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            why = "PEFT draws one mask per adapter" if several_active else "PEFT runs mixed batches in eval mode"
            return f"adapter {name!r} has active dropout ({why})", None
        dtypes.add(mods["lora_A"][name].weight.dtype)
    if len(dtypes) > 1:
        return f"the adapters of {what} have different dtypes {sorted(str(d) for d in dtypes)}", None
    return None, dtypes.pop()


def several_active_reason(layer: nn.Module, active: List[str], adapter_reason) -> Optional[str]:
    """Why a LoRA layer with several active adapters needs PEFT's forward (None when vfm runs it)."""
    return _adapters_reason(layer, active, adapter_reason, several_active=True)[0]


def several_active_forward(layer: nn.Module, x: torch.Tensor, active: List[str], weight: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """PEFT's sum over several active LoRA adapters, ``y = x W^T + b + sum_k s_k (x A_k^T) B_k^T``, as one
    adapter of rank sum_k r_k: A = [A_1; A_2; ...], B = [s_1 B_1, s_2 B_2, ...] (or [B_1, B_2, ...] with the
    common scaling when all s_k are equal), concatenated on every call, differentiably: each adapter gets
    its own gradient.  Each ``lora_bias`` b_k adds s_k b_k to the bias.
    The adapters were checked by :func:`several_active_reason` (no dropout, no variant, one dtype)."""
    mods = layer._modules
    am, bm = mods["lora_A"]._modules, mods["lora_B"]._modules
    scaling = layer.scaling
    scales = [float(scaling[n]) for n in active]
    lora_a = torch.cat([am[n].weight for n in active])
    if len(set(scales)) == 1:  # one scaling (same r and alpha): passed as such, B not rounded after scaling
        lora_b, scale = torch.cat([bm[n].weight for n in active], dim=1), scales[0]
    else:  # s_k B_k formed in fp32, rounded once to the adapter dtype
        lora_b = torch.cat([(bm[n].weight.float() * s).to(bm[n].weight.dtype) for n, s in zip(active, scales)], dim=1)
        scale = 1.0
    for n, s in zip(active, scales):
        b_k = bm[n].bias
        if b_k is not None:
            shift = (b_k * s).to(weight.dtype)
            bias = shift if bias is None else bias + shift
    return lora_linear(x, weight, bias, lora_a, lora_b, scale)


def _stacks(layer: nn.Module, names: List[str], grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, r, in) A and (K, out, r) B of the named adapters, zero-padded to the largest rank;
    differentiable (``grad``: autograd records the stacking, each adapter gets its own
    gradient), else built without autograd.

    On the CPU (float32 / float64) the stacks are views of buffers in the layout the C++ kernels pack
    the factors into (A_k^T and B_k^T row-major, the rank padded to one 64-byte chunk), so the kernels
    never pack them again: one contiguous stack, then one batched transposing copy (about twice as fast
    as stacking the transposed factors one by one); elsewhere plain contiguous stacks (the GPU kernels
    read the factors along in / out)."""
    mods = layer._modules
    a = [mods["lora_A"][n].weight for n in names]
    b = [mods["lora_B"][n].weight for n in names]
    rank = max(t.shape[0] for t in a)
    packed = a[0].device.type == "cpu" and a[0].dtype in (torch.float32, torch.float64)
    if packed:
        chunk = 64 // a[0].element_size()  # 16 float32 or 8 float64
        rank = -(-rank // chunk) * chunk
    pad = nn.functional.pad
    with torch.enable_grad() if grad else torch.no_grad():
        a_stack = torch.stack([t if t.shape[0] == rank else pad(t, (0, 0, 0, rank - t.shape[0])) for t in a])
        b_stack = torch.stack([t if t.shape[1] == rank else pad(t, (0, rank - t.shape[1])) for t in b])
        if packed:  # (K, in, rank) and (K, rank, out) row-major, seen as (K, rank, in) and (K, out, rank)
            a_stack = a_stack.transpose(1, 2).contiguous().transpose(1, 2)
            b_stack = b_stack.transpose(1, 2).contiguous().transpose(1, 2)
    return a_stack, b_stack


def _usable(t: Optional[torch.Tensor], device: torch.device) -> bool:
    """A cached tensor can serve this call: on the device, and not an inference tensor outside
    inference_mode (autograd cannot save those for a backward, and x may need a gradient)."""
    return t is not None and t.device == device and not (t.is_inference() and not torch.is_inference_mode_enabled())


class _Cache:
    """One layer's checked adapters (and their stacks, once built without a gradient to compute)."""

    __slots__ = ("key", "keep", "reason", "dtype", "trainable", "stacks", "scales")

    def __init__(self, key: tuple, keep: list, reason: Optional[str], dtype: Optional[torch.dtype]):
        self.key, self.keep, self.reason, self.dtype, self.stacks = key, keep, reason, dtype, None
        self.scales = None  # (K,) fp32 scalings on the device: the scalings are part of the key
        # whether any factor requires grad (part of the key: requires_grad_ gives a new entry)
        self.trainable = any(t.requires_grad for t in keep if isinstance(t, torch.Tensor))


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
    why = _layer_reason(layer, x, hooked, base)
    cache = None
    if why is None and names:
        key, keep = _fingerprint(layer, names, hooked)
        cache = layer.__dict__.get("_vfm_mixed")
        if cache is None or cache.key != key:  # one entry per layer: the last set of adapters seen
            cache = _Cache(key, keep, *_adapters_reason(layer, names, adapter_reason))
            layer.__dict__["_vfm_mixed"] = cache
        why = cache.reason
        if why is None and cache.dtype != x.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
            why = "input dtype casting is disabled and the adapter dtype differs from the input's"
    if why is not None:
        note_fallback(layer, why + " (adapter_names: mixed-adapter batch)")
        return peft_cls.forward(layer, x, **kwargs)
    if not names:  # every item uses the base layer alone
        return base(x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (batch, *, in_features) with adapter_names, got {tuple(x.shape)}")
    weight, bias = base_weight(base)
    if not _usable(cache.scales, x.device):  # built once per fingerprint: no host-to-device copy per call
        cache.scales = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32).to(x.device)
    scales = cache.scales
    grad = torch.is_grad_enabled() and cache.trainable
    if grad:  # differentiable stacks, never cached
        a_stack, b_stack = _stacks(layer, names, True)
    else:
        stacks = cache.stacks
        if stacks is None or not _usable(stacks[0], x.device):
            stacks = _stacks(layer, names, False)
            if layer.__dict__.get("_vfm_mixed_cache", False):  # accelerate(mixed_batch_cache=True) keeps them
                cache.stacks = stacks
        a_stack, b_stack = stacks
    ids = _ids_tensor(per_item, math.prod(x.shape[1:-1]), x.device)
    if grad:
        return lora_linear_multi(x, weight, bias, a_stack, b_stack, scales, ids, dropout_p=0.0, training=False)
    # the stacks, scales and ids were built here from checked adapters: the kernels without the checks
    return _lora_linear_multi_prepared(x, weight, bias, a_stack, b_stack, scales, ids)
