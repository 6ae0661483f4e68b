"""MKL kernels for the NumPy backend, when the ``mkl`` wheel is installed.

NumPy's wheels bring OpenBLAS and no vector math library; torch's bring MKL.
MKL's GEMM is the faster on some CPUs and the slower on others (on AMD's it
takes a generic path), so which library runs a product is measured on the
machine at hand; its vector math (VML) gives the normal CDF of GELU several
times faster than NumPy's float32 passes. With ``pip install einsumgrad[mkl]``
the NumPy backend calls, through ctypes on the arrays NumPy holds (no copy, no
other array type):

* ``matmul``: ``cblas_?gemm`` / ``cblas_?gemm_batch``. The backend calls it through
  ``chosen_matmul``, which takes NumPy's own matmul, this one or NumPy's OpenBLAS
  on MKL's team per dtype and size class (matrix, thin matrix, matrix-vector,
  batch; m*n*k by powers of 4), whichever a short measurement on first use found
  faster (by 5%: a tie keeps NumPy's; the classes run on threads never take
  NumPy's own pool beside MKL's, see :func:`measure`), the
  result kept in ``~/.cache/einsumgrad/blas.json`` (``EINSUMGRAD_CACHE``) for
  this machine; ``EINSUMGRAD_BLAS=mkl`` or ``=numpy`` fixes it (:func:`blas_choices`). A
  product of two matrices that recurs is raced once more at its own shape
  (:data:`SHAPE_AFTER`), its winner saved beside the classes'. Products BLAS cannot
  take as laid out are copied first, as NumPy does; other dtypes and small
  products (where a ctypes call costs more than it saves, and OpenBLAS runs on
  one thread, so the two thread pools never contend) go to ``numpy.matmul``.
* ``matmul_add``: ``c += a @ b`` in place (``cblas_?gemm`` with beta 1), the
  step of a convolution run as one product per window offset.
* ``erf`` and ``normal_cdf``: ``v?Erf`` and ``v?CdfNorm`` (high-accuracy mode,
  about 1 ulp) on float32 and float64.
* ``ufuncs``: ``add``, ``subtract``, ``multiply`` (two arrays of one layout, or
  an array and a Python number, by ``v?LinearFrac``: bit for bit NumPy's
  result; an in-place ``add`` / ``subtract`` of an array that varies only
  along the innermost or outermost axes in memory, a layer's bias, as one
  rank-1 update ``cblas_?ger``), ``exp``, ``log``, ``tanh`` (within 2 ulps,
  as NumPy's). Not
  ``divide`` or ``sqrt``: VML's are not always correctly rounded. NumPy runs
  an element-wise op on one core; VML runs it on MKL's threads, already awake
  from the last GEMM, so at 2 threads a pass over a few MB takes half the
  time. Small arrays, broadcasts, other layouts and dtypes go to NumPy's ufunc.

An ``out`` (or ``matmul_add``'s ``c``) that overlaps an input goes to NumPy,
which copies the input first: BLAS and VML would read values they had already
overwritten. VML's in-place form (``out`` the input's very elements) stays.

``EINSUMGRAD_MKL=0`` turns it all off. Thread counts follow ``MKL_NUM_THREADS``
and ``threadpoolctl``, as for any MKL. Where numba is installed MKL runs on GNU
OpenMP (:func:`_threading_layer`), the runtime torch brings and numba's ``omp``
layer runs einsumgrad's row kernels on, so a kernel after a product takes the
product's threads while they still spin (README, "Speed"); a forked child then
runs MKL on one thread. Else, unless the user set ``MKL_THREADING_LAYER``, it
runs on Intel's OpenMP, whose idle threads spin for 200 ms by default: loading
MKL sets ``KMP_BLOCKTIME`` to 1 ms where the user has not set it (seed 001's
Jacobian in a process without torch: 52 ms, 27-32 ms with it).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import itertools
import math
import os
import sys
from typing import Callable

import numpy

from . import openblas

_MIN_WORK = 1 << 16  # m*n*k below this: numpy.matmul (a ctypes call is ~5 us)
# A matrix times a vector up to this: OpenBLAS's gemv on one thread takes half
# the time of MKL's call (2048x64: 7 against 15 us; a bias gradient, a row sum).
_MIN_VECTOR = (1 << 17) + 1
_ROW, _NOTRANS, _TRANS = 101, 111, 112
_INT, _PTR = ctypes.c_int, ctypes.c_void_p
_INT_LIMIT = 2 ** 31


# MKL's own OpenMP runtime (Intel's, from the wheel; with torch imported first MKL
# runs on torch's GNU OpenMP instead) keeps a parallel region's threads spinning
# for 200 ms after it ends, on the cores that einsumgrad's own threads
# (:mod:`.threads`), OpenBLAS's and the next kernel's are waiting for. 1 ms, as
# Intel's CPU tuning guides set for frameworks, unless the user set it: read
# when the runtime starts, so set before MKL is loaded.
BLOCKTIME_MS = "1"


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EINSUMGRAD_MKL", "1") == "0":
        return None
    os.environ.setdefault("KMP_BLOCKTIME", BLOCKTIME_MS)
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            _threading_layer(lib)
            return lib
    return None


_GNU = 3  # MKL_THREADING_GNU (mkl_service.h); -1 asks for the layer in use
_ASK = -1


def _threading_layer(lib: ctypes.CDLL) -> None:
    """MKL on GNU OpenMP where numba's OpenMP layer can run einsumgrad's row kernels
    on the same threads (:func:`einsumgrad.backends.threads.openmp`): a kernel then
    splits its rows over the team the last product just ran on, while its workers
    still spin, where a thread of einsumgrad's own pool would wait for a core they
    hold. Left to MKL's choice where the user set ``MKL_THREADING_LAYER``, where
    numba or GNU OpenMP is missing, or with ``EINSUMGRAD_JIT=0``. Forked children
    then run MKL on one thread: GNU OpenMP's team does not survive a fork (a
    product on two threads there waits forever)."""
    import importlib.util
    if ("MKL_THREADING_LAYER" in os.environ or os.environ.get("EINSUMGRAD_JIT", "1") == "0"
            or os.environ.get("NUMBA_THREADING_LAYER", "omp") != "omp"
            or importlib.util.find_spec("numba") is None):
        return
    try:
        ctypes.CDLL("libgomp.so.1")  # the one already loaded (torch's), or the system's
    except OSError:
        return
    if lib.MKL_Set_Threading_Layer(_GNU) in (_GNU, _ASK) and on_gnu_openmp(lib):
        os.register_at_fork(after_in_child=lambda: lib.MKL_Set_Num_Threads(1))


def on_gnu_openmp(lib: ctypes.CDLL | None = None) -> bool:
    """Whether MKL runs on GNU OpenMP (the runtime numba's ``omp`` layer uses)."""
    lib = lib if lib is not None else _LIB
    return lib is not None and lib.MKL_Set_Threading_Layer(_ASK) == _GNU


def as_blas(a: numpy.ndarray, rows: int, cols: int):
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


def _overlaps(out, *inputs) -> bool:
    """Whether ``out`` may share memory with an array among ``inputs``."""
    return any(isinstance(v, numpy.ndarray) and numpy.may_share_memory(out, v)
               for v in inputs)


def _kernel(lib: ctypes.CDLL) -> Callable:
    gemm = {numpy.dtype(numpy.float64): (lib.cblas_dgemm, ctypes.c_double),
            numpy.dtype(numpy.float32): (lib.cblas_sgemm, ctypes.c_float)}
    batch = {numpy.dtype(numpy.float64): lib.cblas_dgemm_batch,
             numpy.dtype(numpy.float32): lib.cblas_sgemm_batch}
    strided = {numpy.dtype(numpy.float64): getattr(lib, "cblas_dgemm_batch_strided", None),
               numpy.dtype(numpy.float32): getattr(lib, "cblas_sgemm_batch_strided", None)}
    threads = lib.MKL_Get_Max_Threads

    def matmul(a, b, out=None):
        """``numpy.matmul(a, b, out=out)``, by MKL where BLAS can take the operands
        (and ``out``, when given: any layout whose matrices are row-major)."""
        if out is None and a.ndim == 2 and b.ndim == 2:  # first, the small ones: no more checks
            (m, k), n = a.shape, b.shape[1]
            if m * n * k < (_MIN_VECTOR if 1 in (m, n) else _MIN_WORK):
                return numpy.matmul(a, b)
        plain = lambda: numpy.matmul(a, b) if out is None else numpy.matmul(a, b, out=out)
        if a.dtype != b.dtype or a.dtype not in gemm or 0 in (a.ndim, b.ndim):
            return plain()
        if out is not None and (a.ndim < 2 or b.ndim < 2 or out.dtype != a.dtype
                                or type(out) is not numpy.ndarray or _overlaps(out, a, b)):
            return plain()
        if b.ndim == 1 and a.ndim > 2 and a.flags.c_contiguous:
            # A stack of matrices times a vector is one tall matrix times it,
            # not a batch of one-column GEMMs (4x slower).
            return matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1])
        x = a if a.ndim > 1 else a[None]        # vectors as 1-row / 1-column matrices
        y = b if b.ndim > 1 else b[:, None]
        (m, k), (k2, n) = x.shape[-2:], y.shape[-2:]
        small = _MIN_VECTOR if 1 in (m, n) else _MIN_WORK
        if k != k2 or (x.ndim == y.ndim == 2 and m * n * k < small):
            return plain()  # NumPy says which sizes clash; small: see _small
        try:
            lead = numpy.broadcast_shapes(x.shape[:-2], y.shape[:-2])
        except ValueError:
            return plain()
        count = math.prod(lead)
        if out is None:
            c, ldc = numpy.empty(lead + (m, n), dtype=a.dtype), n
        else:
            tc = as_blas(out, m, n) if out.shape == lead + (m, n) else None
            if tc is None or not out.flags.writeable:
                return plain()
            if tc[0] != _NOTRANS:
                if lead:
                    return plain()
                # A column-major ``out`` (a planner asked for that layout): its
                # transpose is row-major, the product of the transposes. Not NumPy's
                # matmul, whose BLAS threads would then spin beside MKL's.
                matmul(y.T, x.T, out=out.T)
                return out
            c, ldc = out, tc[1]
        walk = _by_stride((x, y, c), lead, ldc * m) if count > 1 and strided[a.dtype] else None
        if lead and _small(m * n * k, count, walk is not None, threads()):
            return plain()
        ta, tb = as_blas(x, m, k), as_blas(y, k, n)
        if ta is None or tb is None:  # copied as NumPy would; the copy walks anew
            x, ta = (x, ta) if ta else (numpy.ascontiguousarray(x), (_NOTRANS, k))
            y, tb = (y, tb) if tb else (numpy.ascontiguousarray(y), (_NOTRANS, n))
            walk = _by_stride((x, y, c), lead, ldc * m) if count > 1 and strided[a.dtype] else None
        if max(m, n, k, ta[1], tb[1], ldc) >= _INT_LIMIT:
            return plain()  # past MKL's 32-bit integers
        if c.size == 0:
            return plain()  # an empty batch
        fn, scalar = gemm[a.dtype]
        one, zero = scalar(1.0), scalar(0.0)
        ptrs = [v.ctypes.data for v in (x, y, c)]
        if count == 1:  # one matrix each, at offset 0 however many size-1 batch axes
            fn(_ROW, ta[0], tb[0], m, n, k, one, _PTR(ptrs[0]), ta[1],
               _PTR(ptrs[1]), tb[1], zero, _PTR(ptrs[2]), ldc)
        elif walk is not None:  # MKL's strided batch: 1.6x faster than from pointers
            (sa, sb, sc), size, offsets = walk
            for oa, ob, oc in offsets:
                strided[a.dtype](_ROW, ta[0], tb[0], m, n, k, one, _PTR(ptrs[0] + oa), ta[1],
                                 sa, _PTR(ptrs[1] + ob), tb[1], sb, zero, _PTR(ptrs[2] + oc), ldc,
                                 sc, size)
        else:  # one batched call: every matrix's address, from broadcast strides
            pa, pb, pc = ((p + _offsets(_frame(v, lead), lead)).astype(numpy.uintp)
                          for p, v in zip(ptrs, (x, y, c)))
            ref = lambda v: ctypes.byref(_INT(v))
            batch[a.dtype](_ROW, ref(ta[0]), ref(tb[0]), ref(m), ref(n), ref(k),
                           ctypes.byref(one), _PTR(pa.ctypes.data), ref(ta[1]),
                           _PTR(pb.ctypes.data), ref(tb[1]), ctypes.byref(zero),
                           _PTR(pc.ctypes.data), ref(ldc), _INT(1), ref(pa.size))
        if a.ndim == 1:
            c = c[..., 0, :]
        return c[..., 0] if b.ndim == 1 else c
    return matmul


