"""Public low-rank adapter functions: argument checking, seeds, autocast, and the call of the ops."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from vfm import _registry
from vfm.ops import lora_ops as _ops
from vfm.ops.kce_api import _require_tensor, _shape

_SEED_LIMIT = 2 ** 63 - 1
_NO_SEED = torch.zeros((), dtype=torch.int64)  # passed when dropout is off; never read


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ------------------------------------------------------------------------- validation --
def _check_base(x, weight, bias, lora_a, lora_b):
    """Validate the base layer and the two factors; returns (x2d, in, out, r)."""
    x = _require_tensor("x", x, floating=True)
    weight = _require_tensor("weight", weight, floating=True)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (*, in_features), got {_shape(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {_shape(weight)}")
    out_f, in_f = (int(s) for s in weight.shape)
    if x.shape[-1] != in_f:
        raise ValueError(f"x has shape {_shape(x)} but weight has shape {_shape(weight)}: x's last dimension must "
                         f"equal in_features={in_f}")
    # under torch.autocast every floating input is cast to the autocast dtype first (as F.linear does), so
    # x, weight and bias may differ here (an fp32 layer gets the bf16 output of an autocast matmul)
    autocast = torch.is_autocast_enabled(x.device.type)
    if weight.dtype != x.dtype and not autocast:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        _require_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},) (out_features of weight {_shape(weight)}), "
                             f"got {_shape(bias)}")
        if bias.dtype != x.dtype and not autocast:
            raise ValueError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    lora_a = _require_tensor("lora_a", lora_a, floating=True)
    lora_b = _require_tensor("lora_b", lora_b, floating=True)
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a must have shape (r, in_features={in_f}), got {_shape(lora_a)}")
    rank = int(lora_a.shape[0])
    if rank == 0:
        raise ValueError(f"lora_a has rank r=0 (shape {_shape(lora_a)}); r must be >= 1")
    if tuple(lora_b.shape) != (out_f, rank):
        raise ValueError(f"lora_b must have shape (out_features, r) = ({out_f}, {rank}) to match weight "
                         f"{_shape(weight)} and lora_a {_shape(lora_a)}, got {_shape(lora_b)}")
    if lora_b.dtype != lora_a.dtype:
        raise ValueError(f"lora_b dtype {lora_b.dtype} differs from lora_a dtype {lora_a.dtype}")
    _same_devices(x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    return _rows(x, in_f), in_f, out_f, rank


def _same_devices(x: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _rows(x: Tensor, in_f: int) -> Tensor:
    if x.dim() == 2 and (x.stride(-1) == 1 or x.shape[0] * in_f == 0):
        return x  # already (N, in): no new view object to build on every call
    x2d = x.reshape(-1, in_f)  # a view whenever possible: x itself is what backward saves
    return x2d if x2d.stride(-1) == 1 or x2d.shape[0] * in_f == 0 else x2d.contiguous()


def _check_vector(name: str, t, length: int, dtype: torch.dtype, dtype_of: str, shapes=None) -> Tensor:
    t = _require_tensor(name, t, floating=True)
    shapes = shapes or [(length,)]
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in shapes)}, got {_shape(t)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} dtype {t.dtype} differs from {dtype_of} dtype {dtype}")
    return t


def _require_number(name: str, value, *, low: Optional[float] = None) -> float:
    """``value`` as a float, checked: a real number (TypeError), not NaN and >= ``low`` (ValueError).

    Written with comparisons only (no ``math.isnan``), so that torch.compile can trace it when the
    value is a symbolic float: dynamo makes a module's float attribute (a LoRA scaling or dropout
    probability) symbolic once it has seen it change, and cannot trace ``math.isnan`` on one.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _dropout(dropout_p, training, seed) -> tuple:
    """(effective p, seed tensor): p is 0.0 when dropout is off."""
    p = _require_number("dropout_p", dropout_p, low=0.0)
    if p >= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {p}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None:
        if isinstance(seed, Tensor):
            if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool or seed.numel() != 1:
                raise TypeError(f"seed must be an int or a one-element integer tensor, got {seed.dtype} {_shape(seed)}")
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        elif not 0 <= int(seed) < _SEED_LIMIT:
            raise ValueError(f"seed must lie in [0, 2**63 - 1), got {seed}")
    if p == 0.0 or not training:
        return 0.0, _NO_SEED
    if seed is None:
        # torch's default CPU generator: torch.manual_seed reproduces the run, and checkpointing
        # (which restores the CPU RNG state before recomputing) draws the same seed again.
        seed_t = torch.randint(0, _SEED_LIMIT, (), dtype=torch.int64, device="cpu")
    elif isinstance(seed, Tensor):
        seed_t = seed.detach().reshape(()).to(device="cpu", dtype=torch.int64)
    else:
        seed_t = torch.tensor(int(seed), dtype=torch.int64)
    return p, seed_t


