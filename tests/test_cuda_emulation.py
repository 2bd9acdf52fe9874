"""The CUDA kernels' own code, run on the CPU: csrc/cuda/*.cu compiled as C++ with the emulation of
tests/cuda_emulation/emu.h (threads as cooperative fibers, __syncthreads as scheduler rounds, warp
shuffles through shared slots), then compared with the torch reference through the public API.

This checks the kernels' logic on every CI run without a GPU: the row sweep (16-byte vector body,
scalar head and tail, misaligned and strided rows), the block reductions, every loss term and its
gradient, the in-place gradient, the top-k fix-up, the multi-adapter shrink/expand and the
dropout mask.  It does not check what only a GPU shows (ex2.approx's last bits, memory ordering,
speed): tests/test_gpu_cuda_*.py do, on a GPU.  The harness is built once per session with the
host compiler (about 20 s); the tests skip without g++ or the CUDA headers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

import vfm
from vfm import _registry
from vfm.ops import kce_cpp, lora_cuda
from vfm.ops.lora_reference import (
    apply_dropout,
    dropout_threshold,
    lora_multi_backward_torch,
    lora_multi_forward_torch,
)
from kce_cases import CASES, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
SOURCES = ["tests/cuda_emulation/emu.h", "tests/cuda_emulation/harness.cpp", "csrc/cuda/kce_kernel.cu",
           "csrc/cuda/kce_cuda.h", "csrc/cuda/lora_kernels.cu", "csrc/cuda/lora_cuda.h", "csrc/common/kce_math.h"]
DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
OP = "knowledge_cross_entropy"


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    if shutil.which("g++") is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_fp16.h")):
        pytest.skip("needs g++ and the CUDA toolkit's headers (CUDA_HOME)")
    digest = hashlib.sha256()
    for rel in SOURCES:
        with open(os.path.join(ROOT, rel), "rb") as f:
            digest.update(f.read())
    out = tmp_path_factory.mktemp("cuda_emu") / f"harness_{digest.hexdigest()[:12]}.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-DVFM_CUDA_EMULATION",
           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "tests", "cuda_emulation"),
           "-I", os.path.join(CUDA_HOME, "include"), os.path.join(ROOT, "tests", "cuda_emulation", "harness.cpp"),
           "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    lib.emu_kce_params_size.restype = ctypes.c_size_t
    lib.emu_divergent_barriers.restype = ctypes.c_long
    assert lib.emu_kce_params_size() == ctypes.sizeof(KceParams)
    return lib


# ------------------------------------------------------------------------ knowledge CE --
_I64, _P, _F64, _I32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int


class KceParams(ctypes.Structure):
    """Mirror of vfm_cuda::KceParams (csrc/cuda/kce_cuda.h), field for field."""

    _fields_ = [("n_rows", _I64), ("vocab", _I64), ("dtype", _I32), ("logits", _P), ("logits_rs", _I64),
                ("teacher", _P), ("teacher_rs", _I64), ("grad", _P), ("grad_rs", _I64), ("target", _P),
                ("target_s", _I64), ("weight", _P), ("sum_w", _P), ("topk_idx", _P), ("topk_idx_rs", _I64),
                ("topk_idx_cs", _I64), ("topk_lp", _P), ("topk_lp_rs", _I64), ("topk_lp_cs", _I64), ("k", _I64),
                ("allowed", _P), ("allowed_rs", _I64), ("n_groups", _I64), ("group_ids", _P), ("group_s", _I64),
                ("scales", _P), ("scales_rs", _I64), ("scales_cs", _I64), ("row_loss", _P), ("parts", _P),
                ("ignore_index", _I64), ("eps", _F64), ("cap", _F64), ("temp", _F64), ("beta", _F64),
                ("rule_c", _F64), ("kd_mode", _I32), ("pen_mode", _I32), ("use_ce", ctypes.c_bool),
                ("use_z", ctypes.c_bool)]


def _emulated_kce(lib, threads):
    """A backend function with the contract's signature that runs the emulated CUDA kernel."""

    def run(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, grad, cfg):
        keep = []  # tensors whose memory the kernel reads
        p = KceParams()
        n, v = logits.shape
        p.n_rows, p.vocab, p.dtype = n, v, DT[logits.dtype]
        p.logits, p.logits_rs = logits.data_ptr(), logits.stride(0)
        if teacher is not None:
            teacher = teacher.to(logits.dtype)  # as vfm.ops.kce_cuda does
            keep.append(teacher)
            p.teacher, p.teacher_rs = teacher.data_ptr(), teacher.stride(0)
        if grad is not None:
            p.grad, p.grad_rs = grad.data_ptr(), grad.stride(0)
        target = target.to(torch.int64)
        scales = scales.to(torch.float32)
        keep += [target, scales]
        p.target, p.target_s = target.data_ptr(), target.stride(0)
        if weight is not None:
            weight = weight.to(torch.float32).contiguous()
            sum_w = weight.double().sum().reshape(1)
            keep += [weight, sum_w]
            p.weight, p.sum_w = weight.data_ptr(), sum_w.data_ptr()
        if topk_idx is not None:
            ti, tl = topk_idx.to(torch.int64), topk_lp.to(torch.float32)
            keep += [ti, tl]
            p.topk_idx, p.topk_idx_rs, p.topk_idx_cs = ti.data_ptr(), ti.stride(0), ti.stride(1)
            p.topk_lp, p.topk_lp_rs, p.topk_lp_cs = tl.data_ptr(), tl.stride(0), tl.stride(1)
            p.k = ti.shape[1]
        if allowed_bits is not None:
            bits, gid = allowed_bits.to(torch.int32).contiguous(), group_ids.to(torch.int32)
            keep += [bits, gid]
            p.allowed, p.allowed_rs, p.n_groups = bits.data_ptr(), bits.stride(0), bits.shape[0]
            p.group_ids, p.group_s = gid.data_ptr(), gid.stride(0)
        p.scales, p.scales_rs, p.scales_cs = scales.data_ptr(), scales.stride(0), scales.stride(1)
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        row_loss = torch.empty(n, dtype=out_dtype)
        parts = torch.empty(5, n, dtype=out_dtype)
        p.row_loss, p.parts = row_loss.data_ptr(), parts.data_ptr()
        p.ignore_index, p.eps, p.cap, p.temp = cfg.ignore_index, cfg.label_smoothing, cfg.softcap, cfg.temperature
        p.beta, p.rule_c, p.kd_mode, p.pen_mode = cfg.jsd_beta, cfg.rule_strength, cfg.kd_mode, cfg.pen_mode
        p.use_ce, p.use_z = bool(cfg.use_ce), bool(cfg.use_z)
        before = lib.emu_divergent_barriers()
        assert lib.emu_kce_forward(ctypes.byref(p), threads) == 0
        assert lib.emu_divergent_barriers() == before, "a __syncthreads() not reached by every thread"
        return row_loss, parts

    return run


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-3), torch.bfloat16: (2e-4, 1.6e-2),
       torch.float64: (1e-6, 1e-6)}  # fp64: the kernels take fp32 per-row scales, the reference fp64 ones


