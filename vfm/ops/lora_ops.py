"""The low-rank adapter custom ops: schema, fake, autograd and backend dispatch.

Four public ops (namespace ``vfm``), each with a private backward op, all taking the normalised
arguments of :mod:`vfm.ops.lora_reference` (which documents the kernel contract):

* ``vfm::lora_linear`` / ``vfm::lora_linear_backward``
* ``vfm::dora_linear`` / ``vfm::dora_linear_backward``
* ``vfm::adalora_linear`` / ``vfm::adalora_linear_backward``
* ``vfm::lora_linear_multi`` / ``vfm::lora_linear_multi_backward``

Each forward op returns the output and the small activations its backward needs (xa = D(x) A^T,
and DoRA's detached weight norm); the input x is saved as it is, never copied, and the dropout
mask is regenerated from the seed.  Both halves ask the registry for the backend when they run,
so a forced backend must enclose the backward pass too to force it there.  Backward ops return
empty tensors for the gradients that were not asked for (custom ops cannot return None).

Eager calls go through a ``torch.autograd.Function`` on the same implementations (it skips the
custom-op dispatcher's Python work); torch.compile, export, fake tensors and opcheck use the
registered custom ops (see :mod:`vfm.ops.lora_api`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from vfm import _registry
from vfm.ops.knowledge_ce import _is_eager_tensor  # noqa: F401  (re-exported for the API)
from vfm.ops.lora_cpp import LORA_CPP
from vfm.ops.lora_cpp import check_cpp as check_lora_cpp
from vfm.ops.lora_cpp_variants import ADALORA_CPP, DORA_CPP, LORA_MULTI_CPP
from vfm.ops.lora_reference import ADALORA_TORCH, DORA_TORCH, LORA_MULTI_TORCH, LORA_TORCH
from vfm.ops.lora_triton import ADALORA_TRITON, DORA_TRITON, LORA_MULTI_TRITON, LORA_TRITON, check_triton

LORA, DORA, ADALORA, MULTI = "lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi"


def _check_torch(device: torch.device) -> Optional[str]:
    return None


# the torch backend's kernels by op: plain differentiable torch ops (lora_api runs them under torch.func)
REFERENCE = {LORA: LORA_TORCH, DORA: DORA_TORCH, ADALORA: ADALORA_TORCH, MULTI: LORA_MULTI_TORCH}
for _name, _kernels in REFERENCE.items():
    _registry.register(_name, "torch", _kernels, _check_torch)
for _name, _kernels in ((LORA, LORA_CPP), (DORA, DORA_CPP), (ADALORA, ADALORA_CPP), (MULTI, LORA_MULTI_CPP)):
    _registry.register(_name, "cpp", _kernels, check_lora_cpp)
from vfm.ops.lora_cuda import LORA_CUDA, LORA_MULTI_CUDA, check_cuda as check_lora_cuda  # noqa: E402
_registry.register(LORA, "cuda", LORA_CUDA, check_lora_cuda)
_registry.register(MULTI, "cuda", LORA_MULTI_CUDA, check_lora_cuda)
for _name, _kernels in ((LORA, LORA_TRITON), (DORA, DORA_TRITON), (ADALORA, ADALORA_TRITON),
                       (MULTI, LORA_MULTI_TRITON)):
    _registry.register(_name, "triton", _kernels, check_triton)


def _unsupported(backend: str, x: Tensor) -> Optional[str]:
    if backend == "cpp" and x.dtype not in (torch.float32, torch.float64):
        return f"x is {x.dtype}; the cpp low-rank kernels take float32 or float64 (use the torch backend)"
    if backend == "triton" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"x is {x.dtype}; the triton low-rank kernels take float32, float16 or bfloat16 (use torch or cpp)"
    return None


def kernels(op: str, x: Tensor):
    """The :class:`~vfm.ops.lora_reference.LowRankKernels` of the backend chosen for this call."""
    return _registry.resolve(op, x.device, lambda backend: _unsupported(backend, x))[1]


def _choose(op: str, x: Tensor) -> Tuple[str, object]:
    """(backend name, kernels) for a forward: its backward runs the same backend (:func:`_chosen`)."""
    return _registry.resolve(op, x.device, lambda backend: _unsupported(backend, x))


def _backward_kernels(op: str, x: Tensor, backend: str):
    """A backward custom op's kernels: ``backend`` when its forward ran under a forced one, else the
    choice for ``x`` (the one the forward made: same device and dtype)."""
    if not backend:
        return kernels(op, x)
    with _registry.use_backend(backend):
        return kernels(op, x)


def _forced_at_forward() -> str:
    """The backend forced when a forward runs ("" for none), kept for its backward (see :func:`_chosen`)."""
    return _registry.forced_backend() or ""


def _chosen(op: str, choice: Tuple[str, object]):
    """The kernels the forward ran, for its backward: a backend forced around the forward
    (``vfm.use_backend``) is no longer in force when autograd runs the backward (after the ``with``
    block, or on autograd's own device threads), and the backward must not switch kernels."""
    _registry.CALLS[(op, choice[0])] += 1
    return choice[1]


def _no_double_backward(op: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} does not support double backward (create_graph=True): its backward is a fused kernel, "
            "not a composition of differentiable operations"
        )


