"""vfm.knowledge: rule semantics on hand-derived masks, errors with file/line/rule, reports, loss."""

import json
import textwrap

import pytest
import torch

from vfm.functional import knowledge_cross_entropy
from vfm.knowledge import RuleError, RuleSet, load_rules

LABELS = ["medicine", "cardiology", "oncology", "billing", "other"]
# index:     0            1            2           3         4


def _rules(**extra):
    base = {
        "labels": [
            {"name": "medicine", "description": "a medical question"},
            {"name": "cardiology", "parent": "medicine"},
            {"name": "oncology", "parent": "medicine"},
            "billing",
            "other",
        ],
        "exclusive": [["cardiology", "oncology"]],
        "lexicons": {"heart_words": ["heart", "cardiac", "心脏"]},
        "rules": [
            {"name": "heart", "lexicon": "heart_words", "allow": ["cardiology"]},
            {"name": "tumour", "regex": r"tumou?r|肿瘤", "allow": "oncology"},
            {"name": "money", "keywords": ["invoice", "退款"], "forbid": ["medicine"]},
            {"name": "clinical", "keywords": ["doctor"], "unless": {"keywords": ["invoice"]}, "allow": ["medicine"]},
            {"name": "both", "keywords": ["scan"], "regex": "urgent", "match": "all", "allow": ["cardiology",
                                                                                                "billing"]},
        ],
    }
    base.update(extra)
    return RuleSet.from_dict(base)


def _row(*names):
    return [name in names for name in LABELS]


ALL = [True] * 5


def test_labels_descriptions_task():
    rs = _rules()
    assert rs.labels == LABELS and rs.task == "classification"
    assert rs.label_to_id == {n: i for i, n in enumerate(LABELS)}
    assert rs.descriptions["medicine"] == "a medical question"
    assert rs.descriptions["billing"] == "billing"  # fallback: the name


@pytest.mark.parametrize("text, expected, group", [
    ("hello there", ALL, False),                                   # nothing fired
    ("my HEART hurts", _row("cardiology"), True),                  # lexicon, case-insensitive
    ("sweetheart", ALL, False),                                    # whole words at ASCII edges
    ("患者心脏不适", _row("cardiology"), True),                       # CJK substring
    ("a tumor", _row("oncology"), True),                           # regex
    ("ask the doctor", _row("medicine", "cardiology", "oncology"), True),   # parent brings children
    ("invoice please", _row("billing", "other"), True),            # forbid the parent's subtree
    ("doctor invoice", _row("billing", "other"), True),            # 'unless' stops 'clinical'
    ("doctor, my heart", _row("cardiology"), True),                # intersection
    ("申请退款", _row("billing", "other"), True),                     # CJK keyword forbid
    ("scan", ALL, False),                                          # match: all needs both
    ("urgent scan", _row("cardiology", "billing"), True),
    ("urgent scan for my heart", _row("cardiology"), True),
    ("heart tumour", ALL, False),                                  # contradiction -> unconstrained
])
def test_masks_match_hand_derived(text, expected, group):
    compiled = _rules().compile([text])
    assert compiled.allowed[0].tolist() == expected
    assert (int(compiled.group_ids[0]) >= 0) == group
    if group:
        assert compiled.group_masks[compiled.group_ids[0]].tolist() == expected


def test_fired_contradictions_exclusive_conflicts():
    texts = ["heart tumour", "doctor", "nothing", "heart"]
    c = _rules().compile(texts)
    assert c.fired["heart"] == [0, 3] and c.fired["tumour"] == [0] and c.fired["clinical"] == [1]
    assert c.fired["money"] == []
    assert c.contradictions == [(0, ["heart", "tumour"])]
    assert c.exclusive_conflicts == [(0, 0, ["heart", "tumour"])]
    assert c.group_ids[2] == -1 and c.group_ids[0] == -1
    # one group per distinct allowed set: {cardiology} twice -> one group
    assert c.group_masks.shape[0] == 2 and c.group_ids[3] != c.group_ids[1]


