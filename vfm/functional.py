"""Functional form of vfm's ops.

* :func:`knowledge_cross_entropy` - cross-entropy + distillation + knowledge penalty + z-loss.
"""

from vfm.ops.kce_api import KnowledgeCEParts, knowledge_cross_entropy

__all__ = ["knowledge_cross_entropy", "KnowledgeCEParts"]
