"""Step metrics: reduce across ranks, then JSONL + TensorBoard + W&B + one console line.

Loss metrics exist only on the last pipeline stage; every rank takes part in one
all-reduce so that rank 0 (which writes) sees the data-parallel mean.

The logger splits the loader's skip counts (``skipped``, totals by reason) into samples
dropped and responses truncated, per logging interval and in total (JSONL keys
``samples_dropped``, ``responses_truncated`` and their ``_total``); the console line shows
``step N/total``, the loss parts (with ``aux_loss`` for a mixture-of-experts LLM), those
counts, elapsed time and ETA.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from megatron_mpo import platform
from megatron_mpo.errors import UserError
from megatron_mpo.fileio import write_atomic
from megatron_mpo.losses import METRIC_NAMES
from megatron_mpo.training.run_report import KEPT_REASONS, NOT_SAMPLES, Progress, split_skips

# Per-step scalars averaged over micro-batches and data-parallel replicas: the metrics of
# mpo_loss, and abs_logratio, the mean |log pi - log pi_0| of a response, and the same per
# response token (logged once, as ref_logratio_step0 and ref_logratio_step0_per_token).
LOSS_KEYS = METRIC_NAMES + ("abs_logratio", "abs_logratio_per_token")
CONSOLE_KEYS = ("loss", "loss_preference", "loss_quality", "loss_generation", "reward_margin", "reward_accuracy", "delta")


def reduce_loss_metrics(per_microbatch: list[dict], is_last_stage: bool, tensor_rank: int) -> dict:
    """Mean of LOSS_KEYS over micro-batches and replicas, the same on every rank."""
    values = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=platform.device())
    if is_last_stage and tensor_rank == 0 and per_microbatch:
        for i, key in enumerate(LOSS_KEYS):
            values[i] = sum(float(m[key]) for m in per_microbatch) / len(per_microbatch)
        values[-1] = 1.0
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    weight = float(values[-1]) or 1.0
    return {key: float(values[i]) / weight for i, key in enumerate(LOSS_KEYS)}


def router_aux_loss(chunks: list, micro_batches: int, pipeline_rank: int) -> Optional[float]:
    """The load-balancing term a mixture-of-experts step added to the loss (None for a dense
    LLM): the coefficient times the sum over MoE layers of each layer's loss, averaged over
    the step's micro-batches and over the ranks that hold the same layers. Read from
    megatron-core's aux-loss tracker, which it then clears; every rank must call this every
    step (one all-reduce), pipeline stages without MoE layers included."""
    config = chunks[0].config
    if not getattr(config, "num_moe_experts", None):
        return None
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    total = torch.zeros(2, dtype=torch.float64, device=platform.device())
    if entry is not None:
        total[0] = float(entry["values"].sum())
    # Under sequence parallelism a tensor-parallel rank's value is its share of the positions'.
    share = 1.0 / config.tensor_model_parallel_size if config.sequence_parallel else 1.0
    total[1] = share if pipeline_rank == 0 else 0.0
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    clear_aux_losses_tracker()
    coeff = config.moe_aux_loss_coeff if config.moe_router_load_balancing_type != "none" else 0.0
    # total[1] counts the replicas every layer has once (the first pipeline stage's ranks).
    return float(coeff) * float(total[0]) / max(float(total[1]), 1.0) / max(micro_batches, 1)


def interval_peak_memory_gib() -> float:
    """The largest per-rank peak memory since the previous call, in GiB (device memory held
    by tensors on GPU, ``torch.cuda.max_memory_allocated``; peak resident set on CPU), then a
    new interval starts. A collective: every rank calls it at every logged step."""
    peak = torch.tensor([float(platform.max_memory_allocated())], dtype=torch.float64, device=platform.device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    platform.reset_peak_memory()
    return float(peak) / 2**30


def global_sum(numbers: dict[str, float]) -> dict[str, float]:
    """Sum named numbers over all ranks (counts such as skipped samples).

    A collective on every rank even when the dicts differ in keys (one replica skipped a
    sample, another did not; ranks that do not count pass ``{}``): keys are gathered
    first, so every rank all-reduces the same vector.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return {k: float(v) for k, v in sorted(numbers.items())}
    key_lists: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(key_lists, sorted(numbers))
    keys = sorted(set().union(*key_lists))
    if not keys:
        return {}
    tensor = torch.tensor([float(numbers.get(k, 0)) for k in keys], dtype=torch.float64, device=platform.device())
    torch.distributed.all_reduce(tensor)
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


