"""The backend machinery: an array's namespace is chosen from its own type.

There is no global device flag. :func:`backend_of` looks at ``type(array)``
and returns the registered :class:`Backend`, a thin namespace over an array
module plus the few extras and capabilities rules ask for. The backends
themselves (NumPy, CuPy, the tests' strict stand-in) are files beside this
one; each registers itself, so this file knows none of them.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Callable

import numpy

# The fused row kernels a backend may offer (see einsumgrad.backends.kernels).
KERNELS = ("layer_norm", "layer_norm_vjp", "softmax_vjp", "divide_by_row_sums", "window_max",
           "window_max_vjp", "window_copy", "batch_norm", "batch_norm_vjp", "gelu", "gelu_vjp",
           "relu_vjp", "adam", "window_products", "attention", "attention_vjp",
           "attention_team")


class Backend:
    """An array namespace: the module's functions plus the few extras rules need.

    Attribute access falls through to the module, so ``B.exp``, ``B.matmul``,
    ``B.zeros`` are the module's own. Extras: ``name`` (part of plan cache
    keys), ``erf``, ``add_at``, ``as_strided``, ``to_numpy``, ``asarray``, and
    ``normal_cdf``: a fused kernel for the normal CDF ``Phi(x)`` (GELU's), or None
    to compose it from ``erf``; ``matmul`` replaces the module's (the NumPy
    backend takes MKL's GEMM when it is installed, see :mod:`einsumgrad.backends.mkl`);
    :meth:`matmul_add` accumulates a product in place;
    ``ufuncs`` replace module functions of the same name and signature (MKL's
    multi-threaded element-wise kernels, for NumPy).

    Capabilities rules ask for, each None (or False) where a backend lacks it:
    ``kernels`` named in :data:`KERNELS` (fused row kernels: numba's for
    NumPy, see :mod:`.kernels`), each returning None to decline an input;
    ``matmul_adds_in_place`` (``matmul_add`` is a GEMM with beta 1);
    ``threads_large_gemm`` (its matmul runs one large product on several
    threads better than many cache-sized ones, as MKL's does).
    """

    def __init__(self, name: str, module: ModuleType | Any, *, erf: Callable,
                 add_at: Callable, as_strided: Callable, to_numpy: Callable,
                 asarray: Callable | None = None, device: str = "cpu",
                 normal_cdf: Callable | None = None, matmul: Callable | None = None,
                 matmul_add: Callable | None = None, ufuncs: dict | None = None,
                 kernels: dict | None = None, threads_large_gemm: bool = False):
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
        self.threads_large_gemm = threads_large_gemm
        unknown = set(kernels or ()) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}: a backend offers {KERNELS}")
        for k in KERNELS:
            setattr(self, k, (kernels or {}).get(k))

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


_registry: dict = {}  # array type -> Backend; numpy.ndarray's is the host's
_lazy: list = []      # (module prefix, device prefixes, factory): made on first use


def register_backend(array_type: type, backend: Backend) -> None:
    """Make arrays of ``array_type`` (and its subclasses) run on ``backend``."""
    _registry[array_type] = backend
    _unowned.clear()


def register_lazy(module_prefix: str, devices: tuple, factory: Callable[[], Backend]) -> None:
    """A backend made by ``factory`` the first time an array whose type comes from
    ``module_prefix`` shows up, or a device starting with one of ``devices`` is asked for
    (CuPy: imported only then)."""
    _lazy.append((module_prefix, tuple(devices), factory))
    _unowned.clear()


def _lookup(tp: type) -> Backend | None:
    for base in tp.__mro__:
        if base in _registry:
            return _registry[base]
    for prefix, _, make in _lazy:
        # Only once the array library is loaded: an array of it exists then.
        if tp.__module__.startswith(prefix) and prefix in sys.modules:
            return make()
    return None


def backend_of(array: Any) -> Backend:
    """The backend of one array; NumPy for scalars and NumPy arrays."""
    b = _registry.get(type(array))
    if b is not None:
        return b
    if type(array) in _unowned:
        return _registry[numpy.ndarray]
    b = _lookup(type(array))
    if b is not None:
        _registry[type(array)] = b
        return b
    _unowned.add(type(array))
    return _registry[numpy.ndarray]


# Types no backend owns (NumPy's scalars, Python's numbers) that backend_of met:
# forgotten whenever a backend is registered, which might own them.
_unowned: set = set()


def is_backend_array(array: Any) -> bool:
    """Whether ``array``'s type belongs to a backend (NumPy, CuPy, ...), not another library."""
    return type(array) in _registry or _lookup(type(array)) is not None


def common_backend(arrays) -> Backend:
    """The one backend of several arrays; NumPy scalars adapt.

    Raises:
        ValueError: the arrays live on two devices (both are named).
    """
    found = None
    for a in arrays:
        b = _registry.get(type(a))  # an array of a registered type: the common case
        if b is None:
            if isinstance(a, (int, float, complex, numpy.generic)):
                continue
            b = backend_of(a)
        if found is None or found is b:
            found = b
        else:
            raise DeviceMismatchError(found, b)
    return found or _registry[numpy.ndarray]


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
        return _registry[numpy.ndarray]
    for _, devices, make in _lazy:
        if device.startswith(devices):
            return make()
    for b in _registry.values():
        if b.device == device:
            return b
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
