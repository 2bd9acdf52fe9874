"""The fused single-adapter C++ ops of the LoRA cpp backend and the lora_cpp.py paths that use them.

Kernel level (``torch.ops.vfm_C``), against plain torch products on the reference's
:func:`~vfm.ops.lora_reference.dropout_keep_mask` (an independent reference, computed in float64):

* ``lora_shrink_expand(src, a, bt, bias, alpha, seed, threshold, dscale) -> (y, xa)``:
  xa = D?(src) a^T, y = bias + alpha * xa bt;
* ``lora_expand_reduce(coef, mats, src, seed, threshold, dscale) -> (dx, res)``:
  dx = D?(coef mats), res = coef^T D?(src);
* ``lora_merge(weight, b, a, alpha) -> weight + alpha * b a``;

at 1 and 2 threads, float32 and float64, row counts that are not multiples of the 6- and 12-row
tiles, columns with vector tails and several column blocks, odd ranks, strided / transposed inputs,
N = 1, empty shapes, and their TORCH_CHECKs.

Public level (``vfm.functional.lora_linear`` / ``adalora_linear`` under ``vfm.use_backend("cpp")``
against ``vfm.use_backend("torch")``): the merged-weight forward (in < N rows) and backward
(out < N rows) without dropout, and lora_shrink_expand / lora_expand_reduce with dropout; which
C++ ops ran is read from the profiler, so a test fails if its path is no longer taken.
"""

from __future__ import annotations

import pytest
import torch

import vfm
from vfm.ops.lora_cpp import cpp_available
from vfm.ops.lora_reference import dropout_keep_mask, dropout_threshold

_OK, _WHY = cpp_available()
if not _OK:
    pytest.skip(f"vfm._C lora ops are not available: {_WHY}", allow_module_level=True)

OPS = torch.ops.vfm_C
DTYPES = [torch.float32, torch.float64]
# kernel outputs against float64 references; public cpp against the public torch backend
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-11)}
SEED = (1 << 33) + 5  # a high word: k1 != 0 in the hash
P = 0.3


def _threads(n):
    """Context manager: torch.set_num_threads(n), restored afterwards."""
    class _T:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)
    return _T()


def _strided(g, n, c, dtype):
    """(n, c) with row stride c + 3 (a column slice of a wider tensor), stride(1) == 1."""
    return torch.randn(n, c + 3, generator=g, dtype=dtype)[:, 2:c + 2]


def _dropped(x, p, seed):
    """float64 D(x) from the reference mask (identity when p == 0)."""
    x = x.double()
    if p == 0.0 or x.numel() == 0:
        return x
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p)
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype))


def _drop_args(p, seed):
    return (seed, dropout_threshold(p), 1.0 / (1.0 - p)) if p > 0 else (seed, 0, 1.0)  # threshold 0: seed ignored


