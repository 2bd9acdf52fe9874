"""The C++ CPU kernel vfm_C::kce_forward against the reference kce_forward_torch.

Inputs are built in the normalised form the Python layer hands to every backend (packed allowed
bits, (4, N) float32 scales with zeros, CE scale 0 where the target is ignore_index).  The
reference runs in float64 on the same (already rounded) inputs, so the comparison measures the
kernel's own error: losses must match to 2e-6 relative (they are computed in fp32 with fp64 row
accumulators; measured ~4e-7), gradients to 2e-6 of their largest magnitude in fp32 and to the
storage precision in fp16 / bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

from vfm.ops import kce_cpp
from vfm.ops.kce_cpp import cpp_available, kce_forward_cpp
from vfm.ops.kce_reference import (
    KD_JSD,
    KD_KL,
    KD_REVERSE_KL,
    PEN_MASS,
    PEN_POSTERIOR,
    KCEConfig,
    kce_forward_torch,
    pack_allowed_bits,
    unpack_allowed_bits,
)

_OK, _WHY = cpp_available()
if not _OK:
    pytest.skip(f"vfm._C is not available: {_WHY}", allow_module_level=True)

IGNORE = -100
# (loss / parts rtol, gradient atol relative to the largest gradient magnitude of the row block)
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-6, 2e-3),
    torch.bfloat16: (2e-6, 1.6e-2),
}


def make_inputs(n, v, *, dtype=torch.float32, teacher=None, teacher_dtype=None, weight=False, allowed=False,
                k=4, seed=0, scale=3.0):
    """Random normalised inputs; returns a dict of kce_forward arguments (grad excluded)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.25] = IGNORE
    scales = torch.rand(4, n, generator=g) + 0.1
    scales[torch.rand(4, n, generator=g) < 0.2] = 0.0
    scales[0, target == IGNORE] = 0.0  # the Python layer folds the CE row mask into the scale
    args = dict(logits=logits, target=target, weight=None, teacher=None, topk_idx=None, topk_lp=None,
                allowed_bits=None, group_ids=None, scales=scales)
    if weight:
        args["weight"] = torch.rand(v, generator=g) + 0.5
    if teacher == "full":
        args["teacher"] = (torch.randn(n, v, generator=g) * scale).to(teacher_dtype or dtype)
    elif teacher == "topk":
        kk = min(k, v)
        idx = torch.stack([torch.randperm(v, generator=g)[:kk] for _ in range(n)])
        idx[0, -1] = -1  # padding
        if n > 2:
            idx[2, :] = -1  # a row without teacher entries
        args["topk_idx"] = idx
        args["topk_lp"] = torch.log_softmax(torch.randn(n, kk, generator=g) * 2, -1)
    if allowed:
        groups = 3
        mask = torch.rand(groups, v, generator=g) < 0.4
        mask[:, 0] = True  # neither empty ...
        mask[:, -1] = False  # ... nor full, as the Python layer guarantees for ids >= 0
        args["allowed_bits"] = pack_allowed_bits(mask)
        gid = torch.randint(-1, groups, (n,), generator=g, dtype=torch.int32)
        gid[0] = -1
        args["group_ids"] = gid
    return args


def reference(args, cfg, with_grad=True):
    """kce_forward_torch in float64 on the same inputs."""
    ref = dict(args)
    ref["logits"] = args["logits"].double()
    if args["teacher"] is not None:
        ref["teacher"] = args["teacher"].double()
    grad = torch.empty_like(ref["logits"]) if with_grad else None
    row_loss, parts = kce_forward_torch(grad=grad, cfg=cfg, **ref)
    return row_loss.double(), parts.double(), grad


def run_cpp(args, cfg, with_grad=True, grad=None):
    if with_grad and grad is None:
        grad = torch.full_like(args["logits"], float("nan"))  # every element must be written
    row_loss, parts = kce_forward_cpp(grad=grad if with_grad else None, cfg=cfg, **args)
    return row_loss, parts, grad


