"""The README's Python snippets run as written, given the objects their comments describe.

Each snippet is a fragment (a ``model``, ``teacher``, ``x`` ... come from the reader's code), so
every block gets a small namespace built here from tiny random tensors and models; a README block
without a namespace below fails the test, so that a new snippet gets checked too.
"""

import os
import re
import shutil

import pytest
import torch

import vfm

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
EXAMPLES = os.path.join(os.path.dirname(README), "examples")


def _blocks():
    with open(README, encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), re.S)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def _rules_env(tmp_path):
    shutil.copy(os.path.join(EXAMPLES, "rules_medical.yaml"), tmp_path / "rules.yaml")
    rules = vfm.knowledge.load_rules(str(tmp_path / "rules.yaml"))
    from vfm.functional import knowledge_cross_entropy
    return dict(vfm=vfm, knowledge_cross_entropy=knowledge_cross_entropy,
                texts=["my heart hurts", "invoice for the scan", "tumour biopsy results"],
                gold=["cardiology", "billing", "oncology"],
                logits=torch.randn(3, len(rules.labels), requires_grad=True), y=torch.tensor([1, 3, 2]))


def _kce_env(tmp_path):
    v = 10
    return dict(model=torch.nn.Linear(8, v), teacher=torch.nn.Linear(8, v), x=torch.randn(6, 8),
                labels=torch.tensor([1, 2, -100, 3, 4, -100]), group_masks=torch.rand(2, v) > 0.5,
                group_ids=torch.tensor([0, 1, -1, 0, 1, 0]), in_domain_rows=torch.ones(6, dtype=torch.bool))


def _fused_env(tmp_path):
    return dict(hidden=torch.randn(6, 8, requires_grad=True), lm_head=torch.nn.Linear(8, 10),
                labels=torch.tensor([1, 2, -100, 3, 4, -100]), t_hidden=torch.randn(6, 12),
                t_head=torch.nn.Linear(12, 10))


def _hf_env(tmp_path):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (2, 7))
    return dict(model=_llama(), teacher=_llama(), ids=ids, mask=torch.rand(2, 7, 64) > 0.3)


def _lora_env(tmp_path):
    return dict(x=torch.randn(5, 8), W=torch.randn(6, 8), b=torch.randn(6), A=torch.randn(4, 8), B=torch.randn(6, 4),
                scaling=2.0, magnitude=torch.rand(6) + 0.5, P=torch.randn(4, 8), E=torch.randn(4, 1),
                Q=torch.randn(6, 4), ranknum=4.0, A_stack=torch.randn(3, 4, 8), B_stack=torch.randn(3, 6, 4),
                scalings=[1.0, 2.0, 0.5], adapter_ids=torch.tensor([0, 1, 2, -1, 0]))


def _peft_env(tmp_path):
    pytest.importorskip("peft")
    return dict(base_model=_llama())


def _mixed_env(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return dict(model=model, LoraConfig=peft.LoraConfig, vfm=vfm,
                batch=dict(input_ids=torch.randint(0, 64, (4, 5)), attention_mask=torch.ones(4, 5, dtype=torch.long),
                           max_new_tokens=2, do_sample=False))


# (text that identifies the block, namespace builder)
ENVS = [
    ('vfm.knowledge.load_rules("rules.yaml")', _rules_env),
    ("loss = knowledge_cross_entropy(\n    logits, labels,", _kce_env),
    ("fused_linear_knowledge_cross_entropy(\n    hidden,", _fused_env),
    ("apply_vfm(model", _hf_env),
    ("y = lora_linear(x, W, b, A, B, scaling", _lora_env),
    ("report = vfm.peft.accelerate(model)", _peft_env),
    ('adapter_names=["default", "legal"', _mixed_env),
]


def test_every_readme_snippet_has_a_namespace():
    blocks = _blocks()
    assert blocks, "no ```python blocks found in README.md"
    for block in blocks:
        hits = [key for key, _ in ENVS if key in block]
        assert len(hits) == 1, f"README block needs exactly one namespace in ENVS (found {hits}):\n{block[:200]}"


@pytest.mark.parametrize("key,make_env", ENVS, ids=[f"block{i}" for i in range(len(ENVS))])
def test_readme_snippet_runs(key, make_env, tmp_path, monkeypatch):
    blocks = [b for b in _blocks() if key in b]
    assert len(blocks) == 1, f"README block starting {key!r} not found"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    env = make_env(tmp_path)
    code = blocks[0].replace("\n...", "\n#")  # "..." lines stand for the reader's own code
    exec(compile(code, f"README.md block {key!r}", "exec"), env)  # noqa: S102 - the project's own README
