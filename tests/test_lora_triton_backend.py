"""The triton backend of the low-rank ops (vfm/ops/lora_triton.py + kernels/lora*.py) against the torch one.

Runs the Triton kernels under the CPU interpreter (TRITON_INTERPRET=1, set by conftest), in fp32
(the interpreter computes bf16 ``tl.dot`` wrongly; bf16 / fp16 checks are in test_gpu_lora.py).
Both backends run through the public functions, forced with ``vfm.use_backend``, on the same inputs
and seed; the registry's call counter proves the triton backend really ran, forward and backward.
Shapes are small and odd (N, in, out, r not multiples of any block); the kernels regenerate the
contract's dropout mask, so a single flipped mask element would be far outside the tolerances.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

import vfm
from vfm import _registry
from vfm.ops.lora_api import adalora_linear, dora_linear, lora_linear, lora_linear_multi
from vfm.ops.lora_reference import apply_dropout, dropout_hash, dropout_keep_mask, dropout_threshold

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) or a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from vfm.kernels.lora import _dropout  # noqa: E402

DEV = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
TOL = dict(rtol=1e-4, atol=1e-4)


def _leaf(t, grad):
    return None if t is None else t.detach().clone().to(DEV).requires_grad_(grad)


def _run(op, backend, fn, args, kwargs, grad_y):
    """Call fn under ``backend`` and backpropagate grad_y; returns (y, {argument index: grad})."""
    before = _registry.CALLS[(op, backend)]
    with vfm.use_backend(backend):
        y = fn(*args, **kwargs)
        y.backward(grad_y)
    assert _registry.CALLS[(op, backend)] >= before + 2, "forward and backward must both run on this backend"
    grads = {i: a.grad for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad}
    return y.detach(), grads


def _compare(op, fn, make_args, kwargs, grad_y, tol=TOL):
    y_t, g_t = _run(op, "torch", fn, make_args(), kwargs, grad_y)
    y_k, g_k = _run(op, "triton", fn, make_args(), kwargs, grad_y)
    torch.testing.assert_close(y_k, y_t, **tol)
    assert g_k.keys() == g_t.keys()
    for i in g_t:
        assert g_k[i] is not None, f"argument {i}: no gradient from the triton backend"
        torch.testing.assert_close(g_k[i], g_t[i], **tol, msg=lambda m: f"gradient of argument {i}: {m}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _base(n_shape, d_in, d_out, r, seed, dtype=torch.float32, adt=torch.float32):
    g = _gen(seed)
    x = torch.randn(*n_shape, d_in, generator=g).to(dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype)
    a = (torch.randn(r, d_in, generator=g) * 0.3).to(adt)
    bb = (torch.randn(d_out, r, generator=g) * 0.3).to(adt)
    gy = torch.randn(*n_shape, d_out, generator=g).to(dtype)
    return x, w, b, a, bb, gy


# ------------------------------------------------------------------------------- LoRA --
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n_shape,bias,train_w", [((37,), True, False), ((3, 5), False, True)])
def test_lora_matches_torch(p, n_shape, bias, train_w):
    x, w, b, a, bb, gy = _base(n_shape, 45, 29, 3, seed=1)
    make = lambda: (_leaf(x, True), _leaf(w, train_w), _leaf(b, True) if bias else None,  # noqa: E731
                    _leaf(a, True), _leaf(bb, True), 0.7)
    _compare("lora_linear", lora_linear, make, dict(dropout_p=p, seed=1234), gy.to(DEV))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_base_output_first_order(p, monkeypatch):
    """VFM_LORA_BASE_ACCUMULATES=0: base GEMM first, low-rank term added after (the default is the reverse)."""
    monkeypatch.setenv("VFM_LORA_BASE_ACCUMULATES", "0")
    x, w, b, a, bb, gy = _base((21,), 30, 19, 4, seed=14)
    make = lambda: (_leaf(x, True), _leaf(w, True), _leaf(b, True), _leaf(a, True), _leaf(bb, True), 0.9)  # noqa
    _compare("lora_linear", lora_linear, make, dict(dropout_p=p, seed=8), gy.to(DEV))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_bf16_base_fp32_adapter(p):
    """Mixed dtypes: the kernels cast x / grad_y on load (no cast copies) and add in fp32 (expand kernel)."""
    x, w, b, a, bb, gy = _base((33,), 40, 27, 5, seed=2, dtype=torch.bfloat16)
    make = lambda: (_leaf(x, True), _leaf(w, False), _leaf(b, True), _leaf(a, True), _leaf(bb, True), 2.0)  # noqa
    _compare("lora_linear", lora_linear, make, dict(dropout_p=p, seed=77), gy.to(DEV),
             tol=dict(rtol=1.6e-2, atol=2e-2))


def test_lora_strided_inputs_and_transposed_weight():
    """x a column slice (row stride != in), weight a transposed view (fan_in_fan_out), grad_y expanded."""
    g = _gen(3)
    big = torch.randn(70, 60, generator=g)
    w_t = torch.randn(41, 23, generator=g) * 0.2  # (in, out): weight = w_t.t()
    a = torch.randn(4, 41, generator=g) * 0.3
    bb = torch.randn(23, 4, generator=g) * 0.3
    bias = torch.randn(23, generator=g)

    def make():
        xs = big.to(DEV)[:, 5:46].detach().requires_grad_(True)
        assert xs.stride(1) == 1 and not xs.is_contiguous()
        weight = _leaf(w_t, True).t()
        weight.retain_grad()  # its gradient, compared below, is the transposed view's
        return (xs, weight, _leaf(bias, True), _leaf(a, True), _leaf(bb, True), 0.5)

    grad_y = torch.randn(1, 23, generator=g).to(DEV).expand(70, 23)  # stride 0 rows
    _compare("lora_linear", lora_linear, make, dict(dropout_p=0.25, seed=5), grad_y)


# ------------------------------------------------------------------------------- DoRA --
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("train_w", [False, True])
def test_dora_matches_torch(p, train_w):
    x, w, b, a, bb, gy = _base((35,), 38, 31, 3, seed=4)
    mag = torch.rand(31, generator=_gen(5)) + 0.5
    make = lambda: (_leaf(x, True), _leaf(w, train_w), _leaf(b, True), _leaf(a, True), _leaf(bb, True),  # noqa
                    _leaf(mag, True), 1.5)
    _compare("dora_linear", dora_linear, make, dict(dropout_p=p, seed=99), gy.to(DEV))


def test_dora_weight_norm_kernel_transposed_weight():
    """The one-pass weight norm reads any weight layout (PEFT's fan_in_fan_out keeps W transposed)."""
    from vfm.kernels.lora_dora import dora_weight_norm as norm_kernel
    from vfm.ops.lora_reference import dora_weight_norm as norm_ref

    g = _gen(12)
    w = torch.randn(45, 70, generator=g).t()  # (out=70, in=45), a transposed view
    a, b = torch.randn(5, 45, generator=g), torch.randn(70, 5, generator=g)
    got = norm_kernel(w.to(DEV), a.to(DEV), b.to(DEV), 0.8).cpu()
    torch.testing.assert_close(got, norm_ref(w, a, b, 0.8), rtol=1e-5, atol=1e-5)
    plain = torch.linalg.vector_norm(w + 0.8 * b @ a, dim=1)  # independent of both
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zeros", [[], [0], [3, 69], list(range(70))])
def test_dora_zero_magnitude_kernel_fills_only_zero_columns(zeros):
    """dora_zero_magnitude_grad_ writes sum_i grad_y[i, j] * (x W^T + scale * xa B^T)[i, j] / wn[j] for the
    columns of a zero magnitude (float64 formula on the same inputs), and leaves every other entry as it
    was; x is a transposed view, and N and in are not multiples of the kernel's blocks."""
    from vfm.kernels.lora_dora import dora_zero_magnitude_grad_

    g = _gen(21)
    n, d_in, d_out, r = 131, 75, 70, 5
    x = torch.randn(d_in, n, generator=g).t()  # (N, in), stride(1) != 1
    w, a = torch.randn(d_out, d_in, generator=g), torch.randn(r, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g)
    gy, wn = torch.randn(n, d_out, generator=g), torch.rand(d_out, generator=g) + 0.5
    mag = torch.rand(d_out, generator=g) + 0.5
    mag[zeros] = 0.0
    xa = x @ a.t()
    sentinel = torch.full((d_out,), 123.0)
    got = dora_zero_magnitude_grad_(sentinel.clone().to(DEV), mag.to(DEV), gy.to(DEV), x.to(DEV), w.to(DEV),
                                    xa.to(DEV), b.to(DEV), 0.7, wn.to(DEV)).cpu()
    want = sentinel.clone().double()
    full = (gy.double() * (x.double() @ w.double().t() + 0.7 * xa.double() @ b.double().t())).sum(0) / wn.double()
    want[zeros] = full[zeros]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- AdaLoRA --
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_adalora_matches_torch_with_masked_ranks(p):
    """Ranks whose lora_e is 0 still get lora_e's gradient (PEFT initialises lora_E to zeros)."""
    x, w, b, a, bb, gy = _base((3, 13), 37, 26, 6, seed=6)
    e = torch.randn(6, generator=_gen(7))
    e[1] = e[4] = 0.0
    rn = torch.tensor([5.0])
    make = lambda: (_leaf(x, True), _leaf(w, False), _leaf(b, True), _leaf(a, True), _leaf(e, True),  # noqa
                    _leaf(bb, True), 12.0, rn.to(DEV))
    _compare("adalora_linear", adalora_linear, make, dict(dropout_p=p, seed=3), gy.to(DEV))
    # an independent check of the masked ranks' lora_e gradient: d/dE_k of sum(gy * y)
    with vfm.use_backend("triton"):
        args = make()
        adalora_linear(*args, dropout_p=p, seed=3).backward(gy.to(DEV))
    assert args[4].grad[1] != 0 and args[4].grad[4] != 0


# ---------------------------------------------------------------------- multi-adapter --
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("ids_kind", ["mixed", "one_adapter_many_rows", "all_none"])
def test_multi_matches_torch(p, ids_kind):
    n, k = 75, 5
    x, w, b, _, _, gy = _base((n,), 43, 30, 3, seed=8)
    g = _gen(9)
    a_stack = torch.randn(k, 3, 43, generator=g) * 0.3
    b_stack = torch.randn(k, 30, 3, generator=g) * 0.3
    if ids_kind == "mixed":  # unsorted, -1 rows, adapter 3 without rows
        ids = torch.randint(-1, k, (n,), generator=g)
        ids[ids == 3] = 1
    elif ids_kind == "one_adapter_many_rows":  # > 2 row tiles of one adapter
        ids = torch.full((n,), 2)
        ids[::7] = -1
        ids[5] = 4
    else:
        ids = torch.full((n,), -1)
    scalings = [0.5, 1.0, 2.0, 0.25, 3.0]
    make = lambda: (_leaf(x, True), _leaf(w, True), _leaf(b, True), _leaf(a_stack, True),  # noqa
                    _leaf(b_stack, True), scalings, ids.to(DEV))
    _compare("lora_linear_multi", lora_linear_multi, make, dict(dropout_p=p, seed=21), gy.to(DEV))


def test_multi_gradients_reach_only_used_adapters():
    n, k = 40, 4
    x, w, b, _, _, gy = _base((n,), 20, 18, 2, seed=10)
    a_stack = torch.randn(k, 2, 20) * 0.3
    b_stack = torch.randn(k, 18, 2) * 0.3
    ids = torch.tensor([0, 2] * 20)
    with vfm.use_backend("triton"):
        args = (_leaf(x, True), _leaf(w, False), None, _leaf(a_stack, True), _leaf(b_stack, True),
                [1.0] * k, ids.to(DEV))
        lora_linear_multi(*args, dropout_p=0.1, seed=4).backward(gy.to(DEV))
    for idx in (3, 4):
        grad = args[idx].grad
        assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0
        assert torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[2]) > 0


