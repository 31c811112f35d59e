#!/usr/bin/env python
"""Can torch.compile build and run a kernel on this machine? (the GPU kit's env part)

Every GPU path of the trainer compiles: megatron-core's ``jit_fuser`` (bias-dropout-add,
bias-activation fusions) is torch.compile, and so is FlexAttention. Triton builds each
kernel's launcher with a C compiler, so on a machine without gcc / clang the first layer
fails ("Failed to find C compiler"). This names the compiler Triton would take
(``megatron_mpo.platform.c_compiler``), then compiles a tiny function on the device with
empty compile caches (a warm cache loads kernels built earlier and would hide a missing
compiler) and checks it against eager:

    python tools/gpu_kit/compile_probe.py [--device auto|cuda|cpu] [--cpu-dry-run]

Prints two lines starting ``compile probe:``; exits 0 when the compiled function ran and
matched eager, 1 otherwise (``--cpu-dry-run``: 0 with a note on a CPU). It sets no time
limit of its own: run_kit.sh runs it under ``timeout`` (what is left of the env part's
limit), which also ends the compiler processes. On a CPU (the kit's dry run) inductor's
C++ compiler does the work instead of Triton (scalar kernels: one compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "compile probe:"


def _say(text: str) -> None:
    print(f"{PREFIX} {text}", flush=True)


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # inductor wraps the compiler's own error
        exc = exc.__cause__
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}"


def _tiny(x, y):
    """Pointwise ops and a reduction: one fused kernel, launched through Triton's launcher."""
    import torch

    return (torch.nn.functional.gelu(x) * y + torch.sin(x)).sum(dim=-1)


def probe(device: str) -> bool:
    """Compile and run :func:`_tiny` on ``device``; report whether it matched eager."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(16, 256, generator=gen).to(device) for _ in range(2))
    started = time.perf_counter()
    try:
        got = torch.compile(_tiny)(x, y)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 -- whatever failed, compiled code cannot run here
        _say(f"torch.compile on {device}: FAILED after {time.perf_counter() - started:.1f} s: {_first_line(exc)}")
        return False
    seconds = time.perf_counter() - started
    want = _tiny(x, y)
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        _say(f"torch.compile on {device}: ran in {seconds:.1f} s but DIFFERS from eager (max |diff| {diff:.2e})")
        return False
    _say(f"torch.compile on {device}: ran and matched eager (max |diff| {diff:.1e}) in {seconds:.1f} s, "
         "empty compile caches")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="a failure on the CPU is a note, not an error (the CPU path runs eager)")
    args = parser.parse_args(argv)
    caches = tempfile.TemporaryDirectory(prefix="compile_probe_")
    # Read when inductor and Triton are imported: set before torch is.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(caches.name) / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(Path(caches.name) / "triton")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # one kernel: no worker pool
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    from megatron_mpo.platform import c_compiler

    cc, env_cc = c_compiler(), os.environ.get("CC")
    how = f"CC={env_cc}" if env_cc is not None else "CC unset: gcc, else clang, on PATH"
    if cc is None:
        _say(f"C compiler for Triton: none ({how}): every torch.compile'd GPU path fails; install gcc or set CC")
    else:
        _say(f"C compiler for Triton: {cc} ({how})")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # scalar C++ kernels: one compile, not inductor's ten instruction-set checks
        import torch._inductor.config as inductor_config

        inductor_config.cpp.vec_isa_ok = False
    try:
        if probe(device):
            return 0
        if device == "cpu" and args.cpu_dry_run:
            print("note: the compile probe failed on the CPU (a dry run: not failing; the CPU path runs eager)")
            return 0
        return 1
    finally:
        caches.cleanup()


if __name__ == "__main__":
    sys.exit(main())
