"""Review of the LoRA drop-in (vfm.nn.LoRALinear, vfm.functional.*lora*, vfm.peft.accelerate).

Regression tests for the bugs this review fixed (argument checks of LoRALinear, lora_linear_multi's
scalings and adalora_linear's ranknum), and parity checks against PEFT's own, unaccelerated model
for the PEFT workflows the review went through and no other test covers: adapters added, mixed and
deleted after accelerate, dtype changes after accelerate, AdaLoRA's rank schedule, gradient
checkpointing of DoRA/AdaLoRA with dropout.  Models are tiny, randomly initialised and built in code.
"""

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import vfm.peft  # noqa: E402
from vfm import _registry  # noqa: E402
from vfm.adalora import attach_schedule, find_adalora_model  # noqa: E402
from vfm.functional import adalora_linear, dora_linear, lora_linear, lora_linear_multi  # noqa: E402
from vfm.nn import LoRALinear  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def llama(bias=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg)


def config(kind, dropout=0.0, **extra):
    if kind == "adalora":
        return AdaLoraConfig(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=2, deltaT=2, lora_alpha=8,
                             lora_dropout=dropout, target_modules=TARGETS, **extra)
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_dora=kind == "dora",
                      **extra)


def perturb(model, seed=1):
    """Nonzero adapters (PEFT starts with B = 0 / E = 0, where every adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def pair(kind, bias=False, **cfg):
    reference = get_peft_model(llama(bias), config(kind, **cfg))
    perturb(reference)
    fast = copy.deepcopy(reference)
    vfm.peft.accelerate(fast)
    return reference, fast


def tokens(n=2, t=7, seed=3):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def vfm_calls():
    ops = ("lora_linear", "dora_linear", "adalora_linear", "lora_linear_multi")
    return sum(n for (op, _b), n in _registry.CALLS.items() if op in ops)


def assert_same_step(reference, fast, ids, train=True, atol=1e-5):
    """Same logits and the same gradients on every parameter (PEFT's model is the reference)."""
    reference.train(train)
    fast.train(train)
    out_r, out_f = reference(input_ids=ids, labels=ids), fast(input_ids=ids, labels=ids)
    scale = out_r.logits.abs().max().item()
    torch.testing.assert_close(out_f.logits, out_r.logits, rtol=0, atol=atol * scale)
    reference.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)
    out_r.loss.backward()
    out_f.loss.backward()
    named = dict(fast.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        q = named[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=atol * 10 * (p.grad.abs().max().item() or 1.0),
                                       msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 0


# ------------------------------------------------------------------ argument checks --
def _multi_args():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    a, b = torch.randn(2, 3, 6, generator=g), torch.randn(2, 5, 3, generator=g)
    return x, w, a, b, torch.tensor([0, 1, -1, 0])


def test_lora_linear_multi_scalings_errors_name_the_argument():
    x, w, a, b, ids = _multi_args()
    with pytest.raises(TypeError, match="scalings must be a sequence"):  # was "'float' object is not iterable"
        lora_linear_multi(x, w, None, a, b, 1.0, ids)
    with pytest.raises(ValueError, match=r"scalings\[1\] must not be NaN"):
        lora_linear_multi(x, w, None, a, b, [1.0, float("nan")], ids)
    for bad in (float("nan"), float("inf")):  # a tensor of scalings was not checked: NaN / inf outputs
        with pytest.raises(ValueError, match="scalings must be finite"):
            lora_linear_multi(x, w, None, a, b, torch.tensor([1.0, bad]), ids)
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \(4,\) \(one per row"):
        lora_linear_multi(x, w, None, a, b, [1.0, 2.0], ids[:3])


def test_lora_linear_multi_takes_a_numpy_array_of_scalings():
    x, w, a, b, ids = _multi_args()
    y = lora_linear_multi(x, w, None, a, b, np.array([0.5, 2.0]), ids)
    scal = [0.5, 2.0]
    expected = torch.stack([F.linear(x[i], w) + (0.0 if k < 0 else scal[k] * (a[k] @ x[i]) @ b[k].T)
                            for i, k in enumerate(ids.tolist())])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_adalora_linear_refuses_a_negative_ranknum():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    a, e, b = torch.randn(3, 6, generator=g), torch.randn(3, 1, generator=g), torch.randn(5, 3, generator=g)
    with pytest.raises(ValueError, match="ranknum must be >= 0"):  # was ZeroDivisionError (cpp) or inf
        adalora_linear(x, w, None, a, e, b, 1.0, -1e-5)
    y = adalora_linear(x, w, None, a, e, b, 2.0, 3)
    torch.testing.assert_close(y, F.linear(x, w) + (x @ (a * e).T @ b.T) * 2.0 / (3 + 1e-5), rtol=1e-5, atol=1e-5)



def test_autocast_leaves_float64_layers_in_float64_like_f_linear():
    # torch.autocast casts float32/16 tensors only; vfm cast float64 ones too (bf16 output, error 0.1)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 6, generator=g).double(), torch.randn(5, 6, generator=g).double(), torch.randn(5).double()
    a, bb = torch.randn(3, 6, generator=g).double(), torch.randn(5, 3, generator=g).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w, b) + 2.0 * F.linear(F.linear(x, a), bb)
        got = lora_linear(x, w, b, a, bb, 2.0)
        with pytest.raises(ValueError, match="weight becomes torch.bfloat16 but x becomes torch.float64"):
            lora_linear(x, w.float(), b, a, bb, 2.0)  # F.linear raises here too
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_float64_peft_model_under_autocast_matches_peft(kind):
    reference, fast = pair(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same_step(reference.double(), fast.double(), tokens(), atol=1e-12)

@pytest.mark.parametrize("kwargs, exc, needle", [
    (dict(alpha=float("nan")), ValueError, "alpha must be finite"),  # was raised only at the first forward
    (dict(alpha=float("inf")), ValueError, "alpha must be finite"),
    (dict(alpha="8"), TypeError, "alpha must be a real number"),  # was silently float("8")
    (dict(dropout="0.1"), TypeError, "dropout must be a real number"),
    (dict(dropout=None), TypeError, "dropout must be a real number"),  # was float()'s message
    (dict(r=4.0), TypeError, "r must be an int"),
    (dict(r=0), ValueError, "r must be an int >= 1"),
    (dict(use_rslora="no"), TypeError, "use_rslora must be a bool"),  # was bool("no") = True
    (dict(freeze_base=None), TypeError, "freeze_base must be a bool"),
])
def test_lora_linear_module_argument_errors(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        LoRALinear(torch.nn.Linear(6, 5), **kwargs)


def test_lora_linear_module_takes_numpy_integers():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=np.int64(4), alpha=np.float32(8.0))  # was "r must be an int >= 1, got 4"
    assert layer.r == 4 and type(layer.r) is int and layer.scaling == 2.0


# ----------------------------------------------------------------- LoRALinear module --
def _module():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), r=3, alpha=6, freeze_base=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _plain(layer, x):
    return F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


@pytest.mark.parametrize("make_x", [
    lambda: torch.randn(0, 6), lambda: torch.randn(2, 0, 6), lambda: torch.randn(2, 2, 3, 6),
    lambda: torch.randn(6, 4).T, lambda: torch.randn(3, 4, 12)[:, :, ::2], lambda: torch.randn(1, 6).expand(4, 6),
], ids=["empty", "empty-3d", "4d", "transposed", "strided", "expanded"])
def test_lora_linear_module_shapes_and_layouts_match_the_formula(make_x):
    layer = _module()
    layer.base_layer.bias.requires_grad_(False)  # frozen bias, trainable base weight
    x = make_x().requires_grad_(True)
    y = layer(x)
    grad = torch.randn(y.shape)
    got = torch.autograd.grad(y, (x, layer.base_layer.weight, layer.lora_A, layer.lora_B), grad)
    xr = x.detach().clone().requires_grad_(True)
    yr = _plain(layer, xr)
    want = torch.autograd.grad(yr, (xr, layer.base_layer.weight, layer.lora_A, layer.lora_B), grad)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lora_linear_module_state_dict_round_trip_and_copies(tmp_path):
    layer = _module()
    torch.save(layer.state_dict(), tmp_path / "lora.pt")
    other = LoRALinear(torch.nn.Linear(6, 5), r=3, alpha=6, freeze_base=False)
    other.load_state_dict(torch.load(tmp_path / "lora.pt", weights_only=True))
    x = torch.randn(4, 6)
    assert torch.equal(other(x), layer(x))
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    wide = copy.deepcopy(layer).to(torch.float64)
    torch.testing.assert_close(wide(x.double()), _plain(wide, x.double()), rtol=1e-12, atol=1e-12)
    assert "r=3, alpha=6, scaling=2" in repr(layer)


# ------------------------------------------------------------------- PEFT workflows --
def test_adapters_added_mixed_and_deleted_after_accelerate_match_peft():
    reference, fast = pair("lora")
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    for model in (reference, fast):
        model.add_adapter("two", second)
    perturb(reference, seed=5)
    fast.load_state_dict(reference.state_dict())
    for model in (reference, fast):
        model.set_adapter("two")
    before = vfm_calls()
    assert_same_step(reference, fast, tokens())
    assert vfm_calls() > before  # the adapter added after accelerate runs on vfm, not PEFT's forward
    for model in (reference, fast):
        model.add_weighted_adapter(["default", "two"], [0.7, 0.3], "cat", combination_type="cat")
        model.set_adapter("cat")
    assert_same_step(reference, fast, tokens())
    for model in (reference, fast):
        model.delete_adapter("cat")
        model.set_adapter("default")
    assert_same_step(reference, fast, tokens())


@pytest.mark.parametrize("kind", ["dora", "adalora"])
def test_dtype_changes_after_accelerate_match_peft(kind):
    reference, fast = pair(kind, bias=True)
    assert_same_step(reference.double(), fast.double(), tokens(), atol=1e-12)


def test_adalora_rank_schedule_on_vfm_matches_peft():
    reference, fast = pair("adalora", orth_reg_weight=0.5)
    optims = []
    for model in (reference, fast):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        attach_schedule(model, opt)
        optims.append(opt)
    ids = tokens()
    for _ in range(12):  # through the whole budget schedule (total_step=12)
        for model, opt in zip((reference, fast), optims):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    named = dict(fast.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(named[name], p, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    pattern = reference.peft_config["default"].rank_pattern
    assert pattern and pattern == fast.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) < 6 * len(pattern)  # the schedule pruned ranks



class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def _tiny_adalora():
    torch.manual_seed(0)
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, target_modules=["q", "v"],
                        lora_alpha=8)
    return get_peft_model(_Tiny(), cfg)


def test_adalora_schedule_attaches_through_an_accelerate_optimizer_wrapper():
    """attach_schedule(model, accelerator.prepare(optimizer)) raised AttributeError ('AcceleratedOptimizer' has no
    '_optimizer_step_post_hooks'); the hook now goes on the optimizer inside and counts the steps it really takes."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def run(wrapped):
        model = _tiny_adalora()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        g = torch.Generator().manual_seed(1)
        if wrapped:
            acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
            model, opt = acc.prepare(model, opt)
            attach_schedule(model, opt)
            for _ in range(12):  # 6 optimizer steps
                with acc.accumulate(model):
                    acc.backward(model(torch.randn(8, 8, generator=g)).pow(2).mean() / 2)
                    opt.step()
                    opt.zero_grad()
        else:  # PEFT's documented loop, the two half-batches of each step summed by hand
            for step in range(6):
                for _ in range(2):
                    (model(torch.randn(8, 8, generator=g)).pow(2).mean() / 2 / 2).backward()
                opt.step()
                model.base_model.update_and_allocate(step)
                opt.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}

    try:
        got, want = run(True), run(False)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert sum(int((e == 0).sum()) for e in got.values()) > 0  # the schedule ran and pruned ranks
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        attach_schedule(_tiny_adalora(), object())


def test_adalora_schedule_finds_the_model_inside_data_parallel_wrappers():
    model = _tiny_adalora()
    for wrapped in (torch.nn.DataParallel(model), torch.compile(torch.nn.DataParallel(model))):  # was TypeError
        assert find_adalora_model(wrapped) is model.base_model
    with pytest.raises(TypeError, match="AdaLoRA adapter"):
        find_adalora_model(torch.nn.DataParallel(_Tiny()))

@pytest.mark.parametrize("kind", ["dora", "adalora"])
def test_gradient_checkpointing_with_dropout_recomputes_the_same_masks(kind):
    _, fast = pair(kind, dropout=0.3)
    ids = tokens()

    def step(model):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(21)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = step(fast)
    ckpt = copy.deepcopy(fast)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ckpt.enable_input_require_grads()
    before = vfm_calls()
    logits_c, grads_c = step(ckpt)
    assert vfm_calls() - before == 3 * 2 * len(TARGETS)  # forward, recomputed forward, backward per layer
    torch.testing.assert_close(logits_c, logits, rtol=0, atol=0)
    assert grads.keys() == grads_c.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    torch.manual_seed(22)  # and the dropout did act: another seed gives other logits
    assert not torch.allclose(fast(input_ids=ids).logits, logits)



def _dora_outputs_held(loss):
    """Bytes of layer outputs that DoRA backward nodes keep as a ctx attribute (outside saved tensors)."""
    held, seen, stack = 0, set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        y = getattr(fn, "y", None)
        if isinstance(y, torch.Tensor):
            held += y.numel() * y.element_size()
        stack.extend(nf for nf, _ in fn.next_functions)
    return held


def test_dora_under_non_reentrant_checkpointing_pins_no_layer_output():
    """DoRA kept each layer's output on its autograd node (for grad_magnitude), beyond the reach of
    checkpointing's saved-tensor hooks: every DoRA output of the model stayed in memory."""
    reference, fast = pair("dora")
    ids = tokens()
    fast.train()
    assert _dora_outputs_held(fast(input_ids=ids, labels=ids).loss) > 0  # without checkpointing: by design
    for model in (reference, fast):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert _dora_outputs_held(fast(input_ids=ids, labels=ids).loss) == 0
    assert_same_step(reference, fast, ids)


def test_accelerate_warns_when_the_model_holds_no_adapter_layer(caplog):
    with caplog.at_level("WARNING", logger="vfm.peft"):
        report = vfm.peft.accelerate(llama())  # a user calling it before get_peft_model: was silent
    assert report.num_accelerated == 0 and "holds no PEFT adapter layer" in caplog.text
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):  # was AttributeError
        vfm.peft.accelerate({"model": llama()})


def test_modules_targeted_by_a_later_adapter_run_on_vfm_after_accelerate_again():
    reference, fast = pair("lora")
    head = LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"])
    for model in (reference, fast):
        model.add_adapter("head", head)
    perturb(reference, seed=6)
    fast.load_state_dict(reference.state_dict())
    for model in (reference, fast):
        model.base_model.set_adapter(["default", "head"])
    report = vfm.peft.accelerate(fast)
    assert "base_model.model.lm_head" in report.accelerated and not report.skipped
    before = vfm_calls()
    assert_same_step(reference, fast, tokens())
    assert vfm_calls() - before == 2 * (2 * len(TARGETS) + 1)  # every adapter layer, forward and backward


def test_compiled_lora_linear_module_follows_changes_of_its_scaling_and_dropout():
    """torch.compile makes a float attribute symbolic once it has changed; the argument checks called
    math.isnan on it, which dynamo cannot trace (fullgraph: Unsupported, otherwise a graph break)."""
    torch._dynamo.reset()
    layer = _module()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6)
    for scaling in (2.0, 3.0, 0.5):
        layer.scaling = scaling
        torch.testing.assert_close(compiled(x), _plain(layer, x), rtol=1e-5, atol=1e-5)
    for p in (0.1, 0.2, 0.3):
        layer.dropout = p
        assert compiled(x).shape == (3, 5)
    layer.eval()
    torch.testing.assert_close(compiled(x), _plain(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_compiled_peft_model_follows_rescaled_adapters(kind):
    from peft.helpers import rescale_adapter_scale
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "adalora":
        cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=6, target_modules=["q", "v"], lora_alpha=8)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=kind == "dora")
    reference = get_peft_model(_Tiny(), cfg)
    perturb(reference)
    fast = copy.deepcopy(reference)
    vfm.peft.accelerate(fast)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8)
    for factor in (1.0, 0.5, 0.25):
        with rescale_adapter_scale(reference, factor), rescale_adapter_scale(fast, factor):
            want, got = reference(x), compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _MaskDropout(torch.nn.Module):
    """vfm's keep-mask for a seed, as a dropout module PEFT's layer can run."""

    def __init__(self, seed, p):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        from vfm.ops.lora_reference import apply_dropout
        return apply_dropout(x.reshape(-1, x.shape[-1]), self.seed, self.p).reshape(x.shape)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
