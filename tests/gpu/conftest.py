"""GPU checks: ``python -m pytest -q -m gpu tests/gpu`` on a machine with an NVIDIA GPU.

Every test under tests/gpu carries the ``gpu`` marker, which pytest.ini deselects by default
(``-m "not gpu"``), so CI never runs them; a later ``-m gpu`` selects them. Without CUDA each
is skipped with the one-line reason "needs CUDA".

``MPO_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead (slow, and the CPU/GPU comparisons
then compare the CPU with itself): it checks the tests' own plumbing on a machine without a
GPU, not the GPU. ``MPO_GPU_KIT_OUT=DIR`` makes tests write the numbers they compared there
(``tools/gpu_kit/run_kit.sh`` sets it). ``MPO_GPU_TEST_TIMEOUT`` (seconds, default 150) is
the per-test limit; a test marked ``gpu_timeout(n)`` gets ``n``; ``MPO_GPU_TEST_TIMEOUT_SCALE``
multiplies every limit (per test and per subprocess) on slow or shared machines.

Subprocesses get ``PYTHONPATH`` = repository + the caller's ``PYTHONPATH``: on the GPU kit's
machine megatron-core lives in a ``--target`` folder named only there (tests/distributed.py's
``worker_env`` replaces ``PYTHONPATH``, so these tests do not use it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ON_CPU = os.environ.get("MPO_GPU_TESTS_ON_CPU") == "1"
HAVE_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAVE_CUDA and not ON_CPU else "cpu"
DEFAULT_TIMEOUT_S = int(os.environ.get("MPO_GPU_TEST_TIMEOUT", "150"))
# Stretches every limit here (per test and per subprocess), for slow or shared machines.
TIMEOUT_SCALE = float(os.environ.get("MPO_GPU_TEST_TIMEOUT_SCALE", "1"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu_timeout(seconds): per-test time limit of a tests/gpu test")


def _under_here(item: pytest.Item) -> bool:
    return HERE in Path(str(item.fspath)).resolve().parents


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test here without the marker still gets it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A skipif placed first: evaluated before the tests' own skipif marks (e.g. "no TE").
    needs_cuda = pytest.mark.skipif(True, reason="needs CUDA")
    for item in items:
        if not _under_here(item):
            continue  # collection hooks see the whole session
        item.add_marker(pytest.mark.gpu)
        if not HAVE_CUDA and not ON_CPU:
            item.add_marker(needs_cuda, append=False)


class GpuTestTimeout(Exception):
    """A tests/gpu test ran past its limit."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a test that runs past its limit (SIGALRM; subprocess.run kills its child then)."""
    if not _under_here(item) or not hasattr(signal, "SIGALRM"):
        yield
        return
    marker = item.get_closest_marker("gpu_timeout")
    limit = max(1, int((int(marker.args[0]) if marker else DEFAULT_TIMEOUT_S) * TIMEOUT_SCALE))

    def expire(signum, frame):
        raise GpuTestTimeout(f"{item.name} ran past its {limit} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- subprocesses ------------------------------------------------------------------------------


def kit_env(extra: Optional[dict] = None) -> dict:
    """The caller's environment with the repository prepended to PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra or {})
    return env


def python_command(*args: str) -> list[str]:
    """``python -m module ...`` (first arg ``-m module``) or ``python REPO/script ...``."""
    head = args[0].split() if args[0].startswith("-m ") else [str(REPO / args[0])]
    return [sys.executable, *head, *map(str, args[1:])]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def run_python(*args: str, log: Path, timeout: int = 150, env: Optional[dict] = None) -> None:
    """Run a tool or module to completion; fail the test with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(python_command(*args), cwd=REPO, env=kit_env(env), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout * TIMEOUT_SCALE)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args[:1])} failed with code {proc.returncode}; log {log}:\n{tail(log)}")


class Background:
    """A subprocess run alongside the test (the CPU half of a CPU/GPU comparison); killed
    when the test ends early."""

    def __init__(self, *args: str, log: Path, env: Optional[dict] = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.args, self.log = args, log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(python_command(*args), cwd=REPO, env=kit_env(env), stdout=self._out,
                                     stderr=subprocess.STDOUT)

    def wait(self, timeout: int = 150) -> None:
        try:
            code = self.proc.wait(timeout=timeout * TIMEOUT_SCALE)
        finally:
            self.stop()
        if code != 0:
            pytest.fail(f"{self.args[0]} failed with code {code}; log {self.log}:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def background() -> Iterator[list]:
    """Register Background runs here; any still running when the test ends are killed."""
    runs: list[Background] = []
    yield runs
    for run in runs:
        run.stop()


# ---- shared fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def kit_out() -> Optional[Path]:
    """Where tests leave the numbers they compared (MPO_GPU_KIT_OUT), or None."""
    out = os.environ.get("MPO_GPU_KIT_OUT")
    if not out:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)


@pytest.fixture(scope="session")
def gpu_workspace(tmp_path_factory) -> Path:
    """tok/, raw/, shards/ (synthetic MMPR, 4 shards) and init/ (the tiny preset, seed 1):
    what tests/conftest.py's ``workspace`` builds, without its reference values (they
    depend on device and dtype here) and with subprocesses that keep PYTHONPATH."""
    from megatron_mpo.data.synthetic import write_synthetic_mmpr
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    ws = tmp_path_factory.mktemp("gpu_ws")
    build_tiny_tokenizer(str(ws / "tok"))
    meta = write_synthetic_mmpr(str(ws / "raw"), num_records=48, seed=3)
    run_python("tools/make_shards.py", "--meta", meta, "--out", str(ws / "shards"), "--samples-per-shard", "16",
               log=ws / "logs" / "make_shards.log", timeout=120)
    run_python("tools/init_checkpoint.py", "--preset", "tiny", "--tokenizer", str(ws / "tok"), "--out",
               str(ws / "init"), "--seed", "1", log=ws / "logs" / "init_checkpoint.log", timeout=120)
    return ws


@pytest.fixture
def full_fp32() -> Iterator[None]:
    """Plain fp32 matmuls and cuDNN convolutions (no TF32) for one test, set back after.

    Through torch's own settings -- ``fp32_precision`` where this torch has it, else the
    ``allow_tf32`` flags -- saved and restored here: ``monkeypatch`` cannot restore these
    module-level properties (pytest 9.2 deletes, at teardown, an attribute it did not find in
    the object's ``__dict__``: "'cuBLASModule' object has no attribute 'allow_tf32'")."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        wanted = [(matmul, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")]
    else:
        wanted = [(matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in wanted]
    try:
        for owner, name, value in wanted:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@pytest.fixture(scope="module")
def world():
    """A one-process world on the test device for the module's in-process tests."""
    from megatron_mpo import parallel

    layout = parallel.initialize(1, 1, seed=1234, device=DEVICE)
    yield layout
    parallel.shutdown()
