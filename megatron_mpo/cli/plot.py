"""``megatron-mpo plot``: loss parts, rewards, margin, accuracy and delta over steps.

    megatron-mpo plot runs/a/metrics.jsonl [runs/b/metrics.jsonl ...] --out curves.png
    megatron-mpo plot --config run.yaml --out curves.png        # the run's logging.metrics
"""

from __future__ import annotations

import argparse
import re
from typing import Optional

from megatron_mpo.console import exit_on_user_error
from megatron_mpo.errors import UserError

__all__ = ["build_parser", "main"]

OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")  # section.key=value; a path like runs/lr=1e-3/m.jsonl is a file


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Plot MPO training curves from metrics JSONL files.")
    parser.add_argument("metrics", nargs="*", help="metrics JSONL file(s), several runs overlaid; with --config, "
                        "section.key=value overrides of it")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--labels", nargs="*", help="run names (default: file names)")
    parser.add_argument("--config", help="run config YAML: plot its logging.metrics")
    return parser


@exit_on_user_error
def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    args = build_parser(prog).parse_args(argv)
    overrides = [m for m in args.metrics if OVERRIDE.match(m)]
    files = [m for m in args.metrics if m not in overrides]
    if args.config or overrides:
        from megatron_mpo.config import read_config

        metrics = read_config(args.config, overrides).logging.metrics
        if metrics is None:
            raise UserError("the config sets no logging.metrics: name the metrics JSONL file(s) instead")
        files.append(metrics)
    if not files:
        raise UserError("name the metrics JSONL file(s) to plot, or give --config with logging.metrics set")
    from megatron_mpo.plotting import plot_runs

    print(plot_runs(files, args.out, args.labels))
