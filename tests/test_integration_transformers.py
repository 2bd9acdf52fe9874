"""vfm.integrations.transformers: apply_vfm / unapply_vfm on tiny randomly initialised models.

Every check compares the patched model with an unpatched copy of the same weights: with default
options the loss and every parameter's gradient equal transformers' own; with knowledge options the
loss equals a hand-written float64 formula (plain torch: log_softmax, cross_entropy, logsumexp)
evaluated on the unpatched model's logits, and the gradients equal that formula's gradients.
Nothing is downloaded: configs are built in code.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification,  # noqa: E402
                          Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, MistralConfig, MistralForCausalLM, Olmo2Config,
                          Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Starcoder2Config, Starcoder2ForCausalLM)

import vfm.functional  # noqa: E402
import vfm.peft  # noqa: E402
from vfm.integrations import apply_vfm, is_patched, unapply_vfm  # noqa: E402

V = 160  # vocabulary of the causal LMs
B, T = 2, 24  # B*T > hidden size, so a [B*T, V] tensor is bigger than any weight's transpose
TIGHT = dict(rtol=1e-5, atol=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V)
FAMILIES = {
    "llama": lambda **kw: LlamaForCausalLM(LlamaConfig(**{**COMMON, **kw})),
    "llama_tied": lambda **kw: LlamaForCausalLM(LlamaConfig(**{**COMMON, "tie_word_embeddings": True, **kw})),
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **kw})),
    "qwen3": lambda **kw: Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 8, **kw})),
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**{**COMMON, **kw})),
    "gemma": lambda **kw: GemmaForCausalLM(GemmaConfig(**{**COMMON, "head_dim": 8, **kw})),
    "gemma2": lambda **kw: Gemma2ForCausalLM(Gemma2Config(**{**COMMON, "head_dim": 8, "final_logit_softcapping": 2.0,
                                                             "query_pre_attn_scalar": 8, "sliding_window": 8, **kw})),
    "gemma3": lambda **kw: Gemma3ForCausalLM(Gemma3TextConfig(**{
        **COMMON, "head_dim": 8, "final_logit_softcapping": 2.5, "query_pre_attn_scalar": 8, "sliding_window": 8,
        **kw})),
    "phi": lambda **kw: PhiForCausalLM(PhiConfig(**{**COMMON, **kw})),  # an LM head with a bias
    "phi3": lambda **kw: Phi3ForCausalLM(Phi3Config(**{**COMMON, "pad_token_id": 0, **kw})),
    "olmo2": lambda **kw: Olmo2ForCausalLM(Olmo2Config(**{**COMMON, "pad_token_id": 0, **kw})),
    "starcoder2": lambda **kw: Starcoder2ForCausalLM(Starcoder2Config(**{**COMMON, **kw})),
}


def causal(family="llama", seed=0, **kw):
    torch.manual_seed(seed)
    model = FAMILIES[family](**kw)
    with torch.no_grad():  # visible logits (tiny random inits give near-uniform ones), a nonzero head bias
        model.get_output_embeddings().weight.mul_(30.0)
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias.normal_(0, 1.0)
    return model.train()


def pair(family="llama", **kw):
    reference = causal(family, **kw)
    return reference, apply_vfm(copy.deepcopy(reference))


def ids(seed=1, b=B, t=T, vocab=V):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, rtol=1e-4, atol=1e-6):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol, msg=name)


def hand_loss(logits, target, *, teacher=None, temperature=1.0, kd_weight=0.0, allowed=None, penalty_weight=0.0,
              z_loss=0.0, soft=None, n_items=None, label_smoothing=0.0):
    """The knowledge CE of DESIGN.md, written out in float64 torch (the independent reference)."""
    vocab = logits.shape[-1]
    z = logits.double().reshape(-1, vocab)
    target = target.reshape(-1)
    valid = target != -100
    soft = valid if soft is None else soft.reshape(-1)
    ce_den = valid.sum() if n_items is None else n_items
    soft_den = soft.sum() if n_items is None else n_items
    loss = F.cross_entropy(z, target, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing) / ce_den
    lse = torch.logsumexp(z, -1)
    if kd_weight:
        t = teacher.double().reshape(-1, vocab) / temperature
        q, log_q = F.softmax(t, -1), F.log_softmax(t, -1)
        kd_rows = (q * (log_q - F.log_softmax(z / temperature, -1))).sum(-1) * temperature ** 2
        loss = loss + kd_weight * kd_rows[soft].sum() / soft_den
    if penalty_weight:
        mask = allowed.reshape(-1, vocab)
        inside = torch.logsumexp(z.masked_fill(~mask, float("-inf")), -1)
        constrained = mask.any(-1) & ~mask.all(-1)
        pen_rows = torch.where(constrained, lse - inside, torch.zeros_like(lse))
        loss = loss + penalty_weight * pen_rows[soft].sum() / soft_den
    if z_loss:
        loss = loss + z_loss * (lse ** 2)[soft].sum() / soft_den
    return loss


def shifted(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


class NoVocabTensors(TorchDispatchMode):
    """Fails if any op outside the fused loss makes a tensor with rows*V or more elements and last dim V."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows
        self.inside_fused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside_fused:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V and t.numel() >= self.rows * V:
                    raise AssertionError(f"{func} produced a {tuple(t.shape)} tensor (logits materialised)")
        return out


