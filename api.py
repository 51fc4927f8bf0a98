"""The Python API: reconstruct an object from one image, or generate one, in three lines.

    import vsd
    pipe = vsd.load("minens-voxel")                   # a shipped name, a run directory or a .pt file
    result = pipe.reconstruct("examples/inputs/minens_0.png", num_samples=4)
    result.turntable("turntable.gif"); result.export_mesh("object.glb")

The ``vsd-run sample`` and ``vsd-run export`` commands call this same API. :class:`Pipeline` and
:class:`Result` live in :mod:`vsd.apps.pipeline`, the shipped models in :mod:`vsd.apps.pretrained`.

``reconstruct`` and ``generate`` show the sampler's progress on stderr (a bar on a terminal, a
line every 30 s elsewhere, ``$VSD_PROGRESS_INTERVAL`` seconds if set), and so does rendering a
turntable of their result; pass ``progress=False`` for none.
"""

from __future__ import annotations

from pathlib import Path

from .apps.pipeline import Pipeline, Result  # noqa: F401  (re-exported)
from .apps.pretrained import PRETRAINED_DIR, heldout  # noqa: F401  (re-exported)
from .apps.pretrained import names as pretrained_names  # noqa: F401


def load(path_or_name: str | Path, device: str = "auto", ema: bool = True) -> Pipeline:
    """A :class:`Pipeline` from a checkpoint file, a run directory (its newest intact
    checkpoint), the name of a shipped or imported model (``vsd-run import``), or a released
    original experiment's folder (converted in memory); EMA weights by default. A model trained for
    fewer than 1,000 steps is loaded with a note on stderr: its samples look like noise."""
    from .apps.sampling import load_model

    return Pipeline(load_model(path_or_name, device=device, ema=ema, notice=True))
