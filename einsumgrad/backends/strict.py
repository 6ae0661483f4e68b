"""A strict stand-in for the GPU: NumPy arrays that refuse to mix with plain ones.

:class:`StrictArray` is a NumPy subclass registered with einsumgrad exactly as
CuPy is (``register_backend``). Like a CuPy array it works with Python and
NumPy scalars (and 0-d arrays), but any ufunc, binary op, NumPy function,
assignment or index that sees a plain ``ndarray`` with one or more axes raises
:class:`MixedArrayError`. Its namespace (:data:`STRICT`, what ``backend_of``
returns) is NumPy's with every function returning StrictArrays, the way
``cupy.zeros`` returns device arrays. So any rule, layer or optimizer that
creates or touches data with ``numpy.`` instead of the arrays' backend fails
here on a CPU-only machine, where it would fail (or silently leave the GPU)
under CuPy.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Callable

import numpy

from .base import Backend, register_backend


class MixedArrayError(TypeError):
    """A strict array met a plain NumPy array (as a CuPy array meeting one would)."""


class StrictArray(numpy.ndarray):
    """A NumPy array standing in for a device array: it never mixes with host arrays."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        if any(_foreign(type(x)) for x in inputs + out):
            return NotImplemented  # NEP 13: a Tensor (or another protocol type) decides
        _refuse_plain((inputs, out), f"numpy.{ufunc.__name__}.{method}")
        if method == "at":  # in place on the target (add.at): index arrays too
            _refuse_plain(inputs[1], f"numpy.{ufunc.__name__}.at index")
        if out:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _strict(result)

    def __array_function__(self, func, types, args, kwargs):
        if any(_foreign(t) for t in types):
            return NotImplemented  # NEP 18, as CuPy: a Tensor's protocol decides
        _refuse_plain((args, kwargs), f"numpy.{func.__name__}")
        return _strict(func(*_plain(args), **_plain(kwargs)))

    def __getitem__(self, index):
        _refuse_plain(index, "indexing with")
        return _strict(super().__getitem__(index))

    def __setitem__(self, index, value):
        _refuse_plain((index, value), "assignment of")
        super().__setitem__(index, _plain(value))


def _foreign(tp: type) -> bool:
    """A type with NumPy's protocols of its own (an einsumgrad Tensor)."""
    return not issubclass(tp, numpy.ndarray) and getattr(tp, "__array_ufunc__", None) is not None


def _is_plain(x: Any) -> bool:
    return isinstance(x, numpy.ndarray) and not isinstance(x, StrictArray) and x.ndim > 0


def _refuse_plain(obj: Any, where: str) -> None:
    """Raise if ``obj`` (or anything in its tuples, lists, dicts) is a plain array with axes."""
    if _is_plain(obj):
        raise MixedArrayError(f"{where}: a plain numpy array of shape {obj.shape} met a strict "
                              f"(device) array; create data with the arrays' backend")
    if isinstance(obj, (tuple, list)):
        for o in obj:
            _refuse_plain(o, where)
    elif isinstance(obj, dict):
        for o in obj.values():
            _refuse_plain(o, where)


def _plain(obj: Any) -> Any:
    """Strict arrays (also inside tuples, lists, dicts) as plain views of the same memory."""
    if isinstance(obj, StrictArray):
        return obj.view(numpy.ndarray)
    if isinstance(obj, tuple):
        return tuple(_plain(o) for o in obj)
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _strict(obj: Any) -> Any:
    """Arrays in a result (also inside tuples and lists) as strict views.

    A NumPy scalar becomes a 0-d strict array, as CuPy's reductions return 0-d
    device arrays: a result must not slip back to the host by being a scalar.
    """
    if isinstance(obj, numpy.ndarray):
        return obj if isinstance(obj, StrictArray) else obj.view(StrictArray)
    if isinstance(obj, numpy.generic):
        return numpy.asarray(obj).view(StrictArray)
    if isinstance(obj, tuple):
        return tuple(_strict(o) for o in obj)
    if isinstance(obj, list):
        return [_strict(o) for o in obj]
    return obj


def _device_function(fn: Callable, name: str) -> Callable:
    """``fn`` as a device namespace function: refuses host arrays, returns strict ones."""
    def call(*args, **kwargs):
        _refuse_plain((args, kwargs), name)
        return _strict(fn(*_plain(args), **_plain(kwargs)))
    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


def to_strict(a: Any, dtype=None) -> StrictArray:
    """Copy a host array (or array-like) onto the strict "device" (as ``cupy.asarray``)."""
    return numpy.array(_plain(a), dtype=dtype, copy=True).view(StrictArray)


def asarray(a: Any, dtype=None) -> StrictArray:
    """A strict array from anything, without a copy when it already is one."""
    if isinstance(a, StrictArray) and (dtype is None or a.dtype == dtype):
        return a
    return to_strict(a, dtype)


def to_numpy(a: Any) -> numpy.ndarray:
    """A plain host copy (as ``cupy.asnumpy``)."""
    return numpy.array(_plain(a), copy=True)


class _Namespace:
    """NumPy's namespace (and its submodules) with device functions in place of its own.

    ``asarray`` and ``array`` accept host arrays (they are the host-to-device
    copy, as in CuPy); every other function refuses them. Types (dtypes) and
    constants pass through unchanged.
    """

    def __init__(self, module: ModuleType, prefix: str = "strict"):
        self._module, self._prefix = module, prefix

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if isinstance(value, ModuleType):
            value = _Namespace(value, f"{self._prefix}.{name}")
        elif callable(value) and not isinstance(value, type):
            value = _device_function(value, f"{self._prefix}.{name}")
        setattr(self, name, value)
        return value

    asarray = staticmethod(asarray)
    array = staticmethod(to_strict)


namespace = _Namespace(numpy)


def _erf(x):
    try:
        from scipy.special import erf
    except ImportError:
        erf = numpy.vectorize(math.erf, otypes=[x.dtype])
    return namespace.asarray(erf(_plain(x))).astype(x.dtype, copy=False)


def _add_at(target, index, values):
    _refuse_plain((target, index, values), "strict add_at")
    numpy.add.at(_plain(target), _plain(index), _plain(values))


_as_strided = _device_function(numpy.lib.stride_tricks.as_strided, "strict.as_strided")
STRICT = Backend("strict", namespace, erf=_erf, add_at=_add_at, as_strided=_as_strided,
                 to_numpy=to_numpy, asarray=asarray, device="strict")
register_backend(StrictArray, STRICT)
