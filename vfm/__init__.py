"""vfm: an accelerated engine for adapting pretrained models to a vertical domain.

Public entry points:

* :mod:`vfm.functional` - fused ops (``knowledge_cross_entropy``).
* :mod:`vfm.nn` - module forms (``KnowledgeCrossEntropyLoss``, drop-in ``CrossEntropyLoss``).
* :func:`use_backend`, :func:`available_backends`, :func:`deterministic` - backend control.

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
