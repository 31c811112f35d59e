"""Step metrics reduced over real gloo ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.distributed import REPO, worker_env

_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from megatron_mpo.training.metrics import global_sum

    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    # rank 0 skipped samples, rank 1 counts nothing (a non-first tensor rank), rank 2 skipped other ones
    mine = [{"too_long": 2, "bad_image": 1}, {}, {"too_long": 1, "no_image": 4}][rank]
    first = global_sum(mine)
    nothing = global_sum({})
    # Peak memory per logging interval: the largest rank's, and each call starts a new interval.
    import torch
    from megatron_mpo import platform
    from megatron_mpo.training.metrics import interval_peak_memory_gib

    platform.setup("cpu")
    interval_peak_memory_gib()
    big = torch.ones(2**27) if rank == 2 else None  # 0.5 GiB on rank 2 only
    big = None
    peaks = [interval_peak_memory_gib(), interval_peak_memory_gib()]
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"first": first, "nothing": nothing, "peaks": peaks}, f)
    dist.barrier()
    # Leave without C++ teardown: gloo's threads at interpreter exit ("terminate called
    # without an active exception") failed this worker now and then on a loaded machine.
    import os
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_global_sum_agrees_when_ranks_count_different_keys(tmp_path):
    from tests.test_losses import free_port

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port, out = str(free_port()), str(tmp_path / "out")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, out], env=worker_env(), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(3)]
    logs = [p.communicate(timeout=90)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [json.loads(open(f"{out}.{r}").read()) for r in range(3)]
    expected = {"bad_image": 1.0, "no_image": 4.0, "too_long": 3.0}
    for r in results:
        assert {k: r[k] for k in ("first", "nothing")} == {"first": expected, "nothing": {}}
    # The 0.5 GiB tensor of rank 2 sets every rank's interval peak; the next interval is without it.
    assert len({tuple(r["peaks"]) for r in results}) == 1, results
    with_tensor, after = results[0]["peaks"]
    assert with_tensor - after > 0.4, (with_tensor, after)


def test_overlaid_runs_legends_leave_the_curves_visible(tmp_path):
    """plot_metrics with several runs (issue 28, item 8): every legend sits outside its
    panel's plotting area (it used to cover the curves) and inside the saved figure."""
    import matplotlib.pyplot as plt

    from megatron_mpo.plotting import PANELS, draw_runs, plot_runs

    keys = {k for _, ks in PANELS for k in ks}
    runs = [[{"step": s, **{k: (s * (r + 1)) % 7 / 7 for k in keys}} for s in range(1, 30)] for r in range(3)]
    fig = draw_runs(runs, ["baseline", "lr 2e-6", "beta 0.2"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) >= 3
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not box.overlaps(area), (ax.get_title(), box, area)
        assert figure_box.contains(box.x0, box.y0) and figure_box.contains(box.x1, box.y1), ax.get_title()
    plt.close(fig)
    paths = []
    for i, records in enumerate(runs):
        paths.append(tmp_path / f"run{i}.jsonl")
        paths[-1].write_text("\n".join(json.dumps(r) for r in records))
    assert plot_runs(paths, tmp_path / "out.png").stat().st_size > 10_000
