"""Every Triton kernel of vfm.kernels compiles for sm_90 (H100 / H200) with the launches vfm really makes.

The interpreter skips Triton's type checks, ``tl.dot`` shape rules, the layout passes and ptxas, so a
kernel that passes every CPU test can still fail to compile on the GPU.  Here the public ops run on
small CPU tensors (KCE every term in bf16, the main ones in fp32, fused linear CE, LoRA / DoRA /
AdaLoRA / multi-adapter with and without dropout, with one dtype or a bf16 base and fp32 adapters)
in fresh processes where each kernel launch is compiled, through Triton's own binder and ptxas,
for ``GPUTarget("cuda", 90, 32)`` with the GPU's launch configuration instead of being run (see
``tests/triton_sm90_capture.py``).  No GPU is needed; skipped without triton's nvidia backend or
its ptxas.  On a GPU machine it runs the same way (a fail-fast check before the GPU stages).

One test per scenario: a failure names the scenario, the kernel, its variant (dtypes, constexprs,
num_warps) and the compiler's message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from triton_sm90_capture import scenario_names  # noqa: E402

SCENARIOS = scenario_names()


def _missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "triton has no nvidia backend"
    import triton

    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return f"ptxas not found at {ptxas}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _split(names, n):
    """Contiguous chunks of about equal cost (a LoRA-family scenario compiles ~3x the kernels of a
    KCE one); contiguous, so scenarios sharing kernel variants mostly share a worker's cache."""
    cost = [3 if name.split("-")[0] in ("lora", "dora", "adalora", "multi") else 1 for name in names]
    total, chunks, acc = sum(cost), [[] for _ in range(n)], 0
    for name, c in zip(names, cost):
        chunks[min(n - 1, acc * n // total)].append(name)
        acc += c
    return [c for c in chunks if c]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run the capture workers (one per core, up to 8) and merge their records."""
    out_dir = tmp_path_factory.mktemp("sm90")
    n_workers = max(1, min(8, os.cpu_count() or 1, len(SCENARIOS)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VFM_TEST_GPU")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    procs = []
    for w, names in enumerate(_split(SCENARIOS, n_workers)):
        path = str(out_dir / f"worker{w}.json")
        procs.append((names, path, subprocess.Popen(
            [sys.executable, os.path.join(HERE, "triton_sm90_capture.py"), path, *names],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    merged = {"records": [], "scenario_errors": {}, "kernels": set()}
    for names, path, proc in procs:
        out, _ = proc.communicate(timeout=1200)
        if proc.returncode != 0 or not os.path.exists(path):
            for name in names:
                merged["scenario_errors"][name] = f"capture worker exited with {proc.returncode}:\n{out[-4000:]}"
            continue
        with open(path) as f:
            part = json.load(f)
        merged["records"] += part["records"]
        merged["scenario_errors"].update(part["scenario_errors"])
        merged["kernels"].update(part["kernels"])
        merged["triton"] = part["triton"]
    return merged


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_compiles_for_sm90(compiled, scenario):
    assert scenario not in compiled["scenario_errors"], compiled["scenario_errors"][scenario]
    bad = [r for r in compiled["records"] if r["scenario"] == scenario and not r["ok"]]
    assert not bad, "\n\n".join(f"{r['kernel']} [{r['variant']}]:\n{r.get('error', 'no cubin')}" for r in bad)


def test_every_kernel_is_launched_and_compiled(compiled):
    """Each ``*_kernel`` JIT function of vfm.kernels is reached by some scenario."""
    assert compiled["kernels"], "no kernels found"
    launched = {r["kernel"] for r in compiled["records"] if r["ok"]}
    assert sorted(compiled["kernels"] - launched) == []


def test_launches_use_the_gpu_configuration(compiled):
    """The capture really records a GPU's launches (not the interpreter's smaller defaults)."""
    variants = {r["kernel"].rsplit(".", 1)[-1]: [] for r in compiled["records"]}
    for r in compiled["records"]:
        variants[r["kernel"].rsplit(".", 1)[-1]].append(r["variant"])
    assert any("ASSERT=True" in v for v in variants["_kce_prologue_kernel"])
    assert any("PREFETCH=True" in v for v in variants["_kce_fwd_kernel"])
    assert any("BLOCK=2048" in v for v in variants["_kce_fwd_kernel"])
    assert all("BLOCK_C=128" in v for v in variants["_shrink_kernel"])
    assert all("BLOCK_N=128" in v for v in variants["_expand_kernel"])
