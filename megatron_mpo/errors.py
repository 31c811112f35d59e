"""User-facing errors.

Anything a user can cause (bad config, bad input files, an option the machine cannot
run) raises :class:`UserError`. Entry points catch it and print its one-line message
instead of a traceback (see :func:`exit_on_user_error`).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """An error the user can fix; its message is one line saying what and how."""


def exit_on_user_error(main: F) -> F:
    """Decorate an entry point so a UserError prints `error: <message>` and exits 2.

    Under torchrun an error every rank hits prints once (rank 0), one rank's own error with
    a ``[rank N]`` prefix, and any other exception likewise (exit 1); see
    :func:`megatron_mpo.console.report_failure`.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from megatron_mpo.console import report_failure

        try:
            return main(*args, **kwargs)
        except UserError as exc:
            raise SystemExit(report_failure(exc)) from None
        except Exception as exc:
            if "RANK" not in os.environ:
                raise  # a single process: Python's own traceback and exit code
            raise SystemExit(report_failure(exc)) from None

    return wrapper  # type: ignore[return-value]
