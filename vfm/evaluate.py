"""Evaluation: per-label precision/recall/F1 with micro, macro and weighted averages, entity-level
scores for BIO tagging, a confusion-matrix PNG, and ``vfm eval`` (a saved model on a labelled file).

Conventions (as scikit-learn's ``precision_recall_fscore_support`` with ``zero_division=0``): a
label never predicted has precision 0, a label absent from the gold data has recall 0, and F1 is 0
when precision + recall is 0.  Averages are over the labels given (all of them, including labels
with no gold row): macro = unweighted mean, weighted = mean weighted by gold support, micro = from
the pooled counts (equal to accuracy for single-label classification over all labels).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np


@dataclass
class ClassificationReport:
    """Scores of a single-label classifier.

    Attributes:
        labels: label names (index = class id).
        per_label: label -> {"precision", "recall", "f1", "support"}.
        averages: "micro" / "macro" / "weighted" -> {"precision", "recall", "f1"}.
        accuracy: fraction of rows predicted right.
        confusion: (L, L) counts, rows = gold, columns = predicted.
    """

    labels: List[str]
    per_label: Dict[str, Dict[str, float]]
    averages: Dict[str, Dict[str, float]]
    accuracy: float
    confusion: np.ndarray = field(repr=False)

    def to_dict(self) -> Dict[str, object]:
        return {"accuracy": self.accuracy, "per_label": self.per_label, "averages": self.averages,
                "labels": self.labels, "confusion": self.confusion.tolist()}

    def flat(self) -> Dict[str, float]:
        """``accuracy``, ``micro_f1``, ``macro_f1``, ``weighted_f1``, ``macro_precision`` ... in one dict."""
        out = {"accuracy": self.accuracy}
        for avg, vals in self.averages.items():
            for k, v in vals.items():
                out[f"{avg}_{k}"] = v
        return out

    def __str__(self) -> str:
        width = max([len(n) for n in self.labels] + [12])
        lines = [f"{'label':<{width}}  precision  recall     f1  support"]
        for name in self.labels:
            s = self.per_label[name]
            lines.append(f"{name:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  "
                         f"{int(s['support']):7d}")
        total = int(self.confusion.sum())
        for avg in ("micro", "macro", "weighted"):
            s = self.averages[avg]
            lines.append(f"{avg + ' avg':<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  "
                         f"{total:7d}")
        lines.append(f"{'accuracy':<{width}}  {self.accuracy:.3f}")
        return "\n".join(lines)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)
    return p.astype(float), r.astype(float), f.astype(float)


def _averages(tp, fp, fn, support) -> Dict[str, Dict[str, float]]:
    p, r, f = _prf(tp, fp, fn)
    mp, mr, mf = _prf(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))
    total = support.sum()
    w = support / total if total > 0 else np.zeros_like(support, dtype=float)
    return {
        "micro": {"precision": float(mp[0]), "recall": float(mr[0]), "f1": float(mf[0])},
        "macro": {"precision": float(p.mean()) if len(p) else 0.0, "recall": float(r.mean()) if len(r) else 0.0,
                  "f1": float(f.mean()) if len(f) else 0.0},
        "weighted": {"precision": float((p * w).sum()), "recall": float((r * w).sum()), "f1": float((f * w).sum())},
    }


def classification_report(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Score single-label predictions.

    Args:
        gold: (N,) gold class ids in [0, L).
        pred: (N,) predicted class ids in [0, L).
        labels: the L label names.

    Returns:
        A :class:`ClassificationReport`.
    """
    gold_a = np.asarray(list(gold), dtype=np.int64)
    pred_a = np.asarray(list(pred), dtype=np.int64)
    n_labels = len(labels)
    if gold_a.shape != pred_a.shape or gold_a.ndim != 1:
        raise ValueError(f"gold {gold_a.shape} and pred {pred_a.shape} must be 1-D of the same length")
    for name, arr in (("gold", gold_a), ("pred", pred_a)):
        bad = arr[(arr < 0) | (arr >= n_labels)]
        if bad.size:
            raise ValueError(f"{name} holds ids outside [0, {n_labels}): {sorted(set(bad.tolist()))[:8]}")
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(confusion, (gold_a, pred_a), 1)
    tp = np.diag(confusion).astype(float)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    support = confusion.sum(1).astype(float)
    p, r, f = _prf(tp, fp, fn)
    per = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
           for i, name in enumerate(labels)}
    acc = float(tp.sum() / len(gold_a)) if len(gold_a) else 0.0
    return ClassificationReport(list(labels), per, _averages(tp, fp, fn, support), acc, confusion)


