"""Common Objects in 3D (CO3D v2) read straight from the released folders.

Layout of one category (paths inside the annotations are relative to ``ROOT``)::

    ROOT/<category>/frame_annotations.jgz           gzip JSON list, one entry per frame
                   /sequence_annotations.jgz        gzip JSON list, one entry per sequence
                   /set_lists/set_lists_<subset>.json   {"train"|"val"|"test": [[sequence, frame, image_path], ...]}
                   /<sequence>/images/frameXXXXXX.jpg
                   /<sequence>/masks/frameXXXXXX.png    foreground probability, 0..255
                   /<sequence>/pointcloud.ply

Cameras are stored in the PyTorch3D convention and converted by :func:`co3d_to_cameras`.
Every sequence is brought into a common frame (:func:`normalise_sequence`): its point cloud's
centre of mass at the origin, the world up (estimated from the cameras, which circle the object)
along +y, and the object scaled into ``[-bound, bound]^3``. Frames are cropped to a square around
the object mask and resized to ``image_size``.

The JSON is parsed once: the first construction writes a cache (per sequence: cropped RGB and
mask as a ``uint8`` array ``(F, 4, S, S)`` that is memory-mapped when read, and the normalised
cameras) and later constructions read only the cache. The cache is rebuilt when the annotation
or set-list files change (size or modification time).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import field_validator
from torch import Tensor

from ...core.errors import DataError
from ...core.progress import Progress
from ...core.settings import Seed, Settings as BaseSettings
from ...core.contracts import SPLITS, SceneInfo, ViewsetDataset

CACHE_VERSION = 1
INTRINSICS_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")
MASK_THRESHOLD = 0.4  # foreground probability above which a pixel counts for the object's box
CROP_CONTEXT = 0.3  # the square crop's side is (1 + this) x the longer side of the object's box
FIT = 0.9  # the point cloud's 95th-percentile radius is scaled to FIT * bound
ROTATION_TOLERANCE = 1e-3
_BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
# PyTorch3D view space has +x left, +y up, +z forward; OpenCV has +x right, +y down, +z forward.
_P3D_TO_OPENCV = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))


# ---- cameras ------------------------------------------------------------------------------------
def co3d_to_cameras(R, T, focal, principal_point, size_hw, fmt: str) -> tuple[Tensor, Tensor]:
    """One CO3D (PyTorch3D) camera as an OpenCV camera-to-world matrix and pixel intrinsics.

    R: (3, 3), T: (3,): world to PyTorch3D view space with row vectors, ``X_view = X_world @ R + T``;
    the view space has +x left, +y up and looks along +z.
    focal, principal_point: (2,) in NDC, where x_ndc = focal_x * X_view / Z_view + principal_x
    (and likewise y), with +x_ndc left and +y_ndc up.
    size_hw: (H, W) of the image the NDC refers to.
    fmt: how NDC spans the image: "ndc_isotropic" scales both axes by s = min(H, W) / 2
    (the shorter side spans [-1, 1]); "ndc_norm_image_bounds" scales x by W / 2 and y by H / 2
    (both sides span [-1, 1]).

    The pixel coordinate of an NDC point is ``u = W/2 - x_ndc * s_x``, ``v = H/2 - y_ndc * s_y``
    (pixel edges at integers, so centres at +0.5 as in :class:`~vsd.core.cameras.Cameras`). Since
    OpenCV's camera axes are PyTorch3D's with x and y negated, ``u = fx X_cv / Z + cx`` with::

        fx = focal_x s_x,   cx = W/2 - principal_x s_x
        fy = focal_y s_y,   cy = H/2 - principal_y s_y
        c2w[:3, :3] = R @ diag(-1, -1, 1),   c2w[:3, 3] = -R @ T

    Returns c2w (4, 4) and K (4,) = (fx, fy, cx, cy), both float64.
    """
    R = torch.as_tensor(R, dtype=torch.float64).reshape(3, 3)
    T = torch.as_tensor(T, dtype=torch.float64).reshape(3)
    f = torch.as_tensor(focal, dtype=torch.float64).reshape(2)
    p = torch.as_tensor(principal_point, dtype=torch.float64).reshape(2)
    H, W = (float(x) for x in size_hw)
    if fmt == "ndc_isotropic":
        s = torch.tensor([min(H, W) / 2] * 2, dtype=torch.float64)
    elif fmt == "ndc_norm_image_bounds":
        s = torch.tensor([W / 2, H / 2], dtype=torch.float64)
    else:
        raise ValueError(f"unknown intrinsics_format {fmt!r}; expected one of {', '.join(INTRINSICS_FORMATS)}")
    half = torch.tensor([W / 2, H / 2], dtype=torch.float64)
    K = torch.cat([f * s, half - p * s])
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = R @ _P3D_TO_OPENCV
    c2w[:3, 3] = -R @ T
    return c2w, K


# ---- normalisation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ (x - centre)``, applied to points and camera poses."""

    scale: float
    rotation: Tensor  # (3, 3)
    centre: Tensor  # (3,)

    def points(self, p: Tensor) -> Tensor:
        """(..., 3) -> (..., 3)."""
        return self.scale * (p - self.centre.to(p)) @ self.rotation.to(p).T

    def poses(self, c2w: Tensor) -> Tensor:
        """(..., 4, 4) camera-to-world -> the same cameras in the normalised frame."""
        out = c2w.clone()
        out[..., :3, :3] = self.rotation.to(c2w) @ c2w[..., :3, :3]
        out[..., :3, 3] = self.points(c2w[..., :3, 3])
        return out


