"""Loading CSV/TSV, JSONL and CoNLL files into :class:`~vfm.data.example.Example` lists.

Nothing is dropped silently: every row that cannot be read is listed in the
:class:`LoadReport` with its file and line (and logged as a warning on ``vfm.data``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from vfm.data.example import Example
from vfm.data.text import join_tokens

logger = logging.getLogger("vfm.data")
FORMATS = ("csv", "tsv", "jsonl", "conll")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".conll": "conll",
             ".bio": "conll", ".iob": "conll"}


@dataclass
class Malformed:
    """A row that could not be loaded: file, 1-based line and the reason."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class LoadReport:
    """What :func:`load_examples` read.

    Attributes:
        path, format: the file and its format.
        loaded: examples returned.
        malformed: rows skipped, each with file, line and reason.
        blank_lines: blank lines skipped (JSONL), ``docstart``: ``-DOCSTART-`` lines (CoNLL).
        unlabelled: loaded classification rows without a label (CSV/JSONL; kept, label None).
    """

    path: str
    format: str
    loaded: int = 0
    malformed: List[Malformed] = field(default_factory=list)
    blank_lines: int = 0
    docstart: int = 0
    unlabelled: int = 0

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} examples from {self.path} ({self.format}); "
                 f"malformed rows skipped: {len(self.malformed)}"
                 + (f"; blank lines: {self.blank_lines}" if self.blank_lines else "")
                 + (f"; -DOCSTART- lines: {self.docstart}" if self.docstart else "")
                 + (f"; rows without a label (kept, unlabelled): {self.unlabelled}" if self.unlabelled else "")]
        lines += [f"  {m}" for m in self.malformed[:50]]
        if len(self.malformed) > 50:
            lines.append(f"  ... and {len(self.malformed) - 50} more (see .malformed)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain dict."""
        return {"path": self.path, "format": self.format, "loaded": self.loaded, "blank_lines": self.blank_lines,
                "docstart": self.docstart, "unlabelled": self.unlabelled, "malformed": [vars(m) for m in self.malformed]}


def _decoded_lines(path: str, bad: set, keepends: bool = False):
    """Yield ``(lineno, text)`` for each physical line, decoding UTF-8 line by line.

    A line that is not valid UTF-8 is added to ``bad`` and decoded with replacement characters
    (the caller skips the row it belongs to and reports it).  A leading BOM is dropped.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            elif lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # e.g. Excel's "Unicode text"
                raise ValueError(f"{path}: UTF-16 text (byte-order mark {raw[:2].hex(' ').upper()}); save it as "
                                 "UTF-8")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.add(lineno)
                text = raw.decode("utf-8", errors="replace")
            yield lineno, (text if keepends else text.rstrip("\r\n"))


def _label(value) -> Tuple[Optional[str], Optional[str]]:
    """(label, error): labels are strings; ints become strings; empty/None mean unlabelled."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"label must be a string or an integer, got {type(value).__name__} {value!r}"
    value = str(value).strip()
    return (value or None), None


def _load_csv(path, delimiter, text_field, label_field, report) -> List[Example]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    bad_lines: set = set()
    source = _decoded_lines(path, bad_lines, keepends=True)
    with contextlib.closing(source):
        return _read_csv_rows(path, source, delimiter, text_field, label_field, bad_lines, report)


def _read_csv_rows(path, source, delimiter, text_field, label_field, bad_lines, report) -> List[Example]:
    out = []
    reader = csv.reader((text for _, text in source), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return out
    header = [name.strip() for name in header]  # "text, label" names the column "label", not " label"
    if text_field not in header:
        raise ValueError(f"{path}:1: no column {text_field!r} in the header {header} (text_field)")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}:1: duplicate column names in the header {header}")
    ti = header.index(text_field)
    li = header.index(label_field) if label_field in header else None
    prev_end = reader.line_num
    while True:
        start = prev_end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            report.malformed.append(Malformed(path, start, f"CSV error: {err}"))
            prev_end = reader.line_num
            continue
        prev_end = reader.line_num
        if any(start <= b <= prev_end for b in bad_lines):
            report.malformed.append(Malformed(path, start, "not valid UTF-8"))
            continue
        if not row or all(not c.strip() for c in row):
            report.blank_lines += 1
            continue
        if len(row) != len(header):
            report.malformed.append(Malformed(path, start, f"{len(row)} fields, the header has {len(header)}"))
            continue
        text = row[ti]
        if not text.strip():
            report.malformed.append(Malformed(path, start, f"empty {text_field!r}"))
            continue
        label = (row[li].strip() or None) if li is not None else None
        meta = {k: v for k, v in zip(header, row) if k not in (text_field, label_field)}
        out.append(Example(text=text, label=label, source=path, line=start, meta=meta))
    return out


def _load_jsonl(path, text_field, label_field, tokens_field, tags_field, report) -> List[Example]:
    out = []
    bad_lines: set = set()
    for lineno, line in _decoded_lines(path, bad_lines):
        if lineno in bad_lines:
            report.malformed.append(Malformed(path, lineno, "not valid UTF-8"))
            continue
        if not line.strip():
            report.blank_lines += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            report.malformed.append(Malformed(path, lineno, f"invalid JSON: {err.msg} (column {err.colno})"))
            continue
        if not isinstance(obj, dict):
            report.malformed.append(Malformed(path, lineno, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        tokens = tags = None
        if tokens_field in obj:
            tokens, tags = obj[tokens_field], obj.get(tags_field)
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                report.malformed.append(Malformed(path, lineno, f"{tokens_field!r} must be a non-empty list of "
                                                                "non-empty strings"))
                continue
            if tags is not None and (not isinstance(tags, list) or len(tags) != len(tokens)
                                     or not all(isinstance(t, str) and t for t in tags)):
                report.malformed.append(Malformed(path, lineno, f"{tags_field!r} must be a list of strings, one "
                                                                f"per token ({len(tokens)})"))
                continue
        text = obj.get(text_field)
        if text is None and tokens is not None:
            text = join_tokens(tokens)
        if not isinstance(text, str) or not text.strip():
            what = "missing" if text is None else f"not a non-empty string ({text!r})"
            report.malformed.append(Malformed(path, lineno, f"field {text_field!r} is {what}"))
            continue
        label, err = _label(obj.get(label_field))
        if err:
            report.malformed.append(Malformed(path, lineno, err))
            continue
        meta = {k: v for k, v in obj.items() if k not in (text_field, label_field, tokens_field, tags_field)}
        out.append(Example(text=text, label=label, tokens=tokens, tags=tags, source=path, line=lineno,
                           meta=meta))
    return out


def _load_conll(path, report) -> List[Example]:
    out = []
    tokens, tags, start, bad = [], [], 0, None

    def flush():
        nonlocal tokens, tags, start, bad
        if tokens or bad:
            if bad is not None:
                report.malformed.append(Malformed(path, start, f"sentence skipped: line {bad[0]}: {bad[1]}"))
            else:
                out.append(Example(text=join_tokens(tokens), tokens=tokens, tags=tags, source=path, line=start))
        tokens, tags, start, bad = [], [], 0, None

    bad_lines: set = set()
    for lineno, line in _decoded_lines(path, bad_lines):
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        if stripped.startswith("-DOCSTART-"):
            report.docstart += 1
            flush()
            continue
        if not tokens and bad is None:
            start = lineno
        cols = stripped.split()
        if lineno in bad_lines:
            if bad is None:
                bad = (lineno, "not valid UTF-8")
            continue
        if len(cols) < 2:
            if bad is None:
                bad = (lineno, f"expected 'token tag', got {stripped!r}")
            continue
        tokens.append(cols[0])
        tags.append(cols[-1])
    flush()
    return out


def load_examples(path, format: Optional[str] = None, text_field: str = "text", label_field: str = "label",
                  tokens_field: str = "tokens", tags_field: str = "tags") -> Tuple[List[Example], LoadReport]:
    """Load a CSV/TSV, JSONL or CoNLL file.

    * CSV/TSV: a header row (names stripped of surrounding spaces); ``text_field`` must be a
      column (else ValueError); an empty label cell means unlabelled; the other columns go to
      ``Example.meta``.  Rows with the wrong number of fields or an empty text are malformed.
    * JSONL: one object per line with ``text_field`` (or ``tokens_field``/``tags_field`` for
      tagging data); labels are strings (integers are turned into strings).  Invalid JSON,
      non-objects, missing/empty text and bad types are malformed.
    * CoNLL: ``token ... tag`` per line (first and last whitespace-separated columns), a blank
      line between sentences, ``-DOCSTART-`` lines skipped; a sentence with a line that has
      fewer than two columns is malformed as a whole (its tags could not be trusted).

    Args:
        path: the file.
        format: one of ``csv, tsv, jsonl, conll`` (default: from the suffix).
        text_field, label_field: CSV columns / JSON keys of the text and the label.
        tokens_field, tags_field: JSON keys of token-tagging data.

    Returns:
        ``(examples, report)``; ``report.malformed`` lists every skipped row as ``file:line: reason``.
    """
    path = os.fspath(path)
    if format is None:
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".conllu":  # read as 'token ... tag' it would give the ID column as tokens, silently
            raise ValueError(f"{path}: CoNLL-U (.conllu) is not read: its columns are ID FORM LEMMA ... MISC and it "
                             "has no standard entity-tag column; write one 'token tag' line per word (.conll), or "
                             "pass format='conll' if the file really has the token first and the tag last")
        if suffix not in _SUFFIXES:
            raise ValueError(f"cannot tell the format of {path!r} from its suffix {suffix!r}; pass format= one of "
                             f"{FORMATS}")
        format = _SUFFIXES[suffix]
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    report = LoadReport(path=path, format=format)
    if format in ("csv", "tsv"):
        examples = _load_csv(path, "," if format == "csv" else "\t", text_field, label_field, report)
    elif format == "jsonl":
        examples = _load_jsonl(path, text_field, label_field, tokens_field, tags_field, report)
    else:
        examples = _load_conll(path, report)
    report.loaded = len(examples)
    if format != "conll":
        report.unlabelled = sum(1 for ex in examples if ex.label is None and ex.tokens is None)
    logger.info("loaded %d examples from %s (%s), %d malformed rows skipped", len(examples), path, format,
                len(report.malformed))
    for m in report.malformed[:20]:
        logger.warning("malformed row skipped: %s", m)
    if len(report.malformed) > 20:
        logger.warning("... and %d more malformed rows in %s", len(report.malformed) - 20, path)
    return examples, report
