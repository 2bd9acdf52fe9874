"""Review tests of vfm.integrations.transformers against transformers' own, unpatched models.

Every reference here is the same tiny randomly initialised model without the patch (or PEFT / the
Trainer running it), so each test fails if the patched forward drifts from transformers' semantics.
"""

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import (BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Trainer, TrainingArguments)

from vfm.integrations import apply_vfm  # noqa: E402

V, B, T = 97, 3, 10
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def llama(**kw):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, **kw}))
    with torch.no_grad():  # visible logits: tiny random inits give near-uniform ones
        model.lm_head.weight.mul_(30.0)
    return model.train()


def pair(**kw):
    reference = llama(**kw)
    return reference, apply_vfm(copy.deepcopy(reference))


def ids(seed=1, b=B, t=T):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_same_grads(a, b, rtol=1e-4, atol=1e-6):
    ga = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------------ regressions --
def test_forward_ignore_index_is_not_silently_dropped():
    """transformers honours model(..., ignore_index=k); the patch used to drop it and train on label k."""
    reference, model = pair()
    x = ids()
    labels = x.clone()
    labels[:, :4] = 0  # padding labelled with token 0, ignored through the forward kwarg
    ref = reference(input_ids=x, labels=labels, ignore_index=0)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with pytest.raises(ValueError, match=r"ignore_index=0.*apply_vfm"):
            model(input_ids=x, labels=labels, ignore_index=0)
    # the same value as the patch's is accepted; set through apply_vfm it gives transformers' loss
    model.train()
    plain = reference(input_ids=x, labels=x)
    torch.testing.assert_close(model(input_ids=x, labels=x, ignore_index=-100).loss, plain.loss,
                               rtol=1e-5, atol=1e-6)
    apply_vfm(model, ignore_index=0)
    out = model(input_ids=x, labels=labels, ignore_index=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)


def test_float_labels_error_names_the_argument():
    _, model = pair()
    x = ids()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with pytest.raises(TypeError, match=r"^labels must be an integer.*float32.*\(3, 10\)"):
            model(input_ids=x, labels=x.float())
        with pytest.raises(TypeError, match=r"^shift_labels must be an integer.*bool"):
            model(input_ids=x, labels=x, shift_labels=x > 3)
    torch.manual_seed(0)
    tagger = apply_vfm(BertForTokenClassification(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=V, num_labels=5)))
    with pytest.raises(TypeError, match=r"^labels must be an integer.*float32"):
        tagger(input_ids=x, labels=torch.zeros(B, T))


def test_return_dict_false_keeps_transformers_positions():
    """(loss, logits, cache): the fused loss has no logits, so slot 1 is None, not the cache."""
    reference, model = pair()
    x = ids()
    ref = reference(input_ids=x, labels=x, use_cache=True, return_dict=False)
    out = model(input_ids=x, labels=x, use_cache=True, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref) == 3
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    assert out[1] is None and isinstance(ref[1], torch.Tensor)
    assert type(out[2]) is type(ref[2])
    # the logits path keeps transformers' tuple as it is
    full = model(input_ids=x, labels=x, use_cache=True, return_dict=False, return_logits=True)
    assert len(full) == 3
    torch.testing.assert_close(full[1], ref[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- parity (checked fine) --
def test_padding_both_sides_and_num_items_tensor_equal_transformers():
    reference, model = pair()
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    labels = x.masked_fill(mask == 0, -100)
    for n_items in (None, torch.tensor(40)):
        reference.zero_grad()
        model.zero_grad()
        ref = reference(input_ids=x, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
        out = model(input_ids=x, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        ref.loss.backward()
        assert_same_grads(model, reference)


def test_peft_lora_qv_patched_after_wrapping_with_checkpointing():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False)
    torch.manual_seed(5)
    reference = get_peft_model(llama(), config)
    model = get_peft_model(llama(), config)
    model.load_state_dict(reference.state_dict())
    apply_vfm(model)
    for m in (reference, model):
        m.gradient_checkpointing_enable()
        m.enable_input_require_grads()
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    ref = reference(input_ids=x, labels=labels)
    out = model(input_ids=x, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, reference)
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.grad is not None)


def _trainer_run(model, tmp_path, batch, accumulate, rows):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulate, learning_rate=1.0, optim="sgd",
                             max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:5])
    trainer.train()
    step = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return step, trainer.evaluate()["eval_loss"]


