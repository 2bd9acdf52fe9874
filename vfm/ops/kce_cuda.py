"""CUDA backend of the knowledge cross-entropy op (the CUDA half of the ``vfm._C`` extension).

:func:`kce_forward_cuda` has exactly the signature and semantics of
:func:`vfm.ops.kce_reference.kce_forward_torch` (see that module's docstring for the contract); it
forwards to ``torch.ops.vfm_C.kce_forward``, whose CUDA kernel lives in ``csrc/cuda/kce_kernel.cu``
(one thread block per row, two passes over the logits, three for JSD; see that file's header).
The extension is optional and is built with CUDA only when torch has CUDA and ``CUDA_HOME`` is
set at install time: importing this module never fails, and :func:`cuda_available` says whether
the backend can run and, if not, why.

Scope, as the other fused backends (documented deviations from the fp64-exact reference):

* fp32 / fp16 / bf16 logits accumulate in fp32, fp64 logits in fp64; exponentials use the GPU's
  ``ex2.approx`` (relative error 2^-22).
* A teacher in another dtype than the logits is converted to the logits' dtype first (one extra
  (N, V) copy; the kernel reads one element type).
* At most :data:`MAX_TOPK` top-k teacher entries per row (they live in shared memory).
* ``q * log q`` is 0 where q == 0, and a row that counts for nothing gets an exact zero gradient
  row (also with a softcap and NaN logits).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from vfm.ops.kce_reference import KCEConfig

#: Largest top-k width the CUDA kernel takes (kKceMaxTopK in csrc/cuda/kce_cuda.h).
MAX_TOPK = 2048

_STATUS: Optional[Tuple[bool, str]] = None


def cuda_available() -> Tuple[bool, str]:
    """Whether ``vfm._C`` has the CUDA knowledge cross-entropy kernel.

    Returns:
        (available, reason): reason is "" when the extension imports, was built with CUDA and
        registers a CUDA kernel for ``vfm_C::kce_forward``; otherwise it says which of these failed.
        Whether a GPU is present is checked separately (:func:`check_cuda`).
    """
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    _STATUS = _extension_status("kce_forward")
    return _STATUS


def _extension_status(op_name: str) -> Tuple[bool, str]:
    """(ok, reason) for ``vfm_C::<op_name>`` having a CUDA kernel in the loaded extension."""
    try:
        import vfm._C as ext
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (bad .so), undefined symbols...
        return False, f"the native extension vfm._C failed to import: {type(exc).__name__}: {exc}"
    info = ext.build_info() if hasattr(ext, "build_info") else {}
    if not info.get("with_cuda", False):
        return False, (
            "vfm._C was built without CUDA (CUDA kernels are compiled only when the installed torch has "
            "CUDA and CUDA_HOME points at a toolkit at install time; reinstall with "
            "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`)"
        )
    try:
        getattr(torch.ops.vfm_C, op_name)
    except (AttributeError, RuntimeError) as exc:
        return False, f"vfm._C has no vfm_C::{op_name} op ({exc}); rebuild the extension"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vfm_C::{op_name}", "CUDA"):
        return False, f"vfm._C registers no CUDA kernel for vfm_C::{op_name}; rebuild the extension with CUDA"
    return True, ""


def check_cuda(device: torch.device) -> Optional[str]:
    """Registry check: None when the cuda backend can run on ``device``, else the reason."""
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got {device.type})"
    ok, why = cuda_available()
    if not ok:
        return why
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def kce_forward_cuda(
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
    """Knowledge cross-entropy forward (and gradient) on CUDA with the extension's kernel.

    Args:
        logits: (N, V) float32 / float16 / bfloat16 / float64 CUDA tensor, ``stride(1) == 1``.
        target: (N,) int64.
        weight: (V,) float32 class weights, or None.
        teacher: (N, V) teacher logits (any float dtype; converted to the logits' dtype), or None.
        topk_idx / topk_lp: (N, k) int64 indices (-1 = padding) / float32 log-probabilities, or
            None; k <= :data:`MAX_TOPK`.
        allowed_bits: (G, ceil(V / 32)) int32 packed allowed sets, or None.
        group_ids: (N,) int32 group of each row (-1 = unconstrained), with ``allowed_bits``.
        scales: (4, N) float32 per-row scales of CE, KD, penalty, z-loss.
        grad: (N, V) tensor in the logits' dtype (may be ``logits`` itself), or None.
        cfg: :class:`~vfm.ops.kce_reference.KCEConfig`.

    Returns:
        (row_loss (N,), parts (5, N)): float32, float64 for float64 logits.

    Raises:
        RuntimeError: the backend is unavailable (the message says why) or the kernel rejected
            its inputs.
        ValueError: a top-k teacher wider than :data:`MAX_TOPK`.
    """
    ok, reason = cuda_available()
    if not ok:
        raise RuntimeError(f"vfm cuda backend unavailable: {reason}")
    if topk_idx is not None and topk_idx.shape[-1] > MAX_TOPK:
        raise ValueError(
            f"knowledge_cross_entropy (cuda backend): teacher_topk has k = {topk_idx.shape[-1]} entries per row; "
            f"the CUDA kernel takes at most {MAX_TOPK} (use the triton or torch backend)"
        )
    if teacher is not None and teacher.dtype != logits.dtype:
        teacher = teacher.to(logits.dtype)
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
    if topk_idx is not None:
        topk_idx = topk_idx.to(torch.int64)
        topk_lp = topk_lp.to(torch.float32)
    if allowed_bits is not None:
        allowed_bits = allowed_bits.to(torch.int32)
        group_ids = group_ids.to(torch.int32)
    return torch.ops.vfm_C.kce_forward(
        logits,
        target.to(torch.int64),
        weight,
        teacher,
        topk_idx,
        topk_lp,
        allowed_bits,
        group_ids,
        scales.to(torch.float32),
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
