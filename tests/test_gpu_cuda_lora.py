"""The ``cuda`` backend of lora_linear / lora_linear_multi (csrc/cuda/lora_kernels.cu) against torch.

Marked ``gpu`` (skipped without CUDA, and when vfm._C was built without CUDA, with the reason).
The dropout kernel must reproduce the reference mask bit for bit; the shrink/expand kernels are
checked against plain einsum products; the public ops forward and backward against the torch
backend in fp32 / fp16 / bf16 (and fp32 adapters on a bf16 base), with and without dropout, and
for the multi-adapter op with ids including -1 and adapters of different (padded) ranks.
"""

from __future__ import annotations

import pytest
import torch

import vfm
from vfm import _registry
from vfm.ops.lora_api import lora_linear, lora_linear_multi
from vfm.ops.lora_reference import apply_dropout, dropout_threshold

pytestmark = pytest.mark.gpu
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    why = _registry.unavailable_reasons("lora_linear", "cuda").get("cuda")
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                     (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float64, torch.float64)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kernel_matches_reference_mask_exactly(src, dst, p):
    x = torch.randn(67, 301, generator=_gen(1)).to(src).cuda()
    wide = torch.randn(67, 320, generator=_gen(2)).to(src).cuda()[:, 5:306]  # a row stride != C
    seed = 0x1234_5678_9ABC
    for v in (x, wide):
        got = torch.ops.vfm_C.lora_cuda_dropout(v, dst, seed, dropout_threshold(p), 1.0 / (1.0 - p))
        want = apply_dropout(v.to(dst), seed, p)
        assert got.dtype == dst
        assert torch.equal(got, want)