def check(args, cfg, with_grad=True):
    dtype = args["logits"].dtype
    rtol, gtol = TOL[dtype]
    row_loss, parts, grad = run_cpp(args, cfg, with_grad)
    ref_loss, ref_parts, ref_grad = reference(args, cfg, with_grad)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert row_loss.dtype == out_dtype and parts.dtype == out_dtype
    assert row_loss.shape == ref_loss.shape and parts.shape == ref_parts.shape
    # parts were rounded to float32 by both; compare at the kernel's tolerance
    # Parts are float32 in both; terms that are differences of logsumexps (penalties, KL) carry
    # an absolute error of a few ulps of the logsumexp itself, hence the absolute floor.
    ltol = rtol if dtype == torch.float64 else max(rtol, 1e-6)
    atol = ltol * 0.1 * max(1.0, ref_parts[:4].abs().max().item())
    torch.testing.assert_close(parts.double(), ref_parts, rtol=ltol, atol=atol)
    torch.testing.assert_close(row_loss.double(), ref_loss, rtol=ltol, atol=atol)
    if with_grad:
        assert grad.dtype == dtype
        scale = ref_grad.abs().max().item() or 1.0
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=gtol * scale + 1e-12)
    return row_loss, parts, grad


# --------------------------------------------------------------------------------------------
# option grid
# --------------------------------------------------------------------------------------------

INF = math.inf
# name: (input recipe, KCEConfig)
CASES = {
    "ce": (dict(), KCEConfig()),
    "ce_weight": (dict(weight=True), KCEConfig()),
    "ce_smooth": (dict(), KCEConfig(label_smoothing=0.1)),
    "ce_smooth_weight": (dict(weight=True), KCEConfig(label_smoothing=0.2)),
    "softcap": (dict(), KCEConfig(softcap=4.0)),
    "zloss": (dict(), KCEConfig(use_z=True)),
    "kl_t1": (dict(teacher="full"), KCEConfig(kd_mode=KD_KL)),
    "kl_t2": (dict(teacher="full"), KCEConfig(kd_mode=KD_KL, temperature=2.0)),
    "kl_t2_noce": (dict(teacher="full"), KCEConfig(kd_mode=KD_KL, temperature=2.0, use_ce=False)),
    "reverse_kl_t1": (dict(teacher="full"), KCEConfig(kd_mode=KD_REVERSE_KL)),
    "reverse_kl_t2": (dict(teacher="full"), KCEConfig(kd_mode=KD_REVERSE_KL, temperature=2.0)),
    "jsd_t1": (dict(teacher="full"), KCEConfig(kd_mode=KD_JSD, jsd_beta=0.3)),
    "jsd_t2": (dict(teacher="full"), KCEConfig(kd_mode=KD_JSD, jsd_beta=0.5, temperature=2.0)),
    "topk_t1": (dict(teacher="topk"), KCEConfig(kd_mode=KD_KL)),
    "topk_t2": (dict(teacher="topk"), KCEConfig(kd_mode=KD_KL, temperature=2.0)),
    "outside_flag_only": (dict(allowed=True), KCEConfig()),
    "mass": (dict(allowed=True), KCEConfig(pen_mode=PEN_MASS)),
    "mass_softcap_t2_kd": (dict(allowed=True, teacher="full"),
                           KCEConfig(pen_mode=PEN_MASS, kd_mode=KD_KL, temperature=2.0, softcap=5.0)),
    "posterior_self_inf": (dict(allowed=True), KCEConfig(pen_mode=PEN_POSTERIOR, temperature=2.0)),
    "posterior_self_finite": (dict(allowed=True), KCEConfig(pen_mode=PEN_POSTERIOR, rule_strength=2.0)),
    "posterior_teacher_inf": (dict(allowed=True, teacher="full"),
                              KCEConfig(pen_mode=PEN_POSTERIOR, temperature=1.5)),
    "posterior_teacher_finite": (dict(allowed=True, teacher="full"),
                                 KCEConfig(pen_mode=PEN_POSTERIOR, rule_strength=3.0, temperature=2.0)),
    "posterior_topk_kd": (dict(allowed=True, teacher="topk"),
                          KCEConfig(pen_mode=PEN_POSTERIOR, kd_mode=KD_KL, rule_strength=1.0, temperature=2.0)),
    "everything": (dict(allowed=True, teacher="full", weight=True),
                   KCEConfig(label_smoothing=0.05, softcap=5.0, kd_mode=KD_KL, temperature=2.0,
                             pen_mode=PEN_MASS, use_z=True)),
    "everything_jsd_posterior": (dict(allowed=True, teacher="full", weight=True),
                                 KCEConfig(label_smoothing=0.1, softcap=6.0, kd_mode=KD_JSD, jsd_beta=0.7,
                                           temperature=1.5, pen_mode=PEN_POSTERIOR, rule_strength=2.5,
                                           use_z=True)),
}


