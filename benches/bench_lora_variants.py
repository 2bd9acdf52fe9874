"""Benchmarks of the LoRA variants' targets: DoRA, torch.compile on PEFT, many adapters per batch.

Overhead = time of one forward + backward step / time of the frozen base linear alone - 1
(BENCH_TARGETS.md).  The input requires grad (as inside a model), the upstream gradient is dense,
r = 16, alpha = 32.  GPU: 4096 x 4096, N = 8192, bf16 (the targets' shape).  CPU: 1024 x 1024,
N = 2048, fp32 (no target there; the same code at a size a CPU runs).

Cases (each also a pytest-benchmark test: ``python -m pytest benches/bench_lora_variants.py``):

* ``dora``: PEFT's DoRA layer (``use_dora=True``, dropout 0) against vfm's (``vfm.peft.accelerate``);
  target <= +25% (PEFT +186%).
* ``compile``: ``torch.compile`` on the PEFT LoRA model, dropout 0 and 0.1 (the reference figures:
  +55% / +62%; vfm's target for the uncompiled layer is <= +15%).  GPU only by default: inductor's
  CPU build of the graph takes minutes here.
* ``several``: two active adapters on one layer (PEFT's ``set_adapter(["default", "second"])``,
  summed on every row, both trained): PEFT's loop over them against vfm's one adapter of the
  concatenated ranks (no target; ``--cases several``).
* ``multi``: N rows spread evenly at random over K = 4, 16, 64 adapters: a torch loop over the
  row segments (the segments' row indices computed once, outside the timed step), torch with the
  factors gathered per row and batched matmuls, and ``vfm.functional.lora_linear_multi``; targets
  <= +20%, +25%, +35% (loop +97%, +472%, +1588%; gathered +899%, +718%, +672%).

Before timing, every case checks that its providers compute the same output (a wrong baseline
would make any ratio meaningless).  ``python benches/bench_lora_variants.py [rounds] [--cases
dora,compile,multi,several] [--shape DINxDOUT] [--rows N] [--threads T]`` runs every provider of the
chosen cases once per round, interleaved with the base linear, and prints median overheads beside
the targets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import vfm
import vfm.peft
from bench_lora import _One  # the one-layer model of the LoRA bench (benches/ is on sys.path)
from vfm.functional import lora_linear_multi

peft = pytest.importorskip("peft")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
N_ROWS = 8192 if DEVICE == "cuda" else 2048
SHAPE = (4096, 4096) if DEVICE == "cuda" else (1024, 1024)
RANK, ALPHA = 16, 32
KS = (4, 16, 64)
TARGETS = {("dora", "vfm"): "<= +25%", ("dora", "peft"): "+186% measured",
           ("compile", "peft+compile p0.0"): "+55% measured (vfm uncompiled <= +15%)",
           ("compile", "peft+compile p0.1"): "+62% measured (vfm uncompiled <= +15%)"}
for _k, _t, _loop, _bmm in zip(KS, ("<= +20%", "<= +25%", "<= +35%"), ("+97%", "+472%", "+1588%"),
                               ("+899%", "+718%", "+672%")):
    TARGETS[(f"multi K={_k}", "vfm")] = _t
    TARGETS[(f"multi K={_k}", "torch loop")] = _loop + " measured"
    TARGETS[(f"multi K={_k}", "torch gathered")] = _bmm + " measured"


def _inputs(d_in, d_out, n_rows):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_rows, d_in, generator=g).to(DEVICE, DTYPE).requires_grad_()
    grad = torch.randn(n_rows, d_out, generator=g).to(DEVICE, DTYPE)
    return x, grad


def _step(forward, params, x, grad):
    """One forward + backward; gradients cleared after (as an optimizer's zero_grad would)."""
    def run():
        forward(x).backward(grad)
        x.grad = None
        for p in params:
            p.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return run


def base_step(d_in, d_out, n_rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(d_in, d_out, bias=False).to(DEVICE, DTYPE).requires_grad_(False)
    x, grad = _inputs(d_in, d_out, n_rows)
    return _step(layer, [], x, grad), (layer, x)


def _peft_model(d_in, d_out, dropout, use_dora):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"], use_dora=use_dora)
    model = peft.get_peft_model(_One(d_in, d_out).to(DEVICE, DTYPE), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # PEFT initialises B to zero; any values will do here
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.train()


def dora_steps(d_in, d_out, n_rows):
    """{provider: step} for DoRA at dropout 0; the providers' outputs are checked to agree."""
    x, grad = _inputs(d_in, d_out, n_rows)
    models = {"peft": _peft_model(d_in, d_out, 0.0, True), "vfm": _peft_model(d_in, d_out, 0.0, True)}
    report = vfm.peft.accelerate(models["vfm"])
    assert report.num_accelerated == 1, report
    _agree({k: m(x) for k, m in models.items()}, "dora")
    return {k: _step(m, [p for p in m.parameters() if p.requires_grad], x, grad) for k, m in models.items()}


def several_steps(d_in, d_out, n_rows):
    """{provider: step} for two active LoRA adapters (PEFT's ``set_adapter([...])``: both summed on
    every row, both trained) at dropout 0; the providers' outputs are checked to agree."""
    x, grad = _inputs(d_in, d_out, n_rows)
    models = {}
    for provider in ("peft", "vfm"):
        model = _peft_model(d_in, d_out, 0.0, False)
        model.add_adapter("second", peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B.second" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.base_model.set_adapter(["default", "second"])
        models[provider] = model.to(DEVICE, DTYPE).train()
    report = vfm.peft.accelerate(models["vfm"])
    assert report.num_accelerated == 1 and not report.fallbacks, report
    _agree({k: m(x) for k, m in models.items()}, "several")
    return {k: _step(m, [p for p in m.parameters() if p.requires_grad], x, grad) for k, m in models.items()}


def compile_steps(d_in, d_out, n_rows, dropouts=(0.0, 0.1)):
    """{provider: step} for torch.compile on PEFT's LoRA model (compiled here, on the first call)."""
    x, grad = _inputs(d_in, d_out, n_rows)
    steps = {}
    for p in dropouts:
        model = _peft_model(d_in, d_out, p, False)
        compiled = torch.compile(model)
        if p == 0.0:
            _agree({"eager": model(x), "compiled": compiled(x)}, "compile")
        steps[f"peft+compile p{p:.1f}"] = _step(compiled, [q for q in model.parameters() if q.requires_grad], x,
                                                grad)
    return steps


def _multi_inputs(d_in, d_out, n_rows, k):
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(DEVICE, DTYPE)
    a_stack = (torch.randn(k, RANK, d_in, generator=g) / d_in ** 0.5).to(DEVICE, DTYPE).requires_grad_()
    b_stack = (torch.randn(k, d_out, RANK, generator=g) * 0.02).to(DEVICE, DTYPE).requires_grad_()
    ids = (torch.randperm(n_rows, generator=g) % k).to(DEVICE)  # evenly spread, in random order
    scalings = torch.full((k,), ALPHA / RANK, device=DEVICE, dtype=torch.float32)
    return weight, a_stack, b_stack, ids, scalings


def multi_steps(d_in, d_out, n_rows, k):
    """{provider: step} for K adapters in one batch: torch loop, torch gathered, vfm."""
    x, grad = _inputs(d_in, d_out, n_rows)
    weight, a_stack, b_stack, ids, scalings = _multi_inputs(d_in, d_out, n_rows, k)
    segments = [torch.nonzero(ids == j).flatten() for j in range(k)]  # once, outside the timed step
    scale = ALPHA / RANK

    def loop(x):
        y = F.linear(x, weight)
        for j, rows in enumerate(segments):
            xs = x.index_select(0, rows)
            y = y.index_add(0, rows, F.linear(F.linear(xs, a_stack[j]), b_stack[j]), alpha=scale)
        return y

    def gathered(x):
        xa = torch.bmm(a_stack[ids], x.unsqueeze(-1))  # (N, r, 1)
        return F.linear(x, weight) + scale * torch.bmm(b_stack[ids], xa).squeeze(-1)

    def fused(x):
        return lora_linear_multi(x, weight, None, a_stack, b_stack, scalings, ids)

    forwards = {"torch loop": loop, "torch gathered": gathered, "vfm": fused}
    _agree({name: f(x) for name, f in forwards.items()}, f"multi K={k}")
    return {name: _step(f, [a_stack, b_stack], x, grad) for name, f in forwards.items()}


def _agree(outputs, case):
    """Every provider's output matches the first one's (to bf16 / fp32 rounding of the sums)."""
    names = list(outputs)
    ref = outputs[names[0]].detach().float()
    scale = ref.abs().max().item() or 1.0
    tol = 3e-2 if DTYPE == torch.bfloat16 else 1e-4
    for name in names[1:]:
        err = (outputs[name].detach().float() - ref).abs().max().item() / scale
        assert err <= tol, f"{case}: {name} differs from {names[0]} by {err:.2e} (relative to max |y|)"


# ----------------------------------------------------------------------------- pytest --
def _bench(benchmark, run, **info):
    benchmark.pedantic(run, rounds=10 if DEVICE == "cuda" else 5, warmup_rounds=2)
    benchmark.extra_info.update(n_rows=N_ROWS, d_in=SHAPE[0], d_out=SHAPE[1], r=RANK, dtype=str(DTYPE), **info)


def test_base_linear(benchmark):
    _bench(benchmark, base_step(*SHAPE, N_ROWS)[0])


@pytest.mark.parametrize("provider", ["peft", "vfm"])
def test_dora(benchmark, provider):
    _bench(benchmark, dora_steps(*SHAPE, N_ROWS)[provider], provider=provider)


@pytest.mark.skipif(DEVICE != "cuda", reason="inductor's CPU build of the graph takes minutes; GPU target only")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_peft_compiled(benchmark, dropout):
    _bench(benchmark, compile_steps(*SHAPE, N_ROWS, (dropout,))[f"peft+compile p{dropout:.1f}"], dropout=dropout)


@pytest.mark.parametrize("provider", ["peft", "vfm"])
def test_several_active(benchmark, provider):
    _bench(benchmark, several_steps(*SHAPE, N_ROWS)[provider], provider=provider)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("provider", ["torch loop", "torch gathered", "vfm"])
def test_multi(benchmark, provider, k):
    _bench(benchmark, multi_steps(*SHAPE, N_ROWS, k)[provider], provider=provider, k=k)


# ----------------------------------------------------------------------------- script --
def interleaved(rounds, cases, shape, n_rows):
    """[(case, provider, median seconds, overhead over the base)], each case's providers and the base
    linear timed in rotated interleaved rounds (one step each per round)."""
    builders = {"dora": lambda: {("dora", p): s for p, s in dora_steps(*shape, n_rows).items()},
                "compile": lambda: {("compile", p): s for p, s in compile_steps(*shape, n_rows).items()},
                "several": lambda: {("several", p): s for p, s in several_steps(*shape, n_rows).items()},
                "multi": lambda: {(f"multi K={k}", p): s for k in KS for p, s in multi_steps(*shape, n_rows, k).items()}}
    rows = []
    for case in cases:
        steps = {("base", "base linear"): base_step(*shape, n_rows)[0]}
        steps.update(builders[case]())
        for run in steps.values():  # warm-up (and compilation)
            run()
            run()
        times = {key: [] for key in steps}
        order = list(steps)
        for r in range(rounds):
            for key in order[r % len(order):] + order[:r % len(order)]:
                start = time.perf_counter()
                steps[key]()
                times[key].append(time.perf_counter() - start)
        base = statistics.median(times[("base", "base linear")])
        for key, ts in times.items():
            if key[0] != "base":
                rows.append((key[0], key[1], statistics.median(ts), statistics.median(ts) / base - 1.0))
        rows.append((case, "base linear", base, 0.0))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rounds", nargs="?", type=int, default=10)
    ap.add_argument("--cases", default="dora,compile,multi" if DEVICE == "cuda" else "dora,multi",
                    help="comma-separated subset of dora, compile, multi, several")
    ap.add_argument("--shape", default=f"{SHAPE[0]}x{SHAPE[1]}", help="DINxDOUT")
    ap.add_argument("--rows", type=int, default=N_ROWS)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("dora", "compile", "multi", "several")]
    if bad or not cases:
        ap.error(f"--cases takes dora, compile, multi and several, got {args.cases!r}")
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        ap.error(f"--shape must be DINxDOUT with positive sizes, got {args.shape!r}")
    if args.rows < max(KS) or args.rounds < 1:
        ap.error(f"--rows must be >= {max(KS)} and rounds >= 1, got {args.rows} and {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.rounds} interleaved rounds on {DEVICE} ({torch.cuda.get_device_name(0) if DEVICE == 'cuda' else ''}"
          f"{torch.get_num_threads()} CPU threads), {shape[0]}x{shape[1]}, N={args.rows}, r={RANK}, {DTYPE}")
    print(f"{'case':12s} {'provider':20s} {'median ms':>10s} {'overhead':>9s}  target / reference")
    for case, provider, sec, over in interleaved(args.rounds, cases, shape, args.rows):
        print(f"{case:12s} {provider:20s} {sec * 1e3:10.2f} {over:+9.1%}  {TARGETS.get((case, provider), '')}")


if __name__ == "__main__":
    main()
