"""Review of the newcomer pipeline (CLI, config, data loading, evaluation, atomic writes): regression
tests for the bugs found, each checked against an independent expectation written here by hand."""

import json
import os
import stat

import pytest

from vfm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------- CLI ---
def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vfm {command}: error: "), err
    return lines[0]


def test_cli_train_missing_config_is_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["train", missing]) == 2
    assert missing in _one_line_error(capsys, "train")


def test_cli_train_bad_config_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: m\nlabels: [a, b]\ndata: {train: t.csv}\ntraining:\n  epochs: 1\n   lr: 3\n")
    assert main(["train", str(cfg)]) == 2
    line = _one_line_error(capsys, "train")
    assert f"{cfg}, line 6: not valid YAML" in line


def test_cli_eval_missing_data_and_empty_data(tmp_path, capsys):
    # both fail before any model is loaded, so no model folder is needed
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "none.csv" in _one_line_error(capsys, "eval")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert main(["eval", "--model", str(tmp_path), "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no examples to evaluate" in _one_line_error(capsys, "eval")


def test_cli_rules_missing_data_file(tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text("labels: [a, b]\nrules: []\n")
    assert main(["rules", str(rules), "--data", str(tmp_path / "none.csv")]) == 2
    assert "none.csv" in _one_line_error(capsys, "rules")


def test_cli_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", str(tmp_path / "nope.yaml")])


# ---------------------------------------------------------------------------- config ---
def _cfg(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


BASE = "model: m\nlabels: [a, b]\ndata: {train: t.csv}\n"


@pytest.mark.parametrize("text, match", [
    # PyYAML keeps the last of two equal keys silently: the first section would be ignored
    (BASE + "training: {epochs: 1}\ntraining: {epochs: 5}\n", r"line 5: .*duplicate key 'training' \(first at line 4"),
    (BASE + "training:\n  epochs: 1\n  epochs: 7\n", r"line 6: .*duplicate key 'epochs' \(first at line 5"),
    (b"model: m\nlabels: [caf\xe9]\n", r"cfg.yaml, line 2: not valid UTF-8"),
    (BASE + "teacher: {kind: model, model: m, label_map: {a: [1]}}\n",
     r"line 4: teacher.label_map\['a'\] must be a string"),
    (BASE + "training: {batch_size: 0}\n", r"training.batch_size must be >= 1, got 0"),
    (BASE + "training: {learning_rate: .nan}\n", r"training.learning_rate must be a finite number"),
    (BASE + "training: {epochs: 0}\n", r"training.epochs must be > 0"),
    (BASE.replace("data: {train: t.csv}", "data: {train: t.csv, near_duplicate_threshold: 0}"),
     r"data.near_duplicate_threshold"),
    # these failed at the first training step, after data preparation and the teacher run
    (BASE + "teacher: {kind: model, model: m}\nloss: {kd_weight: 0.5, kd: jsd}\n", r"loss.kd 'jsd' needs"),
    (BASE + "loss: {kd: kll}\n", r"loss.kd must be 'kl', 'reverse_kl' or 'jsd', got 'kll'"),
    (BASE + "loss: {penalty: mas}\n", r"loss.penalty must be 'mass' or 'posterior'"),
    (BASE + "loss: {temperature: 0}\n", r"loss.temperature is out of range, got 0"),
    (BASE + "peft: {method: lora2}\n", r"peft.method must be 'none' or a PEFT method .*got 'lora2'"),
])
def test_config_errors_name_file_line_and_key(tmp_path, text, match):
    from vfm.train.config import load_config

    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match=match):
        load_config(_cfg(tmp_path, text))


def test_peft_method_is_case_insensitive_everywhere():
    # apply_peft lower-cased it, but the merge into final/ and the AdaLoRA schedule compared "adalora" exactly
    from vfm.train.config import config_from_dict

    for given in ("AdaLoRA", "LoRA", "IA3", "None"):
        cfg = config_from_dict({"model": "m", "labels": ["a"], "data": {"train": "t.csv"}, "peft": {"method": given}})
        assert cfg.peft.method == given.lower()


def test_resume_folder_is_relative_to_the_config_like_every_path(tmp_path):
    from vfm.train.config import load_config

    (tmp_path / "m").mkdir()
    cfg = load_config(_cfg(tmp_path, BASE + "training: {output_dir: run, resume: run/checkpoint-4}\n"))
    assert cfg.training.output_dir == str(tmp_path / "run")
    assert cfg.training.resume == str(tmp_path / "run" / "checkpoint-4")
    for keep in ("auto", "never", True, False):
        value = keep if isinstance(keep, bool) else f"'{keep}'"
        cfg = load_config(_cfg(tmp_path, BASE + f"training: {{resume: {str(value).lower()}}}\n"))
        assert cfg.training.resume == keep


def test_config_with_bom_and_max_steps_without_epochs(tmp_path):
    from vfm.train.config import load_config

    (tmp_path / "m").mkdir()
    cfg = load_config(_cfg(tmp_path, ("\ufeff" + BASE + "training: {epochs: 0, max_steps: 3}\n").encode("utf-8")))
    assert cfg.training.max_steps == 3 and cfg.labels == ["a", "b"]


# ------------------------------------------------------------------------------ data ---
def test_csv_header_names_are_stripped(tmp_path):
    from vfm.data import load_examples

    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbftext , label\r\nhello, pos \r\n\r\nbye,neg\r\n")
    examples, report = load_examples(str(path))
    assert [(e.text, e.label, e.line) for e in examples] == [("hello", "pos", 2), ("bye", "neg", 4)]
    assert report.unlabelled == 0 and report.blank_lines == 1 and examples[0].meta == {}


def test_train_without_labelled_rows_fails_before_training(tmp_path, capsys):
    # a misspelt label column used to send every row to the unlabelled pool and "train" on nothing
    (tmp_path / "m").mkdir()
    (tmp_path / "train.csv").write_text("text,labels\nrefund my money,billing\npackage late,shipping\n")
    cfg = _cfg(tmp_path, "model: m\nlabels: [billing, shipping]\ndata: {train: train.csv}\n"
                         "training: {output_dir: run, progress: false, tensorboard: false}\n")
    assert main(["train", cfg]) == 2
    line = _one_line_error(capsys, "train")
    assert "train.csv: no labelled training rows" in line and "'label'" in line
    assert not os.path.exists(tmp_path / "run" / "final")
    (tmp_path / "train.csv").write_text("text,label\n")  # empty: a different cause, a different message
    assert main(["train", cfg]) == 2
    assert "train.csv: no rows loaded" in _one_line_error(capsys, "train")


def test_data_edge_cases_against_plain_python(tmp_path):
    import unicodedata

    from vfm.data import Example, augment, deduplicate, load_examples, stratified_split

    # non-UTF-8 row reported with its line, the others kept
    path = tmp_path / "n.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "label": "x"}\n\n{"text": "ok", "label": " y "}\r\n')
    examples, report = load_examples(str(path))
    assert [(e.text, e.label) for e in examples] == [("ok", "y")]
    assert [(m.line, m.reason) for m in report.malformed] == [(1, "not valid UTF-8")] and report.blank_lines == 1
    # NFC and NFD spellings are exact duplicates
    nfc, nfd = "caf\u00e9 au lait", "cafe\u0301 au lait"
    assert nfc != nfd and unicodedata.normalize("NFC", nfd) == nfc
    kept, rep = deduplicate([Example(nfc, "a"), Example(nfd, "b")], near=False)
    assert [e.text for e in kept] == [nfc] and len(rep.details["label_conflicts"]) == 1
    # fewer rows than parts, a class of one: nothing dropped, every row in exactly one part
    rows = [Example(str(i), "big" if i else "single") for i in range(3)]
    parts = stratified_split(rows, (0.6, 0.2, 0.2), seed=1)
    assert sorted(e.text for p in parts for e in p) == ["0", "1", "2"]
    # augmentation: same seed, same output; other seed, some difference
    src = [Example("the quick brown fox jumps over the lazy dog", "a"), Example("my parcel arrived late", "b")]
    a1, a2 = augment(src, n_per_example=3, seed=5)[0], augment(src, n_per_example=3, seed=5)[0]
    a3 = augment(src, n_per_example=3, seed=6)[0]
    assert [e.text for e in a1] == [e.text for e in a2] and [e.text for e in a1] != [e.text for e in a3]


# ----------------------------------------------------------------------- atomic writes ---
def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_reports_and_teacher_cache_get_normal_permissions(tmp_path, umask_022):
    import torch

    from vfm.evaluate import write_csv, write_json
    from vfm.teacher import TeacherTopK, save_topk

    write_json(str(tmp_path / "m.json"), {"a": 1})
    write_csv(str(tmp_path / "p.csv"), ["x"], [[1]])
    save_topk(str(tmp_path / "t.safetensors"), TeacherTopK(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1),
                                                            ["a"]))
    # an ordinary open() under umask 022 makes 0o644; mkstemp made these 0o600 (unreadable to the group)
    with open(tmp_path / "plain.txt", "w") as fh:
        fh.write("x")
    assert _mode(tmp_path / "plain.txt") == umask_022
    for name in ("m.json", "p.csv", "t.safetensors"):
        assert _mode(tmp_path / name) == umask_022, name


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import torch

    import vfm.evaluate as ev
    from vfm.teacher import TeacherTopK, load_topk, save_topk

    target = tmp_path / "metrics.json"
    ev.write_json(str(target), {"good": True})
    cache = tmp_path / "t.safetensors"
    save_topk(str(cache), TeacherTopK(torch.tensor([[1], [0]]), torch.tensor([[-0.1], [-0.2]]), ["a", "b"]))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ev.write_json(str(target), {"good": False})
    with pytest.raises(OSError, match="disk full"):
        save_topk(str(cache), TeacherTopK(torch.tensor([[0]]), torch.tensor([[0.0]]), ["a", "b"]))
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"good": True}
    assert load_topk(str(cache)).indices.tolist() == [[1], [0]]
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "t.safetensors"]  # no temporary file left