def estimate_up(c2w: Tensor) -> Tensor:
    """(3,) unit world "up" from cameras ``(N, 4, 4)`` (OpenCV) that circle an object.

    The cameras' x axes (image right) then lie roughly in the horizontal plane, so up is their
    direction of least variance; its sign makes it agree on average with the cameras' own up
    (-y). When the x axes do not span a plane (fewer than three cameras, or all alike), the mean
    camera up is used instead.
    """
    x = c2w[:, :3, 0].double()
    cam_up = -c2w[:, :3, 1].double()
    up = None
    if len(x) >= 3:
        _, S, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        if S[1] > 1e-3 * max(float(S[0]), 1e-12):
            up = Vh[-1]
    if up is None:
        up = cam_up.mean(0)
    up = up / up.norm()
    return -up if (cam_up @ up).mean() < 0 else up


def normalise_sequence(c2w: Tensor, points: Tensor, bound: float) -> Similarity:
    """The similarity that puts one sequence in the common frame.

    c2w: (N, 4, 4) OpenCV cameras of all its frames, in order; points: (P, 3) its point cloud.
    Centre: the point cloud's mean. Rotation: :func:`estimate_up` becomes +y, and the first
    camera's x axis lies in the x-y plane (the azimuth of a sequence is otherwise arbitrary).
    Scale: the 95th percentile of the centred points' distances becomes ``FIT * bound``, so the
    object fits the box while stray points of the reconstruction are ignored.
    """
    points = points.double()
    centre = points.mean(0)
    up = estimate_up(c2w)
    a = c2w[0, :3, 0].double()
    a = a - (a @ up) * up
    if a.norm() < 1e-6:  # the first camera looks straight down or up
        a = torch.linalg.cross(up, torch.eye(3, dtype=torch.float64)[int(up.abs().argmin())])
    a = a / a.norm()
    rotation = torch.stack([a, up, torch.linalg.cross(a, up)])  # rows: the new x, y, z axes
    radius = torch.quantile((points - centre).norm(dim=-1), 0.95).item()
    if not radius > 0:
        raise ValueError("the point cloud has no extent")
    return Similarity(FIT * bound / radius, rotation, centre)


# ---- reading files ------------------------------------------------------------------------------
def read_json(path: Path):
    """Parsed JSON of ``path`` (gzip-compressed when it ends in .jgz or .gz)."""
    try:
        if path.suffix in (".jgz", ".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable as {'gzip ' if path.suffix in ('.jgz', '.gz') else ''}JSON ({e})") from None


