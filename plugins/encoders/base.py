"""Deprecated path: the encoder slot's contract moved to :mod:`vsd.core.contracts.encoder`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

from ...core.contracts.encoder import Encoder  # noqa: F401  (re-exported)
from ...core.contracts import warn_moved
from ...core.settings import Plugin  # noqa: F401  (re-exported)

warn_moved("vsd.plugins.encoders.base", "vsd.core.contracts.encoder")
