"""Renderer slot: draw a representation's output at a batch of cameras."""

from __future__ import annotations

from typing import ClassVar, TypedDict

from torch import Tensor, nn

from ..cameras import Cameras
from ..settings import Plugin


class RenderOutput(TypedDict):
    rgb: Tensor  # (B, V, 3, H, W) in [0, 1], composited over the background
    depth: Tensor  # (B, V, 1, H, W) expected ray distance of the surface (0 where empty)
    opacity: Tensor  # (B, V, 1, H, W) in [0, 1]


class Renderer(Plugin, nn.Module):
    """Render scenes at cameras.

    Constructed as ``cls(settings)``. ``accepts`` names the representation kinds it draws.

    ``forward(scene, cameras, background)``:
        scene: what a representation returned for B objects (a Field, or a list of B Meshes).
        cameras: Cameras of shape (B, V).
        background: (B, 3) or (3,) colour in [0, 1] behind the object.
        returns a :class:`RenderOutput`.
    """

    accepts: ClassVar[tuple[str, ...]] = ("field",)

    def __init__(self, settings):
        nn.Module.__init__(self)
        self.settings = settings

    def forward(self, scene, cameras: Cameras, background: Tensor) -> RenderOutput:  # pragma: no cover
        raise NotImplementedError
