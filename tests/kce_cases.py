"""Random inputs for knowledge_cross_entropy tests, described by small option dicts."""

from __future__ import annotations

import torch

#: Option cases covering every term; "teacher" / "allowed" / "weight" / "soft_mask" are recipes.
CASES = {
    "ce": dict(),
    "ce_weight": dict(weight=True),
    "ce_smooth": dict(label_smoothing=0.1),
    "ce_smooth_weight": dict(label_smoothing=0.2, weight=True),
    "softcap": dict(softcap=3.0),
    "zloss": dict(z_loss=1e-2),
    "kl_t2": dict(kd_weight=0.5, teacher="full", temperature=2.0),
    "kl_t1_noce": dict(kd_weight=1.0, ce_weight=0.0, teacher="full"),
    "reverse_kl": dict(kd_weight=0.7, kd="reverse_kl", teacher="full", temperature=1.5),
    "jsd": dict(kd_weight=0.5, kd="jsd", jsd_beta=0.3, teacher="full", temperature=2.0),
    "topk": dict(kd_weight=0.5, teacher="topk", temperature=2.0),
    "mass_dense": dict(penalty_weight=0.3, allowed="dense"),
    "mass_grouped": dict(penalty_weight=0.5, allowed="grouped"),
    "posterior_self": dict(penalty_weight=0.3, allowed="grouped", penalty="posterior", temperature=2.0),
    "posterior_teacher_soft": dict(penalty_weight=0.4, allowed="dense", penalty="posterior", rule_strength=2.0,
                                   teacher="full", temperature=1.5),
    "unlabelled_pool": dict(kd_weight=0.5, teacher="full", soft_mask=True, penalty_weight=0.2, allowed="grouped"),
    "everything": dict(ce_weight=0.5, kd_weight=0.5, penalty_weight=0.2, z_loss=1e-3, softcap=5.0,
                       label_smoothing=0.05, weight=True, soft_mask=True, teacher="full", allowed="grouped",
                       temperature=2.0),
}


def make_inputs(case: dict, n_rows: int, vocab: int, dtype=torch.float32, seed: int = 0, ignore_frac: float = 0.25,
                scale: float = 3.0, teacher_dtype=None):
    """Build (logits, target, options) for a case; logits are a fresh leaf tensor."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, vocab, generator=g) * scale).to(dtype)
    target = torch.randint(0, vocab, (n_rows,), generator=g)
    ignored = torch.rand(n_rows, generator=g) < ignore_frac
    target[ignored] = -100
    opts = {}
    for key, value in case.items():
        if key == "weight":
            opts["weight"] = torch.rand(vocab, generator=g) + 0.5
        elif key == "teacher" and value == "full":
            opts["teacher_logits"] = (torch.randn(n_rows, vocab, generator=g) * scale).to(teacher_dtype or dtype)
        elif key == "teacher" and value == "topk":
            k = min(4, vocab)
            idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n_rows)])
            lp = torch.log_softmax(torch.randn(n_rows, k, generator=g), -1)
            idx[0, -1] = -1  # padding
            if n_rows > 2:
                idx[2, :] = -1  # a row without teacher
            opts["teacher_topk"] = (idx, lp)
        elif key == "allowed" and value == "dense":
            mask = torch.rand(n_rows, vocab, generator=g) < 0.5
            mask[0] = True  # unconstrained row
            if n_rows > 1:
                mask[1] = False  # empty set: no constraint either
            opts["allowed"] = mask
        elif key == "allowed" and value == "grouped":
            n_groups = 3
            gm = torch.rand(n_groups, vocab, generator=g) < 0.4
            gm[:, 0] = True
            gid = torch.randint(-1, n_groups, (n_rows,), generator=g)
            opts["allowed"] = (gm, gid)
        elif key == "soft_mask":
            opts["soft_mask"] = torch.rand(n_rows, generator=g) < 0.8
        else:
            opts[key] = value
    return logits, target, opts
