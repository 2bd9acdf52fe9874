"""The Triton backend of knowledge cross-entropy against the reference, at the kernel contract.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set below before triton is
imported; conftest.py sets it too).  The interpreter is slow, so shapes are tiny and the option
grid is a pairwise-style subset: every option value appears in some case, and the pairs that
interact (softcap x gradient, top-k x in-place, temperature x KD mode, teacher dtype x logits
dtype, ...) are covered; the full product runs on the torch and cpp backends.
"""

from __future__ import annotations

import os

if os.environ.get("VFM_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vfm.ops.kce_reference import (  # noqa: E402
    KD_JSD,
    KD_KL,
    KD_NONE,
    KD_REVERSE_KL,
    PEN_MASS,
    PEN_NONE,
    PEN_POSTERIOR,
    KCEConfig,
    kce_forward_torch,
    pack_allowed_bits,
)
from vfm.kernels.knowledge_ce import _kce_launch, kce_forward_triton, triton_supports  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/NaN in masked lanes

DEV = "cuda" if os.environ.get("VFM_TEST_GPU", "0") == "1" else "cpu"
IGNORE = -100
TOL = {  # (loss rtol, loss atol, grad rtol, grad atol)
    torch.float32: (2e-5, 2e-5, 1e-4, 2e-6),
    torch.float16: (2e-5, 2e-5, 2e-3, 1e-5),
    torch.bfloat16: (2e-5, 2e-5, 1.6e-2, 1e-4),
}


