"""Module forms of vfm's ops."""

from vfm.nn.loss import CrossEntropyLoss, KnowledgeCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "KnowledgeCrossEntropyLoss"]
