"""Deprecated path: the aggregator slot's contract moved to :mod:`vsd.core.contracts.aggregator`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

import warnings

from ...core.contracts.aggregator import Aggregator  # noqa: F401  (re-exported)
from ...core.settings import Plugin  # noqa: F401  (re-exported)

warnings.warn(
    "vsd.plugins.aggregators.base moved to vsd.core.contracts.aggregator; this path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