def _run(backend, logits, target, opts, inplace=False):
    x = logits.detach().clone().requires_grad_()
    before = _registry.CALLS[(OP, backend)]
    with vfm.use_backend(backend):
        if inplace:
            z = x * 1
            out = vfm.functional.knowledge_cross_entropy(z, target, return_parts=True, inplace_backward=True, **opts)
            grad = torch.autograd.grad(out.loss, z)[0]
        else:
            out = vfm.functional.knowledge_cross_entropy(x, target, return_parts=True, **opts)
            out.loss.backward()
            grad = x.grad
    assert _registry.CALLS[(OP, backend)] == before + 1
    return torch.stack([out.loss, out.ce, out.kd, out.penalty, out.z_loss]).detach(), out.n_outside_allowed, grad


def _compare(monkeypatch, harness, logits, target, opts, dtype, threads=64, inplace=False):
    monkeypatch.setattr(kce_cpp, "kce_forward_cpp", _emulated_kce(harness, threads))  # "cpp" now runs the emulation
    p1, n1, g1 = _run("cpp", logits, target, opts, inplace)
    p0, n0, g0 = _run("torch", logits, target, opts)
    rtol, gtol = TOL[dtype]
    torch.testing.assert_close(p1, p0, rtol=rtol, atol=rtol)
    torch.testing.assert_close(n1.to(n0.dtype), n0)
    scale = g0.abs().max().item() or 1.0
    assert g1.dtype == g0.dtype
    torch.testing.assert_close(g1.double(), g0.double(), rtol=0, atol=gtol * scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kce_kernel_every_case_fp32(monkeypatch, harness, case):
    logits, target, opts = make_inputs(CASES[case], 11, 4099, seed=len(case))
    _compare(monkeypatch, harness, logits, target, opts, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["everything", "topk", "jsd"])
def test_kce_kernel_half_types_and_fp64(monkeypatch, harness, case, dtype):
    logits, target, opts = make_inputs(CASES[case], 7, 1037, dtype=dtype, seed=3)
    _compare(monkeypatch, harness, logits, target, opts, dtype)


@pytest.mark.parametrize("vocab,threads", [(5, 128), (70000, 256)])
def test_kce_kernel_tiny_and_large_vocab(monkeypatch, harness, vocab, threads):
    logits, target, opts = make_inputs(CASES["everything"], 3, vocab, dtype=torch.bfloat16, seed=vocab)
    _compare(monkeypatch, harness, logits, target, opts, torch.bfloat16, threads=threads)


@pytest.mark.parametrize("case", ["ce_smooth_weight", "topk", "everything"])
def test_kce_kernel_inplace_gradient(monkeypatch, harness, case):
    logits, target, opts = make_inputs(CASES[case], 9, 2051, seed=4)
    _compare(monkeypatch, harness, logits, target, opts, torch.float32, inplace=True)


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_kce_kernel_strided_and_misaligned_rows(monkeypatch, harness, offset):
    n, v = 6, 1000
    logits, target, opts = make_inputs(CASES["kl_t2"], n, v + 8, dtype=torch.float16, seed=5)
    opts["teacher_logits"] = opts["teacher_logits"][:, offset:offset + v]  # same 16-byte phase as the logits
    _compare(monkeypatch, harness, logits[:, offset:offset + v], target.clamp(max=v - 1), opts, torch.float16)


# -------------------------------------------------------------------------------- LoRA --
def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


class _EmulatedLoraOps:
    """The three vfm_C CUDA LoRA ops, with the bindings' argument handling, on the emulated kernels."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _stack(mats):
        return mats if mats.dim() == 3 else mats.unsqueeze(0)

    def lora_cuda_shrink(self, src, mats, ids, scales, alpha, seed, threshold, dscale):
        m = self._stack(mats)
        n, c = src.shape
        out = torch.empty(n, m.shape[1], dtype=m.dtype)
        rc = self.lib.emu_lora_shrink(_ptr(src), _I64(src.stride(0)), DT[src.dtype], _ptr(m), _I64(m.stride(0)),
                                      _I64(m.stride(1)), _I64(m.stride(2)), DT[m.dtype], _ptr(ids), _I64(m.shape[0]),
                                      _ptr(scales), _F64(alpha), _I64(n), _I64(m.shape[1]), _I64(c),
                                      ctypes.c_uint64(seed & (2**64 - 1)), ctypes.c_uint32(threshold), _F64(dscale),
                                      _ptr(out))
        assert rc == 0
        return out

    def lora_cuda_expand_(self, out, coef, mats, ids, scales, alpha, seed, threshold, dscale):
        m = self._stack(mats)
        coef = coef.contiguous()
        n, c = out.shape
        rc = self.lib.emu_lora_expand(_ptr(out), _I64(out.stride(0)), DT[out.dtype], _ptr(coef), _ptr(m),
                                      _I64(m.stride(0)), _I64(m.stride(1)), _I64(m.stride(2)), DT[m.dtype],
                                      _ptr(ids), _I64(m.shape[0]), _ptr(scales), _F64(alpha), _I64(n),
                                      _I64(m.shape[1]), _I64(c), ctypes.c_uint64(seed & (2**64 - 1)),
                                      ctypes.c_uint32(threshold), _F64(dscale))
        assert rc == 0

    def lora_cuda_dropout(self, src, dtype, seed, threshold, dscale):
        n, c = src.shape
        out = torch.empty(n, c, dtype=dtype)
        rc = self.lib.emu_lora_dropout(_ptr(src), _I64(src.stride(0)), DT[src.dtype], DT[dtype], _I64(n), _I64(c),
                                       ctypes.c_uint64(seed & (2**64 - 1)), ctypes.c_uint32(threshold), _F64(dscale),
                                       _ptr(out))
        assert rc == 0
        return out


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32)])
def test_dropout_kernel_reproduces_reference_mask(harness, src, dst):
    ops = _EmulatedLoraOps(harness)
    x = torch.randn(13, 40, generator=torch.Generator().manual_seed(1)).to(src)[:, 3:33]  # row stride 40, C = 30
    seed, p = -(2**40) + 12345, 0.35
    got = ops.lora_cuda_dropout(x, dst, seed, dropout_threshold(p), 1.0 / (1.0 - p))
    assert torch.equal(got, apply_dropout(x.to(dst), seed, p))


@pytest.mark.parametrize("base,adt,p", [(torch.float32, torch.float32, 0.3), (torch.bfloat16, torch.float32, 0.0)])
def test_multi_adapter_kernels_through_the_cuda_glue(monkeypatch, harness, p, base, adt):
    """lora_cuda's multi-adapter forward/backward on the emulated shrink/expand/dropout kernels."""
    ops = _EmulatedLoraOps(harness)
    monkeypatch.setattr(lora_cuda, "_kernels", lambda: ops)
    g = torch.Generator().manual_seed(8)
    n, fin, fout, r, k = 19, 2100, 33, 6, 3  # fin > the shrink kernel's 2048-wide tile
    x, w, b = (torch.randn(n, fin, generator=g).to(base), (torch.randn(fout, fin, generator=g) * 0.05).to(base),
               torch.randn(fout, generator=g).to(base))
    a_stack = (torch.randn(k, r, fin, generator=g) * 0.05).to(adt)
    b_stack = (torch.randn(k, fout, r, generator=g) * 0.1).to(adt)
    scal = torch.tensor([0.5, 2.0, 1.5])
    ids = torch.randint(-1, k, (n,), generator=g)
    ids[:4] = torch.tensor([-1, 0, 1, 2])
    seed, gy = torch.tensor(4242), torch.randn(n, fout, generator=g).to(base)
    y, xa = lora_cuda.lora_multi_forward_cuda(x, w, b, a_stack, b_stack, scal, ids, p, seed)
    y0, xa0 = lora_multi_forward_torch(x, w, b, a_stack, b_stack, scal, ids, p, seed)
    tol = dict(rtol=1e-4, atol=1e-4) if base == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xa, xa0, **tol)
    torch.testing.assert_close(y.float(), y0.float(), **tol)
    got = lora_cuda.lora_multi_backward_cuda(gy, x, w, a_stack, b_stack, scal, ids, xa, p, seed, (True,) * 5)
    want = lora_multi_backward_torch(gy, x, w, a_stack, b_stack, scal, ids, xa0, p, seed, (True,) * 5)
    for i, (u, v) in enumerate(zip(got, want)):
        s = v.abs().max().item() or 1.0
        torch.testing.assert_close(u.float() / s, v.float() / s, **tol, msg=lambda m: f"gradient {i}: {m}")
    assert harness.emu_divergent_barriers() == 0


