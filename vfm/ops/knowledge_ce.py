"""The ``vfm::knowledge_cross_entropy`` custom ops: schema, fake, autograd, backend dispatch.

Two ops share one implementation:

* ``vfm::knowledge_cross_entropy`` returns (loss, parts, grad) where ``grad`` is a new tensor
  holding d(loss)/d(logits) for an upstream gradient of one (empty when no gradient is wanted).
* ``vfm::knowledge_cross_entropy_inplace`` (``mutates_args=("logits",)``) writes that gradient
  into the logits' own storage and returns (loss, parts); this is ``inplace_backward=True``.

The gradient is computed in the forward pass (the kernels already hold every row statistic
then), so backward only scales it by the upstream gradient: no pass over the logits at all when
that gradient is exactly one, which is what ``loss.backward()`` sends.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from vfm import _registry
from vfm.ops.kce_reference import KCEConfig, kce_forward_torch

OP = "knowledge_cross_entropy"


# ------------------------------------------------------------------ backend registration --
def _check_torch(device: torch.device) -> Optional[str]:
    return None


def _check_cpp(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only (got {device.type})"
    try:
        from vfm.ops import kce_cpp
    except ImportError as exc:  # pragma: no cover - only in a broken checkout
        return f"the cpp adapter failed to import: {exc}"
    ok, why = kce_cpp.cpp_available()
    return None if ok else why


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None and _triton_import_error() is None


def use_device_path(t: Tensor) -> bool:
    """Whether a call on ``t``'s device normalises its arguments and scales its gradient on device.

    The device path runs the per-row scales, range checks and group-id mapping in one Triton
    prologue kernel and scales a reduced loss's gradient with a kernel that reads the upstream
    gradient from device memory (no host synchronisation; see :mod:`vfm.kernels.kce_prologue`).
    Auto: CUDA tensors when triton is installed, in eager mode.  ``VFM_KCE_DEVICE_PATH=0`` turns it
    off; ``VFM_KCE_DEVICE_PATH=1`` also sends CPU tensors through it under ``TRITON_INTERPRET=1``
    (tests and the host-overhead benchmark).  The numbers are the same either way.
    """
    flag = os.environ.get("VFM_KCE_DEVICE_PATH", "")
    if flag == "0" or not _is_eager_tensor(t):
        return False
    kind = t.device.type
    if kind == "cuda":
        return _triton_importable()
    return kind == "cpu" and flag == "1" and _interpret() and _triton_importable()


_TRITON_IMPORT: list = []  # [None] once triton imported, or [why it failed]: tried once, on first need


def _triton_import_error() -> Optional[str]:
    if not _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            _TRITON_IMPORT.append(None)
        except Exception as err:  # a broken install: not an available backend, with the reason
            _TRITON_IMPORT.append(f"triton is installed but failed to import: {type(err).__name__}: {err}")
    return _TRITON_IMPORT[0]


def triton_missing_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type in ("cuda", "cpu") and _triton_import_error():
        return _triton_import_error()
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if _interpret():
            return None
        return "Triton kernels run on CUDA tensors; set TRITON_INTERPRET=1 to run them on CPU"
    return f"Triton kernels do not run on {device.type} tensors"


def _cpp_impl(*args):
    from vfm.ops.kce_cpp import kce_forward_cpp

    return kce_forward_cpp(*args)


def _triton_impl(*args):
    from vfm.kernels.knowledge_ce import kce_forward_triton

    return kce_forward_triton(*args)


_registry.register(OP, "torch", kce_forward_torch, _check_torch)
_registry.register(OP, "cpp", _cpp_impl, _check_cpp)
_registry.register(OP, "triton", _triton_impl, triton_missing_reason)
from vfm.ops.kce_cuda import check_cuda as _check_cuda, kce_forward_cuda as _cuda_impl  # noqa: E402
_registry.register(OP, "cuda", _cuda_impl, _check_cuda)


def _unsupported(backend: str, logits: Tensor, teacher: Optional[Tensor]) -> Optional[str]:
    if backend == "triton":
        for name, t in (("logits", logits), ("teacher_logits", teacher)):
            if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return f"{name} is {t.dtype}, which the triton kernels do not support (use torch or cpp)"
    return None


def _run(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, grad, cfg):
    backend, impl = _registry.resolve(OP, logits.device, lambda b: _unsupported(b, logits, teacher))
    if backend != "torch":  # kernels take fp32 weights and scales (fp64 ones only feed the reference)
        scales = scales.float()
        weight = weight.float() if weight is not None else None
    return impl(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, grad, cfg)


@functools.lru_cache(maxsize=256)
def _config(ignore_index, label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode, rule_strength,
            use_ce, use_z) -> KCEConfig:
    return KCEConfig(
        ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, temperature=temperature,
        kd_mode=kd_mode, jsd_beta=jsd_beta, pen_mode=pen_mode, rule_strength=rule_strength, use_ce=use_ce,
        use_z=use_z,
    )


def _loss_dtype(logits: Tensor) -> torch.dtype:
    """The loss is fp32 whatever the logits' dtype, except fp64 logits give an fp64 loss."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def forward_impl(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, ignore_index,
                 label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode, rule_strength, use_ce, use_z,
                 grad: Optional[Tensor], reduce: bool) -> Tuple[Tensor, Tensor]:
    """Run the chosen backend; the gradient (if ``grad`` is given) lands in ``grad``. Returns (loss, parts)."""
    cfg = _config(ignore_index, label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode, rule_strength,
                  use_ce, use_z)
    row_loss, parts = _run(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales,
                           grad, cfg)
    out_dtype = _loss_dtype(logits)
    if row_loss.dtype != out_dtype:
        row_loss, parts = row_loss.to(out_dtype), parts.to(out_dtype)
    return (row_loss.sum() if reduce else row_loss), parts


