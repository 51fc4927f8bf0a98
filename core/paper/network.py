"""The paper's voxel denoiser network, less unprojection and rendering."""

from __future__ import annotations

from torch import Tensor, nn

from .config import PaperNetworkConfig
from .features import PaperFeatureExtractor2d
from .unet import PaperUNet3d


class PaperVoxelNetwork(nn.Module):
    """The original's ``VoxelReconstructor`` minus its unprojector and renderer: the 2D feature
    extractor (:meth:`encode_views`) and the 3D U-Net with its voxel heads (:meth:`forward`).

    Use: ``features = net.encode_views(images, t)``; unproject ``features`` to per-view volumes
    ``(B, V, feature_channels, D, D, D)``; ``density, color = net(volumes, t)``; render.
    """

    def __init__(self, config: PaperNetworkConfig | None = None):
        super().__init__()
        self.config = config = config or PaperNetworkConfig()
        self.features = PaperFeatureExtractor2d(config.image_channels, config.feature_channels,
                                                config.feature_res_blocks)
        self.unet = PaperUNet3d(config)

    def encode_views(self, images: Tensor, timesteps: Tensor) -> Tensor:
        """``images: (B, V, image_channels, H, W)``, ``timesteps: (B, V)`` ->
        ``(B, V, feature_channels, H/2, W/2)``. The channels are the original's input order: RGB
        in [-1, 1], the 6-channel pose embedding, then the self-conditioning RGB."""
        return self.features(images, timesteps)

    def forward(self, volumes: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``volumes: (B, V, feature_channels, D, D, D)``, ``timesteps: (B, V)`` ->
        raw ``(density: (B, 1, R, R, R), color: (B, 3, R, R, R))``."""
        return self.unet(volumes, timesteps)
