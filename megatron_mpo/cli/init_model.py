"""``megatron-mpo init``: a randomly initialised model preset as a Megatron model directory.

    megatron-mpo init --preset tiny --tokenizer DIR (--out DIR | --config run.yaml) [--seed N]

For demos and tests: the result is what model.init points at, like a converted checkpoint.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_mpo.config_args import add_config_keys, parse_with_config
from megatron_mpo.console import exit_on_user_error, setup_console

__all__ = ["KEYS", "build_parser", "main"]

KEYS = {"out": "model.init", "tokenizer": "model.tokenizer"}


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Initialise a model preset as a Megatron model directory.")
    parser.add_argument("--preset", required=True, help="model preset name (e.g. tiny, InternVL2-1B)")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json or tokenizer.model")
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seed", type=int, default=0)
    add_config_keys(parser, KEYS)
    return parser


@exit_on_user_error
def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    setup_console()
    args = parse_with_config(build_parser(prog), argv, KEYS)
    from megatron_mpo.training.model_dir import init_model_dir

    print(init_model_dir(args.preset, args.tokenizer, args.out, seed=args.seed))