def _close(got, ref, dtype, what):
    assert got.dtype == dtype, (what, got.dtype)
    torch.testing.assert_close(got, ref.to(dtype), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ lora_shrink_expand --
# (N, C, R, O): N not a multiple of 6; C with a vector tail; R neither a multiple of 4 nor of 6
# except 16; O with a tail, and O = 1.  131 x 1030 has enough 6-row tiles (22) for parallel_for's
# grain to give both threads a share, in float32 and float64.  R = 16 with O = 1024 (the benchmark's
# layer width, rows of B^T 4 KiB apart in float32) and with O = 20 (one whole vector and a tail).
SE_SHAPES = [(23, 301, 16, 29), (131, 1030, 7, 17), (1, 17, 5, 33), (13, 40, 3, 1), (25, 64, 16, 1024),
             (7, 33, 16, 20)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SE_SHAPES)
@pytest.mark.parametrize("p", [0.0, P])
def test_shrink_expand_against_torch(threads, dtype, shape, p):
    n, c, r, o = shape
    g = torch.Generator().manual_seed(n * c + r * o)
    x = _strided(g, n, c, dtype)
    a = torch.randn(r, c, generator=g, dtype=dtype) / c ** 0.5  # xa entries O(1), as trained adapters keep them
    b = torch.randn(o, r, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    alpha = -1.7
    u = _dropped(x, p, SEED)
    xa_ref = u @ a.double().t()
    # bias None / a bias; bt as lora_cpp passes it (a transposed view of B) and contiguous
    for use_bias, bt in ((False, b.t()), (True, b.t().contiguous())):
        with _threads(threads):
            y, xa = OPS.lora_shrink_expand(x, a, bt, bias if use_bias else None, alpha, *_drop_args(p, SEED))
        assert y.shape == (n, o) and xa.shape == (n, r)
        _close(xa, xa_ref, dtype, "xa")
        y_ref = alpha * xa_ref @ b.double().t() + (bias.double() if use_bias else 0.0)
        _close(y, y_ref, dtype, f"y (bias={use_bias})")


def test_shrink_expand_threshold_zero_ignores_seed_and_dropout_changes_result():
    """threshold 0 is the identity whatever the seed; threshold > 0 must actually drop (guards a
    kernel that ignores the threshold: the p > 0 case above would then fail too)."""
    g = torch.Generator().manual_seed(1)
    x, a, bt = (torch.randn(*s, generator=g) for s in ((9, 33), (5, 33), (5, 7)))
    y0, xa0 = OPS.lora_shrink_expand(x, a, bt, None, 1.0, 0, 0, 1.0)
    y1, xa1 = OPS.lora_shrink_expand(x, a, bt, None, 1.0, 12345, 0, 2.0)  # dscale unused without dropout
    assert torch.equal(y0, y1) and torch.equal(xa0, xa1)
    _, xa2 = OPS.lora_shrink_expand(x, a, bt, None, 1.0, 12345, dropout_threshold(0.5), 2.0)
    assert not torch.allclose(xa2, xa0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("n,c,r,o", [
    (0, 17, 3, 5), (4, 17, 0, 5), (4, 0, 3, 5),
    (4, 17, 3, 0),  # no output columns: xa is still D(x) A^T
])
def test_shrink_expand_empty(dtype, p, n, c, r, o):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, generator=g, dtype=dtype)
    a = torch.randn(r, c, generator=g, dtype=dtype)
    bt = torch.randn(r, o, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    y, xa = OPS.lora_shrink_expand(x, a, bt, bias, 0.5, *_drop_args(p, SEED))
    xa_ref = _dropped(x, p, SEED) @ a.double().t()
    _close(xa, xa_ref, dtype, "xa")
    _close(y, bias.double() + 0.5 * xa_ref @ bt.double(), dtype, "y")


# ------------------------------------------------------------------ lora_expand_reduce --
# (N, C, R): 53 rows at 2 threads split into two chunks of 26/27 rows (partial 12-row blocks);
# C = 1030 crosses several column blocks, 301 and 17 leave vector tails.
# 48 columns: a whole number of vectors in both dtypes.  R = 16 with 1024 columns (the benchmark's
# layer width: eight 128-column blocks) and with 20 (one whole vector and a tail).
ER_SHAPES = [(23, 301, 16), (53, 1030, 7), (1, 17, 5), (29, 40, 3), (30, 48, 3), (37, 1024, 16), (13, 20, 16)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ER_SHAPES)
@pytest.mark.parametrize("p", [0.0, P])
def test_expand_reduce_against_torch(threads, dtype, shape, p):
    n, c, r = shape
    g = torch.Generator().manual_seed(n * c + r)
    x = _strided(g, n, c, dtype)
    mats = _strided(g, r, c, dtype)
    coef = torch.randn(n, r + 2, generator=g, dtype=dtype)[:, 1:r + 1]  # strided coef and mats too
    with _threads(threads):
        dx, res = OPS.lora_expand_reduce(coef, mats, x, *_drop_args(p, SEED))
    assert dx.shape == (n, c) and res.shape == (r, c)
    prod = coef.double() @ mats.double()
    if p > 0:
        keep = dropout_keep_mask(SEED, n, c, p)
        assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep]))  # dropped entries exactly 0
        prod = torch.where(keep, prod / (1.0 - p), torch.zeros((), dtype=prod.dtype))
    _close(dx, prod, dtype, "dx")
    _close(res, coef.double().t() @ _dropped(x, p, SEED), dtype, "res")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_take_a_transposed_src(dtype):
    """src with stride(1) != 1 (the ops copy it to unit column stride; offsets stay those of the
    logical (N, C) matrix)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, 29, generator=g, dtype=dtype).t()  # (29, 37)
    a = torch.randn(5, 37, generator=g, dtype=dtype)
    bt = torch.randn(5, 11, generator=g, dtype=dtype)
    coef = torch.randn(29, 5, generator=g, dtype=dtype)
    u = _dropped(x, P, SEED)
    y, xa = OPS.lora_shrink_expand(x, a, bt, None, 0.8, *_drop_args(P, SEED))
    _close(xa, u @ a.double().t(), dtype, "xa")
    _close(y, 0.8 * u @ a.double().t() @ bt.double(), dtype, "y")
    dx, res = OPS.lora_expand_reduce(coef, a, x, *_drop_args(P, SEED))
    _close(res, coef.double().t() @ u, dtype, "res")
    keep = dropout_keep_mask(SEED, 29, 37, P)
    _close(dx, torch.where(keep, coef.double() @ a.double() / (1.0 - P), torch.zeros((), dtype=torch.float64)),
           dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("n,c,r", [(0, 17, 3), (4, 17, 0), (4, 0, 3)])
def test_expand_reduce_empty(dtype, p, n, c, r):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, generator=g, dtype=dtype)
    mats = torch.randn(r, c, generator=g, dtype=dtype)
    coef = torch.randn(n, r, generator=g, dtype=dtype)
    dx, res = OPS.lora_expand_reduce(coef, mats, x, *_drop_args(p, SEED))
    _close(dx, torch.zeros(n, c, dtype=torch.float64), dtype, "dx")  # empty product: zeros, not garbage
    _close(res, coef.double().t() @ _dropped(x, p, SEED), dtype, "res")


# --------------------------------------------------------------------------- lora_merge --
# (O, C, R): O not a multiple of 6, C with tails / several vector widths, odd ranks; 97 x 1030
# (17 tiles of 6 rows) is split between 2 threads.
MERGE_SHAPES = [(23, 301, 16), (97, 1030, 7), (1, 17, 5), (40, 24, 3), (30, 1024, 16)]  # 1024: the benchmark's width


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MERGE_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_merge_against_torch(threads, dtype, shape, layout):
    o, c, r = shape
    g = torch.Generator().manual_seed(o * c + r)
    if layout == "contiguous":
        w = torch.randn(o, c, generator=g, dtype=dtype)
        b = torch.randn(o, r, generator=g, dtype=dtype)
        a = torch.randn(r, c, generator=g, dtype=dtype)
    elif layout == "strided":  # row strides != row lengths
        w = _strided(g, o, c, dtype)
        b = _strided(g, o, r, dtype)
        a = _strided(g, r, c, dtype)
    else:  # PEFT's fan_in_fan_out weight (a transposed view), B and A transposed views too
        w = torch.randn(c, o, generator=g, dtype=dtype).t()
        b = torch.randn(r, o, generator=g, dtype=dtype).t()
        a = torch.randn(c, r, generator=g, dtype=dtype).t()
    w_before = w.clone()
    with _threads(threads):
        out = OPS.lora_merge(w, b, a, 0.37)
    assert out.shape == (o, c) and out.is_contiguous()
    assert torch.equal(w, w_before)  # the weight itself is not modified
    _close(out, w.double() + 0.37 * b.double() @ a.double(), dtype, "merged")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("o,c,r", [(0, 17, 3), (5, 0, 3), (5, 17, 0)])
def test_merge_empty(dtype, o, c, r):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(o, c, generator=g, dtype=dtype)
    b = torch.randn(o, r, generator=g, dtype=dtype)
    a = torch.randn(r, c, generator=g, dtype=dtype)
    out = OPS.lora_merge(w, b, a, 2.0)
    _close(out, w.double() + 2.0 * b.double() @ a.double(), dtype, "merged")
    if out.numel():
        assert out.data_ptr() != w.data_ptr()  # a copy, never an alias of the frozen weight


# ------------------------------------------------------------------------ TORCH_CHECKs --
def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_D = torch.float64
BAD_CALLS = [
    # lora_shrink_expand(src (N,C), a (R,C), bt (R,O), bias, alpha, seed, threshold, dscale)
    ("lora_shrink_expand: src, a and bt dtypes differ",
     lambda: OPS.lora_shrink_expand(_f(4, 8), _f(2, 8, dtype=_D), _f(2, 5), None, 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: src, a and bt dtypes differ",
     lambda: OPS.lora_shrink_expand(_f(4, 8), _f(2, 8), _f(2, 5, dtype=_D), None, 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: bias",
     lambda: OPS.lora_shrink_expand(_f(4, 8), _f(2, 8), _f(2, 5), _f(5, dtype=_D), 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: bias",
     lambda: OPS.lora_shrink_expand(_f(4, 8), _f(2, 8), _f(2, 5), _f(6), 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: shapes",
     lambda: OPS.lora_shrink_expand(_f(4, 8), _f(2, 9), _f(2, 5), None, 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: shapes",
     lambda: OPS.lora_shrink_expand(_f(4, 8), _f(2, 8), _f(3, 5), None, 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: src must be 2-D",
     lambda: OPS.lora_shrink_expand(_f(8), _f(2, 8), _f(2, 5), None, 1.0, 0, 0, 1.0)),
    ("lora_shrink_expand: src must be float32 or float64",
     lambda: OPS.lora_shrink_expand(_f(4, 8, dtype=torch.float16), _f(2, 8), _f(2, 5), None, 1.0, 0, 0, 1.0)),
    # lora_expand_reduce(coef (N,R), mats (R,C), src (N,C), seed, threshold, dscale)
    ("lora_expand_reduce: coef, mats and src dtypes differ",
     lambda: OPS.lora_expand_reduce(_f(4, 2, dtype=_D), _f(2, 8), _f(4, 8), 0, 0, 1.0)),
    ("lora_expand_reduce: coef, mats and src dtypes differ",
     lambda: OPS.lora_expand_reduce(_f(4, 2), _f(2, 8, dtype=_D), _f(4, 8), 0, 0, 1.0)),
    ("lora_expand_reduce: shapes",
     lambda: OPS.lora_expand_reduce(_f(4, 2), _f(2, 9), _f(4, 8), 0, 0, 1.0)),
    ("lora_expand_reduce: shapes",
     lambda: OPS.lora_expand_reduce(_f(5, 2), _f(2, 8), _f(4, 8), 0, 0, 1.0)),
    ("lora_expand_reduce: shapes",
     lambda: OPS.lora_expand_reduce(_f(4, 3), _f(2, 8), _f(4, 8), 0, 0, 1.0)),
    ("lora_expand_reduce: mats must be 2-D",
     lambda: OPS.lora_expand_reduce(_f(4, 2), _f(1, 2, 8), _f(4, 8), 0, 0, 1.0)),
    ("lora_expand_reduce: src must be float32 or float64",
     lambda: OPS.lora_expand_reduce(_f(4, 2), _f(2, 8), torch.ones(4, 8, dtype=torch.int64), 0, 0, 1.0)),
    # lora_merge(weight (O,C), b (O,R), a (R,C), alpha)
    ("lora_merge: weight, b and a dtypes differ", lambda: OPS.lora_merge(_f(5, 8), _f(5, 2, dtype=_D), _f(2, 8), 1.0)),
    ("lora_merge: weight, b and a dtypes differ", lambda: OPS.lora_merge(_f(5, 8), _f(5, 2), _f(2, 8, dtype=_D), 1.0)),
    ("lora_merge: shapes", lambda: OPS.lora_merge(_f(5, 8), _f(6, 2), _f(2, 8), 1.0)),
    ("lora_merge: shapes", lambda: OPS.lora_merge(_f(5, 8), _f(5, 3), _f(2, 8), 1.0)),
    ("lora_merge: shapes", lambda: OPS.lora_merge(_f(5, 8), _f(5, 2), _f(2, 9), 1.0)),
    ("lora_merge: weight must be 2-D", lambda: OPS.lora_merge(_f(1, 5, 8), _f(5, 2), _f(2, 8), 1.0)),
]


@pytest.mark.parametrize("match,call", BAD_CALLS, ids=[f"{i}-{m.split(':')[0]}" for i, (m, _) in enumerate(BAD_CALLS)])
def test_bad_arguments_raise(match, call):
    with pytest.raises(RuntimeError, match=match):
        call()


# ------------------------------------------------------------------ public lora_linear --
def _vfm_ops(fn):
    """(result of fn(), names of the vfm_C ops it ran), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name.split("::", 1)[1] for e in prof.events() if e.name.startswith("vfm_C::")}


