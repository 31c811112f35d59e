"""User-facing errors.

Anything a user can cause (bad config, bad input files, an option the machine cannot
run) raises :class:`UserError`. Entry points catch it and print its one-line message
instead of a traceback (see :func:`megatron_mpo.console.exit_on_user_error`). The bottom
floor of the package: it imports nothing of it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one line saying what and how."""
