"""Public behaviour of knowledge_cross_entropy: errors, parts, masks, autograd, compile, opcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import vfm
from vfm.functional import knowledge_cross_entropy as kce
from kce_cases import CASES, make_inputs
from plain_oracle import plain_knowledge_ce

CPU_BACKENDS = vfm.available_backends("knowledge_cross_entropy", "cpu")
AUTO_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]


# ------------------------------------------------------------------------- bad input --
def _base(n=4, v=7):
    return torch.randn(n, v), torch.randint(0, v, (n,))


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(z_loss=-0.1), ValueError, "z_loss"),
        (dict(kd="mse"), ValueError, "kd"),
        (dict(kd="jsd", jsd_beta=1.0, kd_weight=1.0, teacher_logits=torch.randn(4, 7)), ValueError, "jsd_beta"),
        (dict(penalty="hard"), ValueError, "penalty"),
        (dict(kd_weight=0.5), ValueError, "teacher"),
        (dict(penalty_weight=0.5), ValueError, "allowed"),
        (dict(teacher_logits=torch.randn(4, 8), kd_weight=1.0), ValueError, "teacher vocabulary 8"),
        (dict(teacher_logits=torch.randn(4, 7), teacher_topk=(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))),
         ValueError, "either"),
        (dict(teacher_topk=(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2)), kd="jsd", kd_weight=1.0),
         ValueError, "kd='kl' only"),
        (dict(teacher_topk=(torch.tensor([[0, 0]] * 4), torch.zeros(4, 2)), kd_weight=1.0), ValueError, "repeat"),
        (dict(teacher_topk=(torch.tensor([[0, 9]] * 4), torch.zeros(4, 2)), kd_weight=1.0), ValueError, "[0, 7)"),
        (dict(allowed=torch.ones(4, 7)), TypeError, "allowed"),
        (dict(allowed=torch.ones(4, 6, dtype=torch.bool)), ValueError, "allowed"),
        (dict(allowed=(torch.ones(2, 7, dtype=torch.bool), torch.tensor([0, 1, 2, -1]))), ValueError, "group_ids"),
        (dict(soft_mask=torch.ones(4)), TypeError, "soft_mask"),
        (dict(soft_mask=torch.ones(3, dtype=torch.bool)), ValueError, "soft_mask"),
        (dict(weight=torch.ones(6)), ValueError, "weight"),
        (dict(num_items_in_batch=4, reduction="sum"), ValueError, "num_items_in_batch"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
    ],
)
def test_bad_options_name_the_argument(kwargs, exc, needle):
    logits, target = _base()
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        kce(logits, target, **kwargs)


def test_bad_tensors_name_the_argument():
    logits, target = _base()
    with pytest.raises(ValueError, match=r"outside \[0, 7\).*\[7, 9\]"):
        kce(logits, torch.tensor([0, 7, 9, -100]))
    with pytest.raises(ValueError, match="target shape"):
        kce(logits, target[:3])
    with pytest.raises(TypeError, match="target must be an integer"):
        kce(logits, target.float())
    with pytest.raises(TypeError, match="logits must be a floating"):
        kce(logits.long(), target)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        kce(logits.tolist(), target)


# ------------------------------------------------------------------ semantics / parts --
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_parts_add_up_and_match_oracle_terms(reduction):
    logits, target, opts = make_inputs(CASES["everything"], 11, 19, seed=3)
    target[0] = 0
    opts["allowed"][0][:, 0] = False  # make some gold labels fall outside the allowed set
    parts = kce(logits, target, reduction=reduction, return_parts=True, **opts)
    ref, terms, n_out = plain_knowledge_ce(logits, target, reduction=reduction, return_terms=True, **opts)
    torch.testing.assert_close(parts.loss.double(), ref, rtol=2e-5, atol=2e-5)
    for got, want in zip((parts.ce, parts.kd, parts.penalty, parts.z_loss), terms):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    total = parts.ce + parts.kd + parts.penalty + parts.z_loss
    torch.testing.assert_close(total, parts.loss.detach(), rtol=1e-5, atol=1e-5)
    got_out = parts.n_outside_allowed if reduction != "none" else parts.n_outside_allowed.sum()
    assert int(got_out) == int(n_out) > 0


def test_soft_mask_lets_kd_act_on_unlabelled_rows():
    logits, _, opts = make_inputs(CASES["kl_t2"], 6, 10)
    target = torch.full((6,), -100)
    x = logits.clone().requires_grad_()
    loss = kce(x, target, soft_mask=torch.ones(6, dtype=torch.bool), **opts)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0
    ref = plain_knowledge_ce(logits, target, soft_mask=torch.ones(6, dtype=torch.bool), **opts)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_unconstrained_and_empty_rows_add_no_penalty():
    logits = torch.randn(3, 6)
    target = torch.tensor([0, 1, 2])
    allowed = torch.zeros(3, 6, dtype=torch.bool)
    allowed[0] = True  # every label allowed
    # row 1 empty, row 2 unconstrained via -1 in grouped form below
    parts = kce(logits, target, allowed=allowed[:2].repeat(2, 1)[:3], penalty_weight=1.0, return_parts=True)
    assert parts.penalty.item() == 0.0
    parts = kce(logits, target, allowed=(torch.ones(1, 6, dtype=torch.bool), torch.tensor([-1, -1, 0])),
                penalty_weight=1.0, return_parts=True)
    assert parts.penalty.item() == 0.0


def test_cross_entropy_matches_torch_for_every_ce_option():
    logits = torch.randn(12, 9, dtype=torch.float64)
    target = torch.randint(0, 9, (12,))
    target[::4] = 3
    target[1] = -1
    w = torch.rand(9, dtype=torch.float64) + 0.1
    for kwargs in (dict(), dict(weight=w), dict(label_smoothing=0.3), dict(weight=w, label_smoothing=0.3),
                   dict(ignore_index=3), dict(ignore_index=3, weight=w, label_smoothing=0.1)):
        ii = kwargs.get("ignore_index", -100)
        t = target.clone()
        t[1] = ii
        for reduction in ("mean", "sum", "none"):
            with vfm.use_backend("torch"):
                got = kce(logits, t, reduction=reduction, **kwargs)
            want = F.cross_entropy(logits, t, reduction=reduction, **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ autograd --
def test_reference_gradcheck_float64():
    for name in ("everything", "jsd", "reverse_kl", "topk", "posterior_teacher_soft", "mass_dense"):
        logits, target, opts = make_inputs(CASES[name], 4, 6, dtype=torch.float64, seed=5, scale=1.0)
        x = logits.clone().requires_grad_()
        with vfm.use_backend("torch"):
            assert torch.autograd.gradcheck(lambda z: kce(z, target, reduction="none", **opts), (x,))


def test_no_gradient_when_logits_do_not_require_grad():
    logits, target = _base()
    with vfm.use_backend("torch"):
        loss = kce(logits, target)
    assert not loss.requires_grad
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        loss = kce(x, target)
    assert not loss.requires_grad


def test_double_backward_raises():
    x = torch.randn(3, 5, requires_grad=True)
    loss = kce(x, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_inplace_backward_overwrites_logits_storage():
    x = torch.randn(4, 9, requires_grad=True)
    y = x * 2.0
    ptr = y.data_ptr()
    loss = kce(y, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    grad_y = torch.autograd.grad(loss, y)[0]
    assert grad_y.data_ptr() == ptr
    x2 = x.detach().clone().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(x2 * 2.0, torch.tensor([0, 1, 2, 3])), x2)[0]
    torch.testing.assert_close(grad_y * 2.0, ref)


def test_retain_graph_second_backward():
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    loss = kce(x * 1, t, reduction="none")
    g1 = torch.autograd.grad(loss, x, torch.ones(4), retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, x, 2 * torch.ones(4))[0]
    torch.testing.assert_close(g2, 2 * g1)
    loss = kce(x * 1, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_non_unit_upstream_gradient_scales():
    x = torch.randn(5, 8, requires_grad=True)
    t = torch.randint(0, 8, (5,))
    (3.0 * kce(x, t)).backward()
    x2 = x.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(x2, t)).backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("backend", AUTO_BACKENDS)
def test_autocast_computes_in_fp32(backend):
    lin = torch.nn.Linear(8, 13)
    h = torch.randn(6, 8)
    t = torch.randint(0, 13, (6,))
    with vfm.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(h)
        assert logits.dtype == torch.bfloat16
        loss = kce(logits, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), t), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert lin.weight.grad is not None


# ----------------------------------------------------------------- opcheck and compile --
def _op_args(case, n=5, v=11, dtype=torch.float32):
    logits, target, opts = make_inputs(CASES[case], n, v, dtype=dtype, seed=2)
    return logits, target, opts


@pytest.mark.parametrize("backend", AUTO_BACKENDS)
@pytest.mark.parametrize("case", ["ce", "everything", "topk"])
def test_opcheck(backend, case):
    from vfm.ops.kce_api import prepare_arguments

    logits, target, opts = _op_args(case)
    prep = prepare_arguments(logits.requires_grad_(), target, **opts)
    with vfm.use_backend(backend):
        for compute_grad in (True, False):
            for reduce in (True, False):
                torch.library.opcheck(torch.ops.vfm.knowledge_cross_entropy.default,
                                      prep.args + (compute_grad, reduce))
        x = logits.detach().clone()
        torch.library.opcheck(torch.ops.vfm.knowledge_cross_entropy_inplace.default,
                              (x,) + prep.args[1:] + (True,), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph(inplace):
    logits, target, opts = _op_args("everything", n=6, v=12)
    torch._dynamo.reset()

    def fn(z, t, teacher, allowed, soft):
        y = z * 1.5
        return kce(y, t, teacher_logits=teacher, allowed=allowed, soft_mask=soft, kd_weight=0.5, penalty_weight=0.2,
                   temperature=2.0, z_loss=1e-3, inplace_backward=inplace)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    a = compiled(x1, target, opts["teacher_logits"], opts["allowed"], opts["soft_mask"])
    b = fn(x2, target, opts["teacher_logits"], opts["allowed"], opts["soft_mask"])
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ------------------------------------------------------------------- property-based --
@seed(1234)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    case=st.sampled_from(sorted(CASES)),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    n_rows=st.integers(1, 9),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.5, 4.0),
    backend=st.sampled_from(AUTO_BACKENDS),
)
def test_random_option_combinations_match_oracle(case, reduction, n_rows, vocab, temperature, backend):
    opts_case = dict(CASES[case])
    if "temperature" in opts_case:
        opts_case["temperature"] = temperature
    logits, target, opts = make_inputs(opts_case, n_rows, vocab, seed=n_rows * 100 + vocab)
    x = logits.clone().requires_grad_()
    with vfm.use_backend(backend):
        loss = kce(x, target, reduction=reduction, **opts)
    up = torch.rand(loss.shape) + 0.5 if reduction == "none" else torch.tensor(1.0)
    loss.backward(up)
    xr = logits.double().requires_grad_()
    ref = plain_knowledge_ce(xr, target, reduction=reduction, **opts)
    ref.backward(up.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=5e-5 * max(1.0, xr.grad.abs().max().item()))
    assert not math.isnan(loss.sum().item())


def test_group_mask_cache_follows_in_place_edits():
    logits = torch.randn(6, 10)
    target = torch.randint(0, 10, (6,))
    masks = torch.rand(3, 10) < 0.5
    gid = torch.tensor([0, 1, 2, 0, 1, -1])
    for _ in range(3):
        got = kce(logits, target, allowed=(masks, gid), penalty_weight=1.0)
        want = plain_knowledge_ce(logits, target, allowed=(masks, gid), penalty_weight=1.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        masks[:, torch.randint(0, 10, (1,))] ^= True  # edit in place: the packed cache must notice
