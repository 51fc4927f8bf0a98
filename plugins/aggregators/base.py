"""Deprecated path: the aggregator slot's contract moved to :mod:`vsd.core.contracts.aggregator`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

from ...core.contracts.aggregator import Aggregator  # noqa: F401  (re-exported)
from ...core.contracts import warn_moved
from ...core.settings import Plugin  # noqa: F401  (re-exported)

warn_moved("vsd.plugins.aggregators.base", "vsd.core.contracts.aggregator")
