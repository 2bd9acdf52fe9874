"""Stratified train/validation/test splits."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from vfm.data.example import Example

logger = logging.getLogger("vfm.data")
_NO_LABEL = "<no label>"


def _quotas(n: int, fractions: Sequence[float]) -> List[int]:
    """Split n items by largest remainder: sum is n, each within 1 of n * fraction."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    rest = n - sum(counts)
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[:rest]:
        counts[k] += 1
    return counts


def stratified_split(examples: Sequence[Example], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                     key: Optional[Callable[[Example], object]] = None) -> Tuple[List[Example], ...]:
    """Split so that every label keeps its proportion in every part.

    Each label's examples are shuffled (seeded per label, so adding a class does not reshuffle
    the others) and cut by largest remainder: part k of a label with n examples gets
    ``floor(n * f_k)`` or one more, and the parts add up to n.  Unlabelled examples form their
    own stratum.  Within a part, the original order is kept.  Nothing is dropped.

    Args:
        examples: the examples.
        fractions: one fraction per part, each >= 0, summing to 1.
        seed: shuffling seed.
        key: stratum of an example (default: its label).

    Returns:
        One list per fraction.
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(f < 0 or math.isnan(f) for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    key = key or (lambda ex: ex.label)
    strata: Dict[object, List[int]] = {}
    for i, ex in enumerate(examples):
        k = key(ex)
        strata.setdefault(_NO_LABEL if k is None else k, []).append(i)
    parts: List[List[int]] = [[] for _ in fractions]
    for label in sorted(strata, key=str):
        idx = list(strata[label])
        random.Random(f"{seed}:{label}").shuffle(idx)
        start = 0
        for k, count in enumerate(_quotas(len(idx), fractions)):
            parts[k].extend(idx[start:start + count])
            start += count
    out = tuple([examples[i] for i in sorted(p)] for p in parts)
    for k, part in enumerate(out):
        counts = Counter(_NO_LABEL if key(ex) is None else key(ex) for ex in part)
        logger.info("split part %d (fraction %.3f): %d examples %s", k, fractions[k], len(part),
                    dict(sorted(counts.items(), key=lambda kv: str(kv[0]))))
    return out
