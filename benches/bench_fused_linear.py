"""Fused linear (knowledge) cross-entropy benchmark: forward + backward through the output layer.

Two ways to run it:

* pytest-benchmark: ``python -m pytest benches/bench_fused_linear.py --benchmark-columns=median``
  (CPU: N=512, H=1024, V=32000 fp32 to stay short; GPU: N=8192, H=4096, V=128256 bf16).
* script: ``python benches/bench_fused_linear.py --device cpu --rows 2048 --hidden 1024 --vocab 128256``
  prints a Markdown table of time (median) and peak memory beyond the inputs (CPU: VmHWM growth of
  a child process that runs one step after a warm-up, returned gradients included, as
  ``vfm/bench.py`` measures; GPU: ``torch.cuda.max_memory_allocated`` growth).

Cases: ``ce`` (plain cross-entropy, 10% rows ignored) and ``distill`` (student and teacher heads,
0.5 x CE + 0.5 x JSD(beta 0.5), T = 1).  Providers: vfm backends (``vfm[cpp]`` on CPU,
``vfm[triton]`` on CUDA, ``vfm[triton]-bf16acc`` without fp32 weight-gradient accumulation,
``-filter`` with the opt-in gradient filter at ``grad_filter=2**-12``),
``torch eager`` (materialised logits + ``F.cross_entropy``), ``torch linear_cross_entropy``
(torch's chunked ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, CE only), and
Liger-Kernel (default, and ``-fp32acc``) / Cut Cross-Entropy (default filtering, and ``-exact``)
when importable.  ``--errors`` (default on CUDA) adds each provider's gradient error: the relative
Frobenius norm ||g - r|| / ||r|| of dh and dW against eager in fp32 (fp64 on CPU) on upcast inputs.  Every step returns the gradients of hidden and
weight (kept alive while memory is measured).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from vfm.bench import _rss_status as _rss  # noqa: E402  (shared harness helpers)
from vfm.bench import gpu_peak_gib  # noqa: E402

CASES = ("ce", "distill")
CE_W, KD_W, BETA = 0.5, 0.5, 0.5
#: Tolerance of the ``-filter`` providers (``grad_filter``): 2^-12 of each row's largest gradient entry.
FILTER_EPS = 2.0 ** -12


def make_inputs(case: str, n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """hidden (N, H), weight (V, H), target (N,) with 10% ignored; a teacher head for ``distill``."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for GPU shapes

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    inp = dict(hidden=randn(n, h), weight=randn(v, h, scale=h ** -0.5))
    target = torch.randint(0, v, (n,), generator=g, device=device)
    target[torch.rand(n, generator=g, device=device) < 0.1] = -100
    inp["target"] = target
    if case == "distill":
        inp["t_hidden"], inp["t_weight"] = randn(n, h), randn(v, h, scale=h ** -0.5)
    return inp


def _leaves(inp):
    return inp["hidden"].detach().requires_grad_(), inp["weight"].detach().requires_grad_()


def _jsd_eager(z, t, mask):
    log_p, log_q = F.log_softmax(z.float(), -1), F.log_softmax(t.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(1 - BETA)),
                                         log_q + torch.log(torch.tensor(BETA))]), 0)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    per_row = BETA * kl_qm + (1 - BETA) * kl_pm
    return (per_row * mask).sum() / mask.sum().clamp_min(1)


def providers(device: str) -> Dict[str, Callable]:
    """name -> make(case, inp) returning a step closure (or None when the provider lacks the case)."""
    import vfm

    out: Dict[str, Callable] = {}
    backends = [b for b in vfm.available_backends("fused_linear_knowledge_cross_entropy", device)
                if b != "torch" and not (b == "triton" and device == "cpu")]
    for backend in backends:
        for suffix, accum, filt in (("", torch.float32, None), ("-bf16acc", None, None),
                                    ("-filter", torch.float32, FILTER_EPS)):
            if suffix == "-bf16acc" and device != "cuda":
                continue

            def make(case, inp, backend=backend, accum=accum, filt=filt):
                def step():
                    h, w = _leaves(inp)
                    opts = {}
                    if case == "distill":
                        opts = dict(teacher_hidden=inp["t_hidden"], teacher_weight=inp["t_weight"], kd="jsd",
                                    jsd_beta=BETA, ce_weight=CE_W, kd_weight=KD_W)
                    with vfm.use_backend(backend):
                        loss = vfm.functional.fused_linear_knowledge_cross_entropy(
                            h, w, inp["target"], grad_accum_dtype=accum, grad_filter=filt, **opts)
                    loss.backward()
                    return h.grad, w.grad
                return step
            out[f"vfm[{backend}]{suffix}"] = make

    def eager(case, inp):
        def step():
            h, w = _leaves(inp)
            z = h @ w.T
            loss = F.cross_entropy(z.float(), inp["target"], ignore_index=-100)
            if case == "distill":
                with torch.no_grad():
                    t = inp["t_hidden"] @ inp["t_weight"].T
                loss = CE_W * loss + KD_W * _jsd_eager(z, t, (inp["target"] != -100).float())
            loss.backward()
            return h.grad, w.grad
        return step
    out["torch eager"] = eager

    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        def torch_lce(case, inp):
            if case != "ce":
                return None

            def step():
                h, w = _leaves(inp)
                loss = F.linear_cross_entropy(h, w, inp["target"], ignore_index=-100,
                                              options=torch.nn.LinearCrossEntropyOptions())
                loss.backward()
                return h.grad, w.grad
            return step
        out["torch linear_cross_entropy"] = torch_lce

    try:  # optional peers
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # type: ignore

        def liger(case, inp, accum=None):
            if case != "ce" or device != "cuda":
                return None
            fn = (LigerFusedLinearCrossEntropyLoss(ignore_index=-100, accum_dtype=accum) if accum is not None
                  else LigerFusedLinearCrossEntropyLoss(ignore_index=-100))

            def step():
                h, w = _leaves(inp)
                fn(w, h, inp["target"]).backward()
                return h.grad, w.grad
            return step
        out["liger"] = liger
        if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters:
            out["liger-fp32acc"] = lambda case, inp: liger(case, inp, torch.float32)
    except Exception:  # noqa: BLE001
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce  # type: ignore

        def cut_ce(case, inp, **kw):
            if case != "ce" or device != "cuda":
                return None

            def step():
                h, w = _leaves(inp)
                cce(h, w, inp["target"], ignore_index=-100, **kw).backward()
                return h.grad, w.grad
            return step
        out["cut cross-entropy"] = cut_ce
        if "filter_eps" in inspect.signature(cce).parameters:
            out["cut cross-entropy-exact"] = lambda case, inp: cut_ce(case, inp, filter_eps=None)
    except Exception:  # noqa: BLE001
        pass
    return out


def reference_grads(case: str, inp: dict, device: str):
    """(grad_hidden, grad_weight) of the eager loss in fp32 (fp64 on CPU) from upcast inputs."""
    wide = torch.float64 if device == "cpu" else torch.float32
    up = {k: (t.to(wide) if t.is_floating_point() else t) for k, t in inp.items()}
    return providers(device)["torch eager"](case, up)()


def grad_errors(out, ref) -> tuple:
    """Relative Frobenius errors ||g - r|| / ||r|| of (grad_hidden, grad_weight), in fp32/fp64."""
    errs = []
    for g, r in zip(out, ref):
        d = torch.linalg.vector_norm((g.to(r.dtype) - r).flatten()) / torch.linalg.vector_norm(r.flatten())
        errs.append(float(d))
    return tuple(errs)