@dataclass(frozen=True)
class Frame:
    sequence: str
    number: int
    image: str  # path relative to the dataset root
    mask: str | None
    size_hw: tuple[int, int]
    R: tuple
    T: tuple
    focal: tuple
    principal_point: tuple
    fmt: str

    def cameras(self) -> tuple[Tensor, Tensor]:
        return co3d_to_cameras(self.R, self.T, self.focal, self.principal_point, self.size_hw, self.fmt)


def _vector(value, n: int, what: str) -> tuple:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != n or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be {n} finite numbers, got {value!r}")
    return tuple(arr.reshape(-1).tolist())


def parse_frame(entry) -> Frame:
    """A :class:`Frame` from one entry of frame_annotations.jgz; ValueError says what is wrong."""
    try:
        vp, image = entry["viewpoint"], entry["image"]
        size = image["size"]
        mask = entry.get("mask") or {}
        frame = Frame(
            sequence=str(entry["sequence_name"]),
            number=int(entry["frame_number"]),
            image=str(image["path"]),
            mask=mask.get("path"),
            size_hw=(int(size[0]), int(size[1])),
            R=_vector(vp["R"], 9, "viewpoint.R"),
            T=_vector(vp["T"], 3, "viewpoint.T"),
            focal=_vector(vp["focal_length"], 2, "viewpoint.focal_length"),
            principal_point=_vector(vp["principal_point"], 2, "viewpoint.principal_point"),
            fmt=str(vp.get("intrinsics_format", "ndc_norm_image_bounds")),
        )
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"missing or malformed field {e}") from None
    if frame.fmt not in INTRINSICS_FORMATS:
        raise ValueError(f"viewpoint.intrinsics_format {frame.fmt!r} is not one of {', '.join(INTRINSICS_FORMATS)}")
    if min(frame.size_hw) < 1 or min(frame.focal) <= 0:
        raise ValueError(f"image.size {list(frame.size_hw)} and focal_length {list(frame.focal)} must be positive")
    R = np.asarray(frame.R).reshape(3, 3)
    if np.abs(R.T @ R - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(R) < 0:
        raise ValueError("viewpoint.R is not a rotation (orthonormal, determinant +1)")
    return frame


def read_frames(path: Path) -> dict[str, list[Frame]]:
    """sequence -> its frames in frame order, from frame_annotations.jgz."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of frame annotations, got {type(entries).__name__}")
    sequences: dict[str, list[Frame]] = {}
    for k, entry in enumerate(entries):
        try:
            frame = parse_frame(entry)
        except ValueError as e:
            raise DataError(f"{path}: frame annotation {k}: {e}") from None
        sequences.setdefault(frame.sequence, []).append(frame)
    for frames in sequences.values():
        frames.sort(key=lambda fr: fr.number)
    return sequences


def read_point_cloud_paths(path: Path) -> dict[str, str]:
    """sequence -> point cloud path (relative to the dataset root), from sequence_annotations.jgz."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of sequence annotations, got {type(entries).__name__}")
    out = {}
    for entry in entries:
        pc = entry.get("point_cloud") if isinstance(entry, dict) else None
        if isinstance(pc, dict) and pc.get("path") and "sequence_name" in entry:
            out[str(entry["sequence_name"])] = str(pc["path"])
    return out


def read_set_list(path: Path, split: str) -> list[tuple[str, int]]:
    """(sequence, frame_number) of ``split`` in a set_lists_<subset>.json file."""
    data = read_json(path)
    if not isinstance(data, dict) or split not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a dict with a {split!r} list, found {keys}")
    try:
        return [(str(e[0]), int(e[1])) for e in data[split]]
    except (TypeError, IndexError, ValueError):
        raise DataError(f"{path}: {split!r} must be a list of [sequence_name, frame_number, image_path]") from None


