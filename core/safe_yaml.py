"""One bounded, safe YAML reader for everything a user hands in (recipes, overrides, metadata).

Only the safe subset of YAML is constructed (no Python tags), and a document is refused with a
:class:`~vsd.core.errors.VsdError` naming its source, instead of a traceback, a hang or a
silently wrong value, when it

- is larger than ``max_bytes`` (default 1 MiB) or is not UTF-8 text;
- nests deeper than ``max_depth`` (default 64), checked on the parser's event stream before any
  node is composed, so ten thousand ``[`` cost nothing;
- holds more than ``max_nodes`` values (default 100,000) once its aliases are expanded (an
  alias bomb is measured on the composed node graph, with shared nodes counted once per use
  but computed once), or an alias that contains itself;
- repeats a key inside one mapping (names the key and both lines).

``load_yaml(text, source)`` raises :class:`~vsd.core.errors.RecipeError` by default; pass
``error=DataError`` (and ``what=...``) for data files and checkpoint metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import RecipeError, VsdError, clip, short

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(ValueError):
    """A well-formed YAML document beyond the reader's limits (or with a repeated key)."""


def _line(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "an unknown position"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping."""

    def __init__(self, stream):
        super().__init__(stream)
        self.original_pairs: dict[int, list] = {}  # mapping node id -> its pairs before merge keys

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            pairs = self.original_pairs.get(id(node), node.value)
            seen: dict[Any, Node] = {}
            for key_node, _ in pairs:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base constructor reports it
                    continue
                if first is not None:
                    raise YamlRefused(
                        f"has a duplicate key {short(key)} at line {key_node.start_mark.line + 1} "
                        f"(first at line {first.start_mark.line + 1})"
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _decode(data: str | bytes, max_bytes: int) -> str:
    if isinstance(data, str):
        size = len(data) if len(data) > max_bytes else len(data.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise YamlRefused(f"is {_size(size)}, more than the {_size(max_bytes)} allowed")
        return data
    if len(data) > max_bytes:
        raise YamlRefused(f"is {_size(len(data))}, more than the {_size(max_bytes)} allowed")
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlRefused(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})") from None


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} bytes"


def _check_events(text: str, max_depth: int, max_nodes: int) -> None:
    """Nesting depth and value count, from the parser's events (the parser is not recursive)."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            nodes += 1
            if depth > max_depth:
                raise YamlRefused(f"nests more than {max_depth} levels deep (at {_line(event.start_mark)})")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            nodes += 1
        if nodes > max_nodes:
            raise YamlRefused(f"holds more than {max_nodes:,} values (at {_line(event.start_mark)})")


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Node, max_depth: int, max_nodes: int, loader: _Loader) -> None:
    """Size and depth of the document with every alias expanded, on the composed graph.

    Each distinct node is visited once (sizes are memoised), so an alias bomb is measured in
    time proportional to its text. Also records each mapping's pairs before merge keys change
    them, for the duplicate-key check.
    """
    done: dict[int, tuple[int, int]] = {}  # node id -> (expanded size, expanded depth)
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finish = stack.pop()
        nid = id(node)
        if finish:
            kids = _children(node)
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = (1 + max((done[id(k)][1] for k in kids), default=0)) if kids else 0
            open_.discard(nid)
            done[nid] = (size, depth)
            if size > max_nodes:
                raise YamlRefused(
                    f"expands to more than {max_nodes:,} values through its aliases (the value at {_line(node.start_mark)})"
                )
            if depth > max_depth:
                raise YamlRefused(
                    f"nests more than {max_depth} levels deep through its aliases (the value at {_line(node.start_mark)})"
                )
            continue
        if nid in done:
            continue
        if nid in open_:
            raise YamlRefused(f"has an alias inside the value it refers to (at {_line(node.start_mark)})")
        open_.add(nid)
        if isinstance(node, MappingNode):
            loader.original_pairs[nid] = list(node.value)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in done)


def parse_yaml(
    data: str | bytes, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES
) -> Any:
    """The value of one YAML document, within the limits.

    Raises :class:`YamlRefused` for a document beyond them (or not UTF-8, or with a repeated key)
    and :class:`yaml.YAMLError` for one that is not valid YAML (or uses a non-safe tag).
    """
    text = _decode(data, max_bytes)
    _check_events(text, max_depth, max_nodes)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, max_depth, max_nodes, loader)
        try:
            return loader.construct_document(node)
        except (YamlRefused, yaml.YAMLError):
            raise
        except (ValueError, OverflowError, TypeError) as exc:  # e.g. an integer of 5,000 digits
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise YamlRefused(f"holds a value that cannot be read ({clip(first, 100)})") from None
    finally:
        loader.dispose()


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """``malformed YAML at line L, column C: problem`` for a parser or constructor error."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at {_line(mark)}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["not valid YAML"])[0]
    context = getattr(exc, "context", None)
    if context and problem.startswith("but "):  # "expected a single document ..., but found ..."
        problem = f"{context}, {problem}"
    return f"malformed YAML{where}: {problem[:200]}"


def _raise(error: type[VsdError], source: str, what: str, key: str | None, message: str):
    if issubclass(error, RecipeError):
        raise error(source, key, message) from None
    where = f"{what} {source}" + (f", key `{key}`" if key else "")
    raise error(f"{where}: {message}") from None


def load_yaml(
    data: str | bytes,
    source: str,
    *,
    what: str = "recipe",
    error: type[VsdError] = RecipeError,
    key: str | None = None,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> Any:
    """Parse ``data`` (text or bytes) as one safe YAML document read from ``source``.

    Every problem raises ``error``: for a :class:`RecipeError` (the default) as
    ``error(source, key, message)``, for any other :class:`VsdError` (e.g. ``DataError``) as
    ``error("<what> <source>[, key `<key>`]: message")``.
    """
    try:
        return parse_yaml(data, max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes)
    except YamlRefused as exc:
        _raise(error, source, what, key, str(exc))
    except yaml.YAMLError as exc:
        _raise(error, source, what, key, describe_yaml_error(exc))
    except RecursionError:  # not expected within the depth limit; refused all the same
        _raise(error, source, what, key, "nests too deeply to be read")


def read_yaml_file(
    path: str | os.PathLike,
    *,
    what: str = "recipe",
    error: type[VsdError] = RecipeError,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> Any:
    """:func:`load_yaml` of the file at ``path`` (named as its source); never reads more than
    ``max_bytes`` + 1 bytes of it."""
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        _raise(error, source, what, None, f"cannot be read: {exc.strerror or exc}")
    if len(data) > max_bytes:
        try:
            size = _size(path.stat().st_size)
        except OSError:
            size = f"more than {_size(max_bytes)}"
        _raise(error, source, what, None, f"is {size}, more than the {_size(max_bytes)} allowed for a {what}")
    return load_yaml(data, source, what=what, error=error, max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes)
