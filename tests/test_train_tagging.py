"""`vfm train` with `task: tagging`: word -> subword alignment, the per-token loss against
knowledge_cross_entropy on hand-picked rows, constrained decoding in the metrics, config errors,
and an end-to-end run on tiny CoNLL files whose final model `vfm eval` scores."""

import csv
import json
import os

import pytest
import torch

VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] take took give aspirin ibu ##pro ##fen 200 100 ##mg ##ml daily with "
         "water and the patient now . , pain for").split()
TAGS = ["O", "B-DRUG", "I-DRUG", "B-DOSE", "I-DOSE"]
RULES = """\
task: tagging
entities:
  DRUG: "a medicine"
  DOSE: "an amount"
gazetteers:
  - name: drugs
    entity: DRUG
    entries: [aspirin, ibuprofen]
token_rules:
  - name: dose_units
    regex: "\\\\d+(mg|ml)"
    allow: [DOSE]
  - name: punctuation
    regex: "[.,]"
    allow: [O]
"""


def tokenizer(folder=None):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    if folder:
        tok.save_pretrained(folder)
    return tok


def token_model(labels, seed=0, dropout=0.0):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return BertForTokenClassification(cfg)


def save_model(folder, labels, seed=0):
    token_model(labels, seed, dropout=0.1).save_pretrained(folder)
    tokenizer(folder)
    return folder


# ------------------------------------------------------------------------ alignment --
def test_alignment_by_hand():
    from vfm.train.tagging import encode_tagging_rows

    tok = tokenizer()
    sent = ["take", "ibuprofen", "200mg", "."]
    enc = tok(sent, is_split_into_words=True)
    # the hand alignment below assumes this subword split
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == \
        ["[CLS]", "take", "ibu", "##pro", "##fen", "200", "##mg", ".", "[SEP]"]
    teacher = (torch.tensor([[0, 1], [1, 2], [3, 0], [0, -1]]), torch.tensor([[-.1, -2.], [-.2, -3.], [-.3, -4.],
                                                                               [-.4, 0.]]))
    ds = encode_tagging_rows(tok, [sent, ["take", "aspirin"]], [[0, 1, 3, 0], None], max_length=32,
                             group_ids=[[-1, 0, 1, 2], [-1, 0]],
                             teacher=[teacher, (torch.tensor([[0, 1], [1, 2]]), torch.zeros(2, 2))])
    row = ds[0]
    x = -100
    assert row["labels"] == [x, 0, 1, x, x, 3, x, 0, x]
    assert row["soft_mask"] == [False, True, True, False, False, True, False, True, False]
    assert row["group_ids"] == [-1, -1, 0, -1, -1, 1, -1, 2, -1]
    assert row["teacher_indices"].tolist() == [[-1, -1], [0, 1], [1, 2], [-1, -1], [-1, -1], [3, 0], [-1, -1],
                                               [0, -1], [-1, -1]]
    assert row["teacher_logprobs"][5].tolist() == pytest.approx([-.3, -4.])
    pool = ds[1]  # an unlabelled sentence: no labels, but KD / rules act on its words
    assert pool["labels"] == [x, x, x, x]
    assert pool["soft_mask"] == [False, True, True, False]
    assert ds.truncated_words == 0
    short = encode_tagging_rows(tok, [sent], [[0, 1, 3, 0]], max_length=5)  # [CLS] take ibu ##pro [SEP]
    assert short[0]["labels"] == [x, 0, 1, x, x] and short.truncated_words == 2


def test_alignment_errors():
    from vfm.train.tagging import encode_tagging_rows

    with pytest.raises(ValueError, match=r"tags\[0\] has 1 entries for 2 words"):
        encode_tagging_rows(tokenizer(), [["take", "aspirin"]], [[0]])
    with pytest.raises(ValueError, match="group_ids has 2 sentences but there are 1"):
        encode_tagging_rows(tokenizer(), [["take"]], [[0]], group_ids=[[0], [1]])


def test_collator_pads_targets():
    from vfm.train.tagging import TaggingCollator, encode_tagging_rows

    tok = tokenizer()
    ds = encode_tagging_rows(tok, [["take", "aspirin"], ["take", "ibuprofen", "200mg"]], [[0, 1], [0, 1, 3]],
                             group_ids=[[-1, 0], [-1, 0, 1]],
                             teacher=[(torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 1)),
                                      (torch.ones(3, 1, dtype=torch.long), torch.zeros(3, 1))])
    batch = TaggingCollator(tok)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [-100, 0, 1, -100, -100, -100, -100, -100]
    assert batch["soft_mask"][0].tolist() == [False, True, True] + [False] * 5
    assert batch["group_ids"][0].tolist() == [-1, -1, 0] + [-1] * 5
    assert batch["teacher_indices"].shape == (2, 8, 1)
    assert batch["teacher_indices"][0, :, 0].tolist() == [-1, 1, 1] + [-1] * 5


