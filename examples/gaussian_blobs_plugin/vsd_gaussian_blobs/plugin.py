"""The module named in this distribution's ``vsd`` entry point: it implements vsd's hooks."""

from vsd.core.hookspecs import hookimpl

from .blobs import GaussianBlobs


@hookimpl
def vsd_representations():
    """Registry name -> class; vsd checks that the class subclasses ``Representation``."""
    return {"gaussian-blobs": GaussianBlobs}
