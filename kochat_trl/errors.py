"""User-facing errors: the CLI and recipes print them on one line and exit with code 2."""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


def print_error_line(line: str) -> None:
    """`line` to stderr in one write: under `python -u` (PYTHONUNBUFFERED) `print` writes the text and the
    newline separately, and the lines of several launched processes sharing stderr run into each other."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


class KochatError(Exception):
    """A problem with the user's input (data, config, paths): message names the place and the fix."""


class DataError(KochatError):
    """A data file that cannot be read as any supported layout."""


class ConfigError(KochatError):
    """A configuration value that is missing, of the wrong type, or impossible."""


class Stopped(Exception):
    """Work stopped on a signal after saving what it could; the process exits with `exit_code` (128 + signal)."""

    exit_code = 130
