"""What a process prints besides its own progress: third-party warnings and failures.

Every entry point calls :func:`setup_console` once, before it imports megatron-core
(which warns at import time). It

* drops the third-party warnings and log records listed in :data:`HARMLESS_WARNINGS` and
  :data:`HARMLESS_LOG_RECORDS` (each with the reason it is harmless);
* shows every other warning at its real caller: on the CPU, torch calls run inside the
  platform module's ``TorchFunctionMode`` (:mod:`megatron_mpo.platform`), so torch's own
  warnings would otherwise all point at that redirect.

:func:`report_failure` is what :func:`exit_on_user_error` does with an
exception, under torchrun or not:

* rank 0 prints it (a UserError as ``error: <message>``, anything else as a traceback);
* another rank first waits up to :data:`RANK0_GRACE_S` to learn whether rank 0 failed the
  same way (then it stays silent) -- torchrun stops the other ranks once rank 0 has
  failed, and with a process group the ranks compare messages through its store; an error
  of that rank alone prints with a ``[rank N]`` prefix;
* the one-line message goes to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so
  torchrun's failure summary names it instead of a link to its docs;
* the exit code is 2 for a UserError, 1 otherwise.

:func:`failure_line` finds that one line again in a failed job's output (the demo quotes it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from megatron_mpo.errors import UserError

__all__ = ["HARMLESS_WARNINGS", "HARMLESS_LOG_RECORDS", "setup_console", "is_harmless", "report_failure",
           "process_rank", "failure_line", "exit_on_user_error"]

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Harmless:
    """A known third-party message, dropped where all three match."""

    kind: str  # a warning category (it and its subclasses), or "log record"
    pattern: str  # a regex matched at the start of the message
    origin: str  # a regex searched in the warning's real caller's file; a log record's logger name
    reason: str
    cpu_only: bool = False  # harmless only where no CUDA device is visible


HARMLESS_WARNINGS = (
    Harmless("UserWarning", r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed",
             r"megatron/core/",
             "megatron-core announces that it uses its torch fallbacks (no TE / apex, e.g. on the CPU); "
             "the project picks TE layers itself (model.spec) and refuses TE-only options without TE"),
    Harmless("UserWarning", r"full scope is deprecated", r"megatron/core/",
             "megatron-core 0.16.1's own TransformerConfig default (cuda_graph_scope='full') triggers it; "
             "the project does not use CUDA graphs"),
    Harmless("FutureWarning", r"`load_state_dict` is deprecated", r"megatron/core/dist_checkpointing/",
             "torch.distributed.checkpoint API called by megatron-core's dist_checkpointing (pinned 0.16.1)"),
    Harmless("FutureWarning", r"Please use DTensor instead and we are deprecating ShardedTensor",
             r"megatron/core/dist_checkpointing/",
             "torch's notice for ShardedTensor, which megatron-core's dist_checkpointing is built on"),
    Harmless("FutureWarning", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
             r"torch/distributed/c10d_logger\.py$",
             "megatron-core 0.16.1 binds these torch 2.13 names at import (tensor_parallel/mappings.py and "
             "layers.py, distributed/param_and_grad_buffer.py) and calls them under sequence, expert and "
             "data parallelism; they still work (torch forwards them to all_gather_single / "
             "reduce_scatter_single). torch places the warning in its c10d exception-logger wrapper"),
    Harmless("UserWarning", r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
             r"megatron/core/optimizer/",
             "megatron-core's distributed optimizer zeroes the .grad of its fp32 shard views (marked "
             "'throws grad-access warning' in its source); it assigns those gradients itself"),
    Harmless("UserWarning", r"When using (async grad allreduce|sequence parallelism) it is recommended to set "
             r"the environment variable CUDA_DEVICE_MAX_CONNECTIONS", r"megatron/core/tensor_parallel/",
             "a CUDA stream-ordering performance hint, meaningless on the CPU (shown on GPUs; the launchers "
             "in examples/launch and the Dockerfile set CUDA_DEVICE_MAX_CONNECTIONS=1)", cpu_only=True),
)

HARMLESS_LOG_RECORDS = (
    Harmless("log record", r"Unknown MLP type", "megatron.core.transformer.transformer_layer",
             "the project's layer specs give megatron-core's TransformerLayer an MLP through a ModuleSpec it "
             "does not list, so it passes the default kwargs -- the ones that MLP takes"),
)

RANK0_GRACE_S = 5.0  # how long another rank waits for rank 0's verdict before it prints
_PLATFORM_FILE = str(Path(__file__).with_name("platform.py"))
_STORE_PREFIX = "megatron_mpo/failure/"
_installed = False


# ---- warnings and log records ----------------------------------------------------------


def setup_console() -> None:
    """Drop known-harmless third-party output; show other warnings at their real caller."""
    global _installed
    if _installed:
        return
    _installed = True
    for known in HARMLESS_LOG_RECORDS:
        logging.getLogger(known.origin).addFilter(_drop_records(known.pattern))
    warnings.showwarning = _filtered_and_attributed(warnings.showwarning)


def is_harmless(category: type, message: str, filename: str) -> bool:
    """True for a warning listed in HARMLESS_WARNINGS (``filename``: its real caller)."""
    kinds = {cls.__name__ for cls in category.__mro__}
    return any(known.kind in kinds and re.match(known.pattern, message) and re.search(known.origin, filename)
               and not (known.cpu_only and _cuda_visible()) for known in HARMLESS_WARNINGS)


def _cuda_visible() -> bool:
    from megatron_mpo.platform import cuda_available

    return cuda_available()


def _drop_records(pattern: str) -> logging.Filter:
    class DropKnown(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not re.match(pattern, record.getMessage())

    return DropKnown()


def _filtered_and_attributed(show):
    """Wrap ``warnings.showwarning``: move a warning placed in platform.py to its real
    caller, then drop it if it is known-harmless."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if filename == _PLATFORM_FILE:
            frame = real_caller(sys._getframe(1))
            if frame is not None:
                filename, lineno, line = frame.f_code.co_filename, frame.f_lineno, None
        if not is_harmless(category, str(message), filename.replace(os.sep, "/")):
            show(message, category, filename, lineno, file, line)

    return showwarning


