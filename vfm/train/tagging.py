"""BIO tagging for ``vfm train`` (``task: tagging``): word/subword alignment, per-token rows,
the per-token teacher, entity-level metrics with constrained Viterbi decoding, data preparation.

Alignment: a word's label, allowed-tag group, soft flag and teacher top-k sit on its *first*
subword; the other subwords (and special tokens, padding) carry ``labels = -100``,
``soft_mask = False``, ``group_ids = -1`` and teacher indices -1, so they count for no term of
the loss.  Words cut off by ``max_length`` truncation carry nothing (counted and reported).

The rows then go through the same :class:`vfm.train.trainer.KnowledgeTrainer` as classification:
``knowledge_cross_entropy`` accepts ``(B, S, L)`` logits with ``(B, S)`` targets, ``(B, S)``
soft mask and group ids and ``(B, S, k)`` teacher top-k; the loss is the mean over the tokens
that count (labelled words and the words of unlabelled pool sentences).
"""

from __future__ import annotations

import os
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from vfm.train.trainer import IGNORE_INDEX, RowDataset


def first_subwords(word_ids: Sequence[Optional[int]]) -> List[Tuple[int, int]]:
    """``(position, word)`` for the first subword of every word in a tokenizer's ``word_ids()``.

    Args:
        word_ids: per token position, the word index or None (special tokens).

    Returns:
        One pair per word that survived truncation, in order.
    """
    out, seen = [], set()
    for pos, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            out.append((pos, w))
    return out


def encode_tagging_rows(tokenizer, sentences: Sequence[Sequence[str]], tags: Sequence[Optional[Sequence[int]]], *,
                        max_length: int = 128, soft: Optional[Sequence[bool]] = None,
                        group_ids: Optional[Sequence[Sequence[int]]] = None,
                        teacher: Optional[Sequence[Tuple[Tensor, Tensor]]] = None) -> RowDataset:
    """Tokenize word-split sentences and put each word's targets on its first subword.

    Args:
        tokenizer: a fast Transformers tokenizer (``word_ids`` is needed).
        sentences: B sentences of T_i words.
        tags: per sentence T_i tag ids, or None (an unlabelled pool sentence: every label -100).
        max_length: subword positions kept per sentence (truncation).
        soft: per sentence, whether KD / rule penalty / z-loss act on its words (default all True).
        group_ids: per sentence T_i allowed-tag group ids (-1 = unconstrained).
        teacher: per sentence ``(indices (T_i, k), logprobs (T_i, k))`` in the student's tags.

    Returns:
        A :class:`RowDataset`; each row has the token fields and per-position lists ``labels``,
        ``soft_mask``, ``group_ids`` (S,) and tensors ``teacher_indices``/``teacher_logprobs`` (S, k).
        ``dataset.truncated_words`` counts the words lost to truncation.
    """
    n = len(sentences)
    for name, seq in (("tags", tags), ("soft", soft), ("group_ids", group_ids), ("teacher", teacher)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} sentences but there are {n} sentences")
    for i, sent in enumerate(sentences):
        for name, seq in (("tags", tags), ("group_ids", group_ids)):
            if seq is not None and seq[i] is not None and len(seq[i]) != len(sent):
                raise ValueError(f"{name}[{i}] has {len(seq[i])} entries for {len(sent)} words")
        if teacher is not None and teacher[i][0].shape[0] != len(sent):
            raise ValueError(f"teacher[{i}] has {teacher[i][0].shape[0]} rows for {len(sent)} words")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tagging needs a fast tokenizer (word_ids() maps subwords to words)")
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    rows, lost = [], 0
    for i, sent in enumerate(sentences):
        row: Dict[str, Any] = {k: enc[k][i] for k in enc.keys()}
        length = len(row["input_ids"])
        labels = [IGNORE_INDEX] * length
        soft_row = [False] * length
        groups = [-1] * length
        firsts = first_subwords(enc.word_ids(i))
        lost += len(sent) - len(firsts)
        on = True if soft is None else bool(soft[i])
        for pos, w in firsts:
            if tags[i] is not None:
                labels[pos] = int(tags[i][w])
            soft_row[pos] = on
            if group_ids is not None:
                groups[pos] = int(group_ids[i][w])
        row["labels"], row["soft_mask"] = labels, soft_row
        if group_ids is not None:
            row["group_ids"] = groups
        if teacher is not None:
            idx, lp = teacher[i]
            t_idx = torch.full((length, idx.shape[1]), -1, dtype=torch.long)
            t_lp = torch.zeros(length, idx.shape[1], dtype=torch.float32)
            if firsts:
                pos = torch.tensor([p for p, _ in firsts])
                words = torch.tensor([w for _, w in firsts])
                t_idx[pos] = idx[words].long()
                t_lp[pos] = lp[words].float()
            row["teacher_indices"], row["teacher_logprobs"] = t_idx, t_lp
        rows.append(row)
    ds = RowDataset(rows)
    ds.truncated_words = lost
    return ds