# ------------------------------------------------------------- per-row scales of a call --
def row_scales_torch(tgt: Tensor, valid: Tensor, soft_mask: Optional[Tensor], w: Optional[Tensor], items,
                     mean: bool, coefs, acc_dtype: torch.dtype) -> Tensor:
    """The kernels' per-row scales (4, N) with torch ops (CPU, float64, tracing).

    Args:
        tgt: (N,) int64 targets; valid: (N,) bool ``tgt != ignore_index``.
        soft_mask: (N,) bool rows counting for KD / penalty / z-loss, or None (= valid).
        w: (V,) class weights in ``acc_dtype``, or None.
        items: ``num_items_in_batch`` (a number or a one-element tensor on tgt's device), or None.
        mean: ``reduction == "mean"``; coefs: (ce_weight, kd_weight, penalty_weight, z_loss).
        acc_dtype: float32, or float64 for float64 logits.

    Returns:
        (4, N) ``acc_dtype`` scales: the row masks, divided for ``mean`` by their denominators
        (``items``, else the counted rows' class weights and the soft_mask rows; 0 when not > 0),
        times the coefficients.
    """
    n_rows = tgt.shape[0]
    if soft_mask is not None:
        masks = torch.stack([valid, soft_mask]).to(acc_dtype)
    else:
        masks = valid.to(acc_dtype).expand(2, n_rows)
    if mean:
        if items is not None:
            if isinstance(items, Tensor):
                items = items.to(dtype=acc_dtype).reshape(())
            else:
                items = torch.tensor(items, dtype=acc_dtype, device=tgt.device)
            denom = items.expand(2)
        elif w is not None:
            w_y = w[torch.where(valid, tgt, torch.zeros_like(tgt))]
            denom = torch.stack([(w_y * masks[0]).sum(), masks[1].sum()])
        else:
            denom = masks.sum(1)
        base = masks * torch.where(denom > 0, denom.reciprocal(), 0.0)[:, None]
    else:
        base = masks
    ce_weight, kd_weight, penalty_weight, z_loss = coefs
    return torch.stack([base[0] * ce_weight, base[1] * kd_weight, base[1] * penalty_weight, base[1] * z_loss])