def _scaling(scaling, name: str = "scaling") -> float:
    value = _require_number(name, scaling)
    if value == math.inf or value == -math.inf:  # not math.isinf: see _require_number
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _autocast(tensors: dict) -> tuple:
    """Under torch.autocast, cast the floating inputs to the autocast dtype, as F.linear would: every
    one but float64 tensors, which autocast leaves as they are (a float64 layer stays float64)."""
    first = next(iter(tensors.values()))
    device_type = first.device.type if isinstance(first, Tensor) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return tensors, None
    dtype = torch.get_autocast_dtype(device_type)
    cast = {k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != torch.float64 else v)
            for k, v in tensors.items()}
    x = cast["x"]
    for name in ("weight", "bias"):
        t = cast.get(name)
        if t is not None and t.dtype != x.dtype:  # F.linear fails here too (one side float64)
            raise ValueError(f"under torch.autocast {name} becomes {t.dtype} but x becomes {x.dtype} (autocast leaves "
                             f"float64 tensors as they are; got x {tensors['x'].dtype}, {name} {tensors[name].dtype})")
    return cast, device_type


def _nothing_to_differentiate(args: tuple) -> bool:
    """True when no autograd record is needed: grad mode off or no input requiring grad, and no
    forward-mode AD level open (dual tensors still go through the autograd.Function, which refuses them)."""
    if getattr(_forward_ad, "_current_level", 0) >= 0:
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _run(eager_fn, op, x2d: Tensor, args: tuple, device_type: Optional[str]):
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vjp, jacrev, vmap): the fused autograd.Function has no functorch rule, so
        # run the torch reference's forward, plain differentiable torch ops the transforms can follow
        forced = _registry.forced_backend()
        if forced not in (None, "torch"):
            raise RuntimeError(f"{eager_fn.OP}: under torch.func transforms only the torch backend runs (its forward "
                               f"is plain torch ops), but {forced!r} is forced")
        return _ops.REFERENCE[eager_fn.OP].forward(*args)
    if device_type is not None:
        with torch.autocast(device_type, enabled=False):
            return _run(eager_fn, op, x2d, args, None)
    if _ops._is_eager_tensor(x2d):
        if _nothing_to_differentiate(args):
            # inference: the kernels directly (autograd.Function.apply costs tens of microseconds per
            # call, most of a small layer's forward); the results are the same tensors apply returns
            return _ops.kernels(eager_fn.OP, x2d).forward(*args)
        return eager_fn.apply(*args)
    return op(*args)


def _output(y: Tensor, x: Tensor) -> Tensor:
    return y if x.dim() == 2 else y.reshape(tuple(x.shape[:-1]) + (y.shape[-1],))


