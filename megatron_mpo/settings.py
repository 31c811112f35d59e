"""How a config key is declared and checked: :func:`setting` and the small shared checks.

A bottom floor (it imports only :mod:`megatron_mpo.errors`), so each component declares
its own section -- ``data.config.DataConfig`` is the ``data`` section, ``loss_config``'s
``MPOLossConfig`` the ``mpo`` section -- without importing ``megatron_mpo.config``, which
assembles the sections into the run config and sits above them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Callable, Optional, Union

from megatron_mpo.errors import UserError

__all__ = ["Choices", "setting", "allowed", "positive", "below_one", "one_of"]

Choices = Union[tuple, Callable[[], tuple]]


def setting(default: Any = None, text: str = "", *, choices: Optional[Choices] = None,
            required: Union[bool, str] = False, factory: Optional[Callable[[], Any]] = None) -> Any:
    """A config key with its one-line help: the one place keys are documented, read by
    ``--print-config`` and the README table. ``choices`` (a tuple, or a function returning
    the names another module validates) are also what validation accepts; ``required`` is
    True or the key that may stand in for this one."""
    metadata = {"help": text, "choices": choices, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def allowed(section: Any, name: str) -> tuple:
    """The allowed values of ``section.name`` (a section class or instance); () if free."""
    choices = next(f for f in dataclasses.fields(section) if f.name == name).metadata.get("choices")
    return tuple(choices() if callable(choices) else choices or ())


def positive(name: str, value: Any) -> None:
    """Refuse a key whose value is not above 0."""
    if value is None or value <= 0:
        raise UserError(f"{name} must be a positive number, got {value!r}")


def below_one(name: str, value: Any) -> None:
    """Refuse a key whose value is not in [0, 1) (a rate or a fraction)."""
    if value is None or not 0 <= value < 1:
        raise UserError(f"{name} must be in [0, 1), got {value!r}")


def one_of(name: str, value: Any, choices: tuple) -> None:
    """Refuse a value outside ``choices``, listing them."""
    if value not in choices:
        raise UserError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
