"""Record the Triton launches vfm really makes and compile each for sm_90 (H100 / H200), no GPU needed.

Run as a script (``tests/test_triton_sm90_compile.py`` does, in a fresh process)::

    python tests/triton_sm90_capture.py OUT.json [SCENARIO ...]

How: the kernels are imported *without* the interpreter, so they are real ``JITFunction`` objects and
the launchers take their GPU configuration (``VFM_TRITON_GPU_LAUNCH=1`` keeps it once
``TRITON_INTERPRET=1`` is set afterwards so that vfm's device checks accept CPU tensors).  Triton's
active driver is replaced by one that reports an sm_90 target, and ``JITFunction.run`` by a hook:
every launch of every scenario (public vfm calls on small CPU tensors, forward and backward) is
compiled through Triton's own binder (``warmup=True``: the argument specialisation of a real launch,
ptxas included) instead of being launched, then its tensor arguments are zeroed (through ``.data``,
so autograd's version counters are untouched) so the host code after it sees defined values.

Each record: scenario, kernel, variant (tensor dtypes, constexprs, num_warps), ok / error, compile
seconds, shared memory, registers, stack (spill) and local bytes per thread read from the cubin
with ``cuobjdump --dump-resource-usage``.  ``uncovered`` lists the ``*_kernel`` JIT functions of
vfm.kernels that no scenario launched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

KERNEL_MODULES = ("vfm.kernels.knowledge_ce", "vfm.kernels.kce_fwd_kernel", "vfm.kernels.kce_prologue",
                  "vfm.kernels.lora", "vfm.kernels.lora_dora", "vfm.kernels.lora_multi")


class _Sm90Driver:
    """The parts of a Triton driver that ``JITFunction.run(warmup=True)`` asks for, for an sm_90 GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


# ----------------------------------------------------------------------------- scenarios --
def _kce_case(case, dtype, vocab=2048, rows=6, backward=True, teacher_dtype=None, **extra):
    import vfm
    from kce_cases import CASES, make_inputs
    from vfm.functional import knowledge_cross_entropy

    logits, target, opts = make_inputs(CASES[case], rows, vocab, dtype=dtype, teacher_dtype=teacher_dtype)
    opts.update(extra)
    logits.requires_grad_(backward)
    with vfm.use_backend("triton"):
        loss = knowledge_cross_entropy(logits, target, **opts)
        if backward:
            (loss.sum() if loss.dim() else loss).backward()


def _flce(dtype, teacher):
    import torch

    import vfm
    from vfm.functional import fused_linear_knowledge_cross_entropy as flce

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 64, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(2048, 64, generator=g) * 0.1).to(dtype).requires_grad_(True)
    target = torch.randint(0, 2048, (8,), generator=g)
    opts = {}
    if teacher:
        opts = dict(teacher_hidden=torch.randn(8, 32, generator=g).to(dtype),
                    teacher_weight=(torch.randn(2048, 32, generator=g) * 0.1).to(dtype), kd_weight=0.5,
                    temperature=2.0)
    with vfm.use_backend("triton"):
        flce(hidden, weight, target, **opts).backward()


def _lora(kind, dtype, adt, p, rank=8, base_accumulates=True, with_bias=True):
    import torch

    import vfm
    from vfm.ops.lora_api import adalora_linear, dora_linear, lora_linear, lora_linear_multi

    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 48, 256, 384
    x = torch.randn(n, d_in, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) * 0.05).to(dtype).requires_grad_(True)
    bias = torch.randn(d_out, generator=g).to(dtype).requires_grad_(True) if with_bias else None
    a = (torch.randn(rank, d_in, generator=g) * 0.1).to(adt).requires_grad_(True)
    b = (torch.randn(d_out, rank, generator=g) * 0.1).to(adt).requires_grad_(True)
    kw = dict(dropout_p=p, seed=1234)
    old = os.environ.get("VFM_LORA_BASE_ACCUMULATES")
    os.environ["VFM_LORA_BASE_ACCUMULATES"] = "1" if base_accumulates else "0"
    try:
        with vfm.use_backend("triton"):
            if kind == "lora":
                y = lora_linear(x, w, bias, a, b, 2.0, **kw)
            elif kind == "dora":
                mag = torch.rand(d_out, generator=g).add(0.5).to(adt).requires_grad_(True)
                y = dora_linear(x, w, bias, a, b, mag, 2.0, **kw)
            elif kind == "adalora":
                e = torch.randn(rank, 1, generator=g).to(adt).requires_grad_(True)
                y = adalora_linear(x, w, bias, a, e, b, 2.0, torch.tensor(float(rank)), **kw)
            else:
                k = 3
                a_st = (torch.randn(k, rank, d_in, generator=g) * 0.1).to(adt).requires_grad_(True)
                b_st = (torch.randn(k, d_out, rank, generator=g) * 0.1).to(adt).requires_grad_(True)
                ids = torch.randint(-1, k, (n,), generator=g)
                y = lora_linear_multi(x, w, bias, a_st, b_st, torch.tensor([1.0, 2.0, 0.5]), ids, **kw)
            y.float().square().mean().backward()
    finally:
        if old is None:
            os.environ.pop("VFM_LORA_BASE_ACCUMULATES")
        else:
            os.environ["VFM_LORA_BASE_ACCUMULATES"] = old


