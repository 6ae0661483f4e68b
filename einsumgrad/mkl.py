"""MKL kernels for the NumPy backend, when the ``mkl`` wheel is installed.

NumPy's wheels bring OpenBLAS and no vector math library; torch's bring MKL.
On the 2-core bench machine MKL's GEMM runs the same float64 product 1.3x
faster (5120x256 @ 256x784: 12.8 ms against 16.4), and its vector math (VML)
gives the normal CDF of GELU in 0.3 ms where NumPy float32 passes take 1.7
(524k entries, one thread). With ``pip install einsumgrad[mkl]`` the NumPy
backend calls, through ctypes on the arrays NumPy holds (no copy, no other
array type):

* ``matmul``: ``cblas_?gemm`` / ``cblas_?gemm_batch``. Products BLAS cannot
  take as laid out are copied first, as NumPy does; other dtypes and small
  products (where a ctypes call costs more than it saves, and OpenBLAS runs on
  one thread, so the two thread pools never contend) go to ``numpy.matmul``.
* ``erf`` and ``normal_cdf``: ``v?Erf`` and ``v?CdfNorm`` (high-accuracy mode,
  about 1 ulp) on float32 and float64.

``EINSUMGRAD_MKL=0`` turns it all off. Thread counts follow ``MKL_NUM_THREADS``
and ``threadpoolctl``, as for any MKL; MKL runs on the OpenMP runtime already
in the process, so with torch imported ``torch.set_num_threads`` moves it too.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Callable

import numpy

_MIN_WORK = 1 << 16  # m*n*k below this: numpy.matmul (a ctypes call is ~5 us)
_ROW, _NOTRANS, _TRANS = 101, 111, 112
_INT, _PTR = ctypes.c_int, ctypes.c_void_p
_INT_LIMIT = 2 ** 31


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EINSUMGRAD_MKL", "1") == "0":
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _as_blas(a: numpy.ndarray, rows: int, cols: int):
    """(transpose flag, leading dimension) that hands the last two axes of ``a``
    to BLAS as they lie, or None if they are not a row- or column-major matrix."""
    item = a.itemsize
    s0, s1 = a.strides[-2:]
    if rows == 1:
        s0 = cols * item if s1 == item else s0  # a lone row: any stride will do
    if cols == 1:
        s1 = item if s0 != item else s1
    if s1 == item and s0 % item == 0 and s0 >= max(cols, 1) * item:
        return _NOTRANS, s0 // item
    if s0 == item and s1 % item == 0 and s1 >= max(rows, 1) * item:
        return _TRANS, s1 // item
    return None


def _kernel(lib: ctypes.CDLL) -> Callable:
    gemm = {numpy.dtype(numpy.float64): (lib.cblas_dgemm, ctypes.c_double),
            numpy.dtype(numpy.float32): (lib.cblas_sgemm, ctypes.c_float)}
    batch = {numpy.dtype(numpy.float64): lib.cblas_dgemm_batch,
             numpy.dtype(numpy.float32): lib.cblas_sgemm_batch}

    def matmul(a, b):
        """``numpy.matmul(a, b)``, by MKL where BLAS can take the operands."""
        if a.dtype != b.dtype or a.dtype not in gemm or 0 in (a.ndim, b.ndim):
            return numpy.matmul(a, b)
        x = a if a.ndim > 1 else a[None]        # vectors as 1-row / 1-column matrices
        y = b if b.ndim > 1 else b[:, None]
        (m, k), (k2, n) = x.shape[-2:], y.shape[-2:]
        # Small products stay with NumPy: there a ctypes call costs more than
        # it saves, and OpenBLAS runs them on one thread (no pool to contend with).
        if k != k2 or m * n * k < _MIN_WORK:
            return numpy.matmul(a, b)
        try:
            lead = numpy.broadcast_shapes(x.shape[:-2], y.shape[:-2])
        except ValueError:
            return numpy.matmul(a, b)  # NumPy says which shapes clash
        ta = _as_blas(x, m, k)
        if ta is None:
            x = numpy.ascontiguousarray(x)
            ta = _NOTRANS, k
        tb = _as_blas(y, k, n)
        if tb is None:
            y = numpy.ascontiguousarray(y)
            tb = _NOTRANS, n
        if max(m, n, k, ta[1], tb[1]) >= _INT_LIMIT:
            return numpy.matmul(a, b)  # past MKL's 32-bit integers
        out = numpy.empty(lead + (m, n), dtype=a.dtype)
        if out.size == 0:
            return numpy.matmul(a, b)  # an empty batch
        fn, scalar = gemm[a.dtype]
        one, zero = scalar(1.0), scalar(0.0)
        if not lead:
            fn(_ROW, ta[0], tb[0], m, n, k, one, _PTR(x.ctypes.data), ta[1],
               _PTR(y.ctypes.data), tb[1], zero, _PTR(out.ctypes.data), n)
        else:  # one batched call: every matrix's address, from broadcast strides
            pa, pb, pc = (v.ctypes.data + _offsets(v.shape[:-2], v.strides[:-2], lead)
                          for v in (x, y, out))
            ref = lambda v: ctypes.byref(_INT(v))
            batch[a.dtype](_ROW, ref(ta[0]), ref(tb[0]), ref(m), ref(n), ref(k),
                           ctypes.byref(one), _PTR(pa.ctypes.data), ref(ta[1]),
                           _PTR(pb.ctypes.data), ref(tb[1]), ctypes.byref(zero),
                           _PTR(pc.ctypes.data), ref(n), _INT(1), ref(pa.size))
        if a.ndim == 1:
            out = out[..., 0, :]
        return out[..., 0] if b.ndim == 1 else out
    return matmul


def _offsets(shape: tuple, strides: tuple, lead: tuple) -> numpy.ndarray:
    """Byte offsets of each matrix of an operand broadcast to the batch shape ``lead``."""
    off = numpy.zeros((), dtype=numpy.int64)
    pad = len(lead) - len(shape)
    for axis, size in enumerate(lead):
        if axis >= pad and shape[axis - pad] == size and size > 1:
            step = numpy.arange(size, dtype=numpy.int64) * strides[axis - pad]
            off = off[..., None] + step
        else:
            off = off[..., None] + numpy.zeros(size, dtype=numpy.int64)
    return off.reshape(-1).astype(numpy.uintp)


def _vector(lib: ctypes.CDLL, single: str, double: str) -> Callable:
    fns = {numpy.dtype(numpy.float32): getattr(lib, single),
           numpy.dtype(numpy.float64): getattr(lib, double)}

    def apply(x):
        """The function on a float32 / float64 array, or None for other dtypes."""
        fn = fns.get(x.dtype)
        if fn is None:
            return None
        flat = numpy.ascontiguousarray(x).reshape(-1)
        out = numpy.empty(flat.shape, x.dtype)
        for s in range(0, flat.size, _VECTOR_CHUNK):  # n is a C int
            e = min(s + _VECTOR_CHUNK, flat.size)
            fn(_INT(e - s), _PTR(flat[s:].ctypes.data), _PTR(out[s:].ctypes.data))
        return out.reshape(x.shape)[()]  # a 0-d input gives a scalar, as a ufunc does
    return apply


_VECTOR_CHUNK = 1 << 30
_LIB = _load()
matmul: Callable | None = _kernel(_LIB) if _LIB is not None else None
erf: Callable | None = _vector(_LIB, "vsErf", "vdErf") if _LIB is not None else None
normal_cdf: Callable | None = (_vector(_LIB, "vsCdfNorm", "vdCdfNorm")
                               if _LIB is not None else None)
