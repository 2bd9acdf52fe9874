"""Public behaviour of the low-rank adapter ops: errors, opcheck, torch.compile, the LoRALinear module."""

import math

import pytest
import torch

from vfm.functional import adalora_linear, dora_linear, lora_linear, lora_linear_multi
from vfm.nn import LoRALinear
from test_lora_reference import call, inputs_of, make, plain_lora


def _esc(s):
    return s.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread

# ------------------------------------------------------------------------- bad input --
def _base():
    return torch.randn(4, 5), torch.randn(7, 5), torch.randn(7), torch.randn(3, 5), torch.randn(7, 3)


@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(x=torch.randn(4, 6)), ValueError, "x has shape (4, 6) but weight has shape (7, 5)"),
        (dict(weight=torch.randn(7, 5, 1)), ValueError, "weight must have shape (out_features, in_features)"),
        (dict(bias=torch.randn(6)), ValueError, "bias must have shape (7,)"),
        (dict(lora_a=torch.randn(3, 4)), ValueError, "lora_a must have shape (r, in_features=5), got (3, 4)"),
        (dict(lora_a=torch.randn(0, 5), lora_b=torch.randn(7, 0)), ValueError, "r=0"),
        (dict(lora_b=torch.randn(7, 2)), ValueError, "lora_b must have shape (out_features, r) = (7, 3)"),
        (dict(weight=torch.randn(7, 5, dtype=torch.float64)), ValueError, "weight dtype torch.float64"),
        (dict(bias=torch.randn(7, dtype=torch.float16)), ValueError, "bias dtype"),
        (dict(lora_b=torch.randn(7, 3, dtype=torch.float64)), ValueError, "lora_b dtype"),
        (dict(x=torch.ones(4, 5, dtype=torch.long)), TypeError, "x must be a floating"),
        (dict(lora_a=[[1.0]]), TypeError, "lora_a must be a torch.Tensor"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must lie in [0, 1)"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(scaling=float("nan")), ValueError, "scaling"),
        (dict(scaling="2"), TypeError, "scaling"),
        (dict(training=1), TypeError, "training"),
        (dict(seed=-1, dropout_p=0.1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_lora_linear_bad_input_names_the_argument(change, exc, needle):
    x, w, b, a, bb = _base()
    kw = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scaling=1.0)
    kw.update(change)
    with pytest.raises(exc, match=_esc(needle)):
        lora_linear(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("lora_a"), kw.pop("lora_b"),
                    kw.pop("scaling"), **kw)


def test_variant_specific_errors():
    x, w, b, a, bb = _base()
    with pytest.raises(ValueError, match=_esc("magnitude must have shape (7,), got (5)")):
        dora_linear(x, w, b, a, bb, torch.ones(5), 1.0)
    with pytest.raises(ValueError, match="magnitude dtype"):
        dora_linear(x, w, b, a, bb, torch.ones(7, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=_esc("lora_e must have shape (3,) or (3, 1)")):
        adalora_linear(x, w, b, a, torch.ones(2, 1), bb, 1.0, 3.0)
    with pytest.raises(TypeError, match="ranknum"):
        adalora_linear(x, w, b, a, torch.ones(3, 1), bb, 1.0, torch.ones(2))
    sa, sb = torch.randn(2, 3, 5), torch.randn(2, 7, 3)
    with pytest.raises(ValueError, match=_esc("adapter_ids must lie in [-1, 2); got [2]")):
        lora_linear_multi(x, w, b, sa, sb, [1.0, 1.0], torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=_esc("adapter_ids must have shape (4,)")):
        lora_linear_multi(x, w, b, sa, sb, [1.0, 1.0], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scalings has 1 entries but a_stack holds K=2"):
        lora_linear_multi(x, w, b, sa, sb, [1.0], torch.tensor([0, 1, 1, -1]))
    with pytest.raises(ValueError, match=_esc("b_stack must have shape (K, out_features, r)")):
        lora_linear_multi(x, w, b, sa, torch.randn(2, 7, 4), [1.0, 1.0], torch.tensor([0, 1, 1, -1]))
    with pytest.raises(ValueError, match=_esc("a_stack (2, 3, 6) and b_stack (2, 7, 3)")):
        lora_linear_multi(x, w, b, torch.randn(2, 3, 6), sb, [1.0, 1.0], torch.tensor([0, 1, 1, -1]))
    with pytest.raises(TypeError, match="adapter_ids must be an integer"):
        lora_linear_multi(x, w, b, sa, sb, [1.0, 1.0], torch.zeros(4))


def test_seed_as_tensor_equals_seed_as_int():
    t = make(dtype=torch.float32)
    assert torch.equal(call("lora", t, 0.5, seed=torch.tensor([77])), call("lora", t, 0.5, seed=77))


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "multi"])
def test_double_backward_is_refused(kind):
    t = make()
    y = call(kind, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), [t["x"]], create_graph=True)


# ------------------------------------------------------------------ inference fast path --
@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "multi"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_calls_without_autograd_skip_the_function_and_match_the_formula(kind, backend, mode):
    """With nothing to differentiate the kernels run without the autograd.Function (no node, no
    saved tensors): same values as the formula and as the differentiable call, in every backend."""
    import vfm
    from vfm.ops import lora_ops
    if backend not in vfm.available_backends("lora_linear", "cpu"):
        pytest.skip(f"{backend} backend unavailable")
    t = make(dtype=torch.float32)
    want = call(kind, t, 0.25, plain=True)
    with vfm.use_backend(backend):
        graded = call(kind, t, 0.25)
        eager = {"lora": lora_ops.EagerLoRALinear, "dora": lora_ops.EagerDoRALinear,
                 "adalora": lora_ops.EagerAdaLoRALinear, "multi": lora_ops.EagerLoRALinearMulti}[kind]
        applied = []
        original = eager.apply
        eager.apply = lambda *args: applied.append(1) or original(*args)
        try:
            if mode == "no_grad":
                with torch.no_grad():
                    got = call(kind, t, 0.25)
            elif mode == "inference_mode":
                with torch.inference_mode():
                    got = call(kind, t, 0.25)
            else:
                frozen = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                got = call(kind, frozen, 0.25)
            assert not applied, "the autograd.Function ran although nothing needs a gradient"
            call(kind, t, 0.25)  # and with inputs requiring grad it does run
            assert applied
        finally:
            eager.apply = original
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, graded.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", ["plain", "zero_magnitude", "output_changed_in_place", "bias", "dropout"])
def test_dora_magnitude_gradient_from_the_output(backend, case, monkeypatch):
    """Without dropout, grad_magnitude comes from DoRA's output (no GEMM), minus the bias's share; an
    output changed in place after the forward or dropout take the GEMM formula, and so does a zero
    magnitude on cpp (a host check), while triton keeps the output formula and a kernel fills in the
    zero columns (no host sync).  Every gradient is compared with the torch reference backend
    (float64; the interpreter: float32)."""
    import vfm
    from vfm.ops import lora_cpp_variants, lora_triton
    if backend not in vfm.available_backends("dora_linear", "cpu"):
        pytest.skip(f"{backend} backend unavailable")
    dtype = torch.float32 if backend == "triton" else torch.float64  # the interpreter's kernels: fp32
    t = make(dtype=dtype, bias=case == "bias", lead=(5, 7), d_in=9, d_out=11, r=3)
    if case == "zero_magnitude":
        with torch.no_grad():
            t["m"][[2, 7]] = 0.0
    p = 0.25 if case == "dropout" else 0.0
    module = lora_cpp_variants if backend == "cpp" else lora_triton
    used = []
    original = module.dora_magnitude_grad_from_output
    monkeypatch.setattr(module, "dora_magnitude_grad_from_output",
                        lambda *a, **k: used.append(a[1] is not None) or original(*a, **k))
    magnitude_kernels = []  # triton: which grad_magnitude kernels ran (GEMM formula, zero columns)
    if backend == "triton":
        from vfm.kernels import lora_dora
        for name in ("dora_magnitude_grad", "dora_zero_magnitude_grad_"):
            fn = getattr(lora_dora, name)
            monkeypatch.setattr(lora_dora, name,
                                lambda *a, _f=fn, _n=name, **k: magnitude_kernels.append(_n) or _f(*a, **k))
    grad_y = torch.randn(5, 7, 11, dtype=dtype, generator=torch.Generator().manual_seed(4))
    names = ["x", "w", "a", "bb", "m"] + (["b"] if case == "bias" else [])
    results = {}
    for name in ("torch", backend):
        for v in t.values():
            if isinstance(v, torch.Tensor):
                v.grad = None
        with vfm.use_backend(name):
            y = call("dora", t, p, seed=11)
            if case == "output_changed_in_place":
                y.mul_(1.0)  # the same values, but y's version changed after the forward
            (y * grad_y).sum().backward()
        results[name] = [y.detach().clone()] + [t[n].grad.clone() for n in names]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for label, got, want in zip(["y"] + names, results[backend], results["torch"]):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{case} {label}: {m}")
    if case == "dropout":
        assert not any(used), "grad_magnitude from the output with dropout"
    else:
        assert used == [case != "output_changed_in_place"], used
    if case == "plain":
        assert original(grad_y.reshape(-1, 11), results[backend][0].reshape(-1, 11), t["m"].detach()) is not None
    if case == "zero_magnitude":
        assert original(grad_y.reshape(-1, 11), results[backend][0].reshape(-1, 11), t["m"].detach()) is None
    if backend == "triton":
        from_output = case in ("plain", "zero_magnitude", "bias")
        assert magnitude_kernels == (["dora_zero_magnitude_grad_"] if from_output else ["dora_magnitude_grad"]), \
            magnitude_kernels


def test_dora_magnitude_gradient_from_the_output_refuses_a_16_bit_output_with_a_bias():
    from vfm.ops.lora_reference import dora_magnitude_grad_from_output
    g = torch.Generator().manual_seed(0)
    gy, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    m, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    want = (gy * (y - b)).sum(0) / m
    torch.testing.assert_close(dora_magnitude_grad_from_output(gy, y, m, b), want)
    torch.testing.assert_close(dora_magnitude_grad_from_output(gy, y, m), (gy * y).sum(0) / m)
    bf = torch.bfloat16
    assert dora_magnitude_grad_from_output(gy.to(bf), y.to(bf), m.to(bf), b.to(bf)) is None
    assert dora_magnitude_grad_from_output(gy.to(bf), y.to(bf), m.to(bf)) is not None
    assert dora_magnitude_grad_from_output(gy, y.double(), m) is None  # dtypes differ
    z = m.clone()
    z[[0, 2]] = 0.0
    assert dora_magnitude_grad_from_output(gy, y, z, b) is None  # the host check: a zero magnitude
    got = dora_magnitude_grad_from_output(gy, y, z, b, zero_ok=True)  # no check: placeholders at the zeros
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[[1, 3]], want[[1, 3]])


