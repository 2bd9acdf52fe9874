"""Every available backend of knowledge_cross_entropy against the independent float64 oracle.

The full option grid runs on the torch and cpp backends; the Triton interpreter (slow) gets a
pairwise subset at small shapes.  Each test forces its backend and checks, through the
registry's call counter, that this backend's kernel really ran.
"""

import math

import pytest
import torch

import vfm
from vfm import _registry
from kce_cases import CASES, make_inputs
from plain_oracle import plain_knowledge_ce

OP = "knowledge_cross_entropy"
CPU_BACKENDS = vfm.available_backends(OP, "cpu")
FULL_BACKENDS = [b for b in ("torch", "cpp") if b in CPU_BACKENDS]
HAS_TRITON = "triton" in CPU_BACKENDS

# (loss rtol, gradient tolerance relative to the gradient's largest magnitude)
TOL = {torch.float64: (1e-7, 1e-7), torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-3),
       torch.bfloat16: (2e-4, 1.6e-2)}


def run_case(backend, case, n_rows, vocab, dtype=torch.float32, reduction="mean", seed=0, transform=None,
             inplace=False, **extra):
    logits, target, opts = make_inputs(case, n_rows, vocab, dtype=dtype, seed=seed)
    opts.update(extra)
    leaf = logits.clone().requires_grad_()
    x = transform(leaf) if transform else leaf
    if inplace:
        x = x * 1  # a non-leaf whose storage the gradient may overwrite
    before = _registry.CALLS[(OP, backend)]
    with vfm.use_backend(backend):
        loss = vfm.functional.knowledge_cross_entropy(x, target, reduction=reduction, inplace_backward=inplace, **opts)
    assert _registry.CALLS[(OP, backend)] == before + 1, "the forced backend did not run"
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = torch.rand(loss.shape, generator=gen) + 0.5 if reduction == "none" else torch.tensor(1.0)
    loss.backward(upstream)

    ref_leaf = logits.double().requires_grad_()
    ref_x = transform(ref_leaf) if transform else ref_leaf
    ref_opts = dict(opts)
    ref = plain_knowledge_ce(ref_x, target, reduction=reduction, **ref_opts)
    ref.backward(upstream.double())

    rtol, gtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=rtol)
    scale = ref_leaf.grad.abs().max().item() or 1.0
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=0, atol=gtol * scale + 1e-12)
    return loss, leaf.grad


@pytest.mark.parametrize("backend", FULL_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_grid_fp32(backend, case, reduction):
    run_case(backend, CASES[case], n_rows=13, vocab=37, reduction=reduction)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["ce", "kl_t2", "jsd", "mass_grouped", "everything"])
def test_dtypes(backend, dtype, case):
    run_case(backend, CASES[case], n_rows=9, vocab=50, dtype=dtype)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
@pytest.mark.parametrize("vocab", [5, 4099])
def test_odd_vocab(backend, vocab):
    run_case(backend, CASES["everything"], n_rows=7, vocab=vocab)


@pytest.mark.parametrize("backend", FULL_BACKENDS + (["triton"] if HAS_TRITON else []))
def test_vocab_above_65536(backend):
    run_case(backend, CASES["kl_t2"], n_rows=3, vocab=70000, z_loss=1e-3)


@pytest.mark.parametrize("backend", FULL_BACKENDS + (["triton"] if HAS_TRITON else []))
def test_non_contiguous_inputs(backend):
    # a transposed view (last-dim stride != 1) and a column slice (row stride > V)
    run_case(backend, CASES["everything"], n_rows=6, vocab=33, transform=lambda t: t.t().contiguous().t())
    run_case(backend, CASES["kl_t2"], n_rows=6, vocab=33,
             transform=lambda t: torch.cat([t, t[:, :5]], dim=1)[:, :33])


@pytest.mark.parametrize("backend", FULL_BACKENDS + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_matches(backend, reduction):
    run_case(backend, CASES["everything"], n_rows=8, vocab=29, reduction=reduction, inplace=True)


@pytest.mark.parametrize("backend", FULL_BACKENDS + (["triton"] if HAS_TRITON else []))
def test_num_items_in_batch(backend):
    run_case(backend, CASES["everything"], n_rows=8, vocab=29, num_items_in_batch=23)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend):
    logits = torch.randn(5, 11, requires_grad=True)
    target = torch.full((5,), -100)
    teacher = torch.randn(5, 11)
    with vfm.use_backend(backend):
        loss = vfm.functional.knowledge_cross_entropy(logits, target, teacher_logits=teacher, kd_weight=0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_only_from_counted_rows(backend):
    logits = torch.randn(4, 9)
    target = torch.tensor([1, -100, 3, 4])
    logits[1, 2] = float("nan")  # ignored row: must not leak
    x = logits.clone().requires_grad_()
    with vfm.use_backend(backend):
        loss = vfm.functional.knowledge_cross_entropy(x, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    logits[2, 0] = float("nan")  # counted row: NaN as torch gives
    with vfm.use_backend(backend):
        loss = vfm.functional.knowledge_cross_entropy(logits, target)
    assert math.isnan(loss.item())
    assert math.isnan(torch.nn.functional.cross_entropy(logits, target).item())


# ---------------------------------------------------------------- Triton interpreter subset --
TRITON_CASES = [
    ("ce", "mean", torch.float32, 17),
    ("ce_smooth_weight", "sum", torch.float16, 40),
    ("softcap", "none", torch.bfloat16, 23),
    ("zloss", "mean", torch.float32, 5),
    ("kl_t2", "none", torch.float32, 40),
    ("reverse_kl", "mean", torch.float16, 23),
    ("jsd", "sum", torch.float32, 17),
    ("topk", "mean", torch.bfloat16, 40),
    ("mass_dense", "none", torch.float32, 33),
    ("mass_grouped", "mean", torch.float16, 17),
    ("posterior_self", "sum", torch.float32, 23),
    ("posterior_teacher_soft", "mean", torch.float32, 40),
    ("unlabelled_pool", "none", torch.bfloat16, 33),
    ("everything", "mean", torch.float32, 40),
    ("kl_t1_noce", "mean", torch.float32, 33),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton (interpreter) not available")
@pytest.mark.parametrize("case,reduction,dtype,vocab", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_interpreter_subset(case, reduction, dtype, vocab):
    run_case("triton", CASES[case], n_rows=6, vocab=vocab, dtype=dtype, reduction=reduction)
