"""The opt-in gradient filter of fused_linear_knowledge_cross_entropy (``grad_filter=eps``).

Independent reference: the logits are materialised in float64 and fed to
:func:`vfm.functional.knowledge_cross_entropy` (torch backend); autograd gives the exact gradients
of hidden, weight and bias and the exact logits gradient G.  The filter's documented contract is
checked against it: the loss and the bias gradient are exact, and the errors of the weight and
hidden gradients obey the entrywise bounds ``eps * sum_i m_i |hidden_ik|`` and
``eps * m_i * sum_j |weight_jk|`` (m_i = max_j |G_ij|), while chunks really were skipped.
"""

import math

import pytest
import torch

import vfm
from vfm import _registry
from vfm.functional import fused_linear_knowledge_cross_entropy as flce
from vfm.functional import knowledge_cross_entropy
from vfm.ops import flce_filter
from vfm.ops.flce_api import prepare_fused_arguments

OP = "fused_linear_knowledge_cross_entropy"
BACKENDS = [b for b in ("torch", "cpp", "triton") if b in vfm.available_backends(OP, "cpu")]
N, H, V, NB = 29, 12, 203, 8  # 4 blocks, the last partial; V not a multiple of the chunk
EPS = 1e-2


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(flce_filter, "CHUNK", 8)  # 26 chunks of the 203 columns (last one short)