# ----------------------------------------------------------------------------- BIO ---
def bio_spans(tags: Sequence[str]) -> Set[Tuple[str, int, int]]:
    """Entity spans of a BIO tag sequence as ``(type, start, end_exclusive)``.

    An ``I-X`` that does not continue an entity of type X starts a new entity (the lenient
    CoNLL convention used by seqeval's default mode); ``O`` and anything else end an entity.
    """
    spans = set()
    etype, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-")
        if prefix == "I" and etype == typ:
            continue
        if etype is not None:
            spans.add((etype, start, i))
            etype = None
        if prefix in ("B", "I") and typ:
            etype, start = typ, i
    return spans


def entity_report(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> Dict[str, Dict[str, float]]:
    """Entity-level precision/recall/F1 (a predicted entity counts when its span and type match exactly).

    Args:
        gold: per sentence, the gold BIO tags.
        pred: per sentence, the predicted BIO tags (same lengths).  Any other tag (BIOES ``E-X`` /
            ``S-X``, a typo such as ``0``) is a ValueError, not silently read as ``O``.

    Returns:
        type -> {"precision", "recall", "f1", "support"} plus "micro", "macro" and "weighted" rows.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences, pred has {len(pred)}")
    counts: Dict[str, List[int]] = {}
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags, pred has {len(p)}")
        for name, seq in (("gold", g), ("pred", p)):
            bad = [t for t in seq if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
            if bad:  # BIOES (E-/S-) or other tags would silently drop entities from the scores
                raise ValueError(f"sentence {i}: {name} tag {bad[0]!r} is not BIO (O, B-X or I-X)")
        gs, ps = bio_spans(g), bio_spans(p)
        for typ in {s[0] for s in gs | ps}:
            c = counts.setdefault(typ, [0, 0, 0])  # tp, fp, fn
            gt = {s for s in gs if s[0] == typ}
            pt = {s for s in ps if s[0] == typ}
            c[0] += len(gt & pt)
            c[1] += len(pt - gt)
            c[2] += len(gt - pt)
    types = sorted(counts)
    tp = np.array([counts[t][0] for t in types], dtype=float)
    fp = np.array([counts[t][1] for t in types], dtype=float)
    fn = np.array([counts[t][2] for t in types], dtype=float)
    support = tp + fn
    p, r, f = _prf(tp, fp, fn)
    out: Dict[str, Dict[str, float]] = {t: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                            "support": int(support[i])} for i, t in enumerate(types)}
    out.update(_averages(tp, fp, fn, support))
    return out


# ----------------------------------------------------------------------------- files ---
def _temp_name(folder: str, prefix: str, suffix: str = ".tmp") -> str:
    """A fresh hidden file name in ``folder`` (the file is not created)."""
    return os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(8)}{suffix}")


def _atomic_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    The file gets the usual permissions (0o666 less the umask), not ``mkstemp``'s owner-only 0o600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(folder, ".tmp-")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Write a CSV file atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(list(header))
    writer.writerows(rows)
    _atomic_bytes(path, buf.getvalue().encode("utf-8"))


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: str, title: str = "confusion matrix") -> str:
    """Save a confusion-matrix heat map as PNG (matplotlib, Agg backend).

    Args:
        confusion: (L, L) counts, rows = gold, columns = predicted.
        labels: the L label names.
        path: output .png file (written atomically).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = len(labels)
    fig = Figure(figsize=(1.0 + 0.7 * n, 1.0 + 0.6 * n))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = confusion.max() if confusion.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center",
                    color="white" if top and confusion[i, j] > top / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_bytes(path, buf.getvalue())
    return path


def save_classification_outputs(report: ClassificationReport, out_dir: str, *, prefix: str = "",
                                extra: Optional[Dict[str, object]] = None) -> Dict[str, str]:
    """Write ``{prefix}metrics.json``, ``{prefix}report.txt`` and ``{prefix}confusion_matrix.png`` into ``out_dir``."""
    paths = {"metrics": os.path.join(out_dir, f"{prefix}metrics.json"),
             "report": os.path.join(out_dir, f"{prefix}report.txt"),
             "confusion": os.path.join(out_dir, f"{prefix}confusion_matrix.png")}
    write_json(paths["metrics"], dict(report.to_dict(), **(extra or {})))
    _atomic_bytes(paths["report"], (str(report) + "\n").encode("utf-8"))
    plot_confusion(report.confusion, report.labels, paths["confusion"])
    return paths


# ------------------------------------------------------------------------- vfm eval ---
def _load_for_eval(model_dir: str, tagging: bool):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a directory")
    config_file = os.path.join(model_dir, "config.json")
    if os.path.isfile(config_file):  # a token classifier on sentence labels (or the reverse) got a random head
        with open(config_file, encoding="utf-8") as fh:
            arch = " ".join(json.load(fh).get("architectures") or [])
        wrong = "ForSequenceClassification" if tagging else "ForTokenClassification"
        if wrong in arch:
            raise ValueError(f"--model {model_dir!r} is a {arch} but --data holds "
                             f"{'BIO-tagged sentences' if tagging else 'sentence labels'}")
    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):  # a PEFT adapter folder
        from peft import AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification

        cls = AutoPeftModelForTokenClassification if tagging else AutoPeftModelForSequenceClassification
    else:
        cls = AutoModelForTokenClassification if tagging else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    config = model.config if hasattr(model, "config") else model.base_model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return model, tok, labels


