"""The command line: `vfm doctor` and a tiny `vfm bench`."""

import json
import subprocess
import sys

import vfm


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vfm.cli", *args], capture_output=True, text=True, timeout=600)


def test_doctor_reports_versions_backends_and_reasons():
    out = _run("doctor")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"vfm {vfm.__version__}" in text and "torch " in text
    assert "op knowledge_cross_entropy:" in text
    assert "cuda: no cuda implementation" in text or "cuda/cuda" in text
    if "cpp" in vfm.available_backends("knowledge_cross_entropy", "cpu"):
        assert "extension vfm._C: loaded" in text and "omp_max_threads" in text
    else:
        assert "extension vfm._C: not loaded (" in text


def test_doctor_rejects_arguments():
    assert _run("doctor", "--bogus").returncode != 0


def test_bench_tiny_run_writes_json(tmp_path):
    path = tmp_path / "rows.json"
    out = _run("bench", "--device", "cpu", "--rows", "16", "--vocab", "50", "--repeat", "1", "--no-memory",
               "--cases", "ce,ce_kd", "--providers", "torch eager", "--json", str(path))
    assert out.returncode == 0, out.stderr
    data = json.loads(path.read_text())
    assert {r["case"] for r in data["rows"]} == {"ce", "ce_kd"}
    assert all(r["ms"] > 0 for r in data["rows"])
    assert "| CE |" in out.stdout


def test_bench_rejects_unknown_case():
    out = _run("bench", "--cases", "nope")
    assert out.returncode != 0 and "unknown case" in out.stderr


def test_rules_check_reports_coverage_and_conflicts(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "labels: [refund, delivery]\n"
        "rules:\n"
        "  - name: money_words\n"
        "    keywords: [refund]\n"
        "    allow: [refund]\n"
    )
    data = tmp_path / "data.csv"
    # two texts fire the rule; one of them is labelled delivery (a conflict); one row is malformed
    data.write_text("text,label\nI want a refund,refund\nrefund for late parcel,delivery\nwhere is my parcel,delivery\n"
                    "broken row without label field\n")
    out = _run("rules", str(rules), "--data", str(data))
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("money_words"))
    fields = row.split()
    assert fields[3] == "2"  # fired on 2 of 3 rows
    assert fields[6] == "1"  # one conflict with gold
    assert "malformed rows skipped: 1" in out.stdout and f"{data}:5" in out.stdout


def test_rules_check_names_the_bad_rule_and_line(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("labels: [a, b]\nrules:\n  - name: bad_one\n    keywords: [x]\n    allow: [zzz]\n")
    out = _run("rules", str(rules))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "bad_one" in out.stderr and "zzz" in out.stderr
    assert f"{rules}:5" in out.stderr or f"{rules}:3" in out.stderr  # the rule's line or its allow line
