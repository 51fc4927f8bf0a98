"""vsd-gaussian-blobs: a third-party vsd representation made of coloured Gaussian blobs."""

from .blobs import BlobField, GaussianBlobs

__all__ = ["BlobField", "GaussianBlobs"]
__version__ = "0.1.0"