def _empty_if_none(grads, like: Tensor) -> Tuple[Tensor, ...]:
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _none_if_unneeded(grads, needs) -> Tuple[Optional[Tensor], ...]:
    return tuple(g if need else None for g, need in zip(grads, needs))


def _grad_like(need: bool, x: Tensor, t: Tensor, shape=None) -> Tensor:
    """Fake gradient: t's shape (or ``shape``) and dtype when asked for, else x.new_empty(0) as the op returns."""
    return t.new_empty(t.shape if shape is None else shape) if need else x.new_empty(0)


# ------------------------------------------------------------------------------- LoRA --
@torch.library.custom_op("vfm::lora_linear", mutates_args=())
def lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                   dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    """y = x W^T + b + scale * (D(x) A^T) B^T; returns (y, xa)."""
    return kernels(LORA, x).forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]), dtype=lora_a.dtype)


@torch.library.custom_op("vfm::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xa: Tensor,
                            scale: float, dropout_p: float, seed: Tensor,
                            needs: List[bool], backend: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward_kernels(LORA, x, backend).backward(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed,
                                                         tuple(needs))
    return _empty_if_none(grads, x)


@lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs, backend=""):
    return (_grad_like(needs[0], x, x), _grad_like(needs[1], x, weight),
            _grad_like(needs[2], x, grad_y, (grad_y.shape[1],)),
            _grad_like(needs[3], x, lora_a), _grad_like(needs[4], x, lora_b))


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed = inputs
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, _forced_at_forward()
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)


def _lora_backward(ctx, grad_y, grad_xa):
    x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if grad_y is None or not any(needs):
        return (None,) * 8
    _no_double_backward("lora_linear")
    grads = torch.ops.vfm.lora_linear_backward(grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, ctx.dropout_p, seed,
                                               needs, ctx.backend)
    return _none_if_unneeded(grads, needs) + (None,) * 3


lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


class EagerLoRALinear(torch.autograd.Function):
    """Eager path of ``vfm::lora_linear``: the same kernels without the custom-op dispatcher."""

    OP = LORA  # the registry name: lora_api calls its kernels directly when nothing needs a gradient

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
        ctx.choice = _choose(LORA, x)
        y, xa = ctx.choice[1].forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, seed)
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)
        return y, xa

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        if grad_y is None or not any(needs):
            return (None,) * 8
        _no_double_backward("lora_linear")
        grads = _chosen(LORA, ctx.choice).backward(grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, ctx.dropout_p,
                                                   seed, needs)
        return _none_if_unneeded(grads, needs) + (None,) * 3


# ------------------------------------------------------------------------------- DoRA --
@torch.library.custom_op("vfm::dora_linear", mutates_args=())
def dora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                   magnitude: Tensor, scale: float, dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """PEFT's DoRA forward; returns (y, xa, weight_norm)."""
    return kernels(DORA, x).forward(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)


@dora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=lora_a.dtype),
            x.new_empty((weight.shape[0],), dtype=lora_a.dtype))


@torch.library.custom_op("vfm::dora_linear_backward", mutates_args=())
def dora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                            magnitude: Tensor, xa: Tensor, weight_norm: Tensor, scale: float, dropout_p: float,
                            seed: Tensor, needs: List[bool],
                            y: Optional[Tensor] = None,
                            bias: Optional[Tensor] = None,
                            backend: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y, bias: the forward's output and the base bias without dropout (grad_magnitude from them), else None."""
    kern = _backward_kernels(DORA, x, backend)
    grads = kern.backward(grad_y, x, weight, lora_a, lora_b, magnitude, xa, weight_norm, scale, dropout_p, seed,
                          tuple(needs), y, bias)
    return _empty_if_none(grads, x)


@dora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, magnitude, xa, weight_norm, scale, dropout_p, seed, needs, y=None,
      bias=None, backend=""):
    return (_grad_like(needs[0], x, x), _grad_like(needs[1], x, weight),
            _grad_like(needs[2], x, grad_y, (grad_y.shape[1],)),
            _grad_like(needs[3], x, lora_a), _grad_like(needs[4], x, lora_b), _grad_like(needs[5], x, magnitude))


