"""`vfm train CONFIG.yaml` end to end on a tiny local model: data prep, rules, a model teacher with a label
map, LoRA, metrics CSV / TensorBoard, best model saved, `vfm eval` on it, and resume=auto after a finished run."""

import csv
import json
import os

import pytest
import torch

from test_train_utils import TEXTS, save_tiny

LABELS = ("billing", "shipping", "tech")


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header] + [list(r) for r in rows])


@pytest.fixture
def project(tmp_path):
    save_tiny(str(tmp_path / "student"), labels=LABELS)
    # the teacher names its labels differently: a label map translates them
    save_tiny(str(tmp_path / "teacher"), labels=("pay", "ship", "bug"))
    rows = [(t, LABELS[k]) for k, ts in TEXTS.items() for t in ts]
    _write_csv(tmp_path / "train.csv", rows[0::2] + [("refund my money please", "billing")])  # one exact duplicate
    _write_csv(tmp_path / "dev.csv", rows[1::2])
    _write_csv(tmp_path / "pool.csv", [("my package is late",), ("app error please",), ("refund my card",)],
               header=("text",))
    (tmp_path / "rules.yaml").write_text(
        "task: classification\nlabels:\n  - {name: billing, description: money}\n"
        "  - {name: shipping, description: parcels}\n  - {name: tech, description: errors}\n"
        "rules:\n  - name: parcel\n    keywords: [parcel, package, delivery]\n    allow: [shipping]\n")
    (tmp_path / "cfg.yaml").write_text("""\
model: student
rules: rules.yaml
data: {train: train.csv, eval: dev.csv, test: dev.csv, unlabelled: pool.csv, max_length: 16}
teacher: {kind: model, model: teacher, top_k: 2, label_map: {pay: billing, ship: shipping, bug: tech}}
loss: {kd_weight: 0.5, temperature: 2.0, penalty_weight: 0.5}
peft: {method: lora, options: {r: 2, lora_alpha: 4, target_modules: [query, value]}}
training: {output_dir: run, epochs: 2, batch_size: 4, learning_rate: 0.01, logging_steps: 1, progress: false,
           early_stopping_patience: 5, seed: 3}
""")
    return tmp_path


def test_vfm_train_and_eval_commands(project, capsys):
    from vfm.cli import main

    torch.set_num_threads(1)
    assert main(["train", str(project / "cfg.yaml")]) == 0
    out = capsys.readouterr().out
    run = project / "run"
    assert "[train+pool] deduplicate: 13 -> 12 rows; removed 1" in out  # the duplicate row is reported
    assert "rules on the labelled training rows:" in out and "teacher accuracy" in out
    assert "vfm.peft: 4 adapter layers run on vfm" in out
    assert "[] epoch" not in out
    cache = run / "teacher_topk.safetensors"
    from vfm.teacher import load_topk

    topk = load_topk(str(cache))
    assert topk.labels == ["pay", "ship", "bug"] and topk.indices.shape == (12 + 9 + 9, 2)  # train + pool, eval, test
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("loss") for r in rows) and any(r.get("eval_macro_f1") for r in rows)
    assert any(p.startswith("events.out.tfevents") for p in os.listdir(run / "tensorboard"))
    assert (run / "final" / "config.json").exists() and not (run / "final" / "adapter_config.json").exists()
    test_metrics = json.load(open(run / "test_metrics.json"))
    # vfm eval on the saved (LoRA-merged) model reproduces the run's own test scores
    assert main(["eval", "--model", str(run / "final"), "--data", str(project / "dev.csv"),
                 "--out", str(project / "eval")]) == 0
    again = json.load(open(project / "eval" / "metrics.json"))
    assert again["accuracy"] == pytest.approx(test_metrics["accuracy"])
    assert again["confusion"] == test_metrics["confusion"]
    # resume=auto on a finished run continues from its last checkpoint: nothing left to train
    from vfm.train import load_config, train

    cfg = load_config(str(project / "cfg.yaml"))
    result = train(cfg, quiet=True)
    assert result.eval_metrics["eval_macro_f1"] == pytest.approx(
        json.load(open(run / "eval_metrics.json"))["eval_macro_f1"])


def test_unknown_gold_label_names_the_row(project):
    from vfm.train import load_config, train

    with open(project / "train.csv", "a") as fh:  # header + 10 rows: the new row is line 12
        fh.write("what is this,weather\n")
    with pytest.raises(ValueError, match=r"train.csv:12 \('weather'\)"):
        train(load_config(str(project / "cfg.yaml")), quiet=True)
