"""The example record and the report every data step returns."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

logger = logging.getLogger("vfm.data")
_MAX_PRINTED = 20  # rows printed per section of a report (the lists themselves are complete)


@dataclass
class Example:
    """One training example.

    Attributes:
        text: the text (for tagging data, the tokens joined).
        label: class label, or None when unlabelled (or for tagging data).
        tokens: tokens (tagging data), else None.
        tags: one tag per token (tagging data), else None.
        source: the file it came from (``"<memory>"`` when built in code).
        line: 1-based line in ``source`` where it starts (0 when unknown).
        meta: anything else (extra fields of the row, ``augmented_from``, ...).
    """

    text: str
    label: Optional[str] = None
    tokens: Optional[List[str]] = None
    tags: Optional[List[str]] = None
    source: str = "<memory>"
    line: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``source:line``, for messages."""
        return f"{self.source}:{self.line}"


@dataclass
class Change:
    """One row a step removed, added or skipped.

    Attributes:
        index: the row's position in the step's input (added rows: the position of the row they
            were made from).
        where: ``source:line`` of the row.
        reason: why (``"exact duplicate of file.csv:3"``, ``"augmented: swap"``, ...).
        text: the (new) text, for reading the report.
    """

    index: int
    where: str
    reason: str
    text: str = ""


@dataclass
class StepReport:
    """What one data step did: counts and the rows removed / added / changed.

    Attributes:
        step: the step's name.
        n_in, n_out: rows before and after.
        removed, added: :class:`Change` lists (complete).
        modified: rows whose text changed (cleaning), and ``modifications`` counts per kind.
        skipped: rows the step could not process (kept unchanged), with the reason.
        details: step-specific figures (e.g. label conflicts among duplicates).
    """

    step: str
    n_in: int
    n_out: int = 0
    removed: List[Change] = field(default_factory=list)
    added: List[Change] = field(default_factory=list)
    skipped: List[Change] = field(default_factory=list)
    modified: int = 0
    modifications: Counter = field(default_factory=Counter)
    details: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: counts."""
        parts = [f"{self.step}: {self.n_in} -> {self.n_out} rows", f"removed {len(self.removed)}",
                 f"added {len(self.added)}"]
        if self.modified or self.modifications:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.modifications.items()))
            parts.append(f"modified {self.modified}" + (f" ({kinds})" if kinds else ""))
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()]
        for title, items in (("removed", self.removed), ("added", self.added), ("skipped", self.skipped)):
            for c in items[:_MAX_PRINTED]:
                text = c.text if len(c.text) <= 60 else c.text[:57] + "..."
                lines.append(f"  {title} #{c.index} {c.where}: {c.reason}" + (f" | {text}" if text else ""))
            if len(items) > _MAX_PRINTED:
                lines.append(f"  ... and {len(items) - _MAX_PRINTED} more {title} (see .{title})")
        for key, value in self.details.items():
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        out = asdict(self)
        out["modifications"] = dict(self.modifications)
        return out

    def log(self) -> "StepReport":
        """Log the summary (INFO) and each removed/skipped row (first ones, INFO) on ``vfm.data``."""
        logger.info("%s", self.summary())
        for title, items in (("removed", self.removed), ("skipped", self.skipped)):
            for c in items[:_MAX_PRINTED]:
                logger.info("  %s #%d %s: %s", title, c.index, c.where, c.reason)
            if len(items) > _MAX_PRINTED:
                logger.info("  ... and %d more %s", len(items) - _MAX_PRINTED, title)
        return self
