"""The trainer's console text besides the step lines' numbers (rank 0 prints all of it).

* :func:`banner`: one block at start-up -- pairs, steps, parallel layout, template, tiling,
  precision, where the reference values come from;
* :class:`Progress`: ``step 3/10`` with elapsed time and ETA for the step lines;
* :func:`saved_line` and :func:`summary_line`: checkpoint saves and the run's last line;
* :func:`split_skips`: the loader's skip counts as samples *dropped* versus responses
  *truncated* (``response_truncated`` pairs are trained on, cut to ``data.max_length``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from megatron_mpo.config import RunConfig
from megatron_mpo.parallel import Layout

__all__ = ["BANNER_TITLE", "banner", "Progress", "duration", "saved_line", "summary_line", "split_skips",
           "KEPT_REASONS", "NOT_SAMPLES"]

BANNER_TITLE = "MPO training"
KEPT_REASONS = ("response_truncated",)  # counted, but the pair is trained on
NOT_SAMPLES = ("nonfinite_steps",)  # counts steps, not samples


def split_skips(skipped: Mapping[str, float]) -> tuple[int, int]:
    """(samples dropped, responses truncated) in a dict of counts by reason."""
    truncated = sum(int(v) for k, v in skipped.items() if k in KEPT_REASONS)
    dropped = sum(int(v) for k, v in skipped.items() if k not in KEPT_REASONS and k not in NOT_SAMPLES)
    return dropped, truncated


def duration(seconds: float) -> str:
    """``0:07``, ``12:34`` or ``1:02:03`` (h:mm:ss without empty hours)."""
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Elapsed time and ETA of steps ``start_step + 1 .. total_steps``.

    The ETA uses the pace since the first step this process logged, so start-up (model
    build, loader warm-up, the first step's allocations) does not inflate it; before a
    second logged step it uses the time since this object was made.
    """

    def __init__(self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.total_steps = total_steps
        self.start_step = start_step
        self._clock = clock
        self.started = clock()
        self._first: Optional[tuple[int, float]] = None

    def elapsed(self) -> float:
        """Seconds since this object was made (the run's loop, without start-up)."""
        return self._clock() - self.started

    def text(self, step: int) -> str:
        """``elapsed 0:12 | ETA 0:30`` after ``step`` (the ETA is 0 at the last step)."""
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)
        else:
            per_step = (now - self.started) / max(step - self.start_step, 1)
        eta = per_step * max(self.total_steps - step, 0)
        return f"elapsed {duration(now - self.started)} | ETA {duration(eta)}"


def banner(cfg: RunConfig, layout: Layout, *, total_steps: int, start_step: int, pairs: Optional[int],
           template: str, template_source: str, precision: str, reference_precision: str, rows: str,
           mfu_peak: str, speed: Optional[str] = None, tiling: Optional[str] = None) -> str:
    """The start-up block: what will run, on which layout, with which data and numbers;
    ``speed``: which of Megatron-LM's speed settings are on (and why the others are off);
    ``tiling``: how images are tiled and where each value came from."""
    world = layout.tensor * layout.pipeline * layout.data
    per_step = cfg.train.global_batch
    data = (f"{pairs} pairs in {cfg.data.shards}" if pairs is not None
            else f"shards {cfg.data.shards} (no index.json count)")
    epochs = f", {total_steps * per_step / pairs:.2f} epochs" if pairs else ""
    start = f", resuming after step {start_step}" if start_step else ""
    vp = layout.virtual_pipeline or "-"
    sp = "on" if cfg.parallel.sequence else "off"
    lines = [
        f"{BANNER_TITLE}: {data}; {total_steps} steps of {per_step} pairs{epochs}{start}",
        f"  layout: {world} process{'es' if world > 1 else ''} = TP {layout.tensor} x PP {layout.pipeline} x "
        f"DP {layout.data}; EP {layout.expert} (of DP); VP {vp}; SP {sp}",
        *([_steps_line(cfg)] if layout.data > 1 else []),
        f"  template: {template} ({template_source})",
        *([f"  tiling: {tiling}"] if tiling is not None else []),
        f"  precision: {precision}; rows: {rows}; mfu against {mfu_peak}",
        f"  reference values: {cfg.data.ref_logps} (computed in {reference_precision})",
    ]
    if speed is not None:
        lines.append(f"  speed: {speed}")
    return "\n".join(lines)


def _steps_line(cfg: RunConfig) -> str:
    """How a step's pairs are split over the data-parallel ranks."""
    if cfg.data.balance:
        return (f"  steps: balanced over the data-parallel ranks by cost (data.balance; each rank reads "
                f"{cfg.data.balance_lookahead} pairs ahead)")
    return "  steps: each data-parallel rank takes its next pairs as they come (data.balance off)"


def saved_line(step: int, seconds: float) -> str:
    """One line per save: saves are the slow, silent part of a step."""
    return f"saved checkpoint step {step} ({seconds:.1f}s)"


def summary_line(*, step: int, total_steps: int, start_step: int, global_batch: int, seconds: float,
                 last: Optional[Mapping], checkpoint: Optional[Path], metrics: Optional[str]) -> str:
    """The run's last line: how far, how long, the last loss, skip totals, where results went."""
    done = step - start_step
    verb = "finished" if step >= total_steps else "stopped"
    parts = [f"{verb} at step {step}/{total_steps}: {done} steps, {done * global_batch} pairs in {duration(seconds)}"]
    if last:
        parts.append(f"last loss {last['loss']:.4f}")
        skipped = last.get("skipped") or {}
        dropped, truncated = split_skips(skipped)
        parts.append(f"{dropped} samples dropped, {truncated} responses truncated, "
                     f"{int(skipped.get('nonfinite_steps', 0))} non-finite steps skipped")
    parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpoint.save unset)")
    if metrics:
        parts.append(f"metrics {metrics}")
    return " | ".join(parts)
