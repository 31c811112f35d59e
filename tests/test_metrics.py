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
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"first": first, "nothing": nothing}, f)
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
        assert r == {"first": expected, "nothing": {}}