def build(n, v, *, dtype=torch.float32, teacher=None, tdtype=None, k=4, weight=False, bits=False, pad=0,
          teacher_neg_inf=False, seed=0):
    """Normalised kernel inputs, as the Python layer builds them."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, v + pad, generator=g) * 3.0
    logits = wide.to(dtype)[:, :v]  # row stride v + pad when pad > 0
    target = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < 0.3
    ignored[0] = False
    target[ignored] = IGNORE
    scales = torch.rand(4, n, generator=g) + 0.1
    scales[torch.rand(4, n, generator=g) < 0.2] = 0.0
    scales[0, ignored] = 0.0
    if n > 2:
        scales[:, n - 1] = 0.0  # a row that counts for nothing
    inp = dict(logits=logits, target=target, weight=None, teacher=None, topk_idx=None, topk_lp=None,
               allowed_bits=None, group_ids=None, scales=scales)
    if weight:
        inp["weight"] = torch.rand(v, generator=g) + 0.5
    if teacher == "full":
        t = torch.randn(n, v, generator=g) * 2.0
        if teacher_neg_inf:
            t[:, torch.rand(v, generator=g) < 0.3] = -math.inf  # a teacher with masked labels
            t[:, 0] = 0.0
        inp["teacher"] = t.to(tdtype or dtype)
    elif teacher == "topk":
        kk = min(k, v)
        idx = torch.stack([torch.randperm(v, generator=g)[:kk] for _ in range(n)])
        lp = torch.log_softmax(torch.randn(n, kk, generator=g), -1)
        idx[0, -1] = -1  # padding
        if n > 1:
            idx[1, 0] = -1  # padding first
        if n > 2:
            idx[2, :] = -1  # no teacher at all: KD = 0 there
        inp["topk_idx"], inp["topk_lp"] = idx, lp
    if bits:
        groups = 3
        mask = torch.rand(groups, v, generator=g) < 0.5
        mask[:, 0] = True
        mask[:, -1] = False
        inp["allowed_bits"] = pack_allowed_bits(mask)
        gid = torch.randint(-1, groups, (n,), generator=g, dtype=torch.int32)
        gid[0] = 0
        if n > 1:
            gid[1] = -1
        inp["group_ids"] = gid
    return {key: (val.to(DEV) if torch.is_tensor(val) else val) for key, val in inp.items()}


def run_both(inp, cfg, grad_mode="buffer", block=None, prefetch=None):
    """(reference (loss, parts, grad), triton (loss, parts, grad)); grad None when not wanted."""
    order = ["logits", "target", "weight", "teacher", "topk_idx", "topk_lp", "allowed_bits", "group_ids", "scales"]
    ref_logits = inp["logits"].clone()
    ref_grad = torch.empty_like(ref_logits) if grad_mode != "none" else None
    ref_args = [ref_logits] + [inp[key] for key in order[1:]]
    r_loss, r_parts = kce_forward_torch(*ref_args, ref_grad, cfg)
    logits = inp["logits"].clone() if grad_mode == "inplace" else inp["logits"]
    if grad_mode == "inplace":
        grad = logits
    elif grad_mode == "buffer":
        grad = torch.full_like(logits, float("nan"))  # every element must be written
    else:
        grad = None
    args = [logits] + [inp[key] for key in order[1:]]
    t_loss, t_parts = _kce_launch(*args, grad, cfg, block=block, prefetch=prefetch)
    return (r_loss, r_parts, ref_grad), (t_loss, t_parts, grad)


def check(ref, got, dtype, skip_rows=None):
    rl, rp, rg = ref
    tl_, tp, tg = got
    lrt, lat, grt, gat = TOL[dtype]
    assert tl_.dtype == torch.float32 and tp.dtype == torch.float32 and tp.shape == rp.shape
    torch.testing.assert_close(tp.cpu(), rp.cpu(), rtol=lrt, atol=lat, equal_nan=True)
    torch.testing.assert_close(tl_.cpu(), rl.cpu(), rtol=lrt, atol=lat, equal_nan=True)
    if rg is not None:
        assert tg.dtype == rg.dtype
        rg, tg = rg.float().cpu(), tg.float().cpu()
        if skip_rows is not None:
            keep = torch.ones(rg.shape[0], dtype=torch.bool)
            keep[skip_rows] = False
            rg, tg = rg[keep], tg[keep]
        torch.testing.assert_close(tg, rg, rtol=grt, atol=gat, equal_nan=True)


# name: (n, v, build kwargs, config kwargs, grad mode, block)
CASES = {
    "ce_v5": (3, 5, {}, {}, "buffer", None),
    "ce_weight_smooth_bf16_stride": (7, 37, dict(dtype=torch.bfloat16, weight=True, pad=11),
                                     dict(label_smoothing=0.1), "buffer", 16),
    "ce_smooth_softcap_z_fp16_inplace": (5, 37, dict(dtype=torch.float16),
                                         dict(label_smoothing=0.2, softcap=4.0, use_z=True), "inplace", 16),
    "ce_weight_nograd": (5, 23, dict(weight=True), {}, "none", 8),
    "kl_t1_teacher_bf16": (6, 37, dict(teacher="full", tdtype=torch.bfloat16, teacher_neg_inf=True),
                           dict(kd_mode=KD_KL), "buffer", 16),
    "kl_t2_bf16_softcap_teacher_fp32": (6, 37, dict(dtype=torch.bfloat16, teacher="full", tdtype=torch.float32),
                                        dict(kd_mode=KD_KL, temperature=2.0, softcap=6.0), "inplace", 16),
    "kl_t1p5_noce_z": (5, 29, dict(teacher="full"), dict(kd_mode=KD_KL, temperature=1.5, use_ce=False,
                                                         use_z=True), "buffer", 8),
    "rkl_t1_weight_teacher_fp16": (5, 37, dict(teacher="full", tdtype=torch.float16, weight=True),
                                   dict(kd_mode=KD_REVERSE_KL), "buffer", 16),
    "rkl_t2_smooth_nograd": (5, 37, dict(teacher="full"), dict(kd_mode=KD_REVERSE_KL, temperature=2.0,
                                                               label_smoothing=0.1), "none", 16),
    "jsd_t1": (5, 37, dict(teacher="full", teacher_neg_inf=True), dict(kd_mode=KD_JSD), "buffer", 16),
    "jsd_t2_beta03_softcap_fp16_inplace": (5, 37, dict(dtype=torch.float16, teacher="full"),
                                           dict(kd_mode=KD_JSD, temperature=2.0, jsd_beta=0.3, softcap=5.0),
                                           "inplace", 16),
    "topk_t1": (5, 37, dict(teacher="topk", k=5), dict(kd_mode=KD_KL), "buffer", 16),
    "topk_t2_mass_softcap_bf16_inplace": (6, 45, dict(dtype=torch.bfloat16, teacher="topk", k=3, bits=True),
                                          dict(kd_mode=KD_KL, temperature=2.0, pen_mode=PEN_MASS, softcap=5.0),
                                          "inplace", 16),
    "topk_t1p5_posterior_smooth_weight": (5, 37, dict(teacher="topk", k=4, bits=True, weight=True),
                                          dict(kd_mode=KD_KL, temperature=1.5, pen_mode=PEN_POSTERIOR,
                                               rule_strength=2.0, label_smoothing=0.1), "buffer", 16),
    "mass_z_stride": (7, 70, dict(bits=True, pad=5), dict(pen_mode=PEN_MASS, use_z=True), "buffer", 32),
    "mass_only_noce_fp16": (5, 37, dict(bits=True, dtype=torch.float16), dict(pen_mode=PEN_MASS, use_ce=False),
                            "buffer", 16),
    "posterior_self_inf_t2": (6, 37, dict(bits=True), dict(pen_mode=PEN_POSTERIOR, temperature=2.0), "buffer", 16),
    "posterior_self_soft_t1_softcap": (5, 37, dict(bits=True), dict(pen_mode=PEN_POSTERIOR, rule_strength=1.5,
                                                                    softcap=4.0), "inplace", 16),
    "posterior_teacher_inf_kl_t2": (6, 37, dict(bits=True, teacher="full"),
                                    dict(kd_mode=KD_KL, pen_mode=PEN_POSTERIOR, temperature=2.0), "buffer", 16),
    "posterior_teacher_soft_rkl_t1p5_bf16": (5, 37, dict(bits=True, teacher="full", dtype=torch.bfloat16,
                                                         tdtype=torch.float16),
                                             dict(kd_mode=KD_REVERSE_KL, pen_mode=PEN_POSTERIOR, temperature=1.5,
                                                  rule_strength=3.0), "buffer", 16),
    "bits_no_penalty_outside_flag": (6, 37, dict(bits=True), dict(pen_mode=PEN_NONE), "none", 16),
    "everything_t2": (6, 41, dict(bits=True, teacher="full", weight=True, pad=3),
                      dict(kd_mode=KD_KL, temperature=2.0, pen_mode=PEN_MASS, use_z=True, softcap=5.0,
                           label_smoothing=0.05), "buffer", 16),
    "v4099_multiblock": (3, 4099, dict(teacher="full", bits=True, dtype=torch.bfloat16),
                         dict(kd_mode=KD_KL, temperature=2.0, pen_mode=PEN_MASS), "buffer", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    n, v, bkw, ckw, grad_mode, block = CASES[name]
    inp = build(n, v, **bkw)
    cfg = KCEConfig(ignore_index=IGNORE, **ckw)
    prefetch = list(CASES).index(name) % 2 == 1  # both loop forms (hand-pipelined or not)
    ref, got = run_both(inp, cfg, grad_mode, block, prefetch)
    check(ref, got, inp["logits"].dtype)


def test_vocab_over_65536():
    inp = build(2, 70000, teacher="full", bits=True, dtype=torch.bfloat16, pad=3)
    inp["scales"][:, :] = 0.5
    cfg = KCEConfig(ignore_index=IGNORE, kd_mode=KD_KL, temperature=2.0, pen_mode=PEN_MASS, use_z=True)
    ref, got = run_both(inp, cfg, "inplace", 4096, prefetch=True)
    check(ref, got, torch.bfloat16)


def test_public_signature_matches_reference():
    inp = build(4, 19, teacher="full")
    cfg = KCEConfig(ignore_index=IGNORE, kd_mode=KD_KL, temperature=2.0)
    order = ["logits", "target", "weight", "teacher", "topk_idx", "topk_lp", "allowed_bits", "group_ids", "scales"]
    g1, g2 = torch.empty_like(inp["logits"]), torch.empty_like(inp["logits"])
    r = kce_forward_torch(*[inp[k] for k in order], g1, cfg)
    t = kce_forward_triton(*[inp[k] for k in order], g2, cfg)
    check((*r, g1), (*t, g2), torch.float32)


def test_nan_rows():
    """NaN in a row that counts for nothing gives 0 and a zero gradient row; NaN in a counted row
    propagates; a NaN teacher in a row whose KD scale is 0 does not leak into its CE."""
    inp = build(5, 37, teacher="full", bits=True)
    sc = inp["scales"]
    sc[:, :] = 0.5
    sc[:, 1] = 0.0  # row 1 counts for nothing ...
    inp["logits"][1, 3] = float("nan")  # ... and holds NaN
    inp["logits"][2, 5] = float("nan")  # row 2 counts: NaN propagates
    sc[1, 3] = 0.0  # row 3: KD off ...
    inp["teacher"][3, 7] = float("nan")  # ... with a NaN teacher
    inp["target"][1] = IGNORE
    cfg = KCEConfig(ignore_index=IGNORE, kd_mode=KD_KL, temperature=2.0, pen_mode=PEN_MASS, use_z=True,
                    label_smoothing=0.1)
    ref, got = run_both(inp, cfg, "buffer", 16)
    check(ref, got, torch.float32)
    loss, parts, grad = got
    assert loss[1] == 0 and torch.all(parts[:4, 1] == 0) and torch.all(grad[1] == 0)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(loss[3]) and torch.isfinite(grad[3]).all()

    # With a softcap the reference multiplies its zero row by the NaN softcap factor; the kernel
    # keeps the contract (zero row) there and matches the reference everywhere else.
    cfg = KCEConfig(ignore_index=IGNORE, kd_mode=KD_KL, temperature=2.0, softcap=5.0)
    ref, got = run_both(inp, cfg, "inplace", 16)
    check(ref, got, torch.float32, skip_rows=[1])
    assert torch.all(got[2][1] == 0) and got[0][1] == 0


def test_all_rows_ignored():
    inp = build(4, 21, teacher="full")
    inp["scales"].zero_()
    inp["target"][:] = IGNORE
    cfg = KCEConfig(ignore_index=IGNORE, kd_mode=KD_KL)
    ref, got = run_both(inp, cfg, "buffer", 8)
    check(ref, got, torch.float32)
    assert torch.all(got[2] == 0)


def test_unsupported_inputs():
    x = torch.randn(3, 5, dtype=torch.float64, device=DEV)
    assert "float64" in triton_supports(x)
    assert triton_supports(x.float()) is None
    assert "stride" in triton_supports(torch.randn(5, 3, device=DEV).t())
    assert "kl" in triton_supports(x.float(), topk_idx=torch.zeros(3, 1, dtype=torch.long),
                                   cfg=KCEConfig(kd_mode=KD_JSD))
    with pytest.raises(TypeError, match="float64"):
        kce_forward_triton(x, torch.zeros(3, dtype=torch.long, device=DEV), None, None, None, None, None, None,
                           torch.ones(4, 3, device=DEV), None, KCEConfig())


def test_empty_batch():
    x = torch.randn(0, 7, device=DEV)
    loss, parts = kce_forward_triton(x, torch.zeros(0, dtype=torch.long, device=DEV), None, None, None, None, None,
                                     None, torch.ones(4, 0, device=DEV), torch.empty_like(x), KCEConfig())
    assert loss.shape == (0,) and parts.shape == (5, 0)