def test_trainer_accumulation_and_eval_loss_equal_unpatched(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    g = torch.Generator().manual_seed(9)
    rows = []
    for _ in range(8):  # different numbers of -100 per row: the per-token mean needs num_items_in_batch
        x = torch.randint(0, V, (8,), generator=g)
        labels = x.clone()
        labels[:int(torch.randint(0, 6, (1,), generator=g))] = -100
        rows.append({"input_ids": x, "labels": labels})
    ref_big, ref_eval = _trainer_run(llama(), tmp_path / "a", 8, 1, rows)
    vfm_acc, vfm_eval = _trainer_run(apply_vfm(llama()), tmp_path / "b", 4, 2, rows)
    for name in ref_big:  # SGD with lr 1: the step is minus the gradient of the whole batch
        torch.testing.assert_close(vfm_acc[name], ref_big[name], rtol=1e-4, atol=2e-6, msg=name)
    assert ref_big["lm_head.weight"].abs().max() > 1e-3
    assert vfm_eval == pytest.approx(ref_eval, rel=1e-5)


def test_data_parallel_replica_runs_its_own_modules():
    """nn.DataParallel copies a module's __dict__ into each replica: the patched forward must follow."""
    reference, model = pair()
    x = ids()
    replica = model._replicate_for_data_parallel()  # what torch.nn.parallel.replicate calls on each module
    other_head = torch.nn.Linear(32, V, bias=False)
    with torch.no_grad():
        other_head.weight.copy_(torch.randn(V, 32, generator=torch.Generator().manual_seed(3)) * 3)
    replica._modules["lm_head"] = other_head  # the replica's own (here: different) weights
    reference.lm_head = copy.deepcopy(other_head)
    out = replica(input_ids=x, labels=x)
    torch.testing.assert_close(out.loss, reference(input_ids=x, labels=x).loss, rtol=1e-5, atol=1e-6)
    assert out.logits is None
    out.loss.backward()
    assert other_head.weight.grad is not None and model.lm_head.weight.grad is None
    from vfm.integrations import unapply_vfm

    unapply_vfm(model)
    assert "forward" not in model.__dict__ and "_replicate_for_data_parallel" not in model.__dict__


def test_pickled_patched_model_stays_patched():
    """torch.save(model) / torch.load: the bound forward used to come back as the class's (unpatched) one."""
    import io

    from vfm.integrations import is_patched, unapply_vfm

    reference, model = pair()
    apply_vfm(model, z_loss=0.0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own in-memory object, not a user's file
    assert is_patched(loaded) and loaded.forward.__self__ is loaded
    x = ids()
    out = loaded(input_ids=x, labels=x)
    assert out.logits is None  # the fused loss ran, not transformers' forward
    torch.testing.assert_close(out.loss, reference(input_ids=x, labels=x).loss, rtol=1e-5, atol=1e-6)
    unapply_vfm(loaded)
    assert loaded(input_ids=x, labels=x).logits is not None


def test_deepcopy_of_patched_model_runs_in_eval_and_generation():
    """copy.deepcopy (an EMA or reference model) copied the 'no instance forward' sentinel into a new
    object, so the copy's eval / no-label / generate calls failed ('object' object is not callable)."""
    reference, model = pair()
    copied = copy.deepcopy(model)
    x = ids()
    reference.eval()
    copied.eval()
    torch.testing.assert_close(copied(input_ids=x).logits, reference(input_ids=x).logits)
    out = copied(input_ids=x, labels=x)
    torch.testing.assert_close(out.loss, reference(input_ids=x, labels=x).loss, rtol=1e-5, atol=1e-6)
    prompt = x[:1, :4]
    torch.testing.assert_close(copied.generate(prompt, max_new_tokens=3, do_sample=False),
                               reference.generate(prompt, max_new_tokens=3, do_sample=False))
