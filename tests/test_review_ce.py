"""Review regressions of the cross-entropy side, each against torch's own numbers / behaviour."""

import math

import pytest
import torch

import vfm


def _both(ctor, inp, target, autocast=False):
    """(torch's loss, its input grad, vfm's loss, its input grad) for one call."""
    out = []
    for cls in (torch.nn.CrossEntropyLoss, vfm.nn.CrossEntropyLoss):
        x = inp.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = cls(**ctor)(x, target)
        loss.sum().backward()
        out += [loss, x.grad]
    return out


@pytest.mark.parametrize("ctor", [dict(), dict(label_smoothing=0.1), dict(weight=torch.rand(5) + 0.5)])
def test_dropin_all_ignored_mean_has_zero_gradient_like_torch(ctor):
    # torch: NaN loss but a zero gradient (the batch contributes nothing); vfm gave NaN gradients.
    want, want_g, got, got_g = _both(ctor, torch.randn(4, 5), torch.full((4,), -100))
    assert math.isnan(want.item()) and math.isnan(got.item())
    assert torch.equal(want_g, torch.zeros(4, 5))
    torch.testing.assert_close(got_g, want_g)
    want, want_g, got, got_g = _both(ctor, torch.randn(5), torch.tensor(-100))  # unbatched
    assert math.isnan(got.item())
    torch.testing.assert_close(got_g, want_g)


def test_dropin_zero_total_weight_is_nan_like_torch():
    w = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    for ls in (0.0, 0.1):
        want, _, got, got_g = _both(dict(weight=w, label_smoothing=ls), torch.randn(3, 5), torch.tensor([0, 1, -100]))
        assert math.isnan(want.item()) and math.isnan(got.item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropin_under_autocast_returns_fp32_like_torch(reduction, dtype):
    # torch's cross_entropy is on autocast's fp32 list: fp32 result; vfm returned the input dtype.
    ctor = dict(reduction=reduction, weight=torch.rand(6) + 0.5, label_smoothing=0.1)
    inp = torch.randn(7, 6).to(dtype)
    target = torch.tensor([0, 5, -100, 2, 3, 1, 4])
    want, want_g, got, got_g = _both(ctor, inp, target, autocast=True)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g, want_g, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", ["int32_target", "bool_target", "fp16_input_fp32_weight", "fp64_input_fp32_weight"])
def test_dropin_raises_where_torch_raises(case):
    inp, target, ctor = torch.randn(3, 5), torch.tensor([0, 1, 4]), {}
    if case == "int32_target":
        target = target.int()
    elif case == "bool_target":
        target = torch.tensor([True, False, True])
    elif case == "fp16_input_fp32_weight":
        inp, ctor = inp.half(), dict(weight=torch.rand(5))
    else:
        inp, ctor = inp.double(), dict(weight=torch.rand(5))
    with pytest.raises(RuntimeError) as want:
        torch.nn.CrossEntropyLoss(**ctor)(inp, target)
    with pytest.raises(RuntimeError) as got:
        vfm.nn.CrossEntropyLoss(**ctor)(inp, target)
    assert str(got.value) == str(want.value)


def test_dropin_uint8_targets_and_transposed_logits_match_torch():
    target = torch.tensor([0, 4, 2, 1], dtype=torch.uint8)
    inp = torch.randn(5, 4).t()  # non-contiguous (N, C)
    want, want_g, got, got_g = _both(dict(label_smoothing=0.05), inp, target)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_g, want_g)


def test_dropin_out_of_range_target_raises_clearly():
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*\[5\]"):
        vfm.nn.CrossEntropyLoss()(torch.randn(3, 5), torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        vfm.nn.CrossEntropyLoss()(torch.randn(3, 5), torch.tensor([0, -1, 1]))

