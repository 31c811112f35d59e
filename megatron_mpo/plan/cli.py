"""``megatron-mpo plan``: does a run config fit the GPUs, and how long does it take?

    megatron-mpo plan --config examples/recipes/internvl3_8b.yaml --gpus 16 --gpu H100 [--pairs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from megatron_mpo.errors import UserError
from megatron_mpo.plan.run import (DEFAULT_FILL, DEFAULT_RESERVE_GIB, PROMPT_TEXT_TOKENS, Assumptions, Hardware,
                                   layout_of, make_plan, model_of)
from megatron_mpo.plan.timing import GPU_KINDS, MFU_SOURCE, default_mfu, gpu_kind

__all__ = ["build_parser", "main", "smallest_gpus"]

MAX_GPUS = 4096


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The planner's arguments (on ``parser``, e.g. a subcommand's, or a new one)."""
    parser = parser or argparse.ArgumentParser(prog="python -m megatron_mpo.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (as for megatron_mpo.train)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--gpus", type=int, help="GPUs of the run (default: the fewest on which the config's "
                        "layout fits a typical pair: whole nodes, or a part of one)")
    parser.add_argument("--gpu", default="H100", help=f"GPU kind: {', '.join(GPU_KINDS)}, or an exact device "
                        "name of the peak table in megatron_mpo/training/flops.py (default H100)")
    parser.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (default: the kind's, as nvidia-smi "
                        "reports it)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (tensor x expert parallelism "
                        "stays inside one; default 8)")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="memory per GPU outside torch's allocations: CUDA context, NCCL buffers, allocator "
                        f"fragmentation (default {DEFAULT_RESERVE_GIB:g})")
    parser.add_argument("--mfu", type=float, help=f"model FLOP utilisation of a balanced layout, as the trainer "
                        f"logs it (default {default_mfu(False):.2f} bf16, {default_mfu(True):.3f} with FP8: "
                        f"{MFU_SOURCE.replace('%', '%%')})")
    parser.add_argument("--fill", type=float, default=DEFAULT_FILL, help="typical pair: each row holds this "
                        f"fraction of data.max_length tokens (default {DEFAULT_FILL:g}; an assumption, not data)")
    parser.add_argument("--tiles", type=int, help="typical pair: image tiles (default: --fill x (data.max_tiles "
                        f"+ thumbnail)); prompts also hold {PROMPT_TEXT_TOKENS} text tokens")
    parser.add_argument("--pairs", type=int, help="pairs per epoch (default: data.shards' index.json)")
    parser.add_argument("--preset", help="architecture, when model.init is not converted yet (recipes name theirs "
                        "in a '# preset:' line, which is read otherwise)")
    parser.add_argument("--suggest", type=int, default=5, help="fitting layouts to list (0: none; default 5)")
    return parser


def smallest_gpus(cfg, model, hardware: Hardware, assumptions: Assumptions, case: str) -> Optional[int]:
    """The fewest GPUs (whole nodes, or one node's divisors below that) on which the
    config's layout fits ``case`` ("worst" or "typical"), or None up to :data:`MAX_GPUS`."""
    group = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.expert
    counts = sorted({n for n in range(group, MAX_GPUS + 1, group)
                     if n % hardware.gpus_per_node == 0 or hardware.gpus_per_node % n == 0})
    for gpus in counts:
        try:
            layout = layout_of(cfg, model, gpus)
        except UserError:
            continue
        plan = make_plan(cfg, model, layout, dataclasses.replace(hardware, gpus=gpus),
                         dataclasses.replace(assumptions, pairs=0))
        if plan.fits(case):
            return gpus
    return None


def run(args: argparse.Namespace) -> str:
    """The report for parsed arguments (UserError on bad input)."""
    from megatron_mpo.config import load_config
    from megatron_mpo.plan.layouts import suggest
    from megatron_mpo.plan.report import render

    cfg = load_config(args.config, args.overrides)
    model = model_of(cfg, args.config, args.preset)
    for name in ("gpus", "gpu_memory_gib", "mfu", "pairs", "tiles"):
        value = getattr(args, name)
        if value is not None and value <= 0 and not (name == "tiles" and value == 0):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    kind = gpu_kind(args.gpu, args.gpu_memory_gib)
    assumptions = Assumptions(fill=args.fill, tiles=args.tiles, mfu=args.mfu, pairs=args.pairs)
    hardware = Hardware(gpus=args.gpus or 0, gpu=kind, gpus_per_node=args.gpus_per_node, reserve_gib=args.reserve_gib)
    worst = smallest_gpus(cfg, model, hardware, assumptions, "worst")
    typical = smallest_gpus(cfg, model, hardware, assumptions, "typical")
    smallest = (f"this layout fits a typical pair from {typical} GPU{'s' if typical > 1 else ''}" if typical else
                f"this layout fits a typical pair on no GPU count up to {MAX_GPUS}")
    smallest += f", the worst case from {worst}" if worst else ", the worst case on none"
    gpus = args.gpus or typical or worst
    if gpus is None:
        group = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.expert
        gpus = -(-group // hardware.gpus_per_node) * hardware.gpus_per_node
    hardware = dataclasses.replace(hardware, gpus=gpus)
    plan = make_plan(cfg, model, layout_of(cfg, model, gpus), hardware, assumptions)
    source = "--pairs" if args.pairs else "index.json"
    suggestions = suggest(cfg, model, hardware, assumptions, args.suggest) if args.suggest > 0 else None
    title = f"plan for {args.config}" + (f" ({' '.join(args.overrides)})" if args.overrides else "")
    return render(plan, title, source, smallest, suggestions)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Print the plan; 0, or 2 with one ``error:`` line on bad input."""
    from megatron_mpo.console import report_failure, setup_console

    setup_console()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0]) if prog else None
    args = build_parser(parser).parse_args(argv)
    try:
        print(run(args), flush=True)
    except UserError as exc:
        return report_failure(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
