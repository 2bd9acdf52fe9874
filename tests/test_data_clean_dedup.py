"""vfm.data cleaning and deduplication, on English and Chinese."""

import logging

import pytest

from vfm.data import Example, clean, deduplicate, shingles


def _texts(examples):
    return [e.text for e in examples]


@pytest.mark.parametrize("raw, expected", [
    ("ＡＢＣ　１２３", "ABC 123"),                                     # full-width forms, ideographic space
    ("line\x07one\x00\ttwo\r\nthree", "lineone two three"),           # control characters
    ("zero\u200bwidth\ufeff soft\u00adhyphen", "zerowidth softhyphen"),
    ("<p>Hello <b>world</b></p><script>alert(1)</script>&amp; co", "Hello world & co"),
    ("a<br>b", "a b"),                                                # block tags leave a space
    ("x <y and z> w", "x <y and z> w"),                               # not HTML: kept
    ("BP <140 & HR>60", "BP <140 & HR>60"),
    ("if a<b and c>d then", "if a<b and c>d then"),                   # bare words: not an HTML tag
    ('<a href="x">link</a> <input disabled>', "link"),
    ("  many   spaces\n\n", "many spaces"),
    ("中 文　测试，全角！", "中文测试,全角!"),                              # CJK spaces, full-width punctuation
    ("<div>患者</div><div>主诉胸痛</div>", "患者主诉胸痛"),
    ("心\u200b脏\x0b病", "心脏病"),
    ("English 和 中文", "English 和中文"),                              # a space next to Latin text stays
])
def test_clean_text_cases(raw, expected):
    out, report = clean([Example(raw)])
    assert _texts(out) == [expected]
    assert report.modified == (1 if raw != expected else 0)


def test_clean_report_removed_and_inputs_untouched(caplog):
    examples = [Example("ok", label=" ａ "), Example("<p> </p>", source="f.csv", line=4), Example("\u200b\x07"),
                Example("fine")]
    with caplog.at_level(logging.INFO, logger="vfm.data"):
        out, report = clean(examples)
    assert _texts(out) == ["ok", "fine"] and out[0].label == "a"
    assert [(c.index, c.where) for c in report.removed] == [(1, "f.csv:4"), (2, "<memory>:0")]
    assert (report.n_in, report.n_out, report.modified) == (4, 2, 1)
    assert examples[0].label == " ａ " and examples[1].text == "<p> </p>"
    assert "clean: 4 -> 2 rows; removed 2" in caplog.text
    assert "f.csv:4" in str(report)


def test_clean_tokens_drop_empty_with_tags():
    ex = Example("x", tokens=["服用", "\u200b", "ＡＳＰＩＲＩＮ"], tags=["O", "O", "B-DRUG"])
    out, report = clean([ex])
    assert out[0].tokens == ["服用", "ASPIRIN"] and out[0].tags == ["O", "B-DRUG"]
    assert out[0].text == "服用ASPIRIN"
    assert report.modifications["empty tokens dropped"] == 1


def test_exact_duplicates_first_kept():
    examples = [Example("Chest pain", "a"), Example("chest   PAIN", "a"), Example("other", "b"),
                Example("ＣＨＥＳＴ pain", "c")]
    out, report = deduplicate(examples, near=False)
    assert _texts(out) == ["Chest pain", "other"]
    assert [c.index for c in report.removed] == [1, 3]
    assert all("exact duplicate of #0" in c.reason for c in report.removed)
    assert report.details["label_conflicts"] == ["#3 <memory>:0 label 'c' vs kept #0 <memory>:0 label 'a'"]


def _char_ngrams(text, n):
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def test_near_duplicates_english():
    base = "the patient reports chest pain after exercise and shortness of breath at night"
    close = base.replace("night", "nite")          # small edit
    far = "the invoice for the last visit was paid twice and a refund is requested"
    a, b = _char_ngrams(base, 5), _char_ngrams(close, 5)
    sim = len(a & b) / len(a | b)
    assert sim > 0.85  # independent figure the dedup must act on
    out, report = deduplicate([Example(base), Example(far), Example(close)], threshold=0.8)
    assert _texts(out) == [base, far]
    assert report.removed[0].index == 2 and f"Jaccard {sim:.2f}" in report.removed[0].reason
    out, _ = deduplicate([Example(base), Example(far), Example(close)], threshold=0.95)
    assert len(out) == 3
    out, _ = deduplicate([Example(base), Example(close)], near=False)
    assert len(out) == 2


def test_near_duplicates_chinese_char_shingles():
    base = "患者主诉运动后胸痛并伴有呼吸急促的症状持续三天"
    close = "患者主诉运动后胸痛并伴有呼吸急促症状持续三天"     # one character dropped
    other = "今天门诊收费处的发票需要重新打印一份"
    a, b = _char_ngrams(base, 2), _char_ngrams(close, 2)
    sim = len(a & b) / len(a | b)
    assert 0.8 < sim < 0.95
    assert shingles(base) == a  # CJK texts use character bigrams
    out, report = deduplicate([Example(base, "x"), Example(other, "y"), Example(close, "z")], threshold=0.8)
    assert _texts(out) == [base, other]
    assert f"Jaccard {sim:.2f}" in report.removed[0].reason and "label_conflicts" in report.details
    # spacing differences do not matter in Chinese
    out, _ = deduplicate([Example("中文 测试 句子"), Example("中文测试句子")])
    assert len(out) == 1


def test_dedup_deterministic_and_validation():
    texts = [f"sample text number {i % 7} with some shared words" for i in range(30)]
    r1 = deduplicate([Example(t) for t in texts], seed=3)
    r2 = deduplicate([Example(t) for t in texts], seed=3)
    assert _texts(r1[0]) == _texts(r2[0]) and len(r1[0]) <= 7
    assert r1[1].n_in == 30 and r1[1].n_out + len(r1[1].removed) == 30
    with pytest.raises(ValueError, match="threshold"):
        deduplicate([], threshold=0)
    with pytest.raises(ValueError, match="num_perm"):
        deduplicate([], num_perm=2)
