"""PEFT's mixed-adapter batches (``adapter_names=``) and several active adapters on layers swapped by
vfm.peft.accelerate.

The reference is PEFT's own forward (for mixed batches a Python loop over the adapters named in the
batch; for several active adapters a sum over them) on an identical copy of the model; vfm runs a
mixed batch through one lora_linear_multi call per layer, and several active adapters as one
lora_linear of the concatenated ranks.  Models are tiny, randomly initialised Llama / GPT-2 built in code.
"""

import copy
import logging

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import vfm.peft  # noqa: E402
from vfm import _peft_mixed, _registry  # noqa: E402
from test_peft_accelerate import (  # noqa: E402
    N_LAYERS, TARGETS, assert_same_step, batch, llama, peft_config, perturb_adapters)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread

NAMES = ["b", "default", "__base__", "c", "b", "default"]


def multi_calls() -> int:
    return sum(n for (op, _backend), n in _registry.CALLS.items() if op == "lora_linear_multi")


def three_adapters(base=None, cache=False, **extra):
    """PEFT model with adapters of ranks 4 / 2 / 6: "default" everywhere, "b" on three projections only
    (the other layers have no "b": PEFT leaves those items to the base layer), "c" rsLoRA on all; the
    accelerated copy keeps its mixed-batch stacks between calls when ``cache``."""
    reference = get_peft_model(base if base is not None else llama(), peft_config("lora", **extra))
    reference.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]))
    reference.add_adapter("c", LoraConfig(r=6, lora_alpha=6, use_rslora=True,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]))
    perturb_adapters(reference)
    fast = copy.deepcopy(reference)
    report = vfm.peft.accelerate(fast, mixed_batch_cache=cache)
    assert report.num_accelerated == N_LAYERS
    reference.eval()
    fast.eval()
    return reference, fast


def assert_close_logits(fast, reference, ids, names, **kwargs):
    out_f = fast(input_ids=ids, adapter_names=names, **kwargs).logits
    out_r = reference(input_ids=ids, adapter_names=names, **kwargs).logits
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-5 * out_r.abs().max().item())
    return out_f


@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_matches_peft_and_runs_one_grouped_call_per_layer(bias, caplog):
    reference, fast = three_adapters(llama(bias=bias))
    ids = batch(n=len(NAMES))
    before = multi_calls()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vfm.peft"):
        out = assert_close_logits(fast, reference, ids, NAMES)
    assert multi_calls() - before == N_LAYERS
    assert "PEFT's forward" not in caplog.text
    # the adapters do act: every item differs from the base model's output except the "__base__" one
    with fast.disable_adapter(), torch.no_grad():
        plain = fast(input_ids=ids).logits
    differs = [not torch.allclose(out[i], plain[i]) for i in range(len(NAMES))]
    assert differs == [name != "__base__" for name in NAMES]