def test_forward_mode_ad_is_still_refused():
    import torch.autograd.forward_ad as fwAD
    t = make(dtype=torch.float64)
    x, w, b, a, bb = (t[n].detach() for n in ("x", "w", "b", "a", "bb"))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            lora_linear(dual, w, b, a, bb, 0.5)


# ----------------------------------------------------------------- opcheck and compile --
def _op_inputs(p):
    t = make(dtype=torch.float32, lead=(6,), d_in=5, d_out=7, r=3, k=2)
    x, w, b, a, bb, m, e = (t[n] for n in ("x", "w", "b", "a", "bb", "m", "e"))
    seed = torch.tensor(3)
    return {
        "lora_linear": (x, w, b, a, bb, 0.5, p, seed),
        "dora_linear": (x, w, b, a, bb, m, 0.5, p, seed),
        "adalora_linear": (x, w, b, a, e.reshape(3), bb, 0.5, torch.tensor([2.0]), p, seed),
        "lora_linear_multi": (x, w, b, t["a_stack"], t["b_stack"], torch.tensor([0.5, 2.0]),
                              torch.tensor([0, 1, -1, 1, 0, 0]), p, seed),
    }


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck(op, p):
    args = _op_inputs(p)[op]
    torch.library.opcheck(getattr(torch.ops.vfm, op).default, args)
    no_bias = args[:2] + (None,) + args[3:]
    torch.library.opcheck(getattr(torch.ops.vfm, op).default, no_bias, test_utils=("test_schema", "test_faketensor"))
    # the backward op on its own, with every gradient and with only some asked for
    outs = getattr(torch.ops.vfm, op)(*args)
    x, w = args[0], args[1]
    grad_y = torch.randn(x.shape[0], w.shape[0])
    bwd = getattr(torch.ops.vfm, op + "_backward").default
    n_grads = {"lora_linear": 5, "dora_linear": 6, "adalora_linear": 6, "lora_linear_multi": 5}[op]
    bwd_args = {
        "lora_linear": lambda needs: (grad_y, x, w, args[3], args[4], outs[1], 0.5, p, args[7], needs),
        "dora_linear": lambda needs: (grad_y, x, w, args[3], args[4], args[5], outs[1], outs[2], 0.5, p, args[8],
                                      needs, outs[0] if needs[5] else None),
        "adalora_linear": lambda needs: (grad_y, x, w, args[3], args[4], args[5], args[7], outs[1], 0.5, p,
                                         args[9], needs),
        "lora_linear_multi": lambda needs: (grad_y, x, w, args[3], args[4], args[5], args[6], outs[1], p, args[8],
                                            needs),
    }[op]
    for needs in ([True] * n_grads, [False, False, True] + [True] * (n_grads - 3)):
        torch.library.opcheck(bwd, bwd_args(needs), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "multi"])
