"""Deprecated path: the dataset slot's contract moved to :mod:`vsd.core.contracts.dataset`.

Kept so plugins written against the old path keep importing; import from
``vsd.core.contracts`` instead.
"""

import warnings

from ...core.contracts.dataset import SPLIT_SEEDS, SPLITS, SceneInfo, ViewsetDataset  # noqa: F401  (re-exported)
from ...core.settings import Plugin  # noqa: F401  (re-exported)

warnings.warn(
    "vsd.plugins.datasets.base moved to vsd.core.contracts.dataset; this path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
