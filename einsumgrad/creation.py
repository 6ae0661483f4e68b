"""Constructors returning Tensors, as NumPy's (torch's keywords accepted).

Each takes ``dtype`` (when None: :func:`~einsumgrad.get_default_dtype` for floating
results, NumPy's rule for ``full`` and integer ``arange``), ``requires_grad`` and
``device`` ('cpu', 'cuda' or a Backend; ``*_like`` keep their argument's).
"""
from __future__ import annotations

from typing import Any

import numpy

from .backends import Backend, backend_of, device_backend
from .defaults import get_default_dtype
from .tensor import Tensor


def _xp(device: Any) -> Backend:
    if device is None:
        return device_backend("cpu")
    return device if isinstance(device, Backend) else device_backend(str(device))


def _shape(shape) -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]  # zeros((2, 3)) as NumPy, zeros(2, 3) as torch
    return tuple(int(n) for n in shape)


def zeros(*shape, dtype=None, requires_grad: bool = False, device=None) -> Tensor:
    """A Tensor of zeros of ``shape`` (a tuple, or the sizes one by one)."""
    return Tensor(_xp(device).zeros(_shape(shape), dtype=dtype or get_default_dtype()),
                  requires_grad)


def ones(*shape, dtype=None, requires_grad: bool = False, device=None) -> Tensor:
    """A Tensor of ones of ``shape``."""
    return Tensor(_xp(device).ones(_shape(shape), dtype=dtype or get_default_dtype()),
                  requires_grad)


def full(shape, fill_value, dtype=None, requires_grad: bool = False, device=None) -> Tensor:
    """A Tensor of ``shape`` filled with ``fill_value`` (its dtype as NumPy's ``full``)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return Tensor(_xp(device).full(shape, fill_value, dtype=dtype), requires_grad)


def zeros_like(t, dtype=None, requires_grad: bool = False) -> Tensor:
    """Zeros shaped like ``t``, on its device, of its dtype unless given."""
    data = t.data if isinstance(t, Tensor) else t
    return Tensor(backend_of(data).zeros_like(data, dtype=dtype), requires_grad)


def ones_like(t, dtype=None, requires_grad: bool = False) -> Tensor:
    """Ones shaped like ``t``, on its device, of its dtype unless given."""
    data = t.data if isinstance(t, Tensor) else t
    return Tensor(backend_of(data).ones_like(data, dtype=dtype), requires_grad)


def arange(*args, dtype=None, requires_grad: bool = False, device=None) -> Tensor:
    """NumPy's ``arange(stop)`` / ``arange(start, stop[, step])``: integers for integer
    arguments, as NumPy and torch."""
    return Tensor(_xp(device).arange(*args, dtype=dtype), requires_grad)


def eye(n: int, m: int | None = None, dtype=None, requires_grad: bool = False,
        device=None) -> Tensor:
    """The ``n x m`` identity (``m = n`` when None)."""
    return Tensor(_xp(device).eye(n, m, dtype=dtype or get_default_dtype()), requires_grad)


def linspace(start, stop, num: int = 50, endpoint: bool = True, dtype=None,
             requires_grad: bool = False, device=None) -> Tensor:
    """``num`` evenly spaced values from ``start`` to ``stop``, as NumPy's ``linspace``
    (torch's third argument is ``steps``: the same)."""
    return Tensor(_xp(device).linspace(start, stop, num, endpoint=endpoint,
                                       dtype=dtype or get_default_dtype()),
                  requires_grad)


def from_dlpack(x: Any) -> Tensor:
    """A Tensor sharing the memory of any DLPack array (torch, JAX, CuPy): no copy.

    Raises:
        TypeError: an array on a device einsumgrad has no backend for.
    """
    kind = x.__dlpack_device__()[0]
    if kind == 1:  # kDLCPU
        return Tensor(numpy.from_dlpack(x))
    if kind == 2:  # kDLCUDA
        import cupy  # noqa: PLC0415 (only with a GPU)
        return Tensor(cupy.from_dlpack(x))
    raise TypeError(f"from_dlpack: device type {kind} has no einsumgrad backend (CPU or CUDA)")
