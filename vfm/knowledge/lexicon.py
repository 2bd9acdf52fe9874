"""Domain lexicons: word lists for rules and synonym tables for augmentation.

Formats (parsed safely; errors name the file and line):

* ``.txt``: one synonym group per line, members separated by commas (``,`` or ``，``), tabs or
  ``|``; ``#`` starts a comment.  ``心脏病, 心脏疾病`` makes each member a synonym of the others; a
  line with a single member is a plain entry.
* ``.yaml`` / ``.yml`` / ``.json``: a list of entries, or a mapping ``word -> [synonyms]``
  (directed: only ``word`` is replaced by its synonyms).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List

import yaml

from vfm.knowledge._yaml import NotUTF8, read_utf8

_SPLIT = re.compile(r"[,，\t|]")


def _read_text(path: str) -> str:
    """The file as text (UTF-8, a leading BOM dropped); invalid UTF-8 is a ValueError with path and line."""
    try:
        return read_utf8(path)
    except NotUTF8 as exc:
        raise ValueError(f"{path}:{exc.line}: not valid UTF-8 ({exc.reason})") from None


def _read_txt(path: str) -> List[List[str]]:
    groups = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        members = [m.strip() for m in _SPLIT.split(line) if m.strip()]
        if not members:
            raise ValueError(f"{path}:{lineno}: no entry on this line")
        groups.append(members)
    return groups


def _read_structured(path: str):
    text = _read_text(path)
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark is not None else "?"
        raise ValueError(f"{path}:{line}: invalid YAML: {err.problem}") from None
    if isinstance(data, list):
        if not all(isinstance(w, str) for w in data):
            raise ValueError(f"{path}: a list lexicon must hold strings only")
        return {w: [] for w in data}
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            syns = v if isinstance(v, list) else ([] if v is None else [v])
            if not all(isinstance(s, (str, int, float)) for s in syns):
                raise ValueError(f"{path}: synonyms of {k!r} must be strings")
            out[str(k)] = [str(s) for s in syns]
        return out
    raise ValueError(f"{path}: a lexicon must be a list or a mapping, got {type(data).__name__}")


def load_lexicon(path: str) -> Dict[str, List[str]]:
    """Read a synonym lexicon as ``word -> synonyms``.

    Args:
        path: ``.txt``, ``.yaml``/``.yml`` or ``.json`` file (see the module docs).

    Returns:
        dict mapping each word to its list of synonyms (possibly empty).

    Raises:
        ValueError: malformed file, with path and line; OSError: unreadable file.
    """
    path = os.fspath(path)
    if path.endswith((".yaml", ".yml", ".json")):
        return _read_structured(path)
    out: Dict[str, List[str]] = {}
    for group in _read_txt(path):
        for word in group:
            syns = out.setdefault(word, [])
            syns.extend(w for w in group if w != word and w not in syns)
    return out


def read_lexicon_entries(path: str) -> List[str]:
    """All words of a lexicon file (keys and synonyms), in file order without repeats."""
    seen: Dict[str, None] = {}
    for word, syns in load_lexicon(path).items():
        seen.setdefault(word, None)
        for s in syns:
            seen.setdefault(s, None)
    return list(seen)
