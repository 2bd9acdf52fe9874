"""Public fused linear knowledge cross-entropy: argument checking, normalisation, dispatch.

``fused_linear_knowledge_cross_entropy(hidden, weight, target, bias)`` returns the numbers of
``knowledge_cross_entropy(hidden @ weight.T + bias, target, ...)`` without ever holding the
(N, V) logits: see :mod:`vfm.ops.flce_blockwise` for the blockwise design and
:mod:`vfm.ops.flce_ops` for the custom op and its backends.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from vfm.ops import flce_ops as _ops
from vfm.ops.flce_blockwise import default_block_rows
from vfm.ops.kce_api import KnowledgeCEParts, knowledge_cross_entropy, prepare_arguments

#: The options of :func:`vfm.functional.knowledge_cross_entropy` this function takes as well.
KCE_OPTIONS = [n for n, p in inspect.signature(knowledge_cross_entropy).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
_SHAPE = lambda t: "(" + ", ".join(str(int(s)) for s in t.shape) + ")"  # noqa: E731


def _tensor(name: str, value, *, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_head(prefix: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    _tensor(f"{prefix}hidden", hidden)
    _tensor(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape (*, H), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape (V, H), got {_SHAPE(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}hidden {_SHAPE(hidden)} and {prefix}weight {_SHAPE(weight)} disagree on H "
                         f"({hidden.shape[-1]} vs {weight.shape[1]})")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight must have V >= 1 rows, got {_SHAPE(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}hidden is {hidden.dtype} but {prefix}weight is {weight.dtype}; cast one of them")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}weight is on {weight.device} but {prefix}hidden is on {hidden.device}")
    if bias is not None:
        _tensor(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},), got {_SHAPE(bias)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"{prefix}bias is {bias.dtype} on {bias.device}; "
                            f"expected {hidden.dtype} on {hidden.device}")


def _autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for devices autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast_operand(t, low: torch.dtype):
    """``t`` cast to autocast's ``low`` dtype where autocast would cast it (fp64 is left alone)."""
    if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16) and t.dtype != low:
        return t.to(low)
    return t