def row_scales_device(tgt: Tensor, soft_mask: Optional[Tensor], w: Optional[Tensor], raw_gid: Optional[Tensor],
                      unconstrained: Optional[Tensor], items, vocab: int, ignore_index: int, mean: bool, coefs,
                      dense_groups: bool = False):
    """:func:`row_scales_torch` (float32), the range checks and the group-id mapping in one launch.

    Args: as :func:`row_scales_torch`, plus ``raw_gid`` (N,) the user's group ids (None for a dense
    mask, ``dense_groups=True``), ``unconstrained`` (G,) bool groups allowing every label or none.

    Returns:
        (scales (4, N) float32, group ids (N,) int32 or None, error word): on CUDA the error word
        is None (a failed check is a device-side assertion, no host synchronisation); on CPU it is
        the int read back (bit 1: a target out of range, bit 2: a group id out of range).
    """
    from vfm.kernels.kce_prologue import kce_prologue

    if isinstance(items, Tensor):
        items = items.reshape(())
    scales, gids, err = kce_prologue(
        tgt.contiguous(), soft_mask.contiguous() if soft_mask is not None else None, w, raw_gid, unconstrained,
        items, vocab=vocab, ignore_index=ignore_index, mean=mean, coefs=coefs, dense_groups=dense_groups)
    return scales, gids, (int(err) if tgt.device.type == "cpu" else None)


# ------------------------------------------------------------------------------ the ops --
@torch.library.custom_op("vfm::knowledge_cross_entropy", mutates_args=())
def knowledge_cross_entropy_op(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    teacher: Optional[Tensor],
    topk_idx: Optional[Tensor],
    topk_lp: Optional[Tensor],
    allowed_bits: Optional[Tensor],
    group_ids: Optional[Tensor],
    scales: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    temperature: float,
    kd_mode: int,
    jsd_beta: float,
    pen_mode: int,
    rule_strength: float,
    use_ce: bool,
    use_z: bool,
    compute_grad: bool,
    reduce: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Normalised op (see :mod:`vfm.ops.kce_reference`); returns (loss, parts, grad)."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    loss, parts = forward_impl(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales,
                               ignore_index, label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode,
                               rule_strength, use_ce, use_z, grad, reduce)
    if grad is None:
        grad = logits.new_empty(0)
    return loss, parts, grad


@knowledge_cross_entropy_op.register_fake
def _(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, ignore_index,
      label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode, rule_strength, use_ce, use_z,
      compute_grad, reduce):
    n_rows, out_dtype = logits.shape[0], _loss_dtype(logits)
    loss = logits.new_empty((), dtype=out_dtype) if reduce else logits.new_empty((n_rows,), dtype=out_dtype)
    parts = logits.new_empty((5, n_rows), dtype=out_dtype)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    return loss, parts, grad


@torch.library.custom_op("vfm::knowledge_cross_entropy_inplace", mutates_args=("logits",))
def knowledge_cross_entropy_inplace_op(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    teacher: Optional[Tensor],
    topk_idx: Optional[Tensor],
    topk_lp: Optional[Tensor],
    allowed_bits: Optional[Tensor],
    group_ids: Optional[Tensor],
    scales: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    temperature: float,
    kd_mode: int,
    jsd_beta: float,
    pen_mode: int,
    rule_strength: float,
    use_ce: bool,
    use_z: bool,
    reduce: bool,
) -> Tuple[Tensor, Tensor]:
    """Like :func:`knowledge_cross_entropy_op`, but the gradient overwrites ``logits``."""
    return forward_impl(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales,
                        ignore_index, label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode,
                        rule_strength, use_ce, use_z, logits, reduce)


@knowledge_cross_entropy_inplace_op.register_fake
def _(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, ignore_index,
      label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode, rule_strength, use_ce, use_z, reduce):
    n_rows, out_dtype = logits.shape[0], _loss_dtype(logits)
    loss = logits.new_empty((), dtype=out_dtype) if reduce else logits.new_empty((n_rows,), dtype=out_dtype)
    return loss, logits.new_empty((5, n_rows), dtype=out_dtype)