@pytest.mark.parametrize("all_trainable", [False, True])
def test_mixed_batch_gradients_match_peft(all_trainable):
    """Mixed batches are an eval-mode feature in PEFT, but gradients still flow (e.g. for attribution).
    PEFT leaves only the active adapter ("default") trainable; the other case makes all three trainable."""
    reference, fast = three_adapters()
    if all_trainable:
        for model in (reference, fast):
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
    ids = batch(n=len(NAMES))
    losses = [m(input_ids=ids, labels=ids, adapter_names=NAMES).loss for m in (reference, fast)]
    for loss in losses:
        loss.backward()
    named = dict(reference.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        ref = named[name]
        assert (p.grad is None) == (ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref.grad, rtol=0, atol=1e-4 * (ref.grad.abs().max().item() or 1.0),
                                       msg=lambda m: f"{name}: {m}")
            checked += "lora_" in name
    # A and B of default, and with all_trainable of c and b (b on 3 of the 7 projections, 2 layers)
    assert checked == 2 * (N_LAYERS + (N_LAYERS + 6 if all_trainable else 0))


def test_mixed_batch_generate_matches_peft():
    reference, fast = three_adapters()
    ids = batch(n=len(NAMES), t=5)
    mask = torch.ones_like(ids)
    outs = [m.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=4, do_sample=False,
                       pad_token_id=0) for m in (reference, fast)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("cache", [False, True])
def test_mixed_batch_follows_changes_of_the_adapters(cache):
    """In-place updates, new scalings and loaded state show in the next call (with the stacks cached too:
    the fingerprint sees the version counters, the scalings and the storage)."""
    reference, fast = three_adapters(cache=cache)
    ids = batch(n=len(NAMES))
    with torch.no_grad():
        assert_close_logits(fast, reference, ids, NAMES)
        for model in (reference, fast):  # an optimizer-style in-place update of one factor
            model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["c"].weight.mul_(-3.0)
        assert_close_logits(fast, reference, ids, NAMES)
        for model in (reference, fast):
            for module in model.modules():
                if isinstance(module, LoraLayer) and "b" in module.scaling:
                    module.set_scale("b", 2.5)
        assert_close_logits(fast, reference, ids, NAMES)
        perturb_adapters(reference, seed=9)
        fast.load_state_dict(reference.state_dict())
        assert_close_logits(fast, reference, ids, NAMES)
        # other names and orders: the per-layer index and the shared row-index cache
        for names in (["c", "c", "b", "b", "__base__", "default"], ["default"] * 6, ["b"] * 6):
            assert_close_logits(fast, reference, ids, names)


def test_mixed_batch_of_base_items_only_is_the_base_layer():
    reference, fast = three_adapters()
    ids = batch(n=3)
    before = multi_calls()
    with torch.no_grad():
        out = assert_close_logits(fast, reference, ids, ["__base__"] * 3)
        with fast.disable_adapter():
            torch.testing.assert_close(out, fast(input_ids=ids).logits)
    assert multi_calls() == before


def test_mixed_batch_on_gpt2_conv1d_layers():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                fan_in_fan_out=True))
    reference.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    perturb_adapters(reference)
    fast = copy.deepcopy(reference)
    assert vfm.peft.accelerate(fast).num_accelerated == 2 * 4
    reference.eval()
    fast.eval()
    before = multi_calls()
    with torch.no_grad():
        assert_close_logits(fast, reference, batch(n=4), ["b", "__base__", "default", "b"])
    assert multi_calls() - before == 2 * 4


def test_mixed_batch_errors_are_peft_errors():
    reference, fast = three_adapters()
    ids = batch(n=3)
    for model in (reference, fast):
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            model(input_ids=ids, adapter_names=["default"] * 2)
        with pytest.raises(ValueError, match="non-existing adapter"):
            model(input_ids=ids, adapter_names=["default", "nope", "c"])
        model.base_model.merge_adapter(["default"])
        with pytest.raises(ValueError, match="merged adapters"):
            model(input_ids=ids, adapter_names=["default", "c", "b"])
        model.base_model.unmerge_adapter()
    dora_ref = get_peft_model(llama(), peft_config("dora"))
    dora_fast = copy.deepcopy(dora_ref)
    vfm.peft.accelerate(dora_fast)
    for model in (dora_ref.eval(), dora_fast.eval()):
        with pytest.raises(ValueError, match="DoRA"):
            model(input_ids=ids, adapter_names=["default"] * 3)


def test_mixed_batch_fallbacks_are_logged_and_give_peft_numbers(caplog):
    # lora_bias: a per-adapter bias on lora_B; the grouped call has one bias for all rows
    reference, fast = three_adapters(lora_bias=True)
    ids = batch(n=len(NAMES))
    before = multi_calls()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vfm.peft"):
        assert_close_logits(fast, reference, ids, NAMES)
        assert "lora_bias" in caplog.text and "mixed-adapter batch" in caplog.text
        assert multi_calls() == before
        # a batch without the lora_bias adapter ("default") runs on vfm
        assert_close_logits(fast, reference, ids, ["b", "c", "__base__", "c", "b", "b"])
    assert multi_calls() - before == N_LAYERS


def test_mixed_batch_with_active_dropout_is_left_to_peft(caplog):
    """PEFT refuses adapter_names on a model in training mode; a layer called directly in training mode
    with active dropout draws PEFT's masks, so vfm leaves it to PEFT."""
    reference, fast = three_adapters(dropout=0.2)
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    layer.train()
    x = torch.randn(3, 4, 32)
    before = multi_calls()
    with caplog.at_level(logging.INFO, logger="vfm.peft"):
        layer(x, adapter_names=["default", "c", "__base__"])
    assert "active dropout" in caplog.text
    assert multi_calls() == before
    layer.eval()
    ref_layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer(x, adapter_names=["default", "c", "__base__"]),
                               ref_layer(x, adapter_names=["default", "c", "__base__"]), rtol=1e-5, atol=1e-6)
    assert multi_calls() == before + 1


