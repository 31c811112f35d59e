"""``megatron-mpo reference``: the initial model's reference log-probs of every training pair.

    [torchrun --nproc-per-node N --no-python] megatron-mpo reference --config FILE [section.key=value ...]
    megatron-mpo reference --print-config --config FILE      # the resolved config, one help line per key

Uses the training config (model.init, data.*, parallel.*, precision.*): one sidecar per shard
of data.shards into data.ref_logps and, when eval.shards is set, of the held-out shards into
eval.ref_logps. Rerunning resumes: complete shards are skipped.
"""

from __future__ import annotations

from typing import Optional

from megatron_mpo.config_args import print_config_if_asked, run_config_parser
from megatron_mpo.console import exit_on_user_error, setup_console

__all__ = ["main"]


@exit_on_user_error
def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    setup_console()
    args = run_config_parser(prog, "Reference log-probs of the initial model for every training (and held-out) "
                             "pair.").parse_args(argv)
    if print_config_if_asked(args):
        return
    from megatron_mpo.config import load_config
    from megatron_mpo.reference import precompute

    precompute(load_config(args.config, args.overrides))