# ------------------------------------------------------------------------------ public --
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scaling: float,
                *, dropout_p: float = 0.0, training: bool = True, seed: Union[int, Tensor, None] = None) -> Tensor:
    """A linear layer with a low-rank adapter: ``y = x W^T + b + scaling * (D(x) A^T) B^T``.

    Args:
        x: (*, in) input.
        weight: (out, in) base weight, x's dtype; it gets a gradient only if it requires one.
        bias: (out,) base bias in x's dtype, or None.
        lora_a: (r, in) down-projection A, r >= 1.
        lora_b: (out, r) up-projection B, same dtype as lora_a (which may differ from x's: the
            low-rank branch then runs in the adapter dtype, as PEFT does).
        scaling: alpha / r for LoRA; rsLoRA is the choice alpha / sqrt(r), nothing else changes.
        dropout_p: probability p in [0, 1) of dropping an element of x on the low-rank branch.
        training: dropout acts only when True.
        seed: dropout seed (int in [0, 2**63 - 1) or a one-element integer tensor); None draws one
            from torch's default CPU generator.  The keep-mask is a counter-based hash of (seed,
            element offset) (see :mod:`vfm.ops.lora_reference`), regenerated in backward, and the
            same seed reproduces it on every device and backend.

    Returns:
        (*, out) in x's dtype.

    Raises:
        TypeError / ValueError naming the argument and the shapes: mismatched shapes or dtypes, r = 0,
        dropout_p outside [0, 1).

    Under ``torch.autocast`` every floating input is first cast to the autocast dtype (as
    ``F.linear`` does).  Under ``torch.func`` transforms (grad, vmap of grad, ...) the torch
    reference runs, whose forward is plain torch ops.  Under gradient checkpointing the recomputed forward draws the same seed,
    because checkpointing restores the CPU RNG state (``preserve_rng_state=True``, its default).
    """
    x2d, _, _, _ = _check_base(x, weight, bias, lora_a, lora_b)
    scale = _scaling(scaling)
    p, seed_t = _dropout(dropout_p, training, seed)
    t, ac = _autocast(dict(x=x2d, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b))
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scale, p, seed_t)
    y, _ = _run(_ops.EagerLoRALinear, torch.ops.vfm.lora_linear, x2d, args, ac)
    return _output(y, x)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                magnitude: Tensor, scaling: float, *, dropout_p: float = 0.0, training: bool = True,
                seed: Union[int, Tensor, None] = None) -> Tensor:
    """PEFT's DoRA linear layer (weight-decomposed low-rank adaptation), exactly as PEFT computes it.

    With g = magnitude / ||W + scaling * B A|| (per output row; the norm is detached) and u = D(x)::

        y = x W^T + b + (g - 1) * (u W^T) + g * scaling * (u A^T) B^T   (training with dropout_p > 0)
        y = g * (x W^T) + b + g * scaling * (x A^T) B^T                  (otherwise)

    The first form is PEFT's extra base pass on the dropped input.

    Args:
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, seed: as :func:`lora_linear`.
        magnitude: (out,) DoRA magnitude vector, in the adapter dtype.

    Returns:
        (*, out) in x's dtype.
    """
    x2d, _, out_f, _ = _check_base(x, weight, bias, lora_a, lora_b)
    _check_vector("magnitude", magnitude, out_f, lora_a.dtype, "lora_a")
    _same_devices(x, magnitude=magnitude)
    scale = _scaling(scaling)
    p, seed_t = _dropout(dropout_p, training, seed)
    t, ac = _autocast(dict(x=x2d, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude))
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["magnitude"], scale, p, seed_t)
    y, _, _ = _run(_ops.EagerDoRALinear, torch.ops.vfm.dora_linear, x2d, args, ac)
    return _output(y, x)