def test_torch_compile_fullgraph(kind):
    torch._dynamo.reset()
    t = make(dtype=torch.float32, lead=(3, 4), d_in=8, d_out=6, r=2)
    ins = inputs_of(kind, t)

    def fn(x, seed):
        return call(kind, dict(t, x=x * 1.5), 0.25, seed=seed).tanh()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    x1 = t["x"].detach().clone().requires_grad_()
    y1 = compiled(x1, 5)
    y2 = fn(t["x"], 5)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(y1.sum(), [x1] + ins[1:])
    g2 = torch.autograd.grad(y2.sum(), ins)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_draws_a_seed_inside_the_graph():
    torch._dynamo.reset()
    t = make(dtype=torch.float32, lead=(5,), d_in=8, d_out=6)

    def fn(x):
        return lora_linear(x, t["w"], t["b"], t["a"], t["bb"], 1.0, dropout_p=0.5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(t["x"])
    y.sum().backward()
    assert y.shape == (5, 6) and t["a"].grad is not None


# --------------------------------------------------------------------------- module --
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_module_matches_formula_and_merges(use_rslora):
    base = torch.nn.Linear(12, 9)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0, use_rslora=use_rslora)
    assert layer.scaling == (8 / math.sqrt(4) if use_rslora else 8 / 4)
    assert not base.weight.requires_grad and base.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 12)
    y = layer(x)
    ref = plain_lora(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and base.weight.grad is None
    assert set(dict(layer.named_parameters())) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y.detach(), rtol=1e-5, atol=1e-5)


def test_lora_linear_module_dropout_and_errors():
    layer = LoRALinear(torch.nn.Linear(6, 4), r=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 6)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))
    layer.eval()
    expected = plain_lora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear(torch.nn.Linear(2, 2), r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(torch.nn.Linear(2, 2), dropout=1.0)
