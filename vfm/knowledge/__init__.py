"""Domain knowledge as rules, compiled into the allowed-label masks of the knowledge loss.

Rule file (YAML, read with a safe loader; every error names the file, line and rule)::

    task: classification            # or tagging (default: tagging when 'entities' is given)
    labels:                         # list of names, of {name, description, parent}, or a mapping
      - {name: medicine, description: "a medical question"}
      - {name: cardiology, description: "heart and blood vessels", parent: medicine}
      - {name: oncology, parent: medicine}
      - billing
    hierarchy: {medicine: [cardiology, oncology]}   # alternative to 'parent:'
    exclusive: [[cardiology, oncology]]
    lexicons:
      heart_words: [heart, cardiac, 心脏]            # or a file path: lexicons/heart.txt
    options: {case_sensitive: false}
    rules:
      - name: heart
        keywords: [heart attack, 心脏病]             # and/or regex: ..., lexicon: heart_words
        match: any                                  # any (default) or all of the conditions
        unless: {keywords: [invoice]}               # optional: never fire when this holds
        allow: [cardiology]                         # and/or forbid: [...]

Tagging files give ``entities: {DRUG: "a medicine", DOSE: ...}`` (labels become ``O, B-DRUG,
I-DRUG, ...``) or explicit BIO ``labels``, plus ``gazetteers`` (``{name, entity, entries and/or
lexicon, allow_outside}``) and ``token_rules`` (rules applied to one token at a time).

Semantics:

* A rule fires on a text when any (``match: all``: every) condition holds and no ``unless``
  condition holds.  Keywords/lexicon entries: case-insensitive by default, whole words at the
  edges of space-separated scripts (Latin, Cyrillic, ...), substrings at CJK / Thai edges; ``regex``: Python ``re.search``.
* Each fired rule allows its ``allow`` labels (every label when absent) minus its ``forbid``
  labels.  The fired rules on a text are **intersected**.  No rule fired, or everything allowed:
  no constraint (group -1).  An empty intersection (rules contradict each other) also leaves
  the text unconstrained, and is reported (``CompiledRules.contradictions``, the rule report,
  a logged warning).
* Hierarchy: allowing or forbidding a label allows or forbids its whole subtree (a parent
  stands for "this or anything more specific"); children do not imply their parent.
* Exclusive groups: labels that cannot hold together.  In single-label classification the
  intersection already removes every label a fired rule does not allow, so exclusivity does not
  change the masks; it is validated (members known, none inside another's subtree) and two
  fired rules that point to different members of one group on the same text are reported as an
  exclusive-group conflict, naming the rules (``CompiledRules.exclusive_conflicts``).
* Tagging: see :mod:`vfm.knowledge.tagging` (gazetteers allow ``B-X``/``I-X`` on matched tokens,
  token rules restrict one token, transitions forbid ``I-X`` after anything but ``B-X``/``I-X``).

The masks feed :func:`vfm.functional.knowledge_cross_entropy`'s ``allowed=`` argument, dense
(``CompiledRules.allowed``) or grouped (``(group_masks, group_ids)``); both give the same loss.
"""

from vfm.knowledge.compile import CompiledRules, group_rows
from vfm.knowledge.lexicon import load_lexicon, read_lexicon_entries
from vfm.knowledge.report import RuleReport, RuleStats
from vfm.knowledge.rules import Gazetteer, Rule, RuleError, RuleSet, load_rules
from vfm.knowledge.tagging import TokenMasks, allowed_after, gazetteer_matches, viterbi_decode

__all__ = [
    "load_rules",
    "RuleSet",
    "Rule",
    "Gazetteer",
    "RuleError",
    "CompiledRules",
    "RuleReport",
    "RuleStats",
    "TokenMasks",
    "group_rows",
    "allowed_after",
    "viterbi_decode",
    "gazetteer_matches",
    "load_lexicon",
    "read_lexicon_entries",
]
