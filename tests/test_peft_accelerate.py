"""vfm.peft.accelerate on real PEFT models: parity of outputs and gradients, save/load, merge, fallbacks.

Models are tiny, randomly initialised Llama (and GPT-2, for transformers' Conv1D) built from configs
in code; nothing is downloaded.  Dropout masks differ from PEFT's (vfm hashes, PEFT draws from
torch's RNG), so parity is checked with dropout 0 in training mode and with dropout > 0 in eval
mode; vfm's dropout itself is checked against its explicit-mask formula in test_lora_reference.py.
"""

import copy
import logging

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import vfm.peft  # noqa: E402
from vfm import _registry  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)
KIND_OPS = {"lora": "lora_linear", "rslora": "lora_linear", "dora": "dora_linear", "adalora": "adalora_linear"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def llama(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg).to(dtype)


def peft_config(kind, bias="none", dropout=0.0, **extra):
    if kind == "adalora":
        return AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, lora_dropout=dropout,
                             target_modules=TARGETS, bias=bias, **extra)
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, bias=bias,
                      use_rslora=kind == "rslora", use_dora=kind == "dora", **extra)


def perturb_adapters(model, seed=1):
    """Random nonzero adapter weights (PEFT starts with B = 0 or E = 0, where LoRA is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
            if "lora_E" in name:
                p[::3] = 0  # a few pruned AdaLoRA ranks


def pair(kind, base=None, **cfg):
    reference = get_peft_model(copy.deepcopy(base if base is not None else llama()), peft_config(kind, **cfg))
    perturb_adapters(reference)
    fast = copy.deepcopy(reference)
    report = vfm.peft.accelerate(fast)
    return reference, fast, report


def batch(seed=3, n=2, t=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (n, t), generator=g)


def assert_same_step(reference, fast, ids, train, atol=2e-5, runner=None):
    reference.train(train)
    fast.train(train)
    out_r = reference(input_ids=ids, labels=ids)
    out_f = (fast if runner is None else runner)(input_ids=ids, labels=ids)
    scale = out_r.logits.abs().max().item()
    torch.testing.assert_close(out_f.logits.float(), out_r.logits.float(), rtol=0, atol=atol * scale)
    reference.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)
    out_r.loss.backward()
    out_f.loss.backward()
    named_f = dict(fast.named_parameters())
    checked = 0
    for name, p_r in reference.named_parameters():
        p_f = named_f[name]
        assert p_r.requires_grad == p_f.requires_grad, name
        assert (p_r.grad is None) == (p_f.grad is None), name
        if p_r.grad is not None:
            g_scale = p_r.grad.abs().max().item() or 1.0
            torch.testing.assert_close(p_f.grad.float(), p_r.grad.float(), rtol=0, atol=atol * 10 * g_scale,
                                       msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 0
    return checked


# --------------------------------------------------------------------------- parity --
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "adalora"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_parity_outputs_and_gradients_train_and_eval(kind, bias):
    reference, fast, report = pair(kind, bias=bias)
    assert report.num_accelerated == N_LAYERS and not report.skipped and not report.fallbacks
    assert report.kinds[{"rslora": "lora"}.get(kind, kind)] == N_LAYERS
    op = KIND_OPS[kind]
    ran = lambda: sum(n for (o, _b), n in _registry.CALLS.items() if o == op)  # noqa: E731 (any backend)
    before = ran()
    for train in (True, False):
        assert_same_step(reference, fast, batch(), train)
    # every layer ran vfm's op: forward + backward, twice
    assert ran() - before == 2 * 2 * N_LAYERS
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert any(".bias" in n and "lora" not in n for n in trainable) == (bias != "none")


def test_parity_on_the_plain_config_without_biases_and_with_dropout_in_eval():
    for kind in ("lora", "dora", "adalora"):
        reference, fast, report = pair(kind, base=llama(bias=False), dropout=0.1)
        assert report.num_accelerated == N_LAYERS
        assert_same_step(reference, fast, batch(), train=False)


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_dropout_in_training_is_vfms_seeded_mask(kind):
    reference, fast, _ = pair(kind, dropout=0.3)
    fast.train()
    ids = batch()
    torch.manual_seed(11)
    a = fast(input_ids=ids).logits
    torch.manual_seed(11)
    b = fast(input_ids=ids).logits
    assert torch.equal(a, b)  # torch.manual_seed reproduces the masks
    fast.eval()
    assert not torch.allclose(a, fast(input_ids=ids).logits)  # and dropout did act


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_dropout_masks(use_reentrant):
    _, fast, _ = pair("lora", dropout=0.3)
    ids = batch()
    fast.train()

    def grads():
        fast.zero_grad(set_to_none=True)
        torch.manual_seed(21)
        fast(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}

    plain = grads()
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        fast.enable_input_require_grads()
    assert fast.base_model.model.model.gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_lora_bias_is_folded_into_the_base_bias():
    reference, fast, report = pair("lora", lora_bias=True)
    assert report.num_accelerated == N_LAYERS
    assert_same_step(reference, fast, batch(), train=True)


def test_fp32_adapters_on_a_bf16_model():
    reference, fast, report = pair("lora", base=llama(dtype=torch.bfloat16))
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert report.num_accelerated == N_LAYERS
    assert_same_step(reference, fast, batch(), train=True, atol=3e-2)


def test_gpt2_conv1d_layers_with_fan_in_fan_out():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    for kind in ("lora", "dora"):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                         use_dora=kind == "dora")
        reference = get_peft_model(copy.deepcopy(base), cfg)
        perturb_adapters(reference)
        fast = copy.deepcopy(reference)
        report = vfm.peft.accelerate(fast)
        assert report.num_accelerated == 2 * 4 and not report.skipped  # attn c_attn/c_proj, mlp c_fc/c_proj
        assert_same_step(reference, fast, batch(), train=True)


# ------------------------------------------------------------- state, save, merge --
def test_state_dict_keys_and_parameters_are_shared():
    model = get_peft_model(llama(), peft_config("dora"))
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict().keys())
    vfm.peft.accelerate(model)
    assert list(model.state_dict().keys()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert "lora.Linear" in repr(model)  # PEFT's repr is kept
    assert vfm.peft.restore(model) == N_LAYERS
    assert type(model.base_model.model.model.layers[0].mlp.up_proj) is peft.tuners.lora.layer.Linear
    before = dict(_registry.CALLS)
    model(input_ids=batch())
    assert dict(_registry.CALLS) == before  # restored layers run PEFT's forward


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_train_step_save_pretrained_from_pretrained_round_trip(kind, tmp_path):
    base = llama()
    model = get_peft_model(copy.deepcopy(base), peft_config(kind))
    perturb_adapters(model)
    vfm.peft.accelerate(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = batch()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)  # PEFT's forward
    report = vfm.peft.accelerate(loaded)
    assert report.num_accelerated == N_LAYERS
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_merge_and_unload_and_unmerge_match_peft(kind, caplog):
    reference, fast, _ = pair(kind)
    ids = batch()
    reference.eval()
    fast.eval()
    unmerged = fast(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="vfm.peft"):
        fast.base_model.merge_adapter()
        merged_out = fast(input_ids=ids).logits  # merged: PEFT's forward (the base layer alone)
    assert "merged" in caplog.text
    torch.testing.assert_close(merged_out, unmerged, rtol=1e-4, atol=1e-4)
    fast.base_model.unmerge_adapter()
    before = sum(_registry.CALLS.values())
    torch.testing.assert_close(fast(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert sum(_registry.CALLS.values()) > before  # back on vfm after unmerge
    merged_r = reference.merge_and_unload()
    merged_f = fast.merge_and_unload()
    sd_r, sd_f = merged_r.state_dict(), merged_f.state_dict()
    assert sd_r.keys() == sd_f.keys()
    for key in sd_r:
        torch.testing.assert_close(sd_f[key], sd_r[key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_f(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------- fallbacks --
def test_fallbacks_are_logged_and_give_peft_numbers(caplog):
    reference, fast, _ = pair("lora")
    for model in (reference, fast):
        model.add_adapter("other", peft_config("lora"))
    perturb_adapters(reference, seed=5)
    fast.load_state_dict(reference.state_dict())
    ids = batch(n=4)
    reference.eval()
    fast.eval()
    with caplog.at_level(logging.INFO, logger="vfm.peft"):
        # (mixed-adapter batches, adapter_names=, run on vfm: tests/test_peft_mixed.py)
        # (several active plain LoRA adapters run on vfm too: tests/test_peft_mixed.py)
        for model in (reference, fast):
            model.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(fast(input_ids=ids).logits, reference(input_ids=ids).logits)
        with fast.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(fast(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert "disabled" in caplog.text
    for model in (reference, fast):
        model.base_model.set_adapter("other")
    before = sum(n for (o, _b), n in _registry.CALLS.items() if o == "lora_linear")
    assert_same_step(reference, fast, ids, train=True)
    assert sum(n for (o, _b), n in _registry.CALLS.items() if o == "lora_linear") > before


def test_hooked_layers_run_peft_forward_and_their_hooks_fire(caplog):
    """A forward hook on the base layer, or accelerate's _hf_hook attribute on an adapter's lora_A,
    sends that layer through PEFT's forward (vfm would bypass the hook); the others stay on vfm."""
    reference, fast, _ = pair("lora")
    swapped = [m for m in fast.modules() if type(m) in vfm.peft._UNSWAP]
    hooked_base, hooked_adapter = swapped[0], swapped[1]
    fired = []
    hooked_base.get_base_layer().register_forward_hook(lambda mod, inp, out: fired.append(out.shape))
    hooked_adapter.lora_A["default"]._hf_hook = object()  # what accelerate's add_hook_to_module sets
    ids = batch(n=2)
    before = sum(n for (o, _b), n in _registry.CALLS.items() if o == "lora_linear")
    with caplog.at_level(logging.INFO, logger="vfm.peft"):
        assert_same_step(reference, fast, ids, train=True)
    assert fired, "the base layer's forward hook did not run"
    assert "forward hooks" in caplog.text and "not plain hook-free" in caplog.text
    calls = sum(n for (o, _b), n in _registry.CALLS.items() if o == "lora_linear") - before
    assert calls == 2 * (len(swapped) - 2)  # every other layer ran on vfm (forward and backward)