def test_grouped_equals_dense():
    texts = ["heart", "doctor", "x", "invoice", "tumour", "heart doctor", "urgent scan", "y"]
    c = _rules().compile(texts)
    expanded = torch.ones(len(texts), 5, dtype=torch.bool)
    rows = c.group_ids >= 0
    expanded[rows] = c.group_masks[c.group_ids[rows]]
    assert torch.equal(expanded, c.allowed)
    assert len({tuple(r) for r in c.group_masks.tolist()}) == c.group_masks.shape[0]  # distinct groups
    logits = torch.randn(len(texts), 5)
    target = torch.tensor([1, 0, 4, 3, 2, 1, 3, 0])
    kw = dict(penalty_weight=0.7, return_parts=True)
    dense = knowledge_cross_entropy(logits, target, allowed=c.loss_argument(grouped=False), **kw)
    grouped = knowledge_cross_entropy(logits, target, allowed=c.loss_argument(), **kw)
    torch.testing.assert_close(dense.loss, grouped.loss)
    torch.testing.assert_close(dense.penalty, grouped.penalty)
    # a batch slice of the grouped form
    sub = c.loss_argument(rows=[3, 0])
    assert sub[1].tolist() == [int(c.group_ids[3]), int(c.group_ids[0])]


def test_penalty_matches_design_formula_by_hand():
    """pen_i = logsumexp(z) - logsumexp(z[A_i]); rows with no constraint add 0; mean over rows."""
    rs = _rules()
    texts = ["my heart", "the doctor", "nothing here"]
    c = rs.compile(texts)
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0],
                           [1.0, 0.0, 0.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0]])
    target = torch.tensor([3, 3, 0])   # row 0 and row 1 gold 'billing' contradict the rules
    import math
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    pen0 = lse[0] - 1.0                                         # A = {cardiology}: logsumexp = z1 = 1.0
    pen1 = lse[1] - math.log(math.exp(1.0) + 1.0 + 1.0)         # A = {medicine, cardiology, oncology}
    expected = (pen0 + pen1 + 0.0) / 3
    out = knowledge_cross_entropy(logits, target, allowed=c.loss_argument(), penalty_weight=1.0,
                                  ce_weight=0.0, return_parts=True)
    assert abs(float(out.penalty) - expected) < 1e-5
    assert abs(float(out.loss) - expected) < 1e-5
    assert int(out.n_outside_allowed) == 2


def test_report_coverage_and_conflicts():
    rs = _rules()
    texts = ["heart", "heart", "doctor", "invoice", "nothing", "heart tumour"]
    gold = ["cardiology", "billing", "oncology", "medicine", None, 2]
    rep = rs.report(texts, gold)
    by = {s.name: s for s in rep.rules}
    # heart fires on rows 0, 1, 5; gold outside {cardiology} on rows 1 (billing) and 5 (oncology)
    assert (by["heart"].fired, by["heart"].gold_seen, by["heart"].conflicts) == (3, 3, 2)
    assert by["heart"].conflict_rows == [1, 5] and abs(by["heart"].coverage - 0.5) < 1e-12
    # clinical allows the medicine subtree: row 2 gold oncology is fine
    assert (by["clinical"].fired, by["clinical"].conflicts) == (1, 0)
    # money forbids medicine: row 3 gold medicine conflicts
    assert (by["money"].fired, by["money"].conflicts, by["money"].agreement) == (1, 1, 0.0)
    assert by["both"].fired == 0 and by["both"].agreement is None
    # combined: constrained rows 0,1,2,3 (row 5 contradicts -> unconstrained); gold outside on 1 and 3
    assert rep.constrained == 4 and rep.contradictions == 1 and rep.gold_conflicts == 2
    assert rep.exclusive_conflicts == 1
    text = str(rep)
    for name in ("heart", "tumour", "money", "clinical", "both"):
        assert name in text
    json.dumps(rep.to_dict())
    with pytest.raises(ValueError, match=r"gold\[0\] = 'cardio'"):
        rs.report(["x"], ["cardio"])
    with pytest.raises(ValueError, match="entries"):
        rs.report(["x", "y"], ["billing"])


