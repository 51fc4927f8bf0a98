"""Errors a user can act on. The CLI prints them as one paragraph and exits non-zero."""

from __future__ import annotations


class VsdNotice(UserWarning):
    """Something the user must know that is not an error (e.g. a damaged newest checkpoint
    skipped for an older one): ``vsd-run`` shows it as one ``warning:`` line, where other
    Python warnings go to a log file."""


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


class RunLockedError(VsdError):
    """A run or output folder that another live process is writing to: names the folder, the
    process holding it and since when, and what to do."""

    exit_code = 2


def short(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (with "…" and the full length) when longer:
    messages quote user values, and a user value may be megabytes long."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. an integer too long to print
        return f"<{type(value).__name__} that cannot be shown>"
    return clip(text, limit)


def clip(text: str, limit: int = 80) -> str:
    """``text`` itself, or its first ``limit`` characters, "…" and its length."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"
