"""The knowledge cross-entropy device path: prologue and backward-scale kernels, and the public op on it.

Runs on CPU tensors through the Triton interpreter; ``VFM_KCE_DEVICE_PATH=1`` sends CPU calls through
the code path CUDA tensors take.  Each kernel is compared with the torch computation it replaces,
written out here independently; the public op on the device path with ``F.cross_entropy`` and with
the CPU path of the same backend.
"""

from __future__ import annotations

import os

if os.environ.get("VFM_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import vfm  # noqa: E402
from vfm.functional import knowledge_cross_entropy as kce  # noqa: E402
from vfm.kernels.kce_prologue import ERR_GROUP, ERR_TARGET, kce_prologue, kce_scale_grad_  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEV = "cuda" if os.environ.get("VFM_TEST_GPU", "0") == "1" else "cpu"
IGNORE = -100


def expected_scales(target, soft, weight, items, reduction, coefs, ignore_index=IGNORE):
    """The per-row scales as DESIGN.md defines them, in float64 then rounded like fp32 math would."""
    valid = (target != ignore_index).double()
    m1 = soft.double() if soft is not None else valid
    if reduction == "mean":
        if items is not None:
            d0 = d1 = float(items)
        else:
            w_y = torch.ones_like(valid) if weight is None else weight.double()[target.clamp(0, weight.shape[0] - 1)]
            d0 = float((w_y * valid).sum())
            d1 = float(m1.sum())
        b0 = valid * (1.0 / d0 if d0 > 0 else 0.0)
        b1 = m1 * (1.0 / d1 if d1 > 0 else 0.0)
    else:
        b0, b1 = valid, m1
    c = coefs
    return torch.stack([b0 * c[0], b1 * c[1], b1 * c[2], b1 * c[3]]).float()


def _target(n, v, seed, frac_ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < frac_ignored] = IGNORE
    return t, g


@pytest.mark.parametrize("reduction,items", [("mean", None), ("mean", 7.0), ("mean", "tensor"), ("sum", None),
                                             ("none", None)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_prologue_scales_match_the_formula(reduction, weighted, soft, items):
    n, v = 37, 11
    target, g = _target(n, v, seed=hash((reduction, weighted, soft, str(items))) % 1000)
    weight = torch.rand(v, generator=g) + 0.5 if weighted else None
    soft_mask = torch.rand(n, generator=g) < 0.6 if soft else None
    num = torch.tensor(5, dtype=torch.int64) if items == "tensor" else items
    coefs = (1.0, 0.5, 0.1, 1e-4)
    scales, gids, err = kce_prologue(target.to(DEV), soft_mask.to(DEV) if soft else None,
                                     weight.to(DEV) if weighted else None, None, None,
                                     num.to(DEV) if isinstance(num, torch.Tensor) else num,
                                     vocab=v, ignore_index=IGNORE, mean=reduction == "mean", coefs=coefs)
    ref = expected_scales(target, soft_mask, weight, 5 if items == "tensor" else items, reduction, coefs)
    assert gids is None and int(err) == 0
    torch.testing.assert_close(scales.cpu(), ref, rtol=2e-7, atol=0)


def test_prologue_many_blocks_and_empty_denominators():
    n, v = 5000, 9  # > one 4096-row block
    target, g = _target(n, v, seed=3)
    scales, _, _ = kce_prologue(target.to(DEV), None, None, None, None, None, vocab=v, ignore_index=IGNORE,
                                mean=True, coefs=(2.0, 0.0, 0.0, 1.0))
    torch.testing.assert_close(scales.cpu(), expected_scales(target, None, None, None, "mean", (2.0, 0, 0, 1.0)),
                               rtol=2e-7, atol=0)
    all_ignored = torch.full((6,), IGNORE)
    scales, _, err = kce_prologue(all_ignored.to(DEV), None, None, None, None, None, vocab=v, ignore_index=IGNORE,
                                  mean=True, coefs=(1.0, 1.0, 1.0, 1.0))
    assert int(err) == 0 and torch.equal(scales.cpu(), torch.zeros(4, 6))  # 0 rows: 0, not NaN


def test_prologue_group_ids_and_range_errors():
    n, v, groups = 23, 40, 6
    target, g = _target(n, v, seed=5)
    gid = torch.randint(-1, groups, (n,), generator=g, dtype=torch.int32)
    unconstrained = torch.tensor([False, True, False, False, True, False])
    _, gout, err = kce_prologue(target.to(DEV), None, None, gid.to(DEV), unconstrained.to(DEV), None, vocab=v,
                                ignore_index=IGNORE, mean=True, coefs=(1.0, 0.0, 0.0, 0.0))
    expect = [-1 if (x < 0 or unconstrained[x]) else int(x) for x in gid.tolist()]
    assert int(err) == 0 and gout.dtype == torch.int32 and gout.cpu().tolist() == expect
    # a dense mask: row i is group i
    unc_rows = torch.rand(n, generator=g) < 0.4
    _, gout, _ = kce_prologue(target.to(DEV), None, None, None, unc_rows.to(DEV), None, vocab=v, ignore_index=IGNORE,
                              mean=True, coefs=(1.0, 0.0, 0.0, 0.0), dense_groups=True)
    assert gout.cpu().tolist() == [-1 if unc_rows[i] else i for i in range(n)]
    if DEV == "cuda":
        return  # a range error is a device-side assertion there (it would end the CUDA context)
    bad_t = target.clone()
    bad_t[2] = v  # out of range
    bad_g = gid.clone()
    bad_g[4] = groups
    for t, gi, bits in ((bad_t, gid, ERR_TARGET), (target, bad_g, ERR_GROUP), (bad_t, bad_g, ERR_TARGET | ERR_GROUP)):
        _, _, err = kce_prologue(t, None, None, gi, unconstrained, None, vocab=v, ignore_index=IGNORE, mean=True,
                                 coefs=(1.0, 0.0, 0.0, 0.0))
        assert int(err) == bits
    # ignore_index inside [0, V): those rows are not checked nor counted
    t = torch.tensor([3, 3, 1, v + 5])
    scales, _, err = kce_prologue(t, None, None, None, None, None, vocab=v, ignore_index=3, mean=True,
                                  coefs=(1.0, 0.0, 0.0, 0.0))
    assert int(err) == ERR_TARGET
    scales, _, err = kce_prologue(t[:3], None, None, None, None, None, vocab=v, ignore_index=3, mean=True,
                                  coefs=(1.0, 0.0, 0.0, 0.0))
    assert int(err) == 0 and scales[0].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factor", [1.0, 2.5, 0.0, -3.0, math.nan, math.inf])
def test_scale_grad_matches_torch(dtype, factor):
    g = torch.Generator().manual_seed(1)
    wide = (torch.randn(5, 150, generator=g) * 3).to(dtype)
    grad = wide[:, :137]  # row stride 150
    grad[0, 0] = math.inf
    expect = grad * torch.tensor(factor).to(dtype)
    out = kce_scale_grad_(grad.to(DEV), torch.tensor(factor, device=DEV))
    # the interpreter rounds fp32 -> bf16 differently from torch (one bf16 ulp); on a GPU it is exact
    rtol = 2.0 ** -7 if dtype == torch.bfloat16 and DEV == "cpu" else 0.0
    torch.testing.assert_close(out.cpu(), expect, rtol=rtol, atol=0, equal_nan=True)
    if factor == 1.0:
        assert torch.equal(out.cpu(), grad)


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setenv("VFM_KCE_DEVICE_PATH", "1")
    with vfm.use_backend("triton"):
        yield


def _run(flag, monkeypatch, z0, target, upstream, reduction, **opts):
    monkeypatch.setenv("VFM_KCE_DEVICE_PATH", flag)
    opts = {k: _dev(o) for k, o in opts.items()}
    with vfm.use_backend("triton"):
        z = z0.to(DEV).detach().clone().requires_grad_()
        loss = kce(z, target.to(DEV), reduction=reduction, **opts)
        if reduction == "none":
            loss.backward(torch.full_like(loss, upstream))
        else:
            loss.backward(torch.tensor(upstream, device=DEV))
    return loss.detach().cpu(), z.grad.cpu()


def _dev(o):
    if isinstance(o, torch.Tensor):
        return o.to(DEV)
    if isinstance(o, tuple):
        return tuple(_dev(x) for x in o)
    return o


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", [1.0, 2.5, 0.0, math.nan])
def test_public_op_on_device_path_matches_cross_entropy(monkeypatch, reduction, upstream):
    z0 = torch.randn(9, 33, generator=torch.Generator().manual_seed(2)) * 2
    target, _ = _target(9, 33, seed=4)
    target[0] = 1
    loss, grad = _run("1", monkeypatch, z0, target, upstream, reduction)
    z = z0.clone().requires_grad_()
    ref = F.cross_entropy(z, target, ignore_index=IGNORE, reduction=reduction)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    # the fused gradient times the upstream one (NaN upstream: NaN everywhere, also in ignored rows,
    # as before; torch's own cross-entropy leaves ignored rows at 0 there)
    torch.testing.assert_close(grad, z.grad * upstream, rtol=1e-5, atol=1e-6, equal_nan=True)
    if math.isnan(upstream):
        assert grad.isnan().all()


@pytest.mark.parametrize("reduction,items", [("mean", None), ("mean", 13), ("mean", "tensor"), ("sum", None),
                                             ("none", None)])
def test_device_path_equals_cpu_path_for_every_term(monkeypatch, reduction, items):
    g = torch.Generator().manual_seed(7)
    n, v = 10, 40
    z0 = torch.randn(n, v, generator=g) * 2
    target, _ = _target(n, v, seed=8)
    masks = torch.rand(4, v, generator=g) < 0.5
    masks[1] = True  # a group that allows everything: unconstrained
    gid = torch.randint(-1, 4, (n,), generator=g)
    opts = dict(teacher_logits=torch.randn(n, v, generator=g), kd_weight=0.5, temperature=2.0,
                allowed=(masks, gid), penalty_weight=0.1, z_loss=1e-3, weight=torch.rand(v, generator=g) + 0.5,
                soft_mask=torch.rand(n, generator=g) < 0.7)
    if items is not None:
        opts["num_items_in_batch"] = torch.tensor(13) if items == "tensor" else items
    a = _run("0", monkeypatch, z0, target, 0.5, reduction, **opts)
    b = _run("1", monkeypatch, z0, target, 0.5, reduction, **opts)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(b[1], a[1], rtol=1e-6, atol=0)


def test_device_path_dense_mask_inplace_and_errors(device_path):
    g = torch.Generator().manual_seed(9)
    n, v = 6, 40
    z0 = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    allowed = torch.rand(n, v, generator=g) < 0.5
    allowed[:, target] = True
    allowed[0] = True
    z = z0.clone().to(DEV).requires_grad_()
    y = z * 1.0
    (3.0 * kce(y, target.to(DEV), allowed=allowed.to(DEV), penalty_weight=0.2, inplace_backward=True)).backward()
    z2 = z0.clone().requires_grad_()
    zf = z2
    lse = torch.logsumexp(zf, -1)
    lse_a = torch.logsumexp(zf.masked_fill(~allowed, -math.inf), -1)
    pen = torch.where(allowed.all(-1), torch.zeros_like(lse), lse - lse_a)
    (3.0 * (F.cross_entropy(zf, target) + 0.2 * pen.mean())).backward()
    torch.testing.assert_close(z.grad.cpu(), z2.grad, rtol=1e-5, atol=1e-6)
    no_groups = (torch.zeros(0, v, dtype=torch.bool), torch.full((n,), -1))  # G = 0: every row unconstrained
    torch.testing.assert_close(kce(z0.to(DEV), target.to(DEV), allowed=_dev(no_groups), penalty_weight=1.0).cpu(),
                               F.cross_entropy(z0, target))
    if DEV == "cuda":
        return  # range errors are device-side assertions there
    bad = target.clone()
    bad[1] = v
    with pytest.raises(ValueError, match=r"target holds values outside \[0, 40\).*\[40\]"):
        kce(z0, bad)
    with pytest.raises(ValueError, match=r"allowed group_ids must lie in \[-1, 2\); got \[5\]"):
        kce(z0, target, allowed=(allowed[:2], torch.tensor([0, 1, 5, 0, -1, 1])))


def test_device_path_retain_graph(device_path):
    x = torch.randn(4, 6, device=DEV, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3], device=DEV)
    loss = kce(x * 1, t, reduction="none")  # per-row upstream: out of place, a second backward works
    g1 = torch.autograd.grad(loss, x, torch.ones(4), retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, x, 2 * torch.ones(4))[0]
    torch.testing.assert_close(g2, 2 * g1)
    loss = kce(x * 1, t)
    loss.backward(torch.tensor(2.0, device=DEV), retain_graph=True)  # scaled in place: the buffer is handed over
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.skipif(DEV == "cuda", reason="counts the interpreter's launches")
def test_device_path_launch_counts(device_path):
    from triton.runtime.interpreter import InterpretedFunction
    from torch.utils._python_dispatch import TorchDispatchMode

    kernels, ops = [], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        kernels.append(self.__name__)
        with torch.utils._python_dispatch._disable_current_modes():
            return orig(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        z = torch.randn(5, 20, requires_grad=True)
        t, teacher = torch.tensor([1, -100, 3, 4, 0]), torch.randn(5, 20)
        with Ops():
            kce(z, t, teacher_logits=teacher, kd_weight=0.5).backward()
    finally:
        InterpretedFunction.run = orig
    assert kernels == ["_kce_prologue_kernel", "_kce_fwd_kernel", "_kce_scale_kernel"]
    # the only host read is the CPU-only error word; the only compute ops are that read, the loss
    # sum and autograd's own seed (ones_like)
    assert ops.count("_local_scalar_dense") == 1
    compute = [o for o in ops if o not in ("view", "detach", "empty", "empty_like", "_local_scalar_dense")]
    assert sorted(compute) == ["ones_like", "sum"], ops