def _accumulating(lib: ctypes.CDLL) -> Callable:
    gemm = {numpy.dtype(numpy.float64): (lib.cblas_dgemm, ctypes.c_double),
            numpy.dtype(numpy.float32): (lib.cblas_sgemm, ctypes.c_float)}

    def matmul_add(a, b, c) -> bool:
        """``c += a @ b`` for matrices, in place (GEMM with beta 1), when BLAS can
        take the three as laid out; False (and ``c`` untouched) when it cannot.
        A product where ``chosen_matmul`` takes another library's is that one's,
        added into ``c``."""
        if not all(type(v) is numpy.ndarray and v.ndim == 2 and v.dtype == c.dtype
                   for v in (a, b, c)) or c.dtype not in gemm:
            return False
        (m, k), (k2, n) = a.shape, b.shape
        ta, tb, tc = as_blas(a, m, k), as_blas(b, k, n), as_blas(c, m, n)
        if (k != k2 or c.shape != (m, n) or None in (ta, tb) or tc is None or tc[0] != _NOTRANS
                or not c.flags.writeable or 0 in (m, n, k)
                or max(m, n, k, ta[1], tb[1], tc[1]) >= _INT_LIMIT or _overlaps(c, a, b)):
            return False
        if m * n * k > _ONE_THREAD_WORK:  # where chosen_matmul takes a measured choice
            product = chosen_matmul.pick(a, b)
            if product is not matmul:  # another library's product, added: a pass over c
                numpy.add(c, product(a, b), out=c)
                return True
        fn, scalar = gemm[c.dtype]
        fn(_ROW, ta[0], tb[0], m, n, k, scalar(1.0), _PTR(a.ctypes.data), ta[1],
           _PTR(b.ctypes.data), tb[1], scalar(1.0), _PTR(c.ctypes.data), tc[1])
        return True
    return matmul_add


