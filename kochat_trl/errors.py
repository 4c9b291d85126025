"""User-facing errors: the CLI and recipes print them on one line and exit with code 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class KochatError(Exception):
    """A problem with the user's input (data, config, paths): message names the place and the fix."""


class DataError(KochatError):
    """A data file that cannot be read as any supported layout."""


class ConfigError(KochatError):
    """A configuration value that is missing, of the wrong type, or impossible."""
