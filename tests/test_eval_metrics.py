"""vfm.evaluate: classification scores by hand and against scikit-learn, BIO entity scores, PNG, vfm eval."""

import os

import numpy as np
import pytest

from vfm.evaluate import bio_spans, classification_report, entity_report, plot_confusion


def test_classification_scores_by_hand():
    # gold:  a a a b b c ; pred: a b a b c c  (label d never occurs)
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 1, 0, 1, 2, 2]
    rep = classification_report(gold, pred, ["a", "b", "c", "d"])
    # a: tp2 fp0 fn1 -> p1 r2/3 f0.8 ; b: tp1 fp1 fn1 -> .5 .5 .5 ; c: tp1 fp1 fn0 -> .5 1 2/3 ; d: 0 0 0
    assert rep.per_label["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert rep.per_label["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert rep.per_label["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert rep.per_label["d"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0})
    assert rep.accuracy == pytest.approx(4 / 6)
    assert rep.averages["micro"]["f1"] == pytest.approx(4 / 6)
    assert rep.averages["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0) / 4)
    assert rep.averages["weighted"]["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert rep.confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert "macro avg" in str(rep)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_scores_match_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n_labels = 6
    gold = rng.integers(0, n_labels - 1, size=80)  # the last label has no gold row
    pred = np.where(rng.random(80) < 0.6, gold, rng.integers(0, n_labels, size=80))
    rep = classification_report(gold, pred, [f"l{i}" for i in range(n_labels)])
    p, r, f, s = metrics.precision_recall_fscore_support(gold, pred, labels=list(range(n_labels)), zero_division=0)
    for i in range(n_labels):
        got = rep.per_label[f"l{i}"]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = metrics.precision_recall_fscore_support(gold, pred, labels=list(range(n_labels)), average=avg,
                                                             zero_division=0)
        assert (rep.averages[avg]["precision"], rep.averages[avg]["recall"], rep.averages[avg]["f1"]) == \
            pytest.approx((p, r, f))
    assert rep.accuracy == pytest.approx(metrics.accuracy_score(gold, pred))
    np.testing.assert_array_equal(rep.confusion, metrics.confusion_matrix(gold, pred, labels=list(range(n_labels))))


def test_classification_rejects_bad_ids():
    with pytest.raises(ValueError, match="pred holds ids outside"):
        classification_report([0, 1], [0, 3], ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        classification_report([0, 1], [0], ["a", "b"])


def test_bio_spans_by_hand():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert bio_spans(["I-PER", "I-PER", "B-PER"]) == {("PER", 0, 2), ("PER", 2, 3)}  # I- opens an entity
    assert bio_spans(["B-PER", "I-LOC", "O"]) == {("PER", 0, 1), ("LOC", 1, 2)}     # a type change splits


def test_entity_scores_by_hand():
    gold = [["B-DRUG", "I-DRUG", "O", "B-DOSE", "I-DOSE"], ["B-DRUG", "O", "O"]]
    pred = [["B-DRUG", "I-DRUG", "O", "B-DOSE", "O"],       # DRUG exact; DOSE span too short
            ["B-DRUG", "O", "B-DOSE"]]                     # DRUG exact; spurious DOSE
    rep = entity_report(gold, pred)
    # DRUG: tp 2, fp 0, fn 0 ; DOSE: tp 0, fp 2 (short span + spurious), fn 1
    assert rep["DRUG"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2})
    assert rep["DOSE"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert rep["micro"]["precision"] == pytest.approx(2 / 4)
    assert rep["micro"]["recall"] == pytest.approx(2 / 3)
    assert rep["micro"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert rep["macro"]["f1"] == pytest.approx(0.5)
    assert rep["weighted"]["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="sentence 0"):
        entity_report([["O", "O"]], [["O"]])


def test_confusion_png(tmp_path):
    path = plot_confusion(np.array([[3, 1], [0, 2]]), ["a", "b"], str(tmp_path / "cm.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []  # the temporary file is gone


def test_vfm_eval_command(tmp_path, capsys):
    from test_train_utils import save_tiny
    from vfm.cli import main

    model_dir = save_tiny(str(tmp_path / "model"), labels=("billing", "shipping", "tech"))
    data = tmp_path / "test.csv"
    data.write_text("text,label\nrefund my money,billing\npackage not arrived,shipping\napp crash error,tech\n"
                    "track my parcel,shipping\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("task: classification\nlabels: [billing, shipping, tech]\n"
                     "rules:\n  - name: parcel\n    keywords: [parcel, package]\n    allow: [shipping]\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", model_dir, "--data", str(data), "--rules", str(rules), "--out", str(out)]) == 0
    for name in ("metrics.json", "report.txt", "confusion_matrix.png", "predictions.csv", "rules_metrics.json"):
        assert (out / name).exists(), name
    import csv
    import json

    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 4
    # the rule pins both parcel/package rows to shipping, whatever the random model says
    assert [r["predicted_with_rules"] for r in rows if "parcel" in r["text"] or "package" in r["text"]] == \
        ["shipping", "shipping"]
    metrics = json.load(open(out / "metrics.json"))
    gold = [r["gold"] for r in rows]
    pred = [r["predicted"] for r in rows]
    assert metrics["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, pred)) / 4)


def test_vfm_eval_tagging_entity_scores(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    from test_train_utils import WORDS, tiny_tokenizer
    from vfm.evaluate import evaluate_model

    tags = ["O", "B-ITEM", "I-ITEM"]
    folder = str(tmp_path / "tagger")
    tok = tiny_tokenizer(folder)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(
        vocab_size=5 + len(set(WORDS)), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=3, id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)}))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    sents = [(["refund", "my", "card"], ["O", "O", "B-ITEM"]), (["track", "parcel", "delivery"], ["O", "B-ITEM", "I-ITEM"])]
    (tmp_path / "t.conll").write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(*s)) for s in sents) + "\n")
    res = evaluate_model(folder, str(tmp_path / "t.conll"), str(tmp_path / "out"), quiet=True, progress=False)
    # by hand: every word is one token of the tiny vocabulary, at position i + 1 after [CLS]
    model.eval()
    pred = []
    with torch.no_grad():
        for words, _ in sents:
            ids = [tok.cls_token_id] + tok.convert_tokens_to_ids(words) + [tok.sep_token_id]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            pred.append([tags[int(i)] for i in logits[1:-1].argmax(-1)])
    assert res["entity"] == entity_report([s[1] for s in sents], pred)
    assert (tmp_path / "out" / "metrics.json").exists() and (tmp_path / "out" / "report.txt").exists()
