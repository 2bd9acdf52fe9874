"""Module form of the LoRA op: :class:`LoRALinear`, a low-rank adapter around an ``nn.Linear``."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from vfm.ops.lora_api import lora_linear


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a LoRA adapter: ``y = base(x) + scaling * B(A(dropout(x)))``.

    The wrapped layer is kept as ``base_layer`` (its parameters keep their names, under
    ``base_layer.``); ``lora_A`` (r, in) starts as ``nn.Linear``'s default (Kaiming-uniform) and
    ``lora_B`` (out, r) at zero, as PEFT does, so the wrapped layer's output is unchanged until
    training moves B.  ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora=True``.

    Args:
        base_layer: the ``nn.Linear`` to adapt.
        r: rank, >= 1.
        alpha: LoRA alpha (default: r, i.e. scaling 1).
        dropout: dropout probability in [0, 1) on the adapter's input (training mode only); its
            mask comes from vfm's counter-based hash (see :func:`vfm.functional.lora_linear`).
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        freeze_base: set ``requires_grad=False`` on the base layer's weight (its bias is left as
            it is); the base weight gets no gradient then, and none is computed.

    Raises:
        TypeError: ``base_layer`` is not an ``nn.Linear``, ``r`` not an integer, ``alpha`` or
            ``dropout`` not a real number, ``use_rslora`` or ``freeze_base`` not a bool.
        ValueError: ``r`` < 1, ``alpha`` not finite, ``dropout`` outside [0, 1).

    ``merge()`` folds ``scaling * B @ A`` into the base weight (forward is then the base layer
    alone); ``unmerge()`` takes it out again.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, freeze_base: bool = True) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"r must be an int, got {type(r).__name__}")
        if r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        r = int(r)
        for name, value in (("alpha", r if alpha is None else alpha), ("dropout", dropout)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(float(alpha if alpha is not None else r)):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        for name, value in (("use_rslora", use_rslora), ("freeze_base", freeze_base)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.dropout = float(dropout)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if freeze_base:
            base_layer.weight.requires_grad_(False)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def delta_weight(self) -> Tensor:
        """scaling * B @ A, shape (out, in), computed in fp32 and returned in the weight's dtype."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; a second merge is an error."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged")
        self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