class TaggingCollator:
    """Pads the token fields with the tokenizer and the per-position targets to the batch length
    (labels -100, soft_mask False, group_ids -1, teacher indices -1 / logprobs 0)."""

    _PADS = {"labels": IGNORE_INDEX, "soft_mask": False, "group_ids": -1}

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: List[Dict[str, Any]]) -> Dict[str, Tensor]:
        extra = ("labels", "soft_mask", "group_ids", "teacher_indices", "teacher_logprobs")
        token_keys = [k for k in rows[0] if k not in extra]
        batch = dict(self.tokenizer.pad([{k: r[k] for k in token_keys} for r in rows], return_tensors="pt"))
        width = batch["input_ids"].shape[1]
        right = self.tokenizer.padding_side == "right"
        for key, pad in self._PADS.items():
            if key in rows[0]:
                dtype = torch.bool if key == "soft_mask" else torch.long
                out = torch.full((len(rows), width), pad, dtype=dtype)
                for b, r in enumerate(rows):
                    vals = torch.tensor(r[key], dtype=dtype)
                    if right:
                        out[b, : len(vals)] = vals
                    else:
                        out[b, width - len(vals):] = vals
                batch[key] = out
        if "teacher_indices" in rows[0]:
            k = rows[0]["teacher_indices"].shape[1]
            idx = torch.full((len(rows), width, k), -1, dtype=torch.long)
            lp = torch.zeros(len(rows), width, k)
            for b, r in enumerate(rows):
                n = r["teacher_indices"].shape[0]
                sl = slice(0, n) if right else slice(width - n, width)
                idx[b, sl], lp[b, sl] = r["teacher_indices"], r["teacher_logprobs"]
            batch["teacher_indices"], batch["teacher_logprobs"] = idx, lp
        return batch


def bio_tables(labels: Sequence[str]) -> Tuple[Tensor, Tensor]:
    """``(transitions (L, L) bool [prev, next], start (L,) bool)`` of the BIO scheme over ``labels``."""
    from vfm.knowledge.tagging import start_mask, transition_mask

    shim = types.SimpleNamespace(task="tagging", labels=list(labels), source="<labels>")
    return transition_mask(shim), start_mask(shim)


def decode_tags(logits: Tensor, transitions: Optional[Tensor] = None, start: Optional[Tensor] = None) -> List[int]:
    """Tag ids of one sentence's word logits ``(T, L)``: constrained Viterbi on the log-probabilities
    when ``transitions`` is given, else the argmax."""
    if transitions is None:
        return logits.argmax(-1).tolist()
    from vfm.knowledge.tagging import viterbi_decode

    return viterbi_decode(torch.log_softmax(logits.double(), -1), transitions, start)


