"""vfm.data augmentation (seeded, jieba words for Chinese) and stratified splits."""

import itertools
import logging
from collections import Counter

import pytest

from vfm.data import Example, augment, stratified_split, tokenize_words

ZH = "患者主诉胸痛三天，伴有呼吸困难"
EN = "the patient reports chest pain after exercise"


def test_tokenize_words():
    assert tokenize_words(ZH) == ["患者", "主诉", "胸痛", "三天", "，", "伴有", "呼吸困难"]
    assert tokenize_words("Take 100mg aspirin, daily.") == ["Take", "100mg", "aspirin", ",", "daily", "."]


def test_seeded_determinism():
    examples = [Example(EN, "a"), Example(ZH, "b"), Example("short one", "a")]
    lex = {"pain": ["ache"], "胸痛": ["胸口疼痛"]}
    a, ra = augment(examples, n_per_example=3, lexicon=lex, seed=11)
    b, rb = augment(examples, n_per_example=3, lexicon=lex, seed=11)
    c, _ = augment(examples, n_per_example=3, lexicon=lex, seed=12)
    assert [(e.text, e.label) for e in a] == [(e.text, e.label) for e in b]
    assert [e.text for e in a] != [e.text for e in c]
    assert a[:3] == examples and all(e.label == examples[e.meta["augmented_from"]].label for e in a[3:])


def test_synonym_replacement_english_and_chinese_words():
    out, report = augment([Example(EN), Example(ZH)], lexicon={"Pain": ["ache"], "胸痛": ["胸口疼痛"]},
                          ops=("synonym",), seed=0)
    assert [e.text for e in out[2:]] == ["the patient reports chest ache after exercise",
                                         "患者主诉胸口疼痛三天，伴有呼吸困难"]
    out, _ = augment([Example("Severe chest  pain today")], lexicon={"chest pain": ["thoracic pain"]},
                     ops=("synonym",), seed=0)
    assert out[1].text == "Severe thoracic pain today"  # multi-word entries are matched whole
    # a one-character entry never replaces a character inside a jieba word (胸痛 is one word)
    out, report = augment([Example(ZH)], lexicon={"痛": ["疼"]}, ops=("synonym",), seed=0)
    assert len(out) == 1 and len(report.skipped) == 1 and report.skipped[0].index == 0


def _subsequence_joins(words):
    for keep in itertools.product([True, False], repeat=len(words)):
        yield "".join(w for w, k in zip(words, keep) if k)


@pytest.mark.parametrize("seed", range(4))
def test_chinese_delete_and_swap_act_on_jieba_words(seed):
    words = tokenize_words(ZH)
    out, _ = augment([Example(ZH)], ops=("delete",), p=0.3, seed=seed)
    assert out[1].text in set(_subsequence_joins(words)) - {ZH}
    out, _ = augment([Example(ZH)], ops=("swap",), p=0.1, seed=seed)
    swaps = set()
    for i, j in itertools.combinations(range(len(words)), 2):
        w = list(words)
        w[i], w[j] = w[j], w[i]
        swaps.add("".join(w))
    assert out[1].text in swaps


def test_char_noise_and_insert():
    out, _ = augment([Example("abcdef ghijkl")], ops=("char_noise",), seed=5)
    new = out[1].text
    assert new != "abcdef ghijkl" and abs(len(new) - len("abcdef ghijkl")) <= 1
    out, _ = augment([Example(EN)], ops=("insert",), lexicon={"pain": ["ache"]}, seed=1)
    words = out[1].text.split()
    assert len(words) == len(EN.split()) + 1 and words.count("ache") == 1
    assert [w for w in words if w != "ache"] == EN.split()


def test_report_counts(caplog):
    examples = [Example(EN), Example(ZH), Example("!"), Example("chest pain today")]
    with caplog.at_level(logging.INFO, logger="vfm.data"):
        out, report = augment(examples, n_per_example=3, ops=("delete", "swap"), seed=0)
    # "!" has no word to delete or swap: its 3 copies are skipped, everything else is added
    assert len(report.skipped) == 3 and {c.index for c in report.skipped} == {2}
    assert len(report.added) == 9 and len(out) == 4 + 9 == report.n_out
    assert sum(report.details["added per operation"].values()) == 9
    assert Counter(e.meta["augmented_from"] for e in out[4:]) == {0: 3, 1: 3, 3: 3}
    assert "augment: 4 -> 13 rows" in caplog.text


def test_tagged_examples_keep_entities():
    tokens = ["please", "take", "acetyl", "salicylic", "acid", "twice", "a", "day", "now"]
    tags = ["O", "O", "B-DRUG", "I-DRUG", "I-DRUG", "O", "O", "O", "O"]
    ex = Example(" ".join(tokens), tokens=tokens, tags=tags)
    for seed in range(10):
        out, _ = augment([ex], n_per_example=2, lexicon={"take": ["use"]}, seed=seed, p=0.3)
        for new in out[1:]:
            assert len(new.tokens) == len(new.tags)
            ents = [(t, g) for t, g in zip(new.tokens, new.tags) if g != "O"]
            assert ents == [("acetyl", "B-DRUG"), ("salicylic", "I-DRUG"), ("acid", "I-DRUG")]
            start = new.tags.index("B-DRUG")
            assert new.tags[start:start + 3] == ["B-DRUG", "I-DRUG", "I-DRUG"]


def test_augment_validation():
    with pytest.raises(ValueError, match="ops"):
        augment([], ops=("rotate",))
    with pytest.raises(ValueError, match="p must"):
        augment([], p=0)
    with pytest.raises(ValueError, match="n_per_example"):
        augment([], n_per_example=-1)


def _labelled(counts):
    return [Example(f"{label} {i}", label) for label, n in counts.items() for i in range(n)]


def test_stratified_split_preserves_proportions():
    examples = _labelled({"a": 50, "b": 30, "c": 20})
    train, val, test = stratified_split(examples, (0.8, 0.1, 0.1), seed=0)
    count = lambda part: Counter(e.label for e in part)  # noqa: E731
    assert count(train) == {"a": 40, "b": 24, "c": 16}
    assert count(val) == {"a": 5, "b": 3, "c": 2} and count(test) == {"a": 5, "b": 3, "c": 2}
    ids = [id(e) for part in (train, val, test) for e in part]
    assert len(ids) == len(set(ids)) == 100
    again = stratified_split(examples, (0.8, 0.1, 0.1), seed=0)
    assert [e.text for e in again[1]] == [e.text for e in val]
    other = stratified_split(examples, (0.8, 0.1, 0.1), seed=1)
    assert [e.text for e in other[1]] != [e.text for e in val]


def test_stratified_split_uneven_and_unlabelled():
    examples = _labelled({"a": 7, "b": 3}) + [Example("u1"), Example("u2")]
    parts = stratified_split(examples, (0.5, 0.5), seed=0)
    for label, n in (("a", 7), ("b", 3), (None, 2)):
        got = [sum(e.label == label for e in p) for p in parts]
        assert sum(got) == n and max(got) - min(got) <= 1
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(examples, (0.5, 0.4))
    with pytest.raises(ValueError, match="non-negative"):
        stratified_split(examples, (1.5, -0.5))