def _write(tmp_path, body):
    path = tmp_path / "rules.yaml"
    text = textwrap.dedent(body).lstrip("\n")
    path.write_text(text, encoding="utf-8")
    return str(path), text.splitlines()


def _line(lines, needle):
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def test_load_rules_file_and_lexicon_file(tmp_path):
    (tmp_path / "lex.txt").write_text("# heart terms\nheart, cardiac\n心脏\n", encoding="utf-8")
    path, lines = _write(tmp_path, """
        task: classification
        labels: {cardiology: "heart", other: "anything else"}
        lexicons: {hw: lex.txt}
        options: {case_sensitive: true}
        rules:
          - name: heart
            lexicon: hw
            allow: [cardiology]
        """)
    rs = load_rules(path)
    assert rs.rules[0].line == _line(lines, "- name: heart")
    assert rs.compile(["cardiac arrest", "Cardiac", "心脏"]).allowed.tolist() == [
        [True, False], [True, True], [True, False]]


@pytest.mark.parametrize("body, needle, rule, message", [
    ("""
     labels: [a, b]
     rules:
       - name: r1
         keywords: [x]
         allow: [a]
       - name: bad_label
         keywords: [y]
         allow:
           - a
           - nope
     """, "- nope", "bad_label", "unknown label 'nope'"),
    ("""
     labels: [a, b]
     rules:
       - name: bad_regex
         regex: "(unclosed"
         allow: [a]
     """, "regex:", "bad_regex", "bad regex"),
    ("""
     labels: [a, b]
     rules:
       - name: lex
         lexicon: [missing]
         forbid: b
     """, "lexicon: [missing]", "lex", "unknown lexicon 'missing'"),
    ("""
     labels: [a, b]
     rules:
       - name: typo
         keyword: [x]
         allow: [a]
     """, "keyword:", "typo", "unknown key 'keyword'"),
    ("""
     labels: [a, b]
     rules:
       - name: noaction
         keywords: [x]
     """, "- name: noaction", "noaction", "'allow' and/or 'forbid'"),
])
def test_rule_errors_name_file_line_and_rule(tmp_path, body, needle, rule, message):
    path, lines = _write(tmp_path, body)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    err = info.value
    assert err.line == _line(lines, needle) and err.rule == rule
    assert f"{path}:{err.line}:" in str(err) and f"rule '{rule}'" in str(err) and message in str(err)


@pytest.mark.parametrize("body, needle, message", [
    ("labels: [a, b]\nhierarchy: {a: [b], b: [a]}\n", "hierarchy", "cycle"),
    ("labels: [a, b]\nexclusive:\n  - [a, zz]\n", "[a, zz]", "unknown label 'zz'"),
    ("labels: [a, b]\nlabels: [c]\n", "labels: [c]", "duplicate key"),
    ("labels: [a, b]\nrules: [\n", None, "invalid YAML"),
    ("labelz: [a]\n", "labelz", "unknown top-level key"),
    ("labels: [a, a]\n", "labels", "duplicate label"),
])
def test_file_level_errors(tmp_path, body, needle, message):
    path, lines = _write(tmp_path, body)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert message in str(info.value) and path in str(info.value)
    if needle is not None:
        assert info.value.line == _line(lines, needle)


def test_dict_errors_name_rule_without_line():
    with pytest.raises(RuleError, match=r"<dict>: rule 'r': unknown label 'zz'"):
        RuleSet.from_dict({"labels": ["a"], "rules": [{"name": "r", "keywords": ["x"], "allow": ["zz"]}]})
    with pytest.raises(RuleError, match="duplicate rule name"):
        RuleSet.from_dict({"labels": ["a", "b"], "rules": [{"name": "r", "keywords": ["x"], "allow": "a"},
                                                           {"name": "r", "keywords": ["y"], "allow": "b"}]})
    with pytest.raises(TypeError, match="texts"):
        _rules().compile("a single string")


