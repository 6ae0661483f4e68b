"""The table of rules: every primitive of the engine, each beside its rules.

It lives in three files, along what the primitives are:

* :mod:`einsumgrad.linear`: ``einsum`` (the one linear-algebra primitive:
  sums, means, transposes, traces and matmul are einsums) and the shape ops;
* :mod:`einsumgrad.elementwise`: arithmetic with NumPy broadcasting and the
  activations;
* :mod:`einsumgrad.reductions`: ``max`` and the softmax family.

A primitive's VJP is ``vjp(k, g, out, *xs, **params)``, its JVP
``jvp(k, t, out, *xs, **params)``, its batch rule ``batch(bdims, shapes,
out_shape, **params)``. This module gathers the public ops and gives
``Tensor`` its operators and methods.
"""
from __future__ import annotations

import numbers

from .elementwise import *  # noqa: F401,F403
from .elementwise import (abs, add, cos, div, exp, log, mul, neg, power, relu, sigmoid, sin,
                          sqrt, sub, tanh)
from .linear import *  # noqa: F401,F403
from .linear import getitem, matmul, mean, reshape, sum, transpose
from .reductions import *  # noqa: F401,F403
from .reductions import max
from .tensor import Tensor, pair


def _compare(fn):
    """An element-wise comparison giving a bool Tensor (not recorded: it has no gradient).

    Other operands (None, strings, ...) give NotImplemented, so ``t == None`` is
    False as for torch, and ``t < None`` a TypeError.
    """
    def compare(x, y):
        if not (isinstance(y, (Tensor, numbers.Number, list, tuple)) or hasattr(y, "shape")):
            return NotImplemented
        return Tensor(fn(*(t.data for t in pair(x, y))))
    return compare


def _reduction(fn):
    def method(x, axis=None, keepdims=False, **numpy_kwargs):
        # numpy.sum(t), numpy.mean(t), numpy.max(t) call these with their own
        # keywords (out=None, dtype=None): fine while unset, refused by name if set.
        given = sorted(k for k, v in numpy_kwargs.items() if v is not None)
        if given:
            raise TypeError(f"Tensor.{fn.__name__}: {', '.join(given)} not supported "
                            f"(einsumgrad reductions return a new Tensor)")
        return fn(x, axis, keepdims)
    method.__name__, method.__doc__ = fn.__name__, fn.__doc__
    return method


def _install_methods():
    T = Tensor
    T.__add__ = T.__radd__ = lambda x, y: add(x, y)
    T.__sub__, T.__rsub__ = (lambda x, y: sub(x, y)), (lambda x, y: sub(y, x))
    T.__mul__ = T.__rmul__ = lambda x, y: mul(x, y)
    T.__truediv__, T.__rtruediv__ = (lambda x, y: div(x, y)), (lambda x, y: div(y, x))
    T.__pow__, T.__rpow__ = (lambda x, y: power(x, y)), (lambda x, y: power(y, x))
    T.__matmul__, T.__rmatmul__ = (lambda x, y: matmul(x, y)), (lambda x, y: matmul(y, x))
    T.__neg__ = lambda x: neg(x)
    T.__pos__ = lambda x: x
    T.__abs__ = lambda x: abs(x)
    T.__getitem__ = lambda x, i: getitem(x, i)
    T.__lt__ = _compare(lambda a, b: a < b)
    T.__le__ = _compare(lambda a, b: a <= b)
    T.__gt__ = _compare(lambda a, b: a > b)
    T.__ge__ = _compare(lambda a, b: a >= b)
    T.__eq__ = _compare(lambda a, b: a == b)
    T.__ne__ = _compare(lambda a, b: a != b)
    T.__hash__ = object.__hash__  # by identity: the engine keys by id(), never by ==
    T.T = property(lambda x: transpose(x))
    T.sum, T.mean, T.max = _reduction(sum), _reduction(mean), _reduction(max)
    T.reshape = lambda x, *shape: reshape(x, *shape)
    T.transpose = lambda x, *axes: transpose(x, axes[0] if len(axes) == 1 and isinstance(
        axes[0], (tuple, list)) else (axes or None))
    T.exp, T.log, T.tanh, T.sqrt = exp, log, tanh, sqrt
    T.sigmoid, T.relu, T.sin, T.cos = sigmoid, relu, sin, cos


_install_methods()
