"""Reading configuration documents from files, directories and stdin.

``meshctl apply -f`` takes what ``kubectl apply -f`` takes: files, directories (every
``*.yaml``, ``*.yml`` and ``*.json`` below them, in sorted order) and ``-`` for stdin, each
holding one or more YAML documents, or a ``kind: List`` whose ``items`` are the objects.

Every document keeps where it came from (file and 0-based position in the file) so that a
validation error can point the user at the exact document, and every failure to read or parse
raises :class:`LoadError` naming the same.

YAML is read the way the Kubernetes apiserver reads it, not the way PyYAML does by default:
a key given twice in one mapping is an error (PyYAML silently keeps the last one, which hides
typos such as two ``route:`` blocks), and unquoted dates stay strings.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import yaml

STDIN = "-"
STDIN_SOURCE = "<stdin>"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(slots=True)
class Document:
    """One object read from an input.

    ``index`` is the 0-based position of the YAML document in its file (empty documents are
    counted, so the numbers stay true to the file); messages print it as is. ``item`` is the
    0-based position inside a ``kind: List`` document, None for a plain object.
    """

    source: str
    index: int
    body: dict[str, Any]
    item: int | None = None


class LoadError(Exception):
    """An input could not be read or parsed; ``index`` is None when no document is involved."""

    def __init__(self, source: str, index: int | None, message: str) -> None:
        super().__init__(source, index, message)
        self.source = source
        self.index = index
        self.message = message

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source}: document {self.index}"
        return f"{where}: {self.message}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads like go-yaml: duplicate keys fail, dates and IPv6 stay strings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (dict, list)):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def scan_plain(self) -> yaml.tokens.ScalarToken:
        """PyYAML's plain-scalar scanner, except that ':' ends a scalar only before a blank.

        In flow context PyYAML also stops at ':' before one of ``,[]{}``, so
        ``addresses: [2001:db8::]`` would read as a mapping; go-yaml, which kubectl and the
        apiserver use, reads the IPv6 address, and so do we.
        """
        chunks: list[str] = []
        start_mark = end_mark = self.get_mark()
        indent = self.indent + 1
        spaces: list[str] = []
        while self.peek() != "#":
            length = 0
            while not self._ends_plain(length):
                length += 1
            if length == 0:
                break
            self.allow_simple_key = False
            chunks.extend(spaces)
            chunks.append(self.prefix(length))
            self.forward(length)
            end_mark = self.get_mark()
            spaces = self.scan_plain_spaces(indent, start_mark)
            if not spaces or self.peek() == "#" or (not self.flow_level and self.column < indent):
                break
        return yaml.tokens.ScalarToken("".join(chunks), True, start_mark, end_mark)

    def _ends_plain(self, offset: int) -> bool:
        char = self.peek(offset)
        return (char in _BLANK_OR_END or (char == ":" and self.peek(offset + 1) in _BLANK_OR_END)
                or (self.flow_level > 0 and char in ",?[]{}"))


_BLANK_OR_END = "\0 \t\r\n\x85\u2028\u2029"


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_documents(inputs: Sequence[str], stdin: TextIO | None = None) -> list[Document]:
    """Read every object from ``inputs`` in order; raise LoadError on the first problem."""
    docs: list[Document] = []
    for name in inputs:
        if name == STDIN:
            stream = stdin if stdin is not None else sys.stdin
            docs.extend(_parse_yaml(STDIN_SOURCE, stream.read()))
            continue
        for path in _expand(name):
            docs.extend(_parse_file(path))
    return docs


def _expand(name: str) -> list[Path]:
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES)
        if not files:
            raise LoadError(name, None, "directory holds no .yaml, .yml or .json files")
        return files
    if not path.exists():
        raise LoadError(name, None, "no such file or directory")
    return [path]


def _parse_file(path: Path) -> Iterator[Document]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(source, None, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise LoadError(source, None, exc.strerror or str(exc)) from exc
    if path.suffix == ".json":
        return _parse_json(source, text)
    return _parse_yaml(source, text)


def _parse_json(source: str, text: str) -> Iterator[Document]:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoadError(source, 0, f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    return _objects(source, 0, body)


def _parse_yaml(source: str, text: str) -> Iterator[Document]:
    index = 0
    try:
        for index, body in enumerate(yaml.load_all(text, Loader=_StrictLoader)):
            if body is not None:
                yield from _objects(source, index, body)
            index += 1  # a parse error after this document belongs to the next one
    except yaml.YAMLError as exc:
        raise LoadError(source, index, f"invalid YAML: {_describe_yaml_error(exc)}") from exc


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc)


def _objects(source: str, index: int, body: Any) -> Iterator[Document]:
    """Yield the object, or each item of a ``kind: List``."""
    if not isinstance(body, dict):
        raise LoadError(source, index, f"expected a mapping (an object), got {_type_name(body)}")
    if body.get("kind") != "List" or "items" not in body:
        yield Document(source, index, body)
        return
    items = body["items"]
    if not isinstance(items, list):
        raise LoadError(source, index, f"items: expected a list, got {_type_name(items)}")
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise LoadError(source, index,
                            f"items[{position}]: expected a mapping (an object), got {_type_name(item)}")
        yield Document(source, index, item, position)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
