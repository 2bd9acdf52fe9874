"""The ``vfm::fused_linear_knowledge_cross_entropy`` custom op: schema, fake, autograd, backends.

The op returns (loss, parts, grad_hidden, grad_weight, grad_bias).  The gradients are computed in
the forward pass, block by block (:mod:`vfm.ops.flce_blockwise`), for an upstream gradient of one
on the summed loss; backward scales them by the upstream gradient (no work at all when it is
exactly one, which is what ``loss.backward()`` sends).  With ``reduce=False`` (``reduction="none"``)
each row's gradient is weighted by its own upstream value, which the weight gradient cannot
absorb afterwards, so the forward computes no gradient and backward runs the blockwise pass again
with the per-row scales multiplied by the upstream gradient (the slower, exact path).

Backends, registered under the op name ``"fused_linear_knowledge_cross_entropy"``:

* ``torch``: the blockwise loop with the pure-PyTorch knowledge CE reference per block (the
  reference backend; any device and dtype).
* ``cpp``: CPU; BLAS GEMMs (``torch.mm``/``addmm`` with ``out=``) and the hand-written C++
  knowledge CE kernel ``vfm_C::kce_forward`` in place on each block.
* ``triton``: cuBLAS GEMMs and the Triton knowledge CE kernel in place on each block (CPU tensors
  under ``TRITON_INTERPRET=1``; fp32/fp16/bf16 only).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from vfm import _registry
from vfm.ops.flce_blockwise import flce_blockwise
from vfm.ops.kce_reference import kce_forward_torch
from vfm.ops.knowledge_ce import _check_cpp, _config, _is_eager_tensor, triton_missing_reason

OP = "fused_linear_knowledge_cross_entropy"


def _torch_impl(*args):
    return flce_blockwise(kce_forward_torch, *args)


def _cpp_impl(*args):
    from vfm.ops.kce_cpp import kce_forward_cpp

    return flce_blockwise(kce_forward_cpp, *args)


def _triton_impl(*args):
    from vfm.kernels.knowledge_ce import kce_forward_triton

    return flce_blockwise(kce_forward_triton, *args)


_registry.register(OP, "torch", _torch_impl, lambda device: None)
_registry.register(OP, "cpp", _cpp_impl, _check_cpp)
_registry.register(OP, "triton", _triton_impl, triton_missing_reason)


def _unsupported(backend: str, hidden: Tensor, teacher: Optional[Tensor], teacher_hidden: Optional[Tensor]):
    if backend == "triton":
        for name, t in (("hidden", hidden), ("teacher_logits", teacher), ("teacher_hidden", teacher_hidden)):
            if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return f"{name} is {t.dtype}, which the triton kernels do not support (use torch or cpp)"
    return None


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def forward_impl(hidden, weight, bias, target, class_weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids,
                 scales, teacher_hidden, teacher_weight, teacher_bias, ignore_index, label_smoothing, softcap,
                 temperature, kd_mode, jsd_beta, pen_mode, rule_strength, use_ce, use_z, need_grad_hidden,
                 need_grad_weight, need_grad_bias, reduce, block_rows, accum_fp32, grad_filter=0.0):
    """Run the chosen backend. Returns (loss, parts, grad_hidden, grad_weight, grad_bias) (grads or None).

    Gradients are computed only when ``reduce`` is true (see the module docstring).
    """
    backend, impl = _registry.resolve(OP, hidden.device,
                                      lambda b: _unsupported(b, hidden, teacher, teacher_hidden))
    if backend != "torch":
        scales = scales.float()
        class_weight = class_weight.float() if class_weight is not None else None
    cfg = _config(ignore_index, label_smoothing, softcap, temperature, kd_mode, jsd_beta, pen_mode, rule_strength,
                  use_ce, use_z)
    row_loss, parts, gh, gw, gb = impl(
        hidden, weight, bias, target, class_weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales,
        teacher_hidden, teacher_weight, teacher_bias, cfg, need_grad_hidden and reduce, need_grad_weight and reduce,
        need_grad_bias and reduce and bias is not None, block_rows, accum_fp32, grad_filter)
    out_dtype = _loss_dtype(hidden)
    row_loss, parts = row_loss.to(out_dtype), parts.to(out_dtype)
    return (row_loss.sum() if reduce else row_loss), parts, gh, gw, gb


@torch.library.custom_op("vfm::fused_linear_knowledge_cross_entropy", mutates_args=())
def fused_linear_knowledge_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    teacher: Optional[Tensor],
    topk_idx: Optional[Tensor],
    topk_lp: Optional[Tensor],
    allowed_bits: Optional[Tensor],
    group_ids: Optional[Tensor],
    scales: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor],
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
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    reduce: bool,
    block_rows: int,
    accum_fp32: bool,
    grad_filter: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalised op; returns (loss, parts, grad_hidden, grad_weight, grad_bias), empty where not computed."""
    loss, parts, gh, gw, gb = forward_impl(
        hidden, weight, bias, target, class_weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales,
        teacher_hidden, teacher_weight, teacher_bias, ignore_index, label_smoothing, softcap, temperature, kd_mode,
        jsd_beta, pen_mode, rule_strength, use_ce, use_z, need_grad_hidden, need_grad_weight, need_grad_bias,
        reduce, block_rows, accum_fp32, grad_filter)

    def empty():  # one fresh tensor per output: outputs must not alias each other
        return hidden.new_empty(0)

    return (loss, parts, gh if gh is not None else empty(), gw if gw is not None else empty(),
            gb if gb is not None else empty())