def test_single_adapter_dropout_path_through_the_cuda_glue(monkeypatch, harness):
    """lora_linear's cuda forward/backward with dropout: shrink (one adapter), expand with the mask, dropout."""
    from vfm.ops.lora_reference import lora_backward_torch, lora_forward_torch

    ops = _EmulatedLoraOps(harness)
    monkeypatch.setattr(lora_cuda, "_kernels", lambda: ops)
    g = torch.Generator().manual_seed(9)
    n, fin, fout, r = 9, 300, 17, 5
    x, w = torch.randn(n, fin, generator=g), torch.randn(fout, fin, generator=g) * 0.1
    b = torch.randn(fout, generator=g)
    a, bb = torch.randn(r, fin, generator=g) * 0.1, torch.randn(fout, r, generator=g) * 0.1
    seed, gy = torch.tensor(31337), torch.randn(n, fout, generator=g)
    y, xa = lora_cuda.lora_forward_cuda(x, w, b, a, bb, 0.8, 0.4, seed)
    y0, xa0 = lora_forward_torch(x, w, b, a, bb, 0.8, 0.4, seed)
    torch.testing.assert_close(xa, xa0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for u, v in zip(lora_cuda.lora_backward_cuda(gy, x, w, a, bb, xa, 0.8, 0.4, seed, (True,) * 5),
                    lora_backward_torch(gy, x, w, a, bb, xa0, 0.8, 0.4, seed, (True,) * 5)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_kce_kernel_marks_rows_with_bad_indices_nan(harness):
    """Indices the Python layer would reject, given to the kernel directly: NaN rows, never clipped."""
    from vfm.ops.kce_reference import KCEConfig, PEN_MASS, pack_allowed_bits

    run = _emulated_kce(harness, 32)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([3, 50, -100, 7])  # row 1: target == V
    group_ids = torch.tensor([0, -1, -1, 5], dtype=torch.int32)  # row 3: no group 5
    bits = pack_allowed_bits(torch.rand(1, 50, generator=torch.Generator().manual_seed(3)) < 0.5)
    scales = torch.ones(4, 4)
    scales[0, 2] = 0  # the ignored row counts for CE nowhere
    grad = torch.empty_like(logits)
    row_loss, parts = run(logits, target, None, None, None, None, bits, group_ids, scales, grad,
                          KCEConfig(pen_mode=PEN_MASS))
    assert torch.isnan(row_loss[[1, 3]]).all() and torch.isnan(grad[[1, 3]]).all()
    assert torch.isfinite(row_loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    assert torch.all(grad[2] == 0) and row_loss[2] == 0