def peaked(seed=0, dtype=torch.float32, bias=True):
    """Hidden states and a head whose softmax is concentrated on a few hot classes, like a trained model."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.05
    hot = torch.tensor([3, 4, 90, 150, 151])
    weight[hot] = torch.randn(len(hot), H, generator=g) * 1.5
    target = hot[torch.randint(0, len(hot), (N,), generator=g)]
    target[5] = 77  # a cold target: its entry is applied exactly
    target[[2, 11]] = -100  # unlabelled rows
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    to = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return to(hidden), to(weight), to(b), target


def reference(hidden, weight, bias, target, opts, upstream=None):
    """(loss, grad_hidden, grad_weight, grad_bias, G) from materialised float64 logits."""
    fresh = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    h, w = fresh(hidden), fresh(weight)
    b = fresh(bias) if bias is not None else None
    logits = h @ w.T + (b if b is not None else 0)
    logits.retain_grad()
    o = {("weight" if k == "class_weight" else k): (v.double() if k == "teacher_logits" else v) for k, v in opts.items()}
    with vfm.use_backend("torch"):
        loss = knowledge_cross_entropy(logits, target, **o)
    loss.backward(upstream.double() if upstream is not None else None)
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None), logits.grad


def run(backend, hidden, weight, bias, target, opts, upstream=None, **extra):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    before = _registry.CALLS[(OP, backend)]
    with vfm.use_backend(backend):
        loss = flce(leaves[0], leaves[1], target, leaves[2], block_rows=NB, **opts, **extra)
        loss.backward(upstream)
    assert _registry.CALLS[(OP, backend)] > before, "the forced backend did not run"
    return loss.detach(), *(t.grad if t is not None else None for t in leaves)


def check_bound(got, ref, hidden, weight, eps, tol):
    """The documented entrywise error bounds of the filter, plus floating-point slack tol."""
    _, h_ref, w_ref, _, g_ref = ref
    m = g_ref.abs().amax(dim=1)  # (N,)
    bound_w = eps * (m[:, None] * hidden.double().abs()).sum(0)[None, :]  # (1, H), the same for every class j
    bound_h = eps * m[:, None] * weight.double().abs().sum(0)[None, :]  # (N, H)
    err_w = (got[2].double() - w_ref).abs()
    err_h = (got[1].double() - h_ref).abs()
    assert (err_w <= bound_w + tol).all(), float((err_w - bound_w).max())
    assert (err_h <= bound_h + tol).all(), float((err_h - bound_h).max())


OPTION_CASES = {
    "ce": dict(),
    "smooth_weight_zloss": dict(label_smoothing=0.1, z_loss=1e-3),
    "kd_full": dict(kd_weight=0.5, temperature=2.0, teacher=True),
    "sum": dict(reduction="sum", softcap=8.0),
    "none": dict(reduction="none"),
}


def options(name, seed=0):
    opts = dict(OPTION_CASES[name])
    g = torch.Generator().manual_seed(seed + 1)
    if opts.pop("teacher", False):
        t = torch.randn(N, V, generator=g) * 0.2
        t[:, 90] += 6.0  # a peaked teacher that disagrees with some targets
        opts["teacher_logits"] = t
    if name == "smooth_weight_zloss":
        opts["class_weight"] = torch.rand(V, generator=g) + 0.5
    return opts


def force_path(monkeypatch, path):
    """'sparse': kept entries applied by gather/scatter; 'chunks': the chunked GEMM path."""
    if path == "chunks":
        monkeypatch.setattr(flce_filter, "SPARSE_PER_ROW", 0)
    else:
        monkeypatch.setattr(flce_filter, "SPARSE_PIECE_BYTES", 4 * 8 * H * 5)  # pieces of 5 entries


def skipped_work(stats, path):
    if path == "sparse":
        return stats["sparse_blocks"] == stats["blocks"] and stats["kept_entries"] < N * V // 4
    return stats["sparse_blocks"] == 0 and stats["kept_chunks"] < stats["chunks"]


@pytest.mark.parametrize("path", ["sparse", "chunks"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_filter_within_bound_and_skips(backend, case, path, monkeypatch):
    if backend == "triton" and (case not in ("ce", "kd_full", "none") or path == "chunks" and case != "ce"):
        pytest.skip("interpreter time: a subset on triton")
    force_path(monkeypatch, path)
    hidden, weight, bias, target = peaked()
    opts = options(case)
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(9)) + 0.5 if case == "none" else None
    got = run(backend, hidden, weight, bias, target, opts, upstream, grad_filter=EPS)
    stats = dict(flce_filter.LAST_STATS)
    ref = reference(hidden, weight, bias, target, opts, upstream)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=3e-5, atol=3e-5)  # the loss is exact
    torch.testing.assert_close(got[3].double(), ref[3], rtol=3e-5, atol=3e-6)  # so is the bias gradient
    check_bound(got, ref, hidden, weight, EPS, tol=3e-5)
    assert skipped_work(stats, path), stats  # the filter did skip work
    assert stats["blocks"] == math.ceil(N / NB)


@pytest.mark.parametrize("path", ["sparse", "chunks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_eps_is_exact(backend, path, monkeypatch):
    """With eps far below every entry nothing is dropped: the target split, the sparse pieces and the
    runs must be exact."""
    force_path(monkeypatch, path)
    if path == "sparse":
        monkeypatch.setattr(flce_filter, "SPARSE_PER_ROW", V)  # every entry is kept: still sparse
    hidden, weight, bias, target = peaked(seed=2)
    opts = dict(label_smoothing=0.05)
    got = run(backend, hidden, weight, bias, target, opts, grad_filter=1e-30)
    ref = reference(hidden, weight, bias, target, opts)
    for a, r in zip(got[1:4], ref[1:4]):
        torch.testing.assert_close(a.double(), r, rtol=3e-5, atol=3e-6)


def test_run_cap_keeps_bound(monkeypatch):
    """Merging runs beyond MAX_RUNS only keeps more columns: still within the bound, fewer GEMMs."""
    monkeypatch.setattr(flce_filter, "MAX_RUNS", 1)
    force_path(monkeypatch, "chunks")
    hidden, weight, bias, target = peaked(seed=3)
    got = run("torch", hidden, weight, bias, target, {}, grad_filter=EPS)
    assert flce_filter.LAST_STATS["runs"] <= flce_filter.LAST_STATS["blocks"]
    check_bound(got, reference(hidden, weight, bias, target, {}), hidden, weight, EPS, tol=3e-5)


def test_runs_cover_kept_chunks():
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        kept = (torch.rand(n, generator=g) < 0.3).tolist()
        cap = int(torch.randint(1, 6, (1,), generator=g))
        runs = flce_filter._runs(kept, cap)
        assert len(runs) <= cap
        assert all(a < b for a, b in runs) and all(runs[i][1] < runs[i + 1][0] for i in range(len(runs) - 1))
        covered = [any(a <= c < b for a, b in runs) for c in range(n)]
        assert all(cv for cv, k in zip(covered, kept) if k)  # every kept chunk is in a run
        if sum(1 for i, k in enumerate(kept) if k and (i == 0 or not kept[i - 1])) <= cap:
            assert covered == kept  # no merge needed: exactly the kept chunks


@pytest.mark.parametrize("path", ["sparse", "chunks"])
@pytest.mark.parametrize("accum", [torch.float32, None])
def test_bf16_accumulators(accum, path, monkeypatch):
    """Half-precision weights: the split fp32 accumulator and the bf16 one both take the filtered terms."""
    force_path(monkeypatch, path)
    hidden, weight, bias, target = peaked(seed=5, dtype=torch.bfloat16)
    got = run("torch", hidden, weight, bias, target, {}, grad_filter=EPS, grad_accum_dtype=accum)
    assert got[2].dtype == torch.bfloat16 and skipped_work(flce_filter.LAST_STATS, path)
    ref = reference(hidden, weight, bias, target, {})
    check_bound(got, ref, hidden, weight, EPS, tol=2e-2 * float(ref[2].abs().max()))


@pytest.mark.parametrize("path", ["sparse", "chunks"])
def test_nan_is_not_filtered_away(path, monkeypatch):
    force_path(monkeypatch, path)
    hidden, weight, bias, target = peaked(seed=6)
    hidden[7, 0] = float("nan")
    exact = run("torch", hidden, weight, bias, target, {})
    filt = run("torch", hidden, weight, bias, target, {}, grad_filter=EPS)
    for a, b in zip(exact, filt):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.isnan(filt[2]).any()


def test_module_and_compile():
    hidden, weight, bias, target = peaked(seed=7)
    loss_fn = vfm.nn.FusedLinearKnowledgeCrossEntropyLoss(grad_filter=EPS, block_rows=NB)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    def step(h, w):
        return loss_fn(h, w, target, bias)

    compiled = torch.compile(step, fullgraph=True)
    gc = torch.autograd.grad(compiled(h, w) * 2.0, (h, w))
    ge = torch.autograd.grad(step(h, w) * 2.0, (h, w))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_opcheck_with_filter():
    hidden, weight, bias, target = peaked(seed=8)
    args, *_ = prepare_fused_arguments(hidden.requires_grad_(), weight.requires_grad_(), target, bias,
                                       grad_filter=EPS, block_rows=NB)
    with vfm.use_backend("torch"):
        torch.library.opcheck(torch.ops.vfm.fused_linear_knowledge_cross_entropy.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("bad,exc", [(0.0, ValueError), (1.0, ValueError), (-1e-3, ValueError),
                                     (float("nan"), ValueError), ("1e-3", TypeError), (True, TypeError)])
def test_bad_grad_filter(bad, exc):
    hidden, weight, bias, target = peaked()
    with pytest.raises(exc, match="grad_filter"):
        flce(hidden, weight, target, bias, grad_filter=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sparse", "chunks"])
@pytest.mark.parametrize("accum", [torch.float32, None])
def test_gpu_bf16_filter_within_bound(path, accum, monkeypatch):
    """bf16 on CUDA (cuBLAS, Triton kernel, index_add_ atomics): the bound with bf16 slack; GPU only."""
    force_path(monkeypatch, path)
    hidden, weight, bias, target = peaked(seed=11, dtype=torch.bfloat16)
    cuda = [t.cuda() if t is not None else None for t in (hidden, weight, bias, target)]
    got = run("triton" if "triton" in vfm.available_backends(OP, "cuda") else "torch", *cuda, {},
              grad_filter=EPS, grad_accum_dtype=accum)
    assert skipped_work(flce_filter.LAST_STATS, path), flce_filter.LAST_STATS
    ref = reference(*cuda, {})
    torch.testing.assert_close(got[0].double(), ref[0], rtol=2e-3, atol=2e-3)
    check_bound(got, ref, cuda[0], cuda[1], EPS, tol=2e-2 * float(ref[2].abs().max()))
