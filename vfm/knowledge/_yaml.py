"""Safe YAML loading that remembers line numbers.

Rule files are parsed with a :class:`yaml.SafeLoader` subclass (no arbitrary Python objects) whose
mappings and sequences come back as ``dict``/``list`` subclasses carrying the 1-based line of the
node (``.line``) and of each key / item (``.key_lines`` / ``.item_lines``), so an error can point
at the exact line of the rule file.  Duplicate keys are an error (PyYAML keeps the last silently).
"""

from __future__ import annotations

from typing import Any, Optional

import yaml


class NotUTF8(ValueError):
    """A text file that is not valid UTF-8: ``line`` (1-based), ``start`` (byte offset), ``reason``."""

    def __init__(self, line: int, start: int, reason: str):
        super().__init__(f"line {line}: not valid UTF-8 ({reason} at byte {start})")
        self.line, self.start, self.reason = line, start, reason


def read_utf8(path: str) -> str:
    """The file as text (UTF-8, a leading BOM dropped); :class:`NotUTF8` names where it is not UTF-8."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NotUTF8(raw[:exc.start].count(b"\n") + 1, exc.start, exc.reason) from None


class LineDict(dict):
    """A mapping from YAML with ``line`` (the mapping's line) and ``key_lines`` (value lines)."""

    line: Optional[int] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class LineList(list):
    """A sequence from YAML with ``line`` and ``item_lines`` (one line per item)."""

    line: Optional[int] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.item_lines = []


class YAMLFormatError(ValueError):
    """A malformed YAML file (syntax error or duplicate key), with its path and line.

    Attributes:
        source, line, problem: the file, the 1-based line (None if unknown) and what is wrong.
    """

    def __init__(self, source: str, line: Optional[int], problem: str):
        super().__init__(f"{source}:{line}: {problem}" if line is not None else f"{source}: {problem}")
        self.source, self.line, self.problem = source, line, problem


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise YAMLFormatError(loader.name, key_node.start_mark.line + 1, "unhashable mapping key") from None
        if key in out:
            raise YAMLFormatError(loader.name, key_node.start_mark.line + 1,
                                  f"duplicate key {key!r} (first at line {out.key_lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml_with_lines(text: str, source: str) -> Any:
    """Parse one YAML document safely, keeping line numbers.

    Args:
        text: the YAML text.
        source: name used in error messages (usually the file path).

    Returns:
        The document: ``LineDict``/``LineList``/scalars.

    Raises:
        YAMLFormatError: on a syntax error or duplicate key, naming ``source`` and the line.
    """
    loader = _LineLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YAMLFormatError(source, line, f"invalid YAML: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise YAMLFormatError(source, None, f"invalid YAML: {err}") from None
    finally:
        loader.dispose()


def line_of(obj: Any, key: Any = None, index: Optional[int] = None) -> Optional[int]:
    """Line of ``obj`` (or of ``obj[key]`` / ``obj[index]``) when it came from YAML, else None."""
    if key is not None and isinstance(obj, LineDict):
        return obj.key_lines.get(key, obj.line)
    if index is not None and isinstance(obj, LineList) and index < len(obj.item_lines):
        return obj.item_lines[index]
    return getattr(obj, "line", None)
