"""Seeded text augmentation: synonym replacement, random insertion, deletion, swap, character noise.

Texts are split into words with :func:`vfm.data.text.tokenize_words` (jieba for Chinese, so a
Chinese synonym replaces a whole word, never a lone character) and joined back with
:func:`~vfm.data.text.join_tokens`.  Tagging examples are edited on their tokens, touching only
``O`` tokens (and inserting only where no ``I-`` tag follows), so every entity span and its tags
stay intact.

Operations (``p`` is the fraction of words an operation touches, at least one):

* ``synonym``: replace words found in the lexicon (case-insensitive) by a random synonym;
* ``insert``: insert a synonym of a lexicon word of the text (without one, a copy of a random
  word) at a random position;
* ``delete``: delete random words (never all of them);
* ``swap``: swap two random words;
* ``char_noise``: in a random word, delete, duplicate or swap adjacent characters (a Chinese
  word is edited character by character in the same way).

For each new example one applicable operation is drawn; if it cannot change the text, the
others are tried in a random order, and an example none can change is reported as skipped.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple, Union

from vfm.data.example import Change, Example, StepReport
from vfm.data.text import is_cjk, join_tokens, tokenize_words

OPS = ("synonym", "insert", "delete", "swap", "char_noise")


def _lexicon_table(lexicon) -> Dict[str, List[str]]:
    if lexicon is None:
        return {}
    if isinstance(lexicon, str):
        from vfm.knowledge.lexicon import load_lexicon

        lexicon = load_lexicon(lexicon)
    if not isinstance(lexicon, dict):
        raise TypeError(f"lexicon must be a dict word -> synonyms or a file path, got {type(lexicon).__name__}")
    table: Dict[str, List[str]] = {}
    for word, syns in lexicon.items():
        if isinstance(syns, str):
            syns = [syns]
        if not isinstance(word, str) or not all(isinstance(s, str) for s in syns):
            raise TypeError(f"lexicon entries must be str -> list of str, got {word!r}: {syns!r}")
        bucket = table.setdefault(" ".join(word.split()).casefold(), [])
        bucket.extend(s for s in syns if s and s.casefold() != word.casefold() and s not in bucket)
    return table


class _Editor:
    """Applies one operation to (words, tags) without breaking entity spans."""

    def __init__(self, rng: random.Random, table: Dict[str, List[str]], p: float):
        self.rng, self.table, self.p = rng, table, p

    def _editable(self, words, tags) -> List[int]:
        return [i for i, w in enumerate(words) if (tags is None or tags[i] == "O") and any(c.isalnum() for c in w)]

    def _count(self, n: int) -> int:
        return max(1, int(round(self.p * n)))

    def synonym(self, words, tags):
        spots = [i for i in self._editable(words, tags) if self.table.get(words[i].casefold())]
        if not spots:
            return None
        for i in self.rng.sample(spots, min(len(spots), self._count(len(words)))):
            words[i] = self.rng.choice(self.table[words[i].casefold()])
        return words, tags

    def insert(self, words, tags):
        editable = self._editable(words, tags)
        with_syn = [i for i in editable if self.table.get(words[i].casefold())]
        if with_syn:
            new = self.rng.choice(self.table[words[self.rng.choice(with_syn)].casefold()])
        elif editable:
            new = words[self.rng.choice(editable)]
        else:
            return None
        spots = [j for j in range(len(words) + 1) if tags is None or j == len(words) or not tags[j].startswith("I-")]
        j = self.rng.choice(spots)
        words.insert(j, new)
        if tags is not None:
            tags.insert(j, "O")
        return words, tags

    def delete(self, words, tags):
        editable = self._editable(words, tags)
        if len(words) < 2 or not editable:
            return None
        n = min(self._count(len(words)), len(editable), len(words) - 1)
        gone = set(self.rng.sample(editable, n))
        words = [w for i, w in enumerate(words) if i not in gone]
        tags = None if tags is None else [t for i, t in enumerate(tags) if i not in gone]
        return words, tags

    def swap(self, words, tags):
        editable = self._editable(words, tags)
        pairs = 0
        for _ in range(self._count(len(words))):
            if len(editable) < 2:
                break
            a, b = self.rng.sample(editable, 2)
            if words[a] != words[b]:
                words[a], words[b] = words[b], words[a]
                pairs += 1
        return (words, tags) if pairs else None

    def char_noise(self, words, tags):
        spots = [i for i in self._editable(words, tags) if len(words[i]) >= 2 or is_cjk(words[i])]
        if not spots:
            return None
        i = self.rng.choice(spots)
        w = words[i]
        kinds = ["delete", "duplicate", "swap"] if len(w) >= 2 else ["duplicate"]
        kind = self.rng.choice(kinds)
        k = self.rng.randrange(len(w) - 1) if kind == "swap" else self.rng.randrange(len(w))
        if kind == "delete":
            w = w[:k] + w[k + 1:]
        elif kind == "duplicate":
            w = w[:k + 1] + w[k] + w[k + 1:]
        elif w[k] != w[k + 1]:
            w = w[:k] + w[k + 1] + w[k] + w[k + 2:]
        else:
            return None
        words[i] = w
        return words, tags


_ATTEMPTS = 4  # rounds over the operations to find a copy unlike the earlier ones


def augment(examples: Sequence[Example], *, n_per_example: int = 1,
            lexicon: Union[None, str, Dict[str, Sequence[str]]] = None, ops: Sequence[str] = OPS, seed: int = 0,
            p: float = 0.1) -> Tuple[List[Example], StepReport]:
    """Add ``n_per_example`` augmented copies of each example (the originals come first).

    Args:
        examples: the examples (class labels and tags are kept on the copies).
        n_per_example: new examples to try per input example (>= 0).
        lexicon: dict word -> synonyms, or a lexicon file (see :mod:`vfm.knowledge.lexicon`);
            its words also stay whole when Chinese text is segmented.
        ops: operations to draw from (see the module docs).
        seed: the same seed and input give the same output.
        p: fraction of words an operation touches (0 < p <= 1).

    Returns:
        ``(originals + new examples, StepReport)``: ``added`` lists each new row with the
        operation and the row it came from; ``skipped`` the copies no operation could make (every
        copy differs from its original and from the other copies of the same row).
        New rows keep ``source``/``line`` of their origin and carry ``meta["augmented_from"]``
        (the input index) and ``meta["augmentation"]`` (the operation).
    """
    if n_per_example < 0:
        raise ValueError(f"n_per_example must be >= 0, got {n_per_example}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must lie in (0, 1], got {p}")
    ops = list(ops)
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
    table = _lexicon_table(lexicon)
    keep_words = {w for w in table if len(w.split()) > 1 or is_cjk(w)}  # multi-word / CJK lexicon entries
    rng = random.Random(seed)
    editor = _Editor(rng, table, p)
    report = StepReport(step="augment", n_in=len(examples))
    new_rows: List[Example] = []
    for i, ex in enumerate(examples):
        if ex.tokens is not None:
            base_words, base_tags = list(ex.tokens), (list(ex.tags) if ex.tags is not None else None)
        else:
            base_words, base_tags = tokenize_words(ex.text, keep=keep_words), None
        made = {tuple(base_words)}  # the original and the copies so far: a copy must differ from all of them
        for _ in range(n_per_example):
            result, changed = None, False
            for _attempt in range(_ATTEMPTS):
                for op in rng.sample(ops, len(ops)):
                    words = list(base_words)
                    tags = None if base_tags is None else list(base_tags)
                    edited = getattr(editor, op)(words, tags)
                    if edited is not None and edited[0] != base_words:
                        changed = True
                        if tuple(edited[0]) not in made:
                            result = (op, edited)
                            break
                if result is not None or not changed:
                    break
            if result is None:
                why = "no new variant after {} attempts".format(_ATTEMPTS) if changed else \
                    f"no operation of {ops} changes this text"
                report.skipped.append(Change(i, ex.where, why, ex.text[:80]))
                continue
            op, (words, tags) = result
            made.add(tuple(words))
            text = join_tokens(words)
            meta = dict(ex.meta)
            meta.update(augmented_from=i, augmentation=op)
            new = Example(text=text, label=ex.label, tokens=words if ex.tokens is not None else None, tags=tags,
                          source=ex.source, line=ex.line, meta=meta)
            new_rows.append(new)
            report.added.append(Change(i, ex.where, f"augmented: {op}", text[:80]))
    report.n_out = len(examples) + len(new_rows)
    counts: Dict[str, int] = {}
    for row in new_rows:
        counts[row.meta["augmentation"]] = counts.get(row.meta["augmentation"], 0) + 1
    report.details["added per operation"] = dict(sorted(counts.items()))
    return list(examples) + new_rows, report.log()