def _leaves(dtype, x_shape, d_out, r, *, bias, train_w, seed=0):
    d_in = x_shape[-1]
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(*x_shape, generator=g, dtype=dtype).requires_grad_(True),
             w=torch.randn(d_out, d_in, generator=g, dtype=dtype).requires_grad_(train_w),
             b=torch.randn(d_out, generator=g, dtype=dtype).requires_grad_(True) if bias else None,
             a=(torch.randn(r, d_in, generator=g, dtype=dtype) * 0.3).requires_grad_(True),
             bb=(torch.randn(d_out, r, generator=g, dtype=dtype) * 0.3).requires_grad_(True))
    return t, torch.randn(*x_shape[:-1], d_out, generator=g, dtype=dtype)


def _run(backend, fn, leaves, gy, *, manual_seed=None):
    """y, {name: grad}, vfm_C ops of the forward, of the backward, under a forced backend."""
    leaves = {k: (v.detach().requires_grad_(v.requires_grad) if v is not None else None) for k, v in leaves.items()}
    with vfm.use_backend(backend):
        if manual_seed is not None:
            torch.manual_seed(manual_seed)
        y, fwd = _vfm_ops(lambda: fn(**leaves))
        _, bwd = _vfm_ops(lambda: y.backward(gy))
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}
    return y.detach(), grads, fwd, bwd


