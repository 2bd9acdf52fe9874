"""Module forms of vfm's ops."""

from vfm.nn.loss import CrossEntropyLoss, KnowledgeCrossEntropyLoss
from vfm.nn.fused_linear import FusedLinearKnowledgeCrossEntropyLoss
from vfm.nn.lora import LoRALinear

__all__ = ["CrossEntropyLoss", "KnowledgeCrossEntropyLoss", "LoRALinear", "FusedLinearKnowledgeCrossEntropyLoss"]