_MAX_CALLS = 8  # strided-batch calls per product, else one call from pointers
_MIN_BATCHED = 1 << 19  # m*n*k per matrix of a batch MKL takes on one thread
_MIN_THREADED = 1 << 8  # ... and on several, when strided calls walk the batch


def _small(work: int, count: int, by_stride: bool, threads: int) -> bool:
    """Whether NumPy's matmul should take ``count`` products of ``work`` (m*n*k)
    each, ``by_stride`` telling whether strided-batch calls walk them, with
    MKL on ``threads`` threads.

    Measured on the bench machine. One product: below ``_MIN_WORK`` a ctypes
    call costs more than it saves, and OpenBLAS runs it on one thread (no pool
    to contend with MKL's). A batch on one MKL thread: NumPy's loop over
    OpenBLAS wins up to about 80^3 a matrix. On several: MKL splits the batch
    over its threads (attention's heads: 3x faster at 2), down to 8x8x8
    matrices when a few strided-batch calls walk it.
    """
    if count == 1:
        return work < _MIN_WORK
    if threads == 1:
        return work < _MIN_BATCHED
    return work < _MIN_THREADED or (work < _MIN_WORK and not by_stride)


def _frame(v, lead: tuple) -> tuple:
    """Byte strides of ``v``'s matrices along each axis of the batch shape
    ``lead`` it is broadcast to (0 along broadcast and size-1 axes)."""
    shape, strides = v.shape[:-2], v.strides[:-2]
    pad = len(lead) - len(shape)
    return tuple(strides[i - pad] if i >= pad and shape[i - pad] == size > 1 else 0
                 for i, size in enumerate(lead))


