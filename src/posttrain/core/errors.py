"""The one error family a command line reports as a message alone, without a traceback."""

from __future__ import annotations


class InputError(Exception):
    """A problem with what the user gave (a params file, a data file, a checkpoint), not a bug.

    The message names the file, key or row and says what to change; `posttrain.core.runtime.exit_status`
    prints it alone and exits 1, since a traceback would only bury it. Subclasses also derive from the builtin
    error they replace (ValueError, FileNotFoundError, ...), so existing ``except`` clauses keep catching
    them.
    """


class DataError(InputError, ValueError):
    """A data file that cannot be used as it is: the message names the file (and row) and the fix."""


class MissingInputError(InputError, FileNotFoundError):
    """An input this pipeline writes is missing: the message names the stage that writes it."""
