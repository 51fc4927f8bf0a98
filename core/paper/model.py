"""The paper's whole denoiser pass: the original's ``VoxelReconstructor.forward`` in vsd's terms.

From a viewset (images, cameras, per-view timesteps, self-conditioning) to the x0 renders, as the
original computes them: pose embedding, 2D features, unprojection, 3D U-Net with attention over
views, voxel heads, post-activated rendering, compositing over the background. Built from the
original's experiment config (its ``model``, ``render`` and ``data`` sections, as a dict); a key
or value vsd cannot reproduce raises :class:`OriginalCheckpointError` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cameras import Cameras
from .config import PaperNetworkConfig
from .convert import OriginalCheckpointError, convert_original_state_dict
from .geometry import PaperCameras, PaperVolume, as_paper_cameras, pose_embedding, unproject_paper
from .network import PaperVoxelNetwork
from .render import PaperRender, PaperRenderSettings, render_paper

_MISSING = object()
# the original's configs/default_config.yaml, for keys a partial config leaves out (the arch and dataset
# configs' keys have no default: a config without them is refused, naming the key)
_DEFAULTS: dict[str, Any] = {
    "model.n_heads": 1, "render.aspect_ratio": 1, "render.fov": 15.0, "render.max_depth": 6.5, "render.min_depth": 3.5,
    "render.n_pts_per_ray": 50, "render.n_pts_per_ray_fine": 0, "render.stratified_sampling": False,
    "render.volume_extent_world": 1.2, "render.volume_size": 32, "render.post_activation": True,
    "render.raw_noise_std": 0.0, "render.volume_size_mults": [1.0, 1.0, 1.0],
    "render.volume_offsets": [0.0, 0.0, 0.0], "data.encode_pose": True, "data.encode_rays": True,
}
# data.normalize_pose divides the camera centre by this in the dataset code; CO3D never scales it
_POSE_SCALE = {"srn": 1.3, "minens": 5.0}
_FOV_DATASETS = ("srn", "minens")  # FoVPerspectiveCameras from render.fov; CO3D: per-view NDC intrinsics
_FOV_TOLERANCE = 1e-3  # relative disagreement allowed between given intrinsics and render.fov


@dataclass(frozen=True)
class PaperDenoiserConfig:
    """Everything :class:`PaperDenoiser` needs, read from an original experiment config by
    :meth:`from_original`.

    - ``network``: the network's shape (``model.*``, ``render.volume_size``).
    - ``volume``: the scene box (``render.volume_extent_world``, ``volume_size_mults``, ``volume_offsets``).
    - ``render``: ray sampling (``render.min_depth``, ``max_depth``, ``n_pts_per_ray(_fine)``, ...).
    - ``image_size``: ``data.input_size`` (square); the renders have this size.
    - ``dataset_type``: ``data.dataset_type``: ``srn`` / ``minens`` (FoV cameras from ``render.fov``,
      the dataset code's pose embedding) or ``co3d`` (NDC intrinsics per view, true pixel rays).
    - ``fov_deg``: ``render.fov`` for FoV datasets, else None.
    - ``origin_scale``: what the pose embedding divides camera centres by (``data.normalize_pose``).
    - ``background``: the default background in [0, 1]: white for SRN and Minens (the original's
      evaluation sets are white even when ``data.background: random`` in training), CO3D's
      ``data.white_background``.
    """

    network: PaperNetworkConfig
    volume: PaperVolume
    render: PaperRenderSettings
    image_size: int
    dataset_type: str
    fov_deg: float | None
    origin_scale: float
    background: float

    @property
    def pose_style(self) -> str:
        """:func:`pose_embedding`'s ``style`` for this dataset."""
        return "ndc" if self.dataset_type == "co3d" else self.dataset_type

    @property
    def self_condition(self) -> bool:
        """Whether the network takes 3 self-conditioning channels (``model.unet.self_condition``)."""
        return self.network.image_channels == 12

    @classmethod
    def from_original(cls, config: Mapping) -> "PaperDenoiserConfig":
        """From an original experiment config (``.hydra/config.yaml`` loaded to a dict; only its
        ``model``, ``render`` and ``data`` sections are read). Raises :class:`OriginalCheckpointError`
        naming the first key whose value vsd cannot reproduce."""
        get = _Reader(config)
        get.expect("model.unet.volume_repr", "voxel", "only the voxel variant converts (the triplane "
                   "variant, configs/arch/triplane.yaml, is not implemented)")
        get.expect("model.feature_extractor_2d.use", True, "only the voxel variant with the 2D feature "
                   "extractor is implemented")
        get.expect("model.feature_extractor_2d.pass_features", "both", "only the released 'both' "
                   "(stem and deep features concatenated) is implemented")
        get.expect("model.unet.attention_aggregation", True, "only attention aggregation over views is "
                   "implemented (false means mean aggregation)")
        get.expect("model.explicit_volume", True, "only explicit density and colour heads are implemented")
        get.expect("model.input_dim", 9, "the network takes RGB and the 6 pose channels")
        get.expect("data.encode_pose", True, "the network takes the camera centre as input")
        get.expect("data.encode_rays", True, "the network takes the ray directions as input")
        get.expect("render.post_activation", True, "the original's renderer asserts post-activation")
        get.expect("render.aspect_ratio", 1, "only square images are supported")
        dataset = get.one_of("data.dataset_type", ("srn", "minens", "co3d"))
        size = get.value("data.input_size")
        square = isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
        if not (square and size[0] == size[1] and int(size[0]) > 0):
            get.refuse("data.input_size", size, "a square [S, S]")
        model_side, render_side = int(get.value("model.volume_size")), int(get.value("render.volume_size"))
        if render_side not in (model_side, 2 * model_side):
            get.refuse("render.volume_size", render_side, f"model.volume_size ({model_side}) or twice it "
                       "(the original's renderer assumes the upsampled grid has this side)")
        feature_channels = int(get.value("model.unet.input_dim"))
        if feature_channels % 16:
            get.refuse("model.unet.input_dim", feature_channels, "a multiple of 16")
        mult = tuple(int(m) for m in get.value("model.unet.channel_mult"))
        if not mult or model_side % 2 ** (len(mult) - 1):
            get.refuse("model.unet.channel_mult", list(mult), f"levels that model.volume_size ({model_side}) "
                       "halves into")
        render = _render_settings(get)
        try:
            network = PaperNetworkConfig(
                image_channels=9 + 3 * bool(get.value("model.unet.self_condition")),
                feature_channels=feature_channels,
                feature_res_blocks=int(get.value("model.feature_extractor_2d.res_blocks")),
                volume_size=model_side, render_volume_size=render_side,
                model_channels=int(get.value("model.unet.model_channels")), channel_mult=mult,
                blocks_per_res=int(get.value("model.unet.blocks_per_res")),
                attn_resolutions=tuple(int(r) for r in get.value("model.unet.attn_resolutions")),
                heads=int(get.value("model.n_heads")),
                density_init_gain=(render.max_depth - render.min_depth) / render.n_pts_per_ray)
            volume = PaperVolume(float(get.value("render.volume_extent_world")),
                                 tuple(get.value("render.volume_size_mults")),
                                 tuple(get.value("render.volume_offsets")))
        except (ValueError, TypeError) as err:
            raise OriginalCheckpointError(f"original config describes a network vsd cannot build: {err}") from None
        if dataset in _FOV_DATASETS:
            fov = float(get.value("render.fov"))
            scale = _POSE_SCALE[dataset] if get.value("data.normalize_pose") else 1.0
            background = 1.0  # SRN is always white; Minens' evaluation sets are white
        else:
            fov, scale = None, 1.0
            background = 1.0 if get.value("data.white_background") else 0.0
        return cls(network, volume, render, int(size[0]), dataset, fov, scale, background)


def _render_settings(get: "_Reader") -> PaperRenderSettings:
    try:
        return PaperRenderSettings(
            min_depth=float(get.value("render.min_depth")), max_depth=float(get.value("render.max_depth")),
            n_pts_per_ray=int(get.value("render.n_pts_per_ray")),
            n_pts_per_ray_fine=int(get.value("render.n_pts_per_ray_fine")),
            stratified_sampling=bool(get.value("render.stratified_sampling")),
            raw_noise_std=float(get.value("render.raw_noise_std")))
    except ValueError as err:
        raise OriginalCheckpointError(f"original config `render`: {err}") from None


class _Reader:
    """Dotted-key access to a nested config dict, with the original's defaults and errors naming keys."""

    def __init__(self, config: Mapping):
        if not isinstance(config, Mapping):
            raise OriginalCheckpointError(f"original config must be a mapping, got {type(config).__name__}")
        self.config = config

    def value(self, key: str):
        node: Any = self.config
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
            if node is _MISSING:
                if key in _DEFAULTS:
                    return _DEFAULTS[key]
                raise OriginalCheckpointError(f"original config lacks `{key}`, which the paper network needs")
        return node

    def refuse(self, key: str, value, expected: str):
        raise OriginalCheckpointError(f"original config key `{key}` = {value!r} is not supported: expected {expected}")

    def expect(self, key: str, wanted, why: str):
        value = self.value(key)
        if value != wanted:
            self.refuse(key, value, f"{wanted!r} ({why})")

    def one_of(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.value(key)
        if value not in allowed:
            self.refuse(key, value, "one of " + ", ".join(allowed))
        return value


class PaperDenoiser(nn.Module):
    """The original's ``VoxelReconstructor`` (voxel variant): a :class:`PaperVoxelNetwork` plus the
    scene, camera and rendering settings it was trained with.

    ``denoiser(images, cameras, timesteps, self_condition, render_cameras)`` -> x0 renders
    ``(B, R, 3, S, S)`` in [-1, 1]. In training mode (``.train()``) the coarse ray samples are
    stratified when ``render.stratified_sampling`` is set and ``render.raw_noise_std`` noise is
    added, as in the original; the importance samples are random in both modes (pass
    ``generator`` to draw them from it, or ``det_fine=True`` for deterministic ones).
    """

    def __init__(self, config: PaperDenoiserConfig):
        super().__init__()
        self.config = config
        self.network = PaperVoxelNetwork(config.network)

    @classmethod
    def from_original_config(cls, config: Mapping) -> "PaperDenoiser":
        """A randomly initialised denoiser for an original experiment config."""
        return cls(PaperDenoiserConfig.from_original(config))

    @classmethod
    def from_original_checkpoint(cls, config: Mapping, state_dict: Mapping[str, Tensor]) -> "PaperDenoiser":
        """The denoiser of a released experiment: ``config`` its ``.hydra/config.yaml`` as a dict,
        ``state_dict`` the ``"diffuser"`` entry of its ``model.pth``. Weights that do not fit the
        config raise :class:`OriginalCheckpointError` naming the keys."""
        model = cls.from_original_config(config)
        model.network.load_state_dict(convert_original_state_dict(state_dict, model.config.network), strict=True)
        return model

    # ---- cameras ----------------------------------------------------------------------------
    def paper_cameras(self, cameras: Cameras | PaperCameras) -> PaperCameras:
        """``cameras`` as the original builds them: for SRN and Minens a FoV camera of
        ``render.fov`` with the given pose (the intrinsics given must agree with it, else
        ValueError); for CO3D the given NDC intrinsics."""
        cams = as_paper_cameras(cameras)
        fov = self.config.fov_deg
        if fov is None:
            return cams
        f = 1.0 / math.tan(math.radians(fov) / 2)
        if ((cams.focal - f).abs() > _FOV_TOLERANCE * f).any() or (cams.principal.abs() > _FOV_TOLERANCE).any():
            raise ValueError(f"cameras disagree with the model's render.fov = {fov} deg (centred principal "
                             f"point, NDC focal {f:.5g}); the original always renders at that field of view")
        return PaperCameras.from_fov(cams.R, cams.T, fov)

    # ---- the pass ---------------------------------------------------------------------------
    def input_images(self, images: Tensor, cameras: PaperCameras, self_condition: Tensor | None,
                     clean: Tensor | None) -> Tensor:
        """The network's per-view input ``(B, V, 9 or 12, S, S)``: RGB, pose embedding, then
        (with self-conditioning) the self-conditioning RGB, which for ``clean`` views is the view
        itself, as in the original (which feeds its clean views' own images there)."""
        c = self.config
        parts = [images, pose_embedding(cameras, c.image_size, c.pose_style, c.origin_scale).to(images)]
        if c.self_condition:
            sc = torch.zeros_like(images) if self_condition is None else self_condition.to(images)
            if sc.shape != images.shape:
                raise ValueError(f"self_condition {tuple(sc.shape)} must have the images' shape {tuple(images.shape)}")
            if clean is not None:
                sc = torch.where(clean.to(torch.bool)[..., None, None, None], images, sc)
            parts.append(sc)
        elif self_condition is not None:
            raise ValueError("this model has no self-conditioning (model.unet.self_condition: false)")
        return torch.cat(parts, dim=2)

    def reconstruct(self, images: Tensor, cameras: Cameras | PaperCameras, timesteps: Tensor,
                    self_condition: Tensor | None = None, clean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw voxel volumes of a viewset: ``(density: (B, 1, R, R, R), color: (B, 3, R, R, R))``.

        ``images: (B, V, 3, S, S)`` in [-1, 1]; ``cameras`` of shape ``(B, V)``; ``timesteps: (B, V)``
        (0 for clean views) or ``(B,)`` (all views); ``self_condition: (B, V, 3, S, S)`` or None (zeros);
        ``clean: (B, V)`` bool or None: views whose self-conditioning channel is their own image.
        """
        b, v, ch, h, w = images.shape
        if ch != 3 or h != w or h != self.config.image_size:
            raise ValueError(f"images must be (B, V, 3, {self.config.image_size}, {self.config.image_size}) "
                             f"(data.input_size), got {tuple(images.shape)}")
        cams = self.paper_cameras(cameras)
        if tuple(cams.T.shape[:-1]) != (b, v):
            raise ValueError(f"cameras of shape {tuple(cams.T.shape[:-1])} for {b} x {v} views")
        timesteps = torch.as_tensor(timesteps, device=images.device)
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(b, v)
        if tuple(timesteps.shape) != (b, v):
            raise ValueError(f"timesteps must be (B, V) = ({b}, {v}) or (B,), got {tuple(timesteps.shape)}")
        x = self.input_images(images, cams, self_condition, clean)
        features = self.network.encode_views(x, timesteps)
        volumes = unproject_paper(features, cams, self.config.volume, self.config.network.volume_size)
        return self.network(volumes, timesteps)

    def render(self, density: Tensor, color: Tensor, cameras: Cameras | PaperCameras,
               background: Tensor | float | None = None, generator: torch.Generator | None = None,
               det_fine: bool = False) -> PaperRender:
        """Render raw volumes at ``cameras (B, R)``, ``S x S`` pixels, composited over ``background``
        (in [0, 1], broadcastable to ``(B, R, 3, S, S)``; default the dataset's)."""
        c = self.config
        return render_paper(density, color, self.paper_cameras(cameras), c.volume, c.render, c.image_size,
                            background=c.background if background is None else background,
                            training=self.training, generator=generator, det_fine=det_fine)

    def forward(self, images: Tensor, cameras: Cameras | PaperCameras, timesteps: Tensor,
                self_condition: Tensor | None = None, render_cameras: Cameras | PaperCameras | None = None,
                clean: Tensor | None = None, background: Tensor | float | None = None,
                generator: torch.Generator | None = None, det_fine: bool = False) -> Tensor:
        """x0 renders ``(B, R, 3, S, S)`` in [-1, 1] at ``render_cameras`` (default ``cameras``).
        Arguments as :meth:`reconstruct` and :meth:`render`."""
        density, color = self.reconstruct(images, cameras, timesteps, self_condition, clean)
        targets = cameras if render_cameras is None else render_cameras
        return self.render(density, color, targets, background, generator, det_fine).rgb


__all__ = ["PaperDenoiser", "PaperDenoiserConfig"]