_KCE_FP32_CASES = ("ce", "softcap", "kl_t2", "jsd", "topk", "posterior_teacher_soft", "everything")


def _scenarios():
    import torch

    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    from kce_cases import CASES

    sc = {}
    for case in CASES:  # every CE / KD / penalty / z-loss branch, forward + backward, in bf16 ...
        sc[f"kce-{case}-bf16"] = (lambda c=case: _kce_case(c, bf))
    for case in _KCE_FP32_CASES:  # ... and the main ones in fp32
        sc[f"kce-{case}-fp32"] = (lambda c=case: _kce_case(c, f32))
    sc["kce-ce-fp16"] = lambda: _kce_case("ce", f16)
    sc["kce-ce-bf16-forward_only"] = lambda: _kce_case("ce", bf, backward=False)
    sc["kce-kl_t2-bf16-forward_only"] = lambda: _kce_case("kl_t2", bf, backward=False)
    sc["kce-ce-bf16-inplace"] = lambda: _kce_case("ce", bf, inplace_backward=True)
    sc["kce-everything-bf16-inplace"] = lambda: _kce_case("everything", bf, inplace_backward=True)
    sc["kce-kl_t2-bf16-fp32_teacher"] = lambda: _kce_case("kl_t2", bf, teacher_dtype=f32)
    sc["kce-ce-bf16-reduction_none"] = lambda: _kce_case("ce", bf, reduction="none")
    sc["kce-ce-bf16-reduction_sum"] = lambda: _kce_case("ce", bf, reduction="sum")
    sc["kce-ce-bf16-num_items_int"] = lambda: _kce_case("ce", bf, num_items_in_batch=5)
    sc["kce-ce-bf16-num_items_tensor"] = lambda: _kce_case("ce", bf, num_items_in_batch=torch.tensor(5))
    sc["kce-ce-bf16-ragged_vocab"] = lambda: _kce_case("ce", bf, vocab=3000)
    sc["kce-kl_t2-bf16-small_vocab"] = lambda: _kce_case("kl_t2", bf, vocab=100)
    sc["kce-mass_grouped-bf16-large_vocab"] = lambda: _kce_case("mass_grouped", bf, vocab=40000)
    sc["flce-bf16"] = lambda: _flce(bf, False)
    sc["flce-fp32"] = lambda: _flce(f32, False)
    sc["flce-bf16-teacher"] = lambda: _flce(bf, True)
    # LoRA family: one dtype (bf16, fp32) and a bf16 base with fp32 adapters (the cast / IEEE paths),
    # with and without dropout; p = 0 with one dtype is cuBLAS only (no launch expected).
    lora = [("lora", bf, bf, 0.0), ("lora", bf, bf, 0.1), ("lora", f32, f32, 0.1), ("lora", bf, f32, 0.0),
            ("lora", bf, f32, 0.1), ("dora", bf, bf, 0.0), ("dora", bf, bf, 0.1), ("dora", f32, f32, 0.0),
            ("dora", bf, f32, 0.1), ("adalora", bf, bf, 0.1), ("adalora", bf, f32, 0.0), ("multi", bf, bf, 0.0),
            ("multi", bf, bf, 0.1), ("multi", bf, f32, 0.1)]
    short = {bf: "bf16", f32: "fp32"}
    for kind, dtype, adt, p in lora:
        dt = short[dtype] if dtype == adt else f"{short[dtype]}_base-{short[adt]}_adapter"
        sc[f"{kind}-{dt}-{'dropout' if p else 'p0'}"] = (lambda k=kind, d=dtype, a=adt, p=p: _lora(k, d, a, p))
    sc["lora-bf16-dropout-base_first"] = lambda: _lora("lora", bf, bf, 0.1, base_accumulates=False)
    sc["lora-bf16-dropout-rank64"] = lambda: _lora("lora", bf, bf, 0.1, rank=64)
    # DoRA without a bias in 16 bits: grad_magnitude from the output, the zero-magnitude kernel in bf16
    sc["dora-bf16-p0-no_bias"] = lambda: _lora("dora", bf, bf, 0.0, with_bias=False)
    return sc


