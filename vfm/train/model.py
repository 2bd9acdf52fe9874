"""Student model: load a local encoder with a new classification head, then PEFT or top-layer tuning.

* :func:`load_student` - ``AutoModelForSequenceClassification`` from a local directory with
  ``num_labels`` / ``id2label`` set; a head the checkpoint lacks is initialised randomly.
* :func:`freeze_bottom_layers` - top-layer tuning: the embeddings and the bottom ``n`` blocks of
  the encoder stack are frozen, the rest (upper blocks, pooler, head) trains.
* :func:`apply_peft` - LoRA / AdaLoRA through PEFT, then run on vfm's fused ops by
  :func:`vfm.peft.accelerate`; any other PEFT method (IA3, prefix tuning, prompt tuning, LoHa,
  ...) is built with ``peft.get_peft_config`` and left to PEFT.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

logger = logging.getLogger("vfm.train")

_LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")
_EMBEDDING_NAMES = ("embeddings", "embed_tokens", "wte", "wpe", "word_embeddings", "embed_positions")


def load_student(model_dir: str, labels: Sequence[str], task: str = "classification"):
    """Load a sequence classifier (or token classifier) over ``labels`` from a local directory
    (nothing is downloaded).

    Args:
        model_dir: a Transformers directory (an encoder checkpoint or a classifier).
        labels: the label names (index = class id); the BIO tags for ``task="tagging"``.
        task: "classification" (``AutoModelForSequenceClassification``) or "tagging"
            (``AutoModelForTokenClassification``).

    Returns:
        The model.
    """
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    if task not in ("classification", "tagging"):
        raise ValueError(f"task must be 'classification' or 'tagging', got {task!r}")
    labels = list(labels)
    cls = AutoModelForTokenClassification if task == "tagging" else AutoModelForSequenceClassification
    # a classifier checkpoint with another number of labels/tags gets a new head (Transformers logs
    # it) instead of failing to load
    return cls.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, local_files_only=True, ignore_mismatched_sizes=True)


def _layer_stack(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in _LAYER_LIST_NAMES and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no encoder layer list (a ModuleList named one of "
                         f"{_LAYER_LIST_NAMES}) to freeze")
    return best


def freeze_bottom_layers(model: nn.Module, n: int) -> List[str]:
    """Freeze the embeddings and the bottom ``n`` transformer blocks (top-layer tuning).

    Args:
        model: a Transformers model.
        n: blocks to freeze, 0 <= n <= number of blocks (0 freezes only the embeddings).

    Returns:
        The names of the frozen parameters.
    """
    stack_name, stack = _layer_stack(model)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(stack):
        raise ValueError(f"freeze_bottom_layers must be an int in [0, {len(stack)}] ({stack_name} has "
                         f"{len(stack)} blocks), got {n!r}")
    prefixes = [f"{stack_name}.{i}." for i in range(n)]
    for name, module in model.named_modules():
        if name.split(".")[-1] in _EMBEDDING_NAMES and not name.startswith(stack_name):
            prefixes.append(name + ".")
    frozen = []
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def apply_peft(model: nn.Module, method: str, options: Optional[Dict[str, Any]] = None, *,
               accelerate: bool = True, total_steps: Optional[int] = None, task: str = "classification"):
    """Wrap ``model`` with a PEFT adapter for sequence classification (or token classification).

    Args:
        model: the student.
        method: "lora", "adalora", or another PEFT method name ("ia3", "prefix_tuning", ...).
        options: keyword arguments of the PEFT config class (``r``, ``lora_alpha``,
            ``target_modules``, ``num_virtual_tokens``, ...).
        accelerate: run LoRA / AdaLoRA layers on vfm's fused ops (:func:`vfm.peft.accelerate`).
        total_steps: training steps, needed by AdaLoRA's budget schedule (``total_step``).
        task: "classification" (PEFT task type SEQ_CLS) or "tagging" (TOKEN_CLS).

    Returns:
        ``(peft_model, report)`` where report is the :class:`vfm.peft.AccelerateReport` or None
        (methods PEFT runs by itself, or ``accelerate=False``).
    """
    import peft

    opts = dict(options or {})
    method = method.lower()
    task_type = peft.TaskType.TOKEN_CLS if task == "tagging" else peft.TaskType.SEQ_CLS
    if method == "adalora" and "total_step" not in opts:
        if not total_steps:
            raise ValueError("AdaLoRA needs total_step (the number of training steps)")
        opts["total_step"] = int(total_steps)
    try:  # a misspelt option is a TypeError of the config class: name it as a peft.options error
        if method == "lora":
            config = peft.LoraConfig(task_type=task_type, **opts)
        elif method == "adalora":
            config = peft.AdaLoraConfig(task_type=task_type, **opts)
        else:
            config = peft.get_peft_config(dict(opts, peft_type=method.upper(), task_type=task_type.value))
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"peft.method {method!r} with options {opts}: PEFT refused it "
                         f"({exc.__class__.__name__}: {exc})") from exc
    peft_model = peft.get_peft_model(model, config)
    report = None
    if accelerate and method in ("lora", "adalora"):
        import vfm.peft

        report = vfm.peft.accelerate(peft_model)
    return peft_model, report


def max_positions(model_dir: str) -> Optional[int]:
    """Tokens a model folder's position embeddings cover (None when its config does not say).

    RoBERTa-family models offset positions by ``pad_token_id + 1`` (514 embeddings: 512 tokens).
    """
    import os

    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return None  # not a model folder: loading it fails later with Transformers' own message
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"):
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def fit_max_length(max_length: int, models: Dict[str, str],
                   name: str = "data.max_length") -> Tuple[int, Optional[str]]:
    """``max_length`` capped at the positions of every model (a longer batch fails with a tensor-size
    RuntimeError), and the note to print when it was capped.

    Args:
        max_length: tokens kept per text (``data.max_length``).
        models: config key -> model folder (``{"model": ..., "teacher.model": ...}``).
        name: what ``max_length`` is called in the note.

    Returns:
        ``(max_length to use, note or None)``.
    """
    limits = {key: n for key, folder in models.items() if (n := max_positions(folder)) is not None}
    if not limits or max_length <= min(limits.values()):
        return max_length, None
    key = min(limits, key=limits.get)
    return limits[key], (f"{name}={max_length} exceeds the {limits[key]} positions of {key} "
                         f"{models[key]!r}: texts are truncated at {limits[key]} tokens")


def count_trainable(model: nn.Module) -> Tuple[int, int]:
    """``(trainable parameters, all parameters)``."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
