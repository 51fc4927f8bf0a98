"""A small reader for AC3D models (``.ac``, and the ``.acc`` variant that TORCS cars use).

What it understands, per ``OBJECT``: ``name``, ``texture`` (the first one; ``.acc`` objects list
up to four, one per UV set, and only the first, the ``base`` texture, is kept), ``loc`` and
``rot`` (placement relative to the parent), ``numvert`` (``x y z`` or, in ``.acc``,
``x y z nx ny nz`` with per-vertex normals), ``numsurf`` with ``SURF`` / ``mat`` / ``refs`` and
``kids`` (nested objects, which inherit the parent's placement). Other tokens (``data``, ``url``,
``crease``, ``texrep``, ...) are skipped.

Surfaces: the low four bits of the ``SURF`` flags give the type: 0 a polygon (fanned into
triangles), 1 and 2 lines (dropped), 4 a triangle strip (``.acc``), unrolled with alternating
winding; triangles whose corners repeat a vertex (strip padding) are dropped. Each ``refs`` line
is ``index u0 v0 [u1 v1 ...]``: one (u, v) pair per UV set, the first pair kept.

Placement: a vertex ``p`` of an object maps into its parent as ``R p + loc``, with ``R`` the
3 x 3 matrix whose rows are the nine ``rot`` numbers (identity and zero when absent), composed up
to the top ``world`` object. UVs are returned as stored: ``v`` runs up the image (OpenGL style).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import DataError


@dataclass
class AC3DObject:
    """The triangles of one AC3D object, already placed in the file's top-level frame.

    positions: (T, 3, 3) corner positions; uvs: (T, 3, 2) first UV set (v up);
    normals: (T, 3, 3) per-corner unit normals or None (plain ``.ac`` files have none);
    colors: (T, 3) material colours in [0, 1]; texture: the first texture file name or None.
    """

    name: str
    texture: str | None
    positions: np.ndarray
    uvs: np.ndarray
    normals: np.ndarray | None
    colors: np.ndarray


@dataclass
class _Node:
    name: str = ""
    texture: str | None = None
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    loc: np.ndarray = field(default_factory=lambda: np.zeros(3))
    vertices: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    vnormals: np.ndarray | None = None
    corners: list = field(default_factory=list)  # (3 vertex ids, 3 x (u, v), material id) per triangle
    kids: list = field(default_factory=list)


class _Lines:
    """Line cursor that names the file and line number in every error."""

    def __init__(self, text: str, source: str):
        self.lines, self.i, self.source = text.splitlines(), 0, source

    def next(self) -> str:
        while self.i < len(self.lines):
            line = self.lines[self.i].strip()
            self.i += 1
            if line:
                return line
        raise self.error("unexpected end of file")

    def error(self, message: str) -> DataError:
        return DataError(f"{self.source}, line {self.i}: {message}")

    def numbers(self, line: str, count: int | None = None) -> list[float]:
        try:
            values = [float(x) for x in line.split()]
        except ValueError:
            raise self.error(f"expected numbers, got {line!r}") from None
        if count is not None and len(values) < count:
            raise self.error(f"expected {count} numbers, got {line!r}")
        return values


def _strip(n: int) -> list[tuple[int, int, int]]:
    """Triangles (positions into the refs list) of an ``n``-vertex strip, consistently wound."""
    return [(k, k + 1, k + 2) if k % 2 == 0 else (k + 1, k, k + 2) for k in range(n - 2)]


def _fan(n: int) -> list[tuple[int, int, int]]:
    return [(0, k, k + 1) for k in range(1, n - 1)]


def _read_surface(lines: _Lines, flags_line: str, node: _Node) -> None:
    try:
        kind = int(flags_line.split()[1], 0) & 0xF
    except (IndexError, ValueError):
        raise lines.error(f"bad SURF line {flags_line!r}") from None
    material, refs = 0, None
    while refs is None:
        line = lines.next()
        key = line.split()[0]
        if key == "mat":
            material = int(lines.numbers(line.split(None, 1)[1], 1)[0])
        elif key == "refs":
            refs = int(line.split()[1])
        else:
            raise lines.error(f"expected 'mat' or 'refs' in a surface, got {line!r}")
    rows = [lines.numbers(lines.next(), 1) for _ in range(refs)]
    ids = [int(r[0]) for r in rows]
    uvs = [(r[1], r[2]) if len(r) >= 3 else (0.0, 0.0) for r in rows]
    if kind == 4:
        tris = _strip(len(ids))
    elif kind == 0:
        tris = _fan(len(ids))
    else:  # closed or open lines have no area
        return
    for a, b, c in tris:
        if len({ids[a], ids[b], ids[c]}) == 3:
            node.corners.append(((ids[a], ids[b], ids[c]), (uvs[a], uvs[b], uvs[c]), material))


def _read_object(lines: _Lines) -> _Node:
    node = _Node()
    while True:
        line = lines.next()
        key, _, rest = line.partition(" ")
        rest = rest.strip()
        if key == "name":
            node.name = rest.strip('"')
        elif key == "texture" and node.texture is None:
            node.texture = shlex.split(rest)[0] if rest else None
        elif key == "rot":
            node.rot = np.array(lines.numbers(rest, 9)[:9]).reshape(3, 3)
        elif key == "loc":
            node.loc = np.array(lines.numbers(rest, 3)[:3])
        elif key == "data":
            _skip_data(lines, int(rest))
        elif key == "numvert":
            rows = [lines.numbers(lines.next(), 3) for _ in range(int(rest))]
            node.vertices = np.array([r[:3] for r in rows], dtype=np.float64).reshape(-1, 3)
            if len(rows) and all(len(r) >= 6 for r in rows):
                node.vnormals = np.array([r[3:6] for r in rows], dtype=np.float64)
        elif key == "numsurf":
            for _ in range(int(rest)):
                surf = lines.next()
                if not surf.startswith("SURF"):
                    raise lines.error(f"expected SURF, got {surf!r}")
                _read_surface(lines, surf, node)
        elif key == "kids":
            for _ in range(int(rest)):
                head = lines.next()
                if not head.startswith("OBJECT"):
                    raise lines.error(f"expected OBJECT, got {head!r}")
                node.kids.append(_read_object(lines))
            return node


def _skip_data(lines: _Lines, length: int) -> None:
    """Skip a ``data`` block: ``length`` characters on the following line(s)."""
    seen = -1
    while seen < length:
        seen += len(lines.lines[lines.i]) + 1 if lines.i < len(lines.lines) else length + 1
        lines.i += 1


def _parse_material(line: str) -> np.ndarray:
    tokens = shlex.split(line)
    if "rgb" in tokens:
        k = tokens.index("rgb")
        return np.array([float(x) for x in tokens[k + 1 : k + 4]])
    return np.ones(3)


def parse_ac3d(text: str, source: str = "<ac3d>") -> list[AC3DObject]:
    """All objects with triangles in AC3D ``text``, placed in the top-level frame."""
    lines = _Lines(text, source)
    header = lines.next()
    if not header.startswith("AC3D"):
        raise lines.error(f"not an AC3D file (first line {header!r}, expected 'AC3D...')")
    materials, roots = [], []
    while lines.i < len(lines.lines):
        try:
            line = lines.next()
        except DataError:
            break
        if line.startswith("MATERIAL"):
            materials.append(_parse_material(line))
        elif line.startswith("OBJECT"):
            roots.append(_read_object(lines))
        else:
            raise lines.error(f"expected MATERIAL or OBJECT, got {line!r}")
    out: list[AC3DObject] = []
    for root in roots:
        _flatten(root, np.eye(3), np.zeros(3), materials, out, source)
    return out


def _flatten(node: _Node, R: np.ndarray, t: np.ndarray, materials, out: list[AC3DObject], source: str) -> None:
    R_world, t_world = R @ node.rot, R @ node.loc + t
    if node.corners:
        ids = np.array([c[0] for c in node.corners])
        if ids.max() >= len(node.vertices):
            raise DataError(f"{source}: object {node.name!r} refers to vertex {ids.max()} of {len(node.vertices)}")
        mats = [c[2] for c in node.corners]
        colors = np.array([materials[m] if m < len(materials) else np.ones(3) for m in mats])
        normals = None
        if node.vnormals is not None:
            n = node.vnormals[ids] @ R_world.T
            normals = (n / np.linalg.norm(n, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)
        out.append(
            AC3DObject(
                name=node.name,
                texture=node.texture,
                positions=(node.vertices[ids] @ R_world.T + t_world).astype(np.float32),
                uvs=np.array([c[1] for c in node.corners], dtype=np.float32),
                normals=normals,
                colors=colors.astype(np.float32),
            )
        )
    for kid in node.kids:
        _flatten(kid, R_world, t_world, materials, out, source)


def read_ac3d(path: str | Path) -> list[AC3DObject]:
    """The objects of an ``.ac`` / ``.acc`` file (see :func:`parse_ac3d`)."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise DataError(f"cannot read AC3D file {path}: {e}") from None
    return parse_ac3d(text, str(path))
