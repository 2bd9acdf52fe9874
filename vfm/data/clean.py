"""Text cleaning: Unicode normalisation, control characters, markup and whitespace.

Each step is optional.  Order: markup (so entities such as ``&nbsp;`` are decoded first),
NFKC, control and invisible characters, whitespace.

* NFKC turns full-width forms into their ASCII counterparts (``ＡＢＣ１２３`` -> ``ABC123``,
  ``，`` -> ``,``, the ideographic space into a space), circled digits into digits and
  ligatures into letters.  Note that this also turns Chinese full-width punctuation (``，！？：``)
  into ASCII; ``。`` and ``、`` have no ASCII form and stay.
* Control characters (Unicode category Cc except tab/newline, which become spaces) and
  invisible format characters (zero-width space, BOM, soft hyphen, direction marks) are removed.
* Markup: HTML/XML tags with a known HTML tag name are removed (block tags leave a space),
  ``<script>``/``<style>`` contents and comments dropped, entities decoded.  What only looks
  like a tag is kept: an unknown name (``<foo>``) or bare words as attributes (``a<b and c>d``).
* Whitespace runs become one space, ends are stripped, and (``cjk_spaces=True``) spaces between
  two CJK characters are removed (``中 文`` -> ``中文``: Chinese uses no spaces between words).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from html.parser import HTMLParser
from typing import List, Sequence, Tuple

from vfm.data.example import Change, Example, StepReport
from vfm.data.text import _CJK_CHAR, _CJK_PUNCT, join_tokens

_INVISIBLE = set("\u00ad\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\ufeff")
_MARKUP_HINT = re.compile(r"<[A-Za-z!/][^<>]*>|&(#\d+|#x[0-9A-Fa-f]+|[A-Za-z]+\d*);")
_SPACES = re.compile(r"\s+")
_CJK_GAP = re.compile(f"(?<=[{_CJK_CHAR}{_CJK_PUNCT}]) (?=[{_CJK_CHAR}{_CJK_PUNCT}])")
_HTML_TAGS = set("""a abbr address area article aside audio b base bdi bdo blockquote body br button canvas caption
cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption figure font
footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins kbd label legend li link main map mark meta
meter nav noscript object ol optgroup option output p param picture pre progress q rp rt ruby s samp script section
select small source span strike strong style sub summary sup svg table tbody td template textarea tfoot th thead time
title tr track tt u ul var video wbr center""".split())
_BLOCK_TAGS = set("""address article aside blockquote br dd div dl dt fieldset figcaption figure footer form h1 h2 h3
h4 h5 h6 header hr li main nav ol p pre section table tbody td tfoot th thead tr ul""".split())


_BOOLEAN_ATTRS = set("""allowfullscreen async autofocus autoplay checked controls default defer disabled hidden
ismap loop multiple muted nomodule novalidate nowrap open readonly required reversed selected""".split())


def _not_markup(tag: str, attrs) -> bool:
    """A "tag" that is really text: an unknown name, or valueless words as attributes (``a<b and c>d``)."""
    return tag not in _HTML_TAGS or any(value is None and name not in _BOOLEAN_ATTRS for name, value in attrs)


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if _not_markup(tag, attrs):
            self.parts.append(self.get_starttag_text() or "")
            return
        if tag in ("script", "style"):
            self.skip += 1
        if tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_startendtag(self, tag, attrs):
        if _not_markup(tag, attrs):
            self.parts.append(self.get_starttag_text() or "")
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag not in _HTML_TAGS:
            self.parts.append(f"</{tag}>")
            return
        if tag in ("script", "style") and self.skip:
            self.skip -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def strip_markup(text: str) -> str:
    """Remove HTML/XML markup (known HTML tags only) and decode entities."""
    if not _MARKUP_HINT.search(text):
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def remove_control(text: str) -> str:
    """Drop control characters (tab/newline/CR become spaces) and invisible format characters."""
    out = []
    for ch in text:
        if ch in "\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85":
            out.append(" ")
        elif ch in _INVISIBLE:
            continue
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def normalize_whitespace(text: str, cjk_spaces: bool = True) -> str:
    """Collapse whitespace runs to one space, strip, and drop spaces between CJK characters."""
    text = _SPACES.sub(" ", text).strip()
    if cjk_spaces:
        text = _CJK_GAP.sub("", text)
    return text


def clean_text(text: str, *, nfkc: bool = True, strip_markup: bool = True, control: bool = True,
               whitespace: bool = True, cjk_spaces: bool = True, lowercase: bool = False) -> Tuple[str, List[str]]:
    """Clean one text.

    Args:
        text: the text.
        nfkc, strip_markup, control, whitespace, cjk_spaces, lowercase: steps to run (see the
            module docs).

    Returns:
        ``(cleaned text, names of the steps that changed it)``.
    """
    kinds = []
    steps = [("markup", strip_markup, globals()["strip_markup"]),
             ("nfkc", nfkc, lambda t: unicodedata.normalize("NFKC", t)),
             ("control", control, remove_control),
             ("whitespace", whitespace, lambda t: normalize_whitespace(t, cjk_spaces)),
             ("lowercase", lowercase, str.lower)]
    for name, enabled, fn in steps:
        if enabled:
            new = fn(text)
            if new != text:
                kinds.append(name)
                text = new
    return text, kinds


def clean(examples: Sequence[Example], *, nfkc: bool = True, strip_markup: bool = True, control: bool = True,
          whitespace: bool = True, cjk_spaces: bool = True, lowercase: bool = False,
          min_chars: int = 1) -> Tuple[List[Example], StepReport]:
    """Clean every example's text (and tokens, label); drop the ones left (almost) empty.

    Tagging examples have each token cleaned (markup is not stripped inside tokens, and
    whitespace inside a token is removed); a token left empty is dropped with its tag, and the
    report counts it.  Labels are NFKC-normalised and stripped.  Inputs are not modified.

    Args:
        examples: the examples.
        nfkc, strip_markup, control, whitespace, cjk_spaces, lowercase: see :func:`clean_text`.
        min_chars: examples whose cleaned text is shorter are removed (and reported).

    Returns:
        ``(cleaned examples, StepReport)``: ``removed`` lists the dropped rows, ``modified`` the
        number of changed rows and ``modifications`` the changes per kind.
    """
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    report = StepReport(step="clean", n_in=len(examples))
    opts = dict(nfkc=nfkc, strip_markup=strip_markup, control=control, whitespace=whitespace,
                cjk_spaces=cjk_spaces, lowercase=lowercase)
    out = []
    for i, ex in enumerate(examples):
        changed = set()
        label = ex.label
        if label is not None:
            new_label = unicodedata.normalize("NFKC", label).strip() if nfkc else label.strip()
            if new_label != label:
                changed.add("label")
            label = new_label or None
        tokens, tags = ex.tokens, ex.tags
        if tokens is not None:
            new_tokens, new_tags, dropped = [], [], 0
            for j, tok in enumerate(tokens):
                t, kinds = clean_text(tok, **{**opts, "strip_markup": False})
                t = t.replace(" ", "")
                changed.update(kinds)
                if t:
                    new_tokens.append(t)
                    if tags is not None:
                        new_tags.append(tags[j])
                else:
                    dropped += 1
            if dropped:
                report.modifications["empty tokens dropped"] += dropped
                changed.add("tokens")
            tokens, tags = new_tokens, (new_tags if tags is not None else None)
            text = join_tokens(tokens) if dropped or changed else ex.text
            if text != ex.text:
                changed.add("text")
        else:
            text, kinds = clean_text(ex.text, **opts)
            changed.update(kinds)
        if len(text) < max(min_chars, 1) or (tokens is not None and not tokens):
            report.removed.append(Change(i, ex.where, f"empty or shorter than {min_chars} chars after cleaning",
                                         ex.text[:80]))
            continue
        if changed:
            report.modified += 1
            for kind in changed:
                if kind not in ("text", "tokens"):
                    report.modifications[kind] += 1
            ex = dataclasses.replace(ex, text=text, label=label, tokens=tokens, tags=tags, meta=dict(ex.meta))
        out.append(ex)
    report.n_out = len(out)
    return out, report.log()
