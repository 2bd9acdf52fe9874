"""Run a PEFT model's LoRA / DoRA / AdaLoRA Linear layers on vfm's fused ops, in place.

:func:`accelerate` keeps every PEFT layer object and its Parameters exactly as they are and only
swaps the layer's class for a subclass whose ``forward`` calls :func:`vfm.functional.lora_linear`,
:func:`~vfm.functional.dora_linear` or :func:`~vfm.functional.adalora_linear` for the active
adapter.  Everything else is PEFT's own code: state_dict keys, ``save_pretrained`` /
``from_pretrained``, ``merge`` / ``unmerge`` / ``merge_and_unload``, ``set_adapter``,
``disable_adapter()``.  :func:`restore` swaps the classes back.

Mixed-adapter batches (``model(..., adapter_names=[...])``, one adapter per item) run every named LoRA
adapter of a layer in one :func:`~vfm.functional.lora_linear_multi` call instead of PEFT's loop over
them (:mod:`vfm._peft_mixed`).

Several active plain LoRA adapters (``set_adapter([...])``, summed on every row) run as one adapter
of the concatenated ranks.

Whatever a swapped layer cannot compute itself goes to PEFT's forward, with the reason logged once
per layer (logger ``"vfm.peft"``): merged or disabled adapters, extra forward arguments, LoRA
variants other than DoRA (and in mixed batches or among several active adapters any variant or
active dropout; in mixed batches ``lora_bias``), DoRA with ``lora_bias``, several active AdaLoRA
adapters, input/weight dtypes PEFT itself would reject, and forward hooks on the wrapped layers
(accelerate's offloading hooks, for instance).  Layers it never takes over (listed with the
reason in the report): embeddings, convolutions, quantized or otherwise non-Linear base layers
(bitsandbytes, GPTQ, ...), weights that are not plain tensors (DeepSpeed ZeRO-3, DTensor), and
nested adapter layers.

Numbers: LoRA and AdaLoRA compute PEFT's formula; DoRA includes PEFT's extra base pass under
dropout and its detached weight norm.  Dropout masks come from vfm's counter-based hash, so with
dropout they match PEFT in distribution only (PEFT draws from torch's dropout RNG).  ``lora_bias``
(a bias on lora_B) is folded into the base bias: ``b + scaling * b_B``.  AdaLoRA's lora_E gets
PEFT's gradient at every rank, zero ones included.

Example::

    model = get_peft_model(base_model, LoraConfig(r=16, target_modules="all-linear"))
    report = vfm.peft.accelerate(model)
    print(report)          # how many layers run on vfm, and why the others do not
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from peft.tuners.adalora.layer import SVDLinear as _PeftSVDLinear
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from vfm import _peft_mixed as _mixed
from vfm.ops.lora_api import adalora_linear, dora_linear, lora_linear

logger = logging.getLogger("vfm.peft")

try:  # GPT-2 style layers (weight stored as (in, out)); optional
    from transformers.pytorch_utils import Conv1D as _Conv1D
except ImportError:  # pragma: no cover - transformers is installed with peft
    _Conv1D = None

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_VARIANT_KWARGS = ("alora_offsets",)


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did.

    Attributes:
        accelerated: names of the layers whose forward now runs on vfm.
        kinds: how many of them run LoRA, DoRA and AdaLoRA (by their active adapter now).
        skipped: name -> reason for each adapter layer left entirely to PEFT.
        fallbacks: name -> reason for accelerated layers whose *current* state (merged, several
            active adapters, ...) makes them use PEFT's forward until that state changes.
    """

    accelerated: List[str] = field(default_factory=list)
    kinds: Dict[str, int] = field(default_factory=lambda: {"lora": 0, "dora": 0, "adalora": 0})
    skipped: Dict[str, str] = field(default_factory=dict)
    fallbacks: Dict[str, str] = field(default_factory=dict)

    @property
    def num_accelerated(self) -> int:
        return len(self.accelerated)

    def __str__(self) -> str:
        lines = [f"vfm.peft: {self.num_accelerated} adapter layers run on vfm "
                 f"({', '.join(f'{k} {v}' for k, v in self.kinds.items())}), {len(self.skipped)} left to PEFT"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  {name} (for now): {why}" for name, why in self.fallbacks.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks --
def _is_conv1d(module: nn.Module) -> bool:
    return _Conv1D is not None and type(module) is _Conv1D


def _hooked(module: nn.Module) -> bool:
    # accelerate's add_hook_to_module stores _hf_hook as a plain attribute (the instance __dict__);
    # reading it there spares nn.Module.__getattr__'s AttributeError on every forward
    return bool(module._forward_hooks or module._forward_pre_hooks or module.__dict__.get("_hf_hook") is not None)


def _static_reason(layer: nn.Module) -> Optional[str]:
    """Why a PEFT layer can never run on vfm (None when it can)."""
    cls = type(layer)
    if cls not in (_PeftLoraLinear, _PeftSVDLinear):
        return f"{cls.__module__}.{cls.__name__} is not PEFT's LoRA/DoRA/AdaLoRA Linear layer"
    if isinstance(layer.base_layer, BaseTunerLayer):
        return "nested adapter layers (the base layer is itself an adapter layer)"
    base = layer.get_base_layer()
    if _is_conv1d(base):
        if not layer.fan_in_fan_out:
            return "transformers Conv1D base layer without fan_in_fan_out"
    elif not (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward):
        return f"base layer {type(base).__module__}.{type(base).__name__} is not a plain nn.Linear (quantized?)"
    elif layer.fan_in_fan_out:
        return "fan_in_fan_out=True on an nn.Linear base layer"
    weight = getattr(base, "weight", None)
    if type(weight) not in _PLAIN_TENSORS or not weight.is_floating_point():
        return f"base weight is a {type(weight).__name__} of dtype {getattr(weight, 'dtype', None)}, not a plain " \
               "floating tensor (quantized, partitioned or distributed)"
    return None


def _adapter_reason(layer: nn.Module, name: str) -> Optional[str]:
    """Why adapter ``name`` of an eligible layer cannot run on vfm (None when it can)."""
    if isinstance(layer, _PeftSVDLinear):
        if layer.r.get(name, 0) == 0:
            return f"adapter {name!r} has rank 0"
        tensors = (layer.lora_A[name], layer.lora_E[name], layer.lora_B[name])
    else:
        mods = layer._modules  # the hot path: dict reads instead of nn.Module.__getattr__
        variant = getattr(layer, "lora_variant", {}).get(name)
        dora = _is_dora(layer, name)
        if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
            return f"LoRA variant {type(variant).__name__} of adapter {name!r} is not supported"
        a, b = mods["lora_A"][name], mods["lora_B"][name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or _hooked(a) or _hooked(b):
            return f"lora_A/lora_B of adapter {name!r} are not plain hook-free nn.Linear modules"
        if dora:
            if b.bias is not None:
                return f"DoRA with lora_bias=True (adapter {name!r})"
            if layer.ephemeral_gpu_offload:
                return "DoRA with ephemeral_gpu_offload"
            tensors = (a.weight, b.weight, layer.lora_magnitude_vector[name].weight)
        else:
            tensors = (a.weight, b.weight) + ((b.bias,) if b.bias is not None else ())
    if any(type(t) not in _PLAIN_TENSORS for t in tensors):
        return f"adapter {name!r} weights are not plain tensors (partitioned or distributed)"
    if len({t.dtype for t in tensors}) != 1:
        return f"adapter {name!r} weights have mixed dtypes {sorted(str(t.dtype) for t in tensors)}"
    drop = layer._modules["lora_dropout"][name]
    if type(drop) not in (nn.Identity, nn.Dropout) or _hooked(drop):
        return f"dropout module {type(drop).__name__} of adapter {name!r} is not nn.Dropout/nn.Identity"
    return None


def _is_dora(layer: nn.Module, name: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(name, False))


def _active(layer: nn.Module) -> List[str]:
    adapters = layer._modules["lora_A"]
    return [n for n in layer.active_adapters if n in adapters]


def _base(layer: nn.Module) -> nn.Module:
    """``layer.get_base_layer()`` without its attribute probing when the base is not itself an adapter
    layer (never, for a layer accelerate swapped: _static_reason refuses nesting)."""
    base = layer._modules["base_layer"]
    return layer.get_base_layer() if isinstance(base, BaseTunerLayer) else base


def _state_reason(layer: nn.Module, active: Optional[List[str]] = None, base: Optional[nn.Module] = None
                  ) -> Optional[str]:
    """Why the layer's current state needs PEFT's forward (None when vfm can run it).

    ``active`` (:func:`_active`) and ``base`` (``layer.get_base_layer()``) may be passed when the
    caller already has them: the checks run on every forward, so each lookup counts.
    """
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "adapter weights are merged into the base weight"
    active = _active(layer) if active is None else active
    several = len(active) > 1 and not isinstance(layer, _PeftSVDLinear)  # LoRA: summed as one adapter
    if len(active) != 1 and not several:
        return f"{len(active)} active adapters (vfm runs one, or several plain LoRA ones)"
    if _hooked(_base(layer) if base is None else base):
        return "the base layer has forward hooks (e.g. accelerate offloading) that vfm would bypass"
    if several:
        return _mixed.several_active_reason(layer, active, _adapter_reason)
    return _adapter_reason(layer, active[0])


def _call_reason(layer: nn.Module, x, args, kwargs, active: List[str], base: nn.Module) -> Optional[str]:
    """Why this call needs PEFT's forward (None when vfm runs it); ``active``/``base`` as _state_reason."""
    if args or any(v is not None for v in kwargs.values()):
        mixed = " (adapter_names: mixed-adapter batch)" if kwargs.get("adapter_names") is not None else ""
        return "extra forward arguments" + mixed
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return "non-floating input"
    why = _state_reason(layer, active, base)
    if why:
        return why
    weight = base.weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype}"
    name = active[0]
    if isinstance(layer.scaling.get(name), torch.Tensor):
        return "tensor-valued scaling (PEFT's compiled hot-swap preparation)"
    lora_a = layer._modules["lora_A"][name]
    adapter_dtype = (lora_a if isinstance(layer, _PeftSVDLinear) else lora_a.weight).dtype
    if adapter_dtype != x.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting is disabled and the adapter dtype differs from the input's"
    return None


def _note_fallback(layer: nn.Module, reason: str) -> None:
    seen = layer.__dict__.setdefault("_vfm_fallback_reasons", set())
    if reason not in seen:
        seen.add(reason)
        logger.info("vfm.peft: %s runs PEFT's forward: %s", type(layer).__name__, reason)


# -------------------------------------------------------------------------- forward --
def _base_weight(base: nn.Module):
    return (base.weight.t() if _is_conv1d(base) else base.weight), base.bias


def _dropout_args(layer: nn.Module, name: str):
    drop = layer._modules["lora_dropout"][name]
    if isinstance(drop, nn.Dropout):
        return float(drop.p), bool(drop.training)
    return 0.0, False


def _vfm_forward(layer: nn.Module, peft_cls: type, x, args, kwargs):
    if kwargs.get("adapter_names") is not None and not args and peft_cls is _PeftLoraLinear and \
            isinstance(x, torch.Tensor) and all(v is None for k, v in kwargs.items() if k != "adapter_names"):
        return _mixed.mixed_batch_forward(layer, peft_cls, x, kwargs["adapter_names"], kwargs, _MIXED_HELPERS)
    active, base = _active(layer), _base(layer)
    why = _call_reason(layer, x, args, kwargs, active, base)
    if why is not None:
        _note_fallback(layer, why)
        return peft_cls.forward(layer, x, *args, **kwargs)
    weight, bias = _base_weight(base)
    if len(active) > 1:  # several active LoRA adapters (checked by _state_reason): summed as one
        return _mixed.several_active_forward(layer, x, active, weight, bias)
    name = active[0]
    p, training = _dropout_args(layer, name)
    scaling = layer.scaling[name]
    if isinstance(layer, _PeftSVDLinear):
        return adalora_linear(x, weight, bias, layer.lora_A[name], layer.lora_E[name], layer.lora_B[name], scaling,
                              layer.ranknum[name], dropout_p=p, training=training)
    mods = layer._modules
    lora_a_mod, lora_b_mod = mods["lora_A"][name], mods["lora_B"][name]
    lora_a, lora_b = lora_a_mod.weight, lora_b_mod.weight
    if _is_dora(layer, name):  # the only variant _adapter_reason lets through
        magnitude = layer.lora_magnitude_vector[name].weight
        return dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p=p,
                           training=training and layer.training)
    lora_bias = lora_b_mod.bias
    if lora_bias is not None:  # lora_bias=True: B(A x) + b_B, scaled, is the same as a base-bias shift
        shift = (lora_bias * scaling).to(weight.dtype)
        bias = shift if bias is None else bias + shift
    return lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=p, training=training)


