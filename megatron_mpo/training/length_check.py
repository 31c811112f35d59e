"""Token lengths of a run's pairs before the expensive steps: the report tool
(``megatron-mpo lengths``) and the start-up warning of the trainer and the reference tool.

Both measure with the loader the reference tool builds from the run config, so template,
tokenizer, tiling and ``data.max_length`` are the run's own (:mod:`megatron_mpo.data.lengths`).

    megatron-mpo lengths --config run.yaml [--samples 2000] [--json FILE] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from megatron_mpo.config import RunConfig, read_config
from megatron_mpo.data.lengths import LengthReport, measure_lengths, percentile
from megatron_mpo.training import data_setup, model_setup

__all__ = ["REPORT_SAMPLES", "CHECK_SAMPLES", "WARN_SHARE", "COMMAND", "run_lengths", "length_warning",
           "check_lengths", "main"]

REPORT_SAMPLES = 2000
CHECK_SAMPLES = 200  # the start-up check's sample: a fraction of a second (README, "Lengths")
# More than this share of cut responses or dropped pairs warns. A cut response is scored on
# a prefix: MPO compares log-probability sums of whole responses, and in reasoning answers
# the part where chosen and rejected differ (the final answer) comes last, so a cut pair
# mostly teaches noise. A tail of a few percent over any max_length is normal and costs little;
# above 5% the setting, not the tail, is wrong. On the 200-pair sample a true share of 5% is
# measured within about 1.5 points (one standard error), so shares of 0-2% never warn.
WARN_SHARE = 0.05
COMMAND = "megatron-mpo lengths --config CONFIG"


def run_lengths(cfg: RunConfig, model_config, tok, samples: int) -> LengthReport:
    """Measure up to ``samples`` pairs of the run's shards as its loader would build them."""
    from megatron_mpo.data import build_loader

    loader = build_loader(data_setup.loader_data(cfg, model_config, for_reference=True),
                          data_setup.loader_plan(cfg, model_config, for_reference=True), tok)
    b = loader.builder
    tiling = (f"{b.min_tiles}-{b.max_tiles} tiles per sample, {'a' if b.use_thumbnail else 'no'} thumbnail"
              if b.dynamic_tiling else "one tile per image")
    setting = (f"template {data_setup.describe_template(cfg, model_config)}; tokenizer "
               f"{cfg.model.tokenizer or cfg.model.init}; {tiling}; {b.tokens_per_tile} tokens per "
               f"{b.image_size}px tile")
    return measure_lengths(loader, samples, setting)


def length_warning(report: LengthReport, command: Optional[str] = COMMAND) -> Optional[str]:
    """One line when more than :data:`WARN_SHARE` of the measured responses would be cut or of
    the pairs dropped at ``data.max_length`` (naming ``command`` for the details); None otherwise."""
    g = report.overall
    if not g.pairs or max(g.cut_share, g.dropped_share) <= WARN_SHARE:
        return None
    of = f"{report.total}" if report.total is not None else "the"
    more = f" (lengths per dataset: {command})" if command else ""
    return (f"at data.max_length {report.max_length}, {100 * g.cut_share:.0f}% of the responses would be cut "
            f"and {100 * g.dropped_share:.0f}% of the pairs dropped (prompt too long), measured on {report.read} of "
            f"{of} samples; "
            f"p90 response {g.response_percentile(90)} tokens, p90 prompt + longer response "
            f"{percentile(g.whole, 90)}: raise data.max_length{more}")


def check_lengths(cfg: RunConfig, model_config, tok) -> Optional[str]:
    """The start-up check: :func:`length_warning` over :data:`CHECK_SAMPLES` pairs."""
    return length_warning(run_lengths(cfg, model_config, tok, CHECK_SAMPLES))


def main(argv: Optional[list[str]] = None, prog: str = "megatron-mpo lengths") -> LengthReport:
    """The report tool: tables on stdout, optionally JSON; returns the report."""
    from megatron_mpo.errors import UserError

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Token lengths of the pairs under the run's template, tokenizer and tiling, and the share "
                    "data.max_length would drop or cut, per dataset (a sample spread over the shards).")
    parser.add_argument("--config", help="the run's YAML config (model.init or model.tokenizer, data.*)")
    parser.add_argument("--samples", type=int, default=REPORT_SAMPLES,
                        help=f"pairs to read, spread over the shards (default {REPORT_SAMPLES})")
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. data.max_length=4096)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    cfg = read_config(args.config, args.overrides)  # a config still being written: only model and data matter
    cfg.data.validate()
    if not cfg.model.init and not cfg.model.preset:
        raise UserError("set model.init (a converted checkpoint): its template, tokenizer and tile size "
                        "decide the lengths")
    model_config = model_setup.model_config(cfg)
    report = run_lengths(cfg, model_config, data_setup.tokenizer(cfg), args.samples)
    print(report.table())
    warning = length_warning(report, command=None)
    if warning:
        print(f"\nwarning: {warning}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return report
