"""The low-rank adapter ops against an independent oracle: plain autograd formulas and a pure-Python hash.

The oracle (``plain_*`` below) shares no code with vfm except the dropout keep-mask, which is
itself checked against a pure-Python (arbitrary-precision integer) implementation of the hash
that the kernel contract (``vfm.ops.lora_reference``) defines.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import vfm
from vfm import _registry
from vfm.functional import adalora_linear, dora_linear, lora_linear, lora_linear_multi
from vfm.ops.lora_reference import dropout_hash, dropout_keep_mask

OPS = ("lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi")
BACKENDS = {op: vfm.available_backends(op, "cpu") for op in OPS}



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread

# ------------------------------------------------------------------------------ oracle --
def py_fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def py_hash(seed, offset):
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    lo, hi = offset & 0xFFFFFFFF, offset >> 32
    return py_fmix32(py_fmix32(lo ^ k0) ^ k1 ^ ((hi * 0x9E3779B9) & 0xFFFFFFFF))


def py_keep(seed, n_rows, n_cols, p):
    thr = math.floor(p * 2 ** 32)
    return torch.tensor([[py_hash(seed, i * n_cols + j) >= thr for j in range(n_cols)] for i in range(n_rows)])


def dropped(x2d, seed, p):
    """D(x) with an explicit mask (autograd differentiates through the multiplication)."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p)
    return x2d * keep.to(x2d.dtype) / (1.0 - p)


def plain_lora(x, w, b, a, bb, scaling, p=0.0, seed=0):
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ w.t() + (b if b is not None else 0) + scaling * ((dropped(x2d, seed, p) @ a.t()) @ bb.t())
    return y.reshape(*x.shape[:-1], w.shape[0])


def plain_dora(x, w, b, a, bb, m, scaling, p=0.0, seed=0):
    x2d = x.reshape(-1, x.shape[-1])
    g = m / torch.linalg.norm(w + scaling * (bb @ a), dim=1).detach()
    u = dropped(x2d, seed, p)
    bias = b if b is not None else 0
    if p > 0:
        y = x2d @ w.t() + bias + (g - 1) * (u @ w.t()) + g * scaling * ((u @ a.t()) @ bb.t())
    else:
        y = g * (x2d @ w.t()) + bias + g * scaling * ((x2d @ a.t()) @ bb.t())
    return y.reshape(*x.shape[:-1], w.shape[0])


def plain_adalora(x, w, b, a, e, bb, scaling, ranknum, p=0.0, seed=0):
    x2d = x.reshape(-1, x.shape[-1])
    low = (dropped(x2d, seed, p) @ (a * e.reshape(-1, 1)).t() @ bb.t()) * scaling / (ranknum + 1e-5)
    y = x2d @ w.t() + (b if b is not None else 0) + low
    return y.reshape(*x.shape[:-1], w.shape[0])


def plain_multi(x, w, b, a_stack, b_stack, scalings, ids, p=0.0, seed=0):
    x2d = x.reshape(-1, x.shape[-1])
    u = dropped(x2d, seed, p)
    rows = []
    for i in range(x2d.shape[0]):  # one row at a time: as plain as it gets
        k = int(ids.reshape(-1)[i])
        row = x2d[i] @ w.t() + (b if b is not None else 0)
        if k >= 0:
            row = row + scalings[k] * ((u[i] @ a_stack[k].t()) @ b_stack[k].t())
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], w.shape[0])


