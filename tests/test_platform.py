"""The platform layer: CPU redirects for megatron-core's CUDA-only calls, one-line errors
for GPU-only options, and no device named anywhere else in the package."""

import re
import subprocess
import sys
from pathlib import Path

from tests.distributed import REPO, worker_env

PROBE = r"""
import torch
from megatron_mpo import platform
from megatron_mpo.errors import UserError
assert not torch.cuda.is_available()
plat = platform.setup("auto")
assert (plat.kind, plat.backend) == ("cpu", "gloo"), plat
assert torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
assert torch.empty(3).cuda().device.type == "cpu"
assert torch.zeros(1).to("cuda:0").device.type == "cpu"
assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
torch.cuda.synchronize()
# megatron-core's RNG tracker forks a distinct stream and restores the default one.
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core import parallel_state
platform.init_distributed()
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(7)
torch.manual_seed(3); a = torch.rand(2)
torch.manual_seed(3)
with get_cuda_rng_tracker().fork():
    inside = torch.rand(2)
b = torch.rand(2)
assert torch.equal(a, b) and not torch.equal(a, inside)
for call in (lambda: platform.require_gpu_feature("FP8"), lambda: platform.setup("cuda")):
    try:
        call()
    except UserError as exc:
        assert "\n" not in str(exc)
        print("error:", exc)
    else:
        raise AssertionError("no error")
print("ok")
"""


def test_cpu_redirects_and_gpu_only_errors():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert "error: FP8 needs an NVIDIA GPU" in proc.stdout
    assert "no CUDA GPU is visible" in proc.stdout


def test_no_device_is_hard_coded_outside_the_platform_module():
    pattern = re.compile(r"device\s*=\s*['\"]cuda|\.cuda\(\)|torch\.cuda\.current_device\(\)|['\"]cuda:\d")
    offenders = []
    for path in list((REPO / "megatron_mpo").rglob("*.py")) + list((REPO / "tools").glob("*.py")):
        if path.name == "platform.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders
