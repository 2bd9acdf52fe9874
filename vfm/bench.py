"""Benchmark harness for the knowledge cross-entropy: cases, providers, timing and peak memory.

Used by ``vfm bench`` (the CPU report), ``benches/bench_knowledge_ce.py`` (pytest-benchmark) and
``benches/gpu_check.sh``.  Every figure is forward + backward.  Timing: median of repeated runs
after warm-ups (CUDA events on GPU).  Memory: on GPU the peak allocated beyond the inputs
(``torch.cuda.max_memory_allocated``); on CPU the peak RSS growth of a child process that runs
one forward + backward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

CASES = ("ce", "ce_kd", "ce_kd_mass")
CASE_TITLES = {"ce": "CE", "ce_kd": "CE + KD (KL, T=2, weight 0.5)",
               "ce_kd_mass": "CE + KD + mass penalty (half the labels allowed)"}
KD_WEIGHT, TEMPERATURE, PENALTY_WEIGHT = 0.5, 2.0, 0.1


@dataclass
class Inputs:
    logits: torch.Tensor
    target: torch.Tensor
    teacher: Optional[torch.Tensor]
    allowed: Optional[tuple]


def make_inputs(case: str, n_rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """Random logits (10% rows ignored), teacher and a grouped half-allowed mask, as the targets say."""
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n_rows, vocab, generator=g) * 2).to(device=device, dtype=dtype)
    target = torch.randint(0, vocab, (n_rows,), generator=g)
    target[torch.rand(n_rows, generator=g) < 0.1] = -100
    target = target.to(device)
    teacher = allowed = None
    if case in ("ce_kd", "ce_kd_mass"):
        teacher = (torch.randn(n_rows, vocab, generator=g) * 2).to(device=device, dtype=dtype)
    if case == "ce_kd_mass":
        n_groups = 16
        masks = torch.rand(n_groups, vocab, generator=g) < 0.5
        gid = torch.randint(0, n_groups, (n_rows,), generator=g)
        masks[gid, target.cpu().clamp_min(0)] = True  # gold labels are allowed
        allowed = (masks.to(device), gid.to(device))
    return Inputs(logits, target, teacher, allowed)


# ------------------------------------------------------------------------------ providers --
def _eager_loss(z, inp: Inputs):
    """The same loss written with plain torch ops (what users run today)."""
    loss = F.cross_entropy(z.float(), inp.target, ignore_index=-100)
    if inp.teacher is None:
        return loss
    mask = inp.target != -100
    n = mask.sum().clamp_min(1)
    log_p = F.log_softmax(z.float() / TEMPERATURE, -1)
    log_q = F.log_softmax(inp.teacher.float() / TEMPERATURE, -1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    loss = loss + KD_WEIGHT * TEMPERATURE ** 2 * (kl * mask).sum() / n
    if inp.allowed is not None:
        masks, gid = inp.allowed
        zf = z.float()
        allowed_lse = torch.logsumexp(zf.masked_fill(~masks[gid], float("-inf")), -1)
        pen = torch.logsumexp(zf, -1) - allowed_lse
        loss = loss + PENALTY_WEIGHT * (pen * mask).sum() / n
    return loss


def _vfm_loss(z, inp: Inputs, inplace: bool = False):
    from vfm.functional import knowledge_cross_entropy

    opts = dict(inplace_backward=inplace)
    if inp.teacher is not None:
        opts.update(teacher_logits=inp.teacher, kd_weight=KD_WEIGHT, temperature=TEMPERATURE)
    if inp.allowed is not None:
        opts.update(allowed=inp.allowed, penalty_weight=PENALTY_WEIGHT)
    return knowledge_cross_entropy(z, inp.target, **opts)


def providers(device: str) -> Dict[str, Callable]:
    """name -> fn(case_inputs) returning a closure that runs one forward + backward."""
    import vfm

    out: Dict[str, Callable] = {}
    auto = [b for b in vfm.available_backends("knowledge_cross_entropy", device)
            if not (b == "triton" and device == "cpu")]
    for backend in auto:
        if backend == "torch":
            continue  # the reference is for correctness, not speed

        def make(inp, backend=backend, inplace=False):
            def step():
                with vfm.use_backend(backend):
                    z = inp.logits.detach().requires_grad_()
                    _vfm_loss(z, inp, inplace).backward()
                    return z.grad
            return step

        out[f"vfm[{backend}]"] = make
        out[f"vfm[{backend}]-inplace"] = lambda inp, backend=backend: _inplace_step(inp, backend)

    def eager(inp):
        def step():
            z = inp.logits.detach().requires_grad_()
            _eager_loss(z, inp).backward()
            return z.grad
        return step

    compiled = torch.compile(_eager_loss, dynamic=False)

    def compiled_provider(inp):
        def step():
            z = inp.logits.detach().requires_grad_()
            compiled(z, inp).backward()
            return z.grad
        return step

    out["torch eager"] = eager
    out["torch.compile"] = compiled_provider
    liger = _liger_provider()
    if liger is not None:
        out["liger"] = liger
    return out


def _inplace_step(inp: Inputs, backend: str):
    import vfm

    # The in-place mode overwrites its input with the gradient.  Timing runs on whatever the
    # buffer holds (speed does not depend on the values), so no restoring copy is timed.
    work = inp.logits.clone()

    def step():
        with vfm.use_backend(backend):
            z = work.detach().requires_grad_()
            _vfm_loss(z, inp, inplace=True).backward()
            return z.grad
    return step


def _liger_provider():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss  # type: ignore
    except Exception:  # noqa: BLE001 - optional peer
        return None
    ce = LigerCrossEntropyLoss(ignore_index=-100)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def make(inp: Inputs):
        if inp.allowed is not None:
            return None  # Liger has no knowledge penalty
        if inp.logits.device.type != "cuda":
            return None

        def step():
            z = inp.logits.detach().requires_grad_()
            loss = ce(z, inp.target)
            if inp.teacher is not None:
                log_p = torch.log_softmax(z.float() / TEMPERATURE, -1)
                log_q = torch.log_softmax(inp.teacher.float() / TEMPERATURE, -1)
                loss = loss + KD_WEIGHT * TEMPERATURE ** 2 * kl(log_p, log_q)
            loss.backward()
            return z.grad
        return step
    return make


# ------------------------------------------------------------------------------ measuring --
def time_step(step: Callable, device: str, warmup: int = 2, repeat: int = 5) -> float:
    """Median milliseconds of ``step()`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_peak_gib(step: Callable) -> float:
    """Peak CUDA memory allocated by one step beyond what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 30


def cpu_peak_gb(provider: str, case: str, n_rows: int, vocab: int) -> float:
    """Peak RSS growth (GB) during one forward + backward (after a warm-up) in a child process.

    The returned gradient is included; the inputs are not.
    """
    code = ("import sys, json; from vfm.bench import _child_rss; "
            f"print(json.dumps(_child_rss({provider!r}, {case!r}, {n_rows}, {vocab})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _rss_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _child_rss(provider: str, case: str, n_rows: int, vocab: int) -> float:
    inp = make_inputs(case, n_rows, vocab, torch.float32, "cpu")
    step = providers("cpu")[provider](inp)
    step()  # warm-up: compilation, thread pools and lazy buffers are not the op's memory
    # Reset the peak (VmHWM) to the current RSS, so the peak counts this step only (Linux).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_status("VmRSS")
    out = step()
    peak = _rss_status("VmHWM")
    del out
    return (peak - base) / 1e9


def run_report(device: str, n_rows: int, vocab: int, dtype: torch.dtype, cases=CASES, repeat: int = 5,
               memory: bool = True, only: Optional[List[str]] = None, progress: bool = True) -> List[dict]:
    """Measure every provider on every case; returns rows of dicts (case, provider, ms, mem)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    provs = providers(device)
    if only:
        provs = {k: v for k, v in provs.items() if k in only}
    jobs = [(c, p) for c in cases for p in provs]
    bar = tqdm(jobs, desc="benchmark", disable=not progress) if tqdm else jobs
    rows = []
    for case, name in bar:
        if tqdm:
            bar.set_postfix_str(f"{case} / {name}")
        inp = make_inputs(case, n_rows, vocab, dtype, device)
        step = provs[name](inp)
        if step is None:
            continue
        ms = time_step(step, device, repeat=repeat)
        mem = float("nan")
        if memory:
            if device == "cuda":
                mem = gpu_peak_gib(step)
            else:
                mem = cpu_peak_gb(name, case, n_rows, vocab)
        rows.append(dict(case=case, provider=name, ms=ms, mem=mem))
        del inp, step
    return rows


def format_table(rows: List[dict], device: str) -> str:
    """A Markdown table: one line per case, ms and memory for each provider, and ratios."""
    unit = "GiB" if device == "cuda" else "GB"
    lines = ["| case | provider | time (ms) | peak memory beyond inputs (" + unit + ") | speed-up vs torch.compile | vs eager |",
             "|---|---|---|---|---|---|"]
    for case in CASES:
        sub = [r for r in rows if r["case"] == case]
        if not sub:
            continue
        ref_c = next((r["ms"] for r in sub if r["provider"] == "torch.compile"), math.nan)
        ref_e = next((r["ms"] for r in sub if r["provider"] == "torch eager"), math.nan)
        for r in sub:
            lines.append(f"| {CASE_TITLES[case]} | {r['provider']} | {r['ms']:.2f} | {r['mem']:.3f} | "
                         f"{ref_c / r['ms']:.2f}x | {ref_e / r['ms']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``vfm bench``: the knowledge cross-entropy against torch eager and torch.compile."""
    parser = argparse.ArgumentParser(prog="vfm bench", description=main.__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="N (default 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--vocab", type=int, default=None, help="V (default 32000 on CPU, 128256 on GPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--providers", default=None, help="comma-separated subset")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch "
                     f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    gpu = args.device == "cuda"
    n_rows = args.rows or (8192 if gpu else 2048)
    vocab = args.vocab or (128256 if gpu else 32000)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    repeat = args.repeat or (10 if gpu else 5)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            parser.error(f"--cases: unknown case {c!r}; choose from {CASES}")
    for name, value in (("--rows", args.rows), ("--vocab", args.vocab), ("--repeat", args.repeat)):
        if value is not None and value < 1:
            parser.error(f"{name} must be a positive integer, got {value}")
    only = args.providers.split(",") if args.providers else None
    if only:
        known = list(providers(args.device))
        unknown = [p for p in only if p not in known]
        if unknown:  # a typo would otherwise print an empty table
            parser.error(f"--providers: unknown {unknown}; available on {args.device}: {', '.join(known)}")
    print(f"vfm bench: device={args.device} N={n_rows} V={vocab} dtype={dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}", flush=True)
    rows = run_report(args.device, n_rows, vocab, dtype, cases, repeat, not args.no_memory, only)
    print(format_table(rows, args.device))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(dict(device=args.device, n_rows=n_rows, vocab=vocab, dtype=str(dtype), rows=rows), fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
