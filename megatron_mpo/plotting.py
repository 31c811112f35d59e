"""Training-curve plots from metrics JSONL files (one or several runs overlaid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from megatron_mpo.errors import UserError

PANELS = (
    ("losses", ("loss", "loss_preference", "loss_quality", "loss_generation")),
    ("rewards", ("reward_chosen", "reward_rejected")),
    ("reward margin", ("reward_margin",)),
    ("reward accuracy", ("reward_accuracy",)),
    ("delta (BCO shift)", ("delta",)),
)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics JSONL file (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metrics file {path} does not exist")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if not records:
        raise UserError(f"metrics file {path} holds no step records")
    return records


def plot_runs(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw every panel for every run into one PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(p) for p in paths]
    labels = list(labels) if labels else [Path(p).stem for p in paths]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for ax, (title, keys) in zip(axes, PANELS):
        for label, records in zip(labels, runs):
            for key in keys:
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if points:
                    steps, values = zip(*points)
                    name = key if len(runs) == 1 else f"{label}: {key}"
                    ax.plot(steps, values, label=name if len(keys) > 1 or len(runs) > 1 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