@pytest.mark.parametrize("shape", [(7, 5), (13, 4099)], ids=["V5", "V4099"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_option_grid(case, shape):
    recipe, cfg = CASES[case]
    args = make_inputs(*shape, seed=sorted(CASES).index(case), **recipe)
    check(args, cfg)


@pytest.mark.parametrize("case", ["everything", "topk_t2", "posterior_teacher_finite", "jsd_t2", "reverse_kl_t1"])
def test_vocab_over_64k(case):
    recipe, cfg = CASES[case]
    args = make_inputs(3, 70000, seed=7, **recipe)
    check(args, cfg)


def test_no_gradient():
    recipe, cfg = CASES["everything"]
    args = make_inputs(6, 1000, **recipe)
    row_loss, parts, _ = check(args, cfg, with_grad=False)
    with_grad_loss, with_grad_parts, _ = run_cpp(args, cfg)
    torch.testing.assert_close(row_loss, with_grad_loss, rtol=0, atol=0)
    torch.testing.assert_close(parts, with_grad_parts, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# dtypes, strides, aliasing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["everything", "everything_jsd_posterior", "topk_t2", "reverse_kl_t2"])
def test_logits_dtypes(dtype, case):
    recipe, cfg = CASES[case]
    check(make_inputs(11, 777, dtype=dtype, seed=3, **recipe), cfg)


@pytest.mark.parametrize(
    "dtype,teacher_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float64), (torch.bfloat16, torch.float32),
     (torch.float16, torch.bfloat16), (torch.float64, torch.float16), (torch.float64, torch.float32)],
)
def test_teacher_dtype_differs(dtype, teacher_dtype):
    recipe, cfg = CASES["everything_jsd_posterior"]
    check(make_inputs(9, 600, dtype=dtype, teacher_dtype=teacher_dtype, seed=5, **recipe), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_stride_larger_than_vocab(dtype):
    recipe, cfg = CASES["everything"]
    args = make_inputs(10, 1029, dtype=dtype, seed=11, **recipe)
    wide = torch.randn(10, 1500).to(dtype)
    wide[:, 5:1034] = args["logits"]
    wide_t = torch.randn(10, 1100).to(dtype)
    wide_t[:, 71:] = args["teacher"]
    sliced = dict(args, logits=wide[:, 5:1034], teacher=wide_t[:, 71:])
    assert sliced["logits"].stride(0) == 1500 and not sliced["logits"].is_contiguous()
    grad_store = torch.full((10, 1200), float("nan"), dtype=dtype)
    grad = grad_store[:, 100:1129]
    row_loss, parts, _ = run_cpp(sliced, cfg, grad=grad)
    ref_loss, ref_parts, ref_grad = run_cpp(args, cfg)
    torch.testing.assert_close(row_loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(parts, ref_parts, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert torch.isnan(grad_store[:, :100]).all() and torch.isnan(grad_store[:, 1129:]).all()
    check(sliced, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["everything", "topk_t2", "jsd_t2", "posterior_self_finite"])
def test_inplace_gradient(dtype, case):
    recipe, cfg = CASES[case]
    args = make_inputs(8, 2100, dtype=dtype, seed=13, **recipe)
    expect_loss, expect_parts, expect_grad = run_cpp(args, cfg)
    logits = args["logits"].clone()
    row_loss, parts = kce_forward_cpp(grad=logits, cfg=cfg, **dict(args, logits=logits))
    torch.testing.assert_close(row_loss, expect_loss, rtol=0, atol=0)
    torch.testing.assert_close(parts, expect_parts, rtol=0, atol=0)
    torch.testing.assert_close(logits, expect_grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# NaN handling
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["everything", "everything_jsd_posterior", "topk_t2"])
def test_nan_in_uncounted_rows_stays_out(case):
    recipe, cfg = CASES[case]
    args = make_inputs(9, 300, seed=17, **recipe)
    args["scales"][:, 3:5] = 0.0  # rows 3, 4 count for nothing ...
    args["target"][3] = IGNORE
    args["logits"][3:5, ::7] = float("nan")  # ... and hold NaN logits
    if args["teacher"] is not None:
        args["teacher"][4, 1] = float("nan")
    row_loss, parts, grad = run_cpp(args, cfg)
    assert torch.isfinite(row_loss).all() and torch.isfinite(parts).all()
    assert (row_loss[3:5] == 0).all() and (parts[:4, 3:5] == 0).all()
    assert (grad[3:5] == 0).all()
    assert torch.isfinite(grad).all()
    keep = [i for i in range(9) if i not in (3, 4)]
    clean = make_inputs(9, 300, seed=17, **recipe)
    ref_loss, ref_parts, ref_grad = reference(clean, cfg)
    torch.testing.assert_close(row_loss[keep].double(), ref_loss[keep], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad[keep].double(), ref_grad[keep], rtol=0, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("case", ["ce", "kl_t2", "mass", "posterior_self_inf", "zloss", "jsd_t1"])
def test_nan_in_counted_row_propagates(case):
    recipe, cfg = CASES[case]
    args = make_inputs(5, 2000, seed=19, **recipe)
    args["scales"][:, 1] = 1.0
    args["target"][1] = 3
    if args["group_ids"] is not None:
        args["group_ids"][1] = 0
    args["logits"][1, 1500] = float("nan")
    row_loss, parts, grad = run_cpp(args, cfg)
    assert torch.isnan(row_loss[1])
    assert torch.isnan(grad[1]).any()
    others = [0, 2, 3, 4]
    assert not torch.isnan(row_loss[others]).any() and not torch.isnan(grad[others]).any()


@pytest.mark.parametrize("case", ["ce", "ce_weight", "zloss", "kl_t1", "kl_t2", "mass", "posterior_self_inf",
                                  "posterior_self_finite"])
def test_minus_inf_logits_are_masked_labels(case):
    """-inf logits (and -inf teacher logits) at the same labels have probability 0 everywhere: the
    result equals the reference on the vocabulary without those labels, and their gradient is 0.
    (The reference itself gives NaN here for CE, through eps / V * sum(lse - zc) = 0 * inf.)"""
    recipe, cfg = CASES[case]
    v, cut = 1000, 960
    args = make_inputs(9, v, seed=29, **recipe)
    args["logits"][:, cut:] = -math.inf
    args["target"][args["target"] >= cut] = 5
    if args["teacher"] is not None:
        args["teacher"][:, cut:] = -math.inf
    row_loss, parts, grad = run_cpp(args, cfg)
    assert torch.isfinite(row_loss).all() and (grad[:, cut:] == 0).all()
    small = dict(args, logits=args["logits"][:, :cut].contiguous())
    if args["teacher"] is not None:
        small["teacher"] = args["teacher"][:, :cut].contiguous()
    if args["weight"] is not None:
        small["weight"] = args["weight"][:cut].contiguous()
    if args["allowed_bits"] is not None:
        small["allowed_bits"] = pack_allowed_bits(unpack_allowed_bits(args["allowed_bits"], v)[:, :cut])
    ref_loss, ref_parts, ref_grad = reference(small, cfg)
    torch.testing.assert_close(parts.double(), ref_parts, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad[:, :cut].double(), ref_grad, rtol=0, atol=2e-6 * ref_grad.abs().max().item())


# --------------------------------------------------------------------------------------------
# row bookkeeping and input validation
# --------------------------------------------------------------------------------------------

def test_all_zero_scales_give_zero_rows_and_outside_flag():
    recipe, cfg = CASES["everything"]
    args = make_inputs(6, 100, seed=23, **recipe)
    args["scales"].zero_()
    row_loss, parts, grad = run_cpp(args, cfg)
    assert (row_loss == 0).all() and (parts[:4] == 0).all() and (grad == 0).all()
    _, ref_parts, _ = reference(args, cfg)
    torch.testing.assert_close(parts[4].double(), ref_parts[4], rtol=0, atol=0)


def test_empty_batch():
    args = make_inputs(0, 17)
    row_loss, parts, grad = run_cpp(args, KCEConfig())
    assert row_loss.shape == (0,) and parts.shape == (5, 0) and grad.shape == (0, 17)


def test_bad_inputs_raise():
    args = make_inputs(4, 33, teacher="full")
    cfg = KCEConfig(kd_mode=KD_KL)
    with pytest.raises(RuntimeError, match="teacher"):
        kce_forward_cpp(grad=None, cfg=cfg, **dict(args, teacher=args["teacher"][:, :32]))
    with pytest.raises(RuntimeError, match="target"):
        bad = args["target"].clone()
        bad[0] = 33
        kce_forward_cpp(grad=None, cfg=KCEConfig(), **dict(args, target=bad, scales=torch.ones(4, 4)))
    with pytest.raises(RuntimeError, match="stride"):
        kce_forward_cpp(grad=None, cfg=KCEConfig(), **dict(args, logits=torch.randn(33, 4).t()))
    with pytest.raises(RuntimeError, match="dtype"):
        kce_forward_cpp(grad=torch.empty(4, 33, dtype=torch.float64), cfg=KCEConfig(), **args)
    with pytest.raises(RuntimeError, match="teacher"):
        kce_forward_cpp(grad=None, cfg=cfg, **dict(args, teacher=None))


def test_unavailable_extension_raises_with_reason(monkeypatch):
    monkeypatch.setattr(kce_cpp, "_STATUS", (False, "because of a test"))
    assert cpp_available() == (False, "because of a test")
    args = make_inputs(2, 7)
    with pytest.raises(RuntimeError, match="because of a test"):
        kce_forward_cpp(grad=None, cfg=KCEConfig(), **args)


def test_build_info():
    import vfm._C

    info = vfm._C.build_info()
    assert info["version"] == "0.1.0"
    assert isinstance(info["isa"], list) and info["isa"]
    assert info["isa_runtime"] in info["isa"]
    assert isinstance(info["openmp"], bool) and info["omp_max_threads"] >= 1
    assert isinstance(info["with_cuda"], bool) and isinstance(info["cuda_archs"], str)
    assert hasattr(torch.ops.vfm_C, "kce_forward")


@pytest.mark.parametrize("terms", [dict(penalty_weight=1.0, ce_weight=0.0), dict(penalty_weight=0.5),
                                   dict(ce_weight=0.0, z_loss=1.0), dict()])
def test_plus_inf_logit_gives_inf_like_the_reference(terms):
    """A +inf logit on a disallowed label: lse = +inf, so CE, the z-loss and the mass penalty are +inf
    in the reference (torch.logsumexp); the C++ kernel gave NaN (inf - inf in its online sums)."""
    import vfm
    from vfm.functional import knowledge_cross_entropy

    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    z[1, 2] = float("inf")
    target = torch.tensor([0, 1, 3])
    allowed = torch.zeros(3, 7, dtype=torch.bool)
    allowed[:, :2] = True
    out = {}
    for backend in ("torch", "cpp"):
        with vfm.use_backend(backend):
            out[backend] = knowledge_cross_entropy(z, target, allowed=allowed, reduction="none", **terms)
    assert math.isinf(out["torch"][1]) and out["torch"][1] > 0  # the independent reference's answer
    torch.testing.assert_close(out["cpp"], out["torch"])