def adalora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_e: Tensor,
                   lora_b: Tensor, scaling: float, ranknum: Union[float, Tensor], *, dropout_p: float = 0.0,
                   training: bool = True, seed: Union[int, Tensor, None] = None) -> Tensor:
    """PEFT's AdaLoRA (``SVDLinear``) layer:
    ``y = x W^T + b + (D(x) (A * E)^T B^T) * scaling / (ranknum + 1e-5)``.

    Args:
        x, weight, bias, dropout_p, training, seed: as :func:`lora_linear`.
        lora_a: (r, in) right singular vectors P.
        lora_e: (r, 1) or (r,) singular values Lambda (0 for pruned ranks), adapter dtype.
        lora_b: (out, r) left singular vectors Q.
        scaling: PEFT's ``scaling`` (lora_alpha, or r when lora_alpha is 0).
        ranknum: the current rank budget, a number or PEFT's one-element ``ranknum`` tensor (read on
            the device: no host synchronisation).

    Returns:
        (*, out) in x's dtype.  Every rank is computed, so lora_e gets PEFT's gradient even where
        it is zero (PEFT initialises it to zeros).
    """
    x2d, _, _, rank = _check_base(x, weight, bias, lora_a, lora_b)
    _check_vector("lora_e", lora_e, rank, lora_a.dtype, "lora_a", shapes=[(rank,), (rank, 1)])
    _same_devices(x, lora_e=lora_e)
    scale = _scaling(scaling)
    if isinstance(ranknum, Tensor):
        if not ranknum.is_floating_point() or ranknum.numel() != 1:
            raise TypeError(f"ranknum must be a number or a one-element floating tensor, got {ranknum.dtype} "
                            f"{_shape(ranknum)}")
        rn = ranknum.detach().reshape(1)
        if rn.device != x.device:
            rn = rn.to(x.device)
    else:
        # PEFT's ranknum is the rank r >= 0; a negative one would divide by ranknum + 1e-5 <= 0
        rn = torch.tensor([_require_number("ranknum", ranknum, low=0.0)], dtype=torch.float32, device=x.device)
    p, seed_t = _dropout(dropout_p, training, seed)
    t, ac = _autocast(dict(x=x2d, weight=weight, bias=bias, lora_a=lora_a, lora_e=lora_e.reshape(rank), lora_b=lora_b))
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_e"], t["lora_b"], scale, rn, p, seed_t)
    y, _ = _run(_ops.EagerAdaLoRALinear, torch.ops.vfm.adalora_linear, x2d, args, ac)
    return _output(y, x)


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_stack: Tensor, b_stack: Tensor,
                      scalings: Union[Sequence[float], Tensor], adapter_ids: Tensor, *, dropout_p: float = 0.0,
                      training: bool = True, seed: Union[int, Tensor, None] = None) -> Tensor:
    """Several LoRA adapters in one batch: row i uses adapter ``adapter_ids[i]`` (-1: none).

    ``y_i = x_i W^T + b + scalings[k] * (D(x)_i A_k^T) B_k^T`` with k = adapter_ids[i], forward and
    backward (each adapter's factors get the gradient of its own rows only).  Adapters of
    different ranks are zero-padded to the largest r (zero rows of A, zero columns of B change
    nothing).  The dropout mask is the one :func:`lora_linear` draws for the same seed and x.

    Args:
        x, weight, bias, dropout_p, training, seed: as :func:`lora_linear`.
        a_stack: (K, r, in) the adapters' A factors.
        b_stack: (K, out, r) the adapters' B factors (same dtype as a_stack).
        scalings: K numbers, or a (K,) tensor (no gradient flows to it).
        adapter_ids: (N,) or x.shape[:-1] integer adapter index per row, in [-1, K).

    Returns:
        (*, out) in x's dtype.
    """
    x = _require_tensor("x", x, floating=True)
    a_stack = _require_tensor("a_stack", a_stack, floating=True)
    b_stack = _require_tensor("b_stack", b_stack, floating=True)
    if a_stack.dim() != 3:
        raise ValueError(f"a_stack must have shape (K, r, in_features), got {_shape(a_stack)}")
    if b_stack.dim() != 3 or b_stack.shape[0] != a_stack.shape[0] or b_stack.shape[2] != a_stack.shape[1]:
        raise ValueError(f"b_stack must have shape (K, out_features, r) = ({a_stack.shape[0]}, out, "
                         f"{a_stack.shape[1]}) to match a_stack {_shape(a_stack)}, got {_shape(b_stack)}")
    n_adapters = int(a_stack.shape[0])
    if n_adapters == 0:
        raise ValueError(f"a_stack holds no adapter (shape {_shape(a_stack)}); K must be >= 1")
    if a_stack.shape[1] == 0:
        raise ValueError(f"a_stack has rank r=0 (shape {_shape(a_stack)}); r must be >= 1")
    if isinstance(weight, Tensor) and weight.dim() == 2 and (
            a_stack.shape[2] != weight.shape[1] or b_stack.shape[1] != weight.shape[0]):
        raise ValueError(f"a_stack {_shape(a_stack)} and b_stack {_shape(b_stack)} must be (K, r, in) and "
                         f"(K, out, r) for weight {_shape(weight)} = (out, in)")
    x2d, in_f, out_f, rank = _check_base(x, weight, bias, a_stack[0], b_stack[0])
    ids = _require_tensor("adapter_ids", adapter_ids, floating=False)
    if tuple(ids.shape) not in ((x2d.shape[0],), tuple(x.shape[:-1])):
        shapes = f"({x2d.shape[0]},)" + ("" if x.dim() == 2 else f" or {tuple(x.shape[:-1])}")
        raise ValueError(f"adapter_ids must have shape {shapes} (one per row of x {_shape(x)}), got {_shape(ids)}")
    _same_devices(x, a_stack=a_stack, b_stack=b_stack, adapter_ids=ids)
    ids = ids.reshape(-1).long()
    if not _compiling() and ids.numel():
        bad = (ids < -1) | (ids >= n_adapters)
        msg = f"adapter_ids must lie in [-1, {n_adapters})"
        if ids.device.type != "cpu":  # no host synchronisation off the CPU
            torch._assert_async(~bad.any(), msg)
        elif bool(bad.any()):
            raise ValueError(f"{msg}; got {ids[bad].unique()[:8].tolist()}")
    if isinstance(scalings, Tensor):
        if not scalings.is_floating_point() or tuple(scalings.shape) != (n_adapters,):
            raise ValueError(f"scalings must be a floating tensor of shape ({n_adapters},), got {scalings.dtype} "
                             f"{_shape(scalings)}")
        scales = scalings.detach().to(device=x.device, dtype=torch.float32)
        if not _compiling() and scales.numel():
            msg = "scalings must be finite (no NaN or inf)"
            if scales.device.type != "cpu":  # no host synchronisation off the CPU
                torch._assert_async(torch.isfinite(scales).all(), msg)
            elif not bool(torch.isfinite(scales).all()):
                raise ValueError(f"{msg}, got {scales.tolist()}")
    else:
        if isinstance(scalings, (str, bytes)) or not isinstance(scalings, Iterable):
            raise TypeError(f"scalings must be a sequence of K={n_adapters} numbers or a ({n_adapters},) floating "
                            f"tensor, got {type(scalings).__name__}")
        values = [_scaling(s, f"scalings[{i}]") for i, s in enumerate(scalings)]
        if len(values) != n_adapters:
            raise ValueError(f"scalings has {len(values)} entries but a_stack holds K={n_adapters} adapters")
        scales = torch.tensor(values, dtype=torch.float32, device=x.device)
    p, seed_t = _dropout(dropout_p, training, seed)
    t, ac = _autocast(dict(x=x2d, weight=weight, bias=bias, a_stack=a_stack, b_stack=b_stack))
    args = (t["x"], t["weight"], t["bias"], t["a_stack"], t["b_stack"], scales, ids, p, seed_t)
    y, _ = _run(_ops.EagerLoRALinearMulti, torch.ops.vfm.lora_linear_multi, x2d, args, ac)
    return _output(y, x)


