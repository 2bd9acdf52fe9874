"""The custom op ``vfm::fused_linear_knowledge_cross_entropy``: opcheck, torch.compile, accumulator, blocks."""

import pytest
import torch

import vfm
from vfm.functional import fused_linear_knowledge_cross_entropy as flce
from vfm.functional import knowledge_cross_entropy
from vfm.ops.flce_api import prepare_fused_arguments
from vfm.ops.flce_blockwise import WeightGradAccumulator, default_block_rows


def _inputs(n=13, h=8, v=29, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=requires_grad)
    weight = torch.randn(v, h, generator=g, requires_grad=requires_grad)
    bias = torch.randn(v, generator=g, requires_grad=requires_grad)
    target = torch.randint(0, v, (n,), generator=g)
    target[3:4] = -100
    return hidden, weight, bias, target


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    hidden, weight, bias, target = _inputs()
    teacher = torch.randn(13, 29)
    args, *_ = prepare_fused_arguments(hidden, weight, target, bias, reduction=reduction, label_smoothing=0.1,
                                       teacher_logits=teacher, kd_weight=0.5, block_rows=4)
    with vfm.use_backend("torch"):
        torch.library.opcheck(torch.ops.vfm.fused_linear_knowledge_cross_entropy.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                          "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_matches_eager():
    hidden, weight, bias, target = _inputs()

    def step(h, w, b, t):
        return flce(h, w, t, b, label_smoothing=0.1, z_loss=1e-3, block_rows=4)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(hidden, weight, bias, target)
    grads = torch.autograd.grad(loss * 1.5, (hidden, weight, bias))
    ref_loss = step(hidden, weight, bias, target)
    ref_grads = torch.autograd.grad(ref_loss * 1.5, (hidden, weight, bias))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # and against the materialised logits
    logits = hidden @ weight.T + bias
    mat = knowledge_cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(loss, mat, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 8])
def test_weight_grad_accumulator_split_fp32(dtype, vocab):
    """The fp32 accumulator whose first half lives in the half-precision output's own storage."""
    g = torch.Generator().manual_seed(1)
    blocks = [(torch.randn(5, vocab, generator=g).to(dtype), torch.randn(5, 6, generator=g).to(dtype))
              for _ in range(9)]
    acc = WeightGradAccumulator(vocab, 6, dtype, torch.device("cpu"), accum_fp32=True)
    for gb, hb in blocks:
        acc.add(gb, hb)
    out = acc.finish()
    exact = sum(gb.double().t() @ hb.double() for gb, hb in blocks)
    assert out.dtype == dtype and out.shape == (vocab, 6)
    # one rounding to the half dtype of the exactly accumulated value
    torch.testing.assert_close(out, exact.to(dtype), rtol=0, atol=0)


def test_weight_grad_accumulator_empty_is_zero():
    acc = WeightGradAccumulator(5, 3, torch.bfloat16, torch.device("cpu"), accum_fp32=True)
    assert torch.equal(acc.finish(), torch.zeros(5, 3, dtype=torch.bfloat16))


def test_default_block_rows_fits_budget():
    rows = default_block_rows(2048, 128256, 4, 1, torch.device("cpu"))
    assert 16 <= rows and rows * 128256 * 4 <= 64 << 20 and rows % 16 == 0
    assert default_block_rows(3, 128256, 4, 1, torch.device("cpu")) == 3
    assert default_block_rows(8192, 128256, 2, 2, torch.device("cuda")) * 128256 * 2 * 2 <= 256 << 20


@pytest.mark.parametrize("block_rows", [1, 5, 13, 100])
def test_block_size_does_not_change_the_result(block_rows):
    hidden, weight, bias, target = _inputs()
    logits = (hidden @ weight.T + bias).double()
    ref = knowledge_cross_entropy(logits, target, z_loss=1e-2)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    loss = flce(hidden, weight, target, bias, z_loss=1e-2, block_rows=block_rows)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    torch.testing.assert_close(loss.double(), ref, rtol=3e-5, atol=3e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_empty_batch():
    hidden, weight, bias, _ = _inputs(n=0)
    loss = flce(hidden, weight, torch.zeros(0, dtype=torch.long), bias)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))


def test_autocast_runs_the_head_in_the_autocast_dtype():
    hidden, weight, bias, target = _inputs(n=24, h=16, v=37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flce(hidden, weight, target, bias, block_rows=5)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert all(g.dtype == torch.float32 for g in grads)
    with torch.no_grad():  # the head really ran in bf16: the same number as on bf16-cast inputs
        low = flce(hidden.bfloat16(), weight.bfloat16(), target, bias.bfloat16(), block_rows=5)
        full = flce(hidden, weight, target, bias, block_rows=5)
    assert loss.item() == low.item() and loss.item() != full.item()
    # reference: bf16-rounded operands, float64 logits
    hb, wb, bb = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight, bias))
    ref = knowledge_cross_entropy(hb @ wb.T + bb, target)
    ref_grads = torch.autograd.grad(ref, (hb, wb, bb))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-2 * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [4099, 4100])
def test_gpu_weight_grad_accumulator_fp32_from_bf16(vocab):
    """cuBLAS bf16 x bf16 -> fp32 accumulation into the split accumulator: one final rounding."""
    g = torch.Generator().manual_seed(2)
    blocks = [(torch.randn(64, vocab, generator=g).bfloat16().cuda(),
               torch.randn(64, 96, generator=g).bfloat16().cuda()) for _ in range(12)]
    acc = WeightGradAccumulator(vocab, 96, torch.bfloat16, torch.device("cuda"), accum_fp32=True)
    for gb, hb in blocks:
        acc.add(gb, hb)
    exact = sum(gb.double().t() @ hb.double() for gb, hb in blocks)
    torch.testing.assert_close(acc.finish().double(), exact, rtol=2 ** -7, atol=1e-6)
