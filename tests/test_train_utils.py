"""Shared helpers for the training tests: a tiny BERT and tokenizer built in code (nothing downloads)."""

import os

import torch

WORDS = ("refund money charge card bill invoice paid twice package delivery arrived late track parcel "
         "app crash error login password reset account broken screen slow cancel order please help my the "
         "is not was i a to").split()


def tiny_tokenizer(folder):
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(vocab) + "\n")
    try:  # transformers >= 5 takes the vocabulary itself
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:  # transformers 4.x
        return BertTokenizerFast(vocab_file=path, do_lower_case=True)


def tiny_model(num_labels=3, layers=2, seed=0, dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(set(WORDS)), hidden_size=16, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=num_labels,
                     id2label={i: f"l{i}" for i in range(num_labels)},
                     label2id={f"l{i}": i for i in range(num_labels)})
    return BertForSequenceClassification(cfg)


def save_tiny(folder, labels=("billing", "shipping", "tech"), layers=2):
    """Write a tiny classifier + tokenizer directory (a local 'pretrained' model for pipeline tests)."""
    tok = tiny_tokenizer(folder)
    model = tiny_model(len(labels), layers)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {n: i for i, n in enumerate(labels)}
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEXTS = {
    0: ["refund my money please", "charge on my card twice", "bill paid twice", "invoice is not paid",
        "i paid the bill twice", "refund the charge"],
    1: ["package not arrived", "delivery was late", "track my parcel", "parcel delivery is late",
        "the package was late", "my order is not arrived"],
    2: ["app crash error", "login error password", "reset my password please", "account login broken",
        "the app is slow", "screen is broken"],
}


def toy_rows():
    texts, labels = [], []
    for lab, items in TEXTS.items():
        texts += items
        labels += [lab] * len(items)
    return texts, labels


def test_tiny_helpers_build(tmp_path):
    tok = tiny_tokenizer(str(tmp_path))
    enc = tok(["refund my money"], return_tensors="pt")
    assert enc["input_ids"].shape[1] == 5  # [CLS] + 3 words + [SEP], no [UNK]
    assert (enc["input_ids"] != tok.unk_token_id).all()
    out = tiny_model()(**enc)
    assert out.logits.shape == (1, 3)
