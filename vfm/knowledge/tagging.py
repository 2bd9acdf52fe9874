"""Token-level knowledge for BIO tagging: gazetteers, token rules and valid transitions.

* A gazetteer match on tokens ``i..j-1`` (leftmost-longest, over all gazetteers together) allows
  ``B-X`` on token i and ``I-X`` on the following ones (plus ``O`` when the gazetteer says
  ``allow_outside: true``).  An entry matches consecutive tokens joined by spaces, and CJK entries
  also match tokens joined without spaces (``阿司匹林`` matches ``["阿司", "匹林"]``).  One surface
  form listed under two entity types allows both.
* A token rule fires on one token (regex ``fullmatch``, keywords/lexicon equal to the token) and
  restricts that token like a text rule (``allow`` minus ``forbid``; an entity type ``X`` in a list
  means both ``B-X`` and ``I-X``).
* All constraints on a token intersect; no constraint -> all tags allowed; an empty intersection
  is a contradiction: the token is left unconstrained and listed in ``TokenMasks.contradictions``.
* Transitions: ``I-X`` may only follow ``B-X`` or ``I-X`` and cannot start a sentence.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from vfm.knowledge.report import RuleReport, RuleStats, _MAX_LISTED

logger = logging.getLogger("vfm.knowledge")
_PROGRESS_MIN_TOKENS = 200_000
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")


class TokenMasks(list):
    """A list of bool ``(T_i, L)`` masks (one per sentence) with what produced them.

    Attributes:
        fired: rule/gazetteer name -> list of ``(sentence, token)`` positions where it acted.
        contradictions: ``(sentence, token, [names])`` left unconstrained.
        matches: ``(sentence, start, end, [entity types])`` gazetteer matches.
    """

    def __init__(self, masks, fired, contradictions, matches):
        super().__init__(masks)
        self.fired, self.contradictions, self.matches = fired, contradictions, matches

    def flat(self) -> Tensor:
        """All sentences' masks concatenated: bool ``(sum T_i, L)`` (the rows of flattened logits)."""
        if not len(self):
            return torch.zeros(0, 0, dtype=torch.bool)
        return torch.cat(list(self), dim=0)

    def grouped(self) -> Tuple[Tensor, Tensor]:
        """Grouped form of :meth:`flat`: ``(group_masks (G, L), group_ids (sum T_i,))``, -1 = free."""
        from vfm.knowledge.compile import group_rows

        flat = self.flat()
        return group_rows(flat, ~flat.all(dim=1))

    def padded(self, length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Stack into ``(B, T, L)``; padding positions are all True (unconstrained).

        Args:
            length: T (default: the longest sentence); shorter than a sentence is a ValueError.

        Returns:
            ``(masks (B, T, L) bool, lengths (B,) int64)``.
        """
        lengths = torch.tensor([m.shape[0] for m in self], dtype=torch.long)
        longest = int(lengths.max()) if len(self) else 0
        length = longest if length is None else int(length)
        if length < longest:
            raise ValueError(f"length={length} is shorter than the longest sentence ({longest} tokens)")
        num_labels = self[0].shape[1] if len(self) else 0
        out = torch.ones(len(self), length, num_labels, dtype=torch.bool)
        for b, m in enumerate(self):
            out[b, : m.shape[0]] = m
        return out, lengths


def _gazetteer_index(ruleset):
    """Lookup tables of the gazetteers: exact keys, plus prefilters that let most tokens skip."""
    cached = getattr(ruleset, "_gazetteer_index_cache", None)
    if cached is not None:
        return cached
    spaced: Dict[Tuple[bool, str], set] = {}
    joined: Dict[Tuple[bool, str], set] = {}
    first_words: Dict[str, int] = {}  # case-folded first word -> most words of an entry starting with it
    cjk_prefixes: set = set()  # case-folded prefixes of the CJK entries (matched across token boundaries)
    for g, gaz in enumerate(ruleset.gazetteers):
        for entry in gaz.entries:
            words = entry.split()
            key = " ".join(words)
            if not gaz.case_sensitive:
                key = key.casefold()
            spaced.setdefault((gaz.case_sensitive, key), set()).add(g)
            first = words[0].casefold()
            first_words[first] = max(first_words.get(first, 0), len(words))
            if _CJK.search(entry):
                flat = key.replace(" ", "")
                joined.setdefault((gaz.case_sensitive, flat), set()).add(g)
                folded = flat.casefold()
                cjk_prefixes.update(folded[:k] for k in range(1, len(folded) + 1))
    cached = (spaced, joined, first_words, cjk_prefixes)
    ruleset._gazetteer_index_cache = cached
    return cached


def _span_gazetteers(span: Sequence[str], spaced, joined) -> set:
    hit = set()
    text = " ".join(span)
    flat = "".join(span)
    for cs in (True, False):
        a, b = (text, flat) if cs else (text.casefold(), flat.casefold())
        hit |= spaced.get((cs, a), set())
        hit |= joined.get((cs, b), set())
    return hit


def gazetteer_matches(ruleset, tokens: Sequence[str]) -> List[Tuple[int, int, List[int]]]:
    """Leftmost-longest gazetteer matches on one sentence: ``(start, end, [gazetteer indices])``."""
    spaced, joined, first_words, cjk_prefixes = _gazetteer_index(ruleset)
    out = []
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i].casefold()
        limit = min(n, i + first_words.get(tok, 0))  # longest span worth trying from token i
        if tok in cjk_prefixes:
            flat, j = tok, i + 1
            limit = max(limit, j)
            while j < n:
                flat += tokens[j].casefold()
                if flat not in cjk_prefixes:
                    break
                j += 1
                limit = max(limit, j)
        for j in range(limit, i, -1):
            hit = _span_gazetteers(tokens[i:j], spaced, joined)
            if hit:
                out.append((i, j, sorted(hit)))
                i = j
                break
        else:
            i += 1
    return out


def _check_tokens(tokens) -> List[List[str]]:
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of token lists, got a str")
    out = []
    for s, sent in enumerate(tokens):
        if isinstance(sent, str):
            raise TypeError(f"tokens[{s}] must be a list of tokens, got a str (split it first)")
        sent = list(sent)
        for t, tok in enumerate(sent):
            if not isinstance(tok, str):
                raise TypeError(f"tokens[{s}][{t}] must be a str, got {type(tok).__name__}")
        out.append(sent)
    return out


def compile_tokens(ruleset, tokens: Sequence[Sequence[str]]) -> TokenMasks:
    """Per-token allowed tags from gazetteers and token rules.

    Args:
        ruleset: a tagging :class:`~vfm.knowledge.rules.RuleSet`.
        tokens: B sentences, each a list of T_i tokens.

    Returns:
        :class:`TokenMasks`: B bool tensors ``(T_i, L)`` (``.padded()`` stacks them).
    """
    if ruleset.task != "tagging":
        raise ValueError(f"compile_tokens needs a tagging rule set; {ruleset.source} has task {ruleset.task!r}")
    sentences = _check_tokens(tokens)
    num_labels = ruleset.num_labels
    lid = ruleset.label_to_id
    full = (1 << num_labels) - 1  # allowed sets as Python int bitsets: cheap to intersect per token
    rule_bits = [_bits(r.allowed_ids(num_labels)) for r in ruleset.token_rules]
    fired: Dict[str, list] = {r.name: [] for r in ruleset.token_rules}
    fired.update({g.name: [] for g in ruleset.gazetteers})
    contradictions, matches, masks = [], [], []
    token_hits: Dict[str, List[int]] = {}
    iterator = enumerate(sentences)
    if sum(len(x) for x in sentences) >= _PROGRESS_MIN_TOKENS:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(sentences), desc="matching token rules", unit="sentence")
    for s, sent in iterator:
        constraint = [full] * len(sent)
        acted: Dict[int, List[str]] = {}
        for start, end, gaz_ids in gazetteer_matches(ruleset, sent):
            ents = sorted({ruleset.gazetteers[g].entity for g in gaz_ids})
            soft = (1 << lid["O"]) if any(ruleset.gazetteers[g].allow_outside for g in gaz_ids) else 0
            begin = _bits(lid["B-" + e] for e in ents) | soft
            inside = _bits(lid["I-" + e] for e in ents) | soft
            matches.append((s, start, end, ents))
            for t in range(start, end):
                constraint[t] &= begin if t == start else inside
                for g in gaz_ids:
                    fired[ruleset.gazetteers[g].name].append((s, t))
                    acted.setdefault(t, []).append(ruleset.gazetteers[g].name)
        for t, tok in enumerate(sent):
            hits = token_hits.get(tok)
            if hits is None:  # tokens repeat: evaluate the rules once per distinct token
                hits = token_hits[tok] = [r for r, rule in enumerate(ruleset.token_rules) if rule.fires(tok)]
            for r in hits:
                constraint[t] &= rule_bits[r]
                fired[ruleset.token_rules[r].name].append((s, t))
                acted.setdefault(t, []).append(ruleset.token_rules[r].name)
        for t in sorted(acted):
            if constraint[t] == 0:
                contradictions.append((s, t, acted[t]))
                constraint[t] = full
        masks.append(_unpack(constraint, num_labels))
    for name in fired:
        fired[name].sort()
    if contradictions:
        logger.warning("%d token(s) whose rules/gazetteers allow no tag together were left unconstrained; "
                       "first: sentence %d token %d (%s)", len(contradictions), *contradictions[0])
    return TokenMasks(masks, fired, contradictions, matches)


def _bits(ids) -> int:
    out = 0
    for i in ids:
        out |= 1 << i
    return out


def _unpack(rows: List[int], num_labels: int) -> Tensor:
    """Int bitsets -> bool ``(len(rows), num_labels)``."""
    if num_labels <= 62:
        packed = torch.tensor(rows, dtype=torch.int64).reshape(-1, 1)
        return ((packed >> torch.arange(num_labels, dtype=torch.int64)) & 1).bool()
    return torch.tensor([[(r >> k) & 1 == 1 for k in range(num_labels)] for r in rows],
                        dtype=torch.bool).reshape(len(rows), num_labels)


def _tag_parts(ruleset):
    return [(lab[:2], lab[2:]) if lab[:2] in ("B-", "I-") else ("O", "") for lab in ruleset.labels]


def transition_mask(ruleset) -> Tensor:
    """Valid BIO transitions: bool ``(L, L)``, ``[prev, next]`` True when ``next`` may follow ``prev``.

    ``I-X`` may follow only ``B-X`` or ``I-X``; every other transition is valid.
    """
    if ruleset.task != "tagging":
        raise ValueError(f"transition_mask needs a tagging rule set; {ruleset.source} has task {ruleset.task!r}")
    parts = _tag_parts(ruleset)
    num_labels = len(parts)
    out = torch.ones(num_labels, num_labels, dtype=torch.bool)
    for n, (kind, ent) in enumerate(parts):
        if kind == "I-":
            for p, (pkind, pent) in enumerate(parts):
                out[p, n] = pkind in ("B-", "I-") and pent == ent
    return out


def start_mask(ruleset) -> Tensor:
    """Tags valid on a sentence's first token: bool ``(L,)`` (everything but ``I-X``)."""
    if ruleset.task != "tagging":
        raise ValueError(f"start_mask needs a tagging rule set; {ruleset.source} has task {ruleset.task!r}")
    return torch.tensor([kind != "I-" for kind, _ in _tag_parts(ruleset)], dtype=torch.bool)


def allowed_after(ruleset, prev_tags: Tensor) -> Tensor:
    """Allowed next tags given the previous ones (the transition constraint as a loss mask).

    Args:
        ruleset: tagging rule set.
        prev_tags: int tensor ``(...)`` of previous tag ids; -1 means sentence start.

    Returns:
        bool ``(..., L)``.
    """
    prev_tags = torch.as_tensor(prev_tags, dtype=torch.long)
    num_labels = ruleset.num_labels
    if prev_tags.numel() and (int(prev_tags.min()) < -1 or int(prev_tags.max()) >= num_labels):
        raise ValueError(f"prev_tags must lie in [-1, {num_labels}), got range "
                         f"[{int(prev_tags.min())}, {int(prev_tags.max())}]")
    table = torch.cat([start_mask(ruleset)[None], transition_mask(ruleset)], dim=0)  # row 0 = start
    return table[prev_tags + 1]


def viterbi_decode(emissions: Tensor, transitions: Tensor, start: Optional[Tensor] = None,
                   allowed: Optional[Tensor] = None) -> List[int]:
    """Best tag path under hard constraints (constrained decoding).

    Args:
        emissions: float ``(T, L)`` scores (e.g. log-probabilities).
        transitions: bool ``(L, L)`` valid ``[prev, next]`` (from :func:`transition_mask`).
        start: bool ``(L,)`` valid first tags (default: all).
        allowed: optional bool ``(T, L)`` per-token allowed tags (from :func:`compile_tokens`).

    Returns:
        T tag ids maximising the summed emissions over valid paths.

    Raises:
        ValueError: shapes disagree, or no valid path exists.
    """
    if emissions.dim() != 2:
        raise ValueError(f"emissions must be (T, L), got shape {tuple(emissions.shape)}")
    steps, num_labels = emissions.shape
    if tuple(transitions.shape) != (num_labels, num_labels):
        raise ValueError(f"transitions has shape {tuple(transitions.shape)}, expected ({num_labels}, {num_labels})")
    if allowed is not None and tuple(allowed.shape) != (steps, num_labels):
        raise ValueError(f"allowed has shape {tuple(allowed.shape)}, expected ({steps}, {num_labels})")
    if steps == 0:
        return []
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    scores = emissions.detach().double().cpu()
    if allowed is not None:
        scores = torch.where(allowed.cpu(), scores, neg)
    trans = torch.where(transitions.cpu(), torch.tensor(0.0, dtype=torch.float64), neg)
    best = scores[0].clone()
    if start is not None:
        best = torch.where(start.cpu(), best, neg)
    back = []
    for t in range(1, steps):
        total = best[:, None] + trans  # (prev, next)
        best, arg = total.max(dim=0)
        best = best + scores[t]
        back.append(arg)
    if not torch.isfinite(best.max()):
        raise ValueError("no tag sequence satisfies the constraints (check the allowed masks)")
    path = [int(best.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def token_report(ruleset, tokens, gold=None) -> RuleReport:
    """Per token rule / gazetteer: tokens covered and conflicts with gold tags."""
    sentences = _check_tokens(tokens)
    masks = compile_tokens(ruleset, sentences)
    total = sum(len(s) for s in sentences)
    gold_tags = None
    if gold is not None:
        gold = list(gold)
        if len(gold) != len(sentences):
            raise ValueError(f"gold has {len(gold)} sentences but tokens has {len(sentences)}")
        gold_tags = []
        for s, (sent, tags) in enumerate(zip(sentences, gold)):
            tags = list(tags)
            if len(tags) != len(sent):
                raise ValueError(f"gold[{s}] has {len(tags)} tags for {len(sent)} tokens")
            ids = []
            for t, tag in enumerate(tags):
                if isinstance(tag, str):
                    if tag not in ruleset.label_to_id:
                        raise ValueError(f"gold[{s}][{t}] = {tag!r} is not a tag (known: {ruleset.labels})")
                    ids.append(ruleset.label_to_id[tag])
                else:
                    ids.append(None if tag is None or int(tag) == -100 else int(tag))
            gold_tags.append(ids)
    num_labels = ruleset.num_labels
    starts = {(s, a) for (s, a, _, _) in masks.matches}
    stats = []
    for kind, items in (("token", ruleset.token_rules), ("gazetteer", ruleset.gazetteers)):
        for item in items:
            where = masks.fired[item.name]
            st = RuleStats(item.name, item.line, kind, len(where), len(where) / total if total else 0.0)
            if gold_tags is not None:
                ok = None
                if kind == "token":
                    ok = item.allowed_ids(num_labels)
                for s, t in where:
                    g = gold_tags[s][t]
                    if g is None:
                        continue
                    st.gold_seen += 1
                    if kind == "gazetteer":  # the tag this match demands on this token
                        tag = ruleset.labels[g]
                        start = (s, t) in starts
                        want = ("B-" if start else "I-") + item.entity
                        good = tag == want or (item.allow_outside and tag == "O")
                    else:
                        good = g in ok
                    if not good:
                        st.conflicts += 1
                        if len(st.conflict_rows) < _MAX_LISTED:
                            st.conflict_rows.append((s, t))
            stats.append(st)
    flat = masks.flat() if total else torch.ones(0, num_labels, dtype=torch.bool)
    constrained = ~flat.all(dim=1)
    n_con = int(constrained.sum())
    mean_allowed = float(flat[constrained].sum(dim=1).float().mean()) if n_con else 0.0
    gold_conflicts = None
    if gold_tags is not None:
        gold_flat = torch.tensor([-1 if g is None else g for tags in gold_tags for g in tags], dtype=torch.long)
        has_gold = gold_flat >= 0
        allowed_gold = flat.gather(1, gold_flat.clamp_min(0)[:, None])[:, 0] if total else has_gold
        gold_conflicts = int((constrained & has_gold & ~allowed_gold).sum())
    return RuleReport(source=ruleset.source, total=total, constrained=n_con,
                      contradictions=len(masks.contradictions), exclusive_conflicts=0, gold_conflicts=gold_conflicts,
                      mean_allowed=mean_allowed, rules=stats, unit="tokens")
