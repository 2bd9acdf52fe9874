"""Integrations of vfm with other libraries.

* :mod:`vfm.integrations.transformers` - :func:`apply_vfm` / :func:`unapply_vfm`: train a Hugging Face
  Transformers model (causal LM, sequence or token classification) on vfm's losses.

``import vfm.integrations`` needs transformers installed; ``import vfm`` does not import this package.
"""

from vfm.integrations.transformers import BATCH_KEYS, apply_vfm, is_patched, unapply_vfm

__all__ = ["apply_vfm", "unapply_vfm", "is_patched", "BATCH_KEYS"]
