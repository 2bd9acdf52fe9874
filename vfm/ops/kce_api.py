"""Public knowledge cross-entropy: argument checking and normalisation for the custom ops."""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from vfm.ops import knowledge_ce as _ops  # noqa: F401  (registers torch.ops.vfm.*)
from vfm.ops.kce_reference import KD_MODES, KD_NONE, PEN_MODES, PEN_NONE, PEN_POSTERIOR, pack_allowed_bits

_REDUCTIONS = ("mean", "sum", "none")


class KnowledgeCEParts(NamedTuple):
    """What ``return_parts=True`` returns.

    ``loss`` is the differentiable loss; the other fields are detached diagnostics, each weighted
    and reduced like the loss (per row for ``reduction="none"``), so that
    ``loss == ce + kd + penalty + z_loss``.  ``n_outside_allowed`` counts the rows whose target
    counts for CE but lies outside the row's allowed labels (a rule contradicting a gold label).
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor
    penalty: Tensor
    z_loss: Tensor
    n_outside_allowed: Tensor


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _readable(t: Tensor) -> bool:
    """Whether the host may read ``t``'s values for a check (not traced, fake or on the meta device)."""
    return t.device.type != "meta" and _ops._is_eager_tensor(t)


def _shape(t) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ")"


def _require_tensor(name: str, value, *, floating: Optional[bool] = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating is True and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    return value


def _require_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _same_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")


def _check_target_range(target: Tensor, valid: Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must be ignore_index or lie in [0, V).

    CPU tensors raise ValueError listing the offending values.  On other devices reading the
    values would synchronise the host with the device on every call (stalling a training step),
    so the check runs asynchronously (``torch._assert_async``), as torch's own cross-entropy
    does there, and a violation fails with the same message at the next synchronisation.  (CUDA
    calls normally take the device path instead: the prologue kernel checks the range there.)
    """
    if not _readable(target) or target.numel() == 0:
        return
    msg = f"target holds values outside [0, {vocab}) that are not ignore_index={ignore_index}"
    lo, hi = torch.aminmax(torch.where(valid, target, torch.zeros_like(target)))
    if target.device.type != "cpu":
        torch._assert_async((lo >= 0) & (hi < vocab), msg)
        return
    if int(lo) < 0 or int(hi) >= vocab:
        bad = valid & ((target < 0) | (target >= vocab))
        raise ValueError(f"{msg}: {target[bad].unique()[:8].tolist()}")


def _normalise_teacher_topk(teacher_topk, lead_shape, n_rows: int, vocab: int, device):
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices [N, k] int, logprobs [N, k] float)")
    idx = _require_tensor("teacher_topk[0] (indices)", teacher_topk[0], floating=False)
    lp = _require_tensor("teacher_topk[1] (logprobs)", teacher_topk[1], floating=True)
    if tuple(idx.shape[:-1]) != tuple(lead_shape) or idx.dim() != len(lead_shape) + 1:
        raise ValueError(f"teacher_topk indices have shape {_shape(idx)}; expected {tuple(lead_shape)} + (k,)")
    if lp.shape != idx.shape:
        raise ValueError(f"teacher_topk logprobs shape {_shape(lp)} differs from indices shape {_shape(idx)}")
    _same_device("teacher_topk indices", idx, device)
    _same_device("teacher_topk logprobs", lp, device)
    idx = idx.reshape(n_rows, -1).long()
    lp = lp.reshape(n_rows, -1).float()
    if _readable(idx) and idx.numel():
        range_msg = f"teacher_topk indices must lie in [0, {vocab}) or be -1 (padding)"
        out_of_range = (idx < -1) | (idx >= vocab)
        srt = idx.sort(dim=-1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        dup_msg = "teacher_topk indices repeat within a row; indices must be distinct per row"
        if device.type != "cpu":  # no host synchronisation off the CPU (see _check_target_range)
            torch._assert_async(~out_of_range.any(), range_msg)
            torch._assert_async(~dup.any(), dup_msg)
        else:
            if bool(out_of_range.any()):
                raise ValueError(f"{range_msg}; got {idx[out_of_range].unique()[:8].tolist()}")
            if bool(dup.any()):
                row = int(dup.any(-1).nonzero()[0, 0])
                raise ValueError(f"{dup_msg} (row {row} repeats)")
    return idx.contiguous(), lp.contiguous()


def _normalise_allowed(allowed, lead_shape, n_rows: int, vocab: int, device, on_device: bool = False):
    """Packed allowed words (G, W) int32 and group ids (N,) int32 (-1 = unconstrained).

    With ``on_device`` (the CUDA path) the group ids' range check and mapping are left to the
    prologue kernel: returns (bits, raw group ids (N,) or None for a dense mask, unconstrained (G,)).
    """
    if isinstance(allowed, Tensor):
        if allowed.dtype != torch.bool:
            raise TypeError(f"allowed must be a bool tensor (or a (group_masks, group_ids) pair), got {allowed.dtype}")
        if tuple(allowed.shape) != tuple(lead_shape) + (vocab,):
            raise ValueError(f"allowed has shape {_shape(allowed)}; expected logits' shape {tuple(lead_shape) + (vocab,)}")
        _same_device("allowed", allowed, device)
        masks = allowed.reshape(n_rows, vocab)
        if on_device:
            bits, unconstrained = _packed_groups(masks, dense=True)
            return bits, None, unconstrained
        gid = torch.arange(n_rows, device=device, dtype=torch.int64)
    elif isinstance(allowed, (tuple, list)) and len(allowed) == 2:
        masks, gid = allowed
        _require_tensor("allowed[0] (group_masks)", masks)
        if masks.dtype != torch.bool or masks.dim() != 2:
            raise TypeError(f"allowed group_masks must be a 2-D bool tensor [G, V], got {masks.dtype} {_shape(masks)}")
        if masks.shape[1] != vocab:
            raise ValueError(f"allowed group_masks cover {masks.shape[1]} labels but logits have V={vocab}")
        gid = _require_tensor("allowed[1] (group_ids)", gid, floating=False)
        if tuple(gid.shape) != tuple(lead_shape):
            raise ValueError(f"allowed group_ids shape {_shape(gid)} differs from target shape {tuple(lead_shape)}")
        _same_device("allowed group_masks", masks, device)
        _same_device("allowed group_ids", gid, device)
        if on_device:
            bits, unconstrained = _packed_groups(masks, dense=False)
            return bits, gid.reshape(n_rows).contiguous(), unconstrained
        gid = gid.reshape(n_rows).long()
        if _readable(gid) and gid.numel():
            bad = (gid < -1) | (gid >= masks.shape[0])
            msg = f"allowed group_ids must lie in [-1, {masks.shape[0]})"
            if device.type != "cpu":  # no host synchronisation off the CPU
                torch._assert_async(~bad.any(), msg)
            elif bool(bad.any()):
                raise ValueError(f"{msg}; got {gid[bad].unique()[:8].tolist()}")
    else:
        raise TypeError("allowed must be a bool tensor [N, V] or a pair (group_masks [G, V] bool, group_ids [N] int)")
    if masks.shape[0] == 0:
        return pack_allowed_bits(masks), torch.full_like(gid, -1, dtype=torch.int32)
    bits, unconstrained = _packed_groups(masks, dense=isinstance(allowed, Tensor))
    gid = torch.where((gid < 0) | unconstrained[gid.clamp_min(0)], -1, gid)
    return bits, gid.to(torch.int32)


# Group masks are usually the same tensor every step (the rules do not change): keep the packed
# words of the last few, keyed by the tensor object and its version counter.
_PACKED: "OrderedDict[int, tuple]" = OrderedDict()
_PACKED_MAX = 8


def _packed_groups(masks: Tensor, dense: bool) -> Tuple[Tensor, Tensor]:
    cacheable = not dense and not _compiling() and type(masks) is Tensor
    if cacheable:
        hit = _PACKED.get(id(masks))
        if hit is not None and hit[0]() is masks and hit[1] == masks._version:
            return hit[2], hit[3]
    counts = masks.sum(-1)
    unconstrained = (counts == 0) | (counts == masks.shape[1])
    bits = pack_allowed_bits(masks)
    if cacheable:
        _PACKED[id(masks)] = (weakref.ref(masks), masks._version, bits, unconstrained)
        while len(_PACKED) > _PACKED_MAX:
            _PACKED.popitem(last=False)
    return bits, unconstrained


def knowledge_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    ce_weight: float = 1.0,
    teacher_logits: Optional[Tensor] = None,
    teacher_topk: Optional[Sequence[Tensor]] = None,
    temperature: float = 1.0,
    kd_weight: float = 0.0,
    kd: str = "kl",
    jsd_beta: float = 0.5,
    allowed: Union[Tensor, Sequence[Tensor], None] = None,
    penalty_weight: float = 0.0,
    penalty: str = "mass",
    rule_strength: Optional[float] = None,
    soft_mask: Optional[Tensor] = None,
    num_items_in_batch: Union[int, Tensor, None] = None,
    inplace_backward: bool = False,
    return_parts: bool = False,
):
    """Cross-entropy + distillation + knowledge penalty + z-loss, fused in one pass over logits.

    L_i = ce_weight * CE_i + kd_weight * KD_i + penalty_weight * pen_i + z_loss * lse_i^2
    (DESIGN.md, "Op 1", has every formula).

    Args:
        logits: (N, V) or (*, V) student logits, fp32/fp16/bf16 (fp64 on the torch and cpp
            backends). The loss is computed in fp32 whatever the dtype.
        target: (N,) or (*) integer class indices; ``ignore_index`` marks unlabelled rows.
        weight: (V,) class weights of the CE term (as ``torch.nn.functional.cross_entropy``).
        ignore_index: target value that does not count for CE.
        reduction: ``"mean"`` (CE divided by the counted rows' class weights; KD, penalty and
            z-loss by the number of soft_mask rows), ``"sum"`` or ``"none"`` (per row).
        label_smoothing: eps in [0, 1], exactly as torch's cross_entropy.
        z_loss: coefficient of lse^2 (0 disables it).
        softcap: c > 0 applies z <- c * tanh(z / c) to the student logits first.
        ce_weight: weight of the CE term.
        teacher_logits: (N, V) / (*, V) full teacher logits (no gradient flows to them).
        teacher_topk: (indices (N, k) int, logprobs (N, k) float) sparse teacher, ``kd="kl"``
            only; index -1 is padding.
        temperature: T > 0 of the distillation and posterior terms (scaled by T^2).
        kd_weight: weight of the KD term (needs a teacher when nonzero).
        kd: ``"kl"`` = KL(q||p), ``"reverse_kl"`` = KL(p||q) or ``"jsd"`` (generalised, beta).
        jsd_beta: beta in (0, 1) of ``kd="jsd"``.
        allowed: allowed labels per row: bool (N, V), or (group_masks (G, V) bool,
            group_ids (N,) int, -1 = unconstrained).  The packed bits of the last few group_masks
            tensors are kept between calls, keyed by the tensor and its version counter: change
            the masks in place through normal tensor ops (or pass a new tensor), not through
            ``.data`` or a NumPy array sharing their memory, which the counter does not see.
        penalty_weight: weight of the knowledge penalty (needs ``allowed`` when nonzero).
        penalty: ``"mass"`` (-log of the probability mass on the allowed labels) or
            ``"posterior"`` (KL to the rule-projected teacher, Hu et al. 2016).
        rule_strength: C of the posterior penalty; None = infinity (hard restriction).
        soft_mask: (N,) / (*) bool rows that count for KD, penalty and z-loss; default
            ``target != ignore_index``.
        num_items_in_batch: with ``reduction="mean"``, replaces every denominator (gradient
            accumulation).
        inplace_backward: write the gradient into the logits' storage (smallest memory; the
            logits' values are destroyed).
        return_parts: return :class:`KnowledgeCEParts` instead of the loss alone.

    Returns:
        The fp32 loss: a scalar, or shape ``target.shape`` for ``reduction="none"`` (0 where a row
        counts for no term); or :class:`KnowledgeCEParts` with ``return_parts=True``.

    Raises:
        TypeError / ValueError: naming the argument, for wrong types, shapes, devices, values
        out of range and impossible option combinations.
    """
    return _call(_prepare(dict(locals())))


class _Prepared(NamedTuple):
    args: tuple
    compute_grad: bool
    reduce: bool
    inplace: bool
    lead_shape: tuple
    return_parts: bool


class _Options(NamedTuple):
    """The validated scalar options of a call (cached: they repeat from step to step)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    ce_weight: float
    temperature: float
    kd_weight: float
    penalty_weight: float
    jsd_beta: float
    strength: float
    kd_mode: int
    pen_mode: int


_OPTION_KEYS = ("reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "ce_weight", "temperature",
                "kd_weight", "kd", "jsd_beta", "penalty_weight", "penalty", "rule_strength", "inplace_backward",
                "return_parts")
_PLAIN = (int, float, str, bool, type(None))
_OPTIONS: dict = {}


def _options(a: dict) -> _Options:
    """Validate the scalar options (cached by value and type: the same call repeats every step)."""
    values = tuple(a[k] for k in _OPTION_KEYS) + (a["num_items_in_batch"] is None,)
    key = None
    if all(type(v) in _PLAIN for v in values):
        key = tuple(zip(map(type, values), values))
        hit = _OPTIONS.get(key)
        if hit is not None:
            return hit
    (reduction, ignore_index, label_smoothing, z_loss, softcap, ce_weight, temperature, kd_weight, kd, jsd_beta,
     penalty_weight, penalty, rule_strength, inplace_backward, return_parts, no_items) = values
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    label_smoothing = _require_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = _require_number("z_loss", z_loss, low=0.0)
    softcap_value = 0.0 if softcap is None else _require_number("softcap", softcap, low=0.0, low_open=True)
    ce_weight = _require_number("ce_weight", ce_weight)
    temperature = _require_number("temperature", temperature, low=0.0, low_open=True)
    kd_weight = _require_number("kd_weight", kd_weight)
    penalty_weight = _require_number("penalty_weight", penalty_weight)
    if kd not in KD_MODES:
        raise ValueError(f"kd must be one of {tuple(KD_MODES)}, got {kd!r}")
    jsd_beta = _require_number("jsd_beta", jsd_beta)
    if kd == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must lie strictly between 0 and 1, got {jsd_beta}")
    if penalty not in PEN_MODES:
        raise ValueError(f"penalty must be one of {tuple(PEN_MODES)}, got {penalty!r}")
    strength = math.inf if rule_strength is None else _require_number("rule_strength", rule_strength, low=0.0)
    if not no_items and reduction != "mean":
        raise ValueError(f"num_items_in_batch needs reduction='mean', got reduction={reduction!r}")
    for name, flag in (("inplace_backward", inplace_backward), ("return_parts", return_parts)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    out = _Options(int(ignore_index), label_smoothing, z_loss, softcap_value, ce_weight, temperature, kd_weight,
                   penalty_weight, jsd_beta, strength, KD_MODES[kd] if kd_weight != 0.0 else KD_NONE,
                   PEN_MODES[penalty] if penalty_weight != 0.0 else PEN_NONE)
    if key is not None:
        if len(_OPTIONS) >= 64:
            _OPTIONS.clear()
        _OPTIONS[key] = out
    return out


def _prepare(a: dict) -> "_Prepared":
    logits = _require_tensor("logits", a["logits"], floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (*, V) with V >= 1, got {_shape(logits)}")
    target = _require_tensor("target", a["target"], floating=False)
    vocab = int(logits.shape[-1])
    lead_shape = tuple(logits.shape[:-1])
    if tuple(target.shape) != lead_shape:
        raise ValueError(f"target shape {_shape(target)} does not match logits shape {_shape(logits)} without its last dim")
    device = logits.device
    _same_device("target", target, device)
    o = _options(a)
    reduction, kd, num_items_in_batch = a["reduction"], a["kd"], a["num_items_in_batch"]
    ignore_index, kd_weight, penalty_weight = o.ignore_index, o.kd_weight, o.penalty_weight

    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z2d = logits.reshape(-1, vocab)
    if z2d.stride(-1) != 1:
        z2d = z2d.contiguous()
    n_rows = z2d.shape[0]
    tgt = target.reshape(n_rows).long()
    # CUDA tensors: per-row scales, range checks and group ids in one prologue kernel (no sync).
    on_device = acc_dtype == torch.float32 and _ops.use_device_path(z2d)
    if not on_device:
        valid = tgt != ignore_index
        _check_target_range(tgt, valid, vocab, ignore_index)

    w = a["weight"]
    if w is not None:
        w = _require_tensor("weight", w, floating=True)
        if tuple(w.shape) != (vocab,):
            raise ValueError(f"weight must have shape ({vocab},) (one per class), got {_shape(w)}")
        _same_device("weight", w, device)
        if w.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight (the CE class weights; class_weight of the fused linear loss) requires grad, "
                             "but class weights receive no gradient (torch's cross_entropy refuses them too); "
                             "pass weight.detach()")
        w = w.to(acc_dtype).contiguous()

    teacher_logits, teacher_topk = a["teacher_logits"], a["teacher_topk"]
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("give either teacher_logits or teacher_topk, not both")
    teacher = topk_idx = topk_lp = None
    if teacher_logits is not None:
        teacher = _require_tensor("teacher_logits", teacher_logits, floating=True)
        if teacher.shape != logits.shape:
            raise ValueError(
                f"teacher_logits shape {_shape(teacher)} differs from logits shape {_shape(logits)}"
                + (f" (teacher vocabulary {teacher.shape[-1]} vs student {vocab})" if teacher.dim() and teacher.shape[-1] != vocab else "")
            )
        _same_device("teacher_logits", teacher, device)
        teacher = teacher.detach().reshape(n_rows, vocab)
        if teacher.stride(-1) != 1:
            teacher = teacher.contiguous()
    if teacher_topk is not None:
        if kd != "kl":
            raise ValueError(f"teacher_topk supports kd='kl' only, got kd={kd!r}")
        topk_idx, topk_lp = _normalise_teacher_topk(teacher_topk, lead_shape, n_rows, vocab, device)
        topk_lp = topk_lp.detach()
    if kd_weight != 0.0 and teacher is None and topk_idx is None:
        raise ValueError(f"kd_weight={kd_weight} needs a teacher: pass teacher_logits or teacher_topk")

    allowed = a["allowed"]
    if o.pen_mode != PEN_NONE and allowed is None:
        raise ValueError(f"penalty_weight={penalty_weight} needs allowed (the allowed-label masks)")
    allowed_bits = group_ids = raw_gid = unconstrained = None
    if allowed is not None:
        if on_device:
            allowed_bits, raw_gid, unconstrained = _normalise_allowed(allowed, lead_shape, n_rows, vocab, device, True)
        else:
            allowed_bits, group_ids = _normalise_allowed(allowed, lead_shape, n_rows, vocab, device)

    soft_mask = a["soft_mask"]
    if soft_mask is not None:
        _require_tensor("soft_mask", soft_mask)
        if soft_mask.dtype != torch.bool:
            raise TypeError(f"soft_mask must be a bool tensor, got {soft_mask.dtype}")
        if tuple(soft_mask.shape) != lead_shape:
            raise ValueError(f"soft_mask shape {_shape(soft_mask)} differs from target shape {lead_shape}")
        _same_device("soft_mask", soft_mask, device)
        soft_mask = soft_mask.reshape(n_rows)
    items = None
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            items = num_items_in_batch.to(device=device)
        else:
            items = _require_number("num_items_in_batch", num_items_in_batch, low=0.0, low_open=True)
    coefs = (o.ce_weight, kd_weight, penalty_weight, o.z_loss)
    if on_device:
        scales, group_ids, err = _ops.row_scales_device(tgt, soft_mask, w, raw_gid, unconstrained, items, vocab,
                                                        ignore_index, reduction == "mean", coefs,
                                                        dense_groups=isinstance(allowed, Tensor))
        if err is not None:  # CPU (the interpreter): read the error word, raise what the CPU path raises
            if err & 1:
                _check_target_range(tgt, tgt != ignore_index, vocab, ignore_index)
            if err & 2:
                bad = (raw_gid < -1) | (raw_gid >= unconstrained.shape[0])
                raise ValueError(f"allowed group_ids must lie in [-1, {unconstrained.shape[0]}); "
                                 f"got {raw_gid[bad].unique()[:8].tolist()}")
    else:
        scales = _ops.row_scales_torch(tgt, valid, soft_mask, w, items, reduction == "mean", coefs, acc_dtype)

    kd_mode, pen_mode = o.kd_mode, o.pen_mode
    if pen_mode != PEN_POSTERIOR and kd_mode == KD_NONE:
        teacher = None  # unused: do not make the kernels read it
    if kd_mode == KD_NONE:
        topk_idx = topk_lp = None
    compute_grad = z2d.requires_grad and torch.is_grad_enabled()
    if a["inplace_backward"] and compute_grad and _ops._is_eager_tensor(z2d) \
            and torch._debug_has_internal_overlap(z2d) != 0:  # e.g. expand(): rows share memory
        raise ValueError(f"inplace_backward=True writes the gradient into the logits, but their rows share memory "
                         f"(shape {_shape(logits)}, strides {tuple(logits.stride())}); pass logits.contiguous() "
                         "or inplace_backward=False")
    args = (z2d, tgt, w, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, ignore_index,
            o.label_smoothing, o.softcap, o.temperature, kd_mode, o.jsd_beta, pen_mode, o.strength,
            o.ce_weight != 0.0, o.z_loss != 0.0)
    return _Prepared(args, compute_grad, reduction != "none", a["inplace_backward"] and compute_grad, lead_shape,
                     a["return_parts"])


_SIGNATURE = inspect.signature(knowledge_cross_entropy)


def prepare_arguments(logits: Tensor, target: Tensor, **options) -> "_Prepared":
    """Validate and normalise a call's arguments exactly as :func:`knowledge_cross_entropy` does.

    Returns the positional arguments of ``torch.ops.vfm.knowledge_cross_entropy`` (without the
    trailing ``compute_grad, reduce`` flags) and the call's flags; used by tests and benchmarks.
    """
    bound = _SIGNATURE.bind(logits, target, **options)
    bound.apply_defaults()
    return _prepare(bound.arguments)


def _call(p: "_Prepared"):
    args, reduce = p.args, p.reduce
    z2d = args[0]
    if p.inplace:
        loss, parts = _ops.InplaceKnowledgeCrossEntropy.apply(z2d, reduce, *args[1:])
    elif _ops._is_eager_tensor(z2d):
        loss, parts = _ops.EagerKnowledgeCrossEntropy.apply(z2d, p.compute_grad, reduce, *args[1:])
    else:
        loss, parts, _ = torch.ops.vfm.knowledge_cross_entropy(*args, p.compute_grad, reduce)
    lead_shape = p.lead_shape
    if not reduce:
        loss = loss.reshape(lead_shape)
    if not p.return_parts:
        return loss
    parts = parts.detach()
    if reduce:
        ce, kd_part, pen, zl = (parts[i].sum() for i in range(4))
        n_out = parts[4].sum().round().long()
    else:
        ce, kd_part, pen, zl = (parts[i].reshape(lead_shape) for i in range(4))
        n_out = parts[4].reshape(lead_shape).round().long()
    return KnowledgeCEParts(loss, ce, kd_part, pen, zl, n_out)
