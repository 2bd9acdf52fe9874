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
import tempfile
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
        pred: per sentence, the predicted BIO tags (same lengths).

    Returns:
        type -> {"precision", "recall", "f1", "support"} plus "micro", "macro" and "weighted" rows.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences, pred has {len(pred)}")
    counts: Dict[str, List[int]] = {}
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags, pred has {len(p)}")
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
def _atomic_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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
