"""pytest-benchmark suite of the low-rank adapter layer, forward + backward.

Overhead = time / time of the frozen base linear alone - 1, vfm against PEFT, at dropout 0 and 0.1
(BENCH_TARGETS.md).  Run: ``python -m pytest benches/bench_lora.py --benchmark-columns=median``.
CPU: 1024 x 1024, N = 2048, r = 16, fp32.  GPU: 4096 x 4096 and 4096 x 14336, N = 8192, bf16.
The input requires grad (as inside a model) and the upstream gradient is dense.
``python benches/bench_lora.py [rounds] [threads] [DINxDOUT] [rows]`` instead runs every provider
once per round, interleaved, and prints median overheads: on a shared, noisy machine that compares
them under the same load (threads 0 keeps torch's default; the shape and rows default to the
targets' first shape).
"""

import pytest
import torch

import vfm
import vfm.peft

peft = pytest.importorskip("peft")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N_ROWS = 8192 if DEVICE == "cuda" else 2048
SHAPES = [(4096, 4096), (4096, 14336)] if DEVICE == "cuda" else [(1024, 1024)]
RANK, ALPHA = 16, 32


class _One(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def _model(provider, d_in, d_out, dropout):
    torch.manual_seed(0)
    base = _One(d_in, d_out).to(DEVICE, DTYPE)
    if provider == "base linear":
        base.requires_grad_(False)
        return base
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(base, cfg)
    for name, p in model.named_parameters():  # PEFT initialises B to zero; any values will do here
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    if provider == "vfm":
        report = vfm.peft.accelerate(model)
        assert len(report.accelerated) == 1, report
    return model


def _step(model, x, g):
    def run():
        y = model(x)
        y.backward(g)
        x.grad = None
        for p in model.parameters():
            p.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("provider", ["base linear", "peft", "vfm"])
def test_lora_layer(benchmark, provider, dropout, shape):
    if provider == "base linear" and dropout:
        pytest.skip("the base layer has no dropout")
    d_in, d_out = shape
    model = _model(provider, d_in, d_out, dropout)
    x = torch.randn(N_ROWS, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(N_ROWS, d_out, device=DEVICE, dtype=DTYPE)
    benchmark.pedantic(_step(model, x, g), rounds=10 if DEVICE == "cuda" else 7, warmup_rounds=2)
    benchmark.extra_info.update(n_rows=N_ROWS, d_in=d_in, d_out=d_out, r=RANK, dtype=str(DTYPE))


def interleaved(rounds: int = 15, shape=None, threads=None, n_rows=None) -> dict:
    """Overheads measured in interleaved rounds (base, PEFT and vfm steps one after another).

    On a shared, noisy machine separate pytest-benchmark tests run minutes apart under different
    loads; running one step of every provider per round and taking medians compares them under
    the same conditions; the order rotates every round (use a multiple of 5 rounds) so that no
    provider always follows the same one.  Returns {(provider, dropout): (median seconds, overhead
    of the medians over base's, overhead of the 10th percentiles)}.
    """
    import statistics
    import time

    if threads:
        torch.set_num_threads(threads)
    d_in, d_out = shape or SHAPES[0]
    cases = [("base linear", 0.0)] + [(p, d) for p in ("peft", "vfm") for d in (0.0, 0.1)]
    steps = {}
    for provider, dropout in cases:
        model = _model(provider, d_in, d_out, dropout)
        x = torch.randn(n_rows or N_ROWS, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
        g = torch.randn(n_rows or N_ROWS, d_out, device=DEVICE, dtype=DTYPE)
        steps[(provider, dropout)] = _step(model, x, g)
        for _ in range(2):
            steps[(provider, dropout)]()
    times = {case: [] for case in cases}
    order = list(steps)
    for k in range(rounds):
        # Rotate the order every round: a step reads a few percent slower or faster depending on
        # which step ran just before it, so a fixed order biases some providers.
        for case in order[k % len(order):] + order[:k % len(order)]:
            run = steps[case]
            start = time.perf_counter()
            run()
            times[case].append(time.perf_counter() - start)
    return {case: (statistics.median(ts), statistics.median(ts) / statistics.median(times[cases[0]]) - 1.0,
                   _low(ts) / _low(times[cases[0]]) - 1.0) for case, ts in times.items()}


def _low(ts) -> float:
    """The 10th percentile: on a shared machine the steps that other tenants slowed down sit above it."""
    s = sorted(ts)
    return s[(len(s) - 1) // 10]


if __name__ == "__main__":  # python benches/bench_lora.py [rounds] [threads] [DINxDOUT] [rows]: interleaved overheads
    import sys

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    threads = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "0" else None
    try:
        shape = tuple(int(v) for v in sys.argv[3].lower().split("x")) if len(sys.argv) > 3 else SHAPES[0]
        n_rows = int(sys.argv[4]) if len(sys.argv) > 4 else N_ROWS
    except ValueError:
        shape, n_rows = (), 0
    if len(shape) != 2 or min(shape) < 1 or n_rows < 1:
        sys.exit(f"bench_lora: shape must be DINxDOUT and rows a positive integer, got {sys.argv[3:5]}")
    print(f"{rounds} interleaved rounds, {threads or torch.get_num_threads()} thread(s), {shape[0]}x{shape[1]}, "
          f"N={n_rows}, r={RANK}, {DTYPE}")
    for (provider, dropout), (sec, over, over_low) in interleaved(rounds, shape, threads, n_rows).items():
        print(f"{provider:12s} dropout {dropout:.1f}: median {sec * 1e3:8.2f} ms  overhead {over:+.1%}  "
              f"(10th percentiles: {over_low:+.1%})")
