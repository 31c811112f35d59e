"""The plan as text: parameters, memory per rank and stage, time, and what else fits."""

from __future__ import annotations

from typing import Optional

from megatron_mpo.plan.memory import GIB, StageMemory
from megatron_mpo.plan.run import WORST_CASES, Plan

__all__ = ["render", "duration", "suggestions_text"]


def duration(seconds: float) -> str:
    """``42 s``, ``3.1 min``, ``5.2 h``, ``2.6 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _billions(n: float) -> str:
    return "-" if n == 0 else f"{n / 1e9:.3f}B" if n < 1e8 else f"{n / 1e9:.2f}B"


def _rows_text(rows) -> str:
    kind = f"{rows.rows} packed row{'s' if rows.rows > 1 else ''}" if rows.packed else f"{rows.rows} rows"
    return (f"{kind} of {rows.row_length} tokens ({rows.prompt} prompt, {rows.response} per response, "
            f"{rows.tiles} tile{'s' if rows.tiles != 1 else ''})")


def _table(header: list, lines: list) -> list:
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), *[fmt(r) for r in lines]]


def _memory_lines(plan: Plan) -> list:
    stages = [plan.stage(s) for s in range(plan.layout.pipeline)]
    typical = plan.memory["typical"]
    p = plan.precision
    dp, edp = plan.layout.data, plan.layout.expert_data
    shard = f"/DP {dp}" + (f", experts /{edp}" if plan.layout.expert > 1 else "")
    quantities = [
        (f"weights ({p.dtype})", lambda m: m.weights),
        ("gradients (fp32)", lambda m: m.grads),
        (f"fp32 master weights ({shard})", lambda m: m.master),
        (f"Adam moments, fp32 ({shard})", lambda m: m.adam),
        ("FP8 weight cache", lambda m: m.fp8_cache),
        ("activations, 1 micro-batch", lambda m: m.micro_batch.peak),
        ("micro-batches in flight", None),
        ("activations in flight", lambda m: m.activations),
        ("working set", lambda m: m.working_set),
        ("total", lambda m: m.total),
    ]
    header = ["GiB per rank, worst case"] + [f"stage {m.params.stage}" for m in stages]
    rows = []
    for name, get in quantities:
        if get is None:
            rows.append([name] + [f"{m.in_flight:g}" for m in stages])
        else:
            rows.append([name] + [_gib(get(m)) for m in stages])
    rows.append(["total, typical pair"] + [_gib(m.total) for m in typical])
    return _table(header, rows)


def _fit_line(plan: Plan) -> str:
    usable = plan.hardware.usable
    worst, typical = plan.worst(), plan.typical()
    limit = (f"{_gib(usable)} GiB usable of {plan.hardware.gpu.memory_gib:g} GiB "
             f"({plan.hardware.reserve_gib:g} GiB kept for CUDA context, NCCL and fragmentation)")
    if worst.total <= usable:
        return (f"fits: the fullest rank (stage {worst.params.stage}) needs {_gib(worst.total)} GiB in the worst "
                f"case; {limit}")
    if typical.total <= usable:
        return (f"fits typical pairs only: {_gib(typical.total)} GiB (stage {typical.params.stage}); the worst case "
                f"needs {_gib(worst.total)} GiB on stage {worst.params.stage}; {limit}")
    return (f"does NOT fit: {_gib(typical.total)} GiB for a typical pair, {_gib(worst.total)} GiB worst case "
            f"(stage {worst.params.stage}); {limit}")


def _time_lines(plan: Plan, pairs_source: str) -> list:
    t = plan.time
    lines = [
        f"time, typical pair: {t.flops / 1e15:.3g} PFLOP per step (the trainer's mfu count) over {t.gpus} x "
        f"{t.peak / 1e12:.0f} TFLOP/s ({t.peak_source}) at MFU {t.mfu:.2f}",
        f"  overheads: pipeline bubble +{100 * t.bubble:.0f} %, slowest stage x{t.imbalance:.2f}, recompute "
        f"+{100 * t.recompute:.0f} % -> logged mfu ~{t.logged_mfu:.2f}; {duration(t.seconds)} per step",
    ]
    if plan.steps:
        lines.append(f"  {plan.steps:,} steps per epoch ({plan.pairs:,} pairs, {pairs_source}) -> "
                     f"{duration(plan.steps * t.seconds)} per epoch on {t.gpus} GPUs")
    else:
        lines.append("  time per epoch: unknown pair count (no index.json with counts at data.shards): pass --pairs N")
    if plan.run_steps and plan.run_steps != plan.steps:
        total = duration(plan.run_steps * t.seconds)
        lines.append(f"  the run: {plan.run_steps:,} steps ({plan.run_source}) -> {total}")
    return lines


def suggestions_text(plans: list, hardware) -> list:
    if not plans:
        return [f"no layout fits a typical pair on {hardware.gpus} x {hardware.gpu.name}: add GPUs"]
    lines = [f"layouts that fit {hardware.gpus} x {hardware.gpu.name}, fastest first:"]
    for plan in plans:
        note = "" if plan.fits("worst") else " (typical pairs only)"
        lines.append(f"  {duration(plan.time.seconds):>9} per step, {_gib(plan.worst().total):>5} GiB worst case, "
                     f"{_gib(plan.typical().total):>5} typical: {plan.layout.describe()}{note}")
    return lines


def render(plan: Plan, title: str, pairs_source: str = "index.json", smallest: Optional[str] = None,
           suggestions: Optional[list] = None) -> str:
    model, layout = plan.model, plan.layout
    p = plan.precision
    out = [
        f"{title}: {model.name or 'model'} on {layout.gpus} x {plan.hardware.gpu.name} "
        f"({plan.hardware.gpu.memory_gib:g} GiB)",
        f"layout: {layout.describe()}; {plan.micro_batches} micro-batch{'es' if plan.micro_batches > 1 else ''} of "
        f"{plan.rows['typical'].pairs} pair{'s' if plan.rows['typical'].pairs > 1 else ''} per rank per step",
        f"precision: {p.dtype}{' + fp8' if p.fp8 else ''}, spec {p.spec}, attention {p.attention}"
        + (f", frozen: {', '.join(p.frozen)}" if p.frozen else ""),
        "rows per micro-batch: " + "; ".join(f"{case}: {_rows_text(plan.rows[case])}"
                                             for case in (*WORST_CASES, "typical")),
        "",
    ]
    header = ["parameters per rank", "vision", "projector", "LLM", "experts", "total"]
    stages: list[StageMemory] = [plan.stage(s) for s in range(layout.pipeline)]
    out += _table(header, [[f"stage {m.params.stage}", _billions(m.params.vision), _billions(m.params.projector),
                            _billions(m.params.llm), _billions(m.params.experts), _billions(m.params.total)]
                           for m in stages])
    out += ["", *_memory_lines(plan), _fit_line(plan)]
    if smallest:
        out.append(smallest)
    out += ["", *_time_lines(plan, pairs_source)]
    if suggestions is not None:
        out += ["", *suggestions_text(suggestions, plan.hardware)]
    return "\n".join(out)