def test_dropout_offsets_above_2_32():
    """N * C > 2^32: the high word of the offset enters the hash (checked on the last rows)."""
    n, c = (1 << 21) + 3, 2048  # 4.3e9 elements of fp16 (8.6 GB)
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GB")
    x = torch.ones(n, c, dtype=torch.float16, device="cuda")
    seed, p = 99, 0.5
    got = torch.ops.vfm_C.lora_cuda_dropout(x, torch.float16, seed, dropout_threshold(p), 2.0)
    tail = got[-5:]
    from vfm.ops.lora_reference import dropout_keep_mask

    keep = dropout_keep_mask(seed, 5, c, p, device="cuda", row0=n - 5)
    assert torch.equal(tail, torch.where(keep, 2.0, 0.0).to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ids", [False, True])
def test_shrink_and_expand_kernels_against_einsum(dtype, with_ids):
    n, c, r, k = 53, 2500, 19, 3
    g = _gen(3)
    src = torch.randn(n, c, generator=g).to(dtype).cuda()
    mats = torch.randn(k if with_ids else 1, r, c, generator=g).to(dtype).cuda()
    ids = torch.randint(-1, k, (n,), generator=g).cuda() if with_ids else None
    scales = (torch.rand(k, generator=g) + 0.5).cuda() if with_ids else None
    k_of = ids.clamp_min(0) if with_ids else torch.zeros(n, dtype=torch.long, device="cuda")
    s_of = scales[k_of] if with_ids else torch.ones(n, device="cuda")
    live = (ids >= 0) if with_ids else torch.ones(n, dtype=torch.bool, device="cuda")
    m_rows = mats[k_of].float()  # (n, r, c)
    # shrink: out_i = 0.5 * s_k * src_i M_k^T
    out = torch.ops.vfm_C.lora_cuda_shrink(src, mats if with_ids else mats[0], ids, scales, 0.5, 0, 0, 1.0)
    want = torch.einsum("nc,nrc->nr", src.float(), m_rows) * (0.5 * s_of)[:, None] * live[:, None]
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(out.float(), want, **tol)
    # expand: base_i += s_k * coef_i M_k
    coef = torch.randn(n, r, generator=g).to(dtype).cuda()
    base = torch.randn(n, c, generator=g).to(dtype).cuda()
    y = base.clone()
    torch.ops.vfm_C.lora_cuda_expand_(y, coef, mats if with_ids else mats[0], ids, scales, 1.0, 0, 0, 1.0)
    want = base.float() + torch.einsum("nr,nrc->nc", coef.float(), m_rows) * s_of[:, None] * live[:, None]
    torch.testing.assert_close(y.float(), want, **tol)


def _run(op, backend, fn, args, kwargs, grad_y):
    before = _registry.CALLS[(op, backend)]
    with vfm.use_backend(backend):
        y = fn(*args, **kwargs)
        y.backward(grad_y)
    assert _registry.CALLS[(op, backend)] >= before + 2, "forward and backward must both run on this backend"
    return y.detach(), [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _compare(op, fn, make_args, kwargs, grad_y, tol):
    y_t, g_t = _run(op, "torch", fn, make_args(), kwargs, grad_y)
    y_k, g_k = _run(op, "cuda", fn, make_args(), kwargs, grad_y)
    torch.testing.assert_close(y_k.float(), y_t.float(), **tol)
    assert len(g_k) == len(g_t)
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert a is not None and a.dtype == b.dtype, f"gradient {i}"
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol, msg=lambda m: f"gradient {i}: {m}")


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("base,adt", DTYPE_PAIRS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_matches_torch(base, adt, p):
    n, fin, fout, r = 77, 300, 129, 12
    g = _gen(4)
    tensors = [torch.randn(n, fin, generator=g), torch.randn(fout, fin, generator=g) * 0.1,
               torch.randn(fout, generator=g), torch.randn(r, fin, generator=g) * 0.1,
               torch.randn(fout, r, generator=g) * 0.1]
    dts = [base, base, base, adt, adt]
    grad_y = torch.randn(n, fout, generator=g).to(base).cuda()

    def make_args():
        x, w, b, a, bb = (t.to(d).cuda().requires_grad_() for t, d in zip(tensors, dts))
        return x, w, b, a, bb, 0.7

    _compare("lora_linear", lora_linear, make_args, dict(dropout_p=p, seed=1234), grad_y, TOL[base])


@pytest.mark.parametrize("base,adt", DTYPE_PAIRS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_multi_matches_torch(base, adt, p):
    n, fin, fout, r, k = 91, 257, 130, 16, 3
    g = _gen(5)
    a_stack = torch.randn(k, r, fin, generator=g) * 0.1
    b_stack = torch.randn(k, fout, r, generator=g) * 0.1
    a_stack[1, 8:] = 0  # adapter 1 has rank 8, zero-padded to 16
    b_stack[1, :, 8:] = 0
    ids = torch.randint(-1, k, (n,), generator=g)
    ids[:4] = torch.tensor([-1, 0, 1, 2])
    tensors = [torch.randn(n, fin, generator=g), torch.randn(fout, fin, generator=g) * 0.1,
               torch.randn(fout, generator=g), a_stack, b_stack]
    dts = [base, base, base, adt, adt]
    grad_y = torch.randn(n, fout, generator=g).to(base).cuda()

    def make_args():
        x, w, b, a, bb = (t.to(d).cuda().requires_grad_() for t, d in zip(tensors, dts))
        return x, w, b, a, bb, [0.5, 2.0, 1.0], ids.cuda()

    _compare("lora_linear_multi", lora_linear_multi, make_args, dict(dropout_p=p, seed=77), grad_y, TOL[base])


def test_multi_with_every_row_unadapted_is_the_base_layer():
    n, fin, fout, r, k = 10, 64, 32, 4, 2
    x = torch.randn(n, fin, device="cuda", requires_grad=True)
    w = torch.randn(fout, fin, device="cuda")
    a = torch.randn(k, r, fin, device="cuda", requires_grad=True)
    b = torch.randn(k, fout, r, device="cuda", requires_grad=True)
    ids = torch.full((n,), -1, device="cuda")
    with vfm.use_backend("cuda"):
        y = lora_linear_multi(x, w, None, a, b, [1.0, 1.0], ids, dropout_p=0.5, seed=3)
        y.sum().backward()
    torch.testing.assert_close(y, x.detach() @ w.t())
    assert torch.all(a.grad == 0) and torch.all(b.grad == 0)
