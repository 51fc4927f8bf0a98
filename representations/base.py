"""Deprecated path: the representation slot's contract moved to :mod:`vsd.core.contracts.representation`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

import warnings

from ..core.contracts.representation import Field, Mesh, Representation  # noqa: F401  (re-exported)
from ..core.settings import Plugin  # noqa: F401  (re-exported)

warnings.warn(
    "vsd.representations.base moved to vsd.core.contracts.representation; this path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
