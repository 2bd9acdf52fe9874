"""Conditions of a rule: keyword, regular-expression and lexicon matchers.

Matching rules (documented in :mod:`vfm.knowledge`):

* keywords, lexicon entries and regexes match case-insensitively unless ``case_sensitive: true``
  (per rule, or for the whole file under ``options``);
* a keyword that begins or ends with a letter or digit of a script written with spaces between
  words (Latin, Cyrillic, Greek, Arabic, ...) must stand as a whole word there: ``heart`` does not
  fire on ``sweetheart``, nor ``café`` on ``cafés``, nor ``кот`` on ``который``; at a CJK, Thai,
  Lao, Khmer or Myanmar character (scripts written without spaces; Korean attaches particles to
  nouns) keywords match as substrings: ``心脏`` fires on ``患者心脏不适``;
* regexes use Python's :mod:`re` syntax and ``re.search`` on texts (``re.fullmatch`` on tokens);
* on tokens (tagging rules) keywords and lexicon entries must equal the whole token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

# Letters of scripts written without spaces between words: CJK (ideographs, kana, hangul), Thai,
# Lao, Myanmar, Khmer.  A keyword edge in one of them needs no word boundary.
_NO_SPACE = (r"\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
             r"\uf900-\ufaff\U00020000-\U0002ebef")
_WORD = f"[^\\W{_NO_SPACE}]"  # a word character (any script, digits, _) outside those scripts
_WORD_RE = re.compile(_WORD)


def keyword_pattern(words: Sequence[str], case_sensitive: bool) -> Optional[re.Pattern]:
    """One alternation regex for ``words`` (longest first), with word boundaries at word-character
    edges of space-separated scripts (see the module docs).

    Args:
        words: keywords or lexicon entries (empty strings are ignored).
        case_sensitive: match case exactly.

    Returns:
        A compiled pattern for ``re.search`` on texts, or None when ``words`` is empty.
    """
    parts = []
    for word in sorted({w for w in words if w}, key=lambda w: (-len(w), w)):
        body = r"\s+".join(re.escape(piece) for piece in word.split())
        if _WORD_RE.match(word[0]):
            body = f"(?<!{_WORD})" + body
        if _WORD_RE.match(word[-1]):
            body = body + f"(?!{_WORD})"
        parts.append(body)
    if not parts:
        return None
    return re.compile("|".join(parts), 0 if case_sensitive else re.IGNORECASE)


def token_pattern(words: Sequence[str], case_sensitive: bool) -> Optional[re.Pattern]:
    """Alternation regex for ``re.fullmatch`` of a whole token against ``words``."""
    words = sorted({w for w in words if w}, key=lambda w: (-len(w), w))
    if not words:
        return None
    return re.compile("|".join(re.escape(w) for w in words), 0 if case_sensitive else re.IGNORECASE)


@dataclass
class Condition:
    """One condition of a rule: fires when any of its patterns matches.

    Attributes:
        kind: ``"keywords"``, ``"regex"`` or ``"lexicon"``.
        patterns: compiled patterns (any match fires the condition).
        level: ``"text"`` (``re.search``) or ``"token"`` (``re.fullmatch`` of one token).
        line: line of the condition in the rule file (None for dicts).
    """

    kind: str
    patterns: List[re.Pattern] = field(default_factory=list)
    level: str = "text"
    line: Optional[int] = None

    def matches(self, text: str) -> bool:
        """Whether the condition holds on ``text`` (a whole text, or one token at token level)."""
        if self.level == "token":
            return any(p.fullmatch(text) is not None for p in self.patterns)
        return any(p.search(text) is not None for p in self.patterns)


def conditions_hold(conditions: Sequence[Condition], text: str, mode: str) -> bool:
    """Combine conditions with ``mode`` ``"any"`` or ``"all"`` (an empty list never holds)."""
    if not conditions:
        return False
    if mode == "all":
        return all(c.matches(text) for c in conditions)
    return any(c.matches(text) for c in conditions)
