"""Deprecated path: the renderer slot's contract moved to :mod:`vsd.core.contracts.renderer`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

import warnings

from ..core.contracts.renderer import Cameras, Renderer, RenderOutput  # noqa: F401  (re-exported)
from ..core.settings import Plugin  # noqa: F401  (re-exported)

warnings.warn(
    "vsd.renderers.base moved to vsd.core.contracts.renderer; this path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
