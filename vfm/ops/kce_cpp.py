"""C++ CPU backend of the knowledge cross-entropy op (the ``vfm._C`` extension).

:func:`kce_forward_cpp` has exactly the signature and semantics of
:func:`vfm.ops.kce_reference.kce_forward_torch` (see that module's docstring for the contract);
it forwards to ``torch.ops.vfm_C.kce_forward``, whose kernel lives in
``csrc/cpu/knowledge_ce.cpp`` (row kernel; driver and checks in ``kce_forward_cpu.cpp``).  The
extension is optional: importing this module never fails, and :func:`cpp_available` says whether
the backend can run and, if not, why.

Where the reference produces NaN only because of ``0 * inf`` on entries with zero probability
(e.g. ``-inf`` logits at both student and teacher), this backend applies ``q log q = 0`` for
``q = 0`` consistently and returns the finite limit instead.  Rows that count for no term get
a zero gradient row even when their logits are NaN.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from vfm.ops.kce_reference import KCEConfig

_STATUS: Optional[Tuple[bool, str]] = None


def cpp_available() -> Tuple[bool, str]:
    """Whether the C++ backend can run.

    Returns:
        (available, reason): reason is "" when available, else why ``vfm._C`` or its
        ``vfm_C::kce_forward`` op is unusable (import error, missing op).
    """
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    try:
        import vfm._C  # noqa: F401  (registers the vfm_C ops)
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (bad .so), undefined symbols...
        _STATUS = (False, f"the native extension vfm._C failed to import: {type(exc).__name__}: {exc}")
        return _STATUS
    try:
        torch.ops.vfm_C.kce_forward  # noqa: B018 - resolving the op is the check
    except (AttributeError, RuntimeError) as exc:
        _STATUS = (False, f"vfm._C imported but has no vfm_C::kce_forward op ({exc}); rebuild the extension")
        return _STATUS
    _STATUS = (True, "")
    return _STATUS


def kce_forward_cpp(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    teacher: Optional[Tensor],
    topk_idx: Optional[Tensor],
    topk_lp: Optional[Tensor],
    allowed_bits: Optional[Tensor],
    group_ids: Optional[Tensor],
    scales: Tensor,
    grad: Optional[Tensor],
    cfg: KCEConfig,
) -> Tuple[Tensor, Tensor]:
    """Knowledge cross-entropy forward (and gradient) on CPU with the C++ kernel.

    Args and returns as :func:`vfm.ops.kce_reference.kce_forward_torch`:
    logits (N, V), target (N,) int64, weight (V,) float32 or None, teacher (N, V) or None,
    topk_idx (N, k) int64 / topk_lp (N, k) float32 or None, allowed_bits (G, W) int32 /
    group_ids (N,) int32 or None, scales (4, N) float32, grad (N, V) in the logits' dtype (may be
    ``logits`` itself) or None, cfg a :class:`KCEConfig`.  Returns (row_loss (N,) float32,
    parts (5, N) float32).

    Raises:
        RuntimeError: the extension is not available (the message says why), or the kernel
            rejected its inputs.
    """
    ok, reason = cpp_available()
    if not ok:
        raise RuntimeError(f"vfm cpp backend unavailable: {reason}")
    return torch.ops.vfm_C.kce_forward(
        logits,
        target,
        weight,
        teacher,
        topk_idx,
        topk_lp,
        allowed_bits,
        group_ids,
        scales,
        grad,
        int(cfg.ignore_index),
        float(cfg.label_smoothing),
        float(cfg.softcap),
        float(cfg.temperature),
        int(cfg.kd_mode),
        float(cfg.jsd_beta),
        int(cfg.pen_mode),
        float(cfg.rule_strength),
        bool(cfg.use_ce),
        bool(cfg.use_z),
    )