def test_segments_cover_each_adapters_rows_once():
    from vfm.kernels.lora_multi import segment_rows

    ids = torch.tensor([3, -1, 0, 3, 3, 0, -1, 1, 3, 3, 3, 0, 3], dtype=torch.int64)
    segs = segment_rows(ids, 5, block_m=2)
    seen = {k: [] for k in range(5)}
    for k, first, end in segs.tile_info.tolist():
        if k < 0:
            continue
        assert 0 < end - first <= 2
        seen[k] += segs.order[first:end].tolist()
    for k in range(5):
        assert sorted(seen[k]) == [i for i, v in enumerate(ids.tolist()) if v == k]
    assert segs.tile_info.shape[0] == 7 + 5  # the bound cdiv(N, BLOCK_M) + K


@hyp_seed(2468)
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(["lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi"]),
       n=st.integers(1, 40), d_in=st.integers(1, 20), d_out=st.integers(1, 20), r=st.integers(1, 5),
       p=st.sampled_from([0.0, 0.5]), drop_seed=st.integers(0, 2 ** 63 - 2))
def test_property_tiny_shapes(op, n, d_in, d_out, r, p, drop_seed):
    """Degenerate sizes (1 row, 1 column, rank 1, N not a multiple of the row tile) on every op."""
    x, w, b, a, bb, gy = _base((n,), d_in, d_out, r, seed=n + 31 * d_in)
    g = _gen(d_out)
    kwargs = dict(dropout_p=p, seed=drop_seed)
    if op == "lora_linear":
        fn, make = lora_linear, lambda: (_leaf(x, True), _leaf(w, True), _leaf(b, True), _leaf(a, True),
                                         _leaf(bb, True), 1.3)
    elif op == "dora_linear":
        mag = torch.rand(d_out, generator=g) + 0.5
        fn, make = dora_linear, lambda: (_leaf(x, True), _leaf(w, True), _leaf(b, True), _leaf(a, True),
                                         _leaf(bb, True), _leaf(mag, True), 1.3)
    elif op == "adalora_linear":
        e = torch.randn(r, generator=g)
        fn, make = adalora_linear, lambda: (_leaf(x, True), _leaf(w, True), _leaf(b, True), _leaf(a, True),
                                            _leaf(e, True), _leaf(bb, True), 4.0, 2.0)
    else:
        a_s, b_s = torch.randn(3, r, d_in, generator=g), torch.randn(3, d_out, r, generator=g)
        ids = torch.randint(-1, 3, (n,), generator=g).to(DEV)
        fn, make = lora_linear_multi, lambda: (_leaf(x, True), _leaf(w, True), _leaf(b, True), _leaf(a_s, True),
                                               _leaf(b_s, True), [0.5, 1.0, 2.0], ids)
    _compare(op, fn, make, kwargs, gy.to(DEV))


