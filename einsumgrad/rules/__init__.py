"""The rules: every primitive of the engine, each beside its VJP, JVP and batch
rule (and any fused or in-place VJP), in one folder grouped by what the
primitives are:

* :mod:`.einsum`: ``einsum``, the one linear-algebra primitive, and the
  execution of its derived patterns; sums, transposes, matmul, broadcasting;
* :mod:`.shape`: identity, reshape, indexing and its adjoint scatter-add;
* :mod:`.elementwise`: arithmetic with NumPy broadcasting, the activations;
* :mod:`.reductions`: mean, max (pooling) and the softmax family;
* :mod:`.norm`: the layer-norm family;
* :mod:`.patches`, :mod:`.convolution`, :mod:`.grid`: image patches, the op
  that turns convolution into an einsum, and einsums against them.

A primitive's VJP is ``vjp(k, g, out, *xs, **params)``, its JVP
``jvp(k, t, out, *xs, **params)``, its batch rule ``batch(bdims, shapes,
out_shape, **params)`` (see :class:`einsumgrad.tensor.Primitive`). This face
gathers the public ops and gives ``Tensor`` its operators and methods; a
person adding a primitive imports :mod:`einsumgrad.extend`.
"""
from __future__ import annotations

import numbers

from ..tensor import Tensor, pair
from .einsum import (broadcast_to, constant_like, einsum, einsum_p, einsum_spec, matmul,
                     moveaxis, sum, sum_to, swapaxes, transpose)
from .elementwise import (abs, add, add_bias, cos, div, erf, exp, gelu, log, mul, neg,
                          normal_pdf, power, relu, sigmoid, sin, softplus, sqrt, square, sub,
                          tanh, where)
from .norm import layer_norm
from .convolution import patch_einsum, unpatch_einsum
from .patches import as_pair, patches, unpatch
from .reductions import log_softmax, logsumexp, max, mean, softmax
from .shape import getitem, identity_p, normalize_axes, reshape, scatter_add

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


def _axes_arg(axes: tuple):
    """``t.transpose(*axes)``'s arguments as ``ndarray.transpose`` reads them:
    none (or None) to reverse, one sequence, or the axes one by one."""
    if not axes or axes == (None,):
        return None
    return axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes


def _no_mT(x):
    raise ValueError(f"mT swaps the last two axes: a tensor of rank {x.ndim} has fewer")


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
    T.transpose = lambda x, *axes: transpose(x, _axes_arg(axes))
    T.permute = lambda x, *dims: transpose(x, _axes_arg(dims))
    T.swapaxes = swapaxes
    T.mT = property(lambda x: swapaxes(x, -2, -1) if x.ndim >= 2 else _no_mT(x))
    T.exp, T.log, T.tanh, T.sqrt = exp, log, tanh, sqrt
    T.sigmoid, T.relu, T.sin, T.cos = sigmoid, relu, sin, cos


_install_methods()
