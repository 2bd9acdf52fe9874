"""Student set-up: top-layer tuning freezes exactly the bottom layers; PEFT methods (LoRA/AdaLoRA on vfm's
ops, IA3 / prompt tuning left to PEFT) train through KnowledgeTrainer."""

import pytest
import torch

from test_train_utils import tiny_model, tiny_tokenizer, toy_rows
from vfm.train.model import apply_peft, count_trainable, freeze_bottom_layers
from vfm.train.trainer import KnowledgeCollator, KnowledgeTrainer, encode_rows

torch.set_num_threads(1)


def test_freeze_bottom_layers_freezes_exactly_those():
    model = tiny_model(layers=3)
    frozen = set(freeze_bottom_layers(model, 2))
    for name, p in model.named_parameters():
        # written from BERT's module layout: embeddings and encoder.layer.0/1 frozen; layer 2, pooler, head train
        expect_frozen = name.startswith("bert.embeddings.") or name.startswith("bert.encoder.layer.0.") or \
            name.startswith("bert.encoder.layer.1.")
        assert p.requires_grad is (not expect_frozen), name
        assert (name in frozen) is expect_frozen, name
    assert any(n.startswith("bert.encoder.layer.2.") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"freeze_bottom_layers must be an int in \[0, 3\]"):
        freeze_bottom_layers(tiny_model(layers=3), 4)


def _train_steps(model, tmp_path, steps=2):
    from transformers import TrainingArguments

    tok = tiny_tokenizer(str(tmp_path / "tok"))
    texts, labels = toy_rows()
    ds = encode_rows(tok, texts, labels, max_length=16)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=steps,
                             learning_rate=1e-2, use_cpu=True, report_to="none", remove_unused_columns=False,
                             disable_tqdm=True, save_strategy="no", label_names=["labels"], logging_steps=1)
    trainer = KnowledgeTrainer(model=model, args=args, train_dataset=ds, data_collator=KnowledgeCollator(tok),
                               loss_options={"ce_weight": 1.0})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    return trainer, changed


@pytest.mark.parametrize("method, options", [
    ("lora", {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}),
    ("adalora", {"init_r": 4, "target_r": 2, "target_modules": ["query", "value"], "tinit": 0, "tfinal": 0}),
])
def test_lora_and_adalora_run_on_vfm(tmp_path, method, options):
    from peft.tuners.tuners_utils import BaseTunerLayer

    import vfm.peft

    torch.manual_seed(0)
    model, report = apply_peft(tiny_model(), method, options, total_steps=4)
    n_adapter_layers = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert n_adapter_layers == 4  # query + value in 2 layers
    assert report.num_accelerated == n_adapter_layers and not report.skipped
    assert report.kinds[method] == n_adapter_layers
    assert all(type(m).__module__ == "vfm.peft" for m in model.modules() if isinstance(m, BaseTunerLayer))
    # the accelerated model computes what PEFT computes
    tok = tiny_tokenizer(str(tmp_path / "t"))
    enc = tok(["refund my money", "app crash error"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for _, m in model.named_modules():
            if hasattr(m, "lora_B"):
                for p in m.lora_B.parameters() if isinstance(m.lora_B, torch.nn.Module) else []:
                    p.normal_()  # non-zero B so the adapters matter
        model.eval()
        ours = model(**enc).logits
        vfm.peft.restore(model)
        theirs = model(**enc).logits
        vfm.peft.accelerate(model)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    trainer, changed = _train_steps(model, tmp_path)
    assert any("lora_A" in n for n in changed) and any("classifier" in n for n in changed)
    assert not any("bert.encoder.layer.0.attention.self.query.base_layer" in n for n in changed)


@pytest.mark.parametrize("method, options", [
    ("ia3", {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}),
    ("prompt_tuning", {"num_virtual_tokens": 3}),
    # prefix_tuning is passed to PEFT the same way, but PEFT 0.21 refuses BERT under transformers 5
    # ("Model does not support past key values which are required for prefix tuning")
])
def test_other_peft_methods_are_left_to_peft(tmp_path, method, options):
    model, report = apply_peft(tiny_model(), method, options)
    assert report is None
    assert not any(type(m).__module__ == "vfm.peft" for m in model.modules())
    trainable, total = count_trainable(model)
    assert 0 < trainable < total
    trainer, changed = _train_steps(model, tmp_path)
    assert changed and all(("ia3" in n or "prompt_encoder" in n or "classifier" in n) for n in changed), changed
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)


def test_unknown_peft_method_is_a_clear_error():
    with pytest.raises(ValueError, match="peft.method 'no_such_method'"):
        apply_peft(tiny_model(), "no_such_method", {})
