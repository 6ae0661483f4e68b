"""Backends: the array namespace is chosen from the array's own type.

There is no global device flag. :func:`backend_of` looks at ``type(array)``
and returns a :class:`Backend`, a thin namespace over NumPy, CuPy (imported
lazily, the first time a CuPy array shows up) or any namespace registered
with :func:`register_backend` (the tests register a strict stand-in). Rules
and layers create and touch data only through it, never through ``numpy.``.
"""
from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any, Callable

import numpy

from . import mkl


class Backend:
    """An array namespace: the module's functions plus the few extras rules need.

    Attribute access falls through to the module, so ``B.exp``, ``B.matmul``,
    ``B.zeros`` are the module's own. Extras: ``name`` (part of plan cache
    keys), ``erf``, ``add_at``, ``as_strided``, ``to_numpy``, ``asarray``, and
    ``normal_cdf``: a fused kernel for the normal CDF ``Phi(x)`` (GELU's), or None
    to compose it from ``erf``; ``matmul`` replaces the module's (the NumPy
    backend takes MKL's GEMM when it is installed, see :mod:`einsumgrad.mkl`);
    :meth:`matmul_add` accumulates a product in place;
    ``ufuncs`` replace module functions of the same name and signature (MKL's
    multi-threaded element-wise kernels, for NumPy).
    """

    def __init__(self, name: str, module: ModuleType | Any, *, erf: Callable,
                 add_at: Callable, as_strided: Callable, to_numpy: Callable,
                 asarray: Callable | None = None, device: str = "cpu",
                 normal_cdf: Callable | None = None, matmul: Callable | None = None,
                 matmul_add: Callable | None = None, ufuncs: dict | None = None):
        self.name, self.module, self.device = name, module, device
        if matmul is not None:
            self.matmul = matmul
        self._matmul_add = matmul_add
        # Whether matmul_add accumulates in place (a GEMM with beta 1), not
        # through a temporary product: the padded-grid input gradient needs it to pay.
        self.matmul_adds_in_place = matmul_add is not None
        for attr, fn in (ufuncs or {}).items():
            setattr(self, attr, fn)
        self.erf, self.add_at, self.as_strided, self.to_numpy = erf, add_at, as_strided, to_numpy
        self.asarray = asarray or module.asarray
        self.normal_cdf = normal_cdf

    def matmul_add(self, a, b, c) -> None:
        """``c += a @ b`` for matrices, in place: by the backend's kernel (GEMM
        with beta 1) where it takes the layout, else a product and an add."""
        if self._matmul_add is None or not self._matmul_add(a, b, c):
            c += self.matmul(a, b)

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.module, attr)
        setattr(self, attr, value)  # cache: later lookups skip __getattr__
        return value

    def __repr__(self) -> str:
        return f"<einsumgrad backend {self.name}>"


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
    r = mkl.normal_cdf(x) if mkl.normal_cdf is not None else None
    if r is None and x.dtype.kind == "f" and x.dtype.itemsize <= 4:
        r = _erf_float32(x, cdf=True)
    return r  # None for float64 without MKL: composed from SciPy's exact erf


def memory_order(a) -> list:
    """``a``'s axes from outermost to innermost in memory (by stride; size-1
    axes, which have no place in memory, last): how kernels walk any layout."""
    return sorted(range(a.ndim), key=lambda i: -a.strides[i] if a.shape[i] > 1 else 0)


def in_order_of(like, shape, fill: str = "zeros", lead: tuple = (), dtype=None):
    """Zeros (or an empty array) of shape ``lead + shape``, its last ``like.ndim``
    axes laid out in memory in the order of ``like``'s strides, ``lead`` outermost."""
    xp, order, n = backend_of(like), memory_order(like), len(lead)
    z = getattr(xp, fill)(tuple(lead) + tuple(shape[i] for i in order),
                          dtype=like.dtype if dtype is None else dtype)
    return xp.transpose(z, tuple(range(n)) + tuple(n + order.index(i) for i in range(like.ndim)))


def _numpy_add_at(target, index, values):
    numpy.add.at(target, index, values)


NUMPY = Backend("numpy", numpy, erf=_numpy_erf(), add_at=_numpy_add_at,
                as_strided=numpy.lib.stride_tricks.as_strided,
                to_numpy=lambda a: a, normal_cdf=_numpy_normal_cdf, matmul=mkl.matmul,
                matmul_add=mkl.matmul_add, ufuncs=mkl.ufuncs)

_registry: dict = {numpy.ndarray: NUMPY}
_CUPY: Backend | None = None


def register_backend(array_type: type, backend: Backend) -> None:
    """Make arrays of ``array_type`` (and its subclasses) run on ``backend``."""
    _registry[array_type] = backend


def _cupy_backend() -> Backend:
    global _CUPY
    if _CUPY is None:
        try:
            import cupy
            import cupyx
            from cupyx.scipy.special import erf
        except ImportError as e:
            raise ImportError("device 'cuda' needs CuPy: pip install -e '.[gpu]'") from e
        _CUPY = Backend("cupy", cupy, erf=erf, add_at=cupyx.scatter_add,
                        as_strided=cupy.lib.stride_tricks.as_strided,
                        to_numpy=cupy.asnumpy, device="cuda")
    return _CUPY


def _lookup(tp: type) -> Backend | None:
    for base in tp.__mro__:
        if base in _registry:
            return _registry[base]
    if tp.__module__.startswith("cupy") and "cupy" in sys.modules:
        _registry[tp] = _cupy_backend()
        return _registry[tp]
    return None


def backend_of(array: Any) -> Backend:
    """The backend of one array; NumPy for scalars and NumPy arrays."""
    b = _registry.get(type(array))
    if b is not None:
        return b
    b = _lookup(type(array))
    if b is not None:
        _registry[type(array)] = b
        return b
    return NUMPY


def common_backend(arrays) -> Backend:
    """The one backend of several arrays; NumPy scalars adapt.

    Raises:
        ValueError: the arrays live on two devices (both are named).
    """
    found = None
    for a in arrays:
        if isinstance(a, (int, float, complex, numpy.generic)):
            continue
        b = backend_of(a)
        if found is None or found is b:
            found = b
        else:
            raise DeviceMismatchError(found, b)
    return found or NUMPY


class DeviceMismatchError(ValueError):
    """Operands of one op live on two devices; the message names both."""

    def __init__(self, a: Backend, b: Backend):
        super().__init__(f"operands live on two devices: {a.name} ({a.device}) and "
                         f"{b.name} ({b.device}); move one with .to(...) first")


def device_mismatch(arrays) -> DeviceMismatchError | None:
    """The error naming both devices when ``arrays`` mix devices, else ``None``.

    Array libraries raise their own deep errors on mixed operands; ops call
    this only after such a failure, to say what went wrong (no cost otherwise).
    """
    try:
        common_backend(arrays)
    except DeviceMismatchError as e:
        return e
    return None


def to_backend(array: Any, backend: Backend) -> Any:
    """Move ``array`` onto ``backend`` (a copy when the device changes)."""
    src = backend_of(array)
    if src is backend:
        return array
    return backend.asarray(src.to_numpy(array))


def device_backend(device: str) -> Backend:
    """The backend for a device string: 'cpu', 'cuda' (also 'cuda:0', 'gpu'),
    or the device of a registered backend (the tests' 'strict')."""
    if device == "cpu":
        return NUMPY
    if device.startswith("cuda") or device == "gpu":
        return _cupy_backend()
    for b in _registry.values():
        if b.device == device:
            return b
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