# ----------------------------------------------------------------------- dropout mask --
@pytest.mark.parametrize("seed", [0, 1, 7, (1 << 40) + 3, 2 ** 63 - 2])
def test_shrink_mask_is_the_contract_mask(seed):
    """xa from the shrink kernel with A = identity is D(x) itself: compare with the reference mask."""
    from vfm.kernels.lora import dropout_args, shrink

    n, d_in, p = 13, 41, 0.45
    x = torch.randn(n, d_in, generator=_gen(11)).abs() + 1.0  # never zero: zeros mean dropped
    eye = torch.eye(d_in)
    out = shrink(x.to(DEV), eye.to(DEV), torch.empty(n, d_in, device=DEV), drop=dropout_args(p, seed)).cpu()
    keep = dropout_keep_mask(seed, n, d_in, p)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out[keep], x[keep] / (1.0 - p))
    from vfm.kernels.lora import dropout_apply

    torch.testing.assert_close(dropout_apply(x.to(DEV), torch.float32, dropout_args(p, seed)).cpu(),
                               apply_dropout(x, seed, p), rtol=0, atol=0)


@triton.jit
def _hash_probe(offs_ptr, out_ptr, n, k0, k1, thr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    offs = tl.load(offs_ptr + i, mask=m, other=0)
    v = tl.full((BLOCK,), 1.0, tl.float32)
    tl.store(out_ptr + i, _dropout(v, offs, k0, k1, thr, 1.0, tl.float32), mask=m)


def test_hash_at_offsets_past_two_to_the_32():
    """The kernels' hash on int64 offsets beyond 2^32 (tensors of more than 4 G elements) is the contract's."""
    offs = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 3 * 2 ** 33 + 17,
                         2 ** 40 + 12345, 2 ** 45 - 1], dtype=torch.int64)
    seed, p = (5 << 32) + 123456789, 0.5
    out = torch.empty(offs.shape[0], dtype=torch.float32, device=DEV)
    _hash_probe[(1,)](offs.to(DEV), out, offs.shape[0], seed & 0xFFFFFFFF, seed >> 32, dropout_threshold(p), BLOCK=16)
    expect = dropout_hash(seed, offs) >= dropout_threshold(p)
    assert expect.any() and (~expect).any()
    assert torch.equal(out.cpu() != 0, expect)