@pytest.mark.parametrize("bias", [False, True])
def test_training_dropout_is_pefts_formula_with_vfms_mask(kind, bias, backend):
    """With PEFT's dropout module replaced by one applying vfm's mask, PEFT's own layer (DoRA: its extra
    base pass on the dropped input) gives vfm's outputs and gradients: the only difference is the mask."""
    torch.manual_seed(0)
    base = _Tiny()
    if not bias:
        base.q.bias = None
    if kind == "adalora":
        cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=6, target_modules=["q"], lora_alpha=8, lora_dropout=0.3)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q"], use_dora=kind == "dora", lora_dropout=0.3)
    model = get_peft_model(base, cfg)
    perturb(model)
    model.train()
    layer = model.base_model.model.q
    layer.lora_dropout["default"] = _MaskDropout(77, 0.3)
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = layer(x)
    weight, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    with vfm.use_backend(backend):
        if kind == "lora":
            got = lora_linear(x, weight, b, a.weight, bb.weight, s, dropout_p=0.3, seed=77)
        elif kind == "dora":
            got = dora_linear(x, weight, b, a.weight, bb.weight, layer.lora_magnitude_vector["default"].weight, s,
                              dropout_p=0.3, seed=77)
        else:
            got = adalora_linear(x, weight, b, a, layer.lora_E["default"], bb, s, layer.ranknum["default"],
                                 dropout_p=0.3, seed=77)
        grad = torch.randn(got.shape)
        params = [x] + [p for p in model.parameters() if p.requires_grad]
        got_g = torch.autograd.grad(got, params, grad)
    want_g = torch.autograd.grad(want, params, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ torch.func --
def _plain_lora(x, w, b, a, bb, s):
    return x @ w.T + b + s * (x @ a.T) @ bb.T


def test_torch_func_grad_and_per_sample_grads_of_every_op():
    # torch.func.grad / vmap(grad) raised ("autograd.Function ... must override setup_context")
    from torch.func import grad, vmap

    torch.manual_seed(0)
    x, w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a, bb = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def fused(a, bb, x):
        return lora_linear(x, w, b, a, bb, 2.0).pow(2).sum()

    def plain(a, bb, x):
        return _plain_lora(x, w, b, a, bb, 2.0).pow(2).sum()
    for got, want in zip(grad(fused, argnums=(0, 1))(a, bb, x), grad(plain, argnums=(0, 1))(a, bb, x)):
        torch.testing.assert_close(got, want)
    per_sample = vmap(grad(fused), in_dims=(None, None, 0))(a, bb, x)
    assert per_sample.shape == (5, 3, 8)
    torch.testing.assert_close(per_sample, vmap(grad(plain), in_dims=(None, None, 0))(a, bb, x))

    m = torch.rand(6, dtype=torch.float64) + 0.5

    def dora(a, m, x):
        return dora_linear(x, w, b, a, bb, m, 2.0).pow(2).sum()

    def dora_plain(a, m, x):  # PEFT's DoRA: g = m / ||W + s B A|| (norm detached), y = g (x W^T + s x A^T B^T) + b
        g = m / torch.linalg.vector_norm(w + 2.0 * bb @ a, dim=1).detach()
        return (g * (x @ w.T + 2.0 * (x @ a.T) @ bb.T) + b).pow(2).sum()
    for got, want in zip(grad(dora, argnums=(0, 1))(a, m, x), grad(dora_plain, argnums=(0, 1))(a, m, x)):
        torch.testing.assert_close(got, want)

    e = torch.randn(3, 1, dtype=torch.float64)

    def ada(e, x):
        return adalora_linear(x, w, b, a, e, bb, 2.0, 3.0).pow(2).sum()

    def ada_plain(e, x):  # PEFT: y = x W^T + b + (x (A * E)^T) B^T * scaling / (ranknum + 1e-5)
        return (x @ w.T + b + (x @ (a * e).T) @ bb.T * 2.0 / (3.0 + 1e-5)).pow(2).sum()
    torch.testing.assert_close(grad(ada)(e, x), grad(ada_plain)(e, x))

    stacks_a, stacks_b = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    ids = [0, 1, -1, 0, 1]

    def multi(sa, sb):
        return lora_linear_multi(x, w, b, sa, sb, [1.0, 2.0], torch.tensor(ids)).pow(2).sum()

    def multi_plain(sa, sb):
        rows = [x[i] @ w.T + b + (0.0 if k < 0 else (1.0, 2.0)[k] * (x[i] @ sa[k].T) @ sb[k].T)
                for i, k in enumerate(ids)]
        return torch.stack(rows).pow(2).sum()
    for got, want in zip(grad(multi, argnums=(0, 1))(stacks_a, stacks_b),
                         grad(multi_plain, argnums=(0, 1))(stacks_a, stacks_b)):
        torch.testing.assert_close(got, want)

    with vfm.use_backend("cpp"), pytest.raises(RuntimeError, match="torch.func.*'cpp' is forced"):
        grad(fused)(a, bb, x)


def test_torch_func_per_sample_gradients_of_an_accelerated_peft_model():
    # the Opacus / functorch recipe: vmap(grad(functional_call(model, params, ...))) over the batch
    from torch.func import functional_call, grad, vmap

    reference, fast = pair("lora")
    ids = tokens(n=3, t=5)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

        def loss(p, row):
            logits = functional_call(model, p, (row.unsqueeze(0),)).logits
            return F.cross_entropy(logits[0, :-1], row[1:])
        return vmap(grad(loss), in_dims=(None, 0))(params, ids)
    want, got = per_sample(reference), per_sample(fast)
    assert set(got) == set(want) and len(got) == 2 * len(TARGETS) * 2
    for name in want:
        assert got[name].shape[0] == 3
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
