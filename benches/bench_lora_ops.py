"""Per-op timings of the C++ CPU low-rank kernels at the LoRA bench shape, relative to a fixed GEMM.

``python benches/bench_lora_ops.py [rounds] [threads]`` times each rank-r part of one
``lora_linear`` step (1024 x 1024 layer, N = 2048, r = 16, fp32) in interleaved rounds, next to
the same products composed the way the cpp backend did before it had the fused ops (BLAS for the
K = 16 expand, the in-place fused dropout backward on a grad_x the base GEMM wrote), and prints
each op's minimum time and that minimum as a fraction of a fixed BLAS GEMM (256 x 1024 x 1024)
timed in the same rounds, which makes runs on a noisy shared machine comparable.  Set
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` high to keep page faults of fresh
outputs out of the figures.  The FMA floor of one rank-16 product here is 0.125 of that GEMM.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from vfm.ops.lora_cpp import cpp_available, drop_args

N, D_IN, D_OUT, RANK = 2048, 1024, 1024, 16


def cases() -> dict:
    """name -> zero-argument callable, on fixed random operands."""
    ops = torch.ops.vfm_C
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g)
    w = torch.randn(D_OUT, D_IN, generator=g) * 0.03
    a = torch.randn(RANK, D_IN, generator=g) * 0.03
    b = torch.randn(D_OUT, RANK, generator=g) * 0.02
    gy = torch.randn(N, D_OUT, generator=g)
    gxa = torch.randn(N, RANK, generator=g)
    xa = torch.randn(N, RANK, generator=g)
    gx = torch.randn(N, D_IN, generator=g)
    calib = x[:256].clone()
    seed = torch.tensor(1234)
    d0, d1 = drop_args(0.0, seed), drop_args(0.1, seed)
    return {
        "reference GEMM 256x1024x1024": lambda: torch.mm(calib, w),
        "fwd p0: shrink + merge": lambda: (ops.lora_shrink(x, a, None, None, 1.0, *d0), ops.lora_merge(w, b, a, 2.0)),
        "fwd p0: shrink + BLAS expand": lambda: torch.mm(ops.lora_shrink(x, a, None, None, 1.0, *d0), b.t()),
        "fwd p0.1: shrink_expand": lambda: ops.lora_shrink_expand(x, a, b.t(), None, 2.0, *d1),
        "fwd p0.1: shrink + BLAS expand": lambda: torch.mm(ops.lora_shrink(x, a, None, None, 1.0, *d1), b.t()),
        "bwd grad_y pass: shrink_reduce": lambda: ops.lora_shrink_reduce(gy, b.t(), xa, 2.0),
        "bwd p0: merge + reduce": lambda: (ops.lora_merge(w, b, a, 2.0),
                                           ops.lora_reduce(gxa, x, 1, None, None, 1.0, *d0)),
        "bwd p0: BLAS expand + reduce": lambda: (torch.mm(gxa, a), ops.lora_reduce(gxa, x, 1, None, None, 1.0, *d0)),
        "bwd p0.1: expand_reduce": lambda: ops.lora_expand_reduce(gxa, a, x, *d1),
        "bwd p0.1: dx_ga_ on grad_x": lambda: ops.lora_dx_ga_(gx, gxa, a, x, None, *d1),
    }


def run(rounds: int = 40) -> dict:
    """{name: (minimum seconds, median seconds)} over ``rounds`` interleaved rounds."""
    fns = cases()
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


if __name__ == "__main__":
    ok, why = cpp_available()
    if not ok:
        sys.exit(f"the cpp backend is unavailable: {why}")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    res = run(rounds)
    ref = res["reference GEMM 256x1024x1024"][0]
    print(f"{rounds} rounds, {torch.get_num_threads()} thread(s); min / reference GEMM's min")
    for name, (low, med) in res.items():
        print(f"{name:32s} min {low * 1e3:7.3f} ms  median {med * 1e3:7.3f} ms  {low / ref:6.3f}")
