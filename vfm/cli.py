"""Command line: ``vfm doctor`` (what is installed and why a backend is missing), ``vfm bench``,
``vfm train CONFIG.yaml``, ``vfm eval --model DIR --data FILE --out DIR``, ``vfm demo [--quick]``,
``vfm rules RULES.yaml [--data FILE]``.

A missing file or a bad config / rule / data file ends ``train``, ``eval``, ``demo`` and ``rules``
with one line ``vfm COMMAND: error: ...`` on stderr and exit status 2 (``VFM_TRACEBACK=1`` shows
the traceback instead)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional


def doctor() -> int:
    """Print versions, the extension's build facts and each op's backends per device."""
    import torch

    import vfm
    from vfm import _registry

    print(f"vfm {vfm.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton: not available ({exc.__class__.__name__}: {exc})")
    from vfm.ops.kce_cpp import cpp_available

    ok, why = cpp_available()
    if ok:
        import vfm._C as ext

        info = ext.build_info()
        print("extension vfm._C: loaded")
        for key in sorted(info):
            print(f"  {key}: {info[key]}")
    else:
        print(f"extension vfm._C: not loaded ({why})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = sorted(_registry._OPS)
    for op in ops:
        print(f"op {op}:")
        for dev in devices:
            names = _registry.available_backends(op, dev)
            auto = next((n for n in names if not (n == "triton" and dev == "cpu")), None)
            print(f"  {dev}: available {names}; runs by default: {auto}")
            for name, reason in _registry.unavailable_reasons(op, dev).items():
                print(f"    {name}: {reason}")
        if "cuda" not in devices:
            for name, reason in _registry.unavailable_reasons(op, "cuda").items():
                print(f"  cuda/{name}: {reason}")
    try:
        forced = _registry.forced_backend()
    except _registry.BackendUnavailableError as exc:  # VFM_BACKEND names no backend: say so, do not crash
        print(f"forced backend: error: {exc}; every op call will raise until it is fixed or unset")
        return 0
    if forced:
        print(f"forced backend: {forced} (every op call runs it or raises; 'runs by default' above ignores it)")
    return 0


def check_rules(rules_path: str, data_path: Optional[str], text_field: str = "text",
                label_field: str = "label") -> int:
    """``vfm rules``: parse a rule file (errors name the rule and line) and, given data, print the
    per-rule coverage and conflicts with the gold labels."""
    from vfm.knowledge import load_rules

    try:
        rules = load_rules(rules_path)
    except (OSError, ValueError) as exc:
        print(f"vfm rules: error: {exc}", file=sys.stderr)
        return 2
    print(f"{rules_path}: {rules.task}, {len(rules.labels)} labels, {len(rules.rules)} text rules, "
          f"{len(rules.token_rules)} token rules, {len(rules.gazetteers)} gazetteers")
    if data_path is None:
        return 0
    from vfm.data import load_examples

    examples, load_report = load_examples(data_path, text_field=text_field, label_field=label_field)
    print(load_report)
    if rules.task == "tagging":
        inputs = [ex.tokens or [] for ex in examples]
        gold = [ex.tags for ex in examples] if all(ex.tags is not None for ex in examples) else None
    else:
        inputs = [ex.text for ex in examples]
        gold = [ex.label for ex in examples]
    print(rules.report(inputs, gold))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``vfm`` command."""
    parser = argparse.ArgumentParser(prog="vfm", description="vfm: vertical-domain adaptation engine")
    from vfm._version import __version__

    parser.add_argument("--version", action="version", version=f"vfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, native extension and available backends")
    sub.add_parser("bench", help="benchmark the knowledge cross-entropy (see vfm bench --help)", add_help=False)
    p_train = sub.add_parser("train", help="fine-tune a model from a YAML config (vfm.train)")
    p_train.add_argument("config", help="the YAML configuration file")
    p_eval = sub.add_parser("eval", help="score a saved model on a labelled file (P/R/F1, confusion matrix)")
    p_eval.add_argument("--model", required=True, help="saved model folder (e.g. a run's final/)")
    p_eval.add_argument("--data", required=True, help="labelled .csv/.jsonl/.conll file")
    p_eval.add_argument("--rules", default=None, help="rule file: also score rule-restricted predictions")
    p_eval.add_argument("--out", required=True, help="folder for metrics.json, report.txt, confusion_matrix.png")
    p_eval.add_argument("--text-field", default="text")
    p_eval.add_argument("--label-field", default="label")
    p_eval.add_argument("--max-length", type=int, default=128)
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_eval.add_argument("--clean", action=argparse.BooleanOptionalAction, default=None,
                        help="clean the texts first (vfm.data.clean); default: as the model was trained "
                             "(vfm train records it in final/)")
    p_demo = sub.add_parser("demo", help="few-shot MiniLM on real airline tweets and Twitter NER: CE vs CE + "
                                         "rules + teacher")
    p_demo.add_argument("--out", default="vfm-demo", help="output folder (default: ./vfm-demo)")
    p_demo.add_argument("--quick", action="store_true",
                        help="tiny subsets, a few steps, one seed: every stage, fast (CI)")
    p_demo.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    p_demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p_rules = sub.add_parser("rules", help="check a rule file: parse it, and report coverage/conflicts on data")
    p_rules.add_argument("rules", help="the YAML rule file")
    p_rules.add_argument("--data", default=None, help="optional .csv/.jsonl/.conll file to report coverage on")
    p_rules.add_argument("--text-field", default="text")
    p_rules.add_argument("--label-field", default="label")
    args, rest = parser.parse_known_args(argv)
    if args.command in ("train", "eval", "demo", "rules") and rest:
        parser.error(f"{args.command}: unrecognized arguments {rest}")
    if args.command in ("train", "eval", "demo", "rules"):
        try:
            return _run_command(args)
        except (OSError, ValueError) as exc:  # a missing file, a bad config/rule/data file: one line, exit 2
            if os.environ.get("VFM_TRACEBACK"):
                raise
            print(f"vfm {args.command}: error: {exc} (set VFM_TRACEBACK=1 for the traceback)", file=sys.stderr)
            return 2
    if args.command == "doctor":
        if rest:
            parser.error(f"doctor takes no arguments, got {rest}")
        return doctor()
    if args.command == "bench":
        from vfm.bench import main as bench_main

        return bench_main(rest)
    return 2  # pragma: no cover


def _run_command(args: argparse.Namespace) -> int:
    """Run ``vfm train``/``eval``/``demo``/``rules`` from the parsed arguments; returns the exit status."""
    if args.command == "train":
        from vfm.train.run import train

        result = train(args.config)
        print(f"best model: {result.final_model_dir}")
        return 0
    if args.command == "eval":
        from vfm.evaluate import evaluate_model

        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # Transformers' "Loading weights" bar too
        evaluate_model(args.model, args.data, args.out, rules_path=args.rules, text_field=args.text_field,
                       label_field=args.label_field, max_length=args.max_length, progress=not args.no_progress,
                       clean=args.clean)
        return 0
    if args.command == "demo":
        from vfm.demo import run_demo

        run_demo(args.out, quick=args.quick, seeds=args.seeds, threads=args.threads)
        return 0
    return check_rules(args.rules, args.data, args.text_field, args.label_field)


if __name__ == "__main__":
    sys.exit(main())
