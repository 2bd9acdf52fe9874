"""KnowledgeTrainer: the loss it computes, resume determinism, early stopping, layer freezing, PEFT."""

import json
import os

import pytest
import torch

from test_train_utils import tiny_model, tiny_tokenizer, toy_rows
from vfm.functional import knowledge_cross_entropy
from vfm.train.trainer import KnowledgeCollator, KnowledgeTrainer, classification_metrics, encode_rows

torch.set_num_threads(1)


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=5e-3,
                logging_steps=1, seed=7, use_cpu=True, report_to="none", remove_unused_columns=False,
                disable_tqdm=True, label_names=["labels"], save_strategy="no", eval_strategy="no")
    base.update(kw)
    return TrainingArguments(**base)


def _dataset(tok, with_pool=True, k=2):
    texts, labels = toy_rows()
    soft = [True] * len(texts)
    if with_pool:
        texts = texts + ["my package is late", "app error please", "refund my card"]
        labels = labels + [-100, -100, -100]
        soft = soft + [True, True, True]
    g = torch.Generator().manual_seed(1)
    n = len(texts)
    t_logits = torch.randn(n, 3, generator=g)
    lp = torch.log_softmax(t_logits, 1)
    vals, idx = lp.topk(k, 1)
    groups = torch.tensor([i % 3 - 1 for i in range(n)])  # -1, 0, 1 cycling
    masks = torch.tensor([[True, True, False], [False, True, True]])
    ds = encode_rows(tok, texts, labels, soft_mask=soft, teacher_indices=idx, teacher_logprobs=vals,
                     group_ids=groups.tolist(), max_length=16)
    return ds, masks


LOSS = dict(ce_weight=1.0, kd_weight=0.5, temperature=2.0, penalty_weight=0.3, penalty="mass")


def test_compute_loss_matches_knowledge_cross_entropy_by_hand(tmp_path):
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    model = tiny_model(dropout=0.0).eval()
    ds, masks = _dataset(tok)
    trainer = KnowledgeTrainer(model=model, args=_args(tmp_path), train_dataset=ds,
                               data_collator=KnowledgeCollator(tok), loss_options=LOSS, group_masks=masks)
    batch = KnowledgeCollator(tok)([ds[i] for i in range(len(ds))])
    got = trainer.compute_loss(model, batch)
    # by hand: the model's logits, then the op with the same tensors (per-term means)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).logits
    want = knowledge_cross_entropy(logits, batch["labels"], teacher_topk=(batch["teacher_indices"],
                                   batch["teacher_logprobs"]), allowed=(masks, batch["group_ids"]),
                                   soft_mask=batch["soft_mask"], **LOSS)
    torch.testing.assert_close(got, want)
    # and the formula itself on this batch: CE over labelled rows, KD / penalty over soft rows
    lab = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[lab], batch["labels"][lab])
    T = 2.0
    q = torch.full_like(logits, float("-inf")).scatter(1, batch["teacher_indices"], batch["teacher_logprobs"] / T)
    q = torch.softmax(q, 1)
    logp = torch.log_softmax(logits / T, 1)
    kd = (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(1).mean() * T * T
    allowed = torch.ones_like(logits, dtype=torch.bool)
    gid = batch["group_ids"]
    allowed[gid >= 0] = masks[gid[gid >= 0]]
    pen = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), 1)).mean()
    torch.testing.assert_close(got, ce + 0.5 * kd + 0.3 * pen, rtol=1e-5, atol=1e-5)
    # with num_items_in_batch (the Trainer's row count) every term is divided by it
    n = torch.tensor(float(len(ds)))
    got_n = trainer.compute_loss(model, batch, num_items_in_batch=n)
    ce_sum = torch.nn.functional.cross_entropy(logits[lab], batch["labels"][lab], reduction="sum")
    torch.testing.assert_close(got_n, (ce_sum + 0.5 * kd * len(ds) + 0.3 * pen * len(ds)) / n, rtol=1e-5, atol=1e-5)


class _Killed(Exception):
    pass


def _kill_after_save(step):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Killed()

    return Kill()


def _losses(trainer):
    return [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]


def test_resume_after_kill_continues_exactly(tmp_path):
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    ds, masks = _dataset(tok)

    def make(out, callbacks=()):
        model = tiny_model(seed=3, dropout=0.1)  # dropout on: the RNG state must be restored too
        return KnowledgeTrainer(model=model, args=_args(out, max_steps=8, save_strategy="steps", save_steps=3,
                                                       logging_steps=1),
                                train_dataset=ds, data_collator=KnowledgeCollator(tok), loss_options=LOSS,
                                group_masks=masks, callbacks=list(callbacks))

    full = make(tmp_path / "full")
    full.train()
    want = _losses(full)
    assert len(want) == 8
    killed = make(tmp_path / "killed", [_kill_after_save(6)])
    with pytest.raises(_Killed):
        killed.train()
    resumed = make(tmp_path / "killed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-6"))
    got = _losses(resumed)
    assert [s for s, _ in got] == list(range(1, 9))  # steps 1-6 come back with the checkpoint's state
    assert got == want  # the same losses, bit for bit, at steps 7 and 8 too
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    from transformers import EarlyStoppingCallback, TrainerCallback

    tok = tiny_tokenizer(str(tmp_path / "tok"))
    ds, masks = _dataset(tok, with_pool=False)
    scores = iter([0.2, 0.9, 0.5, 0.4, 0.3, 0.1])  # best at epoch 2, then no improvement
    snapshots = {}

    class Snap(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kw):
            snapshots[round(state.epoch)] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def metrics(pred):
        return {"score": next(scores)}

    trainer = KnowledgeTrainer(
        model=tiny_model(seed=5), train_dataset=ds, eval_dataset=ds, data_collator=KnowledgeCollator(tok),
        args=_args(tmp_path / "run", num_train_epochs=6, eval_strategy="epoch", save_strategy="epoch",
                   load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                   save_total_limit=2),
        loss_options={"ce_weight": 1.0}, compute_metrics=metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2), Snap()])
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_score" in r]
    assert len(evals) == 4  # epochs 1-4: stops after two evaluations without improvement
    assert trainer.state.best_metric == 0.9
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{2 * 5}")  # 18 rows / 4 = 5 steps per epoch
    assert os.path.isdir(trainer.state.best_model_checkpoint)
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, snapshots[2][k], rtol=0, atol=0, msg=k)


def test_classification_metrics_in_trainer_eval(tmp_path):
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    ds, _ = _dataset(tok, with_pool=False)
    model = tiny_model(seed=2)
    trainer = KnowledgeTrainer(model=model, args=_args(tmp_path), eval_dataset=ds,
                               data_collator=KnowledgeCollator(tok), loss_options={"ce_weight": 1.0},
                               compute_metrics=classification_metrics(["a", "b", "c"]))
    out = trainer.evaluate()
    batch = KnowledgeCollator(tok)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(1)
    assert out["eval_accuracy"] == pytest.approx((pred == batch["labels"]).float().mean().item())


def test_trainer_refuses_remove_unused_columns(tmp_path):
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="remove_unused_columns"):
        KnowledgeTrainer(model=tiny_model(), args=_args(tmp_path, remove_unused_columns=True),
                         data_collator=KnowledgeCollator(tok))
