"""The default floating dtype: what layers create their parameters in, unless told.

NumPy's float64 unless :func:`set_default_dtype` says otherwise (torch's
default is float32; einsumgrad keeps NumPy's, so a model and the arrays a
user builds with NumPy agree).

>>> import numpy, einsumgrad.defaults as d
>>> d.set_default_dtype(numpy.float32); d.get_default_dtype()
dtype('float32')
"""
from __future__ import annotations

from typing import Any

import numpy

_default = numpy.dtype(numpy.float64)


def get_default_dtype() -> numpy.dtype:
    """The dtype new layers (and constructors that take it) use: float64 unless set."""
    return _default


def set_default_dtype(dtype: Any) -> None:
    """Make ``dtype`` the default floating dtype, as ``torch.set_default_dtype``.

    Args:
        dtype: a floating dtype (``numpy.float32``, ``"float64"``, ``numpy.float16``).

    Raises:
        TypeError: ``dtype`` is not a real floating dtype (torch refuses
            integers and complex too).
    """
    global _default
    d = numpy.dtype(dtype)
    if d.kind != "f":
        raise TypeError(f"set_default_dtype: only floating dtypes can be the default, got {d}")
    _default = d


def resolve(dtype: Any = None) -> numpy.dtype:
    """``dtype`` as a NumPy dtype, or the default where it is None."""
    return _default if dtype is None else numpy.dtype(dtype)
