"""fused_linear_knowledge_cross_entropy against knowledge_cross_entropy on materialised float64 logits.

Independent reference: the logits ``hidden @ weight.T + bias`` are materialised in float64 and fed
to :func:`vfm.functional.knowledge_cross_entropy` on its pure-PyTorch backend; autograd through
the matmul gives the reference gradients of hidden, weight and bias.  Every test forces the fused
op's backend and checks through the registry's call counter that it really ran.  The full option
grid runs on torch and cpp; the Triton interpreter (slow, fp32 only) gets a subset.
"""

import pytest
import torch

import vfm
from vfm import _registry
from vfm.functional import fused_linear_knowledge_cross_entropy as flce
from vfm.functional import knowledge_cross_entropy
from kce_cases import CASES, make_inputs

OP = "fused_linear_knowledge_cross_entropy"
CPU_BACKENDS = vfm.available_backends(OP, "cpu")
FULL_BACKENDS = [b for b in ("torch", "cpp") if b in CPU_BACKENDS]
HAS_TRITON = "triton" in CPU_BACKENDS
N, H, V, NB = 37, 16, 101, 8  # 5 blocks, the last one partial; V not a power of two

TOL = {torch.float64: 1e-7, torch.float32: 3e-5}  # cpp kernels take fp32 scales, as for knowledge CE


def make_case(case: dict, n_rows=N, hidden_size=H, vocab=V, dtype=torch.float32, seed=0, bias=True):
    """(hidden, weight, bias, target, options) with options for the fused op (class_weight renamed)."""
    _, target, opts = make_inputs(case, n_rows, vocab, dtype=dtype, seed=seed)
    if "weight" in opts:
        opts["class_weight"] = opts.pop("weight")
    g = torch.Generator().manual_seed(seed + 7)
    hidden = torch.randn(n_rows, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5 * 2).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    return hidden, weight, b, target, opts