def test_transition_masks_by_hand():
    from vfm.train.tagging import bio_tables, with_transitions

    trans, start = bio_tables(TAGS)
    T, F = True, False
    full = [T] * 5
    m1 = torch.tensor([full, full, [T, F, F, F, F]])  # third word: a rule allows only O
    m2 = torch.tensor([full])
    m3 = torch.tensor([full, full])
    m4 = torch.tensor([[F, F, F, F, T]])  # a rule allowing only I-DOSE on a first word
    out = with_transitions([m1, m2, m3, m4], [[1, 2, 0], [2], None, None], trans, start)
    assert out[0].tolist() == [[T, T, F, T, F],  # sentence start: no I-
                               [T, T, T, T, F],  # after B-DRUG: I-DRUG yes, I-DOSE no
                               [T, F, F, F, F]]  # the rule's O (allowed after I-DRUG)
    assert out[1].tolist() == [full]  # gold I-DRUG at the start (not BIO): the gold is never excluded
    assert out[2].tolist() == [[T, T, F, T, F], full]  # pool: only the start constraint
    assert out[3].tolist() == [[F, F, F, F, T]]  # empty intersection: the rule mask alone


# --------------------------------------------------------------------------- loss --
@pytest.mark.parametrize("penalty", ["mass", "posterior"])
def test_compute_loss_equals_kce_on_first_subwords(tmp_path, penalty):
    from transformers import TrainingArguments

    from vfm.functional import knowledge_cross_entropy
    from vfm.knowledge import load_rules
    from vfm.train.tagging import TaggingCollator, encode_tagging_rows
    from vfm.train.trainer import KnowledgeTrainer

    (tmp_path / "rules.yaml").write_text(RULES)
    rules = load_rules(str(tmp_path / "rules.yaml"))
    assert rules.labels == TAGS
    sents = [["take", "ibuprofen", "200mg", "."], ["give", "aspirin", "now"], ["the", "patient", "took", "aspirin"]]
    tags = [[0, 1, 3, 0], [0, 1, 0], None]  # the third sentence is an unlabelled pool sentence
    masks = rules.compile_tokens(sents)
    group_masks, flat_ids = masks.grouped()
    lengths = [len(s) for s in sents]
    gids = [g.tolist() for g in torch.split(flat_ids, lengths)]
    torch.manual_seed(1)
    teach = [(torch.stack([torch.randperm(5)[:2] for _ in s]), torch.log_softmax(torch.randn(len(s), 2), -1))
             for s in sents]
    tok = tokenizer()
    ds = encode_tagging_rows(tok, sents, tags, group_ids=gids, teacher=teach)
    batch = TaggingCollator(tok)([ds[i] for i in range(3)])
    model = token_model(TAGS).eval()
    opts = dict(ce_weight=1.0, kd_weight=0.7, temperature=2.0, penalty_weight=0.5, penalty=penalty)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), remove_unused_columns=False, report_to="none",
                             use_cpu=True)
    trainer = KnowledgeTrainer(model=model, args=args, loss_options=opts, group_masks=group_masks)
    loss = trainer.compute_loss(model, dict(batch))
    # by hand: the first subword of every word (positions read off the subword split), its word's
    # tag (or -100 in the pool sentence), the word's dense allowed mask and teacher row
    first = {0: [1, 2, 5, 7], 1: [1, 2, 3], 2: [1, 2, 3, 4]}  # [CLS] take ibu ##pro ##fen 200 ##mg . [SEP]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    rows = torch.cat([logits[b, first[b]] for b in range(3)])
    target = torch.tensor([0, 1, 3, 0, 0, 1, 0, -100, -100, -100, -100])
    t_idx = torch.cat([t[0] for t in teach])
    t_lp = torch.cat([t[1] for t in teach])
    allowed = torch.cat(list(masks))
    assert allowed[1].tolist() == [False, True, False, False, False]  # ibuprofen: B-DRUG only
    want = knowledge_cross_entropy(rows, target, teacher_topk=(t_idx, t_lp), allowed=allowed,
                                   soft_mask=torch.ones(11, dtype=torch.bool), **opts)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    # with the Trainer's row count (words that count for any term) the same holds
    n = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert int(n) == 11
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    want = knowledge_cross_entropy(rows, target, teacher_topk=(t_idx, t_lp), allowed=allowed,
                                   soft_mask=torch.ones(11, dtype=torch.bool), num_items_in_batch=11, **opts)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