def test_example_rule_files_load():
    rs = load_rules("examples/rules_medical.yaml")
    c = rs.compile(["My heart hurts, doctor", "Invoice for the refund"])
    assert c.allowed.tolist() == [_row("cardiology"), _row("billing", "other")]
    ner = load_rules("examples/rules_ner.yaml")
    assert ner.task == "tagging" and ner.labels[:3] == ["O", "B-DRUG", "I-DRUG"]


def test_posterior_penalty_by_hand():
    """posterior, C = inf, no teacher: r = softmax(z restricted to A); pen = T^2 KL(r || softmax(z/T))."""
    import math
    rs = _rules()
    c = rs.compile(["the doctor", "nothing"])          # row 0: A = {medicine, cardiology, oncology}
    logits = torch.tensor([[0.5, 1.5, -0.5, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    temp = 2.0
    z = [v / temp for v in logits[0].tolist()]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    inside = [0, 1, 2]
    r = {k: math.exp(z[k]) / sum(math.exp(z[j]) for j in inside) for k in inside}
    pen0 = temp ** 2 * sum(r[k] * (math.log(r[k]) - math.log(p[k])) for k in inside)
    out = knowledge_cross_entropy(logits, torch.tensor([0, 4]), allowed=c.loss_argument(), penalty="posterior",
                                  penalty_weight=1.0, ce_weight=0.0, temperature=temp, return_parts=True)
    assert abs(float(out.penalty) - pen0 / 2) < 1e-5


from hypothesis import given, settings, strategies as st  # noqa: E402

_WORDS = ["w0", "w1", "w2", "w3", "w4", "w5"]
_LAB = ["a", "b", "c", "d"]  # hierarchy: a -> b


def _expand(names):
    out = set(names)
    if "a" in out:
        out.add("b")
    return out


_rule = st.fixed_dictionaries({
    "keywords": st.lists(st.sampled_from(_WORDS), min_size=1, max_size=2, unique=True),
    "allow": st.one_of(st.none(), st.lists(st.sampled_from(_LAB), min_size=1, max_size=3, unique=True)),
    "forbid": st.lists(st.sampled_from(_LAB), max_size=2, unique=True),
})


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rules=st.lists(_rule, min_size=1, max_size=4),
       texts=st.lists(st.lists(st.sampled_from(_WORDS), max_size=4), min_size=1, max_size=6))
def test_masks_match_set_oracle(rules, texts):
    specs = []
    for k, r in enumerate(rules):
        spec = {"name": f"r{k}", "keywords": r["keywords"], "forbid": r["forbid"]}
        if r["allow"] is not None:
            spec["allow"] = r["allow"]
        specs.append(spec)
    if any("allow" not in s and not s["forbid"] for s in specs):
        specs = [s if "allow" in s or s["forbid"] else {**s, "forbid": ["d"]} for s in specs]
    rs = RuleSet.from_dict({"labels": _LAB, "hierarchy": {"a": ["b"]}, "rules": specs})
    strings = [" ".join(t) for t in texts]
    c = rs.compile(strings)
    for i, words in enumerate(texts):
        allowed, fired = set(_LAB), False
        for s in specs:
            if any(k in words for k in s["keywords"]):
                fired = True
                allowed &= (_expand(s["allow"]) if "allow" in s else set(_LAB)) - _expand(s["forbid"])
        free = not fired or not allowed or allowed == set(_LAB)
        expected = [True] * 4 if free else [lab in allowed for lab in _LAB]
        assert c.allowed[i].tolist() == expected
        assert (int(c.group_ids[i]) == -1) == free


def test_invalid_utf8_rule_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"labels: [a, b]\n# comment \xff\n")
    with pytest.raises(RuleError, match=r"r.yaml:2: not valid UTF-8"):
        load_rules(str(path))
