"""One ``vfm train`` run: data preparation, rules, teacher, student, Trainer, evaluation.

Outputs in ``training.output_dir``: ``data_report.txt`` (every row each data step removed or
added), ``rule_report.txt``, ``teacher_topk.safetensors`` (cache), ``checkpoint-*`` (the best one
is kept), ``metrics.csv`` and ``tensorboard/`` (every log record), ``final/`` (the best model,
LoRA/AdaLoRA/IA3 merged into the base weights so ``vfm eval`` loads it as a plain model),
``eval_metrics.json`` and, with a test set, ``test_metrics.json``, ``test_report.txt`` and
``test_confusion_matrix.png``.  Under torchrun/accelerate every process prepares the same data;
only process 0 prints and writes reports.

``task: tagging`` (:func:`_train_tagging`, :mod:`vfm.train.tagging`) writes the same files except
the confusion matrix: ``test_metrics.json`` holds entity-level scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from vfm.train.config import BUILTIN_MINILM, Config, load_config

IGNORE_INDEX = -100


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        output_dir: the run folder.
        final_model_dir: the saved best model (``final/``).
        best_checkpoint: the Trainer's best checkpoint (None without evaluation).
        eval_metrics: metrics of the best model on the evaluation set.
        test_report: :class:`vfm.evaluate.ClassificationReport` on the test set (None without one).
        teacher_accuracy: split -> accuracy of the teacher's top-1 on the labelled rows.
        labels: the label names.
        sizes: rows per split after preparation.
    """

    output_dir: str
    final_model_dir: str
    best_checkpoint: Optional[str]
    eval_metrics: Dict[str, float]
    test_report: Any = None
    teacher_accuracy: Dict[str, float] = field(default_factory=dict)
    labels: List[str] = field(default_factory=list)
    sizes: Dict[str, int] = field(default_factory=dict)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _printer(quiet: bool) -> Callable[[str], None]:
    def say(msg: str = "") -> None:
        if not quiet and _is_main():
            print(msg, flush=True)

    say.quiet = quiet  # the per-epoch lines (EpochPrinter) follow it too
    return say


# ------------------------------------------------------------------------------ data --
def _load_split(path: str, cfg: Config, say, notes: List[str]):
    from vfm.data import load_examples

    examples, report = load_examples(path, text_field=cfg.data.text_field, label_field=cfg.data.label_field)
    say(f"  load {os.path.basename(path)}: {len(examples)} rows" +
        (f", {len(report.malformed)} malformed (listed in data_report.txt)" if report.malformed else ""))
    notes.append(str(report))
    return examples


