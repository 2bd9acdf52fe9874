"""Functional form of vfm's ops.

* :func:`knowledge_cross_entropy` - cross-entropy + distillation + knowledge penalty + z-loss.
* :func:`fused_linear_knowledge_cross_entropy` - the same loss of ``hidden @ weight.T + bias``
  without materialising the logits.
* :func:`lora_linear`, :func:`dora_linear`, :func:`adalora_linear`, :func:`lora_linear_multi` - a
  linear layer with low-rank adapters (LoRA / rsLoRA, DoRA, AdaLoRA, several adapters per batch).
"""

from vfm.ops.flce_api import fused_linear_knowledge_cross_entropy
from vfm.ops.kce_api import KnowledgeCEParts, knowledge_cross_entropy
from vfm.ops.lora_api import adalora_linear, dora_linear, lora_linear, lora_linear_multi

__all__ = ["knowledge_cross_entropy", "KnowledgeCEParts", "lora_linear", "dora_linear", "adalora_linear",
           "lora_linear_multi", "fused_linear_knowledge_cross_entropy"]
