"""NumPy's protocols on Tensor: NumPy functions run einsumgrad's ops and stay on the tape.

``numpy.exp(t)``, ``numpy.einsum('ij,jk->ik', a, t)``, ``numpy.sum(t, axis=0)``,
``numpy.concatenate([t, u])``, ``array + t`` ... reach ``Tensor.__array_ufunc__``
or ``Tensor.__array_function__`` (NEP 13 and 18) and run the op einsumgrad has
for them, recorded like any other. A NumPy function without one would work
on the bare values and drop the derivative silently, so when a Tensor that
requires grad (or that a transform traces) takes part it raises a
``TypeError`` naming the function instead. On constant Tensors it works on
their values, as on an ndarray; functions whose result carries no derivative
(``numpy.allclose``, ``numpy.argmax``, ``numpy.shape``, ...) always do.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

from . import rules as ops
from .tensor import Tensor, pair, state, traced


def _live(t: Tensor) -> bool:
    """Would working on ``t``'s bare values lose a derivative?"""
    return (state.grad and t.requires_grad) or traced(t)


def _tensors(obj) -> list:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _values(obj):
    """``obj`` with every Tensor replaced by its array (lists, tuples, dicts walked)."""
    if isinstance(obj, Tensor):
        return obj.data
    if isinstance(obj, (list, tuple)):
        return type(obj)(_values(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _values(v) for k, v in obj.items()}
    return obj


def _refuse(name: str, hint: str | None = None) -> TypeError:
    return TypeError(
        f"numpy.{name} has no einsumgrad op: on a Tensor that requires grad or that a "
        f"transform traces, its derivative would be lost. "
        f"{hint or 'Use the einsumgrad op or an einsum (eg.einsum, eg.exp, t.sum(), ...)'}; "
        f".detach() the tensor if no derivative should flow through it")


def _unset(name: str, kwargs: dict, *allowed: str) -> None:
    """Refuse NumPy keywords the einsumgrad op has no meaning for (out=, dtype=, ...)."""
    bad = sorted(k for k, v in kwargs.items() if k not in allowed and v is not None)
    if bad:
        raise TypeError(f"numpy.{name} on a Tensor: {', '.join(bad)} not supported "
                        f"(einsumgrad ops return a new Tensor)")


# -- ufuncs -------------------------------------------------------------------------

def _compare(method: str) -> Callable:
    def compare(x, y):
        x, y = pair(x, y)
        return getattr(x, method)(y)
    return compare


UFUNCS = {
    numpy.add: ops.add, numpy.subtract: ops.sub, numpy.multiply: ops.mul,
    numpy.true_divide: ops.div, numpy.power: ops.power, numpy.matmul: ops.matmul,
    numpy.negative: ops.neg, numpy.positive: lambda x: x, numpy.absolute: ops.abs,
    numpy.exp: ops.exp, numpy.log: ops.log, numpy.sqrt: ops.sqrt, numpy.square: ops.square,
    numpy.sin: ops.sin, numpy.cos: ops.cos, numpy.tanh: ops.tanh,
    numpy.maximum: ops.maximum, numpy.minimum: ops.minimum,
    numpy.floor_divide: ops.floor_divide, numpy.remainder: ops.remainder,
    numpy.less: _compare("__lt__"), numpy.less_equal: _compare("__le__"),
    numpy.greater: _compare("__gt__"), numpy.greater_equal: _compare("__ge__"),
    numpy.equal: _compare("__eq__"), numpy.not_equal: _compare("__ne__"),
}

# Element-wise results with no derivative: on any Tensor, computed on the values.
_PREDICATES = {numpy.isnan, numpy.isinf, numpy.isfinite, numpy.signbit, numpy.logical_not,
               numpy.logical_and, numpy.logical_or, numpy.logical_xor}


def array_ufunc(self, ufunc, method: str, *inputs, **kwargs):
    name = ufunc.__name__
    if kwargs.get("out") is not None:
        raise TypeError(f"numpy.{name} with out= on a Tensor: einsumgrad ops return a new "
                        f"Tensor (write t[...] = ... to change one in place)")
    kwargs.pop("out", None)
    if method == "__call__" and ufunc in UFUNCS:
        _unset(name, kwargs)
        return UFUNCS[ufunc](*inputs)
    if method == "reduce" and ufunc is numpy.add:
        _unset("add.reduce", kwargs, "axis", "keepdims")
        return ops.sum(inputs[0], kwargs.get("axis", 0), kwargs.get("keepdims", False))
    if ufunc not in _PREDICATES and any(_live(t) for t in _tensors(inputs)):
        raise _refuse(name if method == "__call__" else f"{name}.{method}")
    result = getattr(ufunc, method)(*_values(inputs), **_values(kwargs))
    if isinstance(result, tuple):
        return tuple(Tensor(r) if hasattr(r, "shape") else r for r in result)
    return Tensor(result) if hasattr(result, "shape") else result


# -- array functions --------------------------------------------------------------------

def _einsum(subscripts, *operands, out=None, dtype=None, order="K", casting="safe",
            optimize=False):
    _unset("einsum", {"out": out, "dtype": dtype})
    if not isinstance(subscripts, str):  # the interleaved form: op, sublist, op, sublist, ...
        args = (subscripts,) + operands
        out_sub = args[-1] if len(args) % 2 else None
        operands = args[0:len(args) - (len(args) % 2):2]
        subs = args[1::2][:len(operands)]
        labels = sorted({i for s in subs for i in s if i is not Ellipsis})
        name = dict(zip(labels, _CHARS))
        term = lambda s: "".join("..." if i is Ellipsis else name[i] for i in s)  # noqa: E731
        subscripts = ",".join(map(term, subs)) + ("" if out_sub is None else "->" + term(out_sub))
    return ops.einsum(subscripts, *operands)


def _reduction(name: str, fn: Callable) -> Callable:
    def handler(a, axis=None, dtype=None, out=None, keepdims=False, **rest):
        _unset(name, {"dtype": dtype, "out": out, **rest})
        return fn(_tensor(a), axis, keepdims)
    return handler


def _moment(name: str, fn: Callable) -> Callable:
    def handler(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, **rest):
        _unset(name, {"dtype": dtype, "out": out, **rest})
        return fn(_tensor(a), axis, ddof, keepdims)
    return handler


def _clip(a, a_min=None, a_max=None, out=None, *, min=None, max=None, **kwargs):
    _unset("clip", {"out": out, **kwargs})
    return ops.clip(_tensor(a), a_min if min is None else min, a_max if max is None else max)


def _tensor(a) -> Tensor:
    return a if isinstance(a, Tensor) else Tensor(numpy.asarray(a))


def _reshape(a, shape=None, order="C", *, newshape=None, copy=None):
    if order != "C":
        raise TypeError(f"numpy.reshape on a Tensor: order={order!r} not supported (C order only)")
    return ops.reshape(_tensor(a), newshape if shape is None else shape)


def _dot(a, b, out=None):
    """``numpy.dot``: a product for a 0-d operand, else the last axis of ``a``
    against the only (1-d ``b``) or second-to-last axis of ``b``."""
    _unset("dot", {"out": out})
    a, b = pair(a, b)
    if a.ndim == 0 or b.ndim == 0:
        return a * b
    ia, ib = _CHARS[:a.ndim], list(_CHARS[a.ndim:a.ndim + b.ndim])
    k = -1 if b.ndim == 1 else -2
    ib[k] = ia[-1]
    out_l = ia[:-1] + "".join(l for i, l in enumerate(ib) if i != b.ndim + k)
    return ops.einsum(f"{ia},{''.join(ib)}->{out_l}", a, b)


def _outer(a, b, out=None):
    _unset("outer", {"out": out})
    a, b = pair(a, b)
    return ops.einsum("i,j->ij", ops.reshape(a, (a.size,)), ops.reshape(b, (b.size,)))


def _trace(a, offset=0, axis1=0, axis2=1, dtype=None, out=None):
    _unset("trace", {"dtype": dtype, "out": out})
    a = _tensor(a)
    if offset != 0:
        raise _refuse("trace with offset != 0", "Take the diagonal by indexing, then .sum()")
    i, j = ops.normalize_axes((axis1, axis2), a.ndim)
    ls = list(_CHARS[:a.ndim])
    ls[j] = ls[i]
    rest = "".join(l for n, l in enumerate(ls) if n not in (i, j))
    return ops.einsum(f"{''.join(ls)}->{rest}", a)


def _join(name: str, fn: Callable) -> Callable:
    def handler(arrays, axis=0, out=None, dtype=None, casting=None):
        _unset(name, {"out": out, "dtype": dtype, "casting": casting})
        return fn(arrays, axis)
    return handler


def _pad(array, pad_width, mode="constant", **kwargs):
    zeros = numpy.all(numpy.asarray(kwargs.pop("constant_values", 0)) == 0)
    if mode != "constant" or not zeros or kwargs:
        raise _refuse(f"pad (mode {mode!r}, or a fill other than 0)", "eg.pad pads with zeros")
    return ops.pad(_tensor(array), pad_width)


def _where(condition, *xy):
    if not xy:  # numpy.where(cond): the indices, no derivative
        return numpy.where(_values(condition))
    return ops.where(condition, *xy)


FUNCTIONS = {
    numpy.einsum: _einsum,
    numpy.sum: _reduction("sum", ops.sum),
    numpy.mean: _reduction("mean", ops.mean),
    numpy.max: _reduction("max", ops.max),
    numpy.amax: _reduction("amax", ops.max),
    numpy.min: _reduction("min", ops.min),
    numpy.amin: _reduction("amin", ops.min),
    numpy.prod: _reduction("prod", ops.prod),
    numpy.var: _moment("var", ops.var),
    numpy.std: _moment("std", ops.std),
    numpy.cumsum: lambda a, axis=None, dtype=None, out=None: (
        _unset("cumsum", {"dtype": dtype, "out": out}) or ops.cumsum(_tensor(a), axis)),
    numpy.clip: _clip,
    numpy.reshape: _reshape,
    numpy.ravel: lambda a, order="C": _reshape(a, (-1,), order),
    numpy.transpose: lambda a, axes=None: ops.transpose(_tensor(a), axes),
    numpy.swapaxes: lambda a, axis1, axis2: ops.swapaxes(_tensor(a), axis1, axis2),
    numpy.moveaxis: lambda a, source, destination: ops.moveaxis(_tensor(a), source, destination),
    numpy.squeeze: lambda a, axis=None: ops.squeeze(_tensor(a), axis),
    numpy.expand_dims: lambda a, axis: ops.expand_dims(_tensor(a), axis),
    numpy.broadcast_to: lambda array, shape, subok=False: ops.broadcast_to(_tensor(array), shape),
    numpy.concatenate: _join("concatenate", ops.concatenate),
    numpy.stack: _join("stack", ops.stack),
    numpy.where: _where,
    numpy.dot: _dot,
    numpy.outer: _outer,
    numpy.trace: _trace,
    numpy.flip: lambda m, axis=None: ops.flip(_tensor(m), axis),
    numpy.split: lambda ary, indices_or_sections, axis=0: ops.split(_tensor(ary),
                                                                    indices_or_sections, axis),
    numpy.pad: _pad,
    numpy.copy: lambda a, order="K", subok=False: ops.copy(_tensor(a)),
}

# Results that carry no derivative: on any Tensor, computed on the values.
VALUE_FREE = {numpy.shape, numpy.ndim, numpy.size, numpy.result_type, numpy.iscomplexobj,
              numpy.isrealobj, numpy.allclose, numpy.isclose, numpy.array_equal,
              numpy.array_equiv, numpy.argmax, numpy.argmin, numpy.argsort, numpy.argwhere,
              numpy.nonzero, numpy.flatnonzero, numpy.count_nonzero, numpy.any, numpy.all,
              numpy.searchsorted, numpy.may_share_memory, numpy.shares_memory,
              numpy.min_scalar_type, numpy.isscalar, numpy.zeros_like, numpy.ones_like,
              numpy.empty_like, numpy.full_like}

_HINTS = {
    numpy.linalg.norm: "For the 2-norm: eg.sqrt((x * x).sum())",
    numpy.vdot: "Use eg.einsum('i,i->', x.ravel(), y.ravel())",
    numpy.tensordot: "Use eg.einsum with the contracted indices named",
}


def array_function(self, func, types, args, kwargs):
    handler = FUNCTIONS.get(func)
    if handler is not None:
        return handler(*args, **kwargs)
    if func not in VALUE_FREE and any(_live(t) for t in _tensors((args, kwargs))):
        raise _refuse(_name(func), _HINTS.get(func))
    return func(*_values(args), **_values(kwargs))


def _name(func: Any) -> str:
    module = getattr(func, "__module__", "") or ""
    sub = module.split(".", 1)[1] + "." if module.startswith("numpy.") and \
        not module.startswith("numpy._") and module.count(".") else ""
    return sub + func.__name__


Tensor.__array_ufunc__ = array_ufunc
Tensor.__array_function__ = array_function