def time_step(step: Callable, device: str, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``step()`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    return statistics.median(times)


def child_peak_gb(provider: str, case: str, n: int, h: int, v: int) -> float:
    """In this (child) process: one warm-up step, reset VmHWM, one step; RSS growth in GB."""
    inp = make_inputs(case, n, h, v, torch.float32, "cpu")
    step = providers("cpu")[provider](case, inp)
    warm = step()  # warm-up: thread pools and lazy buffers are not the op's memory
    del warm
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss("VmRSS")
    out = step()
    peak = _rss("VmHWM")
    del out
    return (peak - base) / 1e9


def cpu_peak_gb(provider: str, case: str, n: int, h: int, v: int) -> float:
    """Peak RSS growth of one step, measured in a fresh child process (see :func:`child_peak_gb`)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json; sys.path.insert(0, {here!r}); from bench_fused_linear import child_peak_gb; "
            f"print(json.dumps(child_peak_gb({provider!r}, {case!r}, {n}, {h}, {v})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    return float(json.loads(res.stdout.strip().splitlines()[-1]))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description="fused linear (knowledge) cross-entropy benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--cases", default=None, help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--providers", default=None, help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 GPU, 1 CPU)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--errors", action=argparse.BooleanOptionalAction, default=None,
                        help="gradient errors vs an fp32 (GPU) / fp64 (CPU) eager reference "
                             "(default: on for cuda)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    n, h, v = args.rows or (8192 if gpu else 2048), args.hidden or (4096 if gpu else 1024), args.vocab or 128256
    dtype = torch.bfloat16 if gpu else torch.float32
    cases = args.cases.split(",") if args.cases else (list(CASES) if gpu else ["ce"])
    repeat = args.repeat or (10 if gpu else 2)
    provs = providers(args.device)
    if args.providers:
        provs = {k: p for k, p in provs.items() if k in args.providers.split(",")}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    print(f"device={args.device} N={n} H={h} V={v} dtype={dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}", flush=True)
    errors = gpu if args.errors is None else args.errors
    rows = []
    for case in cases:
        inp = make_inputs(case, n, h, v, dtype, args.device)
        ref = reference_grads(case, inp, args.device) if errors else None
        for name in tqdm(list(provs), desc=case):
            step = provs[name](case, inp)
            if step is None:
                continue
            err = (float("nan"), float("nan"))
            if ref is not None:
                out = step()
                err = grad_errors(out, ref)
                del out
            warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
            ms = time_step(step, args.device, warmup=warmup, repeat=repeat)
            mem = float("nan")
            if not args.no_memory:
                mem = gpu_peak_gib(step) if gpu else cpu_peak_gb(name, case, n, h, v)
            rows.append(dict(case=case, provider=name, ms=ms, mem=mem, err_hidden=err[0], err_weight=err[1]))
            print(f"  {case} {name}: {ms:.1f} ms, {mem:.3f} {'GiB' if gpu else 'GB'}, "
                  f"grad errors (dh, dW) {err[0]:.1e}, {err[1]:.1e}", flush=True)
        del ref
    unit = "GiB" if gpu else "GB"
    print(f"\n| case | provider | time (ms) | peak memory beyond inputs ({unit}) | vs eager | "
          f"grad error dh, dW (rel. Frobenius) |\n|---|---|---|---|---|---|")
    for case in cases:
        eager = next((r["ms"] for r in rows if r["case"] == case and r["provider"] == "torch eager"), float("nan"))
        for r in (r for r in rows if r["case"] == case):
            print(f"| {case} | {r['provider']} | {r['ms']:.1f} | {r['mem']:.3f} | "
                  f"{r['ms'] / eager:.2f}x eager's time | {r['err_hidden']:.1e}, {r['err_weight']:.1e} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(dict(device=args.device, n=n, h=h, v=v, dtype=str(dtype), rows=rows), fh, indent=1)
        os.replace(tmp, args.json)
    return 0


# ------------------------------------------------------------------------ pytest-benchmark --
try:
    import pytest
except ImportError:  # pragma: no cover - script mode without pytest
    pytest = None

if pytest is not None:
    _DEV = "cuda" if torch.cuda.is_available() else "cpu"
    _SHAPE = (8192, 4096, 128256) if _DEV == "cuda" else (512, 1024, 32000)
    _DTYPE = torch.bfloat16 if _DEV == "cuda" else torch.float32

    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("provider", sorted(providers(_DEV)))
    def test_fused_linear(benchmark, provider, case):
        inp = make_inputs(case, *_SHAPE, _DTYPE, _DEV)
        step = providers(_DEV)[provider](case, inp)
        if step is None:
            pytest.skip(f"{provider} has no {case} case on {_DEV}")

        def run():
            step()
            if _DEV == "cuda":
                torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=10 if _DEV == "cuda" else 3, warmup_rounds=1)
        if _DEV == "cuda":
            benchmark.extra_info["peak_gib"] = gpu_peak_gib(step)
        benchmark.extra_info.update(n=_SHAPE[0], h=_SHAPE[1], v=_SHAPE[2], dtype=str(_DTYPE))


if __name__ == "__main__":
    sys.exit(main())
