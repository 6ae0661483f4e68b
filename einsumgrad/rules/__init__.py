"""The rules: every primitive of the engine, each beside its VJP, JVP and batch
rule (and any fused or in-place VJP), in one folder grouped by what the
primitives are:

* :mod:`.einsum`: ``einsum``, the one linear-algebra primitive, and the
  execution of its derived patterns; sums, transposes, matmul, broadcasting;
* :mod:`.shape`: identity, reshape, indexing and its adjoint scatter-add;
* :mod:`.elementwise`: arithmetic with NumPy broadcasting, the activations;
* :mod:`.reductions`: mean, max (pooling) and the softmax family;
* :mod:`.attention`: attention's core, ``softmax(scale q k^T) v``, as one primitive;
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

import functools
import numbers

import numpy

from ..backends import Backend
from ..tensor import Tensor, as_tensor, pair, update
from .einsum import (broadcast_to, constant_like, einsum, einsum_p, einsum_spec, matmul,
                     moveaxis, sum, sum_to, swapaxes, transpose)
from .elementwise import (abs, add, add_bias, clip, cos, div, erf, exp, floor_divide, gelu, log,
                          maximum, minimum, mul, neg, normal_pdf, power, relu, remainder, sigmoid,
                          sin, softplus, sqrt, square, sub, tanh, where)
from .norm import layer_norm
from .convolution import patch_einsum, unpatch_einsum
from .patches import as_pair, patches, unpatch
from .reductions import (argmax, argmin, cumsum, log_softmax, logsumexp, max, mean, min, prod,
                         softmax, std, var)
from .shape import (assign, astype, concatenate, copy, expand_dims, flip, getitem, identity_p,
                    normalize_axes, pad, region, reshape, scatter_add, split, squeeze, stack)
from .einsum import lift

def torch_spellings(fn, axis_at: int = 0):
    """``fn`` taking torch's ``dim=`` / ``keepdim=`` for NumPy's ``axis=`` / ``keepdims=``
    (``axis_at``: how many positional arguments come between the tensor and ``axis``).

    Raises:
        TypeError: both spellings of one argument given.
    """
    @functools.wraps(fn)
    def wrapped(x, *args, dim=_UNSET, keepdim=_UNSET, **kwargs):
        if dim is _UNSET and keepdim is _UNSET:  # NumPy's spelling: nothing to translate
            return fn(x, *args, **kwargs)
        for torch_name, name, value in (("dim", "axis", dim), ("keepdim", "keepdims", keepdim)):
            if value is not _UNSET:
                positional = name == "axis" and len(args) > axis_at
                given = args[axis_at] if positional else kwargs.get(name)
                if given not in (None, False):
                    raise TypeError(f"{fn.__name__}: {name}= and {torch_name}= name the same "
                                    f"argument: give one")
                if positional:
                    args = args[:axis_at] + args[axis_at + 1:]
                kwargs[name] = value
        return fn(x, *args, **kwargs)
    return wrapped


_UNSET = object()
(sum, mean, max, min, prod, var, std, argmax, argmin, cumsum, logsumexp, softmax, log_softmax,
 concatenate, stack, squeeze, expand_dims, flip) = map(torch_spellings, (
    sum, mean, max, min, prod, var, std, argmax, argmin, cumsum, logsumexp, softmax, log_softmax,
    concatenate, stack, squeeze, expand_dims, flip))
split = torch_spellings(split, axis_at=1)
clamp = clip


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
    fn = getattr(fn, "__wrapped__", fn)  # dim= and keepdim= are read here: not again inside

    def method(x, axis=None, keepdims=False, *, dim=_UNSET, keepdim=_UNSET, **numpy_kwargs):
        # NumPy's out= and dtype= (as ndarray's methods take them) are refused
        # by name when set; torch's dim= / keepdim= are axis= / keepdims=.
        given = numpy_kwargs and sorted(k for k, v in numpy_kwargs.items() if v is not None)
        if given:
            raise TypeError(f"Tensor.{fn.__name__}: {', '.join(given)} not supported "
                            f"(einsumgrad reductions return a new Tensor)")
        if dim is not _UNSET:
            if axis is not None:
                raise TypeError(f"Tensor.{fn.__name__}: axis and dim name the same argument")
            axis = dim
        return fn(x, axis, keepdims if keepdim is _UNSET else keepdim)
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


def _in_place(op):
    """``x op= y`` as torch: ``x`` itself changes (see :func:`einsumgrad.tensor.update`)."""
    def method(x, y):
        y = as_tensor(y, like=x)

        def compute(x):
            r = op(x, y)
            if r.dtype != x.dtype and not numpy.can_cast(r.dtype, x.dtype, "same_kind"):
                raise TypeError(f"in-place {op.__name__}: the result's dtype {r.dtype} cannot "
                                f"be cast to the tensor's {x.dtype} (as NumPy and torch)")
            return astype(r, x.dtype)
        return update(x, compute, y)
    return method


def _setitem(x, index, v):
    """``x[index] = v`` as NumPy and torch: ``v`` broadcast to the region and cast."""
    v = as_tensor(v, like=x)
    if v.dtype != x.dtype and not numpy.can_cast(v.dtype, x.dtype, "same_kind"):
        raise TypeError(f"t[...] = v: v's dtype {v.dtype} cannot be cast to the tensor's "
                        f"{x.dtype}")

    def compute(x):
        shape = region(x, index)
        w = astype(v, x.dtype)
        if w.shape != shape:
            if w.ndim > len(shape):  # NumPy drops leading size-1 axes of v
                w = reshape(w, w.shape[w.ndim - len(shape):])
            w = broadcast_to(lift(w, w.ndim, len(shape)), shape)
        return assign(x, index, w)
    update(x, compute, v)


def _flatten(x, start_dim: int = 0, end_dim: int = -1):
    """``t.flatten()`` as NumPy's; torch's ``start_dim`` / ``end_dim`` merge those axes only."""
    if x.ndim == 0:
        return reshape(x, (1,))
    (a,), (b,) = normalize_axes(start_dim, x.ndim), normalize_axes(end_dim, x.ndim)
    if a > b:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    return reshape(x, x.shape[:a] + (-1,) + x.shape[b + 1:])


def _to(x, *args, dtype=None, device=None):
    """``t.to(dtype)``, ``t.to(device)`` or both, as torch: a cast stays on the tape, a
    move to another device gives a leaf there."""
    for a in args:
        if isinstance(a, Backend):
            device = a
            continue
        try:
            dtype = numpy.dtype(a)
        except TypeError:  # 'cpu', 'cuda': not a dtype
            device = a
    y = x if dtype is None else astype(x, dtype)
    return y if device is None else y.to_device(device)


def _install_methods():
    T = Tensor
    T.__add__ = T.__radd__ = add  # the ops themselves: no frame between
    T.__sub__, T.__rsub__ = sub, (lambda x, y: sub(y, x))
    T.__mul__ = T.__rmul__ = mul
    T.__truediv__, T.__rtruediv__ = div, (lambda x, y: div(y, x))
    T.__pow__, T.__rpow__ = (lambda x, y: power(x, y)), (lambda x, y: power(y, x))
    T.__matmul__, T.__rmatmul__ = (lambda x, y: matmul(x, y)), (lambda x, y: matmul(y, x))
    T.__neg__ = lambda x: neg(x)
    T.__pos__ = lambda x: x
    T.__abs__ = lambda x: abs(x)
    T.__getitem__ = lambda x, i: getitem(x, i)
    T.__setitem__ = _setitem
    T.__iadd__, T.__isub__ = _in_place(add), _in_place(sub)
    T.__imul__, T.__itruediv__ = _in_place(mul), _in_place(div)
    T.__lt__ = _compare(lambda a, b: a < b)
    T.__le__ = _compare(lambda a, b: a <= b)
    T.__gt__ = _compare(lambda a, b: a > b)
    T.__ge__ = _compare(lambda a, b: a >= b)
    T.__eq__ = _compare(lambda a, b: a == b)
    T.__ne__ = _compare(lambda a, b: a != b)
    T.__hash__ = object.__hash__  # by identity: the engine keys by id(), never by ==
    T.T = property(lambda x: transpose(x))
    T.sum, T.mean, T.max, T.min, T.prod = map(_reduction, (sum, mean, max, min, prod))
    T.var, T.std, T.argmax, T.argmin, T.cumsum = var, std, argmax, argmin, cumsum
    T.clip = T.clamp = clip
    T.__floordiv__, T.__rfloordiv__ = (lambda x, y: floor_divide(x, y)), (lambda x, y: floor_divide(y, x))
    T.__mod__, T.__rmod__ = (lambda x, y: remainder(x, y)), (lambda x, y: remainder(y, x))
    T.reshape = lambda x, *shape: reshape(x, *shape)
    T.squeeze = squeeze
    T.unsqueeze = expand_dims
    T.flatten = _flatten
    T.ravel = lambda x: reshape(x, (x.size,))
    T.astype = astype
    T.float = lambda x: astype(x, numpy.float32)  # torch's: float32
    T.double = lambda x: astype(x, numpy.float64)
    T.clone = T.copy = copy
    T.to = _to
    T.transpose = lambda x, *axes: transpose(x, _axes_arg(axes))
    T.permute = lambda x, *dims: transpose(x, _axes_arg(dims))
    T.swapaxes = swapaxes
    T.mT = property(lambda x: swapaxes(x, -2, -1) if x.ndim >= 2 else _no_mT(x))
    T.exp, T.log, T.tanh, T.sqrt = exp, log, tanh, sqrt
    T.sigmoid, T.relu, T.sin, T.cos = sigmoid, relu, sin, cos


_install_methods()