def reference(hidden, weight, bias, target, opts, upstream=None, teacher_head=None):
    """Loss and (grad_hidden, grad_weight, grad_bias) from materialised float64 logits."""
    fresh = lambda t: t.detach().to(torch.float64, copy=True).requires_grad_()  # noqa: E731
    h, w = fresh(hidden), fresh(weight)
    b = fresh(bias) if bias is not None else None
    logits = h @ w.T + (b if b is not None else 0)
    o = dict(opts)
    if "class_weight" in o:
        o["weight"] = o.pop("class_weight")
    if teacher_head is not None:
        th, tw, tb = teacher_head
        o["teacher_logits"] = th.double() @ tw.double().T + (tb.double() if tb is not None else 0)
    elif isinstance(o.get("teacher_logits"), torch.Tensor):
        o["teacher_logits"] = o["teacher_logits"].double()
    with vfm.use_backend("torch"):
        loss = knowledge_cross_entropy(logits, target, **o)
    loss.backward(upstream.double() if upstream is not None else None)
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def check(backend, hidden, weight, bias, target, opts, upstream=None, teacher_head=None, dtype=torch.float32,
          **extra):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    before = _registry.CALLS[(OP, backend)]
    with vfm.use_backend(backend):
        th = {}
        if teacher_head is not None:
            th = dict(teacher_hidden=teacher_head[0], teacher_weight=teacher_head[1], teacher_bias=teacher_head[2])
        loss = flce(leaves[0], leaves[1], target, leaves[2], **opts, **th, **extra)
        if upstream is None and loss.dim():
            upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
        loss.backward(upstream)
    assert _registry.CALLS[(OP, backend)] == before + (2 if loss.dim() else 1), "the forced backend did not run"
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss_opts = {k: v for k, v in extra.items() if k not in ("block_rows", "grad_accum_dtype")}
    ref = reference(hidden, weight, bias, target, dict(opts, **loss_opts), upstream, teacher_head)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref[0], rtol=tol, atol=tol)
    for leaf, r, name in zip(leaves, ref[1:], ("hidden", "weight", "bias")):
        if leaf is None:
            continue
        scale = r.abs().max().item() or 1.0
        torch.testing.assert_close(leaf.grad.double(), r, rtol=0, atol=tol * scale + 1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return loss, leaves


@pytest.mark.parametrize("backend", FULL_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_materialised_reference(backend, case, reduction):
    hidden, weight, bias, target, opts = make_case(CASES[case], seed=len(case))
    check(backend, hidden, weight, bias, target, opts, reduction=reduction, block_rows=NB)


TRITON_SUBSET = [("ce", "mean"), ("everything", "mean"), ("topk", "sum"), ("posterior_teacher_soft", "mean"),
                 ("mass_dense", "none"), ("jsd", "mean")]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not available under the interpreter")
@pytest.mark.parametrize("case,reduction", TRITON_SUBSET)
def test_triton_interpreter_matches_reference(case, reduction):
    hidden, weight, bias, target, opts = make_case(CASES[case], n_rows=19, vocab=67, seed=len(case))
    check("triton", hidden, weight, bias, target, opts, reduction=reduction, block_rows=8)


@pytest.mark.parametrize("backend", FULL_BACKENDS + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("kd", ["kl", "jsd"])
def test_teacher_head(backend, kd):
    """teacher_hidden + teacher_weight (+ bias): distillation through the output layer."""
    n, v = (19, 67) if backend == "triton" else (N, V)
    hidden, weight, bias, target, opts = make_case({}, n_rows=n, vocab=v, seed=5)
    g = torch.Generator().manual_seed(11)
    t_h = torch.randn(n, 24, generator=g, requires_grad=True)
    t_w = torch.randn(v, 24, generator=g) / 3
    t_b = torch.randn(v, generator=g)
    check(backend, hidden, weight, bias, target, dict(ce_weight=0.5, kd_weight=0.5, kd=kd, temperature=2.0),
          teacher_head=(t_h, t_w, t_b), block_rows=NB)
    assert t_h.grad is None  # the teacher gets no gradient


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_teacher_head_posterior_and_no_bias(backend):
    hidden, weight, _, target, opts = make_case(CASES["mass_grouped"], seed=9, bias=False)
    g = torch.Generator().manual_seed(12)
    head = (torch.randn(N, 8, generator=g), torch.randn(V, 8, generator=g), None)
    opts.update(penalty="posterior", rule_strength=1.5, kd_weight=0.3, kd="reverse_kl")
    check(backend, hidden, weight, None, target, opts, teacher_head=head, block_rows=NB)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_3d_hidden_float64_and_upstream(backend):
    hidden, weight, bias, target, opts = make_case(CASES["everything"], n_rows=24, dtype=torch.float64, seed=2)
    b_, t_ = 4, 6
    hidden, target = hidden.reshape(b_, t_, H), target.reshape(b_, t_)
    opts["soft_mask"] = opts["soft_mask"].reshape(b_, t_)
    opts["allowed"] = (opts["allowed"][0], opts["allowed"][1].reshape(b_, t_))
    opts["teacher_logits"] = opts["teacher_logits"].reshape(b_, t_, V)
    loss, _ = check(backend, hidden, weight, bias, target, opts, upstream=torch.tensor(2.5, dtype=torch.float64),
                    dtype=torch.float64, block_rows=5)
    per_row, _ = check(backend, hidden, weight, bias, target, opts, dtype=torch.float64, reduction="none",
                       block_rows=7)
    assert per_row.shape == (b_, t_)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_only_some_inputs_require_grad(backend):
    hidden, weight, bias, target, opts = make_case(CASES["ce_smooth"], seed=4)
    h = hidden.clone().requires_grad_()
    with vfm.use_backend(backend):
        loss = flce(h, weight, target, bias, block_rows=NB, **opts)  # frozen weight and bias
        loss.backward()
    ref = reference(hidden, weight, bias, target, opts)
    torch.testing.assert_close(h.grad.double(), ref[1], rtol=0, atol=3e-5 * ref[1].abs().max().item())
    w = weight.clone().requires_grad_()
    with vfm.use_backend(backend):
        loss = flce(hidden, w, target, bias, block_rows=NB, num_items_in_batch=50, **opts)
        (loss * -0.75).backward()
    ref = reference(hidden, weight, bias, target, dict(opts, num_items_in_batch=50), torch.tensor(-0.75))
    torch.testing.assert_close(w.grad.double(), ref[2], rtol=0, atol=3e-5 * ref[2].abs().max().item())
    with torch.no_grad(), vfm.use_backend(backend):
        value = flce(hidden.requires_grad_(), weight, target, bias, **opts)
    assert not value.requires_grad
    torch.testing.assert_close(value.double(), reference(hidden.detach(), weight, bias, target, opts)[0],
                               rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_return_parts_and_default_block(backend):
    hidden, weight, bias, target, opts = make_case(CASES["everything"], seed=8)
    with vfm.use_backend(backend):
        parts = flce(hidden, weight, target, bias, return_parts=True, **opts)  # one block (default budget)
    o = dict(opts)
    o["weight"] = o.pop("class_weight")
    with vfm.use_backend("torch"):
        ref = knowledge_cross_entropy((hidden @ weight.T + bias).double(), target, return_parts=True,
                                      **{k: (v.double() if k == "teacher_logits" else v) for k, v in o.items()})
    for got, want in zip(parts, ref):
        torch.testing.assert_close(got.double(), want.double(), rtol=3e-5, atol=3e-5)


def test_bf16_weight_gradient_fp32_accumulation_cpu():
    """The split fp32 accumulator (half inside the bf16 gradient's storage) on CPU's fallback GEMM."""
    hidden, weight, bias, target, opts = make_case({}, n_rows=64, vocab=V, seed=1)
    hb, wb, bb = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    w = wb.clone().requires_grad_()
    with vfm.use_backend("torch"):
        flce(hb, w, target, bb, block_rows=4, reduction="sum").backward()
    ref = reference(hb, wb, bb, target, dict(reduction="sum"))
    # fp32 accumulation over 16 blocks, one final bf16 rounding: within bf16 resolution of the reference.
    torch.testing.assert_close(w.grad.double(), ref[2], rtol=2 ** -7, atol=1e-2 * ref[2].abs().max().item())
    w2 = wb.clone().requires_grad_()
    with vfm.use_backend("torch"):
        flce(hb, w2, target, bb, block_rows=4, reduction="sum", grad_accum_dtype=None).backward()
    assert w2.grad.dtype == torch.bfloat16
    err_fp32 = (w.grad.double() - ref[2]).abs().max()
    err_bf16 = (w2.grad.double() - ref[2]).abs().max()
    assert err_fp32 <= err_bf16  # accumulating in bf16 is never better


def test_module_form():
    hidden, weight, bias, target, opts = make_case(CASES["ce_weight"], seed=3)
    loss_fn = vfm.nn.FusedLinearKnowledgeCrossEntropyLoss(label_smoothing=0.1, class_weight=opts["class_weight"],
                                                          block_rows=NB)
    h = hidden.clone().requires_grad_()
    loss = loss_fn(h, weight, target, bias, z_loss=1e-3)
    loss.backward()
    ref = reference(hidden, weight, bias, target, dict(opts, label_smoothing=0.1, z_loss=1e-3))
    torch.testing.assert_close(loss.double(), ref[0], rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(h.grad.double(), ref[1], rtol=0, atol=3e-5 * ref[1].abs().max().item())
    assert "class_weight" in dict(loss_fn.named_buffers())
    with pytest.raises(TypeError, match="unknown options"):
        vfm.nn.FusedLinearKnowledgeCrossEntropyLoss(bogus=1)


def test_errors_name_argument_and_shapes():
    hidden, weight, bias, target, _ = make_case({}, seed=0)
    with pytest.raises(ValueError, match=r"hidden \(37, 16\) and weight \(101, 15\) disagree on H"):
        flce(hidden, weight[:, :15], target, bias)
    with pytest.raises(ValueError, match=r"target shape \(36\)"):
        flce(hidden, weight, target[:36], bias)
    with pytest.raises(ValueError, match=r"bias must have shape \(101,\)"):
        flce(hidden, weight, target, bias[:5])
    with pytest.raises(TypeError, match="weight is torch.float64"):
        flce(hidden, weight.double(), target)
    th, tw = torch.randn(N, 8), torch.randn(V, 8)
    with pytest.raises(ValueError, match=r"teacher_hidden \(36, 8\)"):
        flce(hidden, weight, target, teacher_hidden=th[:36], teacher_weight=tw, kd_weight=0.5)
    with pytest.raises(ValueError, match=r"teacher_weight \(100, 8\) has V=100"):
        flce(hidden, weight, target, teacher_hidden=th, teacher_weight=tw[:100], kd_weight=0.5)
    with pytest.raises(ValueError, match="given together"):
        flce(hidden, weight, target, teacher_hidden=th, kd_weight=0.5)
    with pytest.raises(ValueError, match="give one teacher"):
        flce(hidden, weight, target, teacher_hidden=th, teacher_weight=tw, teacher_logits=torch.randn(N, V),
             kd_weight=0.5)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        flce(hidden, weight, target, teacher_logits=torch.randn(N, V + 1), kd_weight=0.5)
    with pytest.raises(ValueError, match=r"class_weight must be a tensor of shape \(101,\).*\(5\)"):
        flce(hidden, weight, target, class_weight=torch.ones(5))
    with pytest.raises(ValueError, match="block_rows"):
        flce(hidden, weight, target, block_rows=0)
    with pytest.raises(ValueError, match="grad_accum_dtype"):
        flce(hidden, weight, target, grad_accum_dtype=torch.float16)
    with pytest.raises(ValueError, match="target holds values outside"):
        flce(hidden, weight, torch.full_like(target, V))
    with pytest.raises(TypeError, match="unknown options"):
        flce(hidden, weight, target, reductoin="sum")


def test_double_backward_refused():
    hidden, weight, bias, target, _ = make_case({}, seed=0)
    h = hidden.clone().requires_grad_()
    loss = flce(h, weight, target, bias)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["ce", "everything", "topk", "posterior_teacher_soft"])
def test_gpu_bf16_matches_reference(case):
    """bf16 on CUDA (cuBLAS GEMMs, Triton kernel, fp32 weight-gradient accumulation): GPU only."""
    hidden, weight, bias, target, opts = make_case(CASES[case], n_rows=300, hidden_size=256, vocab=4099, seed=6)
    dev = lambda v: v.cuda() if isinstance(v, torch.Tensor) else tuple(t.cuda() for t in v)  # noqa: E731
    opts = {k: (dev(v) if isinstance(v, (torch.Tensor, tuple)) else v) for k, v in opts.items()}
    hb, wb, bb, tg = hidden.bfloat16().cuda(), weight.bfloat16().cuda(), bias.bfloat16().cuda(), target.cuda()
    leaves = [t.clone().requires_grad_() for t in (hb, wb, bb)]
    loss = flce(*leaves[:2], tg, leaves[2], block_rows=64, **opts)
    loss.backward()
    ref = reference(hb, wb, bb, tg, opts)
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-3, atol=2e-3)
    for leaf, r in zip(leaves, ref[1:]):
        scale = r.abs().max().item()
        torch.testing.assert_close(leaf.grad.double(), r, rtol=0, atol=2e-2 * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("accum", [torch.float32, None])
def test_gpu_bf16_teacher_head_jsd(accum):
    """Distillation through the output layer in bf16 on CUDA, both weight-gradient accumulations."""
    hidden, weight, bias, target, _ = make_case({}, n_rows=300, hidden_size=256, vocab=4099, seed=7, bias=False)
    g = torch.Generator().manual_seed(13)
    t_h, t_w = torch.randn(300, 128, generator=g), torch.randn(4099, 128, generator=g) / 8
    cuda16 = lambda t: t.bfloat16().cuda()  # noqa: E731
    hb, wb, tg = cuda16(hidden), cuda16(weight), target.cuda()
    leaves = [hb.clone().requires_grad_(), wb.clone().requires_grad_()]
    opts = dict(ce_weight=0.5, kd_weight=0.5, kd="jsd")
    loss = flce(*leaves, tg, teacher_hidden=cuda16(t_h), teacher_weight=cuda16(t_w), block_rows=64,
                grad_accum_dtype=accum, **opts)
    loss.backward()
    ref = reference(hb, wb, None, tg, opts, teacher_head=(cuda16(t_h), cuda16(t_w), None))
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-3, atol=2e-3)
    for leaf, r in zip(leaves, ref[1:3]):
        torch.testing.assert_close(leaf.grad.double(), r, rtol=0, atol=2e-2 * r.abs().max().item())