def real_caller(frame: Any) -> Any:
    """The code that called into torch, seen from a stack that passes through platform.py.

    The CPU redirect runs torch functions from its own frame, so a warning raised in torch
    (C++ ``TORCH_WARN``, or ``warnings.warn(stacklevel=...)`` counted through torch's
    dispatch) names that frame. Outward from it, the first frame outside platform.py,
    torch's package and typing_extensions (whose ``@deprecated`` wraps torch APIs) is the
    caller the warning is about (None if there is none).
    """
    passing = tuple(os.path.dirname(m.__file__) + os.sep if name == "torch" else m.__file__
                    for name, m in ((n, sys.modules.get(n)) for n in ("torch", "typing_extensions"))
                    if getattr(m, "__file__", None))
    while frame is not None and frame.f_code.co_filename != _PLATFORM_FILE:
        frame = frame.f_back
    while frame is not None and (frame.f_code.co_filename == _PLATFORM_FILE or
                                 frame.f_code.co_filename.startswith(passing)):
        frame = frame.f_back
    return frame


# ---- failures ---------------------------------------------------------------------------


def process_rank() -> int:
    """This process's global rank (torchrun's RANK; 0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def report_failure(exc: BaseException) -> int:
    """Print ``exc`` by the rank rule of this module, record it for torchrun; the exit code."""
    code = 2 if isinstance(exc, UserError) else 1
    text = f"error: {exc}" if isinstance(exc, UserError) else "".join(traceback.format_exception(exc)).rstrip()
    summary = text if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}".splitlines()[0]
    rank = process_rank()
    store = _default_store()
    if rank == 0:
        _publish(store, summary)
    elif _rank0_failed_alike(store, summary):
        return code  # rank 0 has said it (torchrun has usually stopped this process by now)
    else:
        text = "\n".join(f"[rank {rank}] {line}" for line in text.splitlines())
    _write_error_file(summary, text)
    print(text, file=sys.stderr, flush=True)
    return code


def failure_line(output: str) -> str:
    """The line a failed job's output names its error by: the last ``error: ...`` (or
    ``[rank N] error: ...``) line, else the last line (torchrun's summary ends the output)."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if re.match(r"(\[rank \d+\] )?error: ", line)]
    return (errors or lines or ["(no output)"])[-1]


def _rank0_failed_alike(store: Any, summary: str) -> bool:
    """Wait up to RANK0_GRACE_S for rank 0's failure; True when it is this one.

    torchrun ends this process as soon as rank 0 has failed (SIGTERM, which must kill now:
    the trainer's preemption handler would only set a flag). Without a process group store
    the wait is all there is; with one, rank 0's message decides at once.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    deadline = time.monotonic() + RANK0_GRACE_S
    while time.monotonic() < deadline:
        theirs = _read(store)
        if theirs is not None:
            return theirs == summary
        time.sleep(0.05)
    return False


def _default_store() -> Any:
    """The default process group's store, when this process has one."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # no torch.distributed, or a store already torn down
        pass
    return None


def _publish(store: Any, summary: str) -> None:
    if store is None:
        return
    try:
        store.set(_STORE_PREFIX + "0", summary)
    except Exception:  # the store's host may be gone already; torchrun's summary still has it
        pass


def _read(store: Any) -> Optional[str]:
    if store is None:
        return None
    key = _STORE_PREFIX + "0"
    try:
        return store.get(key).decode() if store.check([key]) else None
    except Exception:
        return None


def _write_error_file(summary: str, text: str) -> None:
    """torchrun's error file, in the format its summary reads (``traceback :`` shows ``py_callstack``)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    body = {"message": {"message": summary, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(body, f)
    except OSError:
        pass


def exit_on_user_error(main: F) -> F:
    """Decorate an entry point so a UserError prints `error: <message>` and exits 2.

    Under torchrun an error every rank hits prints once (rank 0), one rank's own error with
    a ``[rank N]`` prefix, and any other exception likewise (exit 1); see
    :func:`report_failure`.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            raise SystemExit(report_failure(exc)) from None
        except Exception as exc:
            if "RANK" not in os.environ:
                raise  # a single process: Python's own traceback and exit code
            raise SystemExit(report_failure(exc)) from None

    return wrapper  # type: ignore[return-value]