def tagging_metrics(labels: Sequence[str], constrained: bool = True):
    """A ``compute_metrics`` for tagging: entity-level P/R/F1 (:func:`vfm.evaluate.entity_report`).

    Only positions whose label is not -100 (the words' first subwords) are decoded, per sentence,
    with constrained Viterbi under the BIO transitions (``constrained``) or the argmax.

    Returns:
        A function giving ``f1`` / ``precision`` / ``recall`` (entity micro), ``macro_f1`` (entity
        macro) and ``token_accuracy``.
    """
    from vfm.evaluate import entity_report

    names = list(labels)
    trans, start = bio_tables(names) if constrained else (None, None)

    def compute(pred) -> Dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        logits, gold = torch.as_tensor(logits), torch.as_tensor(pred.label_ids)
        gold_tags, pred_tags, right, total = [], [], 0, 0
        for b in range(gold.shape[0]):
            keep = gold[b] != IGNORE_INDEX
            g = gold[b][keep].tolist()
            p = decode_tags(logits[b][keep].float(), trans, start) if g else []
            gold_tags.append([names[i] for i in g])
            pred_tags.append([names[i] for i in p])
            right += sum(int(x == y) for x, y in zip(g, p))
            total += len(g)
        rep = entity_report(gold_tags, pred_tags)
        micro = rep.get("micro", {"precision": 0.0, "recall": 0.0, "f1": 0.0})
        return {"f1": micro["f1"], "precision": micro["precision"], "recall": micro["recall"],
                "macro_f1": rep.get("macro", {}).get("f1", 0.0), "token_accuracy": right / total if total else 0.0}

    return compute


