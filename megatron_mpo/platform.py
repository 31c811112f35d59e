"""The one place that knows which device the job runs on.

On a GPU machine this module is inert: CUDA + NCCL, megatron-core unchanged -- except that it
says whether torch.compile can run there (:func:`torch_compile_problem`: Triton builds its
launchers with a C compiler), which decides megatron-core's jit fusions and FlexAttention.

On a CPU machine (development boxes, CI), or with ``device=cpu`` on a GPU machine, it selects
gloo and redirects the handful of CUDA-only calls megatron-core makes, so that real
megatron-core code -- parallel_state, tensor-parallel layers, the pipeline schedules, the RNG
tracker, DDP, the optimizer and dist_checkpointing -- runs unchanged:

* visible GPUs are hidden: ``torch.cuda.is_available()`` is False and ``device_count()`` 0
  (megatron-core branches on them, some at import), and processes started from then on get
  ``CUDA_VISIBLE_DEVICES=""``, so the run behaves as on a machine without a GPU;

* a ``TorchFunctionMode`` maps any tensor factory / ``.to`` / ``.cuda`` asking for a CUDA
  device onto the CPU (covers ``device="cuda"`` and ``device=torch.cuda.current_device()``);
* ``torch.cuda.current_device`` / ``synchronize`` / ``get_rng_state`` / ``set_rng_state`` /
  ``manual_seed`` answer for the CPU;
* megatron-core's CUDA RNG helpers (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``) swap
  the CPU generator, so the model-parallel RNG tracker keeps distinct streams per rank;
* ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names, which megatron-core's
  distributed optimizer checks for;
* for mixture-of-experts layers: the all-to-all dispatcher's side stream (made once, in its
  ``__init__``, unless set), ``torch.cuda.current_stream`` and ``torch.cuda.stream`` become a
  host stand-in (it copies its split sizes to the host on that stream), and ``moe_utils.te_general_gemm`` is defined as
  None without Transformer Engine (megatron-core 0.16.1 reads the name it failed to import),
  and the dispatcher's split sizes become numpy arrays as they do on a GPU.

Nothing else in the project names a device: ask :func:`device` instead.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

from megatron_mpo.errors import UserError

__all__ = [
    "Platform",
    "current",
    "device",
    "to_device",
    "setup",
    "init_distributed",
    "cuda_available",
    "require_gpu_feature",
    "c_compiler",
    "torch_compile_problem",
    "jit_fusions",
]


@dataclass(frozen=True)
class Platform:
    """What the job runs on."""

    kind: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


_PLATFORM: Optional[Platform] = None
_CPU_MODE: Optional[TorchFunctionMode] = None
_COMPILE_PROBLEM: Optional[str] = None  # "" once probed without a problem


def cuda_available() -> bool:
    """True when a usable CUDA device exists (ignores our CPU redirects)."""
    return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0


def current() -> Platform:
    """The platform chosen by :func:`setup` (sets up with defaults on first use)."""
    return _PLATFORM if _PLATFORM is not None else setup()


def device() -> torch.device:
    """The torch device tensors of this process live on."""
    plat = current()
    if plat.is_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def engine_device(prefer: str = "auto") -> torch.device:
    """The device a generation engine of this process uses, without megatron's set-up.

    Engines (transformers, vLLM) run outside megatron-core, so no CPU redirects are
    installed; under torchrun each process takes the GPU of its local rank.
    """
    if prefer not in ("auto", "cuda", "cpu"):
        raise UserError(f"unknown device choice {prefer!r}: use auto, cuda or cpu")
    if prefer == "cuda" and not cuda_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible on this machine")
    if prefer != "cpu" and cuda_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def restrict_gpus(devices: str) -> None:
    """Make only ``devices`` (a ``CUDA_VISIBLE_DEVICES`` value) visible to the processes this
    one starts from now on: an engine that runs its own workers (vLLM) picks its GPUs so.

    This process's own view cannot change once CUDA is initialised in it; asking for other
    GPUs then is refused. Nothing happens unless called.
    """
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current == devices:
        return
    if torch.cuda.is_initialized():
        raise UserError(f"cannot switch to GPUs {devices}: CUDA is already in use in this process "
                        f"(CUDA_VISIBLE_DEVICES={current}); start the engine before anything uses the GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices


def to_device(module: torch.nn.Module) -> torch.nn.Module:
    """Move a built model chunk -- every parameter and buffer -- onto this process's device.

    Layers megatron-core builds with ``use_cpu_initialization`` and the project's own
    parameters start on the CPU; megatron-core's DDP copies only *trainable* parameters
    into its device buffer, so frozen parts and models without DDP (reference tool,
    evaluation) would stay behind without this.
    """
    return module.to(device())


def setup(prefer: str = "auto") -> Platform:
    """Choose CUDA+NCCL or CPU+gloo once per process.

    ``prefer`` is ``auto`` (CUDA when present), ``cuda`` (error without it) or ``cpu``
    (force the CPU path even on a GPU machine; used by tests).
    """
    global _PLATFORM
    if prefer not in ("auto", "cuda", "cpu"):
        raise UserError(f"unknown device choice {prefer!r}: use auto, cuda or cpu")
    if prefer == "cuda" and not cuda_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible on this machine")
    if _PLATFORM is not None:
        if prefer != "auto" and prefer != _PLATFORM.kind:
            raise UserError(
                f"platform already set up as {_PLATFORM.kind}; cannot switch to {prefer} "
                "inside one process"
            )
        return _PLATFORM
    if prefer != "cpu" and cuda_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _PLATFORM = Platform("cuda", "nccl")
    else:
        _install_cpu_redirects()
        _PLATFORM = Platform("cpu", "gloo")
    return _PLATFORM


def init_distributed(timeout_minutes: float = 10.0) -> None:
    """Start the default process group from torchrun's environment (or a 1-rank group).

    A single process without torchrun variables gets a world of one on a free local
    port, so every code path -- including megatron-core's parallel_state -- is the same.
    """
    plat = current()
    if torch.distributed.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        # A world of one needs no rendezvous: an in-process store cannot race for a port.
        # (The environment is left alone: child processes must not inherit a fake RANK.)
        torch.distributed.init_process_group(
            backend=plat.backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    torch.distributed.init_process_group(backend=plat.backend, timeout=timeout)


def free_port() -> int:
    """A TCP port nobody listens on right now (for single-node rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collective_device(group: Any = None, hint: Optional[torch.device] = None) -> torch.device:
    """Where tensors for a collective on ``group`` must live: NCCL reduces CUDA tensors only,
    gloo CPU ones. No platform set-up side effects, so library users can call it too."""
    if torch.distributed.get_backend(group) == "nccl":
        if hint is not None and hint.type == "cuda":
            return hint
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def require_gpu_feature(feature: str, *, min_capability: tuple[int, int] = (0, 0)) -> None:
    """Stop with one line when a GPU-only option is chosen on a machine that cannot run it."""
    if not current().is_cuda:
        raise UserError(f"{feature} needs an NVIDIA GPU, but this machine runs on CPU; turn it off")
    cap = torch.cuda.get_device_capability()
    if cap < min_capability:
        need = ".".join(map(str, min_capability))
        have = ".".join(map(str, cap))
        raise UserError(
            f"{feature} needs a GPU of compute capability >= {need} (Hopper or newer for FP8); "
            f"this GPU is {have}"
        )


def c_compiler() -> Optional[str]:
    """The C compiler Triton builds its GPU launchers with, looked up as Triton does (``$CC``
    as given, else gcc, else clang), or None when that lookup finds nothing runnable."""
    cc = os.environ.get("CC")
    if cc is not None:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("clang")


def torch_compile_problem() -> Optional[str]:
    """Why torch.compile cannot run in this process (one line), or None when it can.

    Only the GPU path compiles (megatron-core's ``jit_fuser`` is torch.compile; FlexAttention),
    and there Triton needs a C compiler for every kernel: without one the first layer fails.
    The CPU path runs eager, so there is nothing to probe. Probed once per process: the
    compiler lookup, then a one-line compile on the GPU.
    """
    global _COMPILE_PROBLEM
    if not current().is_cuda:
        return None
    if _COMPILE_PROBLEM is None:
        _COMPILE_PROBLEM = _probe_compile() or ""
    return _COMPILE_PROBLEM or None


def jit_fusions() -> bool:
    """Whether megatron-core's torch.compile'd fusions (bias-dropout-add, bias-SwiGLU) may be
    switched on: on a GPU where torch.compile runs."""
    return current().is_cuda and torch_compile_problem() is None


def _probe_compile() -> Optional[str]:
    if c_compiler() is None:
        cc = os.environ.get("CC")
        where = f"CC={cc} is not a program on PATH" if cc is not None else \
            "CC is unset and neither gcc nor clang is on PATH"
        return f"Triton finds no C compiler ({where})"
    return _compile_smoke()


def _compile_smoke() -> Optional[str]:
    """Compile and run a one-line function on the GPU: a compiler can be present and still
    fail to build Triton's launcher (no Python headers, a broken toolchain)."""
    try:
        got = torch.compile(_smoke)(torch.ones(4, device=device()))
        synchronize()
        return None if bool((got == 3).all()) else "torch.compile gave a wrong result for a one-line function"
    except Exception as exc:  # noqa: BLE001 -- whatever failed, compiled code cannot run here
        while exc.__cause__ is not None:
            exc = exc.__cause__
        text = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"torch.compile failed: {type(exc).__name__}: {text}"


def _smoke(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def synchronize() -> None:
    """Wait for queued device work (no-op on CPU)."""
    if current().is_cuda:
        torch.cuda.synchronize()


def max_memory_allocated() -> int:
    """Peak bytes held by tensors on the device since the last :func:`reset_peak_memory`
    (CPU: the process's peak resident set, Linux's VmHWM, which the reset clears; the
    lifetime peak where /proc is missing)."""
    if current().is_cuda:
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_memory() -> Optional[tuple[str, int]]:
    """(name, total bytes) of this process's GPU; None on CPU."""
    if not current().is_cuda:
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return torch.cuda.get_device_name(), int(props.total_memory)


def reset_peak_memory() -> None:
    """Start a new peak for :func:`max_memory_allocated` (per logging interval)."""
    if current().is_cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux >= 4.0: "5" resets the peak resident set size of the process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --------------------------------------------------------------------------------------
# CPU redirects
# --------------------------------------------------------------------------------------


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    # An int device index means a CUDA ordinal in torch's factory functions.
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


# megatron-core modules whose autograd Functions allocate on ``torch.cuda.current_device()``
# in backward (sequence-parallel gathers / reduce-scatters, the linear layers' input-gradient
# buffers, activation recomputation). The autograd engine runs backward without the
# TorchFunctionMode the forward ran under, so those calls would ask for a GPU.
_MODULES_WITH_CUDA_BACKWARD = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.moe.moe_utils",
)


class _HostStream:
    """What megatron-core's MoE dispatcher asks of a CUDA stream, on the host: there is one
    stream and everything on it has already happened."""

    def wait_stream(self, other: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_HostStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_HOST_STREAM = _HostStream()


def _redirect_moe() -> None:
    # Functions only: torch.cuda.Stream itself stays (other libraries annotate with it).
    torch.cuda.current_stream = lambda *a, **k: _HOST_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: _HOST_STREAM  # type: ignore[assignment]
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The dispatcher makes its side stream once, in __init__, unless the class has one.
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HOST_STREAM

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # The dispatcher's all-to-all split sizes: on a GPU they reach the host as numpy arrays;
    # already on the host they would stay tensors, which all_to_all_single refuses.
    to_host = moe_utils.maybe_move_tensor_to_cpu

    def host_copy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = host_copy


def _redirect_autograd_backwards(module: Any) -> int:
    """Run the backward of every autograd Function defined in ``module`` under the CPU mode."""
    patched = 0
    for value in list(vars(module).values()):
        if not (isinstance(value, type) and issubclass(value, torch.autograd.Function)):
            continue
        if value.__module__ != module.__name__ or getattr(value.backward, "_mpo_on_cpu", False):
            continue
        value.backward = staticmethod(_backward_on_cpu(value.backward))
        patched += 1
    return patched


def _backward_on_cpu(backward: Any) -> Any:
    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        with _CudaToCpu():
            return backward(ctx, *grads)

    run._mpo_on_cpu = True  # type: ignore[attr-defined]
    return run


def _hide_cuda() -> None:
    """Make this process, and those it starts, see no GPU (``device=cpu`` on a GPU machine).

    megatron-core branches on ``torch.cuda.is_available()`` -- at import in
    ``dist_checkpointing.strategies.torch`` (whether it handles Transformer Engine's FP8
    tensors) -- and a started process (data worker, tool) would otherwise see the GPUs and
    could open a CUDA context on one. ``CUDA_VISIBLE_DEVICES`` only binds CUDA initialised
    after it, hence the patched answers for this process.
    """
    if torch.backends.cuda.is_built():  # a CPU-only torch has nothing to hide
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0
    strategy = sys.modules.get("megatron.core.dist_checkpointing.strategies.torch")
    if strategy is not None:  # imported before the platform was set up
        strategy.HAVE_TE = False


def _install_cpu_redirects() -> None:
    """Point megatron-core's CUDA-only calls at the CPU. Called once, in CPU mode."""
    global _CPU_MODE
    if _CPU_MODE is not None:
        return

    _hide_cuda()

    torch.cuda.current_device = lambda: 0  # used as a device index; mapped to CPU above
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (lazy, harmless on CPU):
    # redirecting only manual_seed keeps that call chain free of recursion.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.empty_cache = lambda: None

    from megatron.core.tensor_parallel import random as mcore_random

    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = get_rng_state
    mcore_random._set_cuda_rng_state = set_rng_state
    # Every draw under the tracker's fork() moves "the CPU state" (here the one generator)
    # and megatron-core logs a warning for it: once per drop-path mask, per layer and step.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")

    for module in _MODULES_WITH_CUDA_BACKWARD:
        _redirect_autograd_backwards(importlib.import_module(module))
    _redirect_moe()

    _CPU_MODE = _CudaToCpu()
    _CPU_MODE.__enter__()  # process-wide; torch keeps the mode on its stack until exit