@fused_linear_knowledge_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, class_weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales,
      teacher_hidden, teacher_weight, teacher_bias, ignore_index, label_smoothing, softcap, temperature, kd_mode,
      jsd_beta, pen_mode, rule_strength, use_ce, use_z, need_grad_hidden, need_grad_weight, need_grad_bias,
      reduce, block_rows, accum_fp32, grad_filter):
    n_rows, out_dtype = hidden.shape[0], _loss_dtype(hidden)
    loss = hidden.new_empty((), dtype=out_dtype) if reduce else hidden.new_empty((n_rows,), dtype=out_dtype)
    parts = hidden.new_empty((5, n_rows), dtype=out_dtype)
    gh = torch.empty_like(hidden) if (need_grad_hidden and reduce) else hidden.new_empty(0)
    gw = torch.empty_like(weight) if (need_grad_weight and reduce) else hidden.new_empty(0)
    gb = torch.empty_like(bias) if (need_grad_bias and reduce and bias is not None) else hidden.new_empty(0)
    return loss, parts, gh, gw, gb


# ---------------------------------------------------------------------------- autograd --
_N_INPUTS = 31
_DOUBLE_BACKWARD = (
    "fused_linear_knowledge_cross_entropy does not support double backward (create_graph=True): its "
    "gradients are computed by fused kernels, not by differentiable operations"
)


def _scale(t: Optional[Tensor], g_loss: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if _is_eager_tensor(g_loss) and bool(g_loss == 1):
        return t
    return t * g_loss.to(t.dtype)


def _recompute_grads(inputs: tuple, g_rows: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum_i g_i L_i: the blockwise pass again with the per-row scales times g."""
    args = list(inputs)
    args[10] = args[10] * g_rows.to(args[10].dtype).reshape(1, -1)
    args[27] = True  # reduce
    if _is_eager_tensor(args[0]):
        _, _, gh, gw, gb = forward_impl(*args)
        return gh, gw, gb
    _, _, gh, gw, gb = torch.ops.vfm.fused_linear_knowledge_cross_entropy(*args)
    return (gh if args[24] else None), (gw if args[25] else None), (gb if args[26] and args[2] is not None else None)


def _setup_context(ctx, inputs, output):
    ctx.reduce = inputs[27]
    ctx.need = (inputs[24], inputs[25], inputs[26] and inputs[2] is not None)
    ctx.set_materialize_grads(False)
    if ctx.reduce:
        ctx.save_for_backward(*output[2:])
    else:  # keep every input: backward runs the blockwise pass again
        ctx.tensor_slots = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))


def _backward(ctx, g_loss, g_parts, g_gh, g_gw, g_gb):
    nones = [None] * _N_INPUTS
    if g_loss is None or not any(ctx.need):
        return tuple(nones)
    if torch.is_grad_enabled() or g_loss.requires_grad:
        raise RuntimeError(_DOUBLE_BACKWARD)
    if ctx.reduce:
        grads = [t if need else None for t, need in zip(ctx.saved_tensors, ctx.need)]
        grads = [_scale(t, g_loss) for t in grads]
    else:
        inputs = list(ctx.constants)
        for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
            inputs[i] = t
        grads = list(_recompute_grads(tuple(inputs), g_loss))
    nones[0], nones[1], nones[2] = grads
    return tuple(nones)


fused_linear_knowledge_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class EagerFusedLinearKnowledgeCE(torch.autograd.Function):
    """Eager path of ``vfm::fused_linear_knowledge_cross_entropy``: same implementation and backward.

    Skips the custom-op dispatcher's Python work, and hands the forward's gradient buffers to
    autograd without a copy when the upstream gradient is exactly one.  torch.compile, export, fake
    tensors and opcheck go through the registered custom op instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, *rest):
        args = (hidden, weight, bias) + rest
        loss, parts, gh, gw, gb = forward_impl(*args)
        ctx.reduce = args[27]
        ctx.need = (args[24], args[25], args[26] and bias is not None)
        ctx.grads = [gh, gw, gb]
        ctx.inputs = None if ctx.reduce else args
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, g_loss, g_parts):
        nones = [None] * _N_INPUTS
        if g_loss is None or not any(ctx.need):
            return tuple(nones)
        if torch.is_grad_enabled() or g_loss.requires_grad:
            raise RuntimeError(_DOUBLE_BACKWARD)
        if not ctx.reduce:
            grads = list(_recompute_grads(ctx.inputs, g_loss))
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "fused_linear_knowledge_cross_entropy: backward ran twice through the same graph "
                    "(retain_graph=True) after a first backward with upstream gradient 1, which hands the "
                    "gradient buffers to autograd. Recompute the loss instead.")
            grads = [_scale(t, g_loss) if need else None for t, need in zip(ctx.grads, ctx.need)]
            if any(g is not None and g is t for g, t in zip(grads, ctx.grads)):
                ctx.grads = None  # handed over: let autograd adopt the buffers as .grad
        nones[0], nones[1], nones[2] = grads
        return tuple(nones)
