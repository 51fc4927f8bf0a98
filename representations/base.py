"""Deprecated path: the representation slot's contract moved to :mod:`vsd.core.contracts.representation`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

from ..core.contracts.representation import Field, Mesh, Representation  # noqa: F401  (re-exported)
from ..core.contracts import warn_moved
from ..core.settings import Plugin  # noqa: F401  (re-exported)

warn_moved("vsd.representations.base", "vsd.core.contracts.representation")