# ------------------------------------------------------------------------------ causal LM parity --
@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_default_equals_transformers(family, monkeypatch):
    reference, model = pair(family)
    x = ids()
    labels = x.clone()
    labels[0, :5] = -100  # a prompt that does not count
    calls = []
    fused = vfm.functional.fused_linear_knowledge_cross_entropy
    guard = NoVocabTensors(rows=B * T)

    def spy(hidden, weight, *a, **kw):
        calls.append((tuple(hidden.shape), weight, a[1] if len(a) > 1 else kw.get("bias"), kw.get("softcap")))
        guard.inside_fused = True
        try:
            return fused(hidden, weight, *a, **kw)
        finally:
            guard.inside_fused = False

    monkeypatch.setattr(vfm.functional, "fused_linear_knowledge_cross_entropy", spy)
    vocab_outputs = []

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.shape[-1] == V:
            vocab_outputs.append(type(module).__name__)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with guard:
            out = model(input_ids=x, labels=labels)
    finally:
        hook.remove()
    ref = reference(input_ids=x, labels=labels)
    assert out.logits is None and vocab_outputs == []
    assert calls == [((B, T, 32), model.lm_head.weight, model.lm_head.bias,
                      model.config.__dict__.get("final_logit_softcapping"))]
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    if family == "llama_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if model.config.__dict__.get("final_logit_softcapping"):  # the cap matters at these logits
        raw = reference.lm_head(reference.model(input_ids=x).last_hidden_state)
        assert abs(hand_loss(raw, shifted(labels)).item() - ref.loss.item()) > 1e-2


def test_causal_eval_and_return_logits_give_logits():
    reference, model = pair("gemma2")
    x = ids()
    ref = reference(input_ids=x, labels=x)
    out = model(input_ids=x, labels=x, return_logits=True)  # training mode, logits asked for
    torch.testing.assert_close(out.logits, ref.logits, **TIGHT)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    model.eval(), reference.eval()
    with torch.no_grad():
        out, ref = model(input_ids=x, labels=x), reference(input_ids=x, labels=x)
        assert out.logits is not None
        torch.testing.assert_close(out.logits, ref.logits, **TIGHT)
        torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
        torch.testing.assert_close(model(input_ids=x).logits, ref.logits, **TIGHT)  # no labels
    tuple_out = model(input_ids=x, labels=x, return_dict=False)
    assert isinstance(tuple_out, tuple)
    torch.testing.assert_close(tuple_out[0], ref.loss, **TIGHT)


def test_causal_apply_option_return_logits():
    reference = causal("qwen2")
    model = apply_vfm(copy.deepcopy(reference), return_logits=True)
    x = ids()
    out = model(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits, reference(input_ids=x).logits, **TIGHT)
    assert model(input_ids=x, labels=x, return_logits=False).logits is None