def _predict_classes(model, tok, texts, batch_size, max_length, progress):
    import torch
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for s in tqdm(range(0, len(texts), batch_size), desc="predict", disable=not progress, leave=False):
            enc = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out.append(model(**enc).logits.float())
    return torch.cat(out) if out else torch.zeros(0, 0)


def _predict_tags(model, tok, sentences, labels, max_length, progress, word_logits=None):
    import torch
    from tqdm.auto import tqdm

    preds = []
    with torch.no_grad():
        for tokens in tqdm(sentences, desc="predict", disable=not progress, leave=False):
            enc = tok(list(tokens), is_split_into_words=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            logits = model(**enc).logits[0]
            ids = logits.argmax(-1).tolist()
            words = enc.word_ids(0)
            tags = ["O"] * len(tokens)  # words cut off by truncation are predicted O (counted as misses)
            seen = set()
            firsts, kept = [], []
            for pos, w in enumerate(words):
                if w is not None and w not in seen:
                    seen.add(w)
                    tags[w] = labels[ids[pos]]
                    firsts.append(pos)
                    kept.append(w)
            preds.append(tags)
            if word_logits is not None:
                # (the words that have a subword, (n, L) logits of their first subwords): a word the
                # tokenizer drops (a zero-width or control character) is missing, not only cut-off ones
                word_logits.append((kept, logits[firsts].float()))
    return preds


def _rules_tags(rules_path: str, labels, examples, word_logits) -> List[List[str]]:
    """Per sentence, the tags of constrained Viterbi decoding (transitions, start, token-rule masks)
    over the words' first-subword logits; words without a subword (lost to truncation, or dropped by
    the tokenizer) are O and left out of the decoded sequence.  Returns ``(tags, number
    of sentences whose token rules allowed no valid path and were decoded under the transitions only)``."""
    import torch

    from vfm.knowledge import load_rules
    from vfm.knowledge.tagging import viterbi_decode

    rules = load_rules(rules_path)
    if rules.task != "tagging" or list(rules.labels) != list(labels):
        raise ValueError(f"{rules_path}: a tagging rule file with the model's tags {labels} is needed "
                         f"(got task {rules.task!r}, tags {rules.labels})")
    masks = rules.compile_tokens([ex.tokens for ex in examples])
    trans, start = rules.transition_mask(), rules.start_mask()
    out, fallback = [], 0
    for ex, mask, (kept, lg) in zip(examples, masks, word_logits):
        em = torch.log_softmax(lg.double(), -1)
        try:
            path = viterbi_decode(em, trans, start, mask[kept]) if kept else []
        except ValueError:  # the token rules contradict the transitions: decode under the transitions only
            fallback += 1
            path = viterbi_decode(em, trans, start)
        tags = ["O"] * len(ex.tokens)
        for w, t in zip(kept, path):
            tags[w] = labels[t]
        out.append(tags)
    return out, fallback


def _trained_on_clean_text(model_dir: str) -> bool:
    """Whether ``vfm train`` cleaned the texts this model was trained on (its ``vfm_preprocessing.json``)."""
    path = os.path.join(model_dir, "vfm_preprocessing.json")
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh).get("clean")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a JSON object with a boolean 'clean' ({err})") from None
    if not isinstance(value, bool):
        raise ValueError(f"{path}: 'clean' must be true or false, got {value!r}")
    return value