class LoraLinear(_PeftLoraLinear):
    """PEFT's ``lora.Linear`` running on vfm's ops (installed by :func:`accelerate`; never built directly)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _vfm_forward(self, _PeftLoraLinear, x, args, kwargs)

    def _get_name(self) -> str:  # repr stays PEFT's
        return _PeftLoraLinear.__name__


class AdaLoraSVDLinear(_PeftSVDLinear):
    """PEFT's ``adalora.SVDLinear`` running on vfm's ops (installed by :func:`accelerate`)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _vfm_forward(self, _PeftSVDLinear, x, args, kwargs)

    def _get_name(self) -> str:
        return _PeftSVDLinear.__name__


_MIXED_HELPERS = (_adapter_reason, _hooked, _base, _base_weight, _note_fallback)

_SWAP = {_PeftLoraLinear: LoraLinear, _PeftSVDLinear: AdaLoraSVDLinear}
_UNSWAP = {v: k for k, v in _SWAP.items()}


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, _PeftSVDLinear):
        return "adalora"
    active = _active(layer)
    return "dora" if active and _is_dora(layer, active[0]) else "lora"


# --------------------------------------------------------------------------- public --
def accelerate(model: nn.Module, *, mixed_batch_cache: bool = False) -> AccelerateReport:
    """Make every eligible PEFT LoRA / DoRA / AdaLoRA Linear layer of ``model`` run on vfm, in place.

    Args:
        model: a ``PeftModel`` (or any module containing PEFT adapter layers).
        mixed_batch_cache: for mixed-adapter batches (``adapter_names=``), keep each layer's stack of
            the named adapters' factors between calls instead of stacking them on every call (faster
            for small batches, e.g. decoding).  It costs as much memory again as those adapters, and
            it only notices changes of the adapter weights made through autograd-visible in-place
            operations (an optimizer's ordinary step, ``load_state_dict``, ``copy_``): after writes
            through ``param.data``, a fused optimizer (``fused=True``) or PEFT's adapter hot-swap, call
            :func:`clear_mixed_batch_cache`, or the stale stacks are used.

    Returns:
        An :class:`AccelerateReport`: the layers taken over, and the reason for each adapter layer
        left to PEFT.  Calling it again is harmless (already accelerated layers count again).

    Adapter layers PEFT creates afterwards (``add_adapter`` / ``load_adapter`` of an adapter that
    targets modules no earlier adapter did) are PEFT's own and run PEFT's forward until
    ``accelerate`` is called again; new adapters on layers already taken over run on vfm at once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a PeftModel), got {type(model).__name__}")
    if not isinstance(mixed_batch_cache, bool):
        raise TypeError(f"mixed_batch_cache must be a bool, got {type(mixed_batch_cache).__name__}")
    report = AccelerateReport()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) in _UNSWAP:
            why = None
        else:
            why = _static_reason(module)
            if why is None:
                active = _active(module)
                why = _adapter_reason(module, active[0]) if len(active) == 1 else None
        if why is not None:
            report.skipped[name] = why
            logger.info("vfm.peft: leaving %s to PEFT: %s", name, why)
            continue
        module.__class__ = _SWAP.get(type(module), type(module))
        module.__dict__["_vfm_mixed_cache"] = mixed_batch_cache
        module.__dict__.pop("_vfm_mixed", None)  # nothing cached survives a new accelerate call
        report.accelerated.append(name)
        report.kinds[_kind(module)] += 1
        later = _state_reason(module)
        if later is not None:
            report.fallbacks[name] = later
    if report.skipped:
        logger.warning("vfm.peft: %d adapter layers run on vfm, %d are left to PEFT (see the report for why)",
                       report.num_accelerated, len(report.skipped))
    elif not report.accelerated:
        logger.warning("vfm.peft: %s holds no PEFT adapter layer, nothing to accelerate (call accelerate after "
                       "get_peft_model / PeftModel.from_pretrained)", type(model).__name__)
    return report


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`: every swapped layer gets PEFT's class (and forward) back.

    Returns:
        The number of layers restored.
    """
    count = 0
    for module in model.modules():
        original = _UNSWAP.get(type(module))
        if original is not None:
            module.__class__ = original
            for attr in ("_vfm_fallback_reasons", "_vfm_mixed", "_vfm_mixed_cache"):
                module.__dict__.pop(attr, None)
            count += 1
    return count


def clear_mixed_batch_cache(model: nn.Module) -> int:
    """Free the stacked adapter factors that accelerated layers keep for mixed-adapter batches.

    Only layers accelerated with ``mixed_batch_cache=True`` keep stacks; they are rebuilt at the next
    mixed batch.  Needed after changing adapter weights behind the version counter (``param.data``,
    fused optimizers, PEFT's adapter hot-swap); also frees a deleted adapter's tensors and the memory
    between serving sessions.

    Returns:
        The number of layers whose cache was dropped.
    """
    count = 0
    for module in model.modules():
        if type(module) in _UNSWAP and module.__dict__.pop("_vfm_mixed", None) is not None:
            count += 1
    return count
