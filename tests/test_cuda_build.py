"""The CUDA half of vfm._C on a machine without a GPU: build wiring, CI coverage, availability.

Nothing here runs nvcc (CI's .ci/check_cuda_compile.sh compiles every .cu for sm_90); the GPU
checks of the kernels themselves are tests/test_gpu_cuda_*.py.  One test compiles the dropout
hash of csrc/cuda/lora_cuda.h (a host/device header) with the host compiler and compares it with
the contract's reference hash.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vfm
from vfm import _registry
from vfm.ops.lora_reference import MASK32, dropout_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "check_cuda_compile.sh")
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
CUDA_OPS = ("knowledge_cross_entropy", "lora_linear", "lora_linear_multi")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_ci_script_exists_executable_and_called_by_ci():
    assert os.path.isfile(SCRIPT) and os.access(SCRIPT, os.X_OK)
    assert ".ci/check_cuda_compile.sh" in _read(os.path.join(ROOT, ".ci", "run"))


def test_ci_script_compiles_every_cu_file_for_sm90():
    text = _read(SCRIPT)
    assert CU_FILES, "csrc/cuda has no .cu file"
    # the script globs the folder, so every present and future .cu file is compiled ...
    assert re.search(r"CU_FILES=\(csrc/cuda/\*\.cu\)", text)
    assert "-gencode arch=compute_90,code=sm_90" in text and '-c "$src"' in text
    # ... and every binding with the host compiler, and a failed compile fails the script
    assert re.search(r"CPP_FILES=\(csrc/cuda/\*\.cpp\)", text) and "-fsyntax-only" in text
    assert "set -euo pipefail" in text and 'exit "$fail"' in text


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_files_are_free_of_torch_headers(path):
    """nvcc compiles each .cu alone (CI has no CUDA torch): no torch, ATen or c10 include."""
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', _read(path))
    assert includes
    assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]


@pytest.mark.parametrize("path", BINDINGS, ids=os.path.basename)
def test_bindings_register_cuda_kernels_and_check_inputs(path):
    text = _read(path)
    assert "TORCH_LIBRARY_IMPL(vfm_C, CUDA, m)" in text
    assert "TORCH_CHECK(" in text


def _setup_extension(monkeypatch, with_cuda: bool):
    """Run setup.py's extension logic without building (setuptools.setup is stubbed)."""
    import setuptools
    from torch.utils import cpp_extension

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.delenv("VFM_BUILD_EXT", raising=False)
    monkeypatch.delenv("VFM_CUDA_ARCH_LIST", raising=False)
    if with_cuda:
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
        monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    else:
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.delenv("CUDA_HOME", raising=False)
        monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.chdir(ROOT)
    path = os.path.join(ROOT, "setup.py")
    exec(compile(_read(path), path, "exec"), {"__file__": path, "__name__": "__main__"})  # noqa: S102
    (ext,) = captured["ext_modules"]
    return ext


def test_setup_cpu_only_build_has_no_cuda_sources(monkeypatch):
    ext = _setup_extension(monkeypatch, with_cuda=False)
    assert not [s for s in ext.sources if s.startswith("csrc/cuda/")]
    assert "VFM_WITH_CUDA" not in dict(ext.define_macros)


def test_setup_cuda_build_adds_kernels_bindings_and_archs(monkeypatch):
    ext = _setup_extension(monkeypatch, with_cuda=True)
    expected = {os.path.relpath(p, ROOT) for p in CU_FILES + BINDINGS}
    assert expected <= set(ext.sources)
    nvcc = ext.extra_compile_args["nvcc"]
    for arch in ("80", "90"):
        assert f"arch=compute_{arch},code=sm_{arch}" in nvcc
    macros = dict(ext.define_macros)
    assert macros["VFM_WITH_CUDA"] == "1" and macros["VFM_CUDA_ARCHS"] == "sm_80+sm_90"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without CUDA")
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_backend_says_why_it_is_unavailable(op):
    reasons_cpu = _registry.unavailable_reasons(op, "cpu")
    assert "CUDA tensors only" in reasons_cpu["cuda"]
    why = _registry.unavailable_reasons(op, "cuda")["cuda"]
    import vfm._C as ext

    if not ext.build_info().get("with_cuda"):
        assert "built without CUDA" in why and "CUDA_HOME" in why
    else:
        assert "no CUDA device" in why
    assert "cuda" not in vfm.available_backends(op, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_forcing_cuda_backend_raises_with_reason():
    logits = torch.randn(3, 7)
    target = torch.tensor([1, 2, 3])
    with vfm.use_backend("cuda"):
        with pytest.raises(_registry.BackendUnavailableError, match="cuda.*CUDA tensors only"):
            vfm.functional.knowledge_cross_entropy(logits, target)


def test_build_info_reports_cuda_fields():
    import vfm._C as ext

    info = ext.build_info()
    assert isinstance(info["with_cuda"], bool) and isinstance(info["cuda_archs"], str)


_HASH_MAIN = r"""
#include <cstdio>
#include <cstdint>
#include "cuda/lora_cuda.h"
int main() {
  unsigned long long seed, off;
  while (std::scanf("%llu %llu", &seed, &off) == 2)
    std::printf("%u\n", vfm_cuda::dropout_hash(seed, off));
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_kernel_dropout_hash_matches_reference(tmp_path):
    """The hash the CUDA kernels use (a host/device header) is the contract's, bit for bit."""
    src = tmp_path / "hash.cpp"
    src.write_text(_HASH_MAIN)
    exe = tmp_path / "hash"
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    g = torch.Generator().manual_seed(7)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**40) + 3] + torch.randint(-2**62, 2**62, (5,), generator=g).tolist()
    offsets = [0, 1, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**33 + 11] + torch.randint(0, 2**40, (8,), generator=g).tolist()
    pairs = [(s, o) for s in seeds for o in offsets]
    stdin = "".join(f"{s & ((1 << 64) - 1)} {o}\n" for s, o in pairs)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split()
    got = [int(v) for v in out]
    want = [int(dropout_hash(s, torch.tensor([o], dtype=torch.int64))[0]) for s, o in pairs]
    assert got == want
    assert all(0 <= v <= MASK32 for v in got)
    assert sys.maxsize > 2**32  # 64-bit offsets
