"""The run config's documentation, generated from its one source: the ``setting(...)``
help, allowed values and required marks on the dataclass fields of megatron_mpo.config.

    python -m megatron_mpo.train --print-config [--config F] [overrides]   resolved YAML, help per key
    python -m megatron_mpo.config_docs --markdown                          the README's key table
    python -m megatron_mpo.config_docs --write-readme [README.md]          ... written between its markers

Generating both from the fields means neither can drift from what the parser accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from megatron_mpo.config import RunConfig, allowed
from megatron_mpo.console import exit_on_user_error
from megatron_mpo.errors import UserError

TABLE_START = "<!-- config-table:start -->"
TABLE_END = "<!-- config-table:end -->"
REGENERATE = "python -m megatron_mpo.config_docs --write-readme"


@dataclasses.dataclass(frozen=True)
class Key:
    """One documented entry: a section (``value`` is a dataclass) or a key."""

    name: str  # dotted, e.g. "train.lr"
    value: Any
    help: str
    choices: tuple
    required: Any  # False, True or the key that may stand in for this one
    is_list: bool


def keys(cfg: Optional[RunConfig] = None) -> Iterator[Key]:
    """Sections and keys of ``cfg`` (default: all defaults) in declaration order."""
    yield from _walk(cfg if cfg is not None else RunConfig(), "")


def _walk(section: Any, prefix: str) -> Iterator[Key]:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        text = _doc(value) if dataclasses.is_dataclass(value) else f.metadata.get("help", "")
        yield Key(f"{prefix}{f.name}", value, text, allowed(section, f.name),
                  f.metadata.get("required", False), isinstance(value, list))
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")


def _doc(section: Any) -> str:
    """A section's help: the first line of its class docstring."""
    return (type(section).__doc__ or "").strip().split("\n")[0]


def scalar(value: Any) -> str:
    """``value`` as one line of YAML that reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _unless(key: Key, code: str) -> str:
    """What lifts a requirement: another key that may be set instead."""
    return "" if key.required is True else f" unless {code}{key.required}{code} is set"


# ---- --print-config -------------------------------------------------------------------------


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, with a ``# help`` line above every key and, last, whether
    it passes the checks training runs (it need not: a config being written is shown too)."""
    lines = ["# megatron_mpo run configuration: the file, then overrides, over the defaults.",
             "# Above each key: what it sets; [a | b]: its allowed values; REQUIRED keys have no default."]
    for key in keys(cfg):
        depth = key.name.count(".")
        pad = "  " * depth
        name = key.name.rsplit(".", 1)[-1]
        if dataclasses.is_dataclass(key.value):
            lines += [""] if depth == 0 else []
            lines += [f"{pad}# {key.help}", f"{pad}{name}:"]
            continue
        note = key.help
        if key.choices:
            note += f" [{'any of ' if key.is_list else ''}{' | '.join(key.choices)}]"
        if key.required:
            note = f"REQUIRED{_unless(key, '')}: {note}"
        lines += [f"{pad}# {note}", f"{pad}{name}: {scalar(key.value)}"]
    lines += ["", f"# check: {readiness(cfg)}"]
    return "\n".join(lines) + "\n"


def missing_required(cfg: RunConfig) -> list[str]:
    """The required keys ``cfg`` leaves unset (an alternative key set instead counts)."""
    values = {key.name: key.value for key in keys(cfg)}
    missing: list[str] = []
    named: set[str] = set()
    for key in keys(cfg):
        alternative = None if key.required is True else key.required
        if not key.required or key.value is not None or key.name in named:
            continue
        if alternative is None:
            missing.append(key.name)
        elif values[alternative] is None:
            missing.append(f"{key.name} or {alternative}")
            named.add(alternative)  # one mention per pair
    return missing


def readiness(cfg: RunConfig) -> str:
    """Unset required keys, else the first problem the config checks find, else ok."""
    missing = missing_required(cfg)
    if missing:
        return f"not ready to train: set {', '.join(missing)}"
    try:
        cfg.validate()  # reads only
    except UserError as exc:
        return f"not ready to train: {exc}"
    return ("ok, this config passes the start-up checks of its settings; not checked here (they run at "
            "start): that model.init, data.shards and data.ref_logps exist and match each other, a test write "
            "into the save and log dirs, and the parallel layout against the model and the process count")


# ---- README table ---------------------------------------------------------------------------


def config_reference_markdown() -> str:
    """The Markdown table of every key: default (or required), what it sets, allowed values."""
    rows = ["| key | default | what it sets |", "|---|---|---|"]
    for key in keys():
        if dataclasses.is_dataclass(key.value):
            rows.append(f"| **`{key.name}`** | | {_cell(key.help)} |")
            continue
        default = f"**required**{_unless(key, '`')}" if key.required else f"`{scalar(key.value)}`"
        text = key.help[0].upper() + key.help[1:]
        if key.choices:
            listed = ", ".join(f"`{c}`" for c in key.choices)
            text += f". {'Any' if key.is_list else 'One'} of {listed}"
            text += " or `null`" if key.value is None and not key.required else ""
        rows.append(f"| `{key.name}` | {_cell(default)} | {_cell(text)}. |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme_table(readme: str) -> Optional[str]:
    """The text between the README's table markers, or None without them."""
    if TABLE_START not in readme or TABLE_END not in readme:
        return None
    return readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"


def write_readme(path: Path) -> bool:
    """Put the generated table between the markers of ``path``; True when it changed."""
    text = path.read_text()
    old = readme_table(text)
    if old is None:
        raise UserError(f"{path} has no {TABLE_START} ... {TABLE_END} markers around the config table")
    new = config_reference_markdown()
    if old == new:
        return False
    head, rest = text.split(TABLE_START, 1)
    path.write_text(f"{head}{TABLE_START}\n{new}{TABLE_END}{rest.split(TABLE_END, 1)[1]}")
    return True


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="megatron_mpo.config_docs", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the README's config table")
    group.add_argument("--write-readme", nargs="?", const="README.md", metavar="PATH",
                       help="write the table between the markers of PATH (default README.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(config_reference_markdown(), end="")
        return
    path = Path(args.write_readme)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    print(f"{path}: {'config table updated' if write_readme(path) else 'config table already up to date'}")


if __name__ == "__main__":
    main()
