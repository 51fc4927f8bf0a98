"""vsd: Viewset Diffusion as a modular engine.

3D generative models trained from posed 2D images. The denoiser lifts a set of noisy views into
a 3D representation and renders it back at the same cameras; every swappable part (encoder,
aggregator, representation, renderer, dataset) is a plugin chosen by name in a YAML recipe.
"""

__version__ = "0.1.0"


def load(path_or_name, device: str = "auto", ema: bool = True):
    """A sampling pipeline from a checkpoint, run directory or shipped model name; see :mod:`vsd.api`."""
    from .api import load as _load

    return _load(path_or_name, device=device, ema=ema)