def model_teacher_words(model_dir: str, sentences: Sequence[Sequence[str]], k: int, *, max_length: int = 128,
                        batch_size: int = 32, progress: bool = False):
    """A token-classification teacher's top-k per word (its first subword), over the teacher's tags.

    Args:
        model_dir: a local ``AutoModelForTokenClassification`` directory.
        sentences: B word lists.
        k: entries per word, >= 1 (above the teacher's number of tags T, all T are kept).

    Returns:
        :class:`vfm.teacher.TeacherTopK` with one row per word (all sentences concatenated);
        words cut off by the teacher's truncation get an empty row (indices -1).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from vfm.teacher import TeacherTopK

    if not os.path.isdir(model_dir):
        raise ValueError(f"teacher.model {model_dir!r} is not a directory")
    from vfm.teacher import require_head

    require_head(model_dir, "ForTokenClassification", "a tagging teacher (teacher.model)")
    model = AutoModelForTokenClassification.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    t_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"teacher.top_k must be an int >= 1, got {k!r}")
    k = min(k, len(t_labels))  # a larger k keeps every tag: the whole distribution, nothing lost
    idx_rows, lp_rows = [], []
    with torch.no_grad():
        for s in tqdm(range(0, len(sentences), batch_size), desc="teacher", disable=not progress, leave=False):
            chunk = [list(x) for x in sentences[s:s + batch_size]]
            enc = tok(chunk, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            lp_all = torch.log_softmax(model(**enc).logits.float(), -1)
            for b, sent in enumerate(chunk):
                idx = torch.full((len(sent), k), -1, dtype=torch.long)
                lp = torch.zeros(len(sent), k)
                for pos, w in first_subwords(enc.word_ids(b)):
                    vals, ids = lp_all[b, pos].topk(k)
                    idx[w], lp[w] = ids, vals
                idx_rows.append(idx)
                lp_rows.append(lp)
    if not idx_rows:
        return TeacherTopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), t_labels)
    return TeacherTopK(torch.cat(idx_rows), torch.cat(lp_rows), t_labels, {"model": model_dir})


def with_transitions(masks: Sequence[Tensor], tags: Sequence[Optional[Sequence[int]]], transitions: Tensor,
                     start: Tensor) -> List[Tensor]:
    """Intersect per-word rule masks with the BIO transition constraint.

    A tagged sentence's word t may take the tags allowed after its gold tag t-1 (the first word:
    no ``I-X``); an untagged (pool) sentence only gets the sentence-start constraint on its first
    word.  Where the intersection would be empty, or would exclude the word's gold tag (data that
    is not valid BIO), the word keeps its rule mask alone.

    Args:
        masks: per sentence bool ``(T_i, L)`` (from ``RuleSet.compile_tokens``).
        tags: per sentence T_i gold tag ids, or None.
        transitions, start: from :func:`bio_tables`.

    Returns:
        Per sentence bool ``(T_i, L)``.
    """
    if len(masks) != len(tags):
        raise ValueError(f"masks has {len(masks)} sentences, tags has {len(tags)}")
    table = torch.cat([start[None], transitions], dim=0)  # row 0 = sentence start
    out = []
    for m, g in zip(masks, tags):
        rows = torch.ones_like(m)
        if g is not None:
            if len(g) != m.shape[0]:
                raise ValueError(f"tags of {len(g)} words for a mask of {m.shape[0]} words")
            prev = torch.tensor([-1] + list(g[:-1]), dtype=torch.long)
            rows = table[prev + 1]
        elif m.shape[0]:
            rows[0] = start
        both = m & rows
        ok = both.any(dim=1)
        if g is not None and m.shape[0]:
            ok &= both[torch.arange(m.shape[0]), torch.tensor(list(g), dtype=torch.long)]
        out.append(torch.where(ok[:, None], both, m))
    return out


def split_rows(flat: Tensor, lengths: Sequence[int]) -> List[Tensor]:
    """Cut a ``(sum T_i, ...)`` tensor into per-sentence pieces."""
    return list(torch.split(flat, list(lengths), dim=0))


# ------------------------------------------------------------------------------ data --
def prepare_tagging_data(cfg, labels: Sequence[str], say) -> Tuple[Dict[str, list], List[str]]:
    """Load the tagging splits of ``cfg`` (CoNLL, or JSONL with tokens/tags).

    Training sentences without tags and every sentence of ``data.unlabelled`` form the pool (a
    pool file's tags, if it has any, are ignored: the pool is unlabelled by definition).  Cleaning,
    deduplication and augmentation are text-classification steps and are not applied.  Without an
    eval file, a seeded random ``data.eval_fraction`` of the training sentences is held out.

    Returns:
        ``(splits, notes)`` as :func:`vfm.train.run.prepare_data`.
    """
    from vfm.train.run import _load_split

    notes: List[str] = []
    say("data preparation (tagging; clean/deduplicate/augment apply to classification only):")
    splits = {"train": _load_split(cfg.data.train, cfg, say, notes)}
    for key, path in (("eval", cfg.data.eval), ("test", cfg.data.test), ("pool", cfg.data.unlabelled)):
        splits[key] = _load_split(path, cfg, say, notes) if path else []
    for key, path in (("train", cfg.data.train), ("eval", cfg.data.eval), ("test", cfg.data.test),
                      ("pool", cfg.data.unlabelled)):
        bad = [ex for ex in splits[key] if not ex.tokens]
        if bad:
            raise ValueError(f"{path}: task tagging needs token lists (CoNLL, or JSONL 'tokens'); "
                             f"{len(bad)} rows have none, first at {bad[0].where}")
    moved = [ex for ex in splits["train"] if ex.tags is None]
    if moved:
        splits["train"] = [ex for ex in splits["train"] if ex.tags is not None]
        splits["pool"] = moved + splits["pool"]
        say(f"  {len(moved)} untagged sentences of the training file go to the unlabelled pool")
    for ex in splits["pool"]:
        ex.tags = None
    known = set(labels)
    for key in ("train", "eval", "test"):
        for ex in splits[key]:
            if ex.tags is None:
                raise ValueError(f"{key} sentence at {ex.where} has no tags")
            wrong = sorted(set(ex.tags) - known)
            if wrong:
                raise ValueError(f"{key} sentence at {ex.where} has tags {wrong} that are not among {list(labels)}")
    if not splits["train"]:
        raise ValueError(f"{cfg.data.train}: no tagged training sentences")
    if not splits["eval"]:
        f = cfg.data.eval_fraction
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(cfg.training.seed))
        n_eval = max(1, round(f * len(order))) if len(order) > 1 else 0
        held = set(order[:n_eval].tolist())
        splits["eval"] = [ex for i, ex in enumerate(splits["train"]) if i in held]
        splits["train"] = [ex for i, ex in enumerate(splits["train"]) if i not in held]
        say(f"  no eval file: random split -> train {len(splits['train'])}, eval {len(splits['eval'])} sentences")
    say("  sentences: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return splits, notes


def build_tagging_datasets(cfg, rules, labels: Sequence[str], tok, splits: Dict[str, list], say, is_main: bool):
    """Rules, teacher and per-token rows of every split.

    Returns:
        ``(datasets {"train", "eval", "test"} (None when empty), group_masks or None, rule report text or None)``.
    """
    l2i = {n: i for i, n in enumerate(labels)}
    fit = splits["train"] + splits["pool"]
    order = [("train", fit), ("eval", splits["eval"]), ("test", splits["test"])]
    sentences = [ex.tokens for _, items in order for ex in items]
    lengths = [len(s) for s in sentences]
    groups_per = group_masks = report_text = None
    if rules is not None:
        masks = rules.compile_tokens(sentences)
        if cfg.loss.transitions:
            tag_ids = [[l2i[t] for t in ex.tags] if ex.tags is not None else None for _, items in order for ex in items]
            dense = with_transitions(list(masks), tag_ids, *bio_tables(labels))
        else:
            dense = list(masks)
        from vfm.knowledge.compile import group_rows

        flat = torch.cat(dense) if dense else torch.zeros(0, len(labels), dtype=torch.bool)
        group_masks, flat_ids = group_rows(flat, ~flat.all(dim=1))
        groups_per = [g.tolist() for g in split_rows(flat_ids, lengths)]
        from vfm.knowledge.tagging import token_report

        train_tok = [ex.tokens for ex in splits["train"]]
        report_text = "rules on the labelled training sentences:\n" + str(
            token_report(rules, train_tok, [ex.tags for ex in splits["train"]]))
        if splits["pool"]:
            report_text += "\n\nrules on the unlabelled pool:\n" + str(
                token_report(rules, [ex.tokens for ex in splits["pool"]]))
        say(report_text)
    teacher_per = None
    if cfg.teacher is not None:
        from vfm.teacher import map_teacher_labels

        t = cfg.teacher
        topk = model_teacher_words(t.model, sentences, t.top_k, max_length=cfg.data.max_length,
                                   batch_size=t.batch_size, progress=cfg.training.progress and is_main)
        topk = map_teacher_labels(topk, labels, t.label_map)
        teacher_per = list(zip(split_rows(topk.indices, lengths), split_rows(topk.logprobs, lengths)))
        top1 = topk.top1()
        gold = torch.tensor([l2i[tg] for ex in splits["train"] for tg in ex.tags], dtype=torch.long)
        acc = float((top1[: len(gold)] == gold).float().mean()) if len(gold) else float("nan")
        say(f"teacher ({os.path.basename(os.path.normpath(t.model))}): top-{topk.indices.shape[1]} per word for "
            f"{len(sentences)} sentences; word accuracy on the labelled training sentences {acc:.3f}")
    out: Dict[str, Any] = {}
    start = 0
    lost = 0
    for key, items in order:
        n = len(items)
        sl = slice(start, start + n)
        start += n
        if not n:
            out[key] = None
            continue
        ds = encode_tagging_rows(
            tok, [ex.tokens for ex in items], [[l2i[t] for t in ex.tags] if ex.tags is not None else None
                                               for ex in items],
            max_length=cfg.data.max_length, group_ids=groups_per[sl] if groups_per is not None else None,
            teacher=teacher_per[sl] if teacher_per is not None else None)
        lost += ds.truncated_words
        out[key] = ds
    if lost:
        say(f"  {lost} words lost to truncation at data.max_length={cfg.data.max_length} (they carry no loss and "
            "are not scored by the per-epoch metrics)")
    return out, group_masks, report_text