def test_row_index_tensor_is_shared_between_layers():
    reference, fast = three_adapters()
    _peft_mixed._IDS_CACHE.clear()
    with torch.no_grad():
        fast(input_ids=batch(n=len(NAMES)), adapter_names=NAMES)
    # layers with "b" and layers without it map the items differently: two index tensors for 14 layers
    assert len(_peft_mixed._IDS_CACHE) == 2
    keys = sorted(k[0] for k in _peft_mixed._IDS_CACHE)
    assert keys == sorted([(0, 1, -1, 2, 0, 1), (-1, 0, -1, 1, -1, 0)])


def test_stacks_are_built_once_while_the_adapters_are_unchanged():
    reference, fast = three_adapters(cache=True)
    layer = fast.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(4, 3, 64)
    names = ["c", "b", "__base__", "default"]
    with torch.no_grad():
        layer(x, adapter_names=names)
        stacks = layer.__dict__["_vfm_mixed"].stacks
        assert stacks is not None
        layer(x, adapter_names=names)
        assert layer.__dict__["_vfm_mixed"].stacks is stacks  # reused
        layer.lora_A["b"].weight.add_(0.5)
        out = layer(x, adapter_names=names)
        assert layer.__dict__["_vfm_mixed"].stacks is not stacks  # rebuilt after the in-place update
        reference.base_model.model.model.layers[1].mlp.down_proj.lora_A["b"].weight.add_(0.5)
        ref = reference.base_model.model.model.layers[1].mlp.down_proj(x, adapter_names=names)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_batch_in_bf16_is_no_less_accurate_than_peft(device):
    """A bf16 base with PEFT's default fp32 adapters: vfm's error against the same model in fp32 is at
    most twice PEFT's own (both round differently: PEFT adds the rounded low-rank output to the
    rounded base output, vfm accumulates both in one pass)."""
    reference, fast = three_adapters(llama().to(torch.bfloat16), cache=True)
    truth = copy.deepcopy(reference).float()
    for model in (reference, fast, truth):
        model.to(device)
    ids = batch(n=len(NAMES)).to(device)
    before = multi_calls()
    with torch.no_grad():
        exact = truth(input_ids=ids, adapter_names=NAMES).logits.float()
        err_peft = _rel(reference(input_ids=ids, adapter_names=NAMES).logits, exact)
        for _ in range(2):  # the second call runs on the cached stacks
            err_vfm = _rel(fast(input_ids=ids, adapter_names=NAMES).logits, exact)
            assert err_vfm <= 2 * err_peft + 1e-3, (err_vfm, err_peft)
    assert multi_calls() - before == 2 * N_LAYERS


@pytest.mark.gpu
def test_gpu_mixed_batch_matches_peft_in_fp32():
    """On CUDA the stacks are plain contiguous (the triton / CUDA kernels read them along in / out)."""
    reference, fast = three_adapters(cache=True)
    reference.cuda()
    fast.cuda()
    ids = batch(n=len(NAMES)).cuda()
    before = multi_calls()
    with torch.no_grad():
        out_r = reference(input_ids=ids, adapter_names=NAMES).logits
        for _ in range(2):  # the second call runs on the cached stacks
            out_f = fast(input_ids=ids, adapter_names=NAMES).logits
            torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-4 * out_r.abs().max().item())
    assert multi_calls() - before == 2 * N_LAYERS
    stacks = fast.base_model.model.model.layers[0].self_attn.q_proj.__dict__["_vfm_mixed"].stacks
    assert stacks[0].is_cuda and stacks[0].is_contiguous() and stacks[1].is_contiguous()


