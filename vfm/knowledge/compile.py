"""Compiling text-level rules into the allowed-label masks of the knowledge loss.

Semantics (see :mod:`vfm.knowledge`): on each text, every rule that fires restricts the allowed
set A to its own ``allow`` list (all labels when it has none) minus its ``forbid`` list; the rules
that fire are intersected.  No rule fired, or A = every label: the row is unconstrained (group -1).
Fired rules whose intersection is empty contradict each other: the row is left unconstrained and
listed in :attr:`CompiledRules.contradictions` (and logged), never silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

logger = logging.getLogger("vfm.knowledge")

_PROGRESS_MIN_WORK = 200_000  # texts x rules above which a progress bar is shown


@dataclass
class CompiledRules:
    """Allowed-label masks for N texts, dense and grouped.

    Attributes:
        allowed: bool ``(N, L)``; all True on unconstrained rows.
        group_ids: int64 ``(N,)``; index into ``group_masks``, -1 where unconstrained.
        group_masks: bool ``(G, L)``: one row per distinct allowed set.
        fired: rule name -> row indices where the rule fired.
        fired_matrix: bool ``(N, R)`` (columns in ``rule_names`` order).
        rule_names: names of the text rules, in file order.
        contradictions: ``(row, [rule names])`` for rows whose fired rules allow nothing together.
        exclusive_conflicts: ``(row, group index, [rule names])`` for rows where fired rules point
            to different members of one exclusive group.
    """

    allowed: Tensor
    group_ids: Tensor
    group_masks: Tensor
    fired: Dict[str, List[int]]
    fired_matrix: Tensor
    rule_names: List[str]
    contradictions: List[Tuple[int, List[str]]] = field(default_factory=list)
    exclusive_conflicts: List[Tuple[int, int, List[str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.allowed.shape[0])

    @property
    def constrained(self) -> Tensor:
        """bool ``(N,)``: rows that carry a constraint (group id >= 0)."""
        return self.group_ids >= 0

    def loss_argument(self, rows=None, grouped: bool = True, device=None):
        """The ``allowed=`` argument of :func:`vfm.functional.knowledge_cross_entropy`.

        Args:
            rows: optional index tensor/list selecting a batch of rows (in order).
            grouped: return ``(group_masks (G, L), group_ids (B,))`` (default) or the dense
                ``(B, L)`` mask.
            device: where to put the tensors.

        Returns:
            The pair or the dense mask for the selected rows.
        """
        index = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if grouped:
            gid = self.group_ids if index is None else self.group_ids[index]
            return self.group_masks.to(device), gid.to(device)
        dense = self.allowed if index is None else self.allowed[index]
        return dense.to(device)


def _fired_matrix(ruleset, texts: Sequence[str]) -> Tensor:
    rules = ruleset.rules
    work = len(texts) * max(1, len(rules))
    iterator = texts
    if work >= _PROGRESS_MIN_WORK:
        from tqdm.auto import tqdm

        iterator = tqdm(texts, desc="matching rules", unit="text")
    rows = [[rule.fires(text) for rule in rules] for text in iterator]
    if not rows or not rules:
        return torch.zeros(len(texts), len(rules), dtype=torch.bool)
    return torch.tensor(rows, dtype=torch.bool)


def rule_masks(ruleset) -> Tensor:
    """bool ``(R, L)``: the labels each text rule alone leaves allowed."""
    num_labels = ruleset.num_labels
    out = torch.zeros(len(ruleset.rules), num_labels, dtype=torch.bool)
    for r, rule in enumerate(ruleset.rules):
        ids = sorted(rule.allowed_ids(num_labels))
        if ids:
            out[r, ids] = True
    return out


def _check_texts(texts) -> List[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


def group_rows(allowed: Tensor, constrained: Tensor) -> Tuple[Tensor, Tensor]:
    """Grouped form of a dense mask: distinct constrained rows and each row's group (-1 if none).

    Args:
        allowed: bool ``(N, L)``.
        constrained: bool ``(N,)``.

    Returns:
        ``(group_masks (G, L) bool, group_ids (N,) int64)``.
    """
    group_ids = torch.full((allowed.shape[0],), -1, dtype=torch.long)
    rows = constrained.nonzero().flatten()
    if rows.numel() == 0:
        return torch.zeros(0, allowed.shape[1], dtype=torch.bool), group_ids
    masks, inverse = torch.unique(allowed[rows], dim=0, return_inverse=True)
    group_ids[rows] = inverse
    return masks.bool(), group_ids


def compile_texts(ruleset, texts: Sequence[str]) -> CompiledRules:
    """Evaluate the text rules of ``ruleset`` on ``texts``.

    Args:
        ruleset: a :class:`~vfm.knowledge.rules.RuleSet`.
        texts: N strings.

    Returns:
        :class:`CompiledRules` with ``allowed (N, L)``, ``group_ids (N,)``, ``group_masks (G, L)``.
    """
    texts = _check_texts(texts)
    num_labels = ruleset.num_labels
    fired = _fired_matrix(ruleset, texts)
    fired_list = fired.tolist()
    masks = rule_masks(ruleset)
    # a label survives on a row unless some fired rule disallows it
    vetoes = fired.float() @ (~masks).float() if len(ruleset.rules) else torch.zeros(len(texts), num_labels)
    allowed = vetoes == 0
    any_fired = fired.any(dim=1)
    counts = allowed.sum(dim=1)
    empty = any_fired & (counts == 0)
    constrained = any_fired & (counts > 0) & (counts < num_labels)
    allowed[~constrained] = True
    names = [r.name for r in ruleset.rules]
    contradictions = [(i, [names[r] for r, hit in enumerate(fired_list[i]) if hit])
                      for i in empty.nonzero().flatten().tolist()] if bool(empty.any()) else []
    if contradictions:
        logger.warning("%d text(s) where the fired rules allow no label together were left unconstrained; "
                       "first: row %d (rules %s)", len(contradictions), *contradictions[0])
    group_masks, group_ids = group_rows(allowed, constrained)
    fired_rows = {name: fired[:, r].nonzero().flatten().tolist() for r, name in enumerate(names)}
    return CompiledRules(allowed=allowed, group_ids=group_ids, group_masks=group_masks, fired=fired_rows,
                         fired_matrix=fired, rule_names=names, contradictions=contradictions,
                         exclusive_conflicts=exclusive_conflicts(ruleset, fired_list))


def _member_sets(ruleset) -> List[List[set]]:
    """For each exclusive group, the label-id set of each member (the member and its descendants)."""
    out = []
    for group in ruleset.exclusive:
        out.append([{ruleset.label_to_id[m]} | {ruleset.label_to_id[d] for d in ruleset.descendants(m)}
                    for m in group])
    return out


def exclusive_conflicts(ruleset, fired: List[List[bool]]) -> List[Tuple[int, int, List[str]]]:
    """Rows where fired rules point to two different members of one exclusive group.

    Args:
        ruleset: the rules.
        fired: N rows of R booleans (which rules fired on each text).

    A rule points to member m of a group when its allow list meets the group only inside m's
    subtree.  Two such rules on one row name labels that cannot hold together.
    """
    if not ruleset.exclusive or not ruleset.rules:
        return []
    members = _member_sets(ruleset)
    points = {}  # (rule index, group index) -> member index
    for r, rule in enumerate(ruleset.rules):
        if rule.allow is None:
            continue
        for g, sets in enumerate(members):
            hit = [m for m, ids in enumerate(sets) if rule.allow & ids]
            if len(hit) == 1:
                points[(r, g)] = hit[0]
    if not points:
        return []
    out = []
    for i, row in enumerate(fired):
        rows = [r for r, hit in enumerate(row) if hit]
        if len(rows) < 2:
            continue
        for g in range(len(members)):
            pointed = {(points[(r, g)]) for r in rows if (r, g) in points}
            if len(pointed) > 1:
                out.append((i, g, [ruleset.rules[r].name for r in rows if (r, g) in points]))
    return out