# ------------------------------------------------------------------------ metrics --
def test_metrics_constrained_decoding():
    from types import SimpleNamespace

    from vfm.train.tagging import tagging_metrics

    # one sentence, words at positions 1..3; the argmax says O I-DRUG O (an invalid I after O)
    big, small = 5.0, 4.0
    logits = torch.zeros(1, 5, 5)
    logits[0, 1, 0] = big
    logits[0, 2, 2], logits[0, 2, 1] = big, small  # I-DRUG best, B-DRUG close behind
    logits[0, 3, 0] = big
    gold = torch.tensor([[-100, 0, 1, 0, -100]])
    pred = SimpleNamespace(predictions=logits.numpy(), label_ids=gold.numpy())
    free = tagging_metrics(TAGS, constrained=False)(pred)
    fixed = tagging_metrics(TAGS, constrained=True)(pred)
    # argmax: "I-DRUG" alone is still a DRUG entity at word 1 under the lenient convention -> correct too
    assert free["f1"] == pytest.approx(1.0) and free["token_accuracy"] == pytest.approx(2 / 3)
    # Viterbi may not start an entity with I-: it picks B-DRUG, all three words right
    assert fixed["f1"] == pytest.approx(1.0) and fixed["token_accuracy"] == pytest.approx(1.0)
    gold2 = torch.tensor([[-100, 0, 3, 0, -100]])  # gold says DOSE: both decodings miss it
    scores = tagging_metrics(TAGS)(SimpleNamespace(predictions=logits.numpy(), label_ids=gold2.numpy()))
    assert scores["f1"] == 0.0 and scores["precision"] == 0.0 and scores["recall"] == 0.0


# ------------------------------------------------------------------- end to end --
SENTENCES = [
    ("take aspirin 200mg daily .", "O B-DRUG B-DOSE O O"),
    ("give ibuprofen 100mg with water .", "O B-DRUG B-DOSE O O O"),
    ("the patient took aspirin for pain .", "O O O B-DRUG O O O"),
    ("take 200ml water now .", "O B-DOSE O O O"),
    ("give the patient ibuprofen now .", "O O O B-DRUG O O"),
    ("take ibuprofen 200mg and aspirin 100mg .", "O B-DRUG B-DOSE O B-DRUG B-DOSE O"),
    ("the patient took 100mg now .", "O O O B-DOSE O O"),
    ("aspirin for pain , ibuprofen for pain .", "B-DRUG O O O B-DRUG O O O"),
]


def _conll(path, items):
    with open(path, "w") as fh:
        for words, tags in items:
            for w, t in zip(words.split(), tags.split()):
                fh.write(f"{w} {t}\n")
            fh.write("\n")


@pytest.fixture
def project(tmp_path):
    save_model(str(tmp_path / "student"), ["x", "y"])  # an encoder checkpoint; the head is replaced
    save_model(str(tmp_path / "teacher"), ["O", "B-MED", "I-MED", "B-AMT", "I-AMT"], seed=5)
    _conll(tmp_path / "train.conll", SENTENCES[:6])
    _conll(tmp_path / "dev.conll", SENTENCES[6:])
    with open(tmp_path / "pool.jsonl", "w") as fh:
        for words in ("take aspirin now .", "the patient took 200mg ."):
            fh.write(json.dumps({"tokens": words.split()}) + "\n")
    (tmp_path / "rules.yaml").write_text(RULES)
    (tmp_path / "cfg.yaml").write_text("""\
model: student
rules: rules.yaml
data: {train: train.conll, eval: dev.conll, test: dev.conll, unlabelled: pool.jsonl, max_length: 32}
teacher: {kind: model, model: teacher, top_k: 2,
          label_map: {B-MED: B-DRUG, I-MED: I-DRUG, B-AMT: B-DOSE, I-AMT: I-DOSE}}
loss: {kd_weight: 0.3, temperature: 2.0, penalty_weight: 0.5, penalty: posterior}
training: {output_dir: run, epochs: 3, batch_size: 4, learning_rate: 0.02, logging_steps: 1, progress: false,
           early_stopping_patience: 2, seed: 3, constrained_decoding: false}
""")
    return tmp_path