def make(n=6, d_in=5, d_out=7, r=3, dtype=torch.float64, lead=(2, 3), bias=True, k=3, seed=0, grad_w=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    t = dict(
        x=rnd(*lead, d_in),
        w=rnd(d_out, d_in, scale=0.5).requires_grad_(grad_w),
        b=rnd(d_out) if bias else None,
        a=rnd(r, d_in, scale=0.5),
        bb=rnd(d_out, r, scale=0.5),
        m=(torch.rand(d_out, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(),
        e=rnd(r, 1),
        a_stack=rnd(k, r, d_in, scale=0.5),
        b_stack=rnd(k, d_out, r, scale=0.5),
    )
    return t


def call(kind, t, p=0.0, seed=7, plain=False, scaling=0.75, ranknum=3.0, ids=None, **kw):
    if kind == "lora":
        args = (t["x"], t["w"], t["b"], t["a"], t["bb"], scaling)
        return plain_lora(*args, p, seed) if plain else lora_linear(*args, dropout_p=p, seed=seed, **kw)
    if kind == "dora":
        args = (t["x"], t["w"], t["b"], t["a"], t["bb"], t["m"], scaling)
        return plain_dora(*args, p, seed) if plain else dora_linear(*args, dropout_p=p, seed=seed, **kw)
    if kind == "adalora":
        rn = torch.tensor([ranknum], dtype=t["a"].dtype)
        args = (t["x"], t["w"], t["b"], t["a"], t["e"], t["bb"], scaling, rn)
        return plain_adalora(*args, p, seed) if plain else adalora_linear(*args, dropout_p=p, seed=seed, **kw)
    n_rows = t["x"].reshape(-1, t["x"].shape[-1]).shape[0]
    if ids is None:
        ids = torch.arange(n_rows) % (t["a_stack"].shape[0] + 1) - 1
    scalings = [0.5, 1.25, 2.0][: t["a_stack"].shape[0]]
    args = (t["x"], t["w"], t["b"], t["a_stack"], t["b_stack"], scalings, ids)
    return plain_multi(*args, p, seed) if plain else lora_linear_multi(*args, dropout_p=p, seed=seed, **kw)


def inputs_of(kind, t):
    names = {"lora": ["x", "w", "b", "a", "bb"], "dora": ["x", "w", "b", "a", "bb", "m"],
             "adalora": ["x", "w", "b", "a", "e", "bb"], "multi": ["x", "w", "b", "a_stack", "b_stack"]}[kind]
    return [t[n] for n in names if t[n] is not None and t[n].requires_grad]


KINDS = ["lora", "dora", "adalora", "multi"]


# ------------------------------------------------------------------------------ hash --
def test_hash_matches_pure_python_including_offsets_beyond_32_bits():
    seeds = [0, 1, 12345, 2 ** 32 - 1, 2 ** 32, 0x0123456789ABCDEF, 2 ** 63 - 2]
    offsets = [0, 1, 2, 1000, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 7, 3 * 2 ** 33 + 5, 2 ** 40 + 123]
    got = torch.stack([dropout_hash(s, torch.tensor(offsets)) for s in seeds])
    want = torch.tensor([[py_hash(s, o) for o in offsets] for s in seeds])
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) < 2 ** 32


def test_keep_mask_rows_past_32_bit_offsets():
    n_cols, row0 = 1000, (2 ** 32) // 1000 - 2  # rows whose offsets cross 2^32
    got = dropout_keep_mask(0x1234_5678_9ABC, 5, n_cols, 0.3, row0=row0)
    offsets = (torch.arange(5)[:, None] + row0) * n_cols + torch.arange(n_cols)
    assert int(offsets.max()) > 2 ** 32 > int(offsets.min())
    assert torch.equal(got, dropout_hash(0x1234_5678_9ABC, offsets) >= math.floor(0.3 * 2 ** 32))
    thr = math.floor(0.3 * 2 ** 32)
    for i, j in ((0, 0), (2, 999), (4, 500), (3, 17)):
        assert bool(got[i, j]) == (py_hash(0x1234_5678_9ABC, int(offsets[i, j])) >= thr)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_matches_pure_python_and_keeps_one_minus_p(p):
    assert torch.equal(dropout_keep_mask(99, 5, 13, p), py_keep(99, 5, 13, p))
    offsets = torch.arange(300 * 1000).view(300, 1000)  # several chunks of the in-place form
    assert torch.equal(dropout_keep_mask(7, 300, 1000, p), dropout_hash(7, offsets) >= math.floor(p * 2 ** 32))
    big = dropout_keep_mask(3, 512, 512, p)
    assert abs(big.float().mean().item() - (1 - p)) < 0.01
    other = dropout_keep_mask(4, 512, 512, p)  # another seed: an independent-looking mask
    agree = (big == other).float().mean().item()
    assert abs(agree - (p * p + (1 - p) * (1 - p))) < 0.01


# ------------------------------------------------------------------ against the oracle --
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_float64_values_and_gradients_match_plain_autograd(kind, p, bias):
    t = make(bias=bias)
    y = call(kind, t, p)
    ref = call(kind, t, p, plain=True)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(ref)
    ins = inputs_of(kind, t)
    got = torch.autograd.grad(y, ins, up)
    want = torch.autograd.grad(ref, ins, up)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(kind, p):
    t = make(lead=(4,), d_in=4, d_out=3, r=2, k=2)
    names = [n for n in t if t[n] is not None and t[n].requires_grad]
    if kind == "dora":  # the weight norm is detached (PEFT): finite differences of W, A, B would see it move
        names = ["x", "b", "m"]

    def fn(*args):
        return call(kind, dict(t, **dict(zip(names, args))), p)

    assert torch.autograd.gradcheck(fn, [t[n] for n in names], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_against_float64_oracle(kind, dtype):
    t = make(dtype=dtype, n=0, lead=(37,), d_in=24, d_out=40, r=8, seed=3)
    t64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}
    y = call(kind, t, 0.25)
    ref = call(kind, t64, 0.25, plain=True)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=tol * scale)
    up = torch.randn_like(ref)
    for g1, g2 in zip(torch.autograd.grad(y, inputs_of(kind, t), up.to(dtype)),
                      torch.autograd.grad(ref, inputs_of(kind, t64), up)):
        assert g1.dtype == dtype
        torch.testing.assert_close(g1.double(), g2, rtol=0, atol=2 * tol * (g2.abs().max().item() or 1.0))


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_fp32_adapter_on_bf16_base_runs_the_branch_in_fp32(kind):
    t = make(dtype=torch.float32, lead=(9,), d_in=16, d_out=12, r=4, seed=5)
    for name in ("x", "w", "b"):
        t[name] = t[name].detach().to(torch.bfloat16).requires_grad_()
    y = call(kind, t, 0.2)
    assert y.dtype == torch.bfloat16
    tp = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t.items()}
    ref = call(kind, tp, 0.2, plain=True)
    torch.testing.assert_close(y.float(), ref.detach(), rtol=0, atol=0.01 * ref.abs().max().item())
    up = torch.randn(ref.shape)
    got = torch.autograd.grad(y, [t["a"], t["x"]], up.to(torch.bfloat16))
    want = torch.autograd.grad(ref, [tp["a"], tp["x"]], up)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1.float(), g2, rtol=0, atol=0.03 * g2.abs().max().item())


