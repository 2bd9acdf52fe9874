"""vfm.knowledge tagging: gazetteers, token rules, BIO transitions, constrained decoding."""

import itertools

import pytest
import torch

from vfm.knowledge import RuleError, RuleSet, allowed_after, viterbi_decode

TAGS = ["O", "B-DRUG", "I-DRUG", "B-DOSE", "I-DOSE"]


def _tagging(**extra):
    spec = {
        "task": "tagging",
        "entities": {"DRUG": "a medicine", "DOSE": "an amount"},
        "gazetteers": [
            {"name": "drugs", "entity": "DRUG", "entries": ["aspirin", "acetyl salicylic acid", "阿司匹林", "Dual"]},
            {"name": "doses", "entity": "DOSE", "entries": ["dual", "twice daily"]},
            {"name": "soft", "entity": "DRUG", "entries": ["tea"], "allow_outside": True},
        ],
        "token_rules": [
            {"name": "units", "regex": r"\d+(mg|ml)", "allow": ["DOSE"]},
            {"name": "punct", "regex": r"[.,;]", "allow": ["O"]},
            {"name": "not_drug_digits", "regex": r"\d+", "forbid": ["DRUG"]},
        ],
    }
    spec.update(extra)
    return RuleSet.from_dict(spec)


def _tags(*names):
    return [t in names for t in TAGS]


ALL = [True] * 5


def test_labels_and_descriptions():
    rs = _tagging()
    assert rs.labels == TAGS and rs.task == "tagging"
    assert "a medicine" in rs.descriptions["B-DRUG"] and "a medicine" in rs.descriptions["I-DRUG"]


def test_compile_tokens_hand_derived():
    rs = _tagging()
    sents = [
        ["Take", "acetyl", "salicylic", "acid", "100mg", "twice", "daily", "."],
        ["服用", "阿司", "匹林", "5"],
        ["dual", "tea", "aspirin"],
    ]
    masks = rs.compile_tokens(sents)
    assert [m.shape for m in masks] == [(8, 5), (4, 5), (3, 5)]
    assert masks[0].tolist() == [ALL, _tags("B-DRUG"), _tags("I-DRUG"), _tags("I-DRUG"), _tags("B-DOSE", "I-DOSE"),
                                 _tags("B-DOSE"), _tags("I-DOSE"), _tags("O")]
    # CJK entry matches tokens joined without spaces; digits forbid the DRUG tags
    assert masks[1].tolist() == [ALL, _tags("B-DRUG"), _tags("I-DRUG"), _tags("O", "B-DOSE", "I-DOSE")]
    # 'dual' is in both gazetteers (case-insensitive): both B- tags; soft gazetteer also allows O
    assert masks[2].tolist() == [_tags("B-DRUG", "B-DOSE"), _tags("B-DRUG", "O"), _tags("B-DRUG")]
    assert (0, 1, 4, ["DRUG"]) in masks.matches and (1, 1, 3, ["DRUG"]) in masks.matches
    assert masks.fired["units"] == [(0, 4)] and masks.fired["punct"] == [(0, 7)]
    padded, lengths = masks.padded()
    assert padded.shape == (3, 8, 5) and lengths.tolist() == [8, 4, 3]
    assert padded[1, 4:].all() and torch.equal(padded[1, :4], masks[1])
    with pytest.raises(ValueError, match="shorter"):
        masks.padded(5)
    flat = masks.flat()
    assert flat.shape == (15, 5) and torch.equal(flat[8:12], masks[1])
    group_masks, group_ids = masks.grouped()
    expanded = torch.ones_like(flat)
    expanded[group_ids >= 0] = group_masks[group_ids[group_ids >= 0]]
    assert torch.equal(expanded, flat) and int((group_ids == -1).sum()) == 2  # 'Take' and '服用'


def test_token_contradiction_left_unconstrained_and_reported():
    rs = _tagging(gazetteers=[{"name": "numdose", "entity": "DOSE", "entries": ["5"]}],
                  token_rules=[{"name": "digits_o", "regex": r"\d+", "allow": ["O"]}])
    masks = rs.compile_tokens([["take", "5"]])
    assert masks[0].tolist() == [ALL, ALL]
    assert masks.contradictions == [(0, 1, ["numdose", "digits_o"])]