def _compare(fn, leaves, gy, dtype, **kw):
    """cpp against torch: y and every gradient; returns the cpp run's (forward ops, backward ops)."""
    y_t, g_t, fwd_t, _ = _run("torch", fn, leaves, gy, **kw)
    assert not fwd_t  # the reference runs no C++ op
    y_c, g_c, fwd, bwd = _run("cpp", fn, leaves, gy, **kw)
    torch.testing.assert_close(y_c, y_t, **TOL[dtype])
    assert g_c.keys() == g_t.keys()
    for name in g_t:
        assert g_c[name] is not None, name
        torch.testing.assert_close(g_c[name], g_t[name], **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")
    return fwd, bwd


# (x shape, out): rows N = 40 or 8; in < N and out < N (both merged), in < N <= out, out < N <= in,
# neither; a 3-D x (4 x 10 = 40 rows)
# and the boundary in = out = N (24 rows): not merged (merge_pays is a strict <).
PUB_CASES = [((40, 24), 16), ((40, 24), 64), ((40, 64), 24), ((8, 24), 16), ((4, 10, 24), 16), ((24, 24), 24)]
MODES = {"p0": (0.0, True), "eval": (0.25, False), "drop": (0.25, True)}


def _expect_paths(fwd, bwd, n_rows, d_in, d_out, dropout):
    """The path lora_cpp takes: merged weight iff no dropout and fewer features than rows."""
    if not dropout and d_in < n_rows:
        assert "lora_merge" in fwd and "lora_shrink_expand" not in fwd, fwd
    else:
        assert "lora_shrink_expand" in fwd and "lora_merge" not in fwd, fwd
    if not dropout and d_out < n_rows:
        assert "lora_merge" in bwd and "lora_expand_reduce" not in bwd, bwd
    else:
        assert "lora_expand_reduce" in bwd and "lora_merge" not in bwd, bwd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", range(len(PUB_CASES)))
def test_lora_linear_paths_cpp_matches_torch(dtype, mode, case):
    x_shape, d_out = PUB_CASES[case]
    p, training = MODES[mode]
    t, gy = _leaves(dtype, x_shape, d_out, 5, bias=case % 2 == 0, train_w=case in (0, 2, 4), seed=case)

    def fn(x, w, b, a, bb):
        return vfm.functional.lora_linear(x, w, b, a, bb, 1.7, dropout_p=p, training=training, seed=77)

    fwd, bwd = _compare(fn, t, gy, dtype)
    n_rows = t["x"].numel() // x_shape[-1]
    _expect_paths(fwd, bwd, n_rows, x_shape[-1], d_out, dropout=training and p > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("frozen", ["x", "a", "b"])
def test_lora_linear_frozen_inputs_cpp_matches_torch(dtype, p, frozen):
    """The backward branches when x, A or B takes no gradient (N = 40, in = 24 < N, out = 16 < N)."""
    t, gy = _leaves(dtype, (40, 24), 16, 3, bias=True, train_w=True, seed=11)
    t[{"x": "x", "a": "a", "b": "bb"}[frozen]].requires_grad_(False)

    def fn(x, w, b, a, bb):
        return vfm.functional.lora_linear(x, w, b, a, bb, 0.6, dropout_p=p, seed=5)

    _, bwd = _compare(fn, t, gy, dtype)
    if frozen == "x":  # no grad_x: the merged weight is never built in backward
        assert "lora_merge" not in bwd and "lora_expand_reduce" not in bwd, bwd


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_drawn_seed_cpp_matches_torch(dtype):
    """seed=None: the public API draws the seed from torch's generator (reseeded before each run)."""
    t, gy = _leaves(dtype, (40, 24), 16, 5, bias=True, train_w=False, seed=12)

    def fn(x, w, b, a, bb):
        return vfm.functional.lora_linear(x, w, b, a, bb, 1.3, dropout_p=0.25)

    fwd, bwd = _compare(fn, t, gy, dtype, manual_seed=2024)
    _expect_paths(fwd, bwd, 40, 24, 16, dropout=True)


def test_lora_linear_zero_scale_cpp_matches_torch():
    t, gy = _leaves(torch.float32, (40, 24), 16, 5, bias=True, train_w=True, seed=13)
    for p in (0.0, 0.25):
        _compare(lambda x, w, b, a, bb, p=p: vfm.functional.lora_linear(x, w, b, a, bb, 0.0, dropout_p=p, seed=3), t,
                 gy, torch.float32)


def test_lora_linear_bias_dtype_must_match_x():
    """The public API refuses a bias in another dtype than x (so lora_cpp's branch for such a bias
    is never reached through it)."""
    t, _ = _leaves(torch.float32, (40, 24), 16, 3, bias=True, train_w=False)
    with vfm.use_backend("cpp"), pytest.raises(ValueError, match="bias dtype"):
        vfm.functional.lora_linear(t["x"], t["w"], t["b"].double(), t["a"], t["bb"], 1.0)


# ---------------------------------------------------------------------- public AdaLoRA --
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("x_shape,d_out", [((40, 24), 16), ((40, 24), 64), ((8, 24), 16)])
def test_adalora_cpp_matches_torch(dtype, p, x_shape, d_out):
    t, gy = _leaves(dtype, x_shape, d_out, 5, bias=True, train_w=d_out == 16, seed=21)
    e = torch.randn(5, 1, dtype=dtype)
    e[1] = 0.0  # a pruned rank: lora_e still gets its gradient
    t["e"] = e.requires_grad_(True)
    ranknum = torch.tensor([5.0])

    def fn(x, w, b, a, bb, e):
        return vfm.functional.adalora_linear(x, w, b, a, e, bb, 2.0, ranknum, dropout_p=p, seed=9)

    fwd, bwd = _compare(fn, t, gy, dtype)
    _expect_paths(fwd, bwd, x_shape[0], x_shape[1], d_out, dropout=p > 0)
