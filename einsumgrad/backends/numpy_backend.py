"""The NumPy backend (the host's), with MKL's GEMM and vector math and numba's
fused row kernels as capabilities where those extras are installed."""
from __future__ import annotations

import math
from typing import Callable

import numpy

from . import kernels, mkl
from .base import KERNELS, Backend, register_backend

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (Eigen's and XLA's float32 erf); beyond
# that erf is +-1 in float32. Highest-degree coefficient first (Horner).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


_ERF_P32 = tuple(numpy.float32(a) for a in _ERF_P)
_ERF_Q32 = tuple(numpy.float32(b) for b in _ERF_Q)
_SQRT_HALF32 = numpy.float32(math.sqrt(0.5))
_ERF_CHUNK = 1 << 16  # four float32 temporaries of this many entries stay in L2


def _erf_float32(x, cdf: bool = False):
    """erf for float32 (and narrower) arrays, within 8 float32 ulps of the exact value;
    with ``cdf``, the normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2 in the same passes.

    SciPy's erf costs ~30 exps per element and works in float64; this rational
    approximation is two dozen in-place float32 passes, chunk by chunk so the
    temporaries never leave the cache (4x faster than SciPy; evaluated in
    float64 it is within 2 ulps but twice as slow, which GELU felt).
    """
    flat = numpy.ascontiguousarray(x).reshape(-1)
    out = numpy.empty(flat.shape, x.dtype)
    f32, P, Q = numpy.float32, _ERF_P32, _ERF_Q32
    c, x2, p, q = numpy.empty((4, min(_ERF_CHUNK, flat.size)), f32)
    for s in range(0, flat.size, _ERF_CHUNK):
        e = min(s + _ERF_CHUNK, flat.size)
        cc, xx, pp, qq = c[:e - s], x2[:e - s], p[:e - s], q[:e - s]
        if cdf:
            numpy.multiply(flat[s:e], _SQRT_HALF32, out=cc)
            numpy.clip(cc, f32(-4.0), f32(4.0), out=cc)
        else:
            numpy.clip(flat[s:e], f32(-4.0), f32(4.0), out=cc)
        numpy.multiply(cc, cc, out=xx)
        numpy.multiply(xx, P[0], out=pp)
        pp += P[1]
        for a in P[2:]:
            pp *= xx
            pp += a
        pp *= cc
        numpy.multiply(xx, Q[0], out=qq)
        qq += Q[1]
        for b in Q[2:]:
            qq *= xx
            qq += b
        if cdf:
            pp /= qq
            pp += f32(1.0)
            numpy.multiply(pp, f32(0.5), out=out[s:e], casting="same_kind")
        else:
            numpy.divide(pp, qq, out=out[s:e], casting="same_kind")
    return out.reshape(x.shape)[()]  # a 0-d input gives a scalar, as a ufunc does


def _numpy_erf() -> Callable:
    try:
        from scipy.special import erf  # exact and vectorized when SciPy is present
    except ImportError:
        verf = numpy.vectorize(math.erf, otypes=[float])
        erf = lambda x: verf(x).astype(x.dtype, copy=False)

    def dispatch(x):
        x = numpy.asarray(x)
        r = mkl.erf(x) if mkl.erf is not None else None
        if r is not None:
            return r
        if x.dtype.kind == "f" and x.dtype.itemsize <= 4:
            return _erf_float32(x)
        return erf(x)
    return dispatch


def _numpy_normal_cdf(x):
    # float32: one pass of the rational erf in float64 where numba runs it (within
    # an epsilon, as MKL's, and faster on the bench's AMD CPU: kernels.normal_cdf)
    r = (kernels.normal_cdf(x, _ERF_P, _ERF_Q, 4.0) if getattr(x, "dtype", None) == numpy.float32
         else None)
    if r is None and mkl.normal_cdf is not None:
        r = mkl.normal_cdf(x)
    if r is None and x.dtype.kind == "f" and x.dtype.itemsize <= 4:
        r = _erf_float32(x, cdf=True)
    return r  # None for float64 without MKL: composed from SciPy's exact erf


def _numpy_add_at(target, index, values):
    numpy.add.at(target, index, values)


NUMPY = Backend("numpy", numpy, erf=_numpy_erf(), add_at=_numpy_add_at,
                as_strided=numpy.lib.stride_tricks.as_strided,
                to_numpy=lambda a: a, normal_cdf=_numpy_normal_cdf,
                matmul=mkl.chosen_matmul,  # NumPy's or MKL's, measured per size class
                matmul_add=mkl.matmul_add, ufuncs=mkl.ufuncs,
                kernels={k: getattr(kernels, k) for k in KERNELS},  # each declines without numba
                threads_large_gemm=mkl.matmul is not None)
# Read by the convolutions by blocks (rules/convolution.py), which keep to one
# large product where MKL threads it; not a Backend argument (base.py's).
NUMPY.gemm_threads = mkl.gemm_threads
register_backend(numpy.ndarray, NUMPY)

