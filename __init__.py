"""vsd: Viewset Diffusion as a modular engine.

3D generative models trained from posed 2D images. The denoiser lifts a set of noisy views into
a 3D representation and renders it back at the same cameras; every swappable part (encoder,
aggregator, representation, renderer, dataset) is a plugin chosen by name in a YAML recipe.
"""

__version__ = "0.1.0"