def _dora_output_for_backward(bias, dropout_p, y):
    """DoRA's output is what grad_magnitude is computed from without dropout (with a bias, in 32- and
    64-bit floats only: see dora_magnitude_grad_from_output)."""
    if dropout_p > 0.0 or (bias is not None and y.dtype not in (torch.float32, torch.float64)):
        return None
    return y


_TOP_SAVED_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks_active() -> bool:
    """True inside ``torch.autograd.graph.saved_tensors_hooks`` (non-reentrant gradient checkpointing,
    ``save_on_cpu``): saved tensors then go through the hooks, which a tensor kept on ctx would bypass."""
    return _TOP_SAVED_HOOKS is not None and _TOP_SAVED_HOOKS(False) is not None


def _dora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed = inputs
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, _forced_at_forward()
    out = _dora_output_for_backward(bias, dropout_p, output[0])
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, output[1], output[2], seed, out,
                          bias if out is not None else None)


def _dora_backward(ctx, grad_y, grad_xa, grad_wn):
    x, weight, lora_a, lora_b, magnitude, xa, wn, seed, y, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    if grad_y is None or not any(needs):
        return (None,) * 9
    _no_double_backward("dora_linear")
    grads = torch.ops.vfm.dora_linear_backward(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, ctx.scale,
                                               ctx.dropout_p, seed, needs, y, bias, ctx.backend)
    return _none_if_unneeded(grads, needs) + (None,) * 3


dora_linear_op.register_autograd(_dora_backward, setup_context=_dora_setup)


class EagerDoRALinear(torch.autograd.Function):
    """Eager path of ``vfm::dora_linear``."""

    OP = DORA  # the registry name: lora_api calls its kernels directly when nothing needs a gradient

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
        ctx.choice = _choose(DORA, x)
        y, xa, wn = ctx.choice[1].forward(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        out = _dora_output_for_backward(bias, dropout_p, y)
        if out is not None and _saved_tensor_hooks_active():
            out = None  # an alias on ctx would bypass the hooks (checkpointing, save_on_cpu) and pin y in memory
        ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, xa, wn, seed, bias if out is not None else None)
        # The output, for grad_magnitude: kept as a detached alias (it shares y's version counter)
        # rather than saved, so that an in-place change of y after the forward makes the backward
        # fall back to the formula without y instead of raising.
        ctx.y, ctx.y_version = (None, 0) if out is None else (out.detach(), out._version)
        ctx.mark_non_differentiable(xa, wn)
        ctx.set_materialize_grads(False)
        return y, xa, wn

    @staticmethod
    def backward(ctx, grad_y, grad_xa, grad_wn):
        x, weight, lora_a, lora_b, magnitude, xa, wn, seed, bias = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:6])
        if grad_y is None or not any(needs):
            return (None,) * 9
        _no_double_backward("dora_linear")
        y = ctx.y if ctx.y is not None and ctx.y._version == ctx.y_version else None
        grads = _chosen(DORA, ctx.choice).backward(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, ctx.scale,
                                                   ctx.dropout_p, seed, needs, y, bias)
        return _none_if_unneeded(grads, needs) + (None,) * 3


# ---------------------------------------------------------------------------- AdaLoRA --
@torch.library.custom_op("vfm::adalora_linear", mutates_args=())
def adalora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_e: Tensor,
                      lora_b: Tensor, scale: float, ranknum: Tensor, dropout_p: float,
                      seed: Tensor) -> Tuple[Tensor, Tensor]:
    """PEFT's AdaLoRA (SVDLinear) forward; returns (y, xa)."""
    return kernels(ADALORA, x).forward(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed)


@adalora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]), dtype=lora_a.dtype)


@torch.library.custom_op("vfm::adalora_linear_backward", mutates_args=())
def adalora_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_e: Tensor,
                               lora_b: Tensor, ranknum: Tensor, xa: Tensor, scale: float, dropout_p: float,
                               seed: Tensor,
                               needs: List[bool],
                               backend: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kern = _backward_kernels(ADALORA, x, backend)
    grads = kern.backward(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p, seed, tuple(needs))
    return _empty_if_none(grads, x)


@adalora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p, seed, needs, backend=""):
    return (_grad_like(needs[0], x, x), _grad_like(needs[1], x, weight),
            _grad_like(needs[2], x, grad_y, (grad_y.shape[1],)),
            _grad_like(needs[3], x, lora_a), _grad_like(needs[4], x, lora_e), _grad_like(needs[5], x, lora_b))


def _adalora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed = inputs
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, _forced_at_forward()
    ctx.save_for_backward(x, weight, lora_a, lora_e, lora_b, ranknum, output[1], seed)


