"""Errors a user can fix: a config key, a path, data that does not fit.

The recipes raise these (or turn the library's validation errors into them, see `bad_input`);
`unimodal.cli.run_recipe`, which runs every recipe from the command line, prints them as
``<prog>: error: <message>`` and exits with status 2, as argparse does for a bad flag. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input; the message says what to change. A ``ValueError``, so callers that catch
    ``ValueError`` (and tests that expect one) keep working."""


class MissingInputError(UserError, FileNotFoundError):
    """A config file, data folder or model the user named does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder exists and the recipe would overwrite it."""


@contextmanager
def bad_input(what: str | None = None) -> Iterator[None]:
    """Re-raise a ``ValueError`` raised inside as a `UserError` (its message prefixed with ``what``,
    e.g. the config section). Wrap only code whose ``ValueError`` means bad input (a config's
    checks, a data check), so real bugs elsewhere keep their traceback."""
    try:
        yield
    except UserError:
        raise
    except ValueError as error:
        raise UserError(f"{what}: {error}" if what else str(error)) from error
