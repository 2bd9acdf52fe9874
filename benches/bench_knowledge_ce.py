"""pytest-benchmark suite of the knowledge cross-entropy, forward + backward.

Run: ``python -m pytest benches/bench_knowledge_ce.py --benchmark-columns=median,min,max``.
Shapes: N=2048, V=32000 fp32 on CPU; N=8192, V=128256 bf16 on GPU (BENCH_TARGETS.md).
Providers: vfm's backends (and their in-place mode), torch eager, torch.compile, Liger-Kernel
where installed (GPU).  Peak memory beyond the inputs goes into ``extra_info``.
Set ``VFM_BENCH_ROWS`` / ``VFM_BENCH_VOCAB`` for other shapes.
"""

import os

import pytest
import torch

from vfm import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_ROWS = int(os.environ.get("VFM_BENCH_ROWS", 8192 if DEVICE == "cuda" else 2048))
VOCAB = int(os.environ.get("VFM_BENCH_VOCAB", 128256 if DEVICE == "cuda" else 32000))
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
PROVIDERS = sorted(bench.providers(DEVICE))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", bench.CASES)
def test_knowledge_ce(benchmark, case, provider):
    inp = bench.make_inputs(case, N_ROWS, VOCAB, DTYPE, DEVICE)
    step = bench.providers(DEVICE)[provider](inp)
    if step is None:
        pytest.skip(f"{provider} has no {case}")
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.pedantic(run, rounds=5 if DEVICE == "cpu" else 10, warmup_rounds=2)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_gib_beyond_inputs"] = bench.gpu_peak_gib(step)
    else:
        benchmark.extra_info["peak_rss_gb"] = bench.cpu_peak_gb(provider, case, N_ROWS, VOCAB)
    benchmark.extra_info.update(n_rows=N_ROWS, vocab=VOCAB, dtype=str(DTYPE))
