"""Every plugin slot's contract in one place: the base class a plugin subclasses, the objects
that pass between slots, and the hooks that register plugins.

- encoder: :class:`Encoder` (``encoder.py``), registered by the hook ``vsd_encoders``;
- aggregator: :class:`Aggregator` (``aggregator.py``), hook ``vsd_aggregators``;
- representation: :class:`Representation` (``representation.py``), hook ``vsd_representations``;
- renderer: :class:`Renderer` (``renderer.py``), hook ``vsd_renderers``;
- dataset: :class:`ViewsetDataset` (``dataset.py``), hook ``vsd_datasets``.

Exchange objects: :class:`Field` and :class:`Mesh` (what a representation returns and a renderer
draws), :class:`RenderOutput` (what a renderer returns), :class:`SceneInfo` (what a dataset tells
the engine about its scenes), :class:`~vsd.core.cameras.Cameras`. The hook specifications are
in :mod:`vsd.core.hookspecs`; a plugin marks its hooks with :data:`hookimpl`.
"""

from ..cameras import Cameras
from ..hookspecs import SLOTS, hookimpl
from .aggregator import Aggregator
from .dataset import SPLIT_SEEDS, SPLITS, SceneInfo, ViewsetDataset
from .encoder import Encoder
from .renderer import Renderer, RenderOutput
from .representation import Field, Mesh, Representation

__all__ = [
    "Aggregator", "Cameras", "Encoder", "Field", "Mesh", "Renderer", "RenderOutput", "Representation",
    "SLOTS", "SPLIT_SEEDS", "SPLITS", "SceneInfo", "ViewsetDataset", "hookimpl",
]


def warn_moved(old: str, new: str) -> None:
    """The warning of a deprecated contract path (``old`` re-exports ``new``)."""
    import warnings

    warnings.warn(f"{old} moved to {new}; this path will be removed in the next release", DeprecationWarning, stacklevel=3)
