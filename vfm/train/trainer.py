"""Transformers ``Trainer`` wiring for knowledge cross-entropy: dataset rows, collator, the Trainer
subclass whose ``compute_loss`` calls :func:`vfm.functional.knowledge_cross_entropy`, callbacks.

Each training row carries, besides the tokens:

* ``labels`` - the class id, or ``ignore_index`` (-100) for unlabelled pool rows;
* ``soft_mask`` - whether distillation, the rule penalty and the z-loss act on the row (True for
  every labelled and pool row by default);
* ``teacher_indices`` / ``teacher_logprobs`` (k,) - the teacher's top-k in the student's labels
  (-1 = padding), when a teacher is used;
* ``group_ids`` - the row's allowed-label group (-1 = no rule fired); the groups' masks
  (G, L) live in the trainer (``group_masks``) and are the same on every process.

Loss normalisation: the Trainer counts the rows that count for any term (labelled or soft) over
the whole accumulated batch and across processes and passes it as ``num_items_in_batch``, which
``knowledge_cross_entropy`` uses as every term's denominator.  The loss is therefore the mean of
the per-row losses L_i over those rows, identical for any gradient-accumulation / process split.
With plain labelled data (no pool) this is exactly each term's own mean.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback

from vfm.evaluate import _atomic_bytes, classification_report
from vfm.functional import knowledge_cross_entropy

logger = logging.getLogger("vfm.train")

IGNORE_INDEX = -100
EXTRA_KEYS = ("soft_mask", "teacher_indices", "teacher_logprobs", "group_ids")


class RowDataset(torch.utils.data.Dataset):
    """A list of feature dicts (one per row), as built by :func:`encode_rows`."""

    def __init__(self, rows: List[Dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.rows[i]


def encode_rows(tokenizer, texts: Sequence[str], labels: Sequence[int], *, max_length: int = 128,
                soft_mask: Optional[Sequence[bool]] = None, teacher_indices: Optional[Tensor] = None,
                teacher_logprobs: Optional[Tensor] = None, group_ids: Optional[Sequence[int]] = None) -> RowDataset:
    """Tokenize rows and attach their training targets.

    Args:
        tokenizer: a Transformers tokenizer.
        texts: N texts.
        labels: N class ids, or -100 for unlabelled rows.
        max_length: tokens kept per text (truncation).
        soft_mask: N bools (default: every row True).
        teacher_indices, teacher_logprobs: (N, k) teacher top-k in the student's label space.
        group_ids: N allowed-label group ids (-1 = unconstrained).

    Returns:
        A :class:`RowDataset`.
    """
    n = len(texts)
    for name, seq in (("labels", labels), ("soft_mask", soft_mask), ("group_ids", group_ids),
                      ("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} rows but there are {n} texts")
    if (teacher_indices is None) != (teacher_logprobs is None):
        raise ValueError("give both teacher_indices and teacher_logprobs, or neither")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = []
    for i in range(n):
        row = {k: enc[k][i] for k in enc.keys()}
        row["labels"] = int(labels[i])
        row["soft_mask"] = True if soft_mask is None else bool(soft_mask[i])
        if teacher_indices is not None:
            row["teacher_indices"] = teacher_indices[i].long()
            row["teacher_logprobs"] = teacher_logprobs[i].float()
        if group_ids is not None:
            row["group_ids"] = int(group_ids[i])
        rows.append(row)
    return RowDataset(rows)


class KnowledgeCollator:
    """Pads the token fields with the tokenizer and stacks the per-row targets."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: List[Dict[str, Any]]) -> Dict[str, Tensor]:
        token_keys = [k for k in rows[0] if k not in ("labels",) + EXTRA_KEYS]
        batch = self.tokenizer.pad([{k: r[k] for k in token_keys} for r in rows], return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        batch["soft_mask"] = torch.tensor([r["soft_mask"] for r in rows], dtype=torch.bool)
        if "teacher_indices" in rows[0]:
            batch["teacher_indices"] = torch.stack([r["teacher_indices"] for r in rows])
            batch["teacher_logprobs"] = torch.stack([r["teacher_logprobs"] for r in rows])
        if "group_ids" in rows[0]:
            batch["group_ids"] = torch.tensor([r["group_ids"] for r in rows], dtype=torch.long)
        return batch


class KnowledgeTrainer(Trainer):
    """``Trainer`` whose loss is :func:`vfm.functional.knowledge_cross_entropy`.

    Args:
        loss_options: keyword options of ``knowledge_cross_entropy`` (``ce_weight``, ``kd_weight``,
            ``temperature``, ``penalty_weight``, ``penalty``, ``rule_strength``,
            ``label_smoothing``, ``z_loss``, ``kd``).  The teacher and rule tensors come from the batch.
        group_masks: (G, L) bool allowed-label masks indexed by the rows' ``group_ids``.
        *args, **kwargs: as ``transformers.Trainer`` (give ``data_collator=KnowledgeCollator(tok)``
            and ``remove_unused_columns=False`` in the arguments).
    """

    def __init__(self, *args, loss_options: Optional[Dict[str, Any]] = None,
                 group_masks: Optional[Tensor] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("KnowledgeTrainer needs TrainingArguments(remove_unused_columns=False): the teacher "
                             "and rule columns are not model inputs")
        self.loss_options = dict(loss_options or {})
        if group_masks is not None and (group_masks.dtype != torch.bool or group_masks.dim() != 2):
            raise ValueError(f"group_masks must be bool (G, L), got {group_masks.dtype} {tuple(group_masks.shape)}")
        self.group_masks = group_masks
        # the Trainer then counts rows over the accumulated batch (see _get_num_items_in_batch) and
        # treats the loss as already normalised for gradient accumulation
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Rows that count for any term (labelled or soft), summed over the micro-batches and processes."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(((b["labels"] != IGNORE_INDEX) | b["soft_mask"]).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def knowledge_loss(self, logits: Tensor, batch: Dict[str, Tensor], num_items_in_batch=None) -> Tensor:
        """The loss of one batch from the student's logits (N, L) and the batch's target fields."""
        opts = dict(self.loss_options)
        kd_on = opts.get("kd_weight", 0.0) > 0
        pen_on = opts.get("penalty_weight", 0.0) > 0
        kwargs: Dict[str, Any] = {}
        if kd_on:
            if "teacher_indices" not in batch:
                raise ValueError("kd_weight > 0 but the batch has no teacher_indices/teacher_logprobs")
            kwargs["teacher_topk"] = (batch["teacher_indices"], batch["teacher_logprobs"])
        else:
            for key in ("kd", "temperature"):
                opts.pop(key, None)
        if pen_on:
            if self.group_masks is None or "group_ids" not in batch:
                raise ValueError("penalty_weight > 0 but there are no rule groups (group_masks / group_ids)")
            kwargs["allowed"] = (self.group_masks.to(logits.device), batch["group_ids"])
        else:
            opts.pop("penalty", None)
            opts.pop("rule_strength", None)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return knowledge_cross_entropy(logits, batch["labels"], soft_mask=batch["soft_mask"], **opts, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        batch = {k: inputs.pop(k) for k in ("labels",) + EXTRA_KEYS if k in inputs}
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = self.knowledge_loss(logits, batch, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, outputs) if return_outputs else loss


def classification_metrics(labels: Sequence[str]):
    """A ``compute_metrics`` for the Trainer: accuracy and micro/macro/weighted P/R/F1 (vfm.evaluate)."""

    def compute(pred) -> Dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        gold = pred.label_ids
        keep = gold != IGNORE_INDEX
        return classification_report(gold[keep], logits.argmax(-1)[keep], labels).flat()

    return compute


class MetricsCSVCallback(TrainerCallback):
    """Writes every log record (losses, learning rate, evaluation metrics) to a CSV file, on process 0.

    The file is rewritten atomically at each log with the union of the columns seen so far.  A run
    resumed from a checkpoint starts from the checkpoint's log history, so the file keeps the rows
    logged before the interruption.
    """

    def __init__(self, path: str):
        self.path = path
        self.records: List[Dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and not self.records:  # resumed: the rows up to the checkpoint
            self.records = [dict({"step": h.get("step"), "epoch": h.get("epoch")},
                                 **{k: v for k, v in h.items() if k not in ("step", "epoch")})
                            for h in state.log_history]
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        self.records.append(dict({"step": state.global_step, "epoch": state.epoch}, **logs))
        columns: List[str] = []
        for rec in self.records:
            columns += [k for k in rec if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.records)
        _atomic_bytes(self.path, buf.getvalue().encode("utf-8"))
        return control


class EpochPrinter(TrainerCallback):
    """Prints one line per evaluation (epoch, loss and the main metrics), on process 0.

    Args:
        name: tag printed at the start of each line.
        keys: the metrics printed.
        quiet: print nothing (``vfm.train.train(quiet=True)``).
    """

    def __init__(self, name: str = "", keys: Sequence[str] = ("eval_loss", "eval_accuracy", "eval_macro_f1"),
                 quiet: bool = False):
        self.name = name
        self.keys = keys
        self.quiet = quiet
        self.final = False  # set after training: the next evaluation is the best model's

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and not self.quiet:
            train_loss = next((r["loss"] for r in reversed(state.log_history) if "loss" in r), None)
            parts = [f"epoch {state.epoch:.0f}" if state.epoch is not None else "eval"]
            if self.final:
                parts = [f"best checkpoint ({os.path.basename(state.best_model_checkpoint or '') or 'last'})"]
            elif train_loss is not None:
                parts.append(f"train_loss {train_loss:.4f}")
            parts += [f"{k[5:]} {metrics[k]:.4f}" for k in self.keys if k in metrics]
            print(f"  [{self.name}] " + "  ".join(parts) if self.name else "  " + "  ".join(parts), flush=True)
        return control


def tensorboard_callback(log_dir: str):
    """A TensorBoard callback writing to ``log_dir``, or ``(None, reason)`` when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except Exception as exc:  # noqa: BLE001 - tensorboard not installed or broken
        return None, f"TensorBoard is not importable ({exc.__class__.__name__}: {exc}); metrics go to CSV only"
    del SummaryWriter
    callback = TensorBoardCallback()
    callback.logging_dir = log_dir  # also used when it reopens its writer (evaluate() after train())
    return callback, None


def last_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-<step>`` folder in ``output_dir`` (None if there is none)."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[11:].isdigit() and \
                os.path.exists(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append(int(name[11:]))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def checkpoint_labels(checkpoint: str) -> Optional[List[str]]:
    """The label names (``config.json``'s ``id2label``) a checkpoint was trained on; None when it has no
    ``config.json`` (a PEFT adapter checkpoint)."""
    import json

    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        id2label = json.load(fh).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] or None


def write_folder_atomically(folder: str, write) -> None:
    """Fill a fresh folder with ``write(tmp_folder)``, then swap it in for ``folder``.

    An exception (or a kill) during ``write`` leaves ``folder`` as it was: never half-written.

    Args:
        folder: the destination (replaced when it exists).
        write: called with the temporary folder (same parent, so the renames are atomic).
    """
    import shutil
    import tempfile

    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    old = None
    try:
        write(tmp)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0o700
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".{name}-old-", dir=parent)
            os.replace(folder, os.path.join(old, name))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(folder):
            os.replace(os.path.join(old, name), folder)  # put the previous one back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# names training.metric may take (the evaluation's metrics, "eval_" prefix optional)
METRICS = {"classification": ["loss", "accuracy"] + [f"{avg}_{m}" for avg in ("micro", "macro", "weighted")
                                                     for m in ("precision", "recall", "f1")],
           "tagging": ["loss", "f1", "precision", "recall", "macro_f1", "token_accuracy"]}


def check_before_training(cfg, task: str, labels: Sequence[str], resume: Optional[str]) -> None:
    """ValueErrors that would otherwise come after data preparation (or an epoch) of ``vfm train``:
    a ``training.metric`` the task does not produce (a KeyError after the first evaluation), and a
    checkpoint to resume from that was trained on other labels (a state-dict RuntimeError).

    Args:
        cfg: the :class:`vfm.train.config.Config`.
        task: "classification" or "tagging".
        labels: the run's label names.
        resume: the checkpoint the run would resume from (None: a fresh run).
    """
    metric = cfg.training.metric
    if metric is not None and metric.removeprefix("eval_") not in METRICS[task]:
        raise ValueError(f"{cfg.source}: training.metric {metric!r} is not a {task} metric; one of {METRICS[task]}")
    old = checkpoint_labels(resume) if resume else None
    if old and old != list(labels):
        raise ValueError(f"{cfg.source}: training.resume={cfg.training.resume!r} would continue {resume}, trained on "
                         f"the labels {old}, but this config has {list(labels)}; use another training.output_dir "
                         "(or training.resume: false)")
