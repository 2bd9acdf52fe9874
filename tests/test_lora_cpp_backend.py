"""The cpp backends of the low-rank ops against the torch reference.

lora_linear, dora_linear, adalora_linear and lora_linear_multi (vfm/ops/lora_cpp.py,
vfm/ops/lora_cpp_variants.py, csrc/cpu/lora_dropout.cpp, csrc/cpu/lora_backward.cpp) run through the
public functions (forced with ``vfm.use_backend``) on the same inputs and seed; the registry's call counter proves
which ran, forward and backward.  The C++ kernels regenerate the contract's dropout mask, so
outputs agree to rounding (a single flipped mask element would be far outside the tolerances).
The grouped kernels themselves are also checked against per-row torch loops built on the
reference's dropout_keep_mask.
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 7, (1 << 40) + 3])
def test_cpp_mask_is_the_contract_mask(seed, dtype):
    """xa from the C++ kernel with A = identity rows is D(x) itself: compare with the reference mask
    (float32 takes the 8-lane vector hash, float64 the scalar loop; 41 columns leave a tail)."""
    n, d_in, p = 13, 41, 0.45
    x = torch.randn(n, d_in, dtype=dtype) + 3.0  # never zero, so zeros mean dropped
    a = torch.eye(d_in, dtype=dtype)
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


# ------------------------------------------------------------- every op, fold path, variants --
from vfm.ops.lora_api import adalora_linear, dora_linear, lora_linear_multi  # noqa: E402

TOL_V = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def _forced(op, backend, fn, leaves, gy):
    """Run fn() under a forced backend; returns (y, {name: grad}) and checks forward and backward ran there."""
    leaves = {k: (v.detach().requires_grad_(v.requires_grad) if v is not None else None) for k, v in leaves.items()}
    before = _registry.CALLS[(op, backend)]
    with vfm.use_backend(backend):
        y = fn(**leaves)
        y.backward(gy)
    assert _registry.CALLS[(op, backend)] >= before + 2, (op, backend)
    return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}


def _compare(op, fn, leaves, gy, dtype):
    y_t, g_t = _forced(op, "torch", fn, leaves, gy)
    y_c, g_c = _forced(op, "cpp", fn, leaves, gy)
    torch.testing.assert_close(y_c, y_t, **TOL_V[dtype])
    assert g_c.keys() == g_t.keys()
    for name in g_t:
        assert g_c[name] is not None, name
        torch.testing.assert_close(g_c[name], g_t[name], **TOL_V[dtype], msg=lambda m: f"grad {name}: {m}")


def _leaves(dtype, n, d_in, d_out, r, *, bias, train_w, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(n, d_in, generator=g, dtype=dtype).requires_grad_(True),
             w=torch.randn(d_out, d_in, generator=g, dtype=dtype).requires_grad_(train_w),
             b=torch.randn(d_out, generator=g, dtype=dtype).requires_grad_(True) if bias else None,
             a=(torch.randn(r, d_in, generator=g, dtype=dtype) * 0.3).requires_grad_(True),
             bb=(torch.randn(d_out, r, generator=g, dtype=dtype) * 0.3).requires_grad_(True))
    return t, torch.randn(n, d_out, generator=g, dtype=dtype)


# (rows, in, out, r): rows >= in takes lora_linear's folded-weight path, rows < in the other.
SHAPES = [(41, 29, 23, 3), (11, 37, 29, 5), (70, 17, 33, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_cpp_both_paths(dtype, p, shape):
    t, gy = _leaves(dtype, *shape, bias=True, train_w=shape[3] == 3)
    _compare("lora_linear", lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, 1.7, dropout_p=p, seed=77), t, gy,
             dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape,bias,train_w", [(SHAPES[0], True, True), (SHAPES[1], False, False),
                                                (SHAPES[2], True, False)])
def test_dora_cpp_matches_torch(dtype, p, shape, bias, train_w):
    t, gy = _leaves(dtype, *shape, bias=bias, train_w=train_w, seed=1)
    t["m"] = (torch.rand(shape[2], dtype=dtype) + 0.5).requires_grad_(True)
    _compare("dora_linear",
             lambda x, w, b, a, bb, m: dora_linear(x, w, b, a, bb, m, 0.9, dropout_p=p, seed=5), t, gy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape,train_w", [(SHAPES[0], True), (SHAPES[1], False), (SHAPES[2], False)])
def test_adalora_cpp_matches_torch(dtype, p, shape, train_w):
    t, gy = _leaves(dtype, *shape, bias=True, train_w=train_w, seed=2)
    e = torch.randn(shape[3], 1, dtype=dtype)
    e[0] = 0.0  # a pruned rank: lora_e still gets its gradient
    t["e"] = e.requires_grad_(True)
    ranknum = torch.tensor([float(shape[3])])
    _compare("adalora_linear",
             lambda x, w, b, a, bb, e: adalora_linear(x, w, b, a, e, bb, 2.0, ranknum, dropout_p=p, seed=9), t, gy,
             dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n,d_in,d_out,r,k", [(23, 29, 31, 3, 4), (9, 70, 5, 17, 2), (40, 16, 16, 8, 1)])
def test_multi_cpp_matches_torch(dtype, p, n, d_in, d_out, r, k):
    g = torch.Generator().manual_seed(3)
    t = dict(x=torch.randn(n, d_in, generator=g, dtype=dtype).requires_grad_(True),
             w=torch.randn(d_out, d_in, generator=g, dtype=dtype).requires_grad_(k == 2),
             b=torch.randn(d_out, generator=g, dtype=dtype).requires_grad_(True),
             a=(torch.randn(k, r, d_in, generator=g, dtype=dtype) * 0.3).requires_grad_(True),
             bb=(torch.randn(k, d_out, r, generator=g, dtype=dtype) * 0.3).requires_grad_(True))
    ids = torch.randint(-1, k, (n,), generator=g)  # unsorted, with -1 rows
    ids[0], ids[-1] = -1, k - 1
    scalings = [0.5 + i for i in range(k)]
    gy = torch.randn(n, d_out, generator=g, dtype=dtype)
    _compare("lora_linear_multi",
             lambda x, w, b, a, bb: lora_linear_multi(x, w, b, a, bb, scalings, ids, dropout_p=p, seed=11), t, gy,
             dtype)


def test_multi_cpp_every_row_without_adapter_and_unused_adapters():
    """All rows -1: y is the base layer, the factors' gradients are exactly zero (as the reference's)."""
    g = torch.Generator().manual_seed(4)
    t = dict(x=torch.randn(6, 10, generator=g).requires_grad_(True), w=torch.randn(7, 10, generator=g),
             b=None, a=torch.randn(3, 2, 10, generator=g).requires_grad_(True),
             bb=torch.randn(3, 7, 2, generator=g).requires_grad_(True))
    gy = torch.randn(6, 7, generator=g)
    ids = torch.full((6,), -1)
    y, grads = _forced("lora_linear_multi", "cpp",
                       lambda x, w, b, a, bb: lora_linear_multi(x, w, b, a, bb, [1.0, 2.0, 3.0], ids, dropout_p=0.2,
                                                                seed=1), t, gy)
    torch.testing.assert_close(y, t["x"].detach() @ t["w"].t())
    assert torch.equal(grads["a"], torch.zeros_like(t["a"])) and torch.equal(grads["bb"], torch.zeros_like(t["bb"]))
    torch.testing.assert_close(grads["x"], gy @ t["w"])


def test_grouped_kernels_against_plain_loops():
    """vfm_C::lora_shrink / lora_expand_ / lora_reduce / lora_dx_ga_ with ids, scales and dropout, against
    per-row torch loops (the mask from the reference's dropout_keep_mask)."""
    g = torch.Generator().manual_seed(5)
    n, c, r, k, p = 19, 45, 18, 3, 0.25
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    mats = torch.randn(k, r, c, generator=g, dtype=torch.float64)
    coef = torch.randn(n, r, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, k, (n,), generator=g)
    sc = torch.rand(k, generator=g)
    thr, ds = dropout_threshold(p), 1.0 / (1.0 - p)
    u = torch.where(dropout_keep_mask(31, n, c, p), x * ds, torch.zeros((), dtype=x.dtype))
    ops = torch.ops.vfm_C
    out = ops.lora_shrink(x, mats, ids, sc, 0.5, 31, thr, ds)
    acc = torch.randn(n, c, generator=g, dtype=torch.float64)
    expanded = acc.clone()
    ops.lora_expand_(expanded, coef, mats, ids, sc, 0.5, 31, thr, ds)
    red = ops.lora_reduce(coef, x, k, ids, sc, 0.5, 31, thr, ds)
    fused_dx = acc.clone()
    fused_ga = ops.lora_dx_ga_(fused_dx, coef, mats, x, ids, 31, thr, ds)
    for i in range(n):
        a = int(ids[i])
        if a < 0:
            assert torch.equal(out[i], torch.zeros(r, dtype=x.dtype)) and torch.equal(expanded[i], acc[i])
            continue
        s = 0.5 * float(sc[a])
        torch.testing.assert_close(out[i], s * (u[i] @ mats[a].t()))
        term = s * (coef[i] @ mats[a])
        torch.testing.assert_close(expanded[i], acc[i] + torch.where(u[i] != 0, term * ds, torch.zeros_like(term)))
        term = coef[i] @ mats[a]
        torch.testing.assert_close(fused_dx[i], acc[i] + torch.where(u[i] != 0, term * ds, torch.zeros_like(term)))
    for i in torch.nonzero(ids < 0).flatten().tolist():
        assert torch.equal(fused_dx[i], acc[i])
    for a in range(k):
        rows = ids == a
        torch.testing.assert_close(red[a], 0.5 * float(sc[a]) * (coef[rows].t() @ u[rows]))
        torch.testing.assert_close(fused_ga[a], coef[rows].t() @ u[rows])


@pytest.mark.parametrize("grouped", [True, False])
def test_fused_dx_ga_without_dropout_equals_expand_and_reduce(grouped):
    """lora_dx_ga_ with threshold 0 (the multi-adapter backward without dropout): dx += coef_i M_k and
    sum_i coef_i^T src_i, exactly as lora_expand_ and lora_reduce compute them."""
    g = torch.Generator().manual_seed(8)
    n, c, r, k = 29, 37, 5, (3 if grouped else 1)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    mats = torch.randn(k, r, c, generator=g, dtype=torch.float64)
    coef = torch.randn(n, r, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, k, (n,), generator=g) if grouped else None
    m = mats if grouped else mats[0]
    acc = torch.randn(n, c, generator=g, dtype=torch.float64)
    ops = torch.ops.vfm_C
    fused_dx = acc.clone()
    fused_ga = ops.lora_dx_ga_(fused_dx, coef, m, x, ids, 0, 0, 1.0)
    dx = acc.clone()
    ops.lora_expand_(dx, coef, m, ids, None, 1.0, 0, 0, 1.0)
    ga = ops.lora_reduce(coef, x, k, ids, None, 1.0, 0, 0, 1.0)
    torch.testing.assert_close(fused_dx, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_ga, ga, rtol=1e-12, atol=1e-12)
    if grouped:  # and against the plain sums
        for a in range(k):
            rows = ids == a
            torch.testing.assert_close(fused_ga[a], coef[rows].t() @ x[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n,c,o,r,k", [(19, 45, 37, 18, 3), (7, 16, 8, 4, 1), (1, 3, 2, 1, 2), (0, 5, 4, 2, 2),
                                         (21, 64, 64, 16, 2)])  # rank 16, whole vectors
def test_grouped_shrink_expand_against_plain_loops(dtype, p, with_bias, n, c, o, r, k):
    """vfm_C::lora_shrink_expand_grouped: xa_i = D(x_i) A_k^T and y_i = b + alpha s_k xa_i B_k^T per row,
    rows of id -1 get xa = 0 and y = b (or 0); the mask is the reference's dropout_keep_mask."""
    g = torch.Generator().manual_seed(n + c + k)
    x = torch.randn(n, c, generator=g, dtype=dtype)
    a = torch.randn(k, r, c, generator=g, dtype=dtype)
    b = torch.randn(k, o, r, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype) if with_bias else None
    ids = torch.randint(-1, k, (n,), generator=g)
    if n > 1:
        ids[0] = -1
    sc = torch.rand(k, generator=g)
    thr, ds = (dropout_threshold(p), 1.0 / (1.0 - p)) if p else (0, 1.0)
    u = torch.where(dropout_keep_mask(13, n, c, p), x * ds, torch.zeros((), dtype=dtype)) if p else x
    y, xa = torch.ops.vfm_C.lora_shrink_expand_grouped(x, a, b.transpose(1, 2), ids, sc, bias, 0.5, 13, thr, ds)
    assert y.shape == (n, o) and xa.shape == (n, r)
    tol = TOL_V[dtype]
    for i in range(n):
        j = int(ids[i])
        base = bias if bias is not None else torch.zeros(o, dtype=dtype)
        if j < 0:
            assert torch.equal(xa[i], torch.zeros(r, dtype=dtype)) and torch.equal(y[i], base)
            continue
        want_xa = u[i].double() @ a[j].double().t()
        torch.testing.assert_close(xa[i].double(), want_xa, **tol)
        torch.testing.assert_close(y[i].double(), base.double() + 0.5 * float(sc[j]) * (want_xa @ b[j].double().t()),
                                   **tol)


def test_grouped_shrink_expand_bad_input_names_the_shapes():
    ops = torch.ops.vfm_C
    x, a, bt = torch.randn(4, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 6)
    ids = torch.tensor([0, 1, -1, 1])
    with pytest.raises(RuntimeError, match="do not match"):
        ops.lora_shrink_expand_grouped(x, a, torch.randn(3, 3, 6), ids, None, None, 1.0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="outside"):
        ops.lora_shrink_expand_grouped(x, a, bt, torch.tensor([0, 2, 0, 0]), None, None, 1.0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="ids must have shape"):
        ops.lora_shrink_expand_grouped(x, a, bt, ids[:3], None, None, 1.0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.lora_shrink_expand_grouped(x, a.double(), bt, ids, None, None, 1.0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.lora_shrink_expand_grouped(x, a, bt, ids, None, torch.randn(5), 1.0, 0, 0, 1.0)


@pytest.mark.parametrize("op", ["dora_linear", "adalora_linear", "lora_linear_multi"])
def test_registry_prefers_cpp_for_every_low_rank_op(op):
    assert vfm.available_backends(op, "cpu")[0] == "cpp"


def test_mixed_adapter_dtype_auto_runs_reference_and_forced_cpp_raises():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 8, generator=g)
    w = torch.randn(6, 8, generator=g)
    a = torch.randn(2, 8, generator=g, dtype=torch.float64)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    with vfm.use_backend("cpp"):
        with pytest.raises(vfm.BackendUnavailableError, match="float64"):
            lora_linear(x, w, None, a, b, 2.0)
    with vfm.use_backend("torch"):
        y_ref = lora_linear(x, w, None, a, b, 2.0)
    torch.testing.assert_close(lora_linear(x, w, None, a, b, 2.0), y_ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c,r", [(23, 301, 16), (9, 512, 3), (2, 17, 5)])
def test_single_adapter_dx_ga_against_plain_torch(threads, dtype, n, c, r):
    """lora_dx_ga_, lora_reduce and lora_shrink_reduce without ids (row chunks, one partial sum
    per chunk, column blocks) and lora_shrink / lora_expand_ with dropout, against torch products
    on the reference's mask: row counts that are not multiples of 4, columns with vector tails,
    several blocks and chunks."""
    g = torch.Generator().manual_seed(n * c + r)
    p, seed = 0.3, (1 << 33) + 5
    x = torch.randn(n, c + 3, generator=g, dtype=dtype)[:, 2:c + 2]  # a row stride
    mats = torch.randn(r, c, generator=g, dtype=dtype)
    coef = torch.randn(n, r, generator=g, dtype=dtype)
    acc = torch.randn(n, c, generator=g, dtype=dtype)
    keep = dropout_keep_mask(seed, n, c, p)
    thr, ds = dropout_threshold(p), 1.0 / (1.0 - p)
    u = torch.where(keep, x * ds, torch.zeros((), dtype=dtype))
    ops = torch.ops.vfm_C
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dx = acc.clone()
        ga = ops.lora_dx_ga_(dx, coef, mats, x, None, seed, thr, ds)
        xa = ops.lora_shrink(x, mats, None, None, 1.0, seed, thr, ds)
        ex = acc.clone()
        ops.lora_expand_(ex, coef, mats, None, None, 1.0, seed, thr, ds)
        red = ops.lora_reduce(coef, x, 1, None, None, 0.7, seed, thr, ds)
        red0 = ops.lora_reduce(coef, x, 1, None, None, 0.7, 0, 0, 1.0)  # full blocks read in place
        sr_out, sr_red = ops.lora_shrink_reduce(x, mats, coef, 0.7)  # grad_y's gxa and grad_B^T pass
    finally:
        torch.set_num_threads(before)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    term = torch.where(keep, (coef @ mats) * ds, torch.zeros((), dtype=dtype))
    torch.testing.assert_close(dx, acc + term, **tol)
    torch.testing.assert_close(ex, acc + term, **tol)
    torch.testing.assert_close(ga, coef.t() @ u, **tol)
    torch.testing.assert_close(xa, u @ mats.t(), **tol)
    torch.testing.assert_close(red, 0.7 * (coef.t() @ u), **tol)
    torch.testing.assert_close(red0, 0.7 * (coef.t() @ x), **tol)
    torch.testing.assert_close(sr_out, 0.7 * (x @ mats.t()), **tol)
    torch.testing.assert_close(sr_red, 0.7 * (coef.t() @ x), **tol)
