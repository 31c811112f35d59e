"""The trainer's two memory lines: the plan's per-rank estimate at start-up, and the real
peak after the first step next to it (so a wrong estimate shows in the first minute). A
diagnostic: a plan that cannot be made says so in its line and never stops training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mpo.plan.memory import GIB

__all__ = ["MemoryEstimate", "estimate"]


@dataclass(frozen=True)
class MemoryEstimate:
    worst: float  # bytes on the fullest rank, worst-case pair
    typical: float  # ... typical pair (rows half of data.max_length)
    stage: int  # the fullest rank's pipeline stage (worst case)
    device: Optional[str] = None
    usable: Optional[float] = None  # bytes of the device the estimate may reach
    error: Optional[str] = None  # why there is no plan

    def line(self) -> str:
        from megatron_mpo.training.disk_space import describe

        if self.error:
            return f"memory plan: not available ({self.error})"
        text = (f"memory plan (megatron-mpo plan): ~{describe(self.worst)} per rank for a worst-case pair "
                f"(stage {self.stage}), ~{describe(self.typical)} for a typical one")
        if self.usable is not None:
            verdict = ("fits" if self.worst <= self.usable else "may NOT fit" if self.typical <= self.usable
                       else "does NOT fit")
            text += f"; {verdict} {self.device} ({describe(self.usable)} usable)"
        return text

    def after_step(self, peak_gib: float, step: int) -> str:
        from megatron_mpo.training.disk_space import describe

        where = "" if self.device else " (on CPU: the process's resident set, Python and torch included)"
        if self.error:
            return f"memory after step {step}: peak {describe(peak_gib * GIB)} on the fullest rank{where}"
        return (f"memory after step {step}: peak {describe(peak_gib * GIB)} on the fullest rank{where}; planned "
                f"~{describe(self.typical)} typical, ~{describe(self.worst)} worst case")


def estimate(cfg, model_config, data_parallel: int) -> MemoryEstimate:
    """The plan of this run's layout (``data_parallel`` from the launch) on this machine's
    device (CUDA: its name and memory; CPU: no verdict)."""
    try:
        return _estimate(cfg, model_config, data_parallel)
    except Exception as exc:  # a diagnostic line must not stop a run
        return MemoryEstimate(worst=0.0, typical=0.0, stage=0, error=f"{type(exc).__name__}: {exc}")


def _estimate(cfg, model_config, data_parallel: int) -> MemoryEstimate:
    from megatron_mpo import platform
    from megatron_mpo.plan.params import Parallelism
    from megatron_mpo.plan.run import DEFAULT_RESERVE_GIB, Hardware, make_plan
    from megatron_mpo.plan.timing import GpuKind

    p = cfg.parallel
    layout = Parallelism(tensor=p.tensor, pipeline=p.pipeline, data=data_parallel, expert=p.expert,
                         sequence=p.sequence, virtual_pipeline=p.virtual_pipeline,
                         pipeline_layers=tuple(p.pipeline_layers) if p.pipeline_layers else None,
                         recompute=cfg.model.recompute)
    device = usable = None
    kind = GpuKind("NVIDIA H100 80GB HBM3", 80.0)  # only the plan's time needs a peak; not printed
    gpu = platform.device_memory()
    if gpu is not None:
        device, memory = gpu[0], gpu[1] / GIB
        kind = GpuKind(kind.name, memory)
        usable = (memory - DEFAULT_RESERVE_GIB) * GIB
    plan = make_plan(cfg, model_config, layout, Hardware(gpus=layout.gpus, gpu=kind))
    worst = plan.worst()
    return MemoryEstimate(worst=worst.total, typical=plan.typical().total, stage=worst.params.stage,
                          device=device, usable=usable)
