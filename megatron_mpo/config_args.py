"""The run config on a command line: ``--config FILE`` plus ``section.key=value`` overrides.

Steps that run on the config (reference, train, lengths) take it whole
(:func:`run_config_parser`). Steps that take flags (convert, shards, export, evaluate, ...)
read named keys of the same config as their flags' defaults (:func:`parse_with_config`):
``megatron-mpo convert --hf DIR --config run.yaml`` writes the model dir the run's
``model.init`` names, so the paths of a flow live in one file. A flag given on the command
line wins; a key the config leaves unset falls back to the flag's own default. One config
system: the keys are read with :func:`megatron_mpo.config.read_config`.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Optional

from megatron_mpo.errors import UserError

__all__ = ["run_config_parser", "print_config_if_asked", "add_config_keys", "parse_with_config", "config_value"]


def run_config_parser(prog: Optional[str], description: str) -> argparse.ArgumentParser:
    """A parser for a step that runs on the whole config: --config, --print-config, overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults included) with a help line per key, then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


def print_config_if_asked(args: argparse.Namespace) -> bool:
    """``--print-config``: the resolved YAML with help (keys and types checked, a config still
    being written prints too); True when printed."""
    if not args.print_config:
        return False
    from megatron_mpo.config import read_config
    from megatron_mpo.config_docs import config_yaml

    print(config_yaml(read_config(args.config, args.overrides)), end="")
    return True


def add_config_keys(parser: argparse.ArgumentParser, keys: Mapping[str, str]) -> None:
    """--config and overrides on a flag-driven parser; ``keys`` maps an option's dest to the
    config key that is its default (each option's help names its key)."""
    flags = _options(parser, keys)
    for dest, key in keys.items():
        action = flags[dest]
        action.help = f"{action.help or ''} (--config: {key})".strip()
    named = ", ".join(f"{flags[dest].option_strings[-1]} from {key}" for dest, key in keys.items())
    parser.add_argument("--config", help=f"run config YAML whose keys are the defaults of flags not given: {named}")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[list[str]],
                      keys: Mapping[str, str]) -> argparse.Namespace:
    """Parse ``argv``; options of ``keys`` left out take the config's value, else their own
    default. A required option left out needs its key set (UserError naming both)."""
    from megatron_mpo.config import read_config

    flags = _options(parser, keys)
    own = {dest: (action.default, action.required) for dest, action in flags.items()}
    for action in flags.values():
        action.default, action.required = None, False
    try:
        args = parser.parse_args(argv)
    finally:
        for dest, action in flags.items():
            action.default, action.required = own[dest]
    cfg = read_config(args.config, args.overrides) if args.config or args.overrides else None
    for dest, key in keys.items():
        if getattr(args, dest) is not None:
            continue
        value = config_value(cfg, key) if cfg is not None else None
        default, required = own[dest]
        if value is None and required:
            raise UserError(f"give {flags[dest].option_strings[-1]}, or --config with {key} set")
        setattr(args, dest, value if value is not None else default)
    return args


def config_value(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` (e.g. ``data.shards``) in a RunConfig."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _options(parser: argparse.ArgumentParser, keys: Mapping[str, str]) -> dict:
    """The parser's option actions named by ``keys`` (a key naming no option is a bug here)."""
    found = {action.dest: action for action in parser._actions if action.dest in keys and action.option_strings}
    missing = set(keys) - set(found)
    if missing:
        raise ValueError(f"no option for {sorted(missing)}")
    return found