def scenario_names():
    """Names of every scenario, without importing triton (for pytest's parametrisation)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    return list(_scenarios())


# ------------------------------------------------------------------------------- capture --
_TYPES = {"torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float16": "fp16", "torch.int64": "i64",
          "torch.int32": "i32", "torch.bool": "i1", "torch.uint8": "u8", "torch.int8": "i8"}


def _variant(fn, args, kwargs):
    """Readable description: tensor dtypes, None pointers, constexprs and launch options."""
    import torch

    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    constexpr = {fn.arg_names[i] for i in fn.constexprs}
    parts = []
    for name in names:
        v = bound.get(name)
        if isinstance(v, torch.Tensor):
            parts.append(f"{name}={_TYPES.get(str(v.dtype), str(v.dtype))}")
        elif name in constexpr:
            parts.append(f"{name}={v}")
        elif v is None:
            parts.append(f"{name}=None")
    parts += [f"{k}={v}" for k, v in kwargs.items() if k not in names]
    return " ".join(parts)


def _resources(kernel, tool):
    """(registers, stack bytes, local bytes) per thread of the kernel's cubin, read by cuobjdump (register
    spills land in the stack frame); None where unknown."""
    if tool is None:
        return None, None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(path)
    found = [re.search(rf"{key}:(\d+)", out) for key in ("REG", "STACK", "LOCAL")]
    return tuple(int(m.group(1)) if m else None for m in found)


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def main(out_path, names=None):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["VFM_TRITON_GPU_LAUNCH"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import importlib

    import torch
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_Sm90Driver())
    mods = [importlib.import_module(m) for m in KERNEL_MODULES]
    kernels = sorted({f"{v.fn.__module__}.{v.fn.__name__}" for m in mods for v in vars(m).values()
                      if isinstance(v, JITFunction) and v.fn.__name__.endswith("_kernel")})
    import vfm.ops  # noqa: F401  registers the ops (their backends import the kernels lazily)

    # From here vfm's checks accept CPU tensors; the kernels above stay compiled JIT functions.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["VFM_KCE_DEVICE_PATH"] = "1"
    tool = _cuobjdump()
    records, state, seen = [], {"scenario": None}, {}
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        rec = {"scenario": state["scenario"], "kernel": f"{self.fn.__module__}.{self.fn.__name__}",
               "variant": _variant(self, args, kwargs)}
        t0 = time.perf_counter()
        try:
            k = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            rec["ok"] = bool(k.asm.get("cubin"))
            rec["hash"] = k.hash
            rec["shared"] = k.metadata.shared
            if k.hash not in seen:
                seen[k.hash] = _resources(k, tool)
            rec["regs"], rec["stack_bytes"], rec["local_bytes"] = seen[k.hash]
        except Exception:  # noqa: BLE001 - reported per launch
            rec["ok"] = False
            rec["error"] = traceback.format_exc()[-4000:]
        records.append(rec)
        with torch.no_grad():
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, torch.Tensor):
                    v.data.zero_()
        return None

    JITFunction.run = run
    scenarios = _scenarios()
    failures = {}
    for name in names or list(scenarios):
        state["scenario"] = name
        try:
            scenarios[name]()
        except Exception:  # noqa: BLE001 - a scenario that cannot run is a failure of its own
            failures[name] = traceback.format_exc()[-4000:]
    launched = {r["kernel"] for r in records}
    result = {"triton": triton.__version__, "torch": torch.__version__, "records": records,
              "scenario_errors": failures, "kernels": kernels,
              "uncovered": [k for k in kernels if k not in launched] if not names else []}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or None)
