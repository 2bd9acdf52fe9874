"""Exact and near-duplicate removal (MinHash LSH from ``datasketch``).

* Exact: texts equal after case folding, NFKC and whitespace collapsing (``Hello  World`` and
  ``hello world`` are duplicates).  The first occurrence is kept.
* Near: character n-gram shingles of that normalised text (``n = 2`` for CJK text, whose words
  are one or two characters; ``n = 5`` otherwise), a MinHash signature per text and an LSH index
  to find candidates; each candidate pair is then checked with the exact Jaccard similarity of
  the shingle sets, so a text is removed only when its similarity to an earlier kept text is at
  least ``threshold``.
* Duplicates whose labels differ are reported under ``details["label_conflicts"]`` (the first
  one is kept either way): they usually point at annotation errors.
"""

from __future__ import annotations

import re
import unicodedata
from typing import List, Optional, Sequence, Set, Tuple

from vfm.data.example import Change, Example, StepReport
from vfm.data.text import is_cjk

_SPACES = re.compile(r"\s+")
_PROGRESS_MIN = 5000


def normalize_key(text: str) -> str:
    """The key of exact deduplication: NFKC, case-folded, whitespace collapsed and stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str, n: Optional[int] = None) -> Set[str]:
    """Character n-gram shingles of the normalised text.

    Args:
        text: the text.
        n: n-gram size (default: 2 when the text is CJK, else 5).

    Returns:
        The set of n-grams (the whole text when it is shorter than n).
    """
    key = normalize_key(text)
    if n is None:
        n = 2 if is_cjk(key) else 5
    if is_cjk(key):  # spaces carry no meaning between Chinese words
        key = key.replace(" ", "")
    if len(key) <= n:
        return {key}
    return {key[i:i + n] for i in range(len(key) - n + 1)}


def jaccard(a: Set[str], b: Set[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def deduplicate(examples: Sequence[Example], *, exact: bool = True, near: bool = True, threshold: float = 0.8,
                num_perm: int = 128, seed: int = 0, ngram: Optional[int] = None,
                lsh_threshold: Optional[float] = None, progress: bool = True) -> Tuple[List[Example], StepReport]:
    """Remove exact and near duplicates, keeping the first occurrence.

    Args:
        examples: the examples.
        exact: remove exact duplicates (normalised text).
        near: remove near duplicates (MinHash LSH, verified by exact Jaccard >= ``threshold``).
        threshold: Jaccard similarity of the shingle sets at which two texts are duplicates, in (0, 1].
        num_perm: MinHash permutations (more: better candidate recall, slower).
        seed: MinHash seed (results are deterministic for a given seed).
        ngram: shingle size (default: 2 for CJK texts, 5 otherwise).
        lsh_threshold: threshold the LSH index is tuned for (default ``threshold - 0.1``, so that
            pairs just above ``threshold`` are not missed; candidates are verified exactly).
        progress: show a tqdm bar for the near-duplicate pass (only from 5000 texts on).

    Returns:
        ``(kept examples, StepReport)``; ``removed`` names, for each removed row, the row it
        duplicates and the similarity; ``details["label_conflicts"]`` lists duplicate pairs whose
        labels differ.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if num_perm < 16:
        raise ValueError(f"num_perm must be >= 16, got {num_perm}")
    if ngram is not None and ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    report = StepReport(step="deduplicate", n_in=len(examples))
    conflicts = []
    keep = [True] * len(examples)

    def drop(i, j, reason):
        keep[i] = False
        report.removed.append(Change(i, examples[i].where, f"{reason} of #{j} {examples[j].where}",
                                     examples[i].text[:80]))
        if examples[i].label != examples[j].label:
            conflicts.append((i, j, examples[i].label, examples[j].label))

    if exact:
        first = {}
        for i, ex in enumerate(examples):
            key = normalize_key(ex.text)
            if key in first:
                drop(i, first[key], "exact duplicate")
            else:
                first[key] = i
    if near:
        _near(examples, keep, drop, threshold, num_perm, seed, ngram, lsh_threshold, progress)
    out = [ex for ex, k in zip(examples, keep) if k]
    report.removed.sort(key=lambda c: c.index)
    report.n_out = len(out)
    if conflicts:
        report.details["label_conflicts"] = [
            f"#{i} {examples[i].where} label {a!r} vs kept #{j} {examples[j].where} label {b!r}"
            for i, j, a, b in sorted(conflicts)]
    return out, report.log()


def _near(examples, keep, drop, threshold, num_perm, seed, ngram, lsh_threshold, progress):
    from datasketch import MinHash, MinHashLSH

    if lsh_threshold is None:
        lsh_threshold = max(0.05, threshold - 0.1)
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    indices = [i for i in range(len(examples)) if keep[i]]
    sets = [shingles(examples[i].text, ngram) for i in indices]
    # one MinHash template, copied per text: the permutations are drawn once, not per text
    signatures = MinHash.generator(([s.encode("utf-8") for s in sorted(sh)] for sh in sets),
                                   num_perm=num_perm, seed=seed)
    rows = zip(indices, sets, signatures)
    if progress and len(indices) >= _PROGRESS_MIN:
        from tqdm.auto import tqdm

        rows = tqdm(rows, total=len(indices), desc="near-duplicates", unit="text")
    kept_shingles = {}
    for i, sh, mh in rows:
        best, best_sim = None, -1.0
        for j in lsh.query(mh):
            sim = jaccard(sh, kept_shingles[j])
            if sim >= threshold and (sim > best_sim or (sim == best_sim and j < best)):
                best, best_sim = j, sim
        if best is not None:
            drop(i, best, f"near duplicate (Jaccard {best_sim:.2f})")
            continue
        lsh.insert(i, mh)
        kept_shingles[i] = sh
