"""Script detection, word segmentation and joining, for English and Chinese text.

Chinese is written without spaces, so words come from jieba (a private ``jieba.Tokenizer``, loaded
once, so the global jieba dictionary is never changed); other text is split into words and
punctuation marks.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Iterable, List, Optional, Sequence

# Han ideographs (basic, extension A, compatibility, extension B+), kana and hangul
_CJK_CHAR = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ebef"
# CJK symbols and punctuation (。、「」), full-width forms (，！？)
_CJK_PUNCT = r"\u3000-\u303f\uff00-\uffef"
CJK_RE = re.compile(f"[{_CJK_CHAR}]")
_CJK_OR_PUNCT = re.compile(f"[{_CJK_CHAR}{_CJK_PUNCT}]")
_WORDS = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]", re.UNICODE)
_NO_SPACE_BEFORE = set(".,;:!?)]}%'\"”’")
_NO_SPACE_AFTER = set("([{\"“‘$#")

_jieba_lock = threading.Lock()
_jieba_tokenizer = None


def is_cjk(text: str) -> bool:
    """Whether ``text`` contains Chinese/Japanese/Korean characters (then words come from jieba).

    Args:
        text: any string.

    Returns:
        True when at least one CJK ideograph, kana or hangul syllable occurs.
    """
    return CJK_RE.search(text) is not None


def is_cjk_char(ch: str) -> bool:
    """Whether a single character is CJK (ideograph, kana, hangul, CJK or full-width punctuation)."""
    return _CJK_OR_PUNCT.match(ch) is not None


def _jieba():
    global _jieba_tokenizer
    with _jieba_lock:
        if _jieba_tokenizer is None:
            import jieba

            jieba.setLogLevel(logging.WARNING)
            tok = jieba.Tokenizer()
            tok.initialize()
            _jieba_tokenizer = tok
        return _jieba_tokenizer


def _merge_known(tokens: List[str], keep: Optional[set], sep: str) -> List[str]:
    """Merge consecutive tokens that spell a word of ``keep`` (case-folded; longest first)."""
    if not keep:
        return tokens
    longest = max((len(w) for w in keep), default=0)
    out, i = [], 0
    while i < len(tokens):
        best = None
        joined = tokens[i]
        for j in range(i + 1, len(tokens)):
            joined += sep + tokens[j]
            if len(joined) > longest:
                break
            if joined.casefold() in keep:
                best = j
        if best is None:
            out.append(tokens[i])
            i += 1
        else:
            out.append(sep.join(tokens[i:best + 1]))
            i = best + 1
    return out


def tokenize_words(text: str, keep: Optional[Iterable[str]] = None) -> List[str]:
    """Split ``text`` into words.

    Chinese (any CJK character): jieba's accurate mode, whitespace dropped; Latin words inside
    Chinese text stay whole.  Otherwise: words (letters/digits with inner ``-``/``'``/``.``) and
    single punctuation marks.

    Args:
        text: the text.
        keep: optional words (e.g. a lexicon's) that must stay one token: consecutive tokens that
            spell one of them (joined without spaces in CJK text, with one space otherwise;
            case-insensitive) are merged, since jieba sometimes splits domain terms and
            multi-word English terms (``chest pain``) would otherwise be two tokens.

    Returns:
        list of tokens; ``"".join`` (CJK) or :func:`join_tokens` rebuilds a readable text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    cjk = is_cjk(text)
    if cjk:
        tokens = [t for t in _jieba().lcut(text, HMM=True) if t.strip()]
    else:
        tokens = _WORDS.findall(text)
    keep = {w.casefold() for w in keep} if keep is not None else None
    return _merge_known(tokens, keep, "" if cjk else " ")


def join_tokens(tokens: Sequence[str]) -> str:
    """Join tokens into text: no space next to CJK characters or before closing punctuation.

    Args:
        tokens: words.

    Returns:
        The text (``["I", "take", "aspirin", "."]`` -> ``"I take aspirin."``, ``["服用", "阿司匹林"]``
        -> ``"服用阿司匹林"``).
    """
    out = ""
    for tok in tokens:
        if not tok:
            continue
        if out and not (is_cjk_char(out[-1]) or is_cjk_char(tok[0]) or tok[0] in _NO_SPACE_BEFORE
                        or out[-1] in _NO_SPACE_AFTER):
            out += " "
        out += tok
    return out
