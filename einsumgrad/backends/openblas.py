"""NumPy's own OpenBLAS, called by address from the compiled kernels.

NumPy's wheels bring OpenBLAS with a thread pool of its own (pthreads). Beside
MKL's OpenMP team a product on that pool leaves each pool's idle threads
spinning on the cores the other needs (see :func:`einsumgrad.backends.mkl.measure`),
so the NumPy backend runs its multi-threaded products on MKL's team. Where MKL's
GEMM is the slower (on AMD CPUs MKL takes a generic path), :func:`team_matmul`
in :mod:`.kernels` instead splits a product's rows among that team, each thread
calling OpenBLAS on its block with OpenBLAS set to one thread: OpenBLAS's
kernels, one pool.

Found where NumPy links an OpenBLAS its wheels ship in ``numpy.libs`` (64-bit
integers, its symbols prefixed ``scipy_`` and suffixed ``64_`` since NumPy 2,
suffixed ``64_`` before); None elsewhere (a NumPy on MKL or Accelerate).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading

import numpy


SMALL_WORK = 10 ** 6
"""Multiply-adds up to which OpenBLAS (0.3.17 on, x86-64) may run a product on its
small-matrix kernels, which skip packing the operands (its ``gemm_small_matrix_permit``;
measured: a 1952 x 64 @ 64 x 8 float64 product at 52 GFLOP/s, 1954 rows at 23).
Whether a product cut into such blocks runs faster is measured
(:func:`einsumgrad.backends.mkl.measure`): the kernels differ by CPU."""


_MIN_BLOCK = 32  # rows (or columns) a block keeps at least: each block packs the other operand


def small_parts(m: int, n: int, k: int, workers: int = 1) -> int:
    """How many blocks of the longer side of an ``m x k @ k x n`` product keep each
    within :data:`SMALL_WORK` multiply-adds, as a multiple of ``workers`` (each
    thread an equal run of them); 0 where the product needs no cut or a block
    would keep under :data:`_MIN_BLOCK` rows (a square product)."""
    work = m * n * k
    if work <= SMALL_WORK:
        return 0
    blocks = -(-work // SMALL_WORK)
    blocks = -(-blocks // workers) * workers
    return blocks if max(m, n) // blocks >= _MIN_BLOCK else 0


@functools.lru_cache(maxsize=None)
def _library() -> tuple | None:
    """``(lib, prefix, suffix)`` of the OpenBLAS NumPy loaded, or None."""
    here = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(here, "lib*openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)  # the copy NumPy loaded: the same handle
        except OSError:
            continue
        for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("", "")):
            names = (f"{prefix}cblas_dgemm{suffix}", f"{prefix}cblas_sgemm{suffix}",
                     f"{prefix}openblas_set_num_threads{suffix}",
                     f"{prefix}openblas_get_num_threads{suffix}")
            if all(hasattr(lib, n) for n in names):
                return lib, prefix, suffix
    return None


def available() -> bool:
    """Whether NumPy's OpenBLAS was found (see the module's docstring)."""
    return _library() is not None


def ilp64() -> bool:
    """Whether its integers are 64 bits wide (its ``?gemm`` then takes ``int64`` sizes)."""
    got = _library()
    return got is not None and got[2] == "64_"


@functools.lru_cache(maxsize=None)
def gemm_address(dtype) -> int:
    """The address of its ``cblas_sgemm`` (float32) or ``cblas_dgemm`` (float64)."""
    lib, prefix, suffix = _library()
    name = f"{prefix}cblas_{'s' if numpy.dtype(dtype) == numpy.float32 else 'd'}gemm{suffix}"
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


@functools.lru_cache(maxsize=None)
def _counts() -> tuple:
    """Its ``openblas_get_num_threads`` and ``openblas_set_num_threads``."""
    lib, prefix, suffix = _library()
    return tuple(getattr(lib, f"{prefix}openblas_{verb}_num_threads{suffix}")
                 for verb in ("get", "set"))


def threads() -> int:
    """Its thread count now."""
    return _counts()[0]()


def set_threads(n: int) -> None:
    """Set its thread count (for the whole process, as ``threadpoolctl`` does)."""
    _counts()[1](n)


class _OneThread:
    """``with one_thread:`` OpenBLAS at one thread inside, its count as it was after;
    calls on several threads at once nest: the first sets it, the last restores it."""

    def __init__(self):
        self._lock, self._inside, self._saved = threading.Lock(), 0, 1

    def __enter__(self):
        with self._lock:
            if not self._inside:
                self._saved = threads()
                set_threads(1)
            self._inside += 1

    def __exit__(self, *exc):
        with self._lock:
            self._inside -= 1
            if not self._inside:
                set_threads(self._saved)


one_thread = _OneThread()