def test_causal_num_items_in_batch_ignore_index_and_shift_labels():
    reference, model = pair("mistral")
    x = ids()
    labels = x.clone()
    labels[1, 10:] = -100
    n_items = torch.tensor(57)  # e.g. the count over several accumulated micro-batches
    out = model(input_ids=x, labels=labels, num_items_in_batch=n_items)
    ref = reference(input_ids=x, labels=labels, num_items_in_batch=n_items)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    logits = reference(input_ids=x).logits
    torch.testing.assert_close(out.loss, hand_loss(logits, shifted(labels), n_items=57).float(), **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    # shift_labels given: used as is (nothing shifted again)
    via_shift = model(input_ids=x, shift_labels=shifted(labels), num_items_in_batch=n_items)
    torch.testing.assert_close(via_shift.loss, out.loss, **TIGHT)
    # the logits path honours the same arguments
    via_logits = model(input_ids=x, labels=labels, num_items_in_batch=n_items, return_logits=True)
    torch.testing.assert_close(via_logits.loss, out.loss, **TIGHT)


def test_causal_logits_to_keep():
    reference, model = pair("llama")
    x = ids()
    keep = 7
    labels = x[:, -keep:]  # as in transformers, labels cover the kept positions
    out = model(input_ids=x, labels=labels, logits_to_keep=keep)
    ref = reference(input_ids=x, labels=labels, logits_to_keep=keep)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=x, labels=x, logits_to_keep=keep)


def test_causal_class_weights_and_own_ignore_index():
    reference = causal("phi")
    class_weight = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5
    model = apply_vfm(copy.deepcopy(reference), weight=class_weight, ignore_index=-1)
    x = ids()
    labels = x.clone()
    labels[:, :4] = -1
    out = model(input_ids=x, labels=labels)
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -1)], 1)
    logits = reference(input_ids=x).logits.double()
    expected = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), weight=class_weight.double(), ignore_index=-1)
    torch.testing.assert_close(out.loss, expected.float(), **TIGHT)
    out.loss.backward()
    expected.backward()
    assert_same_grads(model, reference)


def test_causal_knowledge_options_equal_hand_formula():
    """KD (full teacher, logits frame), mass penalty (allowed, label frame), z-loss, label smoothing."""
    reference = causal("gemma2")
    options = dict(kd_weight=0.7, temperature=2.0, penalty_weight=0.4, z_loss=1e-3, label_smoothing=0.1)
    model = apply_vfm(copy.deepcopy(reference), **options)
    x = ids()
    labels = x.clone()
    labels[0, :6] = -100
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(B, T, V, generator=g) * 3  # aligned with the student's logits
    allowed = torch.rand(B, T, V, generator=g) < 0.3  # allowed[b, t] constrains token t (label frame)
    allowed[0, 3] = True  # an unconstrained row
    out = model(input_ids=x, labels=labels, teacher_logits=teacher, allowed=allowed)
    logits = reference(input_ids=x).logits
    expected = hand_loss(logits, shifted(labels), teacher=teacher, temperature=2.0, kd_weight=0.7,
                         allowed=torch.cat([allowed[:, 1:], torch.ones_like(allowed[:, :1])], 1), penalty_weight=0.4,
                         z_loss=1e-3, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.backward()
    assert_same_grads(model, reference, rtol=1e-4, atol=1e-5)
    # the teacher given in the label frame (row t = the teacher's distribution for token t) shifts like labels
    model.zero_grad()
    relabelled = apply_vfm(model, teacher_frame="labels", **options)
    teacher_labels_frame = torch.cat([torch.zeros_like(teacher[:, :1]), teacher[:, :-1]], 1)
    again = relabelled(input_ids=x, labels=labels, teacher_logits=teacher_labels_frame, allowed=allowed)
    torch.testing.assert_close(again.loss, out.loss, **TIGHT)


def test_causal_soft_mask_topk_teacher_and_groups():
    reference = causal("qwen2")
    group_masks = torch.rand(3, V, generator=torch.Generator().manual_seed(2)) < 0.4
    model = apply_vfm(copy.deepcopy(reference), kd_weight=0.5, penalty_weight=0.3, allowed_group_masks=group_masks)
    x = ids()
    labels = torch.full_like(x, -100)
    labels[:, 12:] = x[:, 12:]  # only the answer is labelled
    soft = torch.ones_like(x, dtype=torch.bool)  # distil and apply rules on every token (label frame)
    g = torch.Generator().manual_seed(7)
    k = 5
    top_idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).reshape(B, T, k)
    top_lp = torch.log_softmax(torch.randn(B, T, k, generator=g), -1)
    group_ids = torch.randint(-1, 3, (B, T), generator=g)
    out = model(input_ids=x, labels=labels, teacher_topk_indices=top_idx, teacher_topk_logprobs=top_lp,
                allowed_group_ids=group_ids, soft_mask=soft)
    logits = reference(input_ids=x).logits
    # hand reference: sparse KD over the k teacher entries, group masks expanded per row
    z = logits.double().reshape(-1, V)
    target = shifted(labels).reshape(-1)
    soft_rows = torch.cat([soft[:, 1:], torch.zeros_like(soft[:, :1])], 1).reshape(-1)
    valid = target != -100
    ce = F.cross_entropy(z, target, ignore_index=-100, reduction="sum") / valid.sum()
    log_p = F.log_softmax(z, -1)
    q = top_lp.double().reshape(-1, k).softmax(-1)
    kd_rows = (q * (q.log() - log_p.gather(1, top_idx.reshape(-1, k)))).sum(-1)
    gid = torch.cat([group_ids[:, 1:], torch.full_like(group_ids[:, :1], -1)], 1).reshape(-1)
    mask = torch.where((gid >= 0)[:, None], group_masks[gid.clamp_min(0)], torch.ones(V, dtype=torch.bool))
    pen_rows = torch.logsumexp(z, -1) - torch.logsumexp(z.masked_fill(~mask, float("-inf")), -1)
    pen_rows = torch.where(mask.all(-1) | ~mask.any(-1), torch.zeros_like(pen_rows), pen_rows)
    expected = ce + 0.5 * kd_rows[soft_rows].sum() / soft_rows.sum() + 0.3 * pen_rows[soft_rows].sum() / soft_rows.sum()
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.backward()
    assert_same_grads(model, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["autocast_bf16", "bf16_weights", "checkpointing"])
