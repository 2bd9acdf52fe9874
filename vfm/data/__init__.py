"""Data preparation for domain corpora: loading, cleaning, deduplication, augmentation, splits.

Every step takes and returns a list of :class:`Example` and a report of what it removed or
added (logged on the ``vfm.data`` logger; ``print(report)`` lists the rows).  Chinese text is a
first-class input: cleaning normalises full-width forms and drops spaces between Chinese
characters, near-duplicate detection uses character bigram shingles, and augmentation edits
jieba words.

Typical use::

    examples, load_report = vfm.data.load_examples("train.jsonl")
    examples, r1 = vfm.data.clean(examples)
    examples, r2 = vfm.data.deduplicate(examples, threshold=0.8)
    train, val, test = vfm.data.stratified_split(examples, (0.8, 0.1, 0.1), seed=0)
    train, r3 = vfm.data.augment(train, lexicon="synonyms.txt", n_per_example=1, seed=0)
"""

from vfm.data.augment import OPS, augment
from vfm.data.clean import clean, clean_text
from vfm.data.dedup import deduplicate, jaccard, normalize_key, shingles
from vfm.data.example import Change, Example, StepReport
from vfm.data.io import LoadReport, Malformed, load_examples
from vfm.data.split import stratified_split
from vfm.data.text import is_cjk, join_tokens, tokenize_words

__all__ = [
    "Example",
    "StepReport",
    "Change",
    "LoadReport",
    "Malformed",
    "load_examples",
    "clean",
    "clean_text",
    "deduplicate",
    "shingles",
    "jaccard",
    "normalize_key",
    "augment",
    "OPS",
    "stratified_split",
    "is_cjk",
    "tokenize_words",
    "join_tokens",
]