def read_point_cloud(path: Path) -> Tensor:
    """(P, 3) float64 vertex positions of a PLY file (binary or ASCII)."""
    import trimesh

    if not path.is_file():
        raise DataError(f"{path}: point cloud not found")
    try:
        geometry = trimesh.load(path, file_type="ply", process=False)
        vertices = np.asarray(geometry.vertices, dtype=np.float64)
    except Exception as e:  # trimesh raises many kinds on malformed files
        raise DataError(f"{path}: not a readable PLY point cloud ({e})") from None
    vertices = vertices[np.isfinite(vertices).all(1)] if vertices.ndim == 2 else vertices
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) < 4:
        raise DataError(f"{path}: point cloud has fewer than 4 finite vertices")
    return torch.from_numpy(vertices)


def read_rgb(path: Path) -> Tensor:
    """(3, H, W) float in [0, 1]."""
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt files
        raise DataError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def image_size_problem(size_hw: tuple[int, int], annotated_hw: tuple[int, int]) -> str | None:
    """What is wrong with an image of ``size_hw`` whose annotation says ``annotated_hw``, or None.

    The annotated size, or a copy resized keeping the aspect ratio (to within a pixel's
    rounding), is fine: the intrinsics are scaled with it. Checked by the reader and by
    :func:`check_co3d` alike."""
    (h, w), (H, W) = size_hw, annotated_hw
    if (h, w) == (H, W) or abs(h * W - w * H) <= H + W:
        return None
    return f"size {h} x {w} but the annotation says {H} x {W} (a resized copy must keep the aspect ratio)"


def read_mask(path: Path, size_hw: tuple[int, int]) -> Tensor:
    """(1, H, W) foreground probability in [0, 1], resampled to ``size_hw`` if it differs."""
    if not path.is_file():
        raise DataError(f"{path}: mask not found")
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as e:  # as in read_rgb
        raise DataError(f"{path}: cannot read mask ({e})") from None
    mask = torch.from_numpy(pixels)[None]
    if mask.shape[-2:] != size_hw:
        mask = F.interpolate(mask[None], size=size_hw, mode="bilinear", align_corners=False)[0]
    return mask


# ---- cropping -----------------------------------------------------------------------------------
def crop_box(mask: Tensor) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of a square around the object of ``mask: (1, H, W)``, in pixels.

    The side is ``1 + CROP_CONTEXT`` times the longer side of the mask's bounding box. Along an
    axis where the square fits in the image it is shifted inside; where it does not, it stays
    centred on the object and the outside is padded. An empty mask gives the centred square
    of the shorter image side.
    """
    H, W = mask.shape[-2:]
    ys, xs = torch.nonzero(mask[0] > MASK_THRESHOLD, as_tuple=True)
    if len(xs) == 0:
        side = min(H, W)
        return (W - side) // 2, (H - side) // 2, side
    x_lo, x_hi, y_lo, y_hi = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
    side = max(1, round(max(x_hi - x_lo, y_hi - y_lo) * (1 + CROP_CONTEXT)))

    def place(lo: int, hi: int, extent: int) -> int:
        start = round((lo + hi - side) / 2)
        return min(max(start, 0), extent - side) if side <= extent else start

    return place(x_lo, x_hi, W), place(y_lo, y_hi, H), side


def crop_and_resize(pixels: Tensor, K: Tensor, box: tuple[int, int, int], size: int) -> tuple[Tensor, Tensor]:
    """Cut the square ``box`` out of ``pixels: (C, H, W)`` (zeros outside), resize to ``size``.

    Returns ``(C, size, size)`` and K (4,) for the new image: the principal point moves by the
    box corner, then everything scales by ``size / side``.
    """
    x0, y0, side = box
    C, H, W = pixels.shape
    canvas = pixels.new_zeros(C, side, side)
    xa, xb, ya, yb = max(x0, 0), min(x0 + side, W), max(y0, 0), min(y0 + side, H)
    if xa < xb and ya < yb:
        canvas[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = pixels[:, ya:yb, xa:xb]
    if side != size:
        canvas = F.interpolate(canvas[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    scale = size / side
    K = torch.stack([K[0] * scale, K[1] * scale, (K[2] - x0) * scale, (K[3] - y0) * scale])
    return canvas, K


# ---- the dataset ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    root: Path  # the dataset root; annotation paths are relative to it
    category: Path

    def resolve(self, rel: str) -> Path:
        """A path from the annotations; also accepted relative to the category folder."""
        p = self.root / rel
        if p.exists():
            return p
        alt = self.category / rel
        return alt if alt.exists() else p


def _stamp(*paths: Path) -> list:
    """What identifies the source files' versions without reading them."""
    out = []
    for p in paths:
        st = p.stat() if p.exists() else None
        out.append([str(p), st.st_size, st.st_mtime_ns] if st else [str(p), None, None])
    return out


