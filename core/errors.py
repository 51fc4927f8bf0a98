"""Errors a user can act on. The CLI prints them as one paragraph and exits non-zero."""

from __future__ import annotations


class VsdError(Exception):
    """Base class of errors caused by input (recipes, files, plugins), not by bugs."""

    exit_code = 1


class RecipeError(VsdError):
    """A recipe that cannot be used: names the file, the key path, what was expected and given."""

    exit_code = 2

    def __init__(self, source: str | None, key: str | None, message: str):
        self.source, self.key, self.detail = source, key, message
        where = f"recipe {source}" if source else "recipe"
        if key:
            where += f", key `{key}`"
        super().__init__(f"{where}: {message}")


class PluginError(VsdError):
    """A plugin that cannot be found, loaded or registered."""

    exit_code = 2


class DataError(VsdError):
    """Data on disk that is missing or malformed: names the file."""

    exit_code = 2
