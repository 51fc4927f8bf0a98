"""Settings schemas: every plugin declares a nested ``Settings`` model of this base."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """Base of every settings schema: unknown keys are errors, values are checked strictly, and
    every float must be finite (NaN and infinities are refused wherever a float is expected)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A random seed: torch.Generator.manual_seed takes 0 <= seed < 2**63.
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class Plugin:
    """Mixin for plugin classes: a registry name and a settings schema.

    Each plugin class sets ``Settings`` to a subclass of :class:`Settings` (with defaults for
    everything that has a sensible default) and is constructed as ``cls(settings, **context)``,
    where the context keyword arguments are fixed per slot (see each slot's contract in :mod:`vsd.core.contracts`).
    """

    Settings: type[Settings] = Settings