def test_mixed_batch_under_inference_mode_then_with_an_input_gradient():
    """Stacks cached under inference_mode are inference tensors, which autograd cannot save: a later
    call whose input needs a gradient (frozen adapters) must rebuild them, and its gradient is PEFT's."""
    reference, fast = three_adapters(cache=True)
    layer = fast.base_model.model.model.layers[0].mlp.up_proj
    ref_layer = reference.base_model.model.model.layers[0].mlp.up_proj
    names = ["c", "default", "__base__"]
    x = torch.randn(3, 5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, adapter_names=names), ref_layer(x, adapter_names=names),
                                   rtol=1e-5, atol=1e-6)
    for p in list(layer.parameters()) + list(ref_layer.parameters()):
        p.requires_grad_(False)
    grads = []
    for module in (layer, ref_layer):
        xg = x.clone().requires_grad_(True)
        module(xg, adapter_names=names).square().sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_mixed_batch_cache_is_opt_in_cleared_and_dropped_by_restore():
    reference, fast = three_adapters()
    ids = batch(n=len(NAMES))
    swapped = [m for m in fast.modules() if type(m) is vfm.peft.LoraLinear]
    assert len(swapped) == N_LAYERS
    with torch.no_grad():
        for _ in range(2):  # by default the checks are kept, the stacks are not
            assert_close_logits(fast, reference, ids, NAMES)
            assert all(m.__dict__["_vfm_mixed"].stacks is None for m in swapped)
        vfm.peft.accelerate(fast, mixed_batch_cache=True)
        assert_close_logits(fast, reference, ids, NAMES)
        assert all(m.__dict__["_vfm_mixed"].stacks is not None for m in swapped)
        assert vfm.peft.clear_mixed_batch_cache(fast) == N_LAYERS
        assert not any("_vfm_mixed" in m.__dict__ for m in swapped)
        assert_close_logits(fast, reference, ids, NAMES)
    assert vfm.peft.restore(fast) == N_LAYERS
    assert not any(k.startswith("_vfm") for m in swapped for k in m.__dict__)
    with pytest.raises(TypeError, match="mixed_batch_cache"):
        vfm.peft.accelerate(fast, mixed_batch_cache="yes")


def _writes_behind_the_version_counter(model, seed):
    """Adapter updates autograd's version counter does not see: ``.data`` writes (as PEFT's adapter
    hot-swap makes) and a fused optimizer step."""
    g = torch.Generator().manual_seed(seed)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    for n, p in lora:
        if ".b." in n or n.endswith(".b.weight"):
            p.data.copy_(torch.randn(p.shape, generator=g))
    params = [p for _, p in lora]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.ones_like(p)
    torch.optim.Adam(params, lr=0.1, fused=True).step()
    for p, flag in zip(params, flags):
        p.grad = None
        p.requires_grad_(flag)


def test_mixed_batch_sees_writes_behind_the_version_counter_unless_cached():
    """By default nothing holds stale copies; with mixed_batch_cache=True, clear_mixed_batch_cache after
    such writes gives the new numbers."""
    for cache in (False, True):
        reference, fast = three_adapters(cache=cache)
        ids = batch(n=len(NAMES))
        with torch.no_grad():
            assert_close_logits(fast, reference, ids, NAMES)
        versions = [p._version for n, p in fast.named_parameters() if "lora_" in n]
        for model in (reference, fast):
            _writes_behind_the_version_counter(model, seed=5)
        assert versions == [p._version for n, p in fast.named_parameters() if "lora_" in n]  # unchanged
        with torch.no_grad():
            if cache:
                vfm.peft.clear_mixed_batch_cache(fast)
            assert_close_logits(fast, reference, ids, NAMES)


def test_autocast_bf16_inputs_to_fp32_layers_run_on_vfm():
    """Under torch.autocast an fp32 layer receives the bf16 output of the previous autocast matmul; PEFT
    runs it, and so must vfm (single adapter, mixed batch, several active adapters)."""
    reference, fast = three_adapters()
    layer = fast.base_model.model.model.layers[0].self_attn.o_proj
    ref_layer = reference.base_model.model.model.layers[0].self_attn.o_proj
    x = torch.randn(4, 3, 32, dtype=torch.bfloat16)
    cases = [dict(adapter_names=["c", "default", "__base__", "c"]), {}]
    before = sum(_registry.CALLS.values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for kwargs in cases:
            out, ref = layer(x, **kwargs), ref_layer(x, **kwargs)
            assert out.dtype == ref.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2 * ref.abs().max().item())
        for module in (layer, ref_layer):
            module.set_adapter(["default", "c"])
        torch.testing.assert_close(layer(x).float(), ref_layer(x).float(), rtol=0,
                                   atol=2e-2 * ref_layer(x).abs().max().item())
    assert sum(_registry.CALLS.values()) - before == 3  # all three ran vfm's ops


