"""Loss modules: :class:`KnowledgeCrossEntropyLoss` and the drop-in :class:`CrossEntropyLoss`."""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.ops.flce_api import _autocast_on
from vfm.ops.kce_api import knowledge_cross_entropy

_OPTIONS = [
    name
    for name, p in inspect.signature(knowledge_cross_entropy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
]


class KnowledgeCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`vfm.functional.knowledge_cross_entropy`.

    Every keyword option of the function can be given to the constructor (fixed for every call)
    or to :meth:`forward` (for this call; per-batch tensors such as ``teacher_logits``,
    ``allowed``, ``soft_mask`` and ``num_items_in_batch`` usually go there).  ``weight`` is kept
    as a buffer, as in ``torch.nn.CrossEntropyLoss``.

    Example::

        loss_fn = vfm.nn.KnowledgeCrossEntropyLoss(kd_weight=0.5, temperature=2.0)
        loss = loss_fn(student_logits, labels, teacher_logits=teacher_logits)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"KnowledgeCrossEntropyLoss got unknown options {unknown}; known: {_OPTIONS}")
        weight = options.pop("weight", None)
        self.register_buffer("weight", weight)
        self.options: Dict[str, Any] = options

    def forward(self, logits: Tensor, target: Tensor, **overrides: Any):
        """Args: logits (N, V) or (*, V); target (N,) or (*); overrides: per-call options."""
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"KnowledgeCrossEntropyLoss.forward got unknown options {unknown}")
        kwargs = dict(self.options)
        if self.weight is not None:
            kwargs["weight"] = self.weight
        kwargs.update(overrides)
        return knowledge_cross_entropy(logits, target, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, Tensor))


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in replacement for :class:`torch.nn.CrossEntropyLoss` on vfm's fused kernels.

    Same constructor, call, state_dict and numbers as torch (within the test suite's per-dtype
    tolerances): unbatched ``(C,)``, ``(N, C)`` and K-dimensional ``(N, C, d1, ...)`` inputs,
    class weights, ``ignore_index``, ``label_smoothing`` and every reduction; the result has the
    input's dtype (fp32 under autocast, as torch), and a mean over no counted row is NaN as in
    torch (with a zero gradient).  Probability (soft) targets, float64 inputs, dtypes torch
    rejects and calls under torch.func transforms are passed to torch's own implementation: the
    fused path covers fp32 / fp16 / bf16 logits with class indices.

    One difference from torch: the fused path computes the gradient during the forward and hands
    that buffer to autograd on the first backward when no copy is needed (``reduction="sum"``, or a
    mean over exactly one counted row, with an upstream gradient of 1), so a second backward through
    the same graph (``retain_graph=True``) raises a RuntimeError saying so; recompute the loss, or
    use torch's module for that pattern.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 - torch's names
        """Args: input (C,), (N, C) or (N, C, d1, ...); target the matching class indices (or
        probabilities, shape of input).  Returns: the loss as torch's (shape of target for
        ``reduction="none"``, else a scalar)."""
        if not isinstance(input, Tensor) or not isinstance(target, Tensor) or target.is_floating_point() \
                or not input.is_floating_point() or input.dim() == 0 or not self._fused_dtypes(input, target) \
                or input.dtype == torch.float64 or torch._C._are_functorch_transforms_active():
            # probability targets, whatever torch rejects (its own error message), float64 (the
            # cpp kernel takes fp32 class weights and scales: ~1e-7 relative, above float64's
            # tolerance) and torch.func transforms (the fused op's autograd.Function has no
            # functorch support)
            return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing)
        if input.dim() == 1:
            logits = input
        else:
            logits = input.movedim(1, -1)
        loss = knowledge_cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction="sum" if self.reduction == "mean" else self.reduction,
            label_smoothing=self.label_smoothing,
        )
        if self.reduction == "mean":
            valid = target != self.ignore_index
            if self.weight is not None:
                safe = torch.where(valid, target, torch.zeros_like(target)).long()  # uint8 would be a mask
                denom = (self.weight.float()[safe] * valid).sum()
            else:
                denom = valid.sum().float()
            # As torch: NaN when the denominator is 0; the gradient is zero when no row counts
            # (every row ignored) and NaN when counted rows have zero total weight.
            nothing = ~valid.any()
            loss = loss / torch.where(nothing, torch.ones_like(denom), denom)
            loss = loss + torch.where(denom == 0, torch.full_like(denom, math.nan), torch.zeros_like(denom))
        return loss.to(self._result_dtype(input))

    @staticmethod
    def _autocast_fp32(t: Tensor) -> bool:
        """Whether autocast runs torch's cross-entropy on ``t`` in fp32 (it is on its fp32 list)."""
        return t.dtype in (torch.float16, torch.bfloat16) and _autocast_on(t.device.type)

    def _result_dtype(self, input: Tensor) -> torch.dtype:  # noqa: A002
        return torch.float32 if self._autocast_fp32(input) else input.dtype

    def _fused_dtypes(self, input: Tensor, target: Tensor) -> bool:  # noqa: A002
        """False where torch raises on the dtypes (so that torch's own error is raised)."""
        if target.dtype != torch.int64 and (target.dtype != torch.uint8 or input.dim() > 2):
            return False  # torch takes uint8 class indices for (C,) / (N, C) inputs only
        if self.weight is None:
            return True
        if self.weight.requires_grad and torch.is_grad_enabled():
            return False  # torch refuses class weights that require grad
        w_dtype = torch.float32 if self._autocast_fp32(self.weight) else self.weight.dtype
        return w_dtype == self._result_dtype(input)
