"""Deprecated path: the renderer slot's contract moved to :mod:`vsd.core.contracts.renderer`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

from ..core.contracts.renderer import Cameras, Renderer, RenderOutput  # noqa: F401  (re-exported)
from ..core.contracts import warn_moved
from ..core.settings import Plugin  # noqa: F401  (re-exported)

warn_moved("vsd.renderers.base", "vsd.core.contracts.renderer")