# ---------------------------------------------------------------------------- autograd --
def _is_eager_tensor(t: Tensor) -> bool:
    """True for a real tensor in eager mode (not fake, meta, functional or being traced)."""
    if type(t) is not torch.Tensor or t.device.type == "meta" or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return False
    key = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "PROXY", None)
    return key is None or torch._C._get_dispatch_mode(key) is None


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scale_grad(grad: Tensor, g_loss: Tensor, reduce: bool, inplace: bool, owned: bool = False) -> Tensor:
    """The gradient for upstream gradient ``g_loss``: ``grad`` scaled (in place when ``inplace``).

    ``owned``: ``grad`` is a buffer the caller hands to autograd (or the logits' storage of the
    in-place mode), so on the device path a reduced loss's gradient is scaled in place by a kernel
    that reads ``g_loss`` on device and does nothing when it is 1: no host synchronisation.
    """
    if torch.is_grad_enabled() or g_loss.requires_grad:
        raise RuntimeError(
            "knowledge_cross_entropy does not support double backward (create_graph=True): its gradient "
            "is computed by a fused kernel, not by differentiable operations"
        )
    if reduce:
        if (owned and grad.dtype in _KERNEL_DTYPES and g_loss.numel() == 1 and g_loss.device == grad.device
                and grad.dim() == 2 and grad.stride(-1) == 1 and use_device_path(grad) and _is_eager_tensor(g_loss)):
            from vfm.kernels.kce_prologue import kce_scale_grad_

            return kce_scale_grad_(grad, g_loss)
        if _is_eager_tensor(g_loss) and bool(g_loss == 1):
            return grad  # loss.backward(): the kernel's gradient is already the answer, no pass needed
        factor = g_loss.to(grad.dtype)
    else:
        factor = g_loss.to(grad.dtype)[:, None]
    return grad.mul_(factor) if inplace else grad * factor


def _setup_context(ctx, inputs, output):
    ctx.reduce = inputs[-1]
    ctx.has_grad = inputs[-2]  # compute_grad: the public API sets it whenever logits need a gradient
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])


def _backward(ctx, g_loss, g_parts, g_grad):
    (grad,) = ctx.saved_tensors
    nones = (None,) * 20
    if g_loss is None or not ctx.has_grad:
        return (None,) + nones
    return (_scale_grad(grad, g_loss, ctx.reduce, inplace=False),) + nones


knowledge_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class InplaceKnowledgeCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of the mutating op (torch.library cannot attach autograd to a mutating op).

    The forward writes the gradient into the logits' storage; backward hands that storage back,
    scaled by the upstream gradient in place.  The logits are not marked dirty: any other use of
    their old values that autograd saved fails its version check, as it should.
    """

    @staticmethod
    def forward(ctx, logits, reduce, *args):
        if _is_eager_tensor(logits):
            loss, parts = forward_impl(logits, *args, logits, reduce)
            # The cpp / triton kernels write through the data pointer, which autograd does not see:
            # bump the version so that another op that saved these logits fails its check.
            torch.autograd.graph.increment_version(logits)
        else:
            loss, parts = torch.ops.vfm.knowledge_cross_entropy_inplace(logits, *args, reduce)
        ctx.reduce = reduce
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, g_loss, g_parts):
        (grad,) = ctx.saved_tensors
        nones = (None,) * 19
        if g_loss is None:
            return (None,) + nones
        return (_scale_grad(grad, g_loss, ctx.reduce, inplace=True, owned=True),) + nones


class EagerKnowledgeCrossEntropy(torch.autograd.Function):
    """The eager path of ``vfm::knowledge_cross_entropy``: same implementation and backward.

    Calling the backend through an autograd.Function skips the custom-op dispatcher's Python
    work (argument re-binding, redispatch), about a quarter of a millisecond a call, which on a
    GPU would sit between kernels.  torch.compile, export, fake tensors and opcheck go through the
    registered custom op instead (see ``vfm.ops.kce_api``), so both paths run the same code.
    """

    @staticmethod
    def forward(ctx, logits, compute_grad, reduce, *args):
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
        loss, parts = forward_impl(logits, *args, grad, reduce)
        ctx.reduce = reduce
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(parts)
        ctx.has_grad = grad is not None
        ctx.grad = grad  # not save_for_backward: it is no input or output, and is used exactly once
        return loss, parts

    @staticmethod
    def backward(ctx, g_loss, g_parts):
        nones = (None,) * 20
        if g_loss is None or not ctx.has_grad:
            return (None,) + nones
        if ctx.grad is None:
            raise RuntimeError(
                "knowledge_cross_entropy: backward ran twice through the same graph (retain_graph=True) after a "
                "first backward that handed the fused gradient buffer to autograd (upstream gradient 1, or on "
                "CUDA any upstream gradient of a reduced loss, which is scaled in place). Recompute the loss instead."
            )
        out = _scale_grad(ctx.grad, g_loss, ctx.reduce, inplace=False, owned=True)
        if out is ctx.grad:
            # Handing the buffer itself over: drop ctx's reference so autograd adopts it as .grad
            # instead of copying it.
            ctx.grad = None
        return (out,) + nones