class CO3DDataset(ViewsetDataset):
    """Viewsets of CO3D v2 sequences (see the module docstring for the layout and the cache).

    Constructed as ``CO3DDataset(settings, split="train" | "val" | "test")``; the split's frames
    are those of ``set_lists/set_lists_<subset>.json[split]``. One item is one sequence: images
    (V, 3, S, S) in [-1, 1] composited over ``background`` with the CO3D mask, masks (V, 1, S, S),
    c2w (V, 4, 4) in the normalised frame, K (V, 4) of the square crops. V views are drawn afresh
    on every call in train and from a per-index seed in val/test; :meth:`load` reads given frames.
    """

    class Settings(BaseSettings):
        root: str
        category: str = "hydrant"
        subset: str = "fewview_dev"  # the set list: set_lists/set_lists_<subset>.json
        image_size: int = 64
        views: int = 4
        bound: float = 1.0
        background: Literal["white", "black"] = "white"
        max_sequences: int | None = None
        max_frames: int | None = None  # per sequence, evenly spaced; None keeps every frame of the split
        cache: str | None = None  # default ROOT/<category>/.vsd_cache
        seed: Seed = 0  # of the per-index view choice in val/test

        @field_validator("image_size", "views")
        @classmethod
        def _positive(cls, v: int) -> int:
            if v < 1:
                raise ValueError(f"must be >= 1, got {v}")
            return v

        @field_validator("max_sequences", "max_frames")
        @classmethod
        def _positive_or_none(cls, v: int | None) -> int | None:
            if v is not None and v < 1:
                raise ValueError(f"must be >= 1 or null, got {v}")
            return v

        @field_validator("bound")
        @classmethod
        def _positive_bound(cls, v: float) -> float:
            if not v > 0:
                raise ValueError(f"must be > 0, got {v}")
            return v

    def __init__(self, settings: "CO3DDataset.Settings", *, split: str = "train"):
        super().__init__(settings, split=split)
        s = settings
        root = Path(s.root)
        self.layout = _Layout(root, root / s.category)
        self.annotations = self.layout.category / "frame_annotations.jgz"
        self.set_list = self.layout.category / "set_lists" / f"set_lists_{s.subset}.json"
        self._check_names()
        key = f"{s.subset}-{split}-{s.image_size}px-bound{s.bound:g}-frames{s.max_frames or 'all'}-v{CACHE_VERSION}"
        self.cache_dir = Path(s.cache) / s.category / key if s.cache else self.layout.category / ".vsd_cache" / key
        self.sequences = self._prepare_cache()
        self._cameras = {name: self._read_cameras(name) for name in self.sequences}
        self.info = self._scene_info()

    # ---- setup ----------------------------------------------------------------------------------
    def _check_names(self) -> None:
        root, category = self.layout.root, self.layout.category
        if not root.is_dir():
            raise DataError(f"CO3D root {root} is not a folder")
        if not self.annotations.is_file():
            found = sorted(d.name for d in root.iterdir() if (d / "frame_annotations.jgz").is_file())
            raise DataError(
                f"CO3D root {root}: no category {category.name!r} ({self.annotations} not found); "
                f"categories here: {', '.join(found) or 'none'}"
            )
        if not self.set_list.is_file():
            found = sorted(p.stem.removeprefix("set_lists_") for p in (category / "set_lists").glob("set_lists_*.json"))
            raise DataError(f"{self.set_list}: no subset {self.settings.subset!r}; subsets here: {', '.join(found) or 'none'}")

    def _prepare_cache(self) -> list[str]:
        """Sequence names of the split (capped by max_sequences), building what the cache lacks."""
        index_path = self.cache_dir / "index.json"
        stamp = _stamp(self.annotations, self.set_list, self.layout.category / "sequence_annotations.jgz")
        index = None
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                index = None
        if index is None or index.get("version") != CACHE_VERSION or index.get("stamp") != stamp:
            index = {"version": CACHE_VERSION, "stamp": stamp, "sequences": None, "built": []}
        names = index["sequences"]
        if names is not None:
            wanted = names[: self.settings.max_sequences]
            if set(wanted) <= set(index["built"]) and all(self._files(n)[0].is_file() for n in wanted):
                return wanted
        frames, selected = self._read_annotations()
        names = list(selected)
        index["sequences"] = names
        wanted = names[: self.settings.max_sequences]
        todo = [n for n in wanted if n not in index["built"] or not self._files(n)[0].is_file()]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        point_clouds = self._point_cloud_paths()
        with Progress(f"co3d {self.settings.category} {self.split}: caching", len(todo), unit="sequences", quiet=not todo) as bar:
            for name in todo:
                self._build_sequence(name, frames[name], selected[name], point_clouds.get(name))
                index["built"] = sorted(set(index["built"]) | {name})
                _write_atomic(index_path, json.dumps(index).encode())
                bar.advance()
        _write_atomic(index_path, json.dumps(index).encode())
        return wanted

    def _read_annotations(self) -> tuple[dict[str, list[Frame]], dict[str, list[Frame]]]:
        """All frames per sequence, and the split's frames per sequence (in set-list order of sequences)."""
        frames = read_frames(self.annotations)
        by_key = {(f.sequence, f.number): f for seq in frames.values() for f in seq}
        selected: dict[str, list[Frame]] = {}
        for seq, number in read_set_list(self.set_list, self.split):
            frame = by_key.get((seq, number))
            if frame is None:
                raise DataError(f"{self.set_list}: {self.split} frame {number} of sequence {seq!r} has no entry in {self.annotations}")
            selected.setdefault(seq, []).append(frame)
        if not selected:
            raise DataError(f"{self.set_list}: the {self.split!r} list is empty")
        n = self.settings.max_frames
        for seq, chosen in selected.items():
            chosen.sort(key=lambda fr: fr.number)
            if n is not None and len(chosen) > n:
                selected[seq] = [chosen[k] for k in np.linspace(0, len(chosen) - 1, n).round().astype(int)]
        return frames, dict(sorted(selected.items()))

    def _point_cloud_paths(self) -> dict[str, str]:
        path = self.layout.category / "sequence_annotations.jgz"
        return read_point_cloud_paths(path) if path.is_file() else {}

    def _files(self, name: str) -> tuple[Path, Path]:
        return self.cache_dir / f"{name}.npy", self.cache_dir / f"{name}.cameras.npz"

    def _build_sequence(self, name: str, frames: list[Frame], chosen: list[Frame], point_cloud: str | None) -> None:
        """Normalise one sequence and write its cropped frames and cameras to the cache."""
        pc_path = self.layout.resolve(point_cloud or f"{self.layout.category.name}/{name}/pointcloud.ply")
        cams = [f.cameras() for f in frames]
        try:
            sim = normalise_sequence(torch.stack([c for c, _ in cams]), read_point_cloud(pc_path), self.settings.bound)
        except ValueError as e:
            raise DataError(f"{pc_path}: {e}") from None
        S = self.settings.image_size
        pixels, c2ws, Ks = [], [], []
        for frame in chosen:
            c2w, K = frame.cameras()
            image_path = self.layout.resolve(frame.image)
            rgb = read_rgb(image_path)
            H, W = rgb.shape[-2:]
            problem = image_size_problem((H, W), frame.size_hw)
            if problem:
                raise DataError(f"{image_path}: {problem}")
            if (H, W) != frame.size_hw:  # a resized copy of the release: scale K with it
                K = K * torch.tensor([W / frame.size_hw[1], H / frame.size_hw[0]] * 2, dtype=K.dtype)
            if frame.mask is None:
                raise DataError(f"{self.annotations}: frame {frame.number} of {name!r} has no mask path")
            mask = read_mask(self.layout.resolve(frame.mask), (H, W))
            crop, K = crop_and_resize(torch.cat([rgb, mask]), K, crop_box(mask), S)
            pixels.append((crop.clamp(0, 1) * 255).round().to(torch.uint8))
            c2ws.append(sim.poses(c2w))
            Ks.append(K)
        image_file, camera_file = self._files(name)
        _write_atomic(image_file, _npy_bytes(torch.stack(pixels).numpy()))
        buf = io.BytesIO()
        np.savez(buf, c2w=torch.stack(c2ws).float().numpy(), K=torch.stack(Ks).float().numpy(),
                 frames=np.array([f.number for f in chosen]), scale=np.array(sim.scale))  # fmt: skip
        _write_atomic(camera_file, buf.getvalue())

    def _read_cameras(self, name: str) -> tuple[Tensor, Tensor, np.ndarray]:
        path = self._files(name)[1]
        try:
            with np.load(path) as z:
                return torch.from_numpy(z["c2w"]), torch.from_numpy(z["K"]), z["frames"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: unreadable cache file ({e}); delete {self.cache_dir} to rebuild it") from None

    def _scene_info(self) -> SceneInfo:
        c2w = torch.cat([c for c, _, _ in self._cameras.values()])
        K = torch.cat([k for _, k, _ in self._cameras.values()])
        dist = c2w[:, :3, 3].norm(dim=-1)
        S, b = self.settings.image_size, self.settings.bound
        fov = math.degrees(2 * math.atan(S / 2 / K[:, 1].median().item()))
        reach = b * math.sqrt(3)  # the box's half-diagonal
        return SceneInfo(
            bound=b,
            camera_radius=dist.quantile(0.5).item(),
            fov_deg=fov,
            near=max(dist.min().item() - reach, 0.01 * b),
            far=dist.max().item() + reach,
            up_axis="y",
            background=self.settings.background,
        )

    # ---- items ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sequences)

    def num_views(self, i: int) -> int:
        return len(self._cameras[self.sequences[i]][2])

    def frame_numbers(self, i: int) -> list[int]:
        """CO3D frame numbers of the cached frames of sequence ``i`` (view positions index these)."""
        return self._cameras[self.sequences[i]][2].tolist()

    def choose_views(self, i: int) -> list[int]:
        """Positions (into :meth:`frame_numbers`) of the V views of item ``i``."""
        n, V = self.num_views(i), self.settings.views
        return self.random_views(i, n, V)

    def load(self, i: int, views: list[int]) -> dict:
        """Item dict (see the class docstring) of sequence ``i`` with the given view positions."""
        name = self.sequences[i]
        path = self._files(name)[0]
        try:
            pixels = np.load(path, mmap_mode="r")[np.asarray(views)]
        except (OSError, ValueError, IndexError) as e:
            raise DataError(f"{path}: unreadable cache file ({e}); delete {self.cache_dir} to rebuild it") from None
        x = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255.0
        rgb, mask = x[:, :3], x[:, 3:]
        bg = torch.tensor(_BACKGROUNDS[self.settings.background]).view(1, 3, 1, 1)
        c2w, K, _ = self._cameras[name]
        return {
            "images": (rgb * mask + bg * (1 - mask)) * 2 - 1,
            "c2w": c2w[views].clone(),
            "K": K[views].clone(),
            "masks": mask,
        }

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence index {i} out of range for {len(self)} {self.split} sequences")
        return self.load(i, self.choose_views(i))


# ---- cache helpers ------------------------------------------------------------------------------
def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (other processes) see the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- checking a folder --------------------------------------------------------------------------
def is_co3d_root(root: str | Path) -> bool:
    """Whether ``root`` is a CO3D category folder or holds one."""
    root = Path(root)
    if (root / "frame_annotations.jgz").is_file():
        return True
    return root.is_dir() and any((d / "frame_annotations.jgz").is_file() for d in root.iterdir() if d.is_dir())


def check_co3d(root: str | Path) -> list[str]:
    """Problems of a CO3D v2 folder (the dataset root or one category folder), each naming a file.

    Checked per category: frame_annotations.jgz parses and every entry has valid fields (rotation
    R, positive focal length, a known intrinsics_format); sequence_annotations.jgz parses; every
    frame's image exists with the annotated size and its mask exists; every sequence has a point
    cloud; set_lists/ has set lists whose train/val/test entries name annotated frames.
    An empty list means the folder can be read by :class:`CO3DDataset`.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    if (root / "frame_annotations.jgz").is_file():
        layouts = [_Layout(root.parent, root)]
    else:
        layouts = [_Layout(root, d) for d in sorted(root.iterdir()) if (d / "frame_annotations.jgz").is_file()]
    if not layouts:
        return [f"{root}: no CO3D category folders (expected <category>/frame_annotations.jgz)"]
    problems: list[str] = []
    for layout in layouts:
        problems += _check_category(layout)
    return problems


def _check_category(layout: _Layout) -> list[str]:
    problems: list[str] = []
    annotations = layout.category / "frame_annotations.jgz"
    try:
        entries = read_json(annotations)
    except DataError as e:
        return [str(e)]
    if not isinstance(entries, list):
        return [f"{annotations}: expected a JSON list of frame annotations"]
    frames: list[Frame] = []
    for k, entry in enumerate(entries):
        try:
            frames.append(parse_frame(entry))
        except ValueError as e:
            problems.append(f"{annotations}: frame annotation {k}: {e}")
    for frame in frames:
        problems += _check_frame(layout, frame)
    seq_path = layout.category / "sequence_annotations.jgz"
    point_clouds: dict[str, str] = {}
    try:
        point_clouds = read_point_cloud_paths(seq_path)
    except DataError as e:
        problems.append(str(e))
    for name in sorted({f.sequence for f in frames}):
        pc = layout.resolve(point_clouds.get(name) or f"{layout.category.name}/{name}/pointcloud.ply")
        if not pc.is_file():
            problems.append(f"{pc}: point cloud of sequence {name!r} not found")
    problems += _check_set_lists(layout.category / "set_lists", {(f.sequence, f.number) for f in frames})
    return problems


def _check_frame(layout: _Layout, frame: Frame) -> list[str]:
    where = f"(frame {frame.number} of sequence {frame.sequence!r})"
    image = layout.resolve(frame.image)
    problems = []
    if not image.is_file():
        problems.append(f"{image}: image not found {where}")
    else:
        try:
            with Image.open(image) as im:
                W, H = im.size
            problem = image_size_problem((H, W), frame.size_hw)
            if problem:
                problems.append(f"{image}: {problem}")
        except Exception as e:  # as in read_rgb
            problems.append(f"{image}: cannot read image ({e})")
    if frame.mask is None:
        problems.append(f"{layout.category / 'frame_annotations.jgz'}: no mask path {where}")
    elif not layout.resolve(frame.mask).is_file():
        problems.append(f"{layout.resolve(frame.mask)}: mask not found {where}")
    return problems


def _check_set_lists(folder: Path, known: set[tuple[str, int]]) -> list[str]:
    files = sorted(folder.glob("set_lists_*.json"))
    if not files:
        return [f"{folder}: no set_lists_<subset>.json files"]
    problems = []
    for path in files:
        for split in SPLITS:
            try:
                entries = read_set_list(path, split)
            except DataError as e:
                problems.append(str(e))
                continue
            unknown = [e for e in entries if e not in known]
            if unknown:
                seq, number = unknown[0]
                problems.append(
                    f"{path}: {len(unknown)} {split} entries name frames without annotations "
                    f"(first: frame {number} of sequence {seq!r})"
                )
    return problems
