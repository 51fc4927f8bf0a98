"""Errors a user can act on. The CLI prints them as one paragraph and exits non-zero."""

from __future__ import annotations


class VsdError(Exception):
    """Base class of errors caused by input (recipes, files, plugins), not by bugs."""

    exit_code = 1


class RecipeError(VsdError):
    """A recipe that cannot be used: names the file, the key path, what was expected and given."""

    exit_code = 2

    def __init__(self, source: str | None, key: str | None, message: str, override: str | None = None):
        self.source, self.key, self.detail, self.override = source, key, message, override
        if override:  # the bad value came from the command line, not from the file
            where = f"command-line override `{override}`" + (f" (on recipe {source})" if source else "")
        else:
            where = f"recipe {source}" if source else "recipe"
        if key:
            where += f", key `{key}`"
        super().__init__(f"{where}: {message}")

    def from_override(self, override: str) -> "RecipeError":
        """The same error, attributed to the command-line override that set the bad key."""
        return RecipeError(self.source, self.key, self.detail, override=override)


class PluginError(VsdError):
    """A plugin that cannot be found, loaded or registered."""

    exit_code = 2


class DataError(VsdError):
    """Data on disk that is missing or malformed: names the file."""

    exit_code = 2


class EmptyMeshError(VsdError):
    """An export that would write a mesh without a surface: nothing is written."""

    exit_code = 2
