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


GPU_VISIBLE_PROBE = r"""
import os, subprocess, sys
import torch
# A machine whose GPU is visible (faked: this torch is CPU-only) running train.device=cpu.
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.backends.cuda.is_built = lambda: True
os.environ.pop("CUDA_VISIBLE_DEVICES", None)
# megatron-core decides some branches at import on torch.cuda.is_available(): its torch
# dist-checkpointing strategy then handles Transformer Engine's FP8 tensors (HAVE_TE).
import megatron.core.dist_checkpointing.strategies.torch as strategy
strategy.HAVE_TE = True  # as imported on that machine with TE installed
from megatron_mpo import platform
assert platform.setup("cpu").kind == "cpu"
assert torch.cuda.is_available() is False and torch.cuda.device_count() == 0, "CUDA still visible"
assert not platform.cuda_available()
assert strategy.HAVE_TE is False, "dist_checkpointing still takes the TE route"
assert torch.zeros(1, device="cuda").device.type == "cpu"
child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
                       capture_output=True, text=True, check=True).stdout.strip()
assert child == "''", f"a process this run starts sees CUDA_VISIBLE_DEVICES={child}"
print("ok")
"""


def test_cpu_mode_hides_a_visible_gpu():
    """train.device=cpu where a GPU is visible (the GPU kit's CPU half, issue 27 item 3) runs
    as on a machine without one: torch.cuda answers "no GPU", megatron-core's import-time
    CUDA branches take the CPU route, and processes it starts see no GPU."""
    proc = subprocess.run([sys.executable, "-c", GPU_VISIBLE_PROBE], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def _fake_gpu_without_c_compiler(monkeypatch) -> None:
    """This process as a GPU machine with no gcc / clang / $CC (Triton's own lookup)."""
    import shutil

    from megatron_mpo import platform

    monkeypatch.setattr(platform, "current", lambda: platform.Platform("cuda", "nccl"))
    monkeypatch.setattr(platform, "_COMPILE_PROBLEM", None, raising=False)  # probe afresh
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)


def test_without_a_c_compiler_the_jit_fusions_are_off(monkeypatch):
    """Triton builds its GPU launchers with a C compiler, so every torch.compile on a GPU fails
    without one ("Failed to find C compiler", issue 27 item 1). megatron-core's jit_fuser is
    torch.compile: its fused bias-dropout-add and bias-SwiGLU must be off there, and on where
    torch.compile works."""
    import shutil

    from megatron_mpo import platform
    from megatron_mpo.models import internvl
    from megatron_mpo.models.presets import get_preset

    tiny = get_preset("tiny")
    _fake_gpu_without_c_compiler(monkeypatch)
    lang, vision = internvl.language_transformer_config(tiny), internvl.vision_transformer_config(tiny)
    assert (lang.bias_dropout_fusion, lang.bias_activation_fusion, vision.bias_dropout_fusion) == (False,) * 3
    problem = platform.torch_compile_problem()
    assert "no C compiler" in problem and "gcc" in problem and "\n" not in problem, problem

    # $CC naming nothing runnable: Triton would run it as it is, and fail.
    monkeypatch.setattr(platform, "_COMPILE_PROBLEM", None)
    monkeypatch.setenv("CC", "/opt/no/such/cc")
    assert "CC=/opt/no/such/cc" in platform.torch_compile_problem()

    # A compiler Triton finds, and a one-line compile that works: the fusions are on.
    monkeypatch.setattr(platform, "_COMPILE_PROBLEM", None)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/gcc" if name == "gcc" else None)
    monkeypatch.setattr(platform, "_compile_smoke", lambda: None)
    lang = internvl.language_transformer_config(tiny)
    assert lang.bias_dropout_fusion and lang.bias_activation_fusion and platform.torch_compile_problem() is None

    # A compiler that cannot build Triton's launcher (e.g. no Python headers): off again.
    monkeypatch.setattr(platform, "_COMPILE_PROBLEM", None)
    monkeypatch.setattr(platform, "_compile_smoke", lambda: "torch.compile failed: Python.h: No such file")
    assert not internvl.language_transformer_config(tiny).bias_dropout_fusion
    # The CPU path never compiles: nothing to probe, fusions off.
    monkeypatch.setattr(platform, "current", lambda: platform.Platform("cpu", "gloo"))
    assert platform.torch_compile_problem() is None and not internvl.language_transformer_config(tiny).bias_dropout_fusion
