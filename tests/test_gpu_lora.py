"""GPU checks of the triton low-rank backend (marked ``gpu``; skipped without CUDA).

bf16 / fp16 ``tl.dot`` can only be verified on a GPU (the interpreter computes it wrongly), so
these run the compiled kernels at benchmark-like shapes (N = 8192, 4096 x 4096 and 4096 x 14336,
r = 16; multi-adapter K = 4 / 16 / 64) and compare each output and gradient with the torch
reference computed in fp32 from the same (rounded) inputs: the triton backend's relative error must
be no worse than twice the torch backend's own error in the same half-precision dtype (plus a small
floor).  Run with ``VFM_TEST_GPU=1 python -m pytest tests/test_gpu_lora.py -m gpu`` (benches/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch

import vfm
from vfm import _registry
from vfm.ops.lora_api import adalora_linear, dora_linear, lora_linear, lora_linear_multi

pytestmark = pytest.mark.gpu

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(op, backend, fn, tensors, grad_flags, extra, kwargs, grad_y):
    """fn(*tensors, *extra, **kwargs) under ``backend``, backpropagating grad_y; [y, grads...] in fp32."""
    args = [None if t is None else t.detach().clone().requires_grad_(f) for t, f in zip(tensors, grad_flags)]
    before = _registry.CALLS[(op, backend)]
    with vfm.use_backend(backend):
        y = fn(*args, *extra, **kwargs)
        y.backward(grad_y)
    torch.cuda.synchronize()
    assert _registry.CALLS[(op, backend)] >= before + 2, f"{backend} did not run forward and backward"
    return [y.detach().float()] + [a.grad.float() for a, f in zip(args, grad_flags) if a is not None and f]


def _check(op, fn, tensors, grad_flags, extra, kwargs, grad_y, base_dtype, adapter_dtype, n_adapter_tensors):
    """Compare the triton backend with torch, both in (base_dtype, adapter_dtype), against torch in fp32.

    tensors: the base tensors (x, weight, bias) first, then ``n_adapter_tensors`` adapter tensors.
    The inputs are rounded to the test dtypes once, so the fp32 reference sees the same numbers.
    """
    n_base = len(tensors) - n_adapter_tensors
    dtypes = [base_dtype] * n_base + [adapter_dtype] * n_adapter_tensors
    low = [None if t is None else t.to(d) for t, d in zip(tensors, dtypes)]
    exact_in = [None if t is None else t.float() for t in low]
    gy_low = grad_y.to(base_dtype)
    exact = _run(op, "torch", fn, exact_in, grad_flags, extra, kwargs, gy_low.float())
    ref = _run(op, "torch", fn, low, grad_flags, extra, kwargs, gy_low)
    got = _run(op, "triton", fn, low, grad_flags, extra, kwargs, gy_low)
    floor = FLOOR[base_dtype if base_dtype != torch.float32 else adapter_dtype]
    for i, (e, r, g) in enumerate(zip(exact, ref, got)):
        err_ref, err_got = _rel(r, e), _rel(g, e)
        assert err_got <= 2 * err_ref + floor, f"output {i}: triton rel. error {err_got:.3e}, torch {err_ref:.3e}"


def _factors(n, d_in, d_out, r, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d_in, device=device, generator=g)
    w = torch.randn(d_out, d_in, device=device, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, device=device, generator=g) * 0.1
    a = torch.randn(r, d_in, device=device, generator=g) / d_in ** 0.5
    bb = torch.randn(d_out, r, device=device, generator=g) * 0.1
    gy = torch.randn(n, d_out, device=device, generator=g)
    return x, w, b, a, bb, gy


SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (1031, 1000, 517)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("n,d_in,d_out", SHAPES)
def test_gpu_lora(dtype, p, n, d_in, d_out):
    x, w, b, a, bb, gy = _factors(n, d_in, d_out, 16, seed=n + d_out)
    _check("lora_linear", lora_linear, [x, w, b, a, bb], [True, False, True, True, True], [2.0],
           dict(dropout_p=p, seed=11), gy, dtype, dtype, 2)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_lora_base_output_first(p, monkeypatch):
    monkeypatch.setenv("VFM_LORA_BASE_ACCUMULATES", "0")
    x, w, b, a, bb, gy = _factors(8192, 4096, 4096, 16, seed=4)
    _check("lora_linear", lora_linear, [x, w, b, a, bb], [True, False, True, True, True], [2.0],
           dict(dropout_p=p, seed=11), gy, torch.bfloat16, torch.bfloat16, 2)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_lora_bf16_base_fp32_adapter_and_fp32(p):
    x, w, b, a, bb, gy = _factors(4099, 1024, 1536, 16, seed=3)
    _check("lora_linear", lora_linear, [x, w, b, a, bb], [True, True, True, True, True], [2.0],
           dict(dropout_p=p, seed=5), gy, torch.bfloat16, torch.float32, 2)
    _check("lora_linear", lora_linear, [x, w, b, a, bb], [True, True, True, True, True], [2.0],
           dict(dropout_p=p, seed=5), gy, torch.float32, torch.float32, 2)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_dora_bf16(p):
    x, w, b, a, bb, gy = _factors(8192, 4096, 4096, 16, seed=7)
    mag = torch.linalg.vector_norm(w, dim=1) * (1 + 0.1 * torch.rand(4096, device="cuda"))
    _check("dora_linear", dora_linear, [x, w, b, a, bb, mag], [True, False, True, True, True, True], [2.0],
           dict(dropout_p=p, seed=9), gy, torch.bfloat16, torch.bfloat16, 3)


@pytest.mark.parametrize("zero_columns", [False, True])
def test_gpu_dora_bf16_no_bias_magnitude_grad_from_the_output(zero_columns):
    """bf16 without a bias (the benchmark's case): grad_magnitude from the output, and with some zero
    magnitudes the per-column kernel fills those columns in (no host sync)."""
    x, w, _, a, bb, gy = _factors(4099, 1024, 1536, 16, seed=13)
    mag = torch.linalg.vector_norm(w, dim=1) * (1 + 0.1 * torch.rand(1536, device="cuda"))
    if zero_columns:
        mag[[0, 700, 1535]] = 0.0
    _check("dora_linear", dora_linear, [x, w, None, a, bb, mag], [True, False, False, True, True, True], [2.0],
           dict(dropout_p=0.0, seed=9), gy, torch.bfloat16, torch.bfloat16, 3)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_adalora_bf16(p):
    x, w, b, a, bb, gy = _factors(8192, 4096, 4096, 16, seed=8)
    e = torch.randn(16, device="cuda")
    e[::3] = 0.0  # masked ranks
    rn = torch.tensor([11.0], device="cuda")
    _check("adalora_linear", adalora_linear, [x, w, b, a, e, bb], [True, False, True, True, True, True],
           [32.0, rn], dict(dropout_p=p, seed=9), gy, torch.bfloat16, torch.bfloat16, 3)


@pytest.mark.parametrize("k", [4, 16, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_multi_bf16(k, p):
    n, d = 8192, 4096
    x, w, b, _, _, gy = _factors(n, d, d, 16, seed=k)
    g = torch.Generator(device="cuda").manual_seed(k + 1)
    a_stack = torch.randn(k, 16, d, device="cuda", generator=g) / d ** 0.5
    b_stack = torch.randn(k, d, 16, device="cuda", generator=g) * 0.1
    ids = torch.randint(-1, k, (n,), device="cuda", generator=g)
    scalings = torch.rand(k, device="cuda") + 0.5
    _check("lora_linear_multi", lora_linear_multi, [x, w, b, a_stack, b_stack], [True, False, True, True, True],
           [scalings, ids], dict(dropout_p=p, seed=13), gy, torch.bfloat16, torch.bfloat16, 2)


def test_gpu_triton_is_the_automatic_choice_on_cuda():
    for op in ("lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi"):
        assert vfm.available_backends(op, "cuda")[0] in ("triton", "cuda")