def _lora_linear_multi_prepared(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_stack: Tensor, b_stack: Tensor,
                                scales: Tensor, adapter_ids: Tensor) -> Tensor:
    """:func:`lora_linear_multi` without dropout, for a caller that built and checked every argument
    itself (``vfm.peft``'s mixed-adapter batches: one call per layer and forward, where the public
    function's checks of shapes, dtypes and ids cost more than the kernels at small batches).

    ``scales`` is the (K,) float32 tensor on x's device and ``adapter_ids`` the (N,) int64 one, N =
    rows of x.  Anything that needs more than the kernels' forward (a gradient, autocast, tracing or
    compiling) goes through :func:`lora_linear_multi`, checks included.
    """
    if (not _ops._is_eager_tensor(x) or torch.is_autocast_enabled(x.device.type)
            or not _nothing_to_differentiate((x, weight, bias, a_stack, b_stack))):
        return lora_linear_multi(x, weight, bias, a_stack, b_stack, scales, adapter_ids, dropout_p=0.0, training=False)
    x2d = _rows(x, x.shape[-1])
    y, _ = _ops.kernels(_ops.EagerLoRALinearMulti.OP, x2d).forward(x2d, weight, bias, a_stack, b_stack, scales,
                                                                  adapter_ids, 0.0, _NO_SEED)
    return _output(y, x)
