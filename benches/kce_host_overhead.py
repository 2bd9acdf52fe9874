"""Host overhead of one knowledge cross-entropy forward + backward on the Triton code path, counted on CPU.

On a GPU every ATen op that computes something is a kernel launch (a few microseconds of host
time each, plus a gap between kernels), every ``.item()`` / ``bool(tensor)`` / ``nonzero`` is a
device -> host synchronisation, and every Triton kernel is one more launch.  This script runs the
three benchmark cases of :mod:`vfm.bench` (``ce``, ``ce_kd``, ``ce_kd_mass``) with small CPU shapes
through the Triton backend (the interpreter, ``TRITON_INTERPRET=1``) and counts, per forward +
backward call:

* ATen ops dispatched (``TorchDispatchMode``), split into ops that would launch a kernel on a GPU
  and metadata / allocation ops (views, ``empty``) that would not;
* Triton kernel launches (the kernel objects' ``run`` is wrapped; the ATen ops the interpreter
  itself issues while running a kernel are not counted);
* device -> host synchronisations detectable at the ATen level (``_local_scalar_dense`` behind
  ``.item()`` / ``bool(t)`` / ``int(t)``, ``nonzero``, ``unique``, ...).

Times (best of the repeats, microseconds) are Python wall time with every Triton kernel replaced by a
no-op (the prologue's stub writes its error word = 0), so they measure the host work only
(argument checks, small tensor ops on tiny CPU tensors; Triton's launcher Python is *not*
included): ``prep`` is the argument normalisation alone, ``fwd+bwd`` the whole call.  Timing a
real kernel under the interpreter would be meaningless.

``VFM_KCE_DEVICE_PATH=1`` (set here unless ``--cpu-path``) makes the CPU tensors take the code path
CUDA tensors take (the device prologue and backward-scale kernels); older checkouts ignore it.

Usage::

    python benches/kce_host_overhead.py [--rows 64] [--vocab 256] [--repeat 200] [--cpu-path]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ops that launch nothing on a GPU (metadata, views, allocation without fill)
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "expand", "as_strided", "empty", "empty_strided", "empty_like",
    "detach", "alias", "t", "transpose", "select", "slice", "unsqueeze", "squeeze", "permute",
    "lift_fresh", "split", "unbind", "_reshape_alias", "new_empty", "new_empty_strided", "set_",
    "resize_", "_to_copy_noop",
}
_SYNC = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim", "unique_consecutive",
         "masked_select", "item", "is_nonzero", "equal", "allclose"}
_inside_kernel = threading.local()


class Counter(TorchDispatchMode):
    """Counts ATen ops (launching / not launching) and host synchronisations."""

    def __init__(self):
        super().__init__()
        self.launch = 0
        self.meta = 0
        self.sync = 0
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(_inside_kernel, "on", False):
            return out
        name = func._schema.name.split("::")[-1]
        if name in _SYNC:
            self.sync += 1
        if name in _NO_LAUNCH or (name == "_to_copy" and _same_type(args, kwargs, out)):
            self.meta += 1
        else:
            self.launch += 1
        self.names.append(name)
        return out


def _same_type(args, kwargs, out) -> bool:
    src = args[0] if args else None
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype \
        and src.device == out.device


class KernelHook:
    """Wraps the Triton kernels' ``run``: counts launches, optionally replaces them by a no-op."""

    def __init__(self):
        self.count = 0
        self.names = []
        self.stub = False
        self._patched = []

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for cls in (InterpretedFunction, JITFunction):
            orig = cls.run
            hook = self

            def run(self_k, *args, _orig=orig, **kwargs):
                if kwargs.get("warmup"):
                    return _orig(self_k, *args, **kwargs)
                hook.count += 1
                hook.names.append(getattr(self_k, "__name__", "?"))
                if hook.stub:
                    if hook.names[-1] == "_kce_prologue_kernel":
                        args[9].zero_()  # its error word: 'no range error' (the only output read on host)
                    return None
                _inside_kernel.on = True
                try:
                    return _orig(self_k, *args, **kwargs)
                finally:
                    _inside_kernel.on = False

            cls.run = run
            self._patched.append((cls, orig))
        return self

    def __exit__(self, *exc):
        for cls, orig in self._patched:
            cls.run = orig


def _step(case: str, n_rows: int, vocab: int):
    from vfm.bench import _vfm_loss, make_inputs

    inp = make_inputs(case, n_rows, vocab, torch.float32, "cpu")

    def step():
        z = inp.logits.detach().requires_grad_()
        _vfm_loss(z, inp).backward()
        return z.grad

    def prep():
        from vfm.ops.kce_api import prepare_arguments
        from vfm.bench import KD_WEIGHT, PENALTY_WEIGHT, TEMPERATURE

        opts = {}
        if inp.teacher is not None:
            opts.update(teacher_logits=inp.teacher, kd_weight=KD_WEIGHT, temperature=TEMPERATURE)
        if inp.allowed is not None:
            opts.update(allowed=inp.allowed, penalty_weight=PENALTY_WEIGHT)
        z = inp.logits.detach().requires_grad_()
        return prepare_arguments(z, inp.target, **opts)

    return step, prep


def _best_us(fn, repeat: int) -> float:
    """Best of ``repeat`` runs (microseconds): the machine is shared, the minimum is the host cost."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6


def measure(case: str, n_rows: int, vocab: int, repeat: int) -> dict:
    """Counts and host times of one forward + backward of ``case`` through the triton backend."""
    import vfm

    step, prep = _step(case, n_rows, vocab)
    with vfm.use_backend("triton"):
        step()  # warm-up: caches (packed group masks, compiled/rewritten kernels)
        with KernelHook() as hook:
            with Counter() as cnt:
                step()
            launches, kernel_names = hook.count, list(hook.names)
            hook.stub = True
            t_step = _best_us(step, repeat)
            t_prep = _best_us(prep, repeat)
    return dict(case=case, aten=cnt.launch, meta=cnt.meta, sync=cnt.sync, triton=launches,
                total=cnt.launch + launches, prep_us=t_prep, step_us=t_step, ops=cnt.names,
                kernels=kernel_names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--cpu-path", action="store_true",
                        help="keep the CPU code path (do not set VFM_KCE_DEVICE_PATH=1)")
    parser.add_argument("--verbose", action="store_true", help="list the ops and kernels")
    args = parser.parse_args(argv)
    if not args.cpu_path:
        os.environ.setdefault("VFM_KCE_DEVICE_PATH", "1")
    torch.set_num_threads(1)
    rows = []
    from vfm.bench import CASES

    for case in CASES:
        rows.append(measure(case, args.rows, args.vocab, args.repeat))
    print(f"N={args.rows} V={args.vocab} fp32, triton backend (interpreter), "
          f"VFM_KCE_DEVICE_PATH={os.environ.get('VFM_KCE_DEVICE_PATH', '0')}, torch {torch.__version__}")
    print("| case | ATen ops that launch | ATen metadata ops | Triton launches | launches total | "
          "host syncs | prep (us) | fwd+bwd host (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['aten']} | {r['meta']} | {r['triton']} | {r['total']} | {r['sync']} | "
              f"{r['prep_us']:.0f} | {r['step_us']:.0f} |")
    if args.verbose:
        for r in rows:
            print(r["case"], "ops:", " ".join(r["ops"]))
            print(r["case"], "kernels:", " ".join(r["kernels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
