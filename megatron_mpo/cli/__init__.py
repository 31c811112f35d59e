"""``megatron-mpo``: the installed command, one subcommand per step of the flow.

    megatron-mpo convert --hf hf/InternVL2-1B --config run.yaml
    megatron-mpo shards --meta data/my-pairs/meta.json --config run.yaml
    torchrun --nproc-per-node 8 --no-python megatron-mpo train --config run.yaml
    python -m megatron_mpo.cli train --config run.yaml      # the same, without the installed script

Each subcommand is the ``main(argv, prog)`` of the module that owns the step, imported only
when it runs (``megatron-mpo --help`` and one step's ``--help`` stay quick); ``tools/*.py``
wrap the same functions. Helper processes that dist_checkpointing or loaders spawn
re-import the console script, which imports this package: :func:`setup_console` runs here
so they filter the same notices.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, NamedTuple, Optional

from megatron_mpo.console import exit_on_user_error, setup_console
from megatron_mpo.errors import UserError

__all__ = ["COMMANDS", "PROG", "main", "usage", "as_tool"]

PROG = "megatron-mpo"
setup_console()


class Command(NamedTuple):
    target: str  # "module:function", called as function(argv, prog=...)
    summary: str


# In the order of the flow (README, "Quick start").
COMMANDS: dict[str, Command] = {
    "demo": Command("megatron_mpo.demo:main", "the paper's loop on a tiny InternVL on the CPU, nothing to download"),
    "convert": Command("megatron_mpo.cli.convert:hf_to_megatron",
                       "Hugging Face InternVL -> Megatron model dir (model.init)"),
    "init": Command("megatron_mpo.cli.init_model:main", "a randomly initialised preset as a Megatron model dir"),
    "shards": Command("megatron_mpo.cli.shards:main",
                      "MMPR-style preference pairs -> WebDataset shards (data.shards)"),
    "lengths": Command("megatron_mpo.training.length_check:main",
                       "token lengths of the pairs and what data.max_length drops or cuts"),
    "plan": Command("megatron_mpo.plan.cli:main", "memory and time of a run on N GPUs; layouts that fit"),
    "reference": Command("megatron_mpo.cli.reference:main",
                         "the initial model's reference log-probs (data.ref_logps, eval.ref_logps)"),
    "train": Command("megatron_mpo.train:main", "MPO training (resumes from checkpoint.save)"),
    "evaluate": Command("megatron_mpo.evaluate:main", "held-out preference and answer accuracy of a checkpoint"),
    "plot": Command("megatron_mpo.cli.plot:main", "training curves from metrics JSONL files"),
    "export": Command("megatron_mpo.cli.convert:megatron_to_hf",
                      "Megatron model dir or training checkpoint -> Hugging Face directory"),
    "sample": Command("megatron_mpo.generation.cli:sample_main",
                      "your model's answers to a question set (your own pairs, step 1)"),
    "pairs": Command("megatron_mpo.generation.cli:pairs_main",
                     "score the answers, write MMPR preference pairs (your own pairs, step 2)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [--help] [--config FILE] [options] [section.key=value ...]", "",
             "MPO training of InternVL on megatron-core, step by step:", ""]
    lines += [f"  {name.ljust(width)}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"'{PROG} COMMAND --help' shows a command's options. Several processes (GPUs):",
              f"  torchrun --nproc-per-node N --no-python {PROG} train --config run.yaml"]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    """Run ``argv[0]`` with the rest of ``argv``; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} ({PROG} --help)")
    module, function = COMMANDS[name].target.split(":")
    result = getattr(importlib.import_module(module), function)(rest, prog=f"{PROG} {name}")
    return result if type(result) is int else 0


def as_tool(name: str) -> Callable[[Optional[list[str]]], int]:
    """``main(argv)`` of one command, for the ``tools/*.py`` files that keep old command lines working."""

    def tool_main(argv: Optional[list[str]] = None) -> int:
        return main([name, *(sys.argv[1:] if argv is None else argv)])

    return tool_main
