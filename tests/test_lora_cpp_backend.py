"""The cpp backend of lora_linear (vfm/ops/lora_cpp.py + csrc/cpu/lora_dropout.cpp) against the torch one.

Both backends run through the public ``vfm.ops.lora_api.lora_linear`` (forced with
``vfm.use_backend``) on the same inputs and seed; the registry's call counter proves which ran.
The C++ kernels regenerate the contract's dropout mask, so outputs agree to rounding (a single
flipped mask element would be far outside rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

import vfm
from vfm import _registry
from vfm.ops.lora_api import lora_linear
from vfm.ops.lora_cpp import cpp_available
from vfm.ops.lora_reference import dropout_keep_mask, dropout_threshold

_OK, _WHY = cpp_available()
if not _OK:
    pytest.skip(f"vfm._C lora ops are not available: {_WHY}", allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _inputs(dtype, n_shape, d_in, d_out, r, bias, train_w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n_shape, d_in, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype).requires_grad_(train_w)
    b = torch.randn(d_out, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    a = (torch.randn(r, d_in, generator=g, dtype=dtype) * 0.3).requires_grad_(True)
    bb = (torch.randn(d_out, r, generator=g, dtype=dtype) * 0.3).requires_grad_(True)
    gy = torch.randn(*n_shape, d_out, generator=g, dtype=dtype)
    return x, w, b, a, bb, gy


def _run(backend, tensors, p, seed):
    x, w, b, a, bb, gy = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                          for t in tensors]
    before = _registry.CALLS[("lora_linear", backend)]
    with vfm.use_backend(backend):
        y = lora_linear(x, w, b, a, bb, 0.7, dropout_p=p, training=True, seed=seed)
        y.backward(gy)
    assert _registry.CALLS[("lora_linear", backend)] >= before + 2  # forward and backward
    grads = {name: t.grad for name, t in zip("x w b a bb".split(), (x, w, b, a, bb))
             if t is not None and t.requires_grad}
    return y.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n_shape,bias,train_w", [((11,), True, False), ((3, 5), False, True), ((11,), True, True)])
def test_cpp_matches_torch(dtype, p, n_shape, bias, train_w):
    tensors = _inputs(dtype, n_shape, 37, 29, 3, bias, train_w)
    y_t, g_t = _run("torch", tensors, p, seed=1234)
    y_c, g_c = _run("cpp", tensors, p, seed=1234)
    torch.testing.assert_close(y_c, y_t, **TOL[dtype])
    assert g_c.keys() == g_t.keys()
    for name in g_t:
        torch.testing.assert_close(g_c[name], g_t[name], **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("seed", [0, 7, (1 << 40) + 3])
def test_cpp_mask_is_the_contract_mask(seed):
    """xa from the C++ kernel with A = identity rows is D(x) itself: compare with the reference mask."""
    n, d_in, p = 13, 41, 0.45
    x = torch.randn(n, d_in, dtype=torch.float64) + 3.0  # never zero, so zeros mean dropped
    a = torch.eye(d_in, dtype=torch.float64)
    xa = torch.ops.vfm_C.lora_dropout_xa(x, a, seed, dropout_threshold(p), 1.0 / (1.0 - p))
    keep = dropout_keep_mask(seed, n, d_in, p)
    assert torch.equal(xa != 0, keep)
    torch.testing.assert_close(xa[keep], x[keep] / (1.0 - p))


def test_cpp_strided_rows_and_large_sizes():
    """x with a row stride (a column slice) and sizes with several OpenMP blocks."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(300, 530, generator=g)
    x = big[:, 7:520]
    assert x.stride(1) == 1 and not x.is_contiguous()
    tensors = (x, torch.randn(65, 513, generator=g), torch.randn(65, generator=g),
               torch.randn(16, 513, generator=g) * 0.1, torch.randn(65, 16, generator=g) * 0.1,
               torch.randn(300, 65, generator=g))
    tensors = tuple(t.requires_grad_(True) if i != 5 else t for i, t in enumerate(tensors))
    y_t, g_t = _run("torch", tensors, 0.1, seed=99)
    assert tensors[0].grad is None
    y_c, g_c = _run("cpp", tensors, 0.1, seed=99)
    torch.testing.assert_close(y_c, y_t, rtol=1e-5, atol=1e-4)
    for name in g_t:
        torch.testing.assert_close(g_c[name], g_t[name], rtol=1e-5, atol=1e-4)


def test_registry_prefers_cpp_on_cpu():
    assert vfm.available_backends("lora_linear", "cpu")[0] == "cpp"


def test_forced_cpp_refuses_half_precision_and_auto_choice_uses_torch():
    import vfm
    from vfm import _registry

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(6, 8, dtype=torch.bfloat16)
    a = torch.randn(2, 8, dtype=torch.bfloat16)
    b = torch.randn(6, 2, dtype=torch.bfloat16)
    with vfm.use_backend("cpp"):
        with pytest.raises(vfm.BackendUnavailableError, match="bfloat16"):
            vfm.functional.lora_linear(x, w, None, a, b, 2.0)
    before = _registry.CALLS[("lora_linear", "torch")]
    vfm.functional.lora_linear(x, w, None, a, b, 2.0)
    assert _registry.CALLS[("lora_linear", "torch")] == before + 1