class MetricsLogger:
    """Writes one JSON object per logged step; optional TensorBoard and W&B sinks.

    Only the writer rank (global rank 0) opens files. The JSONL file is appended to, so a
    resumed run continues the same file; entries of steps after the resume point that a
    crashed run had already written are dropped first, so every step appears once.
    """

    def __init__(
        self,
        jsonl: Optional[str],
        tensorboard: Optional[str],
        wandb_project: Optional[str],
        is_writer: bool,
        run_config: Optional[dict] = None,
        resume_step: int = 0,
        total_steps: Optional[int] = None,
    ) -> None:
        self.is_writer = is_writer
        self.progress = Progress(total_steps or 0, resume_step)
        self.total_steps = total_steps
        self.last: Optional[dict] = None  # the latest record logged
        self._skip_totals = (0, 0)  # (dropped, truncated) at the previous logged step
        self._file = None
        self._tb = None
        self._wandb = None
        if not is_writer:
            return
        if jsonl:
            path = Path(jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = truncate_after(path, resume_step)
            if kept and isinstance(kept.get("skipped"), dict):
                self._skip_totals = split_skips(kept["skipped"])
            self._file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "logging.tensorboard is set but tensorboard is not installed: "
                    "pip install tensorboard (or the [tracking] extra)"
                ) from None
            self._tb = SummaryWriter(tensorboard)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "logging.wandb_project is set but wandb is not installed: pip install wandb"
                ) from None
            self._wandb = wandb.init(project=wandb_project, config=run_config or {}, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_writer:
            return
        metrics = {**metrics, **self._skip_split(metrics.get("skipped"))}
        self.last = metrics
        record = {"step": step, **metrics}
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=False) + "\n")
            self._file.flush()
        flat = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in flat.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)
        progress = self.progress.text(step) if self.total_steps else None
        print(console_line(step, metrics, self.total_steps, progress), file=sys.stdout, flush=True)

    def _skip_split(self, skipped: Optional[dict]) -> dict:
        """Dropped samples and truncated responses: since the previous logged step, and totals."""
        if not isinstance(skipped, dict):
            return {}
        dropped, truncated = split_skips(skipped)
        before = self._skip_totals
        self._skip_totals = (dropped, truncated)
        return {"samples_dropped": dropped - before[0], "responses_truncated": truncated - before[1],
                "samples_dropped_total": dropped, "responses_truncated_total": truncated}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(step: int, m: dict, total_steps: Optional[int] = None, progress: Optional[str] = None) -> str:
    """``step 3/10 | loss ... | dropped 2 (total 5: bad_image=5) | truncated 1 (total 3) | elapsed .. | ETA ..``."""
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    for key in CONSOLE_KEYS:
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    # aux_loss: a mixture-of-experts LLM's router load-balancing term (absent for a dense one)
    for key, fmt in (("aux_loss", "{:.4g}"), ("lr", "{:.3g}"), ("grad_norm", "{:.3f}"), ("samples_per_s", "{:.2f}"),
                     ("tokens_per_s", "{:.0f}"), ("mfu", "{:.4f}"), ("peak_memory_gib", "{:.2f}")):
        if key in m and m[key] is not None and not (isinstance(m[key], float) and math.isnan(m[key])):
            parts.append(f"{key} " + fmt.format(m[key]))
    held_out = m.get("eval") or {}
    parts.extend(f"eval_{key} {held_out[key]:.4f}" for key in ("loss", "reward_accuracy", "reward_margin")
                 if key in held_out)
    parts.extend(_skip_parts(m))
    if progress:
        parts.append(progress)
    return " | ".join(parts)


def _skip_parts(m: dict) -> list[str]:
    """Non-zero skip counts: dropped samples by reason, truncated responses, non-finite steps."""
    skipped = {k: int(v) for k, v in (m.get("skipped") or {}).items() if v}
    parts = []
    if m.get("samples_dropped_total"):
        reasons = ",".join(f"{k}={v}" for k, v in sorted(skipped.items()) if k not in KEPT_REASONS + NOT_SAMPLES)
        parts.append(f"dropped {m['samples_dropped']} (total {m['samples_dropped_total']}: {reasons})")
    if m.get("responses_truncated_total"):
        parts.append(f"truncated {m['responses_truncated']} (total {m['responses_truncated_total']})")
    if skipped.get("nonfinite_steps"):
        parts.append(f"nonfinite_steps {skipped['nonfinite_steps']}")
    return parts


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def truncate_after(path: Path, step: int) -> Optional[dict]:
    """Keep only records of steps <= ``step`` (what the checkpoint being resumed saw); the last kept."""
    if not path.exists():
        return None
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a killed run
    tmp = path.with_suffix(path.suffix + ".tmp")
    write_atomic(path, "".join(line + "\n" for line in kept), tmp=tmp, durable=False)
    return json.loads(kept[-1]) if kept else None


class StepCounter:
    """Counts pairs and token positions drawn by the forward step during one step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pairs = 0
        self.tokens = 0
        self.scored = 0  # response tokens: the output layer runs on these only
        self.tiles = 0
        self.attended = 0  # query-key pairs of the attention

    def add(self, batch) -> None:
        # The forward step reports each micro-batch once (from the first model chunk).
        self.pairs += batch.num_pairs
        self.tokens += batch.num_tokens()
        self.scored += int(batch.response_mask().sum())
        self.tiles += int(batch.pixel_values.shape[0])
        self.attended += batch.attended_keys()
