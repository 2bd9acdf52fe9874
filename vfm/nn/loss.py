"""Loss modules: :class:`KnowledgeCrossEntropyLoss` and the drop-in :class:`CrossEntropyLoss`."""

from __future__ import annotations

import inspect
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

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
    input's dtype, and a mean over no counted row is NaN as in torch.  Probability (soft)
    targets are passed to torch's own implementation: the fused path covers class indices.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 - torch's names
        if not isinstance(input, Tensor) or not isinstance(target, Tensor) or target.is_floating_point() \
                or not input.is_floating_point() or input.dim() == 0:
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
                safe = torch.where(valid, target, torch.zeros_like(target))
                denom = (self.weight.float()[safe] * valid).sum()
            else:
                denom = valid.sum().float()
            loss = loss / denom  # 0 / 0 = NaN when nothing counts, as in torch
        return loss.to(input.dtype)