def test_tensor_valued_scalings_are_left_to_peft(caplog):
    """PEFT's compiled hot-swap preparation turns scalings into tensors; vfm's ops take numbers."""
    reference, fast = three_adapters()
    for model in (reference, fast):
        for module in model.modules():
            if isinstance(module, LoraLayer) and "default" in module.scaling:
                module.scaling["default"] = torch.tensor(module.scaling["default"])
    ids = batch(n=len(NAMES))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vfm.peft"):
        assert_close_logits(fast, reference, ids, NAMES)
        torch.testing.assert_close(fast(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert_close_logits(fast, reference, ids, ["c", "b", "__base__", "c", "b", "c"])  # no "default": vfm
    assert caplog.text.count("tensor-valued scaling") == 2 * N_LAYERS


# ------------------------------------------------------------------ several active adapters --
def several_active(dropout=0.0, lora_bias=False):
    """Llama with "default" (r 4) and "other" (r 2, rsLoRA) both active: PEFT sums them on every row."""
    reference = get_peft_model(llama(), peft_config("lora", dropout=dropout, lora_bias=lora_bias))
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=TARGETS,
                                              lora_dropout=dropout, lora_bias=lora_bias))
    perturb_adapters(reference)
    fast = copy.deepcopy(reference)
    assert vfm.peft.accelerate(fast).num_accelerated == N_LAYERS
    for model in (reference, fast):
        model.base_model.set_adapter(["default", "other"])
    return reference, fast


def lora_calls() -> int:
    return sum(n for (op, _backend), n in _registry.CALLS.items() if op == "lora_linear")


@pytest.mark.parametrize("lora_bias", [False, True])
def test_several_active_adapters_match_peft_in_train_and_eval(lora_bias, caplog):
    reference, fast = several_active(lora_bias=lora_bias)
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert any(".other." in n for n in trainable) and any(".default." in n for n in trainable)
    before = lora_calls()
    with caplog.at_level(logging.INFO, logger="vfm.peft"):
        for train in (True, False):
            assert_same_step(reference, fast, batch(), train)
    assert "PEFT's forward" not in caplog.text
    assert lora_calls() - before == 2 * 2 * N_LAYERS  # forward + backward, train and eval, every layer


def test_several_active_adapters_with_dropout_or_dora_are_left_to_peft(caplog):
    reference, fast = several_active(dropout=0.2)
    ids = batch()
    with caplog.at_level(logging.INFO, logger="vfm.peft"):
        before = lora_calls()
        fast.train()
        fast(input_ids=ids)
        assert "one mask per adapter" in caplog.text and lora_calls() == before
        fast.eval()
        reference.eval()
        out = fast(input_ids=ids).logits  # dropout is off in eval: on vfm
        torch.testing.assert_close(out, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert lora_calls() - before == N_LAYERS
        for model in (reference, fast):
            model.add_adapter("dora", peft_config("dora"))
            model.base_model.set_adapter(["default", "dora"])
        perturb_adapters(reference, seed=4)
        fast.load_state_dict(reference.state_dict())
        before = lora_calls()
        torch.testing.assert_close(fast(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert "LoRA variant" in caplog.text and lora_calls() == before


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_on_every_backend(backend):
    """The cached path calls the resolved backend's kernels directly: the torch reference, and the
    triton kernels (under the interpreter here; fp32), on stacks in the CPU's packed layout."""
    if backend == "triton":
        pytest.importorskip("triton")
    reference, fast = three_adapters()
    ids = batch(n=len(NAMES), t=4)
    calls = lambda: _registry.CALLS[("lora_linear_multi", backend)]  # noqa: E731
    before = calls()
    with torch.no_grad(), vfm.use_backend(backend):
        assert_close_logits(fast, reference, ids, NAMES)
    assert calls() - before == N_LAYERS


def test_row_index_cache_is_safe_across_threads():
    """Concurrent mixed-batch forwards share the row-index LRU; with more layouts than it holds, an
    unlocked read-then-move_to_end could meet another thread's eviction (KeyError)."""
    import random
    import sys
    import threading

    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(1500):
                per_item = tuple(rnd.randrange(-1, 2) for _ in range(3))
                rows = rnd.randrange(1, 4)
                ids = _peft_mixed._ids_tensor(per_item, rows, torch.device("cpu"))
                assert ids.tolist() == [k for k in per_item for _ in range(rows)]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
