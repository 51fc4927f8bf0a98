"""Deprecated path: the encoder slot's contract moved to :mod:`vsd.core.contracts.encoder`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

import warnings

from ...core.contracts.encoder import Encoder  # noqa: F401  (re-exported)
from ...core.settings import Plugin  # noqa: F401  (re-exported)

warnings.warn(
    "vsd.plugins.encoders.base moved to vsd.core.contracts.encoder; this path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
