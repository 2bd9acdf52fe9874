"""Backend registry: which implementation of each op runs, and why the others cannot.

Every public op asks :func:`resolve` for an implementation at call time.  Backends:

* ``torch``  - the pure-PyTorch reference; any device; always available.
* ``cpp``    - the C++ CPU kernels of the extension ``vfm._C`` (CPU tensors).
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1``).
* ``cuda``   - the CUDA kernels of the extension (CUDA tensors).

Selection when nothing is forced: on CPU ``cpp`` then ``torch``; on CUDA the order in
:data:`CUDA_PREFERENCE` then ``torch``.  The Triton interpreter is never picked automatically.
``vfm.use_backend(name)`` (a context manager) or the environment variable ``VFM_BACKEND`` forces
one; forcing a backend that is unavailable, or that does not support the call's options, raises
:class:`BackendUnavailableError` with the reason.  A forced backend never falls back.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
CUDA_PREFERENCE = ("triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (not built, wrong device or unsupported option)."""


@dataclass
class OpEntry:
    """Implementations of one op, by backend name.

    ``impls[name]`` is the callable; ``checks[name](device) -> Optional[str]`` returns None when the
    backend can run on that device, else the reason it cannot.
    """

    name: str
    impls: Dict[str, Callable] = field(default_factory=dict)
    checks: Dict[str, Callable[[torch.device], Optional[str]]] = field(default_factory=dict)


_OPS: Dict[str, OpEntry] = {}
# The use_backend stack, innermost last.  A ContextVar (not a threading.local) so that asyncio
# tasks each see their own with-blocks; a new thread starts with none, as before.
_FORCED_STACK: contextvars.ContextVar = contextvars.ContextVar("vfm_forced_backends", default=())
#: How many times each (op, backend) pair ran; tests read it to prove which kernel ran.
CALLS: Counter = Counter()


def register(op: str, backend: str, impl: Callable, check: Callable[[torch.device], Optional[str]]):
    """Register ``impl`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    entry = _OPS.setdefault(op, OpEntry(op))
    entry.impls[backend] = impl
    entry.checks[backend] = check


def _forced() -> Optional[str]:
    stack = _FORCED_STACK.get()
    if stack:
        return stack[-1]
    env = os.environ.get("VFM_BACKEND", "").strip()
    if env:
        if env not in BACKENDS:
            raise BackendUnavailableError(
                f"VFM_BACKEND={env!r} is not a backend; choose one of {', '.join(BACKENDS)}"
            )
        return env
    return None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for every op called inside the ``with`` block.

    The setting belongs to the calling thread (and asyncio task): other threads, such as
    ``nn.DataParallel``'s replica threads or autograd's CUDA backward threads, do not see it; use
    ``VFM_BACKEND`` to force a backend process-wide.  Inside a ``torch.compile``'d function the
    ``with`` block runs outside the graph (a graph break; ``fullgraph=True`` refuses it), so it is
    honoured there too.

    Raises:
        ValueError: ``name`` is not one of ``torch``, ``cpp``, ``triton``, ``cuda``.
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    token = _FORCED_STACK.set(_FORCED_STACK.get() + (name,))
    try:
        yield
    finally:
        _FORCED_STACK.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``VFM_BACKEND``, or None."""
    return _forced()


_LOADED = [False]


def _ensure_loaded() -> None:
    # Importing the op modules registers their backends (once: every op call passes here).
    if _LOADED[0]:
        return
    from vfm.ops import knowledge_ce  # noqa: F401
    from vfm.ops import lora_ops  # noqa: F401
    from vfm.ops import flce_ops  # noqa: F401
    _LOADED[0] = True


def unavailable_reasons(op: str, device) -> Dict[str, str]:
    """Map each backend that cannot run ``op`` on ``device`` to the reason."""
    _ensure_loaded()
    device = torch.device(device)
    entry = _OPS[op]
    reasons = {}
    for name in BACKENDS:
        if name not in entry.impls:
            reasons[name] = f"no {name} implementation of {op} exists"
            continue
        why = entry.checks[name](device)
        if why:
            reasons[name] = why
    return reasons


def available_backends(op: Optional[str] = None, device=None) -> List[str]:
    """List the backends that can run ``op`` (or every registered op) on ``device``.

    Args:
        op: registry name of an op (``"knowledge_cross_entropy"``), or None for backends that
            can run at least one op.
        device: a device or string; default ``"cuda"`` when CUDA is available, else ``"cpu"``.

    Returns:
        Backend names in preference order (the first is what runs when nothing is forced, except
        that the Triton interpreter on CPU is listed but never chosen automatically).
    """
    _ensure_loaded()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if op is not None and op not in _OPS:
        raise ValueError(f"available_backends: unknown op {op!r}; known: {sorted(_OPS)}")
    ops = [op] if op is not None else sorted(_OPS)
    found = []
    for name in _preference(device) + ("triton",):
        if name in found:
            continue
        if any(name in _OPS[o].impls and not _OPS[o].checks[name](device) for o in ops):
            found.append(name)
    return found


_CPU_PREFERENCE = ("cpp", "torch")


def _preference(device: torch.device) -> Tuple[str, ...]:
    if device.type == "cuda":
        return tuple(CUDA_PREFERENCE) + ("torch",)
    return _CPU_PREFERENCE


def resolve(op: str, device: torch.device, unsupported: Callable[[str], Optional[str]]) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``device``.

    Args:
        op: registry name.
        device: device of the op's main input.
        unsupported: ``unsupported(backend) -> Optional[str]`` says why a backend cannot run this
            particular call (an option or dtype it lacks), or None.

    Returns:
        (backend name, implementation).
    """
    _ensure_loaded()
    entry = _OPS[op]
    forced = _forced()
    if forced is not None:
        if forced not in entry.impls:
            raise BackendUnavailableError(f"backend {forced!r} was forced but has no implementation of {op}")
        why = entry.checks[forced](device) or unsupported(forced)
        if why:
            raise BackendUnavailableError(f"backend {forced!r} was forced for {op} but cannot run: {why}")
        CALLS[(op, forced)] += 1
        return forced, entry.impls[forced]
    for name in _preference(device):
        if name in entry.impls and not entry.checks[name](device) and not unsupported(name):
            CALLS[(op, name)] += 1
            return name, entry.impls[name]
    raise BackendUnavailableError(f"no backend can run {op} on {device}")  # torch always can


_DETERMINISTIC = [False]


def deterministic(enabled: Optional[bool] = None) -> bool:
    """Get, or set with ``enabled``, vfm's deterministic mode.

    In deterministic mode kernels avoid atomics whose order could change results from run to
    run.  The knowledge cross-entropy and LoRA kernels use none in either mode; the one place that
    does is the opt-in gradient filter of the fused linear loss (``grad_filter``), whose scattered
    row updates on CUDA then add in a fixed (sorted) order instead of by atomics.  Returns the mode
    in force after the call.
    """
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"deterministic: enabled must be a bool, got {type(enabled).__name__}")
        _DETERMINISTIC[0] = enabled
    return _DETERMINISTIC[0]