def test_transition_and_start_masks_hand_derived():
    rs = _tagging()
    expected = [  # rows: previous tag, columns: next tag (O, B-DRUG, I-DRUG, B-DOSE, I-DOSE)
        [1, 1, 0, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 1, 1],
        [1, 1, 0, 1, 1],
    ]
    assert rs.transition_mask().int().tolist() == expected
    assert rs.start_mask().int().tolist() == [1, 1, 0, 1, 0]
    after = allowed_after(rs, torch.tensor([-1, 1, 4]))
    assert after.int().tolist() == [[1, 1, 0, 1, 0], expected[1], expected[4]]
    assert rs.allowed_after(torch.tensor([[2, -1]])).int().tolist() == [[expected[2], [1, 1, 0, 1, 0]]]
    with pytest.raises(ValueError, match="prev_tags"):
        allowed_after(rs, torch.tensor([5]))


def _valid_bio(path):
    prev = "O"
    for tag in path:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return False
        if tag.startswith("I-") and prev == "O":
            return False
        prev = tag
    return True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_matches_brute_force(seed):
    rs = _tagging()
    g = torch.Generator().manual_seed(seed)
    steps = 4
    emissions = torch.randn(steps, 5, generator=g)
    allowed = torch.rand(steps, 5, generator=g) > 0.3
    allowed[:, 0] = True  # keep a valid path
    best, best_path = float("-inf"), None
    for path in itertools.product(range(5), repeat=steps):
        if not _valid_bio([TAGS[t] for t in path]) or not all(allowed[t, k] for t, k in enumerate(path)):
            continue
        score = sum(float(emissions[t, k]) for t, k in enumerate(path))
        if score > best:
            best, best_path = score, list(path)
    got = viterbi_decode(emissions, rs.transition_mask(), start=rs.start_mask(), allowed=allowed)
    assert got == best_path


def test_viterbi_errors():
    rs = _tagging()
    with pytest.raises(ValueError, match="transitions"):
        viterbi_decode(torch.zeros(3, 5), torch.ones(4, 4, dtype=torch.bool))
    none_allowed = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="no tag sequence"):
        viterbi_decode(torch.zeros(2, 5), rs.transition_mask(), allowed=none_allowed)


def test_token_report():
    rs = _tagging()
    tokens = [["take", "aspirin", "5mg", "."], ["tea", "aspirin"]]
    gold = [["O", "O", "B-DOSE", "O"], ["O", "B-DRUG"]]
    rep = rs.report(tokens, gold)
    by = {s.name: s for s in rep.rules}
    assert rep.unit == "tokens" and rep.total == 6
    assert (by["drugs"].fired, by["drugs"].conflicts, by["drugs"].conflict_rows) == (2, 1, [(0, 1)])
    assert (by["soft"].fired, by["soft"].conflicts) == (1, 0)  # O allowed on a soft match
    assert (by["units"].fired, by["units"].conflicts) == (1, 0)
    assert (by["punct"].fired, by["punct"].conflicts) == (1, 0)
    # constrained tokens: aspirin, 5mg, ., tea, aspirin; gold outside on (0, 1) only
    assert rep.constrained == 5 and rep.gold_conflicts == 1
    assert "drugs" in str(rep)


def test_entities_as_list_of_mappings():
    rs = RuleSet.from_dict({"entities": [{"name": "DRUG", "description": "a medicine"}, "DOSE"]})
    assert rs.labels == TAGS and rs.descriptions["I-DRUG"] == "inside a medicine"
    with pytest.raises(RuleError, match="duplicate entity type 'DRUG'"):
        RuleSet.from_dict({"entities": ["DRUG", "DRUG"]})


def test_tagging_errors():
    with pytest.raises(RuleError, match="has no matching 'B-X'"):
        RuleSet.from_dict({"task": "tagging", "labels": ["O", "I-X"]})
    with pytest.raises(RuleError, match="unknown entity 'CHEM'"):
        RuleSet.from_dict({"entities": ["DRUG"], "gazetteers": [{"name": "g", "entity": "CHEM", "entries": ["a"]}]})
    with pytest.raises(RuleError, match="token_rules"):
        RuleSet.from_dict({"entities": ["DRUG"], "rules": [{"name": "r", "keywords": ["x"], "allow": ["DRUG"]}]})
    cls = RuleSet.from_dict({"labels": ["a", "b"]})
    with pytest.raises(ValueError, match="tagging"):
        cls.compile_tokens([["x"]])
    with pytest.raises(TypeError, match="tokens"):
        _tagging().compile_tokens(["not split"])
