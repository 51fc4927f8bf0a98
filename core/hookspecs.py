"""The vsd hook specifications: one hook per plugin slot.

A plugin is a module (or object) with functions named like these hooks, marked with
``@vsd.core.hookspecs.hookimpl``. Each hook returns a dict mapping registry names (kebab-case)
to plugin classes. Built-ins are registered through exactly these hooks; third-party packages
register a module in the ``vsd`` entry-point group::

    [project.entry-points.vsd]
    my_plugin = "my_package.vsd_plugin"
"""

from __future__ import annotations

import pluggy

PROJECT = "vsd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vsd_encoders() -> dict[str, type]:
    """Per-view 2D encoders: subclasses of :class:`vsd.core.contracts.Encoder`.

    Constructed as ``cls(settings, in_channels=..., time_dim=...)``; map an image with camera
    and self-conditioning channels, (N, in_channels, H, W), to features (N, C, H/s, W/s).
    """


@hookspec
def vsd_aggregators() -> dict[str, type]:
    """Multi-view aggregators: subclasses of :class:`vsd.core.contracts.Aggregator`.

    Constructed as ``cls(settings, channels=C, resolution=D)``; fuse (B, V, C, D, D, D) per-view
    volumes (and an optional (B, C, D, D, D) query) into (B, C, D, D, D), invariant to view order.
    """


@hookspec
def vsd_representations() -> dict[str, type]:
    """3D representations: subclasses of :class:`vsd.core.contracts.Representation`.

    Constructed as ``cls(settings, in_channels=C, resolution=D, bound=b)``; turn the denoiser's
    (B, C, D, D, D) feature volume into a Field or a list of Meshes; ``kind`` says which.
    """


@hookspec
def vsd_renderers() -> dict[str, type]:
    """Renderers: subclasses of :class:`vsd.core.contracts.Renderer`.

    Constructed as ``cls(settings)``; ``accepts`` lists the representation kinds they draw.
    """


@hookspec
def vsd_datasets() -> dict[str, type]:
    """Viewset datasets: subclasses of :class:`vsd.core.contracts.ViewsetDataset`.

    Constructed as ``cls(settings, split=...)``; items are dicts of images (V, 3, H, W) in
    [-1, 1], c2w (V, 4, 4) OpenCV camera-to-world and K (V, 4) intrinsics.
    """


SLOTS = {
    "encoder": "vsd_encoders",
    "aggregator": "vsd_aggregators",
    "representation": "vsd_representations",
    "renderer": "vsd_renderers",
    "dataset": "vsd_datasets",
}
