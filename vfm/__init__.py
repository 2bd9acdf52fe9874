"""vfm: an accelerated engine for adapting pretrained models to a vertical domain.

Public entry points:

* :mod:`vfm.functional` - fused ops (``knowledge_cross_entropy``).
* :mod:`vfm.nn` - module forms (``KnowledgeCrossEntropyLoss``, drop-in ``CrossEntropyLoss``).
* :func:`use_backend`, :func:`available_backends`, :func:`deterministic` - backend control.
* imported on first use: :mod:`vfm.peft` (PEFT accelerator), :mod:`vfm.adalora`,
  :mod:`vfm.integrations` (Transformers), and the pipeline: :mod:`vfm.knowledge`, :mod:`vfm.data`,
  :mod:`vfm.teacher`, :mod:`vfm.train`, :mod:`vfm.evaluate`.

``import vfm`` never needs triton or the native extension; ``vfm doctor`` says what is there.
"""

from vfm._registry import (
    BackendUnavailableError,
    available_backends,
    deterministic,
    forced_backend,
    use_backend,
)
from vfm._version import __version__
from vfm import functional, nn  # noqa: E402

# Subpackages imported on first use (``vfm.knowledge.load_rules(...)`` after a plain ``import vfm``),
# so that ``import vfm`` stays light: the pipeline's modules pull in Transformers and friends.
_LAZY = ("adalora", "data", "evaluate", "integrations", "knowledge", "peft", "teacher", "train")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"vfm.{name}")
    raise AttributeError(f"module 'vfm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "available_backends",
    "use_backend",
    "forced_backend",
    "deterministic",
    "BackendUnavailableError",
    "functional",
    "nn",
]
