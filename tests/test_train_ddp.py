"""Two processes (torchrun, gloo on CPU) train KnowledgeTrainer for a few steps; DDP keeps the ranks in sync.

Run as a script by torchrun (``python -m torch.distributed.run --nproc_per_node 2 tests/test_train_ddp.py OUT``);
the test launches it and compares what each rank wrote.
"""

import json
import os
import subprocess
import sys

import pytest


def _worker(out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from transformers import TrainingArguments

    from test_train_utils import tiny_model, tiny_tokenizer, toy_rows
    from vfm.train.trainer import KnowledgeCollator, KnowledgeTrainer, encode_rows

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tok = tiny_tokenizer(os.path.join(out_dir, f"tok{rank}"))
    texts, labels = toy_rows()
    texts += ["my package is late", "app error please", "refund my card", "login broken"]
    labels += [-100] * 4
    n = len(texts)
    g = torch.Generator().manual_seed(0)
    vals, idx = torch.log_softmax(torch.randn(n, 3, generator=g), 1).topk(2, 1)
    ds = encode_rows(tok, texts, labels, teacher_indices=idx, teacher_logprobs=vals,
                     group_ids=[i % 2 - 1 for i in range(n)], max_length=16)
    model = tiny_model(seed=11)
    init = sum(p.detach().double().sum().item() for p in model.parameters())
    args = TrainingArguments(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, logging_steps=1, seed=5, use_cpu=True, ddp_backend="gloo",
                             report_to="none", remove_unused_columns=False, disable_tqdm=True, save_strategy="no",
                             label_names=["labels"], dataloader_num_workers=0)
    trainer = KnowledgeTrainer(model=model, args=args, train_dataset=ds, data_collator=KnowledgeCollator(tok),
                               loss_options=dict(kd_weight=0.5, temperature=2.0, penalty_weight=0.3),
                               group_masks=torch.tensor([[True, False, True]]))
    trainer.train()
    params = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "init": init, "checksum": params.sum().item(),
                   "abs_checksum": params.abs().sum().item(), "step": trainer.state.global_step,
                   "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                   "trainer_world": trainer.args.world_size}, fh)


def test_two_processes_agree(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VFM_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["trainer_world"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [3, 3]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP: identical parameters on both ranks
    assert ranks[0]["abs_checksum"] == ranks[1]["abs_checksum"]
    assert ranks[0]["checksum"] != pytest.approx(ranks[0]["init"], abs=1e-9)  # and they did train
    assert len(ranks[0]["losses"]) == 3 and all(l == l for l in ranks[0]["losses"])  # noqa: E741 (not NaN)


if __name__ == "__main__":
    _worker(sys.argv[1])
