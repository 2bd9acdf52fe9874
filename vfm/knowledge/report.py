"""Per-rule coverage and conflicts with gold labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

_MAX_LISTED = 20  # rows listed per rule in the report (the counts are always complete)


@dataclass
class RuleStats:
    """Statistics of one rule (or gazetteer).

    Attributes:
        name, line, kind: the rule, its line in the file and ``"text"``/``"token"``/``"gazetteer"``.
        fired: rows (tokens for token rules) where it fired.
        coverage: ``fired / total``.
        gold_seen: fired rows that have a gold label.
        conflicts: fired rows whose gold label the rule does not allow.
        conflict_rows: the first rows (``(row, token)`` for token level) in conflict.
    """

    name: str
    line: Optional[int]
    kind: str
    fired: int
    coverage: float
    gold_seen: int = 0
    conflicts: int = 0
    conflict_rows: list = field(default_factory=list)

    @property
    def agreement(self) -> Optional[float]:
        """Fraction of fired rows with gold where the gold label is allowed (None without gold)."""
        return None if self.gold_seen == 0 else 1.0 - self.conflicts / self.gold_seen


@dataclass
class RuleReport:
    """Coverage and conflicts of every rule on a corpus.

    Attributes:
        source: the rule file.
        total: texts (tokens for tagging).
        constrained: rows with a constraint after combining rules.
        contradictions: rows whose fired rules allow nothing together (left unconstrained).
        exclusive_conflicts: rows where fired rules point to different members of an exclusive group.
        gold_conflicts: constrained rows whose gold label lies outside the combined allowed set
            (what the loss counts as ``n_outside_allowed``); None without gold.
        mean_allowed: mean allowed-set size over constrained rows.
        rules: one :class:`RuleStats` per rule.
        unit: ``"texts"`` or ``"tokens"``.
    """

    source: str
    total: int
    constrained: int
    contradictions: int
    exclusive_conflicts: int
    gold_conflicts: Optional[int]
    mean_allowed: float
    rules: List[RuleStats]
    unit: str = "texts"

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        out = asdict(self)
        for stats, d in zip(self.rules, out["rules"]):
            d["agreement"] = stats.agreement
        return out

    def __str__(self) -> str:
        head = ["rule", "kind", "line", "fired", "coverage", "gold", "conflicts", "agreement"]
        rows = []
        for s in self.rules:
            agree = "-" if s.agreement is None else f"{s.agreement:.3f}"
            rows.append([s.name, s.kind, "-" if s.line is None else str(s.line), str(s.fired),
                         f"{s.coverage:.3f}", str(s.gold_seen), str(s.conflicts), agree])
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = [f"Rule report for {self.source} on {self.total} {self.unit}",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        frac = self.constrained / self.total if self.total else 0.0
        lines.append(f"constrained {self.unit}: {self.constrained}/{self.total} ({frac:.1%}), mean allowed-set "
                     f"size {self.mean_allowed:.2f}; contradictions (left unconstrained): {self.contradictions}; "
                     f"exclusive-group conflicts: {self.exclusive_conflicts}")
        if self.gold_conflicts is not None:
            lines.append(f"gold label outside the combined allowed set: {self.gold_conflicts}")
        return "\n".join(lines)


def gold_ids(ruleset, gold: Sequence, n: int) -> List[Optional[int]]:
    """Gold labels (names, ids or None) as class ids; raises ValueError naming the bad entry."""
    if isinstance(gold, str):
        raise TypeError("gold must be a sequence of labels, got a single str")
    gold = list(gold)
    if len(gold) != n:
        raise ValueError(f"gold has {len(gold)} entries but there are {n} rows")
    out: List[Optional[int]] = []
    for i, g in enumerate(gold):
        if g is None:
            out.append(None)
        elif isinstance(g, str):
            if g not in ruleset.label_to_id:
                raise ValueError(f"gold[{i}] = {g!r} is not a label of the rule set (known: {ruleset.labels})")
            out.append(ruleset.label_to_id[g])
        elif isinstance(g, int) or (hasattr(g, "__index__") and not isinstance(g, float)):
            g = int(g)
            if g == -100:  # ignore_index: unlabelled
                out.append(None)
                continue
            if not 0 <= g < ruleset.num_labels:
                raise ValueError(f"gold[{i}] = {g} is outside [0, {ruleset.num_labels})")
            out.append(g)
        else:
            raise TypeError(f"gold[{i}] must be a label name, an id or None, got {type(g).__name__}")
    return out


def build_report(ruleset, texts, gold=None) -> RuleReport:
    """Coverage (how often each rule fires) and conflicts with gold labels.

    Args:
        ruleset: the rules.
        texts: N strings (classification) or N token lists (tagging).
        gold: optional N labels (names, ids, or None/-100 for unlabelled); for tagging, N tag
            sequences aligned with the tokens.

    Returns:
        :class:`RuleReport`; ``print(report)`` shows a table, ``report.to_dict()`` a dict.
    """
    if ruleset.task == "tagging":
        from vfm.knowledge.tagging import token_report

        return token_report(ruleset, texts, gold)
    compiled = ruleset.compile(texts)
    n = len(compiled)
    gids = gold_ids(ruleset, gold, n) if gold is not None else None
    stats = []
    for r, rule in enumerate(ruleset.rules):
        rows = compiled.fired[rule.name]
        s = RuleStats(rule.name, rule.line, "text", len(rows), len(rows) / n if n else 0.0)
        if gids is not None:
            ok = rule.allowed_ids(ruleset.num_labels)
            for i in rows:
                if gids[i] is None:
                    continue
                s.gold_seen += 1
                if gids[i] not in ok:
                    s.conflicts += 1
                    if len(s.conflict_rows) < _MAX_LISTED:
                        s.conflict_rows.append(i)
        stats.append(s)
    constrained = compiled.constrained
    n_con = int(constrained.sum())
    mean_allowed = float(compiled.allowed[constrained].sum(1).float().mean()) if n_con else 0.0
    gold_conflicts = None
    if gids is not None:
        gold_conflicts = sum(1 for i in constrained.nonzero().flatten().tolist()
                             if gids[i] is not None and not bool(compiled.allowed[i, gids[i]]))
    return RuleReport(source=ruleset.source, total=n, constrained=n_con, contradictions=len(compiled.contradictions),
                      exclusive_conflicts=len(compiled.exclusive_conflicts), gold_conflicts=gold_conflicts,
                      mean_allowed=mean_allowed, rules=stats)
