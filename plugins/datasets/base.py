"""Deprecated path: the dataset slot's contract moved to :mod:`vsd.core.contracts.dataset`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

from ...core.contracts.dataset import SPLIT_SEEDS, SPLITS, SceneInfo, ViewsetDataset  # noqa: F401  (re-exported)
from ...core.contracts import warn_moved
from ...core.settings import Plugin  # noqa: F401  (re-exported)

warn_moved("vsd.plugins.datasets.base", "vsd.core.contracts.dataset")
