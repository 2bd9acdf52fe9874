"""The ``cuda`` backend of knowledge_cross_entropy (csrc/cuda/kce_kernel.cu) against the reference.

Marked ``gpu`` (skipped without CUDA); also skipped when vfm._C was built without CUDA, with the
reason.  Every option case of kce_cases.py in fp32 / fp16 / bf16 at V = 5, 4099, 70000 (> 65536)
and 128256, loss, parts and gradient; non-contiguous and misaligned rows, in-place gradient,
all-ignored batches, float64, a teacher in another dtype, and the registry's call counter proves the
CUDA kernel ran.  benches/gpu_check.sh runs these after building the extension with CUDA.
"""

from __future__ import annotations

import pytest
import torch

import vfm
from vfm import _registry
from kce_cases import CASES, make_inputs

pytestmark = pytest.mark.gpu
OP = "knowledge_cross_entropy"
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-3), torch.bfloat16: (2e-4, 1.6e-2),
       torch.float64: (1e-6, 1e-6)}  # fp64: the kernels take fp32 per-row scales, the reference fp64 ones
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VOCABS = (5, 4099, 70000, 128256)


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    why = _registry.unavailable_reasons(OP, "cuda").get("cuda")
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")


def _to_cuda(opts):
    out = {}
    for key, value in opts.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.cuda()
        elif isinstance(value, tuple):
            out[key] = tuple(t.cuda() for t in value)
        else:
            out[key] = value
    return out


def _run(backend, logits, target, opts, inplace=False):
    """(loss, parts, grad) of one call under ``backend``; logits are not modified."""
    x = logits.detach().clone().requires_grad_()
    before = _registry.CALLS[(OP, backend)]
    with vfm.use_backend(backend):
        if inplace:
            z = x * 1  # a non-leaf the in-place gradient may overwrite
            out = vfm.functional.knowledge_cross_entropy(z, target, return_parts=True, inplace_backward=True, **opts)
            grad = torch.autograd.grad(out.loss, z)[0]
        else:
            out = vfm.functional.knowledge_cross_entropy(x, target, return_parts=True, **opts)
            out.loss.backward()
            grad = x.grad
    assert _registry.CALLS[(OP, backend)] == before + 1, f"the {backend} kernel did not run"
    parts = torch.stack([out.loss, out.ce, out.kd, out.penalty, out.z_loss]).detach()
    return parts, out.n_outside_allowed, grad


def _compare(logits, target, opts, dtype, inplace=False):
    p1, n1, g1 = _run("cuda", logits, target, opts, inplace)
    p0, n0, g0 = _run("torch", logits, target, opts)
    rtol, gtol = TOL[dtype]
    torch.testing.assert_close(p1, p0, rtol=rtol, atol=rtol)
    torch.testing.assert_close(n1.to(n0.dtype), n0)
    scale = g0.abs().max().item() or 1.0
    assert g1.dtype == g0.dtype and g1.shape == g0.shape
    torch.testing.assert_close(g1.double(), g0.double(), rtol=0, atol=gtol * scale)


MATRIX = [(c, d, v) for c in sorted(CASES) for d in DTYPES for v in VOCABS]


@pytest.mark.parametrize("case,dtype,vocab", MATRIX, ids=[f"{c}-{str(d)[6:]}-{v}" for c, d, v in MATRIX])
def test_every_option_dtype_and_vocab(case, dtype, vocab):
    logits, target, opts = make_inputs(CASES[case], 37, vocab, dtype=dtype, seed=vocab + len(case))
    _compare(logits.cuda(), target.cuda(), _to_cuda(opts), dtype)


@pytest.mark.parametrize("case", ["ce", "kl_t2", "topk", "mass_grouped", "everything"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward(case, dtype):
    logits, target, opts = make_inputs(CASES[case], 29, 4099, dtype=dtype, seed=3)
    _compare(logits.cuda(), target.cuda(), _to_cuda(opts), dtype, inplace=True)


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_misaligned_rows(offset, dtype):
    """Rows of a wider tensor (row stride > V), starting off the 16-byte grid when offset > 0."""
    n, v = 23, 4096
    logits, target, opts = make_inputs(CASES["everything"], n, v + 8, dtype=dtype, seed=11)
    teacher = opts["teacher_logits"]
    wide = logits.cuda()
    opts = _to_cuda(opts)
    opts["teacher_logits"] = teacher.cuda()[:, 2:2 + v]  # a different 16-byte phase than the logits
    gm, gid = opts["allowed"]
    opts["allowed"] = (gm[:, :v], gid)
    opts["weight"] = opts["weight"][:v]
    target = target.cuda().clamp(max=v - 1)
    _compare(wide[:, offset:offset + v], target, opts, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored_batch_gives_zero_loss_and_gradient(dtype):
    logits = (torch.randn(9, 70000) * 3).to(dtype).cuda()
    target = torch.full((9,), -100, device="cuda")
    parts, _, grad = _run("cuda", logits, target, {})
    assert torch.all(parts == 0)
    assert torch.all(grad == 0)


def test_float64_logits():
    logits, target, opts = make_inputs(CASES["everything"], 17, 4099, dtype=torch.float64, seed=5)
    _compare(logits.cuda(), target.cuda(), _to_cuda(opts), torch.float64)


def test_teacher_in_another_dtype():
    logits, target, opts = make_inputs(CASES["kl_t2"], 17, 70000, dtype=torch.bfloat16, seed=6,
                                       teacher_dtype=torch.float32)
    _compare(logits.cuda(), target.cuda(), _to_cuda(opts), torch.bfloat16)


def test_nan_in_a_counted_row_propagates_and_other_rows_stay_finite():
    logits, target, _ = make_inputs(CASES["ce"], 8, 4099, seed=9, ignore_frac=0.0)
    logits[3, 17] = float("nan")
    x = logits.cuda().requires_grad_()
    with vfm.use_backend("cuda"):
        loss = vfm.functional.knowledge_cross_entropy(x, target.cuda(), reduction="none")
        loss.sum().backward()
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(8, device="cuda") != 3]).all()
    assert torch.isnan(x.grad[3]).any() and torch.isfinite(x.grad[:3]).all()


def test_kernel_rejects_bad_input_with_a_clear_error():
    logits = torch.randn(4, 10, device="cuda")
    target = torch.zeros(4, dtype=torch.int32, device="cuda")  # int32, the op wants int64
    scales = torch.ones(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="target must be"):
        torch.ops.vfm_C.kce_forward(logits, target, None, None, None, None, None, None, scales, None,
                                    -100, 0.0, 0.0, 1.0, 0, 0.5, 0, float("inf"), True, False)