def test_causal_precision_and_checkpointing(mode):
    reference, model = pair("llama")
    if mode == "bf16_weights":
        reference.to(torch.bfloat16), model.to(torch.bfloat16)
    if mode == "checkpointing":
        reference.activation_checkpointing_enable(), model.activation_checkpointing_enable()
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"):
        out, ref = model(input_ids=x, labels=x), reference(input_ids=x, labels=x)
    assert out.logits is None
    tol = dict(rtol=1e-5, atol=1e-6) if mode == "checkpointing" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    out.loss.backward()
    ref.loss.backward()
    for name, g in grads(reference).items():  # bf16: compared relative to the gradient's scale
        got = grads(model)[name].float()
        assert (got - g.float()).abs().max() <= tol["rtol"] * g.float().abs().max() + tol["atol"], name


def test_generation_is_unchanged():
    reference, model = pair("gemma2")
    reference.eval(), model.eval()
    prompt = ids(t=5)
    mask = torch.ones_like(prompt)
    expected = reference.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


# --------------------------------------------------------------------------- patch bookkeeping --
def test_unapply_restores_and_models_are_independent():
    reference = causal("llama")
    model = copy.deepcopy(reference)
    other = copy.deepcopy(reference)
    class_forward = type(model).forward
    apply_vfm(model)
    apply_vfm(model, kd_weight=0.0)  # twice: harmless, one layer of patching
    assert is_patched(model) and not is_patched(other)
    x = ids()
    assert model(input_ids=x, labels=x).logits is None
    assert other(input_ids=x, labels=x).logits is not None  # same class, untouched
    assert type(model).forward is class_forward
    unapply_vfm(model)
    assert "forward" not in model.__dict__ and not is_patched(model)
    out, ref = model(input_ids=x, labels=x), reference(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        unapply_vfm(model)
    # an instance-level forward present before patching (a hook library's) comes back as it was
    own = model.forward
    model.forward = own
    apply_vfm(model)
    unapply_vfm(model)
    assert model.__dict__["forward"] is own


def test_errors():
    model = causal("llama")
    with pytest.raises(TypeError, match="unknown loss options"):
        apply_vfm(model, kd_wieght=1.0)
    with pytest.raises(TypeError, match="softcap"):
        apply_vfm(model, softcap=30.0)
    with pytest.raises(TypeError, match="per batch"):
        apply_vfm(model, teacher_logits=torch.zeros(1))
    with pytest.raises(ValueError, match="teacher_frame"):
        apply_vfm(model, teacher_frame="tokens")
    with pytest.raises(ValueError, match="allowed_group_masks"):
        apply_vfm(model, allowed_group_masks=torch.ones(2, V + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        apply_vfm(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_vfm(torch.nn.Linear(2, 2))
    apply_vfm(model, kd_weight=1.0)
    x = ids()
    with pytest.raises(ValueError, match="without labels"):
        model(input_ids=x, teacher_logits=torch.zeros(B, T, V))
    with pytest.raises(ValueError, match="together"):
        model(input_ids=x, labels=x, teacher_topk_indices=torch.zeros(B, T, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="allowed_group_masks"):
        model(input_ids=x, labels=x, allowed_group_ids=torch.zeros(B, T, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_logits"):
        model(input_ids=x, labels=x, teacher_logits=torch.zeros(B, T + 1, V))
    with pytest.raises(ValueError, match="teacher"):  # kd_weight without a teacher: the loss says so
        model(input_ids=x, labels=x)


# ------------------------------------------------------------------------------------------ PEFT --
def test_peft_lora_accelerated_model(caplog):
    from peft import LoraConfig, get_peft_model

    base = causal("llama")
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=["lm_head"],
                                                target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model = copy.deepcopy(reference)
    assert vfm.peft.accelerate(model).num_accelerated == 6
    apply_vfm(model)
    assert is_patched(model) and is_patched(model.get_base_model())
    x = ids()
    out, ref = model(input_ids=x, labels=x), reference(input_ids=x, labels=x)
    assert out.logits is None  # the lm_head copy under modules_to_save was found and fused
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    assert any("modules_to_save" in n for n in grads(model))
    unapply_vfm(model)
    assert not is_patched(model)
    # LoRA on the head itself: no plain weight to fuse; logits are computed, numbers unchanged, logged once
    reference = get_peft_model(causal("llama"), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    model = apply_vfm(copy.deepcopy(reference))
    with caplog.at_level(logging.WARNING, logger="vfm.integrations"):
        out = model(input_ids=x, labels=x)
    assert out.logits is not None and "not a plain nn.Linear" in caplog.text
    torch.testing.assert_close(out.loss, reference(input_ids=x, labels=x).loss, **TIGHT)


def test_peft_lora_classifier_with_teacher():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    reference = get_peft_model(bert("sequence"), config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model = copy.deepcopy(reference)
    assert vfm.peft.accelerate(model).num_accelerated == 4
    apply_vfm(model, kd_weight=0.5)
    x, labels, teacher = ids(vocab=120, t=11), torch.tensor([1, 4]), torch.randn(2, 5)
    out = model(input_ids=x, labels=labels, teacher_logits=teacher)
    expected = hand_loss(reference(input_ids=x).logits, labels, teacher=teacher, kd_weight=0.5)
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.backward()
    assert_same_grads(model, reference)  # the LoRA factors and PEFT's trainable classifier copy


# ------------------------------------------------------------------------------ classification --
def bert(kind, num_labels=5, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=120,
                     num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cls = BertForSequenceClassification if kind == "sequence" else BertForTokenClassification
    model = cls(cfg).train()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    return model


def test_sequence_classification():
    reference = bert("sequence")
    model = apply_vfm(copy.deepcopy(reference))
    x = ids(vocab=120, t=11)
    labels = torch.tensor([1, 4])
    out, ref = model(input_ids=x, labels=labels), reference(input_ids=x, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **TIGHT)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    # distillation + rules, and num_items_in_batch (sum / n: transformers' BERT head ignores it)
    model.zero_grad()
    reference.zero_grad()
    apply_vfm(model, kd_weight=0.5, temperature=3.0, penalty_weight=0.2)
    teacher = torch.randn(2, 5)
    allowed = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    out = model(input_ids=x, labels=labels, teacher_logits=teacher, allowed=allowed, num_items_in_batch=4)
    expected = hand_loss(reference(input_ids=x).logits, labels, teacher=teacher, temperature=3.0, kd_weight=0.5,
                         allowed=allowed, penalty_weight=0.2, n_items=4)
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.backward()
    assert_same_grads(model, reference, atol=1e-5)


def test_generic_sequence_classification_and_other_problem_types():
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "num_labels": 3, "pad_token_id": 0})
    reference = LlamaForSequenceClassification(cfg)
    model = apply_vfm(copy.deepcopy(reference))
    x = ids(vocab=V) + 1
    labels = torch.tensor([2, 0])
    out, ref = model(input_ids=x, labels=labels), reference(input_ids=x, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    # multi-label (float labels): transformers' own loss, and vfm batch keys are refused
    r2, m2 = copy.deepcopy(reference), apply_vfm(copy.deepcopy(reference))
    r2.config.problem_type = m2.config.problem_type = None  # the calls above fixed it to single-label
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(m2(input_ids=x, labels=multi).loss, r2(input_ids=x, labels=multi).loss, **TIGHT)
    assert m2.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match="single-label"):
        m2(input_ids=x, labels=multi, teacher_logits=torch.zeros(2, 3))


def test_token_classification():
    reference = bert("token", num_labels=7)
    model = apply_vfm(copy.deepcopy(reference), allowed_group_masks=torch.tensor(
        [[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool))
    x = ids(vocab=120, t=9)
    labels = torch.randint(0, 7, (B, 9), generator=torch.Generator().manual_seed(3))
    labels[:, 0] = -100  # [CLS]
    out, ref = model(input_ids=x, labels=labels), reference(input_ids=x, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    torch.testing.assert_close(out.logits, ref.logits, **TIGHT)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    # group ids per token (no shift for token classification) against the expanded masks by hand
    apply_vfm(model, penalty_weight=1.0, allowed_group_masks=model.__dict__["_vfm_state"].group_masks)
    gid = torch.randint(-1, 2, (B, 9), generator=torch.Generator().manual_seed(4))
    out = model(input_ids=x, labels=labels, allowed_group_ids=gid)
    masks = model.__dict__["_vfm_state"].group_masks
    dense = torch.where((gid >= 0)[..., None], masks[gid.clamp_min(0)], torch.ones(7, dtype=torch.bool))
    expected = hand_loss(reference(input_ids=x).logits, labels, allowed=dense, penalty_weight=1.0)
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- Trainer --
@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_trainer_two_steps_with_batch_keys(tmp_path, monkeypatch, remove_unused_columns):
    from transformers import Trainer, TrainingArguments

    model = apply_vfm(causal("llama"), kd_weight=0.5, penalty_weight=0.1)
    g = torch.Generator().manual_seed(9)
    rows = []
    for i in range(8):
        x = torch.randint(0, V, (T,), generator=g)
        rows.append({"input_ids": x, "labels": x.clone(), "teacher_logits": torch.randn(T, V, generator=g),
                     "allowed": torch.rand(T, V, generator=g) < 0.5})
    seen = []
    fused = vfm.functional.fused_linear_knowledge_cross_entropy

    def spy(hidden, weight, target, bias=None, **kw):
        seen.append({k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        return fused(hidden, weight, target, bias, **kw)

    monkeypatch.setattr(vfm.functional, "fused_linear_knowledge_cross_entropy", spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=True, logging_steps=1, disable_tqdm=True,
                             remove_unused_columns=remove_unused_columns)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert len(seen) == 4  # 2 steps x 2 accumulated micro-batches, each through the fused loss
    assert all(s["teacher_logits"] == (2, T, V) and s["allowed"] == (2, T, V) for s in seen)
    assert all(s["num_items_in_batch"] == () for s in seen)  # the Trainer's count over the accumulated batch
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and len(changed) == len(before)
    # evaluation: the same batch keys, the loss from the logits (eval mode returns them)
    metrics = trainer.evaluate(eval_dataset=rows[:4])
    assert len(seen) == 4 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