# --------------------------------------------------------------------------- metrics ---
def _hand_prf(gold, pred, label):
    tp = sum(g == label and p == label for g, p in zip(gold, pred))
    fp = sum(g != label and p == label for g, p in zip(gold, pred))
    fn = sum(g == label and p != label for g, p in zip(gold, pred))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return prec, rec, f1


def test_classification_scores_by_hand_with_absent_classes():
    from vfm.evaluate import classification_report

    labels = ["a", "b", "c", "d"]  # c: gold only (never predicted); d: predicted only (never gold)
    gold = [0, 0, 1, 2, 2, 1]
    pred = [0, 1, 1, 3, 0, 1]
    rep = classification_report(gold, pred, labels)
    f1s = [_hand_prf(gold, pred, k)[2] for k in range(4)]
    assert rep.accuracy == pytest.approx(3 / 6)
    assert rep.averages["macro"]["f1"] == pytest.approx(sum(f1s) / 4)
    assert rep.per_label["c"]["precision"] == 0.0 and rep.per_label["d"]["recall"] == 0.0
    assert rep.averages["micro"]["f1"] == pytest.approx(3 / 6)
    empty = classification_report([], [], labels)
    assert empty.accuracy == 0.0 and empty.averages["macro"]["f1"] == 0.0 and empty.confusion.sum() == 0


