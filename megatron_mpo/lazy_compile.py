"""megatron-core's ``jit_fuser`` builds its ``torch.compile`` wrappers on first call, not at import.

megatron-core 0.16.1 decorates ~40 functions with ``jit_fuser`` (= ``torch.compile``) as its
modules are imported. Building a ``torch.compile`` wrapper imports TorchDynamo and Inductor:
about 1.6 of the ~4 s every process spends importing ``megatron.core`` (the trainer, the
reference tool, each data-parallel rank, each helper), whether or not a fused function is
ever called -- on the CPU and where the platform turns the jit fusions off, none is.
Nothing is compiled at decoration time either way, so deferring the wrapper changes no
result: the first call builds it and compiles exactly as before.

:func:`install` (run by ``megatron_mpo/__init__.py``, so it precedes any import of
megatron-core by this package) watches for ``megatron.core.jit`` and swaps its
``jit_fuser`` for :func:`deferred`; a process that imported megatron-core before this
package keeps the eager wrappers.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any, Callable, Optional

__all__ = ["deferred", "install", "JIT_MODULE"]

JIT_MODULE = "megatron.core.jit"


def deferred(compile_fn: Callable) -> Callable:
    """``compile_fn`` (a ``torch.compile``-like decorator, bare or with keyword arguments)
    applied on a function's first call instead of when it is decorated."""

    def decorate(fn: Optional[Callable] = None, **options: Any):
        if fn is None:  # @jit_fuser(mode=...)
            return lambda f: decorate(f, **options)
        compiled: list = []

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(compile_fn(fn, **options))
            return compiled[0](*args, **kwargs)

        call.__wrapped_compile__ = compile_fn  # what the first call compiles with (tests)
        return call

    return decorate


class _JitFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` as usual and defers its ``jit_fuser`` once it has run."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            torch = sys.modules.get("torch")
            if torch is not None and getattr(module, "jit_fuser", None) is getattr(torch, "compile", None):
                module.jit_fuser = deferred(torch.compile)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Defer megatron-core's jit wrappers in this process (idempotent)."""
    if JIT_MODULE not in sys.modules and not any(isinstance(f, _JitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFinder())