def _by_stride(vs, lead: tuple, c_size: int):
    """How MKL's strided batch walks operands ``vs`` (a, b, then c) over batch
    shape ``lead``: ``(element strides, matrices per call, byte offsets of each
    call)``, or None.

    One call when a single stride walks every operand's matrices; else one
    call per index of the other axes along the longest axis (attention's
    ``(batch, heads)`` over tokens laid out ``(batch, tokens, heads)``), if
    that takes at most ``_MAX_CALLS``. MKL refuses a stride between C
    matrices below ``c_size`` (``ldc * m``; it then computes nothing): C
    matrices interleaved along the walked axis (heads inside rows, walked
    along the heads) go by pointers instead.
    """
    frames = [_frame(v, lead) for v in vs]
    axes = [i for i, size in enumerate(lead) if size > 1]
    steps = [_one_stride(f, lead, axes) for f in frames]
    if None not in steps:
        walked, rest = axes, []
    else:
        longest = max(axes, key=lead.__getitem__)
        walked, rest = [longest], [i for i in axes if i != longest]
        if math.prod(lead[i] for i in rest) > _MAX_CALLS:
            return None
        steps = [f[longest] for f in frames]
    items = [v.itemsize for v in vs]
    if any(s < 0 or s % i or s // i >= _INT_LIMIT for s, i in zip(steps, items)):
        return None
    if steps[-1] // items[-1] < c_size:
        return None
    offsets = [tuple(sum(j * f[a] for j, a in zip(index, rest)) for f in frames)
               for index in itertools.product(*(range(lead[a]) for a in rest))]
    return [s // i for s, i in zip(steps, items)], math.prod(lead[i] for i in walked), offsets


def _one_stride(frame: tuple, lead: tuple, axes: list) -> int | None:
    """The byte stride that walks ``axes`` of ``frame`` as one, or None."""
    step, span = None, 1
    for i in reversed(axes):
        if step is None:
            step = frame[i]
        elif frame[i] != step * span:
            return None
        span *= lead[i]
    return step or 0


def _offsets(frame: tuple, lead: tuple) -> numpy.ndarray:
    """Byte offsets of an operand's matrices at every index of batch shape
    ``lead``, the last axis fastest."""
    off = numpy.zeros((), dtype=numpy.int64)
    for i in range(len(lead)):
        off = off[..., None] + numpy.arange(lead[i], dtype=numpy.int64) * frame[i]
    return off.reshape(-1)


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
        for s, e in _chunks(flat.size):  # n is a C int
            fn(_INT(e - s), _PTR(flat[s:].ctypes.data), _PTR(out[s:].ctypes.data))
        return out.reshape(x.shape)[()]  # a 0-d input gives a scalar, as a ufunc does
    return apply


_VECTOR_CHUNK = 1 << 30
_VML_MIN = 1 << 15  # fewer entries: NumPy's ufunc (the checks and the call cost ~3 us)


def _flat(a, like=None) -> bool:
    """Whether ``a`` is an array VML can take as one flat run: a float32/64
    ndarray of at least ``_VML_MIN`` entries, dense in memory (any axis order)
    and, given ``like``, of its shape, dtype and strides."""
    if type(a) is not numpy.ndarray or a.size < _VML_MIN:
        return False
    if like is not None:
        return a.shape == like.shape and a.dtype == like.dtype and a.strides == like.strides
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        return False
    if a.flags.c_contiguous or a.flags.f_contiguous:
        return True
    step = a.itemsize
    for st, n in sorted((st, n) for st, n in zip(a.strides, a.shape) if n > 1):
        if st != step:
            return False
        step *= n
    return True


def _out(a, out, *inputs):
    """``out`` when VML may write the result of ``inputs`` (``a`` and arrays of
    its layout, or numbers) into it, a new array of ``a``'s layout when ``out``
    is None, else None (NumPy then handles the call)."""
    if out is None:
        out = numpy.empty_like(a)  # order "K": a dense array's own strides
        return out if out.strides == a.strides else None
    if not _flat(out, a):
        return None
    # VML works in place (out the very elements of an input, of one layout
    # with it), never on memory shifted against an input's.
    shifted = [v for v in inputs if isinstance(v, numpy.ndarray)
               and v.ctypes.data != out.ctypes.data]
    return None if _overlaps(out, *shifted) else out


def _chunks(n: int):
    return ((s, min(s + _VECTOR_CHUNK, n)) for s in range(0, n, _VECTOR_CHUNK))


def _ufuncs(lib: ctypes.CDLL) -> dict:
    f32, f64 = numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)
    scalar = {f32: ctypes.c_float, f64: ctypes.c_double}
    frac = {f32: lib.vsLinearFrac, f64: lib.vdLinearFrac}
    ptr = lambda a, s: _PTR(a.ctypes.data + s * a.itemsize)

    def affine(a, scale, shift, out):
        """``scale * a + shift`` (VML's (s*a + t) / (0*a + 1), exact for these uses)."""
        c = scalar[a.dtype]
        for s, e in _chunks(a.size):
            frac[a.dtype](_INT(e - s), ptr(a, s), ptr(a, s), c(scale), c(shift), c(0.0),
                          c(1.0), ptr(out, s))
        return out

    ger = {f32: lib.cblas_sger, f64: lib.cblas_dger}
    ones: dict = {}  # dtype -> a vector of ones, grown as needed; BLAS only reads it

    def rank1(a, b, alpha: float) -> bool:
        """``a += alpha * b`` in place where ``b``, broadcast to ``a``, varies only
        along ``a``'s innermost axes in memory (a bias over channels) or only its
        outermost (a per-row shift): one rank-1 update against a vector of ones
        (``cblas_?ger``, on MKL's threads; 3-8x NumPy's broadcast). With alpha
        +-1 and ones every product is exact: bit for bit NumPy's sum (a ``b``
        with zeros goes to NumPy: BLAS skips them, signed zeros would differ)."""
        if (type(b) is not numpy.ndarray or b.dtype != a.dtype or not 0 < b.ndim <= a.ndim
                or numpy.may_share_memory(a, b)):  # a row of a itself: read as it changes
            return False
        bb = b.reshape((1,) * (a.ndim - b.ndim) + b.shape)
        if any(n not in (1, m) for n, m in zip(bb.shape, a.shape)):
            return False
        mem = [i for i in sorted(range(a.ndim), key=lambda i: -a.strides[i]) if a.shape[i] > 1]
        vary = [i for i in mem if bb.shape[i] > 1]
        if not vary or len(vary) == len(mem):
            return False
        inner = vary == mem[len(mem) - len(vary):]
        if not inner and vary != mem[:len(vary)]:
            return False
        n = math.prod(a.shape[i] for i in vary)
        r = a.size // n
        if max(n, r) >= _INT_LIMIT:
            return False
        v = numpy.ascontiguousarray(bb.transpose(vary + [i for i in range(a.ndim)
                                                         if i not in vary])).reshape(-1)
        if not v.all():  # BLAS skips a zero's row or column: -0.0 + 0.0 would stay -0.0
            return False
        one = ones.get(a.dtype)
        if one is None or one.size < r:
            one = ones[a.dtype] = numpy.ones(max(r, 1 << 12), dtype=a.dtype)
        x, y, rows, cols = (one, v, r, n) if inner else (v, one, n, r)
        ger[a.dtype](_ROW, rows, cols, scalar[a.dtype](alpha), _PTR(x.ctypes.data), 1,
                     _PTR(y.ctypes.data), 1, _PTR(a.ctypes.data), cols)
        return True

    def binary(name, single, double, ufunc, with_number):
        fns = {f32: getattr(lib, single), f64: getattr(lib, double)}
        alpha = {numpy.add: 1.0, numpy.subtract: -1.0}.get(ufunc)

        def op(a, b, out=None):
            if _flat(a):
                if out is a and alpha is not None and rank1(a, b, alpha):
                    return a
                if _flat(b, a) and _use_vml(name, a):
                    o = _out(a, out, a, b)
                    if o is not None:
                        for s, e in _chunks(a.size):
                            fns[a.dtype](_INT(e - s), ptr(a, s), ptr(b, s), ptr(o, s))
                        return o
                elif type(b) in (int, float) and _use_vml(name, a):
                    o = _out(a, out, a)
                    if o is not None:
                        return affine(a, *with_number(b), o)
            elif (type(a) in (int, float) and _flat(b) and ufunc is not numpy.subtract
                  and _use_vml(name, b)):
                o = _out(b, out, b)
                if o is not None:
                    return affine(b, *with_number(a), o)
            return ufunc(a, b) if out is None else ufunc(a, b, out=out)

        def vml(a, b, o):  # the arrays' VML call alone (what vml_choices times)
            fns[a.dtype](_INT(a.size), ptr(a, 0), ptr(b, 0), ptr(o, 0))
        op.vml, op.ufunc = vml, ufunc
        return op

    def unary(name, single, double, ufunc):
        fns = {f32: getattr(lib, single), f64: getattr(lib, double)}

        def op(a, out=None):
            o = _out(a, out, a) if _flat(a) and _use_vml(name, a) else None
            if o is None:
                return ufunc(a) if out is None else ufunc(a, out=out)
            for s, e in _chunks(a.size):
                fns[a.dtype](_INT(e - s), ptr(a, s), ptr(o, s))
            return o

        def vml(a, o):
            fns[a.dtype](_INT(a.size), ptr(a, 0), ptr(o, 0))
        op.vml, op.ufunc = vml, ufunc
        return op

    return {
        "add": binary("add", "vsAdd", "vdAdd", numpy.add, lambda v: (1.0, v)),
        "subtract": binary("subtract", "vsSub", "vdSub", numpy.subtract, lambda v: (1.0, -v)),
        # -0.0: x*v + (-0.0) is x*v for every x, signed zeros included.
        "multiply": binary("multiply", "vsMul", "vdMul", numpy.multiply, lambda v: (v, -0.0)),
        "exp": unary("exp", "vsExp", "vdExp", numpy.exp),
        "log": unary("log", "vsLn", "vdLn", numpy.log),
        "tanh": unary("tanh", "vsTanh", "vdTanh", numpy.tanh),
    }


# -- NumPy's matmul or MKL's: chosen by measurement ------------------------------------------

_CHOICE_MIN = _MIN_WORK  # below this many multiply-adds: NumPy, unmeasured (see matmul)
_BUCKETS = range(16, 28, 2)  # size classes: log2 of m*n*k, every other power of two
_VEC_TOP = 22  # a matrix-vector class above this is measured as this one (no 512 MB matrix)
_KINDS = ("mat", "thin", "vec", "batch")
# A product of two matrices is chosen per memory layout too (:func:`_layouts`): as
# given, ``b`` transposed in memory (a layer's ``x @ w.T``), ``a`` transposed (its weight
# gradient ``g.T @ x``). The libraries rank differently across them: on the bench's
# AMD CPU OpenBLAS's small-matrix kernels won a class as given and with ``a``
# transposed by 10-30% and lost it with ``b`` transposed by 30-50%.
_LAYOUT_SUFFIXES = ("", "-bt", "-at")
_BY_LAYOUT = ("mat", "thin")
CHOICE_KINDS = tuple(k + s for k in _BY_LAYOUT for s in _LAYOUT_SUFFIXES) + tuple(
    k for k in _KINDS if k not in _BY_LAYOUT)
_THIN = 64  # a product with at most this many columns (or rows) of output, 16x as many rows: thin


def _kind_and_work(a, b) -> tuple:
    """The size class of ``a @ b``: ``(kind, m*n*k in all)``; kind is ``vec`` for a
    matrix-vector product, ``batch`` for a stack of products, ``thin`` for one whose
    output has few columns against many rows or the reverse (a convolution over
    im2col windows: as many columns as the layer has channels), else ``mat``.
    The libraries can rank differently there (on the bench's machine OpenBLAS
    won the square products and lost thin ones by up to 2x)."""
    m = a.shape[-2] if a.ndim > 1 else 1
    n = b.shape[-1] if b.ndim > 1 else 1
    k = a.shape[-1]
    count = 1
    for s in (a.shape[:-2] if a.ndim > 2 else ()) or (b.shape[:-2] if b.ndim > 2 else ()):
        count *= s
    if count > 1:
        return "batch", m * n * k * count
    if 1 in (m, n):
        return "vec", m * n * k
    lo, hi = min(m, n), max(m, n)
    return ("thin" if lo <= _THIN and hi >= 16 * lo else "mat"), m * n * k


def _bucket(work: int) -> int:
    b = max(_BUCKETS[0], min(work.bit_length() - 1, _BUCKETS[-1]))
    return b - (b - _BUCKETS[0]) % 2


def _case(kind: str, bucket: int, dtype, rng) -> tuple:
    """Operands of one size class: a layer's matrices (square up to 256 x 256 x 256,
    then 256 rows times wider square weights), a tall matrix times one with 32
    columns (a convolution's shape), a matrix and a vector, or 8 matrices. Each
    is timed at the middle of its class, twice its lower bound: the libraries
    part within a class (the last holds every larger product too: a layer of
    1024 x 1024 weights is 2^28, and at 2^26 the libraries tied where they
    parted at the layer's size; OpenBLAS's small-matrix blocks win from 2^21)."""
    work = 1 << (min(bucket, _VEC_TOP) if kind == "vec" else bucket + 1)
    if kind == "vec":
        n = max(2, round(work ** 0.5))
        shapes = ((n, n), (n,))
    elif kind == "thin":
        k = max(2, min(144, round((work / 512) ** 0.5), work // (512 * 32)))
        shapes = ((max(512, -(-work // (32 * k))), k), (k, 32))
    elif kind == "batch":
        n = max(2, math.ceil((work / 8) ** (1 / 3) - 1e-9))
        shapes = ((8, n, n), (8, n, n))
    else:  # a layer's: square up to 256 rows (a batch), then wider
        m = max(2, min(256, round(work ** (1 / 3))))
        n = max(2, math.ceil((work / m) ** 0.5 - 1e-9))
        shapes = ((m, n), (n, n))
    return tuple(rng.standard_normal(s).astype(dtype) for s in shapes)


_HEAD_TOP = 22  # a classifier head's operands have work/10 entries: none above this class


def _cases(kind: str, bucket: int, dtype, rng) -> list:
    """The operand pairs a class is timed on: :func:`_case`'s, and for a ``thin`` one
    up to 2^22 also a classifier head's (256 rows, 10 columns out of a deep sum):
    the libraries rank the two apart (at 2^21 on the bench's AMD CPU MKL's
    threaded GEMM lost the head's products 2.4x where it was 1.3x behind on the
    convolution's)."""
    cases = [_case(kind, bucket, dtype, rng)]
    if kind == "thin" and bucket <= _HEAD_TOP:
        k = -(-(2 << bucket) // 2560)  # at the class's middle, as _case's
        cases.append(tuple(rng.standard_normal(s).astype(dtype) for s in ((256, k), (k, 10))))
    return cases


def _layouts(a, b) -> list:
    """``a @ b`` in the memory orders a model's products come in: as given, with
    ``b`` transposed in memory (a layer's ``x @ w.T``), with ``a`` transposed (its
    weight gradient ``g.T @ x``); one batch matrix or the vector keeps its order.
    The libraries rank differently across them (OpenBLAS's transposed kernels
    lost more to MKL's on the bench's machine than its plain ones)."""
    def flipped(v):
        return numpy.ascontiguousarray(numpy.swapaxes(v, -1, -2)).swapaxes(-1, -2)
    pairs = [(a, b), (a, flipped(b))] if b.ndim > 1 else [(a, b)]
    return pairs + [(flipped(a), b)] if a.ndim == 2 else pairs


def _race(a, b, budget: float = 0.007, fns: tuple | None = None) -> tuple:
    """Times of MKL's and NumPy's ``a @ b`` (or of ``fns``'): the median of rounds
    taken in turns, each call timed after one untimed on the same operands (it
    wakes the library's pool and warms the caches: within a round only one
    library's pool is awake, as in a process that keeps to one; a burst of other
    work on the machine lands in a round or two, which the median sets aside),
    for about ``budget`` seconds each. A median of rounds, not a best single
    call: a lone call's best hides what a product pays on most calls (single
    best calls ranked the libraries the other way round from the MLP and seed
    001 steps that ran on them, at one thread)."""
    return _in_turns([[functools.partial(fn, a, b)] for fn in fns or (matmul, numpy.matmul)],
                     2 * budget, 41)


# A class of the largest products spends its budget in a round or two: at least this
# many, so that a burst of other work on the machine in one of them is outvoted (with
# 3 the float64 layers' class went to MKL in one measurement of two on the EPYC, at
# 86-88 GFLOP/s against the team's 99).
_MIN_ROUNDS = 7


def _in_turns(sides: list, budget: float, most: int) -> tuple:
    """The median time of each side's calls, in rounds taken in turns: each call
    timed after one untimed (see :func:`_race`), at least :data:`_MIN_ROUNDS`
    rounds and at most ``most``, until ``budget`` seconds are spent."""
    import time
    times: tuple = tuple([] for _ in sides)
    spent, rounds = 0.0, 0
    while rounds < _MIN_ROUNDS or (spent < budget and rounds < most):
        for calls, got in zip(sides, times):
            total = 0.0
            for call in calls:
                call()
                t = time.perf_counter()
                call()
                total += time.perf_counter() - t
            got.append(total)
            spent += total
        rounds += 1
    return tuple(sorted(got)[len(got) // 2] for got in times)


# From this many multiply-adds OpenBLAS runs a product on its thread pool (its
# GEMM_MULTITHREAD_THRESHOLD times 2^16); below, on the calling thread.
_THREADED = 18
# One product up to this many multiply-adds OpenBLAS runs on the calling thread
# (its test is <=), so NumPy's takes it whatever the choice: no pool to fight
# MKL's, and MKL's call costs more than the product at this size.
_ONE_THREAD_WORK = 1 << _THREADED


def _on_pools(threads: int, bucket: int) -> bool:
    """Whether a class's products run on threads beside MKL's pool: then they race
    only contenders on MKL's team (:func:`measure`), never NumPy's own pool."""
    return threads > 1 and bucket >= _THREADED


# How measure() turns times into choices: in the cache key, so a new rule measures anew.
_RULE = ("mkl-or-openblas-team-if-threaded|thin|layouts-warm-median-7|middle|head|small-blocks"
         "|by-layout")


def measure(dtype) -> dict:
    """``{kind: {bucket: "mkl" | "numpy" | "openblas" | "openblas-small"}}`` for
    ``dtype``: each size class's products timed both ways (:func:`_race`; a few
    seconds in all), a product of two matrices (``mat``, ``thin``) in each of its
    layouts apart (:data:`CHOICE_KINDS`: ``mat``, ``mat-bt`` with ``b`` transposed
    in memory, ``mat-at`` with ``a``), a vector's or a batch's over theirs together.

    Where MKL runs on several threads, the classes large enough to run on
    threads never take NumPy's matmul, whatever its times: the two libraries' pools
    spin for a while after each call, so products alternating between them
    leave both pools' threads fighting for the cores (a per-sample MLP step
    measured 2-4x slower mixed than on either library alone), and MKL's pool is
    busy anyway with the backend's other MKL work (vector math, rank-1 updates,
    accumulating GEMMs): with NumPy's products on NumPy's pool beside it, an
    attention step at 2 threads ran 5x slower than on one thread. Those of one
    matrix times one (``mat``, ``thin``) race MKL's threaded GEMM against
    NumPy's OpenBLAS on MKL's team, a block of rows a thread at one OpenBLAS
    thread (``"openblas"``, :func:`einsumgrad.backends.kernels.team_matmul`;
    one pool), where numba's OpenMP layer runs: on a CPU where MKL takes a
    generic path (AMD's) OpenBLAS's kernels win there (README, "BLAS by
    measurement"). Every other class (all of them where MKL runs on one
    thread: no pool of its own to fight) takes the faster one, by 5% (a tie
    keeps NumPy's). Then, from 2^20, a ``mat`` or ``thin`` class's winner races
    OpenBLAS on the same threads in blocks of at most
    :data:`~einsumgrad.backends.openblas.SMALL_WORK` multiply-adds, which it runs on
    its small-matrix kernels without packing (``"openblas-small"``; on the bench's
    AMD CPU a 4096 x 64 @ 64 x 8 product ran 2.2x faster so, at either thread count).
    """
    rng = numpy.random.default_rng(0)
    workers = _LIB.MKL_Get_Max_Threads()
    team = openblas_team(workers)
    out: dict = {}

    def race(pairs, fns=None):  # the class's times summed over its operand pairs
        times = [_race(a, b, fns=fns) for a, b in pairs]
        return sum(t[0] for t in times), sum(t[1] for t in times)
    small = openblas_team(workers, small=True)

    def pick(kind, bucket, pairs):
        if _on_pools(workers, bucket):
            if team is None or kind not in _BY_LAYOUT:
                return "mkl"  # by rule: nothing to time
            ours, theirs = race(pairs, fns=(matmul, team))
            got = "openblas" if theirs < 0.95 * ours else "mkl"
        else:
            ours, theirs = race(pairs)
            got = "mkl" if ours < 0.95 * theirs else "numpy"
        if small is not None and kind in _BY_LAYOUT and any(
                openblas.small_parts(a.shape[0], b.shape[1], a.shape[1], workers)
                for a, b in pairs):
            chosen = {"mkl": matmul, "numpy": numpy.matmul, "openblas": team}[got]
            ours, theirs = race(pairs, fns=(chosen, small))
            got = "openblas-small" if theirs < 0.95 * ours else got
        return got
    for kind in _KINDS:
        for bucket in _BUCKETS:
            laid = [_layouts(a, b) for a, b in _cases(kind, bucket, dtype, rng)]
            if kind in _BY_LAYOUT:  # a choice per layout
                for i, suffix in enumerate(_LAYOUT_SUFFIXES):
                    out.setdefault(kind + suffix, {})[bucket] = pick(
                        kind, bucket, [pairs[i] for pairs in laid])
            else:
                out.setdefault(kind, {})[bucket] = pick(kind, bucket, sum(laid, []))
    return out


def openblas_team(workers: int, small: bool = False) -> Callable | None:
    """A matmul by NumPy's OpenBLAS on MKL's team of ``workers`` threads (MKL's
    GEMM where the team does not take the operands), or None where it cannot run;
    ``small``: in blocks OpenBLAS runs on its small-matrix kernels, from one
    worker (:func:`einsumgrad.backends.kernels.team_matmul`).
    :mod:`einsumgrad.backends.kernels`, which runs it, puts its own in place of
    this one (this module does not import the kernels)."""
    return None


def _numpy_blas() -> str:
    """NumPy's BLAS and the kernel it runs: the library's name and version from NumPy's build
    config, and the settings OpenBLAS reads at load (``OPENBLAS_CORETYPE`` pins the kernel,
    ``OPENBLAS_L2_SIZE`` its blocking), so a choice measured under a pinned kernel (the test
    machine's Haswell) is not reused at the native one, which can be twice as fast."""
    blas = "?"
    try:
        deps = numpy.show_config(mode="dicts")["Build Dependencies"]  # NumPy >= 1.25
        blas = "{}-{}".format(deps["blas"].get("name", "?"), deps["blas"].get("version", "?"))
    except (TypeError, KeyError, AttributeError):
        pass
    env = ",".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                   if os.environ.get(k))
    return f"numpy_blas={blas}|{env or 'native'}"


def cpu_model() -> str:
    """This CPU's model (``platform.processor()`` is empty on Linux: /proc/cpuinfo's name)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _machine() -> str:
    """What a measurement holds for: this CPU, thread counts, NumPy, its BLAS and kernel, MKL
    (a home folder shared by machines of other CPUs keeps a choice for each)."""
    import platform
    threads = _LIB.MKL_Get_Max_Threads() if _LIB is not None else 0
    return (f"{platform.machine()}|{cpu_model()}|cpus={os.cpu_count()}|"
            f"mkl_threads={threads}|numpy={numpy.__version__}|{_numpy_blas()}|"
            f"{getattr(_LIB, '_name', '')}|gnu_openmp={on_gnu_openmp()}|{_RULE}")


def _cache_file() -> str:
    base = os.environ.get("EINSUMGRAD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "einsumgrad")
    return os.path.join(base, "blas.json")


_choices: dict = {}  # (dtype, MKL's threads) -> {kind: {bucket: "mkl" | "numpy"}}


def blas_choices(dtype=None) -> dict:
    """Which matmul the NumPy backend takes per dtype and size class (a product of
    two matrices also per layout: :data:`CHOICE_KINDS`) at MKL's
    present thread count (measured on first use, then read from
    ``$EINSUMGRAD_CACHE/blas.json``, by default ``~/.cache/einsumgrad/blas.json``,
    for this machine). A process that changes the count (threadpoolctl,
    ``torch.set_num_threads``) gets the choices made for the new one: those of one
    thread at two would mix the two libraries' pools. ``EINSUMGRAD_BLAS=mkl`` or
    ``numpy`` fixes the choice instead of measuring. Without MKL: NumPy's everywhere."""
    if dtype is None:
        return {numpy.dtype(d).name: blas_choices(d) for d in (numpy.float32, numpy.float64)}
    key = (numpy.dtype(dtype), gemm_threads())
    got = _choices.get(key)
    if got is None:
        got = _choices[key] = _load_or_measure(key[0])
    return got


def _load_or_measure(dtype, what: str = "matmul", measure_fn: Callable | None = None) -> dict:
    """The choices of ``measure_fn`` (default :func:`measure`) for ``dtype`` on this
    machine: read from ``blas.json``, else measured and saved there."""
    rule = os.environ.get("EINSUMGRAD_BLAS", "measure")
    if what == "matmul" and (matmul is None or rule in ("mkl", "numpy")):
        use = "mkl" if matmul is not None and rule == "mkl" else "numpy"
        return {kind: {b: use for b in _BUCKETS} for kind in CHOICE_KINDS}
    key = f"{_machine()}|{dtype.name}" + ("" if what == "matmul" else f"|{what}")
    saved = _read(key)
    if saved is not None:
        return {kind: {int(b): c for b, c in v.items()} for kind, v in saved.items()}
    got = (measure_fn or measure)(dtype)
    _save(key, got)
    return got


def _read(key: str) -> dict | None:
    """``blas.json``'s entry ``key``, or None."""
    import json
    try:
        with open(_cache_file()) as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _save(key: str, value: dict) -> None:
    """``blas.json``'s entry ``key`` set to ``value`` (read again first: another process
    may have saved its own since)."""
    import json
    path = _cache_file()
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    saved[key] = value
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(saved, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # measured again in the next process


_table: dict = {}  # (dtype, kind, bucket, MKL's threads) -> the matmul chosen_matmul calls


def _way(use: str, threads: int) -> Callable | None:
    """The matmul a choice names, or None where it cannot run (no team)."""
    return ({"mkl": matmul, "numpy": numpy.matmul}.get(use)
            or openblas_team(threads, use == "openblas-small"))


def _contender(use: str, threads: int) -> Callable:
    """The matmul a choice names (MKL's where the team cannot run)."""
    return _way(use, threads) or matmul


# -- a recurring product's own shape ---------------------------------------------------------

# A size class is timed on a few shapes; a product of another shape in it can rank
# the libraries otherwise (a convolution's 896 x 288 @ 288 x 32 blocks fall in the
# classes of a square product and of a classifier head's deep sum). So a product
# of two matrices that recurs (a model's layer, step after step: its shape and
# layout at the SHAPE_AFTER-th call) is raced once on its own operands among its
# class's contenders, and from then on takes the winner (by 5%: else the class's
# choice stays). The choice is saved with the class's (blas.json), so a later
# process reads it. From 2^20 multiply-adds (where the small-block kernels enter
# the race) to below 2^27 (a larger product was raced at its size by its class:
# the last one holds them all, and its race would cost seconds).
SHAPE_AFTER = 3
_SHAPE_WORK = (1 << 20, 1 << 27)
_SHAPES_MAX = 4096  # shapes counted in a process: beyond, new ones keep their class's choice
_SHAPES_SAVED = 1024  # shapes kept in blas.json per machine and dtype: the latest raced
_shaped: dict = {}  # class key + (m, n, k) -> calls so far, or the matmul chosen
_shape_saved: dict = {}  # dtype -> {"kind|threads|m,n,k": choice} read from blas.json


def nested() -> bool:
    """Whether a block loop holds the cores: :func:`einsumgrad.backends.threads.nested`,
    which puts itself in place of this one (this module does not import it)."""
    return False


def _may_race() -> bool:
    """Whether a race may run here: on the main thread outside a block loop (whose
    workers share the cores, so times there say nothing), and where no fixed rule
    says which library."""
    import threading
    return (threading.current_thread() is threading.main_thread() and not nested()
            and os.environ.get("EINSUMGRAD_BLAS") not in ("mkl", "numpy"))


def _shape_choice(shape: tuple, a, b) -> Callable:
    """The matmul for products of ``shape`` (:data:`_shaped`'s key): read from
    ``blas.json``, else raced on ``a`` and ``b`` and saved there."""
    dtype, kind, bucket, threads, m, n, k = shape
    saved = _shape_saved.get(dtype)
    if saved is None:
        saved = _shape_saved[dtype] = _read(f"{_machine()}|{dtype.name}|shapes") or {}
    name = f"{kind}|{threads}|{m},{n},{k}"
    use = saved.get(name)
    if use is None:
        now = blas_choices(dtype)[kind][bucket]
        ways = {u: _way(u, threads)  # the class's race's contenders (measure)
                for u in (("mkl", "openblas") if _on_pools(threads, bucket)
                          else ("numpy", "mkl")) + ("openblas-small",)}
        ways = {u: f for u, f in ways.items() if f is not None}
        names = list(ways)
        times = _in_turns([[functools.partial(ways[u], a, b)] for u in names], 0.014, 41)
        best = min(range(len(names)), key=times.__getitem__)
        use = (names[best] if now not in ways or times[best] < 0.95 * times[names.index(now)]
               else now)
        saved[name] = use
        key = f"{_machine()}|{dtype.name}|shapes"
        merged = {**(_read(key) or {}), **saved}  # with what other processes raced
        _save(key, dict(list(merged.items())[-_SHAPES_SAVED:]))  # the latest, a bounded file
    return _contender(use, threads)


def forget_choices() -> None:
    """Drop the choices made in this process (the next product or VML op loads or
    measures again)."""
    _choices.clear()
    _table.clear()
    _shaped.clear()
    _shape_saved.clear()
    _vml.clear()
    _transposed.clear()


# -- VML or NumPy's ufunc: chosen by measurement ------------------------------------------

_VML_BUCKETS = (16, 18, 20)  # size classes: log2 of the entries (2^20 and up: the last)
_vml: dict = {}  # (op, dtype, MKL's threads) -> {bucket: "mkl" | "numpy"}


def _use_vml(name: str, a) -> bool:
    """Whether VML runs op ``name`` on ``a`` (float32/64, dense: see :func:`_flat`),
    as measured for its dtype and size at MKL's present thread count."""
    key = (name, a.dtype, _LIB.MKL_Get_Max_Threads())
    got = _vml.get(key)
    if got is None:
        got = _vml[key] = vml_choices(a.dtype)[name]
    bucket = min(max(a.size.bit_length() - 1, _VML_BUCKETS[0]), _VML_BUCKETS[-1])
    return got[bucket - bucket % 2] == "mkl"


def vml_choices(dtype=None) -> dict:
    """``{op: {bucket: "mkl" | "numpy"}}``: whether MKL's VML or NumPy's ufunc runs
    each of :data:`ufuncs` on same-layout arrays of ``dtype`` of about 2^bucket
    entries at MKL's present thread count (an array and a number too; an
    in-place bias add, a rank-1 update by BLAS, is not VML's). Measured on first use like
    :func:`blas_choices` (beside its choices in ``blas.json``): VML's vector
    math is the faster on Intel's CPUs and on AMD's the slower at one thread
    (MKL's generic path there against NumPy's own SIMD loops; README, "BLAS by
    measurement"). ``EINSUMGRAD_VML=mkl`` or ``numpy`` fixes it."""
    if dtype is None:
        return {numpy.dtype(d).name: vml_choices(d) for d in (numpy.float32, numpy.float64)}
    rule = os.environ.get("EINSUMGRAD_VML", "measure")
    if rule in ("mkl", "numpy"):
        return {name: {b: rule for b in _VML_BUCKETS} for name in ufuncs}
    return _load_or_measure(numpy.dtype(dtype), "vml", measure_vml)


def measure_vml(dtype) -> dict:
    """:func:`vml_choices` for ``dtype``, measured: each op and size class timed both
    ways, the median of rounds taken in turns; VML must be 5% faster to win."""
    rng = numpy.random.default_rng(0)
    out: dict = {}
    for name, op in ufuncs.items():
        for bucket in _VML_BUCKETS:
            a = (numpy.abs(rng.standard_normal(1 << bucket)) + 0.5).astype(dtype)
            args = (a, a[::-1].copy()) if op.ufunc.nin == 2 else (a,)
            o = numpy.empty_like(a)
            ours, theirs = _in_turns([[lambda: op.vml(*args, o)],
                                      [lambda: op.ufunc(*args, out=o)]], 0.01, 21)
            out.setdefault(name, {})[bucket] = "mkl" if ours < 0.95 * theirs else "numpy"
    return out


# -- a wide product written transposed: chosen by measurement ---------------------------------

_WIDE_BUCKETS = (24, 26)  # a layer's product on a batch of 256 is wide (n > m) from 2^24
_transposed: dict = {}  # (dtype, MKL's threads) -> {bucket: "transposed" | "as-is"}


def writes_transposed(dtype, m: int, n: int, k: int) -> bool:
    """Whether a product of ``m`` rows and ``n > m`` columns, a sum of ``k`` terms
    each, of ``dtype``, runs faster written transposed (into an array in Fortran
    order: the product of the transposes, which the BLAS writes with its roles
    swapped), as measured on this machine at MKL's present thread count
    (:func:`transposed_choices`); never below 2^24 multiply-adds, nor without MKL's
    measurement (``EINSUMGRAD_BLAS`` fixed). A traced program then writes it so,
    and what is computed from it element-wise keeps that layout
    (:func:`einsumgrad.program.layouts.transposed_products`)."""
    if chosen_matmul is None or m >= n or m * n * k < 1 << _WIDE_BUCKETS[0]:
        return False
    key = (numpy.dtype(dtype), _LIB.MKL_Get_Max_Threads())
    got = _transposed.get(key)
    if got is None:
        got = _transposed[key] = transposed_choices(key[0])
    return got[min(_bucket(m * n * k), _WIDE_BUCKETS[-1])] == "transposed"


def transposed_choices(dtype=None) -> dict:
    """``{bucket: "transposed" | "as-is"}`` for ``dtype`` (both float dtypes without one):
    whether a wide product of about 2^bucket multiply-adds, a layer's ``x @ w.T``
    on a batch of 256, is written faster transposed (the matmul chosen by
    :func:`blas_choices` for each way round), by 5%; measured on first use and
    kept beside those choices (on the bench's AMD CPU float32 layers ran faster
    transposed, float64 ones not: README, "BLAS by measurement").
    ``EINSUMGRAD_BLAS=mkl`` or ``numpy``: as they are, nothing measured."""
    if dtype is None:
        return {numpy.dtype(d).name: transposed_choices(d) for d in (numpy.float32, numpy.float64)}
    if chosen_matmul is None or os.environ.get("EINSUMGRAD_BLAS") in ("mkl", "numpy"):
        return {b: "as-is" for b in _WIDE_BUCKETS}
    return _load_or_measure(numpy.dtype(dtype), "transposed", measure_transposed)["wide"]


def measure_transposed(dtype) -> dict:
    """:func:`transposed_choices` for ``dtype``, measured: ``{"wide": {bucket: choice}}``;
    each class's product ``x @ w.T`` at the middle of the class (256 rows, twice
    as many columns as terms: at 2^26, 256 x 512 times 512 x 1024) timed into an
    array of each layout, in turns."""
    rng = numpy.random.default_rng(0)
    out: dict = {}
    for bucket in _WIDE_BUCKETS:
        n = round(((4 << bucket) / 256) ** 0.5)
        x, w = (rng.standard_normal(s).astype(dtype) for s in ((256, n // 2), (n, n // 2)))
        c, f = numpy.empty((256, n), dtype), numpy.empty((n, 256), dtype).T
        as_is, flipped = _in_turns([[lambda: chosen_matmul(x, w.T, out=c)],
                                    [lambda: chosen_matmul(x, w.T, out=f)]], 0.02, 21)
        out[bucket] = "transposed" if flipped < 0.95 * as_is else "as-is"
    return {"wide": out}


def _chooser() -> Callable:
    def pick(a, b):
        kind, work = _kind_and_work(a, b)
        by_layout = kind in _BY_LAYOUT
        if by_layout:  # a matrix whose rows are not contiguous: read transposed
            kind += ("-bt" if b.strides[-1] != b.itemsize else
                     "-at" if a.strides[-1] != a.itemsize else "")
        key = (a.dtype, kind, _bucket(work), _LIB.MKL_Get_Max_Threads())
        fn = _table.get(key)
        if fn is None:
            fn = _table[key] = _contender(blas_choices(a.dtype)[kind][key[2]], key[3])
        if by_layout and _SHAPE_WORK[0] <= work < _SHAPE_WORK[1]:
            shape = key + (a.shape[-2], b.shape[-1], a.shape[-1])
            got = _shaped.get(shape, 0)
            if type(got) is not int:
                return got
            if got + 1 < SHAPE_AFTER or not _may_race():
                if got or len(_shaped) < _SHAPES_MAX:
                    _shaped[shape] = got + 1
                return fn
            fn = _shaped[shape] = _shape_choice(shape, a, b)
        return fn

    def chosen_matmul(a, b, out=None):
        """``numpy.matmul(a, b, out=out)`` by NumPy's BLAS or MKL's, whichever was
        measured faster for this dtype and size class (see :func:`blas_choices`)."""
        if (type(a) is not numpy.ndarray or type(b) is not numpy.ndarray or a.dtype != b.dtype
                or a.dtype not in _FLOATS or a.ndim == 0 or b.ndim == 0
                or a.size * (b.shape[-1] if b.ndim > 1 else 1) < _CHOICE_MIN
                or (a.ndim <= 2 and b.ndim <= 2
                    and a.size * (b.shape[-1] if b.ndim > 1 else 1) <= _ONE_THREAD_WORK)):
            return numpy.matmul(a, b) if out is None else numpy.matmul(a, b, out=out)
        if (out is not None and out.ndim == 2 and out.flags.f_contiguous
                and not out.flags.c_contiguous):
            # a product written transposed (einsumgrad.program.layouts) is the product of
            # the transposes into out.T: the choice made for that one, which BLAS runs
            a, b = b.T, a.T
            pick(a, b)(a, b, out=out.T)
            return out
        fn = pick(a, b)
        return fn(a, b) if out is None else fn(a, b, out=out)
    chosen_matmul.pick = pick  # matmul_add's product, where it is not MKL's
    return chosen_matmul


def set_local_threads(n: int) -> None:
    """MKL's thread count for the calling thread alone (``MKL_Set_Num_Threads_Local``)."""
    _LIB.MKL_Set_Num_Threads_Local(n)


@functools.lru_cache(maxsize=None)
def address(name: str) -> int:
    """The address of MKL's C function ``name``, for a compiled kernel to call."""
    return ctypes.cast(getattr(_LIB, name), ctypes.c_void_p).value


def gemm_threads() -> int:
    """How many threads MKL's GEMM runs on now (1 without MKL: NumPy's BLAS on
    the NumPy backend's cache-sized products runs on one)."""
    return _LIB.MKL_Get_Max_Threads() if matmul is not None else 1


_FLOATS = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_LIB = _load()
matmul: Callable | None = _kernel(_LIB) if _LIB is not None else None
chosen_matmul: Callable | None = _chooser() if _LIB is not None else None
matmul_add: Callable | None = _accumulating(_LIB) if _LIB is not None else None
ufuncs: dict = _ufuncs(_LIB) if _LIB is not None else {}
erf: Callable | None = _vector(_LIB, "vsErf", "vdErf") if _LIB is not None else None
normal_cdf: Callable | None = (_vector(_LIB, "vsCdfNorm", "vdCdfNorm")
                               if _LIB is not None else None)
