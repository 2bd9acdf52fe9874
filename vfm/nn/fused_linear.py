"""Module form of :func:`vfm.functional.fused_linear_knowledge_cross_entropy`."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from vfm.ops.flce_api import KCE_OPTIONS, fused_linear_knowledge_cross_entropy

_OPTIONS = [o for o in KCE_OPTIONS if o != "weight"] + [
    "class_weight", "teacher_hidden", "teacher_weight", "teacher_bias", "block_rows", "grad_accum_dtype",
    "grad_filter"]


class FusedLinearKnowledgeCrossEntropyLoss(torch.nn.Module):
    """Knowledge cross-entropy of an output layer's logits, without materialising them.

    Holds the loss options; the output layer is passed at call time, so the module works with any
    model's head (``loss_fn(hidden, lm_head.weight, labels, lm_head.bias)``).

    Design (details in :mod:`vfm.ops.flce_blockwise`): the loss options are normalised once for
    the whole batch (per-row scales and denominators, packed allowed sets); then, for each block
    of ``block_rows`` rows, the block's logits ``hidden_b @ weight.T + bias`` go into one reused
    (Nb, V) buffer (a BLAS / cuBLAS GEMM), the backend's knowledge cross-entropy kernel overwrites
    them in place with their gradient ``G_b``, and two more GEMMs give ``grad_hidden_b = G_b @
    weight`` and ``grad_weight += G_b.T @ hidden_b`` (fp32 accumulation by default for
    half-precision weights, see ``grad_accum_dtype``); ``grad_bias += G_b.sum(0)``.  The gradients
    are computed in the forward and scaled in backward by the upstream gradient (free when it is
    one).  ``reduction="none"`` recomputes them in backward with each row's upstream gradient.
    The block size comes from a memory budget (64 MiB of logits buffers on CPU, 256 MiB on
    CUDA); ``block_rows`` overrides it.

    Every keyword option of :func:`vfm.functional.fused_linear_knowledge_cross_entropy` can be given
    to the constructor (fixed) or to :meth:`forward` (this call; per-batch tensors such as
    ``teacher_logits``, ``teacher_hidden``, ``allowed``, ``soft_mask``, ``num_items_in_batch``).
    ``class_weight`` is kept as a buffer.

    Example::

        loss_fn = vfm.nn.FusedLinearKnowledgeCrossEntropyLoss(kd="jsd", ce_weight=0.5, kd_weight=0.5)
        loss = loss_fn(hidden, model.lm_head.weight, labels,
                       teacher_hidden=t_hidden, teacher_weight=teacher.lm_head.weight)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"FusedLinearKnowledgeCrossEntropyLoss got unknown options {unknown}; known: {_OPTIONS}")
        self.register_buffer("class_weight", options.pop("class_weight", None))
        self.options: Dict[str, Any] = options

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                **overrides: Any):
        """Args: hidden (*, H); weight (V, H); target (*); bias (V,) or None; overrides: per-call options.

        Returns: the loss, as :func:`vfm.functional.fused_linear_knowledge_cross_entropy`.
        """
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"FusedLinearKnowledgeCrossEntropyLoss.forward got unknown options {unknown}")
        kwargs = dict(self.options)
        if self.class_weight is not None:
            kwargs["class_weight"] = self.class_weight
        kwargs.update(overrides)
        return fused_linear_knowledge_cross_entropy(hidden, weight, target, bias, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, Tensor))