def test_vfm_train_tagging_end_to_end(project, capsys):
    from vfm.cli import main

    torch.set_num_threads(1)
    assert main(["train", str(project / "cfg.yaml")]) == 0  # task inferred from the rules file
    out = capsys.readouterr().out
    run = project / "run"
    assert "unlabelled" in out and "rules on the labelled training sentences" in out and "teacher (teacher)" in out
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("loss") for r in rows) and any(r.get("eval_f1") for r in rows)
    config = json.load(open(run / "final" / "config.json"))
    assert config["architectures"] == ["BertForTokenClassification"] and config["id2label"]["1"] == "B-DRUG"
    test_metrics = json.load(open(run / "test_metrics.json"))
    assert test_metrics["sentences"] == 2
    # vfm eval (argmax of each word's first subword) reproduces the run's unconstrained test scores
    assert main(["eval", "--model", str(run / "final"), "--data", str(project / "dev.conll"),
                 "--out", str(project / "eval"), "--rules", str(project / "rules.yaml")]) == 0
    written = json.load(open(project / "eval" / "metrics.json"))
    again = written["entity"]
    for key in ("micro", "macro"):
        for m in ("precision", "recall", "f1"):
            assert again[key][m] == pytest.approx(test_metrics["entity"][key][m])
    # with the rules, every gold entity of dev.conll is forced: the drugs are gazetteer entries
    # (B-DRUG only), "100mg" may only be DOSE and after an O only B-DOSE -> recall 1 whatever the model
    assert written["model+rules"]["micro"]["recall"] == 1.0 and written["rules_fallback_sentences"] == 0


def test_tagging_lora_constrained_without_eval_file(project):
    from vfm.train import config_from_dict, train

    cfg = config_from_dict({
        "model": "student", "task": "tagging", "labels": TAGS,
        "data": {"train": "train.conll", "eval_fraction": 0.34},
        "peft": {"method": "lora", "options": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}},
        "training": {"output_dir": "run2", "epochs": 1, "batch_size": 4, "progress": False, "tensorboard": False}},
        base_dir=str(project))
    torch.set_num_threads(1)
    result = train(cfg, quiet=True)
    assert result.sizes == {"train": 4, "eval": 2, "test": 0, "pool": 0}
    assert "eval_f1" in result.eval_metrics and "eval_token_accuracy" in result.eval_metrics
    assert os.path.exists(os.path.join(result.final_model_dir, "model.safetensors"))


# -------------------------------------------------------------------- config errors --
def _cfg(project, **over):
    from vfm.train import config_from_dict

    base = {"model": "student", "rules": "rules.yaml", "data": {"train": "train.conll"},
            "training": {"output_dir": "run3", "epochs": 1, "progress": False, "tensorboard": False}}
    base.update(over)
    return config_from_dict(base, base_dir=str(project))


def test_config_errors(project):
    from vfm.train import train

    with pytest.raises(ValueError, match="task must be 'classification' or 'tagging', got 'ner'"):
        _cfg(project, task="ner")
    with pytest.raises(ValueError, match="zero-shot tagging"):
        _cfg(project, task="tagging", teacher={"kind": "zero_shot", "model": "teacher"})
    with pytest.raises(ValueError, match="data.augment=2"):
        _cfg(project, task="tagging", data={"train": "train.conll", "augment": 2})
    # a zero-shot teacher is refused also when the task comes from the rules file
    with pytest.raises(ValueError, match="zero-shot tagging"):
        train(_cfg(project, teacher={"kind": "zero_shot", "model": "teacher"}), quiet=True)
    with pytest.raises(ValueError, match="task 'tagging' but .* says task 'classification'"):
        train(_cfg(project, task="classification"), quiet=True)
    with pytest.raises(ValueError, match=r"needs BIO tags .*\['a', 'b'\]"):
        train(_cfg(project, task="tagging", rules=None, labels=["a", "b"]), quiet=True)
    (project / "t.csv").write_text("text,label\nhello,a\n")
    with pytest.raises(ValueError, match="t.csv: task tagging needs token lists"):
        train(_cfg(project, data={"train": "t.csv"}), quiet=True)
    with open(project / "train.conll", "a") as fh:
        fh.write("take O\naspirin B-PILL\n\n")
    with pytest.raises(ValueError, match=r"train.conll:\d+ has tags \['B-PILL'\]"):
        train(_cfg(project), quiet=True)