def _adalora_backward(ctx, grad_y, grad_xa):
    x, weight, lora_a, lora_e, lora_b, ranknum, xa, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    if grad_y is None or not any(needs):
        return (None,) * 10
    _no_double_backward("adalora_linear")
    grads = torch.ops.vfm.adalora_linear_backward(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, ctx.scale,
                                                  ctx.dropout_p, seed, needs, ctx.backend)
    return _none_if_unneeded(grads, needs) + (None,) * 4


adalora_linear_op.register_autograd(_adalora_backward, setup_context=_adalora_setup)


class EagerAdaLoRALinear(torch.autograd.Function):
    """Eager path of ``vfm::adalora_linear``."""

    OP = ADALORA  # the registry name: lora_api calls its kernels directly when nothing needs a gradient

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed):
        ctx.choice = _choose(ADALORA, x)
        y, xa = ctx.choice[1].forward(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.save_for_backward(x, weight, lora_a, lora_e, lora_b, ranknum, xa, seed)
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)
        return y, xa

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        x, weight, lora_a, lora_e, lora_b, ranknum, xa, seed = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:6])
        if grad_y is None or not any(needs):
            return (None,) * 10
        _no_double_backward("adalora_linear")
        grads = _chosen(ADALORA, ctx.choice).backward(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa,
                                                      ctx.scale, ctx.dropout_p, seed, needs)
        return _none_if_unneeded(grads, needs) + (None,) * 4


# ---------------------------------------------------------------------- multi-adapter --
@torch.library.custom_op("vfm::lora_linear_multi", mutates_args=())
def lora_linear_multi_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_stack: Tensor, b_stack: Tensor,
                         scalings: Tensor, adapter_ids: Tensor, dropout_p: float,
                         seed: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row adapters; returns (y, xa)."""
    return kernels(MULTI, x).forward(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed)


@lora_linear_multi_op.register_fake
def _(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], a_stack.shape[1]), dtype=a_stack.dtype)


@torch.library.custom_op("vfm::lora_linear_multi_backward", mutates_args=())
def lora_linear_multi_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, a_stack: Tensor, b_stack: Tensor,
                                  scalings: Tensor, adapter_ids: Tensor, xa: Tensor, dropout_p: float, seed: Tensor,
                                  needs: List[bool],
                                  backend: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kern = _backward_kernels(MULTI, x, backend)
    grads = kern.backward(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed,
                          tuple(needs))
    return _empty_if_none(grads, x)


@lora_linear_multi_backward_op.register_fake
def _(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed, needs, backend=""):
    return (_grad_like(needs[0], x, x), _grad_like(needs[1], x, weight),
            _grad_like(needs[2], x, grad_y, (grad_y.shape[1],)),
            _grad_like(needs[3], x, a_stack), _grad_like(needs[4], x, b_stack))


def _multi_setup(ctx, inputs, output):
    x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed = inputs
    ctx.dropout_p, ctx.backend = dropout_p, _forced_at_forward()
    ctx.save_for_backward(x, weight, a_stack, b_stack, scalings, adapter_ids, output[1], seed)


def _multi_backward(ctx, grad_y, grad_xa):
    x, weight, a_stack, b_stack, scalings, adapter_ids, xa, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if grad_y is None or not any(needs):
        return (None,) * 9
    _no_double_backward("lora_linear_multi")
    grads = torch.ops.vfm.lora_linear_multi_backward(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa,
                                                     ctx.dropout_p, seed, needs, ctx.backend)
    return _none_if_unneeded(grads, needs) + (None,) * 4


lora_linear_multi_op.register_autograd(_multi_backward, setup_context=_multi_setup)


class EagerLoRALinearMulti(torch.autograd.Function):
    """Eager path of ``vfm::lora_linear_multi``."""

    OP = MULTI  # the registry name: lora_api calls its kernels directly when nothing needs a gradient

    @staticmethod
    def forward(ctx, x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed):
        ctx.choice = _choose(MULTI, x)
        y, xa = ctx.choice[1].forward(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed)
        ctx.dropout_p = dropout_p
        ctx.save_for_backward(x, weight, a_stack, b_stack, scalings, adapter_ids, xa, seed)
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)
        return y, xa

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        x, weight, a_stack, b_stack, scalings, adapter_ids, xa, seed = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        if grad_y is None or not any(needs):
            return (None,) * 9
        _no_double_backward("lora_linear_multi")
        grads = _chosen(MULTI, ctx.choice).backward(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids,
                                                    xa, ctx.dropout_p, seed, needs)
        return _none_if_unneeded(grads, needs) + (None,) * 4