def _check_grad_filter(value) -> float:
    """None -> 0.0 (exact); otherwise a float in (0, 1)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"grad_filter must be None or a float in (0, 1), got {type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:  # also rejects NaN
        raise ValueError(f"grad_filter must be None (exact gradients) or a relative tolerance in (0, 1), got {value!r}")
    return value


def fused_linear_knowledge_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    block_rows: Optional[int] = None,
    grad_accum_dtype: Optional[torch.dtype] = torch.float32,
    grad_filter: Optional[float] = None,
    **options,
):
    """Knowledge cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Same numbers (within per-dtype tolerances) as
    ``vfm.functional.knowledge_cross_entropy(hidden @ weight.T + bias, target, **options)``:
    cross-entropy, distillation, knowledge penalty and z-loss with every option of that function.
    Memory beyond the returned gradients is one (Nb, V) logits buffer (two with a teacher head)
    instead of the (N, V) logits and their gradient.

    Args:
        hidden: (*, H) hidden states (fp32 / fp16 / bf16; fp64 on the torch and cpp backends).
        weight: (V, H) output-layer weight, same dtype and device as ``hidden``.
        target: (*) integer class indices (``ignore_index`` marks unlabelled rows).
        bias: (V,) output-layer bias, or None.
        teacher_hidden: (*, Ht) teacher hidden states; with ``teacher_weight`` (V, Ht) and
            optional ``teacher_bias`` (V,), the teacher logits are computed block by block, without
            gradient (distillation through the output layer). Excludes ``teacher_logits`` and
            ``teacher_topk``.
        teacher_weight / teacher_bias: the teacher's output layer.
        block_rows: rows per block Nb; default: as many as fit
            :data:`vfm.ops.flce_blockwise.BLOCK_BUDGET_BYTES` (64 MiB of logits buffers on CPU,
            256 MiB on CUDA).
        grad_accum_dtype: ``torch.float32`` (default) accumulates a half-precision weight (and
            bias) gradient in fp32 and rounds once; ``None`` or the weight's own dtype accumulates
            in that dtype (less memory, rounding at every block). fp32/fp64 weights always
            accumulate in their own dtype. The fp32 accumulator of a half-precision weight costs
            one extra (V/2, H) fp32 tensor: its other half lives in the returned gradient's own
            storage (see :mod:`vfm.ops.flce_blockwise`).
        grad_filter: None (default) for exact gradients, or an opt-in relative tolerance ``eps``
            in (0, 1) (e.g. ``2**-12``): gradient entries of at most ``eps`` times the largest
            entry of their row may be dropped, vocabulary chunks where all of them are skip their
            two backward GEMMs (:mod:`vfm.ops.flce_filter`). The loss, the bias gradient and every
            target entry stay exact; the error of the weight and hidden gradients is bounded by
            ``eps * sum_i m_i |hidden_i|`` and ``eps * m_i * sum_j |weight_j|`` entrywise.
        **options: every keyword option of :func:`vfm.functional.knowledge_cross_entropy`, with
            its class weights renamed ``class_weight`` (V,) (``weight`` is the output layer here):
            ``ignore_index``, ``reduction``, ``label_smoothing``, ``z_loss``, ``softcap``,
            ``ce_weight``, ``teacher_logits`` (*, V), ``teacher_topk``, ``temperature``,
            ``kd_weight``, ``kd``, ``jsd_beta``, ``allowed``, ``penalty_weight``, ``penalty``,
            ``rule_strength``, ``soft_mask``, ``num_items_in_batch``, ``return_parts``.
            ``inplace_backward`` is accepted and has no effect (the logits buffer is always
            reused in place).

    Under ``torch.autocast``, the hidden states and output layers (fp32 / fp16 / bf16, so also bf16
    hidden states with an fp32 head) are cast to the autocast dtype first (as ``F.linear`` would
    be; the casts are differentiable, so fp32 parameters get fp32 gradients); the loss is computed
    in fp32 as always.

    Returns:
        As :func:`vfm.functional.knowledge_cross_entropy`: the fp32 loss (scalar, or shape
        ``target.shape`` for ``reduction="none"``), or :class:`KnowledgeCEParts`.

    Raises:
        TypeError / ValueError: naming the argument and shapes (H mismatch between hidden and
        weight, target shape, teacher head shapes, both teacher forms, ...), plus every error of
        :func:`vfm.functional.knowledge_cross_entropy`.
    """
    return _dispatch(*prepare_fused_arguments(
        hidden, weight, target, bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, block_rows=block_rows, grad_accum_dtype=grad_accum_dtype,
        grad_filter=grad_filter, **options))


def prepare_fused_arguments(hidden, weight, target, bias=None, *, teacher_hidden=None, teacher_weight=None,
                            teacher_bias=None, block_rows=None, grad_accum_dtype=torch.float32, grad_filter=None,
                            **options):
    """Validate and normalise a call exactly as :func:`fused_linear_knowledge_cross_entropy` does.

    Returns:
        (args, lead_shape, reduce, return_parts): ``args`` are the positional arguments of
        ``torch.ops.vfm.fused_linear_knowledge_cross_entropy``; used by tests and benchmarks.
    """
    options = dict(options)
    class_weight = options.pop("class_weight", None)
    unknown = sorted(set(options) - set(KCE_OPTIONS))
    if unknown:
        raise TypeError(f"fused_linear_knowledge_cross_entropy got unknown options {unknown}; known: "
                        f"{KCE_OPTIONS + ['class_weight', 'teacher_hidden', 'teacher_weight', 'teacher_bias']}"
                        " + ['block_rows', 'grad_accum_dtype', 'grad_filter']")
    if isinstance(hidden, Tensor) and _autocast_on(hidden.device.type):
        # As F.linear under autocast: every fp32 / fp16 / bf16 operand of the output layer(s)
        # runs in the autocast dtype (so bf16 hidden states from an autocast body meet an fp32
        # lm_head); the casts are differentiable, so fp32 parameters receive fp32 gradients.
        low = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = (
            _autocast_operand(t, low)
            for t in (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias))
    _check_head("", hidden, weight, bias)
    lead_shape = tuple(hidden.shape[:-1])
    vocab = int(weight.shape[0])
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if tuple(target.shape) != lead_shape:
        raise ValueError(f"target shape {_SHAPE(target)} does not match hidden shape {_SHAPE(hidden)} without its "
                         f"last dim {lead_shape}")
    if class_weight is not None and (not isinstance(class_weight, Tensor) or tuple(class_weight.shape) != (vocab,)):
        got = _SHAPE(class_weight) if isinstance(class_weight, Tensor) else type(class_weight).__name__
        raise ValueError(f"class_weight must be a tensor of shape ({vocab},) (one per class of weight), got {got}")
    head = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    if head:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together (teacher_bias is optional)")
        if options.get("teacher_logits") is not None or options.get("teacher_topk") is not None:
            raise ValueError("give one teacher: teacher_hidden/teacher_weight, teacher_logits or teacher_topk")
        _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
        if tuple(teacher_hidden.shape[:-1]) != lead_shape:
            raise ValueError(f"teacher_hidden {_SHAPE(teacher_hidden)} must have the student's rows "
                             f"{lead_shape} + (Ht,) "
                             f"(hidden is {_SHAPE(hidden)})")
        if teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher_weight {_SHAPE(teacher_weight)} has V={teacher_weight.shape[0]} but weight "
                             f"{_SHAPE(weight)} has V={vocab}")
        if teacher_hidden.device != hidden.device:
            raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but hidden is on {hidden.device}")
    if grad_accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(f"grad_accum_dtype must be torch.float32, None or the weight's dtype {weight.dtype}, "
                         f"got {grad_accum_dtype}")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    grad_filter = _check_grad_filter(grad_filter)
    return_parts = bool(options.pop("return_parts", False))
    options.pop("inplace_backward", None)

    # Validate and normalise the loss options for the whole batch through knowledge CE's own
    # machinery. The logits are stood in for by a stride-0 view (no (N, V) memory).
    carrier = hidden.new_empty(vocab).expand(*lead_shape, vocab)
    if head:
        options["teacher_logits"] = teacher_hidden.new_empty(vocab).expand(*lead_shape, vocab)
    p = prepare_arguments(carrier, target, weight=class_weight, **options)
    (_, tgt, cls_w, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, *scalars) = p.args
    teacher_kept = teacher is not None
    if head:
        teacher = None  # the carrier: the head computes the teacher logits block by block
    if not (head and teacher_kept):
        teacher_hidden = teacher_weight = teacher_bias = None  # the loss does not use the teacher
    h2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    th2d = None
    if teacher_hidden is not None:
        th2d = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).contiguous()
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    n_rows = h2d.shape[0]
    if block_rows is None:
        block_rows = default_block_rows(n_rows, vocab, hidden.element_size(), 2 if th2d is not None else 1,
                                        hidden.device)
    accum_fp32 = grad_accum_dtype == torch.float32
    args = (h2d, weight, bias, tgt, cls_w, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, th2d,
            teacher_weight.detach() if teacher_weight is not None else None,
            teacher_bias.detach() if teacher_bias is not None else None,
            *scalars, *need, p.reduce, int(block_rows), accum_fp32, grad_filter)
    return args, lead_shape, p.reduce, return_parts


def _dispatch(args: tuple, lead_shape: tuple, reduce: bool, return_parts: bool):
    if _ops._is_eager_tensor(args[0]):
        loss, parts = _ops.EagerFusedLinearKnowledgeCE.apply(*args)
    else:
        loss, parts, *_ = torch.ops.vfm.fused_linear_knowledge_cross_entropy(*args)
    if not reduce:
        loss = loss.reshape(lead_shape)
    if not return_parts:
        return loss
    parts = parts.detach()
    if reduce:
        ce, kd_part, pen, zl = (parts[i].sum() for i in range(4))
        n_out = parts[4].sum().round().long()
    else:
        ce, kd_part, pen, zl = (parts[i].reshape(lead_shape) for i in range(4))
        n_out = parts[4].reshape(lead_shape).round().long()
    return KnowledgeCEParts(loss, ce, kd_part, pen, zl, n_out)
