"""vfm.nn.CrossEntropyLoss is a drop-in for torch.nn.CrossEntropyLoss; the knowledge module wraps the op."""

import math

import pytest
import torch

import vfm
from kce_cases import CASES, make_inputs
from plain_oracle import plain_knowledge_ce

BACKENDS = [b for b in vfm.available_backends("knowledge_cross_entropy", "cpu") if b != "triton"]


def _pair(**ctor):
    return torch.nn.CrossEntropyLoss(**ctor), vfm.nn.CrossEntropyLoss(**ctor)


def _compare(ctor, inp, target, dtype_tol=1e-5):
    ref_mod, our_mod = _pair(**ctor)
    a = inp.detach().clone().requires_grad_()
    b = inp.detach().clone().requires_grad_()
    want = ref_mod(a, target)
    got = our_mod(b, target)
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.numel() == 1 and math.isnan(want.item()):
        assert math.isnan(got.item())
        return
    torch.testing.assert_close(got, want, rtol=dtype_tol, atol=dtype_tol)
    up = torch.rand_like(want) + 0.5
    want.backward(up)
    got.backward(up)
    torch.testing.assert_close(b.grad, a.grad, rtol=dtype_tol, atol=dtype_tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ctor", [dict(), dict(label_smoothing=0.15), dict(ignore_index=2), dict(weight=True),
                                  dict(weight=True, label_smoothing=0.1, ignore_index=0)])
def test_dropin_2d_and_kdim(backend, reduction, ctor):
    ctor = dict(ctor)
    if ctor.get("weight") is True:
        ctor["weight"] = torch.rand(6) + 0.2
    ctor["reduction"] = reduction
    with vfm.use_backend(backend):
        t = torch.randint(0, 6, (9,))
        t[3] = -100 if "ignore_index" not in ctor else ctor["ignore_index"]
        _compare(ctor, torch.randn(9, 6), t)
        _compare(ctor, torch.randn(2, 6, 3, 4), torch.randint(0, 6, (2, 3, 4)))  # K-dimensional
        _compare(ctor, torch.randn(6), torch.tensor(4))  # unbatched


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dropin_probability_targets_and_low_precision(reduction):
    probs = torch.softmax(torch.randn(5, 7), -1)
    _compare(dict(reduction=reduction, label_smoothing=0.1), torch.randn(5, 7), probs)
    x = torch.randn(5, 7).to(torch.bfloat16)
    _compare(dict(reduction=reduction), x, torch.randint(0, 7, (5,)), dtype_tol=1e-2)


def test_dropin_all_ignored_is_nan_like_torch():
    _compare(dict(), torch.randn(4, 5), torch.full((4,), -100))
    _compare(dict(weight=torch.zeros(5)), torch.randn(4, 5), torch.randint(0, 5, (4,)))


def test_dropin_legacy_arguments_and_state_dict():
    ref_mod, our_mod = _pair(weight=torch.rand(4), size_average=False)
    assert our_mod.reduction == ref_mod.reduction == "sum"
    assert our_mod.state_dict().keys() == ref_mod.state_dict().keys()
    assert isinstance(our_mod, torch.nn.CrossEntropyLoss)


def test_knowledge_module_matches_oracle_and_takes_per_call_options():
    logits, target, opts = make_inputs(CASES["everything"], 7, 12, seed=4)
    fixed = {k: v for k, v in opts.items() if k not in ("teacher_logits", "allowed", "soft_mask")}
    per_call = {k: v for k, v in opts.items() if k in ("teacher_logits", "allowed", "soft_mask")}
    module = vfm.nn.KnowledgeCrossEntropyLoss(**fixed)
    assert "weight" in dict(module.named_buffers())
    got = module(logits, target, **per_call)
    torch.testing.assert_close(got.double(), plain_knowledge_ce(logits, target, **opts), rtol=2e-5, atol=2e-5)
    with pytest.raises(TypeError, match="unknown options"):
        vfm.nn.KnowledgeCrossEntropyLoss(temprature=2.0)
    with pytest.raises(TypeError, match="unknown options"):
        module(logits, target, teacher=None)