def evaluate_model(model_dir: str, data_path: str, out_dir: str, *, rules_path: Optional[str] = None,
                   text_field: str = "text", label_field: str = "label", batch_size: int = 64,
                   max_length: int = 128, progress: bool = True, quiet: bool = False,
                   clean: Optional[bool] = None) -> Dict[str, object]:
    """``vfm eval``: score a saved model on a labelled file and write the reports.

    Classification files (CSV/JSONL with a label): per-label P/R/F1, averages, accuracy, a
    confusion-matrix PNG and ``predictions.csv``; with ``rules_path``, also the scores when each
    prediction is restricted to the labels its text's rules allow (``rules_*`` files).  Tagging
    files (CoNLL or JSONL tokens/tags): entity-level scores (exact span and type), predicting one
    tag per word from its first sub-token; with a tagging ``rules_path``, also the scores of
    constrained Viterbi decoding (valid BIO transitions and the token rules' allowed tags) under
    ``"model+rules"``.

    Args:
        model_dir: a saved model (``vfm train``'s ``final/``, any Transformers classifier, or a
            PEFT adapter folder).
        data_path: the labelled file (read with :func:`vfm.data.load_examples`).
        out_dir: where the reports go.
        rules_path: optional rule file (classification, or tagging for CoNLL data).
        clean: run :func:`vfm.data.clean` on the file's texts first (rows it leaves empty are
            dropped and reported).  None (default): as the model was trained, read from the
            ``vfm_preprocessing.json`` that ``vfm train`` writes into ``final/`` (no cleaning for a
            model without one), so that the scores match the run's ``test_metrics.json``.

    Returns:
        The metrics dict that is also written to ``metrics.json``.
    """
    from vfm.data import load_examples

    examples, load_report = load_examples(data_path, text_field=text_field, label_field=label_field)
    if not quiet:
        print(load_report)
    if not examples:
        raise ValueError(f"{data_path}: no examples to evaluate (loaded 0 rows, {len(load_report.malformed)} "
                         "malformed)")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if clean is None:
        clean = _trained_on_clean_text(model_dir)
        why = "as the model was trained"
    else:
        why = "as asked"
    if clean:
        from vfm.data import clean as clean_examples

        examples, clean_report = clean_examples(examples)
        if not quiet:
            print(f"texts cleaned {why}: {clean_report.summary()}")
        if not examples:
            raise ValueError(f"{data_path}: no examples left after cleaning")
    tagging = any(ex.tags for ex in examples)
    model, tok, labels = _load_for_eval(model_dir, tagging)
    from vfm.train.model import fit_max_length

    max_length, note = fit_max_length(max_length, {"--model": model_dir}, "--max-length")
    if note and not quiet:  # a longer input would fail with a tensor-size RuntimeError
        print(note)
    os.makedirs(out_dir, exist_ok=True)
    if tagging:
        gold = [ex.tags for ex in examples]
        word_logits = [] if rules_path else None
        pred = _predict_tags(model, tok, [ex.tokens for ex in examples], labels, max_length, progress, word_logits)
        scores = entity_report(gold, pred)
        result_t: Dict[str, object] = {"entity": scores, "sentences": len(examples)}
        if rules_path:  # constrained Viterbi: valid BIO transitions and the token rules' allowed tags
            ruled, result_t["rules_fallback_sentences"] = _rules_tags(rules_path, labels, examples, word_logits)
            result_t["model+rules"] = entity_report(gold, ruled)
        write_json(os.path.join(out_dir, "metrics.json"), result_t)
        lines = [f"{'entity':<14} precision  recall     f1  support"]
        lines += [f"{k:<14} {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v.get('support', '')}"
                  for k, v in scores.items()]
        if rules_path:
            lines.append("with the rules (constrained Viterbi: BIO transitions + token rules): entity micro F1 "
                         f"{result_t['model+rules'].get('micro', {}).get('f1', 0.0):.3f}")
        _atomic_bytes(os.path.join(out_dir, "report.txt"), ("\n".join(lines) + "\n").encode("utf-8"))
        if not quiet:
            print("\n".join(lines))
        return {k: v for k, v in result_t.items() if k in ("entity", "model+rules")}
    index = {name: i for i, name in enumerate(labels)}
    bad = [ex for ex in examples if ex.label not in index]
    if bad:
        raise ValueError(f"{data_path}: rows whose label the model does not have ({labels}): "
                         + ", ".join(f"{ex.where} ({ex.label!r})" for ex in bad[:5]))
    texts = [ex.text for ex in examples]
    gold_ids = [index[ex.label] for ex in examples]
    logits = _predict_classes(model, tok, texts, batch_size, max_length, progress)
    pred_ids = logits.argmax(-1).tolist()
    report = classification_report(gold_ids, pred_ids, labels)
    result: Dict[str, object] = {"model": report.flat()}
    save_classification_outputs(report, out_dir)
    rows = [[ex.where, ex.text, ex.label, labels[p]] for ex, p in zip(examples, pred_ids)]
    header = ["where", "text", "gold", "predicted"]
    if rules_path:
        from vfm.knowledge import load_rules

        rules = load_rules(rules_path)
        if list(rules.labels) != labels:
            raise ValueError(f"{rules_path}: labels {rules.labels} differ from the model's {labels}")
        allowed = rules.compile(texts).allowed
        constrained = logits.masked_fill(~allowed, float("-inf")).argmax(-1).tolist()
        rule_report = classification_report(gold_ids, constrained, labels)
        save_classification_outputs(rule_report, out_dir, prefix="rules_")
        result["model+rules"] = rule_report.flat()
        header.append("predicted_with_rules")
        rows = [r + [labels[c]] for r, c in zip(rows, constrained)]
    write_csv(os.path.join(out_dir, "predictions.csv"), header, rows)
    if not quiet:
        print(report)
        if rules_path:
            print("\nwith the rules restricting each prediction to its allowed labels:")
            print(rule_report)
        print(f"\nwritten to {out_dir}: metrics.json, report.txt, confusion_matrix.png, predictions.csv")
    return result
