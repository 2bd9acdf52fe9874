"""PEFT mixed-adapter batches (``adapter_names=``, inference): PEFT's loop against vfm's grouped call.

One PEFT LoRA layer holding K adapters (r = 16, alpha = 32); a batch of B items, each naming one of
the K adapters at random (a few ``"__base__"``), of S tokens each.  The timed call is the layer's
forward under ``torch.no_grad()``, as PEFT runs mixed batches (eval mode only):

* ``base``: the frozen base linear alone;
* ``peft``: PEFT's ``lora.Linear`` with ``adapter_names`` (a Python loop over the adapters named in
  the batch: gather their items, lora_A, lora_B, scatter back);
* ``vfm``: the same layer after ``vfm.peft.accelerate`` (one ``lora_linear_multi`` call on the
  named adapters' factors, stacked on every call);
* ``vfm cached``: after ``vfm.peft.accelerate(model, mixed_batch_cache=True)`` (the stacks kept
  between calls while the adapters are unchanged).

Overhead = median time / median base time - 1, all providers interleaved round by round.  Two
batch shapes: S = 1 (a decoding step: B rows in all) and a prefill-sized S.  Default sizes:
GPU 4096 x 4096, bf16, B = 64, S = 1 and 128; CPU 1024 x 1024, fp32, B = 64, S = 1 and 32.  Before
timing, vfm's output is checked against PEFT's.

Usage: ``python benches/bench_peft_mixed.py [rounds] [--ks 4,16,64] [--shape DINxDOUT] [--batch B]
[--seq S1,S2] [--threads T]``.  Also a pytest-benchmark test (``python -m pytest
benches/bench_peft_mixed.py``).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import pytest
import torch
from torch import nn

import vfm.peft

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPE = (4096, 4096) if DEVICE == "cuda" else (1024, 1024)
SEQS = (1, 128) if DEVICE == "cuda" else (1, 32)
BATCH = 64
RANK, ALPHA = 16, 32


class _One(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def layers(n_adapters: int, d_in: int, d_out: int):
    """(base linear, PEFT layer, vfm layer, vfm layer with cached stacks) with ``n_adapters`` random
    adapters named a0, a1, ..."""
    torch.manual_seed(0)
    cfg = dict(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])
    model = get_peft_model(_One(d_in, d_out), LoraConfig(**cfg), adapter_name="a0")
    for k in range(1, n_adapters):
        model.add_adapter(f"a{k}", LoraConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02)
    model = model.to(DEVICE, DTYPE).eval()
    fast, cached = copy.deepcopy(model), copy.deepcopy(model)
    assert vfm.peft.accelerate(fast).num_accelerated == 1
    assert vfm.peft.accelerate(cached, mixed_batch_cache=True).num_accelerated == 1
    layer = model.base_model.model.proj
    return layer.base_layer, layer, fast.base_model.model.proj, cached.base_model.model.proj


def batch_names(n_adapters: int, batch: int, seed: int = 0):
    rng = random.Random(seed)
    return ["__base__" if rng.random() < 0.05 else f"a{rng.randrange(n_adapters)}" for _ in range(batch)]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def interleaved(rounds: int, ks=(4, 16, 64), shape=SHAPE, batch=BATCH, seqs=SEQS):
    """Median ms per provider for every (K, S); prints a markdown table and returns the rows."""
    rows = []
    for n_adapters in ks:
        base, peft_layer, vfm_layer, cached_layer = layers(n_adapters, *shape)
        names = batch_names(n_adapters, batch)
        for seq in seqs:
            x = torch.randn(batch, seq, shape[0], device=DEVICE, dtype=DTYPE)
            calls = {"base": lambda: base(x), "peft": lambda: peft_layer(x, adapter_names=names),
                     "vfm": lambda: vfm_layer(x, adapter_names=names),
                     "vfm cached": lambda: cached_layer(x, adapter_names=names)}
            with torch.no_grad():
                ref = calls["peft"]()
                tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
                for name in ("vfm", "vfm cached"):
                    out = calls[name]()
                    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
                for f in calls.values():  # warm-up (caches, kernels)
                    f()
                times = {k: [] for k in calls}
                for r in range(rounds):
                    order = list(calls.items())
                    order = order[r % len(order):] + order[: r % len(order)]
                    for k, f in order:
                        _sync()
                        t0 = time.perf_counter()
                        f()
                        _sync()
                        times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append((n_adapters, seq, med))
    print(f"PEFT mixed-adapter batch, {DEVICE} {str(DTYPE).replace('torch.', '')}, {shape[0]}x{shape[1]}, r={RANK}, "
          f"B={batch}, {rounds} rounds, torch threads {torch.get_num_threads()}")
    print("| K | S (rows) | base | PEFT | vfm | vfm cached | PEFT / vfm | PEFT / vfm cached |")
    print("|---|---|---|---|---|---|---|---|")
    for n_adapters, seq, med in rows:
        b = med["base"]
        over = {k: f"{(med[k] / b - 1) * 100:+.0f}%" for k in ("peft", "vfm", "vfm cached")}
        print(f"| {n_adapters} | {seq} ({seq * batch}) | {b:.3f} ms | {over['peft']} | {over['vfm']} | "
              f"{over['vfm cached']} | {med['peft'] / med['vfm']:.2f}x | {med['peft'] / med['vfm cached']:.2f}x |")
    return rows


@pytest.mark.parametrize("provider", ["base", "peft", "vfm", "vfm cached"])
def test_mixed_batch(benchmark, provider):
    base, peft_layer, vfm_layer, cached_layer = layers(16, *SHAPE)
    names = batch_names(16, BATCH)
    x = torch.randn(BATCH, 1, SHAPE[0], device=DEVICE, dtype=DTYPE)
    fn = {"base": lambda: base(x), "peft": lambda: peft_layer(x, adapter_names=names),
          "vfm": lambda: vfm_layer(x, adapter_names=names),
          "vfm cached": lambda: cached_layer(x, adapter_names=names)}[provider]

    def step():
        with torch.no_grad():
            fn()
        _sync()

    benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rounds", nargs="?", type=int, default=20)
    parser.add_argument("--ks", default="4,16,64", help="numbers of adapters, comma-separated")
    parser.add_argument("--shape", default=f"{SHAPE[0]}x{SHAPE[1]}", help="DINxDOUT")
    parser.add_argument("--batch", type=int, default=BATCH, help="items per batch (one adapter name each)")
    parser.add_argument("--seq", default=",".join(map(str, SEQS)), help="tokens per item, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"rounds must be >= 1, got {args.rounds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        ks = tuple(int(v) for v in args.ks.split(","))
        seqs = tuple(int(v) for v in args.seq.split(","))
    except ValueError:
        parser.error(f"--shape, --ks and --seq take integers, got {args.shape!r}, {args.ks!r}, {args.seq!r}")
    if len(shape) != 2 or min(shape) < 1 or min(ks) < 1 or min(seqs) < 1 or args.batch < 1:
        parser.error("--shape needs DINxDOUT >= 1; --ks, --seq and --batch need values >= 1")
    interleaved(args.rounds, ks, shape, args.batch, seqs)


if __name__ == "__main__":
    main()