def test_layers_it_cannot_take_over_are_reported():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + ["embed_tokens"])
    model = get_peft_model(llama(), cfg)
    report = vfm.peft.accelerate(model)
    assert report.num_accelerated == N_LAYERS
    (name, why), = report.skipped.items()
    assert name.endswith("embed_tokens") and "Embedding" in why
    assert "left to PEFT" in str(report)


def test_unknown_variants_and_custom_base_layers_are_left_to_peft():
    class CustomLinear(torch.nn.Linear):  # e.g. a quantized layer: its own forward
        def forward(self, x):
            return super().forward(x) * 1.0

    class OtherVariant(peft.tuners.lora.layer.LoraVariant):
        pass

    model = get_peft_model(llama(), peft_config("lora"))
    attn = model.base_model.model.model.layers[0].self_attn
    old = attn.q_proj.base_layer
    custom = CustomLinear(old.in_features, old.out_features, bias=old.bias is not None)
    custom.load_state_dict(old.state_dict())
    attn.q_proj.base_layer = custom
    attn.k_proj.lora_variant["default"] = OtherVariant()
    report = vfm.peft.accelerate(model)
    assert report.num_accelerated == N_LAYERS - 2
    assert "not a plain nn.Linear" in report.skipped["base_model.model.model.layers.0.self_attn.q_proj"]
    assert "OtherVariant" in report.skipped["base_model.model.model.layers.0.self_attn.k_proj"]


def test_accelerated_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    reference, fast, _ = pair("dora")
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    ids = batch()
    before = sum(n for (o, _b), n in _registry.CALLS.items() if o == "dora_linear")
    assert_same_step(reference, fast, ids, train=True, runner=compiled)
    assert sum(n for (o, _b), n in _registry.CALLS.items() if o == "dora_linear") > before
