"""vsd's built-in plugins, registered through the same hooks as third-party ones."""

from __future__ import annotations

from ..core.hookspecs import hookimpl


@hookimpl
def vsd_encoders():
    from .encoders.conv import ConvEncoder

    return {"conv": ConvEncoder}


@hookimpl
def vsd_aggregators():
    from .aggregators.attention import AttentionAggregator
    from .aggregators.pooling import MaxAggregator, MeanAggregator
    from .aggregators.weighted import WeightedMeanAggregator

    return {
        "attention": AttentionAggregator,
        "mean": MeanAggregator,
        "max": MaxAggregator,
        "weighted-mean": WeightedMeanAggregator,
    }


@hookimpl
def vsd_representations():
    from ..representations.dmtet import DMTet
    from ..representations.hash_grid import HashGrid
    from ..representations.triplane import Triplane
    from ..representations.voxel_grid import VoxelGrid

    return {"voxel-grid": VoxelGrid, "triplane": Triplane, "hash-grid": HashGrid, "dmtet": DMTet}


@hookimpl
def vsd_renderers():
    from ..renderers.rasterizer import MeshRasterizer
    from ..renderers.volume import VolumeRenderer

    return {"volume": VolumeRenderer, "rasterizer": MeshRasterizer}


@hookimpl
def vsd_datasets():
    from .datasets.co3d import CO3DDataset
    from .datasets.minens import MinensDataset
    from .datasets.srn import SRNDataset

    return {"minens": MinensDataset, "srn": SRNDataset, "co3d": CO3DDataset}
