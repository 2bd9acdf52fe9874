"""Lexicon files (rules and augmentation)."""

import pytest

from vfm.knowledge import load_lexicon, read_lexicon_entries


def test_txt_groups_are_symmetric():
    lex = load_lexicon("examples/synonyms_medical.txt")
    assert lex["chest pain"] == ["thoracic pain"] and lex["thoracic pain"] == ["chest pain"]
    assert lex["胸口疼痛"] == ["胸痛", "胸部疼痛"] and lex["发热"] == ["发烧"]
    assert read_lexicon_entries("examples/synonyms_medical.txt")[:3] == ["chest pain", "thoracic pain",
                                                                         "heart attack"]


def test_structured_lexicons(tmp_path):
    (tmp_path / "a.yaml").write_text("pain: [ache, soreness]\n胸痛: 胸口疼痛\nlonely:\n", encoding="utf-8")
    assert load_lexicon(str(tmp_path / "a.yaml")) == {"pain": ["ache", "soreness"], "胸痛": ["胸口疼痛"], "lonely": []}
    (tmp_path / "b.json").write_text('["aspirin", "ibuprofen"]', encoding="utf-8")
    assert load_lexicon(str(tmp_path / "b.json")) == {"aspirin": [], "ibuprofen": []}
    (tmp_path / "c.json").write_text('{"a": ["b"],\n "c": [}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.json:2: invalid JSON"):
        load_lexicon(str(tmp_path / "c.json"))
    (tmp_path / "d.yaml").write_text("a: [b\nc: d\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.yaml:\d+: invalid YAML"):
        load_lexicon(str(tmp_path / "d.yaml"))
    (tmp_path / "e.yaml").write_text("just a string\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must be a list or a mapping"):
        load_lexicon(str(tmp_path / "e.yaml"))