# ---------------------------------------------------------------------------- registry --
@pytest.mark.skipif(DEV != "cpu", reason="checks the interpreter's registry rules on CPU tensors")
def test_registry_never_picks_the_interpreter_and_refuses_float64():
    for op in ("lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi"):
        assert "triton" in vfm.available_backends(op, "cpu")
        assert vfm.available_backends(op, "cpu")[0] != "triton"
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(6, 8, dtype=torch.float64)
    a, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with vfm.use_backend("triton"):
        with pytest.raises(vfm.BackendUnavailableError, match="float64"):
            lora_linear(x, w, None, a, b, 2.0)
    before = _registry.CALLS[("lora_linear", "triton")]
    lora_linear(x.float(), w.float(), None, a.float(), b.float(), 2.0)
    assert _registry.CALLS[("lora_linear", "triton")] == before


def test_opcheck_multi_with_the_triton_backend():
    """Schema, fake tensors, autograd registration and aliasing of the op with the triton kernels inside."""
    g = _gen(13)
    x = torch.randn(9, 12, generator=g).to(DEV).requires_grad_(True)
    args = (x, torch.randn(7, 12, generator=g).to(DEV), torch.randn(7, generator=g).to(DEV).requires_grad_(True),
            torch.randn(2, 3, 12, generator=g).to(DEV).requires_grad_(True),
            torch.randn(2, 7, 3, generator=g).to(DEV).requires_grad_(True), torch.tensor([1.0, 2.0], device=DEV),
            torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1], device=DEV), 0.2, torch.tensor(5))
    before = _registry.CALLS[("lora_linear_multi", "triton")]
    with vfm.use_backend("triton"):
        torch.library.opcheck(torch.ops.vfm.lora_linear_multi.default, args,  # aot_dispatch: tests/test_lora_api.py
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert _registry.CALLS[("lora_linear_multi", "triton")] > before


# The sm_90 compile check of every kernel (real launches, ptxas) is tests/test_triton_sm90_compile.py.
