"""The sampling pipeline behind the Python API (:mod:`vsd.api`): a trained model that
reconstructs an object from images or generates one, and the sampled objects it returns.

The ``vsd-run sample`` and ``vsd-run export`` commands call this same API. Sampling shows its
progress on stderr (a bar on a terminal, a line every 30 s elsewhere; see :mod:`vsd.core.progress`)
unless ``progress=False`` is passed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..core.cameras import Cameras, spherical_to_cartesian
from ..core.engine import ViewsetDiffusion
from ..core.errors import DataError
from ..core.progress import Progress


def read_camera(path: str | Path) -> Cameras:
    """One camera from a JSON file (as written beside ``examples/inputs/*.png``): ``c2w``, the
    4x4 camera-to-world matrix in the OpenCV convention (x right, y down, z forward), ``K``, the
    3x3 intrinsics in pixels, and the image's ``width`` and ``height``. Returns (1,) Cameras."""
    path = Path(path)
    try:
        cam = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"cannot read the camera file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a JSON camera file ({exc}); expected an object with c2w, K, width and height") from None
    if not isinstance(cam, dict):
        raise DataError(f"{path}: expected a JSON object with c2w, K, width and height, found {type(cam).__name__}")
    missing = [k for k in ("c2w", "K", "width", "height") if k not in cam]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; a camera file holds c2w (4x4), K (3x3, pixels), width and height")

    def matrix(key: str, rows: int) -> Tensor:
        try:
            m = torch.tensor(cam[key], dtype=torch.float32)
        except (TypeError, ValueError):
            m = None
        if m is None or m.shape != (rows, rows) or not torch.isfinite(m).all():
            raise DataError(f"{path}: {key} must be a {rows}x{rows} matrix of finite numbers, found {json.dumps(cam[key])[:80]}")
        return m

    c2w, K = matrix("c2w", 4), matrix("K", 3)
    size = {k: cam[k] for k in ("width", "height")}
    for k, v in size.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(f"{path}: {k} must be a positive whole number of pixels, found {v!r}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise DataError(f"{path}: K's focal lengths (K[0][0], K[1][1]) must be positive, found {K[0, 0].item()}, {K[1, 1].item()}")
    if not torch.allclose(c2w[:3, :3] @ c2w[:3, :3].T, torch.eye(3), atol=1e-3) or torch.det(c2w[:3, :3]) <= 0 or not torch.allclose(c2w[3], torch.tensor([0.0, 0, 0, 1])):
        raise DataError(f"{path}: c2w must be a rigid camera-to-world matrix (a rotation with determinant +1, last row 0 0 0 1)")
    intr = torch.stack([K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
    return Cameras(c2w[None], intr[None], size["height"], size["width"])


@dataclass
class Result:
    """Sampled objects. ``views``: (N, V, 3, H, W) in [0, 1] renders at ``cameras`` (N, V);
    ``scene``: the N 3D objects (a Field, or a list of N Mesh); ``progress``: whether
    :meth:`turntable` shows its rendering on stderr."""

    pipeline: "Pipeline"
    scene: object
    views: Tensor
    cameras: Cameras
    progress: bool = True

    def __len__(self) -> int:
        return self.views.shape[0]

    def render(self, cameras: Cameras, *, progress: bool = False) -> Tensor:
        """Render every object at ``cameras`` ((V,) shared, or (N, V)) -> (N, V, 3, H, W) in [0, 1];
        ``progress``: show the views rendered on stderr."""
        N = len(self)
        if len(cameras.shape) == 1:
            V = cameras.shape[0]
            cameras = Cameras(cameras.c2w[None].expand(N, V, 4, 4), cameras.K[None].expand(N, V, 4), cameras.height, cameras.width)
        cameras = cameras.to(self.pipeline.device)
        V, out = cameras.shape[1], []
        with torch.no_grad(), Progress(f"rendering {N} object{'s' * (N != 1)}", V, unit="views", quiet=not progress) as bar:
            for i in range(0, V, 8):
                out.append(self.pipeline.model.render(self.scene, cameras[:, i : i + 8])["rgb"])
                bar.update(min(i + 8, V))
        return torch.cat(out, 1).cpu()

    def turntable(self, path: str | Path, frames: int | None = None, size: int | None = None, elevation: float | None = None) -> list[Path]:
        """Write a turntable of all objects side by side: ``path`` (.gif) and an .mp4 beside it
        when imageio-ffmpeg is installed. Returns the files written."""
        from .media import save_video

        s = self.pipeline.model.recipe.sample
        cams = self.pipeline.orbit(frames or s.turntable_frames, elevation=s.turntable_elevation if elevation is None else elevation, size=size)
        video = self.render(cams, progress=self.progress)  # (N, F, 3, S, S)
        return save_video(torch.cat(list(video), dim=-1), path, upscale=2)

    def save_views(self, path: str | Path) -> Path:
        """A PNG grid: one row per object, one column per view."""
        from .media import save_grid

        return save_grid(self.views, path, upscale=2)

    def export_mesh(self, path: str | Path, index: int = 0, format: str | None = None, resolution: int = 64, threshold: float | None = None) -> Path:
        """Write object ``index`` as a mesh (glb, ply or obj, from the suffix by default)."""
        from .export import export_mesh, scene_to_meshes

        if isinstance(self.scene, (list, tuple)):
            return export_mesh(self.scene[index], path, format)
        mesh = scene_to_meshes(self.scene, resolution, threshold, min_component_ratio=0.02)[index]
        return export_mesh(mesh, path, format)


class Pipeline:
    """A trained model ready to sample. Create with :func:`vsd.load`."""

    def __init__(self, model: ViewsetDiffusion):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.model.recipe.data.settings.image_size

    @property
    def default_views(self) -> int:
        r = self.model.recipe
        return r.data.settings.views - r.train.heldout_views

    def orbit(self, n: int, *, azimuth0: float = 0.0, elevation: float = 0.0, size: int | None = None) -> Cameras:
        """(n,) cameras evenly spaced in azimuth around the object (the first at ``azimuth0``
        degrees; 0 faces the object's front), at the training data's radius and field of view."""
        info = self.model.info
        size = size or self.model.recipe.sample.render_size or self.image_size
        az = math.radians(azimuth0) + torch.arange(n) * (2 * math.pi / n)
        el = torch.full_like(az, math.radians(elevation))
        up = (0.0, 1.0, 0.0) if info.up_axis == "y" else (0.0, 0.0, 1.0)
        eye = spherical_to_cartesian(az, el, info.camera_radius, info.up_axis)
        return Cameras.look_at(eye, up=up, fov_deg=info.fov_deg, height=size, width=size)

    def _images(self, images) -> Tensor:
        """Paths / a (3, H, W) or (k, 3, H, W) tensor in [0, 1] -> (k, 3, S, S) in [-1, 1]."""
        from .media import load_image

        if isinstance(images, (str, Path)):
            images = [images]
        if isinstance(images, (list, tuple)):
            return torch.stack([load_image(p, self.image_size) for p in images])
        x = images.float()
        x = x[None] if x.dim() == 3 else x
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        return x * 2 - 1

    def reconstruct(
        self,
        images,
        cameras: Cameras | None = None,
        *,
        num_samples: int = 4,
        views: int | None = None,
        steps: int | None = None,
        seed: int = 0,
        guidance: float | None = None,
        elevation: float = 0.0,
        progress: bool = True,
    ) -> Result:
        """Sample ``num_samples`` objects consistent with the conditioning image(s).

        images: an image path, a list of paths, or a tensor (k, 3, H, W) / (3, H, W) in [0, 1].
        cameras: (k,) cameras of those images, or (V,) with V > k: the first k for the images and
            the others where the new views are sampled; default: the first image seen from the
            front (azimuth 0) at ``elevation``, the other views evenly around it.
        views: views per sampled viewset (default: as in training, or all given cameras; at least k + 1).
        progress: show the sampler's steps on stderr as they go (a bar on a terminal, a line every
            30 s or ``$VSD_PROGRESS_INTERVAL`` elsewhere); False: nothing.
        Returns a :class:`Result` whose first k views are renders at the conditioning cameras.
        """
        cond = self._images(images).to(self.device)
        k = cond.shape[0]
        given = 0 if cameras is None else cameras.shape[0]
        if cameras is not None and given < k:
            raise DataError(f"reconstruct: {k} images but {given} cameras; give one camera per image (or more for the sampled views)")
        V = max(views or max(self.default_views, given), k + 1, given)
        ring = self.orbit(V, elevation=elevation, size=self.image_size)
        if cameras is not None:
            cameras = cameras.resized(self.image_size, self.image_size)
            ring = Cameras(torch.cat([cameras.c2w, ring.c2w[given:]]), torch.cat([cameras.K, ring.K[given:]]), self.image_size, self.image_size)
        return self._sample(ring, cond, num_samples, steps, seed, guidance, "reconstruct" if progress else None)

    def generate(
        self, n: int = 4, *, views: int | None = None, steps: int | None = None, seed: int = 0, elevation: float = 0.0,
        progress: bool = True,
    ) -> Result:  # fmt: skip
        """Sample ``n`` objects unconditionally; ``progress`` as in :meth:`reconstruct`."""
        ring = self.orbit(views or self.default_views, elevation=elevation, size=self.image_size)
        return self._sample(ring, None, n, steps, seed, None, "generate" if progress else None)

    def _sample(self, ring: Cameras, cond: Tensor | None, n: int, steps, seed: int, guidance, shown: str | None) -> Result:
        """``shown``: the name the progress goes by (None: no progress)."""
        V = ring.shape[0]
        cams = Cameras(ring.c2w[None].expand(n, V, 4, 4), ring.K[None].expand(n, V, 4), ring.height, ring.width).to(self.device)
        cond_b = None if cond is None else cond[None].expand(n, *cond.shape)
        gen = torch.Generator().manual_seed(seed)
        r = self.model.recipe
        quiet = shown is None or r.train.deterministic  # a deterministic model samples in one pass
        what = f"{shown} ({n} sample{'s' * (n != 1)})"
        with Progress(what, steps or r.diffusion.sampling_steps, quiet=quiet) as bar:
            pred = self.model.sample(cams, cond_b, steps=steps, guidance=guidance, generator=gen, progress=bar.callback())
        return Result(self, pred.scene, ((pred.x0 + 1) / 2).clamp(0, 1).cpu(), cams.to("cpu"), progress=shown is not None)
