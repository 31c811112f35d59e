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


def draw_runs(runs: Sequence[list[dict]], labels: Sequence[str]):
    """The figure of :func:`plot_runs`: a panel per metric group, every run overlaid.

    Legends go below their panel, outside the axes, so that overlaid runs (up to one line
    per run and key) never hide the curves they name.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = max(len(keys) for _, keys in PANELS) * len(runs) if len(runs) > 1 else max(len(k) for _, k in PANELS)
    columns = 1 if entries <= 4 else 2
    legend_rows = -(-entries // columns)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.0 + 0.17 * legend_rows),
                             layout="constrained")
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
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, ncols=columns)
    return fig


def plot_runs(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw every panel for every run into one PNG; returns its path."""
    import matplotlib.pyplot as plt

    runs = [read_metrics(p) for p in paths]
    labels = list(labels) if labels else [Path(p).stem for p in paths]
    fig = draw_runs(runs, labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
