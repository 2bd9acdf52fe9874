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
