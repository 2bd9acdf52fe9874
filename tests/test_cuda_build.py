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
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**40) + 3]
    seeds += torch.randint(-2**62, 2**62, (5,), generator=g).tolist()
    offsets = [0, 1, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**33 + 11] + torch.randint(0, 2**40, (8,), generator=g).tolist()
    pairs = [(s, o) for s in seeds for o in offsets]
    stdin = "".join(f"{s & ((1 << 64) - 1)} {o}\n" for s, o in pairs)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split()
    got = [int(v) for v in out]
    want = [int(dropout_hash(s, torch.tensor([o], dtype=torch.int64))[0]) for s, o in pairs]
    assert got == want
    assert all(0 <= v <= MASK32 for v in got)
    assert sys.maxsize > 2**32  # 64-bit offsets


# ------------------------------------------------------------------ Python glue of the LoRA kernels --
class _KernelModel:
    """A plain-torch model of the three CUDA LoRA ops' semantics (csrc/cuda/lora_cuda.h), so that the
    Python glue of vfm/ops/lora_cuda.py (argument order, transposed views, scales, ids) is checked
    on CPU against the reference.  It is written from the header's contract, not from the kernels."""

    calls: list = []

    @classmethod
    def _drop(cls, v, seed, threshold, dscale):
        if threshold == 0:
            return v
        n, c = v.shape
        keep = dropout_hash(seed, torch.arange(n * c, dtype=torch.int64).view(n, c)) >= threshold
        return torch.where(keep, v * dscale, torch.zeros((), dtype=v.dtype))

    @classmethod
    def _per_row(cls, mats, ids, scales, alpha, n):
        m = mats if mats.dim() == 3 else mats[None]
        k = ids if ids is not None else torch.zeros(n, dtype=torch.int64)
        s = alpha * (scales[k.clamp_min(0)].double() if scales is not None else torch.ones(n, dtype=torch.float64))
        return m[k.clamp_min(0)].double(), s, (k >= 0)

    @classmethod
    def lora_cuda_dropout(cls, src, dtype, seed, threshold, dscale):
        cls.calls.append("dropout")
        return cls._drop(src.to(dtype), seed, threshold, dscale).contiguous()

    @classmethod
    def lora_cuda_shrink(cls, src, mats, ids, scales, alpha, seed, threshold, dscale):
        cls.calls.append("shrink")
        m, s, live = cls._per_row(mats, ids, scales, alpha, src.shape[0])
        u = cls._drop(src.to(mats.dtype), seed, threshold, dscale).double()
        out = torch.einsum("nc,nrc->nr", u, m) * (s * live)[:, None]
        return out.to(mats.dtype)

    @classmethod
    def lora_cuda_expand_(cls, out, coef, mats, ids, scales, alpha, seed, threshold, dscale):
        cls.calls.append("expand")
        m, s, live = cls._per_row(mats, ids, scales, alpha, out.shape[0])
        low = torch.einsum("nr,nrc->nc", coef.double(), m) * (s * live)[:, None]
        out += cls._drop(low, seed, threshold, dscale).to(out.dtype)


@pytest.fixture
def kernel_model(monkeypatch):
    from vfm.ops import lora_cuda

    _KernelModel.calls = []
    monkeypatch.setattr(lora_cuda, "_kernels", lambda: _KernelModel)
    return _KernelModel


def _close_all(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"output {i}"
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_cuda_glue_single_adapter(kernel_model, p):
    from vfm.ops import lora_cuda
    from vfm.ops.lora_reference import lora_backward_torch, lora_forward_torch

    g = torch.Generator().manual_seed(21)
    x, w, b = torch.randn(13, 20, generator=g), torch.randn(9, 20, generator=g), torch.randn(9, generator=g)
    a, bb = torch.randn(4, 20, generator=g), torch.randn(9, 4, generator=g)
    seed, gy = torch.tensor(555), torch.randn(13, 9, generator=g)
    y, xa = lora_cuda.lora_forward_cuda(x, w, b, a, bb, 0.7, p, seed)
    y0, xa0 = lora_forward_torch(x, w, b, a, bb, 0.7, p, seed)
    _close_all((y, xa), (y0, xa0))
    needs = (True, True, True, True, True)
    _close_all(lora_cuda.lora_backward_cuda(gy, x, w, a, bb, xa, 0.7, p, seed, needs),
               lora_backward_torch(gy, x, w, a, bb, xa0, 0.7, p, seed, needs))
    assert ("shrink" in kernel_model.calls) == (p > 0)  # without dropout: the reference's cuBLAS path


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_cuda_glue_multi_adapter(kernel_model, p):
    from vfm.ops import lora_cuda
    from vfm.ops.lora_reference import lora_multi_backward_torch, lora_multi_forward_torch

    g = torch.Generator().manual_seed(22)
    n, fin, fout, r, k = 17, 11, 7, 5, 3
    x, w, b = torch.randn(n, fin, generator=g), torch.randn(fout, fin, generator=g), torch.randn(fout, generator=g)
    a_stack, b_stack = torch.randn(k, r, fin, generator=g), torch.randn(k, fout, r, generator=g)
    scal = torch.tensor([0.5, 2.0, 1.5])
    ids = torch.randint(-1, k, (n,), generator=g)
    ids[:4] = torch.tensor([-1, 0, 1, 2])
    seed, gy = torch.tensor(77), torch.randn(n, fout, generator=g)
    y, xa = lora_cuda.lora_multi_forward_cuda(x, w, b, a_stack, b_stack, scal, ids, p, seed)
    y0, xa0 = lora_multi_forward_torch(x, w, b, a_stack, b_stack, scal, ids, p, seed)
    _close_all((y, xa), (y0, xa0))
    for needs in [(True,) * 5, (False, False, False, True, False), (True, False, False, False, True)]:
        _close_all(lora_cuda.lora_multi_backward_cuda(gy, x, w, a_stack, b_stack, scal, ids, xa, p, seed, needs),
                   lora_multi_backward_torch(gy, x, w, a_stack, b_stack, scal, ids, xa0, p, seed, needs))
    assert {"shrink", "expand"} <= set(kernel_model.calls)