def prepare_data(cfg: Config, labels: Sequence[str], say) -> Tuple[Dict[str, list], List[str]]:
    """Load, clean, deduplicate, augment and split the data of ``cfg``.

    Returns:
        ``(splits, notes)``: splits "train", "eval", "test", "pool" (lists of
        :class:`vfm.data.Example`; pool rows are unlabelled) and the full text of every report.
    """
    import vfm.data as vd

    notes: List[str] = []
    say("data preparation:")
    splits = {"train": _load_split(cfg.data.train, cfg, say, notes)}
    for key, path in (("eval", cfg.data.eval), ("test", cfg.data.test), ("pool", cfg.data.unlabelled)):
        splits[key] = _load_split(path, cfg, say, notes) if path else []
    moved = [ex for ex in splits["train"] if ex.label is None]
    if moved:
        splits["train"] = [ex for ex in splits["train"] if ex.label is not None]
        splits["pool"] = moved + splits["pool"]
        say(f"  {len(moved)} unlabelled rows of the training file go to the unlabelled pool")
    if not splits["train"] and not moved:
        raise ValueError(f"{cfg.data.train}: no rows loaded (an empty file, or every row malformed: see the load "
                         "report above)")
    if not splits["train"]:  # e.g. a misspelt label column: every row would silently become a pool row
        raise ValueError(f"{cfg.data.train}: no labelled training rows ({len(moved)} rows, none with a label in "
                         f"the field {cfg.data.label_field!r}; set data.label_field to the label column/key)")
    for key in ("pool",):
        for ex in splits[key]:
            ex.label = None
    if cfg.data.clean:
        for key in splits:
            if splits[key]:
                splits[key], rep = vd.clean(splits[key])
                say(f"  [{key}] {rep.summary()}")
                notes.append(str(rep))
    if cfg.data.deduplicate:
        # train and pool together (a pool row repeating a labelled one is removed), then eval/test
        # rows that repeat a training row are removed from train, so no test text is trained on
        for ex in splits["train"]:
            ex.meta["_vfm_split"] = "train"
        for ex in splits["pool"]:
            ex.meta["_vfm_split"] = "pool"
        merged, rep = vd.deduplicate(splits["train"] + splits["pool"], threshold=cfg.data.near_duplicate_threshold,
                                     progress=cfg.training.progress and _is_main())
        say(f"  [train+pool] {rep.summary()}")
        notes.append(str(rep))
        splits["train"] = [ex for ex in merged if ex.meta.get("_vfm_split") == "train"]
        splits["pool"] = [ex for ex in merged if ex.meta.get("_vfm_split") == "pool"]
        held = splits["eval"] + splits["test"]
        if held:
            for ex in held:
                ex.meta["_vfm_split"] = "held"
            merged, rep = vd.deduplicate(held + splits["train"], threshold=cfg.data.near_duplicate_threshold,
                                         progress=cfg.training.progress and _is_main())
            kept = {id(ex) for ex in merged}
            n_before = len(splits["train"])
            splits["train"] = [ex for ex in splits["train"] if id(ex) in kept]
            leaked = n_before - len(splits["train"])
            say(f"  train rows repeating an eval/test row removed: {leaked}")
            notes.append("train rows repeating an eval/test row:\n" + str(rep))
    label_set = set(labels)
    for key in ("train", "eval", "test"):
        bad = [ex for ex in splits[key] if ex.label not in label_set]
        if bad:
            where = ", ".join(f"{ex.where} ({ex.label!r})" for ex in bad[:5])
            raise ValueError(f"{key} rows with a label that is not one of {list(labels)}: {where}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    if not splits["eval"]:
        f = cfg.data.eval_fraction
        splits["train"], splits["eval"] = vd.stratified_split(splits["train"], (1.0 - f, f), seed=cfg.training.seed)
        say(f"  no eval file: stratified split {1 - f:.2f}/{f:.2f} -> train {len(splits['train'])}, "
            f"eval {len(splits['eval'])}")
    if cfg.data.augment > 0:
        splits["train"], rep = vd.augment(splits["train"], n_per_example=cfg.data.augment, lexicon=cfg.data.lexicon,
                                          seed=cfg.training.seed)
        say(f"  [train] {rep.summary()}")
        notes.append(str(rep))
    say("  rows: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return splits, notes


# ------------------------------------------------------------------------- knowledge --
def _teacher_topk(cfg: Config, texts: List[str], labels: List[str], rules, say):
    from vfm.teacher import build_teacher, map_teacher_labels

    t = cfg.teacher
    descriptions = t.descriptions or (rules.descriptions if rules is not None else None)
    cache = t.cache or os.path.join(cfg.training.output_dir, "teacher_topk.safetensors")
    k = min(t.top_k, len(labels)) if t.kind == "zero_shot" else t.top_k
    topk, reused = build_teacher(t.kind, t.model, texts, k=k, cache_path=cache if _is_main() else None,
                                 labels=labels if t.kind == "zero_shot" else None, descriptions=descriptions,
                                 scale=t.scale, batch_size=t.batch_size, max_length=cfg.data.max_length,
                                 progress=cfg.training.progress and _is_main())
    say(f"teacher ({t.kind}, {os.path.basename(os.path.normpath(t.model))}): top-{topk.indices.shape[1]} for "
        f"{len(texts)} rows "
        f"{'reused from' if reused else 'written to'} {cache}")
    return map_teacher_labels(topk, labels, t.label_map)


def _accuracy(pred: torch.Tensor, gold: Sequence[int]) -> float:
    gold_t = torch.as_tensor(list(gold), dtype=torch.long)
    return float((pred == gold_t).float().mean()) if len(gold_t) else float("nan")


# ------------------------------------------------------------------------------ train --
def _training_args(cfg: Config, has_eval: bool, task: str = "classification"):
    from transformers import TrainingArguments

    tr = cfg.training
    metric = tr.metric or ("f1" if task == "tagging" else "macro_f1")
    return TrainingArguments(
        output_dir=tr.output_dir, num_train_epochs=tr.epochs, max_steps=tr.max_steps,
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.eval_batch_size,
        learning_rate=tr.learning_rate, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps,
        gradient_accumulation_steps=tr.gradient_accumulation_steps, max_grad_norm=tr.max_grad_norm, seed=tr.seed,
        eval_strategy="epoch" if has_eval else "no", save_strategy="epoch", logging_strategy="steps",
        logging_steps=tr.logging_steps, load_best_model_at_end=has_eval,
        metric_for_best_model=metric if has_eval else None,
        greater_is_better=None if not has_eval else ("loss" not in metric),
        save_total_limit=tr.save_total_limit, report_to="none", remove_unused_columns=False,
        label_names=["labels"], disable_tqdm=not tr.progress, ddp_backend=tr.ddp_backend,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available())


def _resume_point(cfg: Config) -> Optional[str]:
    from vfm.train.trainer import last_checkpoint

    r = cfg.training.resume
    if r is False or r is None or r == "never":
        return None
    if r == "auto":
        return last_checkpoint(cfg.training.output_dir)
    if r is True:
        found = last_checkpoint(cfg.training.output_dir)
        if found is None:
            raise ValueError(f"training.resume is true but {cfg.training.output_dir} holds no checkpoint")
        return found
    if isinstance(r, str) and os.path.isdir(r):
        return r
    raise ValueError(f"training.resume must be auto, true, false or a checkpoint folder, got {r!r}")


def train(config: Union[str, Config], *, quiet: bool = False, name: str = "") -> TrainResult:
    """Run ``vfm train``: see the module docstring for what is written.

    Args:
        config: a YAML path or a :class:`Config`.
        quiet: print nothing (reports are still written to the output folder).
        name: a tag printed on the per-epoch lines.

    Returns:
        A :class:`TrainResult`.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from vfm.evaluate import classification_report, save_classification_outputs, write_json
    from vfm.evaluate import _atomic_bytes
    from vfm.train import trainer as vt

    cfg = load_config(config) if isinstance(config, str) else config
    for key, path in (("model", cfg.model), ("teacher.model", cfg.teacher.model if cfg.teacher else None)):
        if path is not None and not os.path.isdir(path):  # else Transformers would look it up on the Hub
            raise ValueError(f"{cfg.source}: {key} {path!r} is not a local model directory (vfm never downloads: "
                             f"give a Transformers model folder or {BUILTIN_MINILM!r})")
    from vfm.train.model import fit_max_length

    say = _printer(quiet)
    fitted, note = fit_max_length(  # else a tensor-size RuntimeError at the first long batch
        cfg.data.max_length, {"model": cfg.model, **({"teacher.model": cfg.teacher.model} if cfg.teacher else {})})
    if note:  # a copy: the caller's Config is left as it was
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=fitted))
        say(note)
    hf_logging.disable_progress_bar()
    out = cfg.training.output_dir
    os.makedirs(out, exist_ok=True)
    rules = None
    if cfg.rules:
        from vfm.knowledge import load_rules

        rules = load_rules(cfg.rules)
        if cfg.task is not None and rules.task != cfg.task:
            raise ValueError(f"{cfg.rules}: task {rules.task!r} but {cfg.source} says task {cfg.task!r}")
        if cfg.labels and list(cfg.labels) != list(rules.labels):
            raise ValueError(f"{cfg.source}: labels {cfg.labels} differ from the rule file's {rules.labels}")
    task = cfg.task or (rules.task if rules is not None else "classification")
    if task == "tagging":
        from vfm.train.config import check_tagging

        check_tagging(cfg)
    labels = list(rules.labels if rules is not None else cfg.labels)
    vt.check_before_training(cfg, task, labels, _resume_point(cfg))  # training.metric, a stale checkpoint
    if task == "tagging":
        return _train_tagging(cfg, rules, labels, say, quiet=quiet, name=name)
    l2i = {n: i for i, n in enumerate(labels)}
    splits, notes = prepare_data(cfg, labels, say)
    if _is_main():
        _atomic_bytes(os.path.join(out, "data_report.txt"), ("\n\n".join(notes) + "\n").encode("utf-8"))
    fit_rows = splits["train"] + splits["pool"]
    all_rows = fit_rows + splits["eval"] + splits["test"]
    texts = [ex.text for ex in all_rows]
    n_fit, n_eval = len(fit_rows), len(splits["eval"])
    group_ids = group_masks = None
    if rules is not None:
        compiled = rules.compile(texts)
        group_ids, group_masks = compiled.group_ids, compiled.group_masks
        report = rules.report([ex.text for ex in splits["train"]], [ex.label for ex in splits["train"]])
        text = f"rules on the labelled training rows:\n{report}"
        if splits["pool"]:
            text += f"\n\nrules on the unlabelled pool:\n{rules.report([ex.text for ex in splits['pool']])}"
        say(text)
        if _is_main():
            _atomic_bytes(os.path.join(out, "rule_report.txt"), (text + "\n").encode("utf-8"))
    use_teacher = cfg.teacher is not None
    topk = _teacher_topk(cfg, texts, labels, rules, say) if use_teacher else None
    teacher_acc: Dict[str, float] = {}
    if topk is not None:
        top1 = topk.top1()
        start = 0
        for key in ("train", "pool", "eval", "test"):
            n = len(splits[key])
            if key != "pool" and n:
                teacher_acc[key] = _accuracy(top1[start:start + n], [l2i[ex.label] for ex in splits[key]])
            start += n
        say("teacher accuracy (top-1 vs gold): " + ", ".join(f"{k} {v:.3f}" for k, v in teacher_acc.items()))

    tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)

    def rows(lo: int, hi: int, items):
        return vt.encode_rows(
            tok, [ex.text for ex in items], [l2i[ex.label] if ex.label is not None else IGNORE_INDEX for ex in items],
            max_length=cfg.data.max_length,
            teacher_indices=topk.indices[lo:hi] if topk is not None else None,
            teacher_logprobs=topk.logprobs[lo:hi] if topk is not None else None,
            group_ids=group_ids[lo:hi].tolist() if group_ids is not None else None)

    train_ds = rows(0, n_fit, fit_rows)
    eval_ds = rows(n_fit, n_fit + n_eval, splits["eval"]) if n_eval else None
    test_ds = rows(n_fit + n_eval, len(all_rows), splits["test"]) if splits["test"] else None

    trainer, printer = _fit(cfg, tok, labels, train_ds, eval_ds, vt.KnowledgeCollator(tok),
                            vt.classification_metrics(labels), group_masks, "classification", rules is not None,
                            f"{len(train_ds)} rows ({len(splits['train'])} labelled + {len(splits['pool'])} "
                            "unlabelled)", say, name)
    printer.final = True
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    test_report = None
    if test_ds is not None:
        pred = trainer.predict(test_ds)
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        test_report = classification_report(pred.label_ids, logits.argmax(-1), labels)
        if _is_main():
            save_classification_outputs(test_report, out, prefix="test_")
    final_dir = os.path.join(out, "final")
    if trainer.is_world_process_zero():
        write_json(os.path.join(out, "eval_metrics.json"), eval_metrics)
        _save_final(trainer.model, tok, final_dir, cfg.peft.method, cfg.data.clean)
    return TrainResult(out, final_dir, trainer.state.best_model_checkpoint, eval_metrics, test_report, teacher_acc,
                       labels, {k: len(v) for k, v in splits.items()})


def _fit(cfg: Config, tok, labels: List[str], train_ds, eval_ds, collator, compute_metrics, group_masks, task: str,
         has_rules: bool, rows_text: str, say, name: str, metric_keys=("eval_loss", "eval_accuracy", "eval_macro_f1")):
    """Student, PEFT, callbacks and the Trainer; trains (resuming when asked).

    Returns:
        ``(trainer, printer)`` after ``trainer.train()``.
    """
    from transformers import EarlyStoppingCallback

    from vfm.train import model as vm
    from vfm.train import trainer as vt

    use_teacher = cfg.teacher is not None
    out = cfg.training.output_dir
    torch.manual_seed(cfg.training.seed)  # the new head's initialisation is part of the run
    model = vm.load_student(cfg.model, labels, task)
    per_step = cfg.training.batch_size * cfg.training.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", 1))
    total_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else \
        math.ceil(len(train_ds) / per_step) * math.ceil(cfg.training.epochs)
    peft_cfg = cfg.peft
    printer = vt.EpochPrinter(name, metric_keys, quiet=getattr(say, "quiet", False))
    callbacks: List[Any] = [vt.MetricsCSVCallback(os.path.join(out, "metrics.csv")), printer]
    if peft_cfg.method != "none":
        model, accel = vm.apply_peft(model, peft_cfg.method, peft_cfg.options, accelerate=peft_cfg.accelerate,
                                     total_steps=total_steps, task=task)
        say(str(accel) if accel is not None else f"PEFT {peft_cfg.method}: run by PEFT itself")
        if peft_cfg.method == "adalora":
            from vfm.adalora import AdaLoraScheduleCallback

            callbacks.append(AdaLoraScheduleCallback())
    elif peft_cfg.freeze_bottom_layers is not None:
        frozen = vm.freeze_bottom_layers(model, peft_cfg.freeze_bottom_layers)
        say(f"top-layer tuning: {len(frozen)} parameter tensors frozen (embeddings + bottom "
            f"{peft_cfg.freeze_bottom_layers} layers)")
    n_train, n_all = vm.count_trainable(model)
    say(f"student: {os.path.basename(os.path.normpath(cfg.model))}, {len(labels)} labels, "
        f"trainable {n_train:,} of {n_all:,} parameters")
    if cfg.training.tensorboard:
        tb, why = vt.tensorboard_callback(os.path.join(out, "tensorboard"))
        if tb is not None:
            callbacks.append(tb)
        else:
            say(why)
    if eval_ds is not None and cfg.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    loss = cfg.loss
    loss_options = dict(ce_weight=loss.ce_weight, kd_weight=loss.kd_weight if use_teacher else 0.0, kd=loss.kd,
                        temperature=loss.temperature,
                        penalty_weight=loss.penalty_weight if has_rules else 0.0, penalty=loss.penalty,
                        rule_strength=loss.rule_strength, label_smoothing=loss.label_smoothing, z_loss=loss.z_loss)
    trainer = vt.KnowledgeTrainer(
        model=model, args=_training_args(cfg, eval_ds is not None, task), train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator, compute_metrics=compute_metrics,
        callbacks=callbacks, loss_options=loss_options, group_masks=group_masks)
    if not cfg.training.progress:  # no tqdm bars: the per-epoch lines replace the Trainer's log dicts
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = _resume_point(cfg)
    if resume:
        say(f"resuming from {resume}")
    say(f"training: {rows_text}, "
        f"loss {', '.join(f'{k}={v}' for k, v in _active_loss_options(loss_options).items())}")
    trainer.train(resume_from_checkpoint=resume)
    return trainer, printer


def _train_tagging(cfg: Config, rules, labels: List[str], say, *, quiet: bool, name: str) -> TrainResult:
    """The ``task: tagging`` run (see :mod:`vfm.train.tagging`): CoNLL data, token rules, a
    token-classification teacher, entity-level F1 each epoch, ``test_metrics.json`` with a test file."""
    from transformers import AutoTokenizer

    from vfm.evaluate import _atomic_bytes, entity_report, write_json
    from vfm.train import tagging as tg

    out = cfg.training.output_dir
    if not all(lab == "O" or lab[:2] in ("B-", "I-") for lab in labels):
        raise ValueError(f"{cfg.source}: task tagging needs BIO tags (O, B-X, I-X), got labels {labels}")
    splits, notes = tg.prepare_tagging_data(cfg, labels, say)
    if _is_main():
        _atomic_bytes(os.path.join(out, "data_report.txt"), ("\n\n".join(notes) + "\n").encode("utf-8"))
    tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    sets, group_masks, rule_text = tg.build_tagging_datasets(cfg, rules, labels, tok, splits, say, _is_main())
    if rule_text is not None and _is_main():
        _atomic_bytes(os.path.join(out, "rule_report.txt"), (rule_text + "\n").encode("utf-8"))
    n_words = sum(len(ex.tokens) for ex in splits["train"])
    pool_words = sum(len(ex.tokens) for ex in splits["pool"])
    constrained = cfg.training.constrained_decoding
    trainer, printer = _fit(
        cfg, tok, labels, sets["train"], sets["eval"], tg.TaggingCollator(tok), tg.tagging_metrics(labels, constrained),
        group_masks, "tagging", rules is not None,
        f"{len(sets['train'])} sentences ({len(splits['train'])} tagged, {n_words} words + {len(splits['pool'])} "
        f"unlabelled, {pool_words} words)", say, name, ("eval_loss", "eval_token_accuracy", "eval_f1"))
    printer.final = True
    eval_metrics = trainer.evaluate() if sets["eval"] is not None else {}
    test_scores = None
    if sets["test"] is not None:
        pred = trainer.predict(sets["test"])
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        trans, start = tg.bio_tables(labels) if constrained else (None, None)
        gold_tags, pred_tags = [], []
        for b, ex in enumerate(splits["test"]):
            keep = torch.as_tensor(pred.label_ids[b]) != IGNORE_INDEX
            p = tg.decode_tags(torch.as_tensor(logits[b])[keep].float(), trans, start) if keep.any() else []
            # whole sentences, as vfm eval scores them: a word without a subword (cut off at
            # data.max_length) is predicted O and its gold entity counts as missed, not dropped
            enc = tok(list(ex.tokens), is_split_into_words=True, truncation=True, max_length=cfg.data.max_length)
            tags = ["O"] * len(ex.tokens)
            for (_, w), t in zip(tg.first_subwords(enc.word_ids()), p):
                tags[w] = labels[t]
            gold_tags.append(list(ex.tags))
            pred_tags.append(tags)
        test_scores = entity_report(gold_tags, pred_tags)
        if _is_main():
            write_json(os.path.join(out, "test_metrics.json"),
                       {"entity": test_scores, "sentences": len(gold_tags), "constrained_decoding": constrained})
        say("test entity F1 (micro): " + f"{test_scores.get('micro', {}).get('f1', 0.0):.4f}")
    final_dir = os.path.join(out, "final")
    if trainer.is_world_process_zero():
        write_json(os.path.join(out, "eval_metrics.json"), eval_metrics)
        _save_final(trainer.model, tok, final_dir, cfg.peft.method, cfg.data.clean)
    return TrainResult(out, final_dir, trainer.state.best_model_checkpoint, eval_metrics, test_scores, {},
                       labels, {k: len(v) for k, v in splits.items()})


PREPROCESSING_FILE = "vfm_preprocessing.json"  # in final/: how the training texts were prepared (vfm eval reads it)


def _save_final(model, tok, final_dir: str, method: str, clean: bool = True) -> None:
    """Save the trained model; adapters that can be merged (LoRA, AdaLoRA, IA3) are merged first.
    ``vfm_preprocessing.json`` records whether the texts were cleaned (``vfm.data.clean``'s
    defaults), so that ``vfm eval`` prepares a test file the same way."""
    from vfm.train import trainer as vt

    if method in ("lora", "adalora", "ia3"):
        import vfm.peft

        vfm.peft.restore(model)  # PEFT's own classes for merging
        model = model.merge_and_unload()

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        with open(os.path.join(folder, PREPROCESSING_FILE), "w", encoding="utf-8") as fh:
            json.dump({"clean": bool(clean)}, fh)

    vt.write_folder_atomically(final_dir, write)  # never a half-written final/ in place of a good one


def _active_loss_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    """The loss options that matter (KD options only with kd_weight > 0, penalty ones with penalty_weight > 0)."""
    skip = set()
    if not opts.get("kd_weight"):
        skip |= {"kd_weight", "kd", "temperature"}
    if not opts.get("penalty_weight"):
        skip |= {"penalty_weight", "penalty", "rule_strength"}
    return {k: v for k, v in opts.items() if k not in skip and v is not None and v != 0.0}