def test_non_contiguous_input_and_transposed_weight():
    t = make(dtype=torch.float32, lead=(10,), d_in=6, d_out=5)
    x = t["x"].detach().t().contiguous().t().requires_grad_()  # (10, 6) with stride(-1) = 10
    assert x.stride(-1) != 1
    w = t["w"].detach().t().contiguous().t().requires_grad_()  # column-major (out, in)
    args = (x, w, t["b"], t["a"], t["bb"], 0.5)
    y = lora_linear(*args, dropout_p=0.3, seed=1)
    ref = plain_lora(*args, 0.3, 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(y.sum(), [x, w, t["a"]])
    g2 = torch.autograd.grad(ref.sum(), [x, w, t["a"]])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_no_work():
    t = make(grad_w=False)
    y = call("lora", t)
    y.sum().backward()
    assert t["w"].grad is None and t["x"].grad is not None and t["a"].grad is not None


# --------------------------------------------------------------------------- dropout --
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_deterministic_per_seed_and_seed_none_follows_manual_seed(kind):
    t = make(dtype=torch.float32, lead=(16,), d_in=32, d_out=8)
    a = call(kind, t, 0.5, seed=11)
    assert torch.equal(a, call(kind, t, 0.5, seed=11))
    assert not torch.equal(a, call(kind, t, 0.5, seed=12))
    torch.manual_seed(5)
    b = call(kind, t, 0.5, seed=None)
    torch.manual_seed(5)
    assert torch.equal(b, call(kind, t, 0.5, seed=None))
    assert not torch.equal(b, call(kind, t, 0.5, seed=None))  # the generator moved on
    # eval mode and p = 0 ignore the seed and are the no-dropout layer
    ref = call(kind, t, 0.0)
    assert torch.equal(call(kind, t, 0.5, seed=1, training=False), ref)


def test_dropout_gradient_equals_explicit_mask_autograd_in_float32():
    t = make(dtype=torch.float32, lead=(64,), d_in=48, d_out=24, r=8)
    y = call("lora", t, 0.35, seed=2024)
    keep = dropout_keep_mask(2024, 64, 48, 0.35)
    x = t["x"]
    ref = x @ t["w"].t() + t["b"] + 0.75 * ((torch.where(keep, x / 0.65, 0) @ t["a"].t()) @ t["bb"].t())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ins = inputs_of("lora", t)
    for g1, g2 in zip(torch.autograd.grad(y.square().sum(), ins), torch.autograd.grad(ref.square().sum(), ins)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_recompute_reuses_the_drawn_seed(kind):
    t = make(dtype=torch.float32, lead=(12,), d_in=16, d_out=8)
    ins = inputs_of(kind, t)

    def fn(x):
        t2 = dict(t, x=x)
        return call(kind, t2, 0.5, seed=None).tanh()

    torch.manual_seed(3)
    plain = fn(t["x"])
    g_plain = torch.autograd.grad(plain.sum(), ins)
    torch.manual_seed(3)
    ck = torch.utils.checkpoint.checkpoint(fn, t["x"], use_reentrant=False)
    torch.manual_seed(99)  # the recompute must not draw a new seed from the moved generator
    g_ck = torch.autograd.grad(ck.sum(), ins)
    assert torch.equal(plain, ck)
    for a, b in zip(g_plain, g_ck):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------ multi-adapter --
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_multi_equals_one_adapter_at_a_time(p):
    t = make(dtype=torch.float32, lead=(3, 7), d_in=10, d_out=6, r=4, k=3)
    ids = torch.tensor([2, 0, -1, 1, 1, 2, 0, 0, -1, 2, 1, 0, 0, 2, 1, -1, 2, 2, 0, 1, 0]).view(3, 7)
    y = lora_linear_multi(t["x"], t["w"], t["b"], t["a_stack"], t["b_stack"], [0.5, 1.25, 2.0], ids,
                          dropout_p=p, seed=5)
    y.backward(torch.ones_like(y))
    got = {n: t[n].grad.clone() for n in ("x", "a_stack", "b_stack", "w", "b")}
    for n in got:
        t[n].grad = None
    scal = [0.5, 1.25, 2.0]
    total = torch.zeros_like(y)
    for k in range(-1, 3):
        rows = (ids == k).unsqueeze(-1).float()
        if k < 0:
            yk = F.linear(t["x"], t["w"], t["b"])
        else:  # the same seed gives the same mask for these rows: offsets are the caller's
            yk = lora_linear(t["x"], t["w"], t["b"], t["a_stack"][k], t["b_stack"][k], scal[k], dropout_p=p, seed=5)
        total = total + yk * rows
    torch.testing.assert_close(y, total, rtol=1e-5, atol=1e-5)
    total.backward(torch.ones_like(total))
    for n, g in got.items():
        torch.testing.assert_close(g, t[n].grad, rtol=1e-5, atol=1e-5)


def test_multi_padded_ranks_and_unused_adapter():
    t = make(dtype=torch.float32, lead=(8,), d_in=6, d_out=5, r=4, k=3)
    with torch.no_grad():  # adapter 1 has rank 2, zero-padded to 4
        t["a_stack"][1, 2:] = 0
        t["b_stack"][1, :, 2:] = 0
    ids = torch.tensor([0, 1, 1, 0, -1, 1, 0, 0])  # adapter 2 unused
    y = lora_linear_multi(t["x"], t["w"], t["b"], t["a_stack"], t["b_stack"], [1.0, 2.0, 3.0], ids)
    y.sum().backward()
    assert torch.count_nonzero(t["a_stack"].grad[2]) == 0 and torch.count_nonzero(t["b_stack"].grad[2]) == 0
    ref = lora_linear(t["x"], t["w"], t["b"], t["a_stack"][1, :2], t["b_stack"][1, :, :2], 2.0)
    torch.testing.assert_close(y[ids == 1], ref[ids == 1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- misc --
def test_adalora_zero_ranks_contribute_nothing_but_e_still_learns():
    t = make()
    with torch.no_grad():
        t["e"].zero_()  # PEFT's initial state
    y = call("adalora", t)
    torch.testing.assert_close(y, F.linear(t["x"], t["w"], t["b"]))
    y.square().sum().backward()
    assert torch.count_nonzero(t["a"].grad) == 0 and torch.count_nonzero(t["bb"].grad) == 0
    assert torch.count_nonzero(t["e"].grad) == t["e"].numel()  # PEFT's gradient: training can start


def test_autocast_casts_inputs_like_f_linear():
    t = make(dtype=torch.float32, lead=(9,), d_in=16, d_out=12, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call("lora", t)
        ref = plain_lora(t["x"], t["w"], t["b"], t["a"], t["bb"], 0.75)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=0.05 * ref.abs().max().item())
    y.float().sum().backward()
    assert t["a"].grad.dtype == torch.float32


@pytest.mark.parametrize("op", OPS)
def test_forced_torch_backend_runs_and_is_listed(op):
    assert "torch" in BACKENDS[op]
    t = make(dtype=torch.float32)
    kind = {"lora_linear": "lora", "dora_linear": "dora", "adalora_linear": "adalora", "lora_linear_multi": "multi"}[op]
    before = _registry.CALLS[(op, "torch")]
    with vfm.use_backend("torch"):
        y = call(kind, t, 0.2)
        y.sum().backward()
    assert _registry.CALLS[(op, "torch")] == before + 2  # forward and backward
    with vfm.use_backend("cuda"):
        with pytest.raises(vfm.BackendUnavailableError, match="cuda"):
            call(kind, t)


# ------------------------------------------------------------------- property-based --
@seed(4321)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 9),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 10),
    r=st.integers(1, 5),
    p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    drop_seed=st.integers(0, 2 ** 63 - 2),
    bias=st.booleans(),
)
def test_property_random_shapes_against_oracle(kind, n, d_in, d_out, r, p, drop_seed, bias):
    t = make(lead=(n,), d_in=d_in, d_out=d_out, r=r, bias=bias, k=2, seed=n * 100 + d_in)
    y = call(kind, t, p, seed=drop_seed)
    ref = call(kind, t, p, seed=drop_seed, plain=True)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    ins = inputs_of(kind, t)
    up = torch.randn_like(ref)
    for g1, g2 in zip(torch.autograd.grad(y, ins, up), torch.autograd.grad(ref, ins, up)):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)