def test_entity_scores_by_hand():
    from vfm.evaluate import entity_report

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG"]]
    # spans by hand: gold {PER 0-2, LOC 3-4}, {ORG 1-3 (a stray I- starts an entity)}
    #                pred {PER 0-2, ORG 3-4}, {ORG 1-3}
    rep = entity_report(gold, pred)
    assert rep["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert rep["LOC"]["recall"] == 0.0 and rep["LOC"]["support"] == 1
    assert rep["ORG"]["precision"] == pytest.approx(0.5) and rep["ORG"]["recall"] == pytest.approx(1.0)
    assert rep["micro"]["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert rep["macro"]["f1"] == pytest.approx((1.0 + 0.0 + 2 * 0.5 / 1.5) / 3)
    assert entity_report([], [])["micro"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# --------------------------------------------------------------------------- teacher ---
def test_teacher_cache_not_reused_after_the_teacher_is_retrained_in_place(tmp_path):
    import torch

    from test_train_utils import tiny_model, tiny_tokenizer
    from vfm.teacher import build_teacher

    folder = str(tmp_path / "teacher")
    tiny_tokenizer(folder).save_pretrained(folder)
    tiny_model(3, seed=0).save_pretrained(folder)
    texts, cache = ["refund my money", "package late"], str(tmp_path / "c.safetensors")
    _, reused = build_teacher("model", folder, texts, k=2, cache_path=cache, progress=False)
    assert not reused
    _, reused = build_teacher("model", folder, texts, k=2, cache_path=cache, progress=False)
    assert reused  # unchanged teacher: the cache is used
    tiny_model(3, seed=1).save_pretrained(folder)  # retrained: same config, same file sizes, new weights
    os.utime(os.path.join(folder, "model.safetensors"), ns=(1, 1))  # a different mtime even on a coarse clock
    cached, reused = build_teacher("model", folder, texts, k=2, cache_path=cache, progress=False)
    fresh, _ = build_teacher("model", folder, texts, k=2, cache_path=None, progress=False)
    assert not reused
    assert torch.equal(cached.indices, fresh.indices) and torch.equal(cached.logprobs, fresh.logprobs)


# ---------------------------------------------------------------------- vfm eval tagging ---
def _tiny_tagger(tmp_path):
    import torch
    from transformers import BertConfig, BertForTokenClassification

    from test_train_utils import WORDS, tiny_tokenizer

    tags = ["O", "B-ITEM", "I-ITEM"]
    folder = str(tmp_path / "tagger")
    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    BertForTokenClassification(BertConfig(
        vocab_size=5 + len(set(WORDS)), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=3, id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)})).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_eval_tagging_with_rules_no_progress_and_full_report(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    folder = _tiny_tagger(tmp_path)
    (tmp_path / "t.conll").write_text("refund O\nmy O\ncard B-ITEM\n\ntrack O\nparcel B-ITEM\ndelivery I-ITEM\n")
    (tmp_path / "rules.yaml").write_text("task: tagging\nlabels: [O, B-ITEM, I-ITEM]\n")
    capsys.readouterr()
    try:
        assert main(["eval", "--model", folder, "--data", str(tmp_path / "t.conll"), "--rules",
                     str(tmp_path / "rules.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    finally:
        hf_logging.enable_progress_bar()
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "predict" not in captured.err  # no tqdm bar
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    report = (tmp_path / "out" / "report.txt").read_text()
    # report.txt holds what was printed, the constrained-decoding line included
    assert "with the rules (constrained Viterbi" in report
    assert f"{metrics['model+rules']['micro']['f1']:.3f}" in report.splitlines()[-1]
    assert report.strip() in captured.out


def test_teacher_default_top_k_above_the_teachers_label_count(tmp_path):
    # TeacherConfig's default top_k is 5; a model teacher with 3 labels failed after running over every text
    import torch
    from transformers import BertConfig, BertForTokenClassification

    from test_train_utils import WORDS, tiny_model, tiny_tokenizer
    from vfm.teacher import build_teacher
    from vfm.train.config import TeacherConfig
    from vfm.train.tagging import model_teacher_words

    assert TeacherConfig().top_k == 5
    folder = str(tmp_path / "teacher")
    tiny_tokenizer(folder).save_pretrained(folder)
    model = tiny_model(3, seed=0).eval()
    model.save_pretrained(folder)
    texts = ["refund my money", "package late"]
    topk, _ = build_teacher("model", folder, texts, k=5, progress=False)
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    with torch.no_grad():
        want = torch.log_softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    got = torch.full_like(want, float("nan")).scatter(1, topk.indices, topk.logprobs)
    assert topk.indices.shape == (2, 3)  # every label kept: the full distribution
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        build_teacher("model", folder, texts, k=0, progress=False)
    tagger = str(tmp_path / "tagger")
    tiny_tokenizer(tagger).save_pretrained(tagger)
    BertForTokenClassification(BertConfig(
        vocab_size=5 + len(set(WORDS)), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=3)).save_pretrained(tagger)
    words = model_teacher_words(tagger, [["refund", "my", "card"]], 5, progress=False)
    assert words.indices.shape == (3, 3) and sorted(words.indices[0].tolist()) == [0, 1, 2]


# -------------------------------------------------------------------------- knowledge ---
def test_lexicon_not_utf8_names_file_and_line(tmp_path):
    from vfm.data import Example, augment
    from vfm.knowledge.lexicon import load_lexicon

    lex = tmp_path / "syn.txt"
    lex.write_bytes(b"\xef\xbb\xbfheart attack, myocardial infarction\r\n# comment\r\ncaf\xe9, coffee\r\n")
    with pytest.raises(ValueError, match=r"syn.txt:3: not valid UTF-8"):
        load_lexicon(str(lex))
    with pytest.raises(ValueError, match=r"syn.txt:3: not valid UTF-8"):  # as data.lexicon of vfm train
        augment([Example("my heart attack", "a")], lexicon=str(lex))
    lex.write_bytes(b"\xef\xbb\xbfheart attack, myocardial infarction\r\n# comment\r\ncafe, coffee\r\n")
    assert load_lexicon(str(lex)) == {"heart attack": ["myocardial infarction"],
                                      "myocardial infarction": ["heart attack"],
                                      "cafe": ["coffee"], "coffee": ["cafe"]}


def test_train_model_path_must_be_a_local_folder(tmp_path, capsys):
    # a misspelt model folder was looked up on the Hugging Face Hub (a download, or a minute of retries offline)
    (tmp_path / "train.csv").write_text("text,label\nrefund my money,billing\npackage late,shipping\n")
    (tmp_path / "student").mkdir()
    for model, teacher, bad in (("nosuchmodel", "", "model 'nosuchmodel'"),
                                ("student", "teacher: {kind: model, model: nosuchteacher}\n",
                                 "teacher.model 'nosuchteacher'")):
        cfg = _cfg(tmp_path, f"model: {model}\nlabels: [billing, shipping]\ndata: {{train: train.csv}}\n{teacher}"
                             "training: {output_dir: run, progress: false, tensorboard: false}\n")
        assert main(["train", cfg]) == 2
        line = _one_line_error(capsys, "train")
        assert bad in line and "not a local model directory" in line
    assert not os.path.exists(tmp_path / "run")  # it stopped before any data preparation


# ----------------------------------------------------------------------------- train ---
def test_resumed_run_keeps_metrics_csv_history_and_quiet_prints_nothing(tmp_path, capsys, monkeypatch):
    import csv

    import torch

    from test_train_utils import TEXTS, save_tiny
    from vfm.train import train

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    save_tiny("student")
    labels = ("billing", "shipping", "tech")
    with open("train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label")] + [(t, labels[k]) for k, ts in TEXTS.items() for t in ts])

    def run(epochs):
        _cfg(tmp_path, f"model: student\nlabels: [billing, shipping, tech]\n"
                       "data: {train: train.csv, max_length: 16, eval_fraction: 0.34}\n"
                       f"training: {{output_dir: run, epochs: {epochs}, batch_size: 4, logging_steps: 1, "
                       "progress: false, tensorboard: false, save_total_limit: 3}\n")
        train(str(tmp_path / "cfg.yaml"), quiet=True)
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]

    capsys.readouterr()
    first = run(1)  # 12 train rows, batch 4: steps 1-3, evaluation at step 3, then the run summary
    steps_first = [int(r["step"]) for r in first]
    assert steps_first[:4] == [1, 2, 3, 3] and "eval_loss" in first[3]
    second = run(2)  # resume=auto from checkpoint-3: the epoch-1 rows stay, epoch 2 follows
    assert second[:4] == first[:4]
    assert [int(r["step"]) for r in second[4:7]] == [4, 5, 6]
    out = capsys.readouterr().out
    assert "epoch" not in out and "best checkpoint" not in out, out  # quiet=True: nothing printed


def test_misspelt_training_metric_fails_before_training(tmp_path, capsys):
    # Transformers raised a KeyError (a traceback) after the first epoch
    (tmp_path / "student").mkdir()
    (tmp_path / "train.csv").write_text("text,label\nrefund my money,billing\npackage late,shipping\n")
    cfg = _cfg(tmp_path, "model: student\nlabels: [billing, shipping]\ndata: {train: train.csv}\n"
                         "training: {output_dir: run, metric: macro-f1}\n")
    assert main(["train", cfg]) == 2
    assert "training.metric 'macro-f1' is not a classification metric" in _one_line_error(capsys, "train")
    assert not os.path.exists(tmp_path / "run" / "data_report.txt")


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_misspelt_peft_option_is_a_value_error(method):
    # LoraConfig(rr=8) raised a bare TypeError: a traceback from vfm train instead of a config error
    from test_train_utils import tiny_model
    from vfm.train.model import apply_peft

    with pytest.raises(ValueError, match=rf"peft.method '{method}' .*unexpected keyword argument 'rr'"):
        apply_peft(tiny_model(), method, {"rr": 8}, total_steps=10)


def test_entity_scores_refuse_non_bio_tags():
    # BIOES tags were read as O: S-PER / E-PER entities vanished from the scores without a word
    from vfm.evaluate import entity_report

    with pytest.raises(ValueError, match=r"sentence 1: gold tag 'S-PER' is not BIO"):
        entity_report([["O"], ["S-PER", "O"]], [["O"], ["B-PER", "O"]])
    with pytest.raises(ValueError, match=r"sentence 0: pred tag '0' is not BIO"):
        entity_report([["B-PER", "O"]], [["B-PER", "0"]])


def test_eval_rules_decoding_with_a_word_the_tokenizer_drops(tmp_path):
    # a zero-width word has no subword: the constrained decoding put every later word's tag (and
    # token-rule mask) one word to the left
    from test_train_utils import tiny_tokenizer
    from vfm.evaluate import evaluate_model

    folder = _tiny_tagger(tmp_path)
    words = ["refund", "\u200b", "my", "card"]
    assert tiny_tokenizer(str(tmp_path / "t"))(words, is_split_into_words=True).word_ids() == [None, 0, 2, 3, None]
    (tmp_path / "t.jsonl").write_text(json.dumps({"tokens": words, "tags": ["O", "O", "O", "B-ITEM"]}) + "\n")
    # the token rules fix every word's tag whatever the random model says: card is B-ITEM, the rest O
    (tmp_path / "r.yaml").write_text("task: tagging\nentities: {ITEM: an item}\ntoken_rules:\n"
                                     "  - {name: card, keywords: [card], allow: [B-ITEM]}\n"
                                     "  - {name: other, regex: '(refund|my)', allow: [O]}\n")
    res = evaluate_model(folder, str(tmp_path / "t.jsonl"), str(tmp_path / "out"), rules_path=str(tmp_path / "r.yaml"),
                         quiet=True, progress=False)
    assert res["model+rules"]["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_final_model_save_is_all_or_nothing(tmp_path, umask_022):
    from vfm.train.run import _save_final

    class Saver:
        def __init__(self, text, fail=False, name="model.safetensors"):
            self.text, self.fail, self.name = text, fail, name

        def save_pretrained(self, folder):
            os.makedirs(folder, exist_ok=True)  # as Transformers does
            with open(os.path.join(folder, self.name), "w") as fh:
                fh.write(self.text[: len(self.text) // 2])  # half of it, then the disk fills up
                if self.fail:
                    raise OSError("disk full")
                fh.write(self.text[len(self.text) // 2:])

    final = tmp_path / "run" / "final"
    final.parent.mkdir()
    tok = Saver("vocab", name="vocab.txt")
    _save_final(Saver("first model"), tok, str(final), "none")
    assert (final / "model.safetensors").read_text() == "first model"
    with pytest.raises(OSError, match="disk full"):
        _save_final(Saver("second model", fail=True), tok, str(final), "none")
    assert (final / "model.safetensors").read_text() == "first model"  # the good model is still there
    _save_final(Saver("third model"), tok, str(final), "none")
    assert (final / "model.safetensors").read_text() == "third model"
    assert os.listdir(final.parent) == ["final"]  # no temporary folders left
    assert _mode(final) == 0o755 and _mode(final / "model.safetensors") == 0o644


def test_tagging_run_test_scores_count_truncated_entities_as_misses(tmp_path, monkeypatch):
    # test_metrics.json dropped the words cut off at data.max_length from the gold side, so it
    # scored higher than vfm eval on the same model and file
    import torch

    from test_train_tagging import SENTENCES, _conll, save_model
    from vfm.evaluate import evaluate_model
    from vfm.train import train

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    save_model("student", ["x", "y"])
    _conll("train.conll", SENTENCES[:6])
    _conll("test.conll", SENTENCES[6:])
    _cfg(tmp_path, "model: student\ntask: tagging\nlabels: [O, B-DRUG, I-DRUG, B-DOSE, I-DOSE]\n"
                   "data: {train: train.conll, eval: test.conll, test: test.conll, max_length: 6}\n"
                   "training: {output_dir: run, epochs: 1, batch_size: 4, progress: false, tensorboard: false, "
                   "constrained_decoding: false}\n")
    train(str(tmp_path / "cfg.yaml"), quiet=True)
    scores = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["entity"]
    n_gold = sum(tags.split().count("B-DRUG") + tags.split().count("B-DOSE") for _, tags in SENTENCES[6:])
    assert sum(v["support"] for k, v in scores.items() if k not in ("micro", "macro", "weighted")) == n_gold
    again = evaluate_model(str(tmp_path / "run" / "final"), "test.conll", "eval", max_length=6, quiet=True,
                           progress=False)["entity"]
    for key in ("micro", "macro"):
        assert scores[key] == pytest.approx(again[key])


def test_other_label_count_student_and_stale_checkpoint(tmp_path, capsys, monkeypatch):
    # a classifier checkpoint with 3 labels as the student of a 2-label task failed to load (RuntimeError
    # traceback); an output_dir holding a run with other labels failed deep inside trainer.train()
    import csv

    import torch

    from test_train_utils import TEXTS, save_tiny

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    save_tiny("student", labels=("billing", "shipping", "tech"))

    def run(labels):
        with open("train.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("text", "label")] + [(t, labels[k]) for k, ts in TEXTS.items()
                                                            if k < len(labels) for t in ts])
        cfg = _cfg(tmp_path, f"model: student\nlabels: [{', '.join(labels)}]\n"
                             "data: {train: train.csv, max_length: 16, eval_fraction: 0.34}\n"
                             "training: {output_dir: run, epochs: 1, batch_size: 4, progress: false, "
                             "tensorboard: false}\n")
        return main(["train", cfg])

    assert run(["refund", "delivery"]) == 0  # 2 labels on a 3-label checkpoint: a new head
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "refund", "1": "delivery"}
    capsys.readouterr()
    assert run(["refund", "delivery", "app"]) == 2  # resume=auto would continue the 2-label run
    line = _one_line_error(capsys, "train")
    assert "trained on the labels ['refund', 'delivery']" in line and "training.output_dir" in line


def test_near_duplicate_progress_bar_can_be_silenced(capsys, monkeypatch):
    # the bar appeared (from 5000 texts on) even under training.progress: false
    import vfm.data.dedup as dd
    from vfm.data import Example, deduplicate

    monkeypatch.setattr(dd, "_PROGRESS_MIN", 3)  # as if there were 5000 texts
    rows = [Example(t) for t in ("my parcel is late", "refund my card", "app crash", "my parcel is late!")]
    kept, _ = deduplicate(rows, exact=False, threshold=0.5, progress=False)
    assert "near-duplicates" not in capsys.readouterr().err
    again, _ = deduplicate(rows, exact=False, threshold=0.5)
    assert "near-duplicates" in capsys.readouterr().err  # shown by default
    assert [e.text for e in kept] == [e.text for e in again] == ["my parcel is late", "refund my card", "app crash"]


def test_utf16_data_file_is_named(tmp_path):
    # every line used to be "not valid UTF-8" (or a header of mojibake): say what the file is
    from vfm.data import load_examples

    for suffix in ("tsv", "jsonl", "conll"):
        path = tmp_path / f"d.{suffix}"
        text = {"tsv": "text\tlabel\nhello\tpos\n", "jsonl": '{"text": "hello"}\n', "conll": "hello O\n"}[suffix]
        path.write_bytes(text.encode("utf-16"))  # with its BOM
        with pytest.raises(ValueError, match=r"d\.%s: UTF-16 text .*save it as UTF-8" % suffix):
            load_examples(str(path))


def test_foreign_teacher_cache_is_recomputed_not_a_crash(tmp_path):
    # a cache without label names or with float indices raised KeyError / TypeError out of build_teacher
    import torch
    from safetensors.torch import save_file

    from test_train_utils import tiny_model, tiny_tokenizer
    from vfm.teacher import build_teacher, load_topk

    folder = str(tmp_path / "teacher")
    tiny_tokenizer(folder).save_pretrained(folder)
    tiny_model(3).save_pretrained(folder)
    cache = str(tmp_path / "c.safetensors")
    bad_files = [
        ({"indices": torch.zeros(2, 1, dtype=torch.long), "logprobs": torch.zeros(2, 1)}, {"format": "vfm-teacher-topk/1"}),
        ({"indices": torch.zeros(2, 1), "logprobs": torch.zeros(2, 1)}, {"format": "vfm-teacher-topk/1", "labels": ["a"]}),
        ({"indices": torch.zeros(2, 1, dtype=torch.long), "logprobs": torch.zeros(2, 1)}, ["not", "a", "dict"]),
    ]
    for tensors, header in bad_files:
        save_file(tensors, cache, metadata={"vfm_teacher": json.dumps(header)})
        with pytest.raises(ValueError, match="c.safetensors"):
            load_topk(cache)
        topk, reused = build_teacher("model", folder, ["refund my money", "package late"], k=2, cache_path=cache,
                                     progress=False)
        assert not reused and topk.indices.shape == (2, 2) and load_topk(cache).labels == topk.labels


def test_max_length_beyond_the_models_positions_is_capped_with_a_note(tmp_path, capsys, monkeypatch):
    # data.max_length (default 128) above max_position_embeddings failed with a tensor-size RuntimeError
    # at the first text longer than the model's positions
    import torch

    from test_train_utils import save_tiny
    from vfm.train import load_config, train
    from vfm.train.model import max_positions

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    save_tiny("student")  # max_position_embeddings 64
    assert max_positions("student") == 64
    long_text = "refund my money please " * 20  # 80 words: 82 tokens
    rows = [(long_text, "billing"), ("package late", "shipping"), ("bill paid twice", "billing"),
            ("parcel late", "shipping"), ("refund the charge", "billing"), ("track my parcel", "shipping")]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    cfg = load_config(_cfg(tmp_path, "model: student\nlabels: [billing, shipping]\n"
                                     "data: {train: train.csv, eval_fraction: 0.34}\n"
                                     "training: {output_dir: run, epochs: 1, batch_size: 8, progress: false, "
                                     "tensorboard: false}\n"))
    capsys.readouterr()
    result = train(cfg)
    assert "data.max_length=128 exceeds the 64 positions of model" in capsys.readouterr().out
    assert cfg.data.max_length == 128 and os.path.isdir(result.final_model_dir)  # the caller's config untouched
    from transformers import RobertaConfig

    os.makedirs("roberta")
    RobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained("roberta")
    assert max_positions("roberta") == 512


def test_eval_max_length_beyond_the_models_positions(tmp_path, capsys):
    from test_train_utils import save_tiny

    model = save_tiny(str(tmp_path / "m"))  # 64 positions
    long_text = "refund my money please " * 20
    (tmp_path / "d.csv").write_text(f"text,label\n{long_text},billing\npackage late,shipping\n")
    from transformers.utils import logging as hf_logging

    try:
        assert main(["eval", "--model", model, "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 0  # the default --max-length 128 used to fail on the long row
    finally:
        hf_logging.enable_progress_bar()
    assert "--max-length=128 exceeds the 64 positions of --model" in capsys.readouterr().out
    assert len((tmp_path / "o" / "predictions.csv").read_text().splitlines()) == 3


def test_eval_refuses_a_model_of_the_other_task(tmp_path, capsys):
    # a token classifier on a labelled CSV was loaded as a sequence classifier with a random head and
    # its (random) scores written, exit 0
    from test_train_utils import save_tiny

    tagger = _tiny_tagger(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\nrefund my card,O\n")
    capsys.readouterr()
    assert main(["eval", "--model", tagger, "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "is a BertForTokenClassification but --data holds sentence labels" in _one_line_error(capsys, "eval")
    classifier = save_tiny(str(tmp_path / "cls"))
    (tmp_path / "t.conll").write_text("refund O\ncard B-ITEM\n")
    capsys.readouterr()
    assert main(["eval", "--model", classifier, "--data", str(tmp_path / "t.conll"), "--out", str(tmp_path / "o")]) == 2
    assert "is a BertForSequenceClassification but --data holds BIO-tagged" in _one_line_error(capsys, "eval")
    assert not os.path.exists(tmp_path / "o")


def test_model_teacher_needs_a_classification_head(tmp_path):
    # an encoder without a head (kind: model on the built-in MiniLM) or a token classifier got a random
    # head, and that noise was distilled into the student
    from transformers import BertConfig, BertModel

    from test_train_utils import save_tiny, tiny_tokenizer
    from vfm.teacher import build_teacher
    from vfm.train.tagging import model_teacher_words

    encoder = str(tmp_path / "encoder")
    tiny_tokenizer(encoder).save_pretrained(encoder)
    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(encoder)
    with pytest.raises(ValueError, match=r"ForSequenceClassification checkpoint, but .* is a BertModel .*zero_shot"):
        build_teacher("model", encoder, ["refund my money"], k=1, progress=False)
    tagger = _tiny_tagger(tmp_path)
    with pytest.raises(ValueError, match=r"is a BertForTokenClassification$"):
        build_teacher("model", tagger, ["refund my money"], k=1, progress=False)
    with pytest.raises(ValueError, match=r"tagging teacher .* is a BertForSequenceClassification"):
        model_teacher_words(save_tiny(str(tmp_path / "cls")), [["refund", "card"]], 1)
    topk, _ = build_teacher("model", str(tmp_path / "cls"), ["refund my money"], k=1, progress=False)
    assert topk.indices.shape == (1, 1)


def test_eval_prepares_texts_as_the_model_was_trained(tmp_path, monkeypatch):
    # vfm train cleans the texts (data.clean, on by default) but vfm eval scored the raw file, so
    # its scores differed from the run's test_metrics.json wherever cleaning changes a text
    import csv

    import torch

    from test_train_utils import TEXTS, save_tiny
    from vfm.data import clean_text
    from vfm.evaluate import evaluate_model

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    save_tiny("student", labels=("billing", "shipping", "tech"))
    labels = ["billing", "shipping", "tech"]
    rows = [(t, labels[k]) for k, ts in TEXTS.items() for t in ts]
    raw_test = [("<b>REFUND</b> my  card", "billing"), ("ｐａｃｋａｇｅ late\u200b", "shipping"),
                ("the app&nbsp;crash", "tech"), ("login <i>error</i>", "tech")]
    for name, data in (("train.csv", rows), ("test.csv", raw_test)):
        with open(name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([("text", "label")] + list(data))
    cfg = _cfg(tmp_path, "model: student\nlabels: [billing, shipping, tech]\n"
                         "data: {train: train.csv, test: test.csv, max_length: 16, eval_fraction: 0.34, "
                         "deduplicate: false}\n"
                         "training: {output_dir: run, epochs: 1, batch_size: 4, progress: false, tensorboard: false}\n")
    assert main(["train", cfg]) == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "vfm_preprocessing.json").read_text()) == {"clean": True}

    def predicted(out):
        with open(tmp_path / out / "predictions.csv", encoding="utf-8") as fh:
            return [(r["text"], r["predicted"]) for r in csv.DictReader(fh)]

    evaluate_model(str(final), "test.csv", "eval", quiet=True, progress=False)
    evaluate_model(str(final), "test.csv", "raw", quiet=True, progress=False, clean=False)
    cleaned = [clean_text(t)[0] for t, _ in raw_test]
    assert cleaned != [t for t, _ in raw_test]  # cleaning changes every one of them
    assert [t for t, _ in predicted("eval")] == cleaned
    assert [t for t, _ in predicted("raw")] == [t for t, _ in raw_test]
    want = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert got["confusion"] == want["confusion"] and got["accuracy"] == pytest.approx(want["accuracy"])
    # a model folder without the file (not trained by vfm train) is scored on the raw texts
    (final / "vfm_preprocessing.json").unlink()
    evaluate_model(str(final), "test.csv", "plain", quiet=True, progress=False)
    assert predicted("plain") == predicted("raw")


def test_conllu_file_is_refused_not_misread(tmp_path):
    # .conllu went to the 'token ... tag' reader: the ID column became the tokens and MISC the tags
    from vfm.data import load_examples

    path = tmp_path / "dev.conllu"
    path.write_text("# sent_id = 1\n1\tAspirin\taspirin\tNOUN\t_\t_\t0\troot\t_\t_\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev\.conllu.*CoNLL-U"):
        load_examples(str(path))


def test_augmented_copies_of_a_row_are_all_different(tmp_path):
    # n_per_example=3 could add the same copy twice ("angina today" twice)
    from vfm.data import Example, augment

    rows = [Example("angina today", label="cardio"), Example("chest pain at night again", label="cardio"),
            Example("the patient reports mild fever and cough", label="resp")]
    for seed in range(20):
        out, report = augment(rows, n_per_example=3, seed=seed, lexicon={"angina": ["chest pain"]})
        for i, ex in enumerate(rows):
            copies = [o.text for o in out[len(rows):] if o.meta["augmented_from"] == i]
            assert len(copies) == len(set(copies)), (seed, copies)
            assert ex.text not in copies
        assert len(out) - len(rows) + len(report.skipped) == 3 * len(rows)  # every copy made or reported


@pytest.mark.parametrize("keyword,text,fires", [
    ("café", "deux cafés", False), ("café", "un café noir", True),          # Latin with accents
    ("кот", "который час", False), ("кот", "мой кот спит", True),            # Cyrillic
    ("art", "le héart", False), ("heart", "sweetheart", False), ("heart", "heart attack", True),
    ("Übelkeit", "Magenübelkeit", False), ("übelkeit", "Übelkeit seit gestern", True),
    ("心脏", "患者心脏不适", True), ("heart", "心heart病", True),               # CJK: substrings
    ("ปวด", "ผู้ป่วยปวดหัว", True), ("환자", "환자가 왔다", True),               # Thai, Korean: substrings
])
def test_keyword_word_boundaries_in_every_space_separated_script(keyword, text, fires):
    # boundaries applied only at ASCII letters: café fired inside cafés and кот inside который
    from vfm.knowledge.matching import keyword_pattern

    assert bool(keyword_pattern([keyword], case_sensitive=False).search(text)) is fires
