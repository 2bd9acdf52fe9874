"""Rule files: parsing and validation into a :class:`RuleSet`.

The format is described in :mod:`vfm.knowledge` (and ``examples/rules_medical.yaml``).  Every
error is a :class:`RuleError` naming the file, the line and the rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

from vfm.knowledge._yaml import NotUTF8, YAMLFormatError, load_yaml_with_lines, read_utf8
from vfm.knowledge.matching import Condition

TASKS = ("classification", "tagging")


class RuleError(ValueError):
    """A bad rule file: unknown label, bad regex, wrong type, ... with file, line and rule name.

    Attributes:
        source: the file path (or ``"<dict>"``).
        line: 1-based line in the file, or None when unknown (rules built from a dict).
        rule: name of the offending rule / gazetteer, or None for file-level errors.
    """

    def __init__(self, message: str, source: str, line: Optional[int] = None, rule: Optional[str] = None):
        where = f"{source}:{line}" if line is not None else source
        who = f" rule '{rule}':" if rule is not None else ""
        super().__init__(f"{where}:{who} {message}")
        self.source, self.line, self.rule = source, line, rule


@dataclass
class Rule:
    """A compiled rule (text level for classification, token level for tagging).

    Attributes:
        name: unique rule name.
        line: line of the rule in its file (None for dicts).
        conditions: when the rule fires (combined with ``match``).
        match: ``"any"`` or ``"all"`` of ``conditions``.
        unless: conditions that, when any holds, stop the rule from firing.
        allow: label ids the rule allows (hierarchy already expanded), or None (no allow list).
        forbid: label ids the rule forbids (expanded).
        level: ``"text"`` or ``"token"``.
    """

    name: str
    line: Optional[int]
    conditions: List[Condition]
    match: str
    unless: List[Condition]
    allow: Optional[FrozenSet[int]]
    forbid: FrozenSet[int]
    level: str = "text"
    description: str = ""

    def fires(self, text: str) -> bool:
        """Whether the rule fires on ``text`` (a token for token rules)."""
        if self.match == "all":
            hit = all(c.matches(text) for c in self.conditions)
        else:
            hit = any(c.matches(text) for c in self.conditions)
        return hit and not any(c.matches(text) for c in self.unless)

    def allowed_ids(self, num_labels: int) -> FrozenSet[int]:
        """The labels this rule alone leaves allowed: ``allow`` (or all) minus ``forbid``."""
        base = self.allow if self.allow is not None else frozenset(range(num_labels))
        return frozenset(base - self.forbid)


@dataclass
class Gazetteer:
    """Entity gazetteer for tagging: a match of ``entries`` on tokens allows B-/I-``entity``.

    Attributes:
        name, line, entity: as in the file.
        entries: the surface forms (multi-word entries are matched on consecutive tokens).
        case_sensitive: match case exactly (default False).
        allow_outside: also allow ``O`` on matched tokens (a soft gazetteer); default False.
    """

    name: str
    line: Optional[int]
    entity: str
    entries: List[str]
    case_sensitive: bool = False
    allow_outside: bool = False


@dataclass
class RuleSet:
    """Labels, their hierarchy and the rules of one domain; see :mod:`vfm.knowledge`.

    Attributes:
        labels: class names, index = class id (for tagging: ``O``, ``B-X``, ``I-X``, ...).
        label_to_id: inverse of ``labels``.
        descriptions: label -> description text (falls back to the label name with ``_`` as
            spaces), e.g. for zero-shot teachers.
        task: ``"classification"`` or ``"tagging"``.
        parent: child label -> parent label (hierarchy).
        exclusive: groups of mutually exclusive labels.
        rules: text-level rules; token_rules and gazetteers: tagging rules.
        lexicons: named word lists.
        entities: entity types (tagging).
        source: where the rules came from.
    """

    labels: List[str]
    task: str = "classification"
    descriptions: Dict[str, str] = field(default_factory=dict)
    parent: Dict[str, str] = field(default_factory=dict)
    exclusive: List[List[str]] = field(default_factory=list)
    rules: List[Rule] = field(default_factory=list)
    token_rules: List[Rule] = field(default_factory=list)
    gazetteers: List[Gazetteer] = field(default_factory=list)
    lexicons: Dict[str, List[str]] = field(default_factory=dict)
    entities: List[str] = field(default_factory=list)
    source: str = "<dict>"
    exclusive_lines: List[Optional[int]] = field(default_factory=list)

    def __post_init__(self):
        self.label_to_id = {name: i for i, name in enumerate(self.labels)}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def children(self, label: str) -> List[str]:
        """Direct children of ``label`` in the hierarchy."""
        return [c for c, p in self.parent.items() if p == label]

    def descendants(self, label: str) -> List[str]:
        """All labels below ``label`` in the hierarchy (not including it)."""
        out, stack = [], self.children(label)
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(self.children(node))
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: Optional[str] = None) -> "RuleSet":
        """Build and validate a rule set from a parsed mapping (see the module docs for keys).

        Args:
            data: the mapping (as ``yaml.safe_load`` would return).
            source: name used in error messages.
            base_dir: directory against which lexicon file paths are resolved (default: cwd).

        Returns:
            The validated :class:`RuleSet`.

        Raises:
            RuleError: on any invalid content, naming source, line and rule.
        """
        from vfm.knowledge.parse import Parser

        return Parser(source, base_dir or os.getcwd()).parse(data)

    # compile / report / tagging are implemented in their own modules
    def compile(self, texts: Sequence[str]):
        """Allowed-label masks for ``texts``; see :func:`vfm.knowledge.compile.compile_texts`."""
        from vfm.knowledge.compile import compile_texts

        return compile_texts(self, texts)

    def report(self, texts, gold=None):
        """Coverage and gold conflicts per rule; see :func:`vfm.knowledge.report.build_report`."""
        from vfm.knowledge.report import build_report

        return build_report(self, texts, gold)

    def compile_tokens(self, tokens):
        """Per-token allowed tags; see :func:`vfm.knowledge.tagging.compile_tokens`."""
        from vfm.knowledge.tagging import compile_tokens

        return compile_tokens(self, tokens)

    def transition_mask(self):
        """Valid BIO transitions, bool ``[L, L]`` (``[prev, next]``); see :mod:`vfm.knowledge.tagging`."""
        from vfm.knowledge.tagging import transition_mask

        return transition_mask(self)

    def allowed_after(self, prev_tags):
        """Allowed next tags given previous tag ids (-1 = sentence start): bool ``(..., L)``."""
        from vfm.knowledge.tagging import allowed_after

        return allowed_after(self, prev_tags)

    def start_mask(self):
        """Tags valid on the first token, bool ``[L]`` (no ``I-X``)."""
        from vfm.knowledge.tagging import start_mask

        return start_mask(self)


def load_rules(path: str) -> RuleSet:
    """Load a YAML rule file safely (``yaml.SafeLoader``), keeping line numbers for errors.

    Args:
        path: the ``.yaml``/``.yml`` file.

    Returns:
        The validated :class:`RuleSet`.

    Raises:
        RuleError: invalid YAML or content, with the path, the line and the rule name.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    try:
        text = read_utf8(path)
    except NotUTF8 as err:
        raise RuleError(f"not valid UTF-8 ({err.reason} at byte {err.start})", path, err.line) from None
    try:
        data = load_yaml_with_lines(text, path)
    except YAMLFormatError as err:
        raise RuleError(err.problem, path, err.line) from None
    return RuleSet.from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
