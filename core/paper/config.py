"""The numbers that shape the paper's voxel network (the original's ``model`` config, in vsd's words)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperNetworkConfig:
    """Shape of the paper's network; the defaults are the released voxel models' (``up_3d_conv``).

    Original config key for each field:

    - ``image_channels``: ``model.input_dim`` (+3 with ``model.unet.self_condition``): 12.
    - ``feature_channels``: ``model.unet.input_dim``, the width of the unprojected features: 64.
    - ``feature_res_blocks``: ``model.feature_extractor_2d.res_blocks``: 2.
    - ``volume_size``: ``model.volume_size``, the U-Net's side: 32.
    - ``render_volume_size``: ``render.volume_size``; twice ``volume_size`` adds the x2 upsampler.
    - ``model_channels``, ``channel_mult``, ``blocks_per_res``, ``attn_resolutions``:
      ``model.unet.*`` of the same names.
    - ``heads``: ``model.n_heads``, heads of the view aggregation (1; not visible in the weights).
    - ``density_init_gain``: ``(render.max_depth - render.min_depth) / render.n_pts_per_ray``;
      when set, the density head starts as the original's does (only matters for training).
    """

    image_channels: int = 12
    feature_channels: int = 64
    feature_res_blocks: int = 2
    volume_size: int = 32
    render_volume_size: int = 64
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    blocks_per_res: int = 2
    attn_resolutions: tuple[int, ...] = (16, 8, 4)
    heads: int = 1
    density_init_gain: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        levels = len(self.channel_mult)
        if levels < 1 or self.blocks_per_res < 1:
            raise ValueError("the paper's U-Net needs at least one level and one block per level")
        if self.volume_size % 2 ** (levels - 1):
            raise ValueError(f"volume_size {self.volume_size} does not halve {levels - 1} times")
        if self.render_volume_size not in (self.volume_size, 2 * self.volume_size):
            raise ValueError(f"render_volume_size must be volume_size ({self.volume_size}) or twice it, "
                             f"got {self.render_volume_size}")
        if self.feature_channels % 16:
            raise ValueError(f"feature_channels must be a multiple of 16 (GroupNorm(8) on each half), "
                             f"got {self.feature_channels}")

    @property
    def sides(self) -> list[int]:
        """Side of the volume at each U-Net level, finest first (the last level does not halve)."""
        return [self.volume_size // 2**i for i in range(len(self.channel_mult))]

    @property
    def widths(self) -> list[int]:
        """Channels entering each level, then the bottleneck's: ``[C, C*m0, C*m1, ...]``."""
        return [self.model_channels, *(self.model_channels * m for m in self.channel_mult)]
