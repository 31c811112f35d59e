"""User-facing errors.

Anything a user can cause (bad config, bad input files, an option the machine cannot
run) raises :class:`UserError`. Entry points catch it and print its one-line message
instead of a traceback (see :func:`exit_on_user_error`).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """An error the user can fix; its message is one line saying what and how."""


def exit_on_user_error(main: F) -> F:
    """Decorate an entry point so a UserError prints `error: <message>` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
