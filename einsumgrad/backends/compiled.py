"""Kernels compiled from generated source, kept on disk by numba's cache.

A kernel whose loops are specialized to constants (a fused chain's steps, a
convolution's window) is written out as a module in a cache folder and
imported, so numba's disk cache finds it again in the next process.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

_kernels: dict = {}


def cache_dir() -> str:
    """Where kernel sources (and numba's cache beside them) live:
    ``$EINSUMGRAD_CACHE/fused``, else ``~/.cache/einsumgrad/fused``."""
    base = os.environ.get("EINSUMGRAD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "einsumgrad")
    return os.path.join(base, "fused")


def compile_kernel(src: str):
    """The kernel of this source: loaded from the cache folder (numba's disk cache
    beside it), or compiled in memory where the folder cannot be written."""
    kernel = _kernels.get(src)
    if kernel is not None:
        return kernel
    digest = hashlib.sha1(src.encode()).hexdigest()[:20]
    name = f"einsumgrad_fused_{digest}"
    try:
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name + ".py")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(src.replace("cache=CACHE", "cache=True"))
            os.replace(tmp, path)  # atomic: another process may be writing the same
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # numba's cache finds the kernel's module by name
        spec.loader.exec_module(mod)
    except OSError:
        mod = type(sys)(name)
        exec(compile(src.replace("cache=CACHE", "cache=False"), name, "exec"), mod.__dict__)
    kernel = _kernels[src] = mod.kernel
    return kernel
