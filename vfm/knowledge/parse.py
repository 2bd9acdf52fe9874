"""Validation of a rule mapping into a :class:`~vfm.knowledge.rules.RuleSet` (every error is a
:class:`~vfm.knowledge.rules.RuleError` with the file, the line and the rule)."""

from __future__ import annotations

import os
import re
from typing import Dict, FrozenSet, List, Optional

from vfm.knowledge._yaml import LineList, line_of
from vfm.knowledge.matching import Condition, keyword_pattern, token_pattern
from vfm.knowledge.rules import TASKS, Gazetteer, Rule, RuleError, RuleSet

_TOP_KEYS = {"version", "task", "labels", "entities", "scheme", "hierarchy", "exclusive", "lexicons",
             "rules", "token_rules", "gazetteers", "options", "description"}
_RULE_KEYS = {"name", "description", "keywords", "regex", "lexicon", "match", "unless", "case_sensitive",
              "allow", "forbid"}
_COND_KEYS = {"keywords", "regex", "lexicon"}
_GAZ_KEYS = {"name", "entity", "entries", "lexicon", "case_sensitive", "allow_outside", "description"}


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class Parser:
    """Turns a mapping into a RuleSet; every error goes through :meth:`fail`."""

    def __init__(self, source: str, base_dir: str):
        self.source, self.base_dir = source, base_dir

    def fail(self, msg, line=None, rule=None):
        raise RuleError(msg, self.source, line, rule)

    def parse(self, data) -> RuleSet:
        if not isinstance(data, dict):
            self.fail(f"a rule file must be a mapping at the top level, got {type(data).__name__}", line_of(data))
        for key in data:
            if key not in _TOP_KEYS:
                self.fail(f"unknown top-level key {key!r} (allowed: {sorted(_TOP_KEYS)})", line_of(data, key))
        task = data.get("task", "tagging" if "entities" in data else "classification")
        if task not in TASKS:
            self.fail(f"task must be one of {TASKS}, got {task!r}", line_of(data, "task"))
        options = data.get("options") or {}
        if not isinstance(options, dict):
            self.fail("options must be a mapping", line_of(data, "options"))
        self.case_sensitive = bool(options.get("case_sensitive", False))
        labels, descriptions, parent, entities = self.parse_labels(data, task)
        self.labels = labels
        self.label_to_id = {n: i for i, n in enumerate(labels)}
        self.parent, self.entities = parent, entities
        self.lexicons = self.parse_lexicons(data.get("lexicons"), line_of(data, "lexicons"))
        exclusive, exclusive_lines = self.parse_exclusive(data.get("exclusive"), line_of(data, "exclusive"))
        rules = self.parse_rules(data.get("rules"), "text", line_of(data, "rules"))
        token_rules = self.parse_rules(data.get("token_rules"), "token", line_of(data, "token_rules"))
        gazetteers = self.parse_gazetteers(data.get("gazetteers"), line_of(data, "gazetteers"))
        if task == "tagging" and rules:
            self.fail("text-level 'rules' do not apply to a tagging task; use 'token_rules' (one token at a time) "
                      "or 'gazetteers'", line_of(data, "rules"))
        if task == "classification" and (token_rules or gazetteers):
            self.fail("token_rules and gazetteers need task: tagging", line_of(data, "token_rules" if token_rules
                                                                              else "gazetteers"))
        seen: Dict[str, Optional[int]] = {}
        for obj in rules + token_rules + gazetteers:
            if obj.name in seen:
                self.fail(f"duplicate rule name (first at line {seen[obj.name]})", obj.line, obj.name)
            seen[obj.name] = obj.line
        return RuleSet(labels=labels, task=task, descriptions=descriptions, parent=parent, exclusive=exclusive,
                       rules=rules, token_rules=token_rules, gazetteers=gazetteers, lexicons=self.lexicons,
                       entities=entities, source=self.source, exclusive_lines=exclusive_lines)

    # ---------------------------------------------------------------- labels and hierarchy
    def parse_labels(self, data, task):
        descriptions: Dict[str, str] = {}
        parent: Dict[str, str] = {}
        parent_lines: Dict[str, Optional[int]] = {}
        entities: List[str] = []
        raw = data.get("labels")
        labels: List[str] = []
        if task == "tagging" and raw is None:
            scheme = data.get("scheme", "BIO")
            if str(scheme).upper() not in ("BIO", "IOB2"):
                self.fail(f"scheme must be BIO (IOB2), got {scheme!r}", line_of(data, "scheme"))
            ents = data.get("entities")
            if ents is None:
                self.fail("a tagging rule file needs 'entities' (or explicit BIO 'labels')")
            if isinstance(ents, dict):
                items = list(ents.items())
            else:  # a list of names or of {name, description}
                items = [(e.get("name"), e) if isinstance(e, dict) else (e, None) for e in _as_list(ents)]
            labels = ["O"]
            for i, (name, desc) in enumerate(items):
                line = line_of(ents, key=name) if isinstance(ents, dict) else line_of(ents, index=i)
                if f"B-{name}" in labels:
                    self.fail(f"duplicate entity type {name!r}", line)
                if not isinstance(name, str) or not name or name == "O" or "-" in name[:2]:
                    self.fail(f"entity type must be a non-empty string other than 'O', got {name!r}", line)
                if isinstance(desc, dict):
                    desc = desc.get("description")
                entities.append(name)
                labels += [f"B-{name}", f"I-{name}"]
                text = str(desc) if desc else name.replace("_", " ")
                descriptions[f"B-{name}"] = f"beginning of {text}"
                descriptions[f"I-{name}"] = f"inside {text}"
            descriptions["O"] = "outside any entity"
        else:
            if raw is None:
                self.fail("the rule file needs 'labels'")
            if isinstance(raw, dict):
                items = [(k, v, line_of(raw, key=k)) for k, v in raw.items()]
            elif isinstance(raw, list):
                items = []
                for i, entry in enumerate(raw):
                    line = line_of(raw, index=i)
                    if isinstance(entry, dict):
                        if "name" not in entry:
                            self.fail("a label entry needs 'name'", line)
                        items.append((entry["name"], entry, line))
                    else:
                        items.append((entry, None, line))
            else:
                self.fail("labels must be a list or a mapping", line_of(data, "labels"))
            for name, spec, line in items:
                if not isinstance(name, str) or not name.strip():
                    self.fail(f"label names must be non-empty strings, got {name!r}", line)
                if name in labels:
                    self.fail(f"duplicate label {name!r}", line)
                labels.append(name)
                desc = None
                if isinstance(spec, dict):
                    for k in spec:
                        if k not in ("name", "description", "parent"):
                            self.fail(f"unknown key {k!r} in label {name!r}", line_of(spec, k))
                    desc = spec.get("description")
                    if spec.get("parent") is not None:
                        parent[name] = spec["parent"]
                        parent_lines[name] = line_of(spec, "parent")
                elif spec is not None:
                    desc = spec
                descriptions[name] = str(desc) if desc else name.replace("_", " ")
            if task == "tagging":
                for name, _, line in items:
                    if name != "O" and not (name[:2] in ("B-", "I-") and len(name) > 2):
                        self.fail(f"tagging labels must be 'O', 'B-X' or 'I-X', got {name!r}", line)
                    if name.startswith("I-") and "B-" + name[2:] not in labels:
                        self.fail(f"tag {name!r} has no matching 'B-{name[2:]}'", line)
                entities = [n[2:] for n in labels if n.startswith("B-")]
        hier = data.get("hierarchy")
        if hier is not None:
            if not isinstance(hier, dict):
                self.fail("hierarchy must be a mapping parent -> [children]", line_of(data, "hierarchy"))
            for par, kids in hier.items():
                for i, kid in enumerate(_as_list(kids)):
                    line = line_of(kids, index=i) if isinstance(kids, list) else line_of(hier, key=par)
                    if kid in parent and parent[kid] != par:
                        self.fail(f"label {kid!r} has two parents ({parent[kid]!r}, {par!r})", line)
                    parent[kid], parent_lines[kid] = par, line
        for kid, par in parent.items():
            for name in (kid, par):
                if name not in labels:
                    self.fail(f"unknown label {name!r} in hierarchy (known: {labels})", parent_lines.get(kid))
        for kid in parent:  # cycles
            seen, node = {kid}, kid
            while node in parent:
                node = parent[node]
                if node in seen:
                    self.fail(f"hierarchy has a cycle through {kid!r}", parent_lines.get(kid))
                seen.add(node)
        return labels, descriptions, parent, entities

    def expand(self, names, where, rule) -> FrozenSet[int]:
        """Label names -> ids; a parent brings its descendants, an entity type its B-/I- tags."""
        out = set()
        for i, name in enumerate(names):
            line = line_of(where, index=i) if isinstance(where, LineList) else line_of(where)
            if not isinstance(name, str):
                self.fail(f"labels must be strings, got {name!r}", line, rule)
            if name in self.label_to_id:
                out.add(self.label_to_id[name])
                stack = [c for c, p in self.parent.items() if p == name]
                while stack:
                    node = stack.pop()
                    out.add(self.label_to_id[node])
                    stack.extend(c for c, p in self.parent.items() if p == node)
            elif name in self.entities:
                out.update((self.label_to_id[f"B-{name}"], self.label_to_id[f"I-{name}"]))
            else:
                known = self.labels + (self.entities if self.entities else [])
                self.fail(f"unknown label {name!r} (known: {known})", line, rule)
        return frozenset(out)

    def parse_exclusive(self, raw, line):
        groups, lines = [], []
        if raw is None:
            return groups, lines
        if not isinstance(raw, list):
            self.fail("exclusive must be a list of label lists", line)
        for i, group in enumerate(raw):
            gline = line_of(raw, index=i)
            if not isinstance(group, list) or len(group) < 2:
                self.fail(f"each exclusive group needs at least two labels, got {group!r}", gline)
            for j, name in enumerate(group):
                if name not in self.label_to_id:
                    self.fail(f"unknown label {name!r} in exclusive group (known: {self.labels})",
                              line_of(group, index=j))
            for a in group:
                below = set(self._descendants(a))
                for b in group:
                    if b != a and b in below:
                        self.fail(f"exclusive group lists {a!r} and its descendant {b!r}", gline)
            groups.append(list(group))
            lines.append(gline)
        return groups, lines

    def _descendants(self, label):
        out, stack = [], [c for c, p in self.parent.items() if p == label]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(c for c, p in self.parent.items() if p == node)
        return out

    # ---------------------------------------------------------------- lexicons
    def parse_lexicons(self, raw, line) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        if raw is None:
            return out
        if not isinstance(raw, dict):
            self.fail("lexicons must be a mapping name -> entries (list, or a file path)", line)
        for name, spec in raw.items():
            lline = line_of(raw, key=name)
            if isinstance(spec, dict) and "file" in spec:
                spec = spec["file"]
            if isinstance(spec, str):
                path = spec if os.path.isabs(spec) else os.path.join(self.base_dir, spec)
                from vfm.knowledge.lexicon import read_lexicon_entries

                try:
                    out[name] = read_lexicon_entries(path)
                except (OSError, ValueError) as err:
                    self.fail(f"lexicon {name!r}: cannot read {path}: {err}", lline)
            elif isinstance(spec, list):
                bad = [e for e in spec if not isinstance(e, str)]
                if bad:
                    self.fail(f"lexicon {name!r} entries must be strings, got {bad[:3]!r}", lline)
                out[name] = [str(e) for e in spec]
            elif isinstance(spec, dict):  # word -> synonyms (the augmentation lexicon format)
                words = []
                for k, v in spec.items():
                    words.append(str(k))
                    words.extend(str(s) for s in _as_list(v))
                out[name] = words
            else:
                self.fail(f"lexicon {name!r} must be a list, a mapping or a file path", lline)
        return out

    # ---------------------------------------------------------------- rules
    def conditions(self, spec, level, name, case_sensitive) -> List[Condition]:
        out = []
        for kind in ("keywords", "regex", "lexicon"):
            if kind not in spec:
                continue
            value, kline = spec[kind], line_of(spec, kind)
            items = _as_list(value)
            if not items:
                self.fail(f"'{kind}' is empty", kline, name)
            if kind == "regex":
                patterns = []
                for i, pat in enumerate(items):
                    pline = line_of(value, index=i) if isinstance(value, list) else kline
                    if not isinstance(pat, str):
                        self.fail(f"regex must be a string, got {pat!r}", pline, name)
                    try:
                        patterns.append(re.compile(pat, 0 if case_sensitive else re.IGNORECASE))
                    except re.error as err:
                        self.fail(f"bad regex {pat!r}: {err}", pline, name)
                out.append(Condition("regex", patterns, level, kline))
                continue
            words = []
            for i, item in enumerate(items):
                iline = line_of(value, index=i) if isinstance(value, list) else kline
                if not isinstance(item, str) or not item.strip():
                    self.fail(f"{kind} entries must be non-empty strings, got {item!r}", iline, name)
                if kind == "lexicon":
                    if item not in self.lexicons:
                        self.fail(f"unknown lexicon {item!r} (known: {sorted(self.lexicons)})", iline, name)
                    words.extend(self.lexicons[item])
                else:
                    words.append(item)
            pat = (token_pattern if level == "token" else keyword_pattern)(words, case_sensitive)
            out.append(Condition(kind, [pat] if pat is not None else [], level, kline))
        return out

    def parse_rules(self, raw, level, line) -> List[Rule]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.fail("rules must be a list of mappings", line)
        out = []
        for i, spec in enumerate(raw):
            rline = line_of(raw, index=i)
            if not isinstance(spec, dict):
                self.fail(f"each rule must be a mapping, got {type(spec).__name__}", rline)
            name = spec.get("name")
            if not isinstance(name, str) or not name.strip():
                self.fail("each rule needs a non-empty 'name'", rline)
            for key in spec:
                if key not in _RULE_KEYS:
                    self.fail(f"unknown key {key!r} (allowed: {sorted(_RULE_KEYS)})", line_of(spec, key), name)
            cs = bool(spec.get("case_sensitive", self.case_sensitive))
            conds = self.conditions(spec, level, name, cs)
            if not conds:
                self.fail("a rule needs at least one of keywords / regex / lexicon", rline, name)
            unless_spec = spec.get("unless")
            unless = []
            if unless_spec is not None:
                if not isinstance(unless_spec, dict) or not (set(unless_spec) & _COND_KEYS):
                    self.fail("'unless' must be a mapping with keywords / regex / lexicon", line_of(spec, "unless"),
                              name)
                unless = self.conditions(unless_spec, level, name, cs)
            match = spec.get("match", "any")
            if match not in ("any", "all"):
                self.fail(f"match must be 'any' or 'all', got {match!r}", line_of(spec, "match"), name)
            if "allow" not in spec and "forbid" not in spec:
                self.fail("a rule needs 'allow' and/or 'forbid'", rline, name)
            allow = None
            if "allow" in spec:
                allow = self.expand(_as_list(spec["allow"]), spec["allow"] if isinstance(spec["allow"], list)
                                    else _Lined(line_of(spec, "allow")), name)
                if not allow:
                    self.fail("'allow' is empty", line_of(spec, "allow"), name)
            forbid = frozenset()
            if "forbid" in spec:
                forbid = self.expand(_as_list(spec["forbid"]), spec["forbid"] if isinstance(spec["forbid"], list)
                                     else _Lined(line_of(spec, "forbid")), name)
            out.append(Rule(name=name, line=rline, conditions=conds, match=match, unless=unless, allow=allow,
                            forbid=forbid, level=level, description=str(spec.get("description", ""))))
        return out

    def parse_gazetteers(self, raw, line) -> List[Gazetteer]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.fail("gazetteers must be a list of mappings", line)
        out = []
        for i, spec in enumerate(raw):
            gline = line_of(raw, index=i)
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                self.fail("each gazetteer must be a mapping with a 'name'", gline)
            name = spec["name"]
            for key in spec:
                if key not in _GAZ_KEYS:
                    self.fail(f"unknown key {key!r} (allowed: {sorted(_GAZ_KEYS)})", line_of(spec, key), name)
            entity = spec.get("entity")
            if entity not in self.entities:
                self.fail(f"unknown entity {entity!r} (known: {self.entities})", line_of(spec, "entity") or gline,
                          name)
            entries = []
            for j, e in enumerate(_as_list(spec.get("entries"))):
                if not isinstance(e, str) or not e.strip():
                    self.fail(f"gazetteer entries must be non-empty strings, got {e!r}",
                              line_of(spec["entries"], index=j), name)
                entries.append(e)
            for j, lex in enumerate(_as_list(spec.get("lexicon"))):
                if lex not in self.lexicons:
                    self.fail(f"unknown lexicon {lex!r} (known: {sorted(self.lexicons)})", line_of(spec, "lexicon"),
                              name)
                entries.extend(self.lexicons[lex])
            if not entries:
                self.fail("a gazetteer needs 'entries' and/or 'lexicon'", gline, name)
            out.append(Gazetteer(name=name, line=gline, entity=entity, entries=entries,
                                 case_sensitive=bool(spec.get("case_sensitive", self.case_sensitive)),
                                 allow_outside=bool(spec.get("allow_outside", False))))
        return out


class _Lined:
    """A scalar's line, for single-string ``allow: label`` values."""

    def __init__(self, line):
        self.line = line
