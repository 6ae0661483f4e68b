"""The table of primitives: each op beside its VJP, JVP and batch rules.

Rules receive the cotangent ``g`` (or tangent ``t``), the output and the
inputs as Tensors, and use only the engine's ops, so every rule can itself be
differentiated. ``g`` and ``t`` may carry leading batch axes (a whole
Jacobian's basis); rules keep them, by broadcasting or by giving the einsum
fresh leading indices.

Linear algebra has one primitive, :data:`einsum_p`. Sums, means, transposes,
traces and matmul are einsums; everything else is a handful of element-wise
primitives and the shape ops (reshape, broadcast, indexing) their rules need.
"""
from __future__ import annotations

import builtins
import math
from typing import Any, Sequence

import numpy

from .backend import backend_of, common_backend
from .derive import JVP, _vjp, derive
from .plan import contract, plan_for
from .spec import EinsumError, Spec, letters
from .tensor import BatchMixingError, Primitive, Tensor, as_tensor, bind

# -- einsum: the one linear-algebra primitive ----------------------------------

def _einsum_impl(*arrays, spec, run=None):
    return run(arrays) if run is not None else contract(spec, arrays)


einsum_p = Primitive("einsum", _einsum_impl)


@einsum_p.defvjp
def _einsum_vjp(k, g, out, *xs, spec, run=None):
    others = xs[:k] + xs[k + 1:]
    return _vjp(spec, k, (), spec.inputs[k]).apply(g, *others, shape=xs[k].shape,
                                                   nb=g.ndim - out.ndim)


@einsum_p.defjvp
def _einsum_jvp(k, t, out, *xs, spec, run=None):
    return JVP(spec, k).apply(t, *(xs[:k] + xs[k + 1:]), nb=t.ndim - xs[k].ndim)


@einsum_p.defbatch
def _einsum_batch(bdims, shapes, out_shape, spec, run=None):
    labels = {spec.inputs[k][b] for k, b in enumerate(bdims) if b is not None}
    if len(labels) > 1:
        raise BatchMixingError(f"einsum '{spec}' pairs the batch rows of one operand with another "
                               f"index of another operand: rows mix")
    label = labels.pop()
    if label not in spec.output:
        raise BatchMixingError(f"einsum '{spec}' sums over the batch index: rows mix")
    return spec.output.index(label)


def einsum(subscripts: str, *operands: Any) -> Tensor:
    """NumPy's einsum on Tensors, differentiable to any order in both modes.

    The full grammar: explicit and implicit output, ``...``, repeated indices
    (diagonals, traces), indices summed away, size-1 broadcasting, any number
    of operands. The contraction order is planned once by opt_einsum and
    cached per (spec, shapes, dtypes, backend).

    Raises:
        EinsumError: a bad spec or operands; the message names the culprit.
    """
    ts = [o if type(o) is Tensor else _operand(o, k) for k, o in enumerate(operands)]
    key = (subscripts,) + tuple((t.data.shape, t.data.dtype, type(t.data)) for t in ts)
    hit = _prepared.get(key)
    if hit is None:
        hit = _prepared[key] = _prepare(subscripts, ts)
    clean, squeezed, run = hit
    if squeezed:
        ts = [reshape(t, s) if s is not None else t for t, s in zip(ts, squeezed)]
    return bind(einsum_p, *ts, spec=clean, run=run)


_prepared: dict = {}


def _prepare(subscripts: str, ts: list) -> tuple:
    """Parse, check and plan once per (spec, shapes, dtypes, array types)."""
    if not ts:
        raise EinsumError(f"einsum {subscripts!r} was given no operands")
    d = derive(subscripts, *[t.shape for t in ts])
    # A shape squeezed to () is falsy: test for None, not truth.
    squeezed = d.squeezed_shapes if any(s is not None for s in d.squeezed_shapes) else None
    arrays = [t.data if s is None else t.data.reshape(s)
              for t, s in zip(ts, squeezed or [None] * len(ts))]
    return d.clean, squeezed, plan_for(d.clean, arrays)


def _operand(o: Any, k: int) -> Tensor:
    t = as_tensor(o)
    if not hasattr(t.data, "dtype") or t.data.dtype == object:
        raise EinsumError(f"operand {k} is not a numeric array: {type(o).__name__}")
    return t


def einsum_spec(spec: Spec, *operands: Tensor) -> Tensor:
    """Einsum of a clean :class:`Spec` (labels already bound): the rules' entry."""
    return bind(einsum_p, *operands, spec=spec)


def constant_like(g: Tensor, kind: str, n: int) -> Tensor:
    """An ``eye(n)`` or ``ones(n)`` on ``g``'s backend and dtype (never recorded)."""
    xp = backend_of(g.data)
    return Tensor(xp.eye(n, dtype=g.dtype) if kind == "eye" else xp.ones(n, dtype=g.dtype))


def _labels(n: int) -> tuple:
    return letters(n)


# -- shape ops ---------------------------------------------------------------------

identity_p = Primitive("identity", lambda x: x, linear=True)
identity_p.defvjp(lambda k, g, out, x: g)
identity_p.defjvp(lambda k, t, out, x: t)
identity_p.defbatch(lambda bdims, shapes, out_shape: bdims[0])

reshape_p = Primitive("reshape", lambda x, shape: x.reshape(shape), linear=True)
reshape_p.defvjp(lambda k, g, out, x, shape: reshape(g, g.shape[:g.ndim - out.ndim] + x.shape))
reshape_p.defjvp(lambda k, t, out, x, shape: reshape(t, t.shape[:t.ndim - x.ndim] + out.shape))


@reshape_p.defbatch
def _reshape_batch(bdims, shapes, out_shape, shape):
    b, in_shape = bdims[0], shapes[0]
    before = math.prod(in_shape[:b])
    for p in range(len(out_shape)):
        if math.prod(out_shape[:p]) == before and out_shape[p] == in_shape[b]:
            return p
    raise BatchMixingError(f"reshape {in_shape} -> {out_shape} merges or splits the batch axis")


def reshape(x: Tensor, *shape) -> Tensor:
    """``x`` with a new shape (NumPy rules, one ``-1`` allowed)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    shape = tuple(int(n) for n in shape)
    if -1 in shape:
        known = math.prod(n for n in shape if n != -1)
        shape = tuple(x.size // known if n == -1 else n for n in shape)
    if shape == x.shape:
        return x
    if math.prod(shape) != x.size:
        raise ValueError(f"cannot reshape a tensor of shape {x.shape} into {shape}")
    return bind(reshape_p, x, shape=shape)


broadcast_p = Primitive("broadcast_to", lambda x, shape: backend_of(x).broadcast_to(x, shape),
                        linear=True)
broadcast_p.defvjp(lambda k, g, out, x, shape: sum_to(g, x.shape, g.ndim - out.ndim))


@broadcast_p.defjvp
def _broadcast_jvp(k, t, out, x, shape):
    nb = t.ndim - x.ndim
    t = reshape(t, t.shape[:nb] + (1,) * (len(shape) - x.ndim) + t.shape[nb:])
    return broadcast_to(t, t.shape[:nb] + shape)


@broadcast_p.defbatch
def _broadcast_batch(bdims, shapes, out_shape, shape):
    return bdims[0] + len(shape) - len(shapes[0])


def broadcast_to(x: Tensor, shape: tuple) -> Tensor:
    shape = tuple(shape)
    return x if x.shape == shape else bind(broadcast_p, x, shape=shape)


def sum_to(g: Tensor, shape: tuple, nb: int = 0) -> Tensor:
    """Sum ``g`` (``nb`` leading batch axes, then a broadcast of ``shape``) back to ``shape``."""
    shape = tuple(shape)
    lead = g.ndim - nb - len(shape)
    labels = _labels(g.ndim)
    keep = labels[:nb] + tuple(l for i, l in enumerate(labels[nb + lead:])
                               if not (shape[i] == 1 and g.shape[nb + lead + i] != 1))
    if len(keep) < g.ndim:
        g = einsum_spec(Spec((labels,), keep), g)
    return reshape(g, g.shape[:nb] + shape)


def _norm_index(index, xp):
    """Index arrays (Tensors, lists, host arrays) as arrays of the indexed tensor's backend."""
    if isinstance(index, tuple):
        return tuple(_norm_index(i, xp) for i in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, (list, numpy.ndarray)):
        return xp.asarray(index)  # on a GPU: the index goes to the device too
    return index


getitem_p = Primitive("getitem", lambda x, index: x[index], linear=True)
getitem_p.defvjp(lambda k, g, out, x, index:
                 scatter_add(g, g.shape[:g.ndim - out.ndim] + x.shape, index, g.ndim - out.ndim))
getitem_p.defjvp(lambda k, t, out, x, index: getitem(t, index, t.ndim - x.ndim))


def _scatter_impl(g, shape, index, nb):
    xp = backend_of(g)
    z = xp.zeros(shape, dtype=g.dtype)
    xp.add_at(z, (slice(None),) * nb + (index if isinstance(index, tuple) else (index,)), g)
    return z


scatter_p = Primitive("scatter_add", _scatter_impl, linear=True)
scatter_p.defvjp(lambda k, g, out, x, shape, index, nb: getitem(g, index, g.ndim - len(shape) + nb))
scatter_p.defjvp(lambda k, t, out, x, shape, index, nb:
                 scatter_add(t, t.shape[:t.ndim - x.ndim] + shape, index, t.ndim - x.ndim + nb))


def _index_map(ndim: int, index) -> list:
    """For basic indexing: each input axis's output axis, or None where an int drops it.

    Raises BatchMixingError on advanced (array) indexing, which this does not follow."""
    idx = index if isinstance(index, tuple) else (index,)
    n_real = len([e for e in idx if e is not None and e is not Ellipsis])
    if Ellipsis in idx:
        i = idx.index(Ellipsis)
        idx = idx[:i] + (slice(None),) * (ndim - n_real) + idx[i + 1:]
    idx = idx + (slice(None),) * (ndim - n_real)
    mapping, out_ax = [], 0
    for e in idx:
        if e is None:
            out_ax += 1
        elif isinstance(e, (int, numpy.integer)):
            mapping.append((None, e))
        elif isinstance(e, slice):
            mapping.append((out_ax, e))
            out_ax += 1
        else:
            raise BatchMixingError(f"advanced indexing {index!r} is not followed by the batch check")
    return mapping


def _whole(e) -> bool:
    return isinstance(e, slice) and e == slice(None)


def _getitem_batch(bdims, shapes, out_shape, index):
    out_ax, e = _index_map(len(shapes[0]), index)[bdims[0]]
    if not _whole(e):
        raise BatchMixingError(f"indexing with {index!r} selects along the batch axis")
    return out_ax


def _scatter_batch(bdims, shapes, out_shape, shape, index, nb):
    full = (slice(None),) * nb + (index if isinstance(index, tuple) else (index,))
    for in_ax, (out_ax, e) in enumerate(_index_map(len(shape), full)):
        if out_ax == bdims[0]:
            if not _whole(e):
                break
            return in_ax
    raise BatchMixingError(f"scatter with {index!r} writes along the batch axis")


getitem_p.defbatch(_getitem_batch)
scatter_p.defbatch(_scatter_batch)


def getitem(x: Tensor, index, nb: int = 0) -> Tensor:
    """``x[index]`` (NumPy indexing); ``nb`` leading axes are passed over whole."""
    index = _norm_index(index, backend_of(x.data))
    if nb:
        index = (slice(None),) * nb + (index if isinstance(index, tuple) else (index,))
    return bind(getitem_p, x, index=index)


def scatter_add(g: Tensor, shape: tuple, index, nb: int = 0) -> Tensor:
    """Zeros of ``shape`` with ``g`` added at ``[(:,)*nb, index]`` (the adjoint of getitem)."""
    return bind(scatter_p, g, shape=tuple(shape), index=index, nb=nb)


# -- element-wise primitives -----------------------------------------------------------

def _elementwise_batch(bdims, shapes, out_shape, **_):
    axes = {len(out_shape) - len(s) + b for b, s in zip(bdims, shapes) if b is not None}
    if len(axes) > 1:
        raise BatchMixingError("an element-wise op lines up the batch axis of one input "
                               "with another axis of the other: rows mix")
    return axes.pop()


def _binary(name, impl, vjp, jvp, linear=False):
    p = Primitive(name, impl, elementwise=True, linear=linear)
    p.defvjp(vjp)
    p.defjvp(jvp)
    p.defbatch(_elementwise_batch)
    return p


def _xp(*arrays):
    return common_backend(arrays)


add_p = _binary("add", lambda x, y: x + y, lambda k, g, out, x, y: g,
                lambda k, t, out, x, y: t, linear=True)
sub_p = _binary("sub", lambda x, y: x - y, lambda k, g, out, x, y: g if k == 0 else -g,
                lambda k, t, out, x, y: t if k == 0 else -t, linear=True)
mul_p = _binary("mul", lambda x, y: x * y, lambda k, g, out, x, y: g * (y if k == 0 else x),
                lambda k, t, out, x, y: t * (y if k == 0 else x))
div_p = _binary("div", lambda x, y: x / y,
                lambda k, g, out, x, y: g / y if k == 0 else -g * out / y,
                lambda k, t, out, x, y: t / y if k == 0 else -t * out / y)


def _pow_d(k, out, x, y):
    if k == 0:
        return y * x ** (y - 1)
    safe = where(x.data > 0, x, 1.0)  # d/dy x**y = x**y log x, taken as 0 where x <= 0
    return where(x.data > 0, out * log(safe), 0.0)


pow_p = _binary("pow", lambda x, y: x ** y,
                lambda k, g, out, x, y: g * _pow_d(k, out, x, y),
                lambda k, t, out, x, y: t * _pow_d(k, out, x, y))

# where(cond, x, y) with a constant boolean cond.
where_p = Primitive("where", lambda x, y, cond: backend_of(x).where(cond, x, y),
                    elementwise=True, linear=True)
where_p.defvjp(lambda k, g, out, x, y, cond:
               where(cond, g, 0.0) if k == 0 else where(cond, 0.0, g))
where_p.defjvp(lambda k, t, out, x, y, cond:
               where(cond, t, 0.0) if k == 0 else where(cond, 0.0, t))
where_p.defbatch(_elementwise_batch)


def where(cond, x, y) -> Tensor:
    """``x`` where ``cond`` (a constant mask) holds, else ``y``."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    x, y = _pair(x, y)
    return bind(where_p, x, y, cond=cond)


def _unary(name, impl, deriv, linear=False):
    """An element-wise primitive whose VJP and JVP both multiply by ``deriv(x, out)``."""
    p = Primitive(name, impl, elementwise=True, linear=linear)
    p.defvjp(lambda k, g, out, x: g * deriv(x, out))
    p.defjvp(lambda k, t, out, x: t * deriv(x, out))
    p.defbatch(_elementwise_batch)
    return lambda x: bind(p, as_tensor(x)), p


def _const(x: Tensor, array) -> Tensor:
    return Tensor(array.astype(x.dtype, copy=False))


neg, neg_p = _unary("neg", lambda x: -x, lambda x, out: -1.0, linear=True)
neg_p.defvjp(lambda k, g, out, x: -g)
neg_p.defjvp(lambda k, t, out, x: -t)
exp, exp_p = _unary("exp", lambda x: backend_of(x).exp(x), lambda x, out: out)
log, log_p = _unary("log", lambda x: backend_of(x).log(x), lambda x, out: 1.0 / x)
sin, sin_p = _unary("sin", lambda x: backend_of(x).sin(x), lambda x, out: cos(x))
cos, cos_p = _unary("cos", lambda x: backend_of(x).cos(x), lambda x, out: -sin(x))
tanh, tanh_p = _unary("tanh", lambda x: backend_of(x).tanh(x), lambda x, out: 1.0 - out * out)
sqrt, sqrt_p = _unary("sqrt", lambda x: backend_of(x).sqrt(x), lambda x, out: 0.5 / out)
erf, erf_p = _unary("erf", lambda x: backend_of(x).erf(x),
                    lambda x, out: (2.0 / math.sqrt(math.pi)) * exp(-(x * x)))


def _sigmoid(x):
    xp = backend_of(x)
    # Stable on both tails: exp of a non-positive number only.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


sigmoid, sigmoid_p = _unary("sigmoid", _sigmoid, lambda x, out: out * (1.0 - out))
softplus, softplus_p = _unary("softplus", lambda x: backend_of(x).logaddexp(0, x).astype(
    x.dtype, copy=False), lambda x, out: sigmoid(x))
relu, relu_p = _unary("relu", lambda x: backend_of(x).maximum(x, 0),
                      lambda x, out: _const(x, x.data > 0))
abs, abs_p = _unary("abs", lambda x: backend_of(x).abs(x),
                    lambda x, out: _const(x, backend_of(x.data).sign(x.data)))


def square(x) -> Tensor:
    x = as_tensor(x)
    return x * x


_SQRT_HALF, _INV_SQRT_2PI = math.sqrt(0.5), 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_impl(x):
    # x Phi(x) in one pass of in-place ops (the composite records five ops).
    xp = backend_of(x)
    r = xp.erf(x * _SQRT_HALF)
    r += 1.0
    r *= x
    r *= 0.5
    return r


def _gelu_d_impl(x, cdf):
    # GELU'(x) = Phi(x) + x phi(x); Phi(x) comes in as ``cdf`` (see _cdf).
    xp = backend_of(x)
    phi = xp.exp(x * x * -0.5)
    phi *= x
    phi *= _INV_SQRT_2PI
    phi += cdf
    return phi


def _cdf(x, out):
    """Phi(x) = GELU(x) / x, read off the saved output instead of a second erf.

    Where ``out`` is not a normal number (``x`` zero or tiny, far negative,
    infinite or NaN) the quotient loses precision: there erf is evaluated.
    """
    xp = backend_of(x)
    a = xp.abs(out)
    exact = (a >= xp.finfo(out.dtype).tiny) & (a < math.inf)
    cdf = xp.asarray(out / xp.where(exact, x, 1.0))
    if not xp.all(exact):
        redo = ~exact
        cdf[redo] = 0.5 * (1.0 + xp.erf(x[redo] * _SQRT_HALF))
    return cdf


gelu_d_p = Primitive("gelu_d", _gelu_d_impl, elementwise=True)
# GELU''(x) = phi(x) (2 - x^2), in engine ops: every order stays differentiable.
_gelu_dd = lambda x: exp(-0.5 * (x * x)) * ((2.0 - x * x) * _INV_SQRT_2PI)
gelu_d_p.defvjp(lambda k, g, out, x, cdf: g * _gelu_dd(x))
gelu_d_p.defjvp(lambda k, t, out, x, cdf: t * _gelu_dd(x))
gelu_d_p.defbatch(_elementwise_batch)


def _gelu_d(x: Tensor, out: Tensor) -> Tensor:
    """GELU'(x), given GELU(x) as ``out`` (a constant, so the rule is of ``x`` alone)."""
    return bind(gelu_d_p, x, cdf=_cdf(x.data, out.data))


_gelu, gelu_p = _unary("gelu", _gelu_impl, _gelu_d)


def gelu(x, approximate: str = "none") -> Tensor:
    """GELU as ``torch.nn.functional.gelu``: exact erf form, or ``approximate='tanh'``."""
    x = as_tensor(x)
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + tanh(c * (x + 0.044715 * x * x * x)))
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _gelu(x)


# -- reductions (einsums) and the softmax family ---------------------------------------

def _axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of bounds for a tensor of rank {ndim}")
        out.append(a % ndim if ndim else 0)
    return tuple(out)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:
    """Sum over ``axis`` (an einsum that drops those indices)."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    labels = _labels(x.ndim)
    r = einsum_spec(Spec((labels,), tuple(l for i, l in enumerate(labels) if i not in axes)), x)
    if keepdims:
        r = reshape(r, tuple(1 if i in axes else n for i, n in enumerate(x.shape)))
    return r


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    x = as_tensor(x)
    n = math.prod(x.shape[a] for a in _axes(axis, x.ndim))
    return sum(x, axis, keepdims) * (1.0 / n)


def transpose(x, axes: Sequence[int] | None = None) -> Tensor:
    """Permute axes (reverse them by default): an einsum that reorders indices."""
    x = as_tensor(x)
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
    labels = _labels(x.ndim)
    return einsum_spec(Spec((labels,), tuple(labels[a] for a in axes)), x)


def _offsets(shape: tuple, axes: tuple) -> list:
    """One index per position in the reduced ``axes`` (ints there, whole slices elsewhere).

    Reductions over a few small axes (pooling windows) run as element-wise ops
    over these slices: NumPy's reduce over short strided axes is many times slower.
    """
    idx = [()]
    for a in range(len(shape)):
        idx = [i + (j,) for i in idx for j in range(shape[a])] if a in axes else \
            [i + (slice(None),) for i in idx]
    return idx


_FOLD = 64  # fold over slices up to this many window positions, else one reduce


def _max_impl(x, axes):
    xp = backend_of(x)
    n = math.prod(x.shape[a] for a in axes)
    if n > _FOLD or n < 2 or x.ndim == len(axes):
        return xp.max(x, axis=axes)
    offs = _offsets(x.shape, axes)
    r = xp.maximum(x[offs[0]], x[offs[1]])
    for o in offs[2:]:
        xp.maximum(r, x[o], out=r)
    return r


max_p = Primitive("max", _max_impl)


def _max_mask(x: Tensor, out: Tensor, axes: tuple) -> tuple:
    """Constants for max's rules: where ``x`` attains its maximum (1, else 0), and
    ``1 / (number of ties)`` shaped like ``out``, or None where no window ties.

    Ties (windows of zeros after a ReLU) split the derivative evenly; the
    split is applied on the small output side, not on the mask.
    """
    xp = backend_of(x.data)
    mask = (x.data == xp.expand_dims(out.data, axes)).astype(x.dtype)
    n = math.prod(x.shape[a] for a in axes)
    if n > _FOLD or n < 2 or x.ndim == len(axes):
        count = xp.sum(mask, axis=axes)
    else:
        offs = _offsets(x.shape, axes)
        count = mask[offs[0]] + mask[offs[1]]
        for o in offs[2:]:
            count += mask[o]
    if not (xp.size(count) and xp.max(count) > 1):
        return Tensor(mask), None
    return Tensor(mask), Tensor(xp.reciprocal(count))


def _keep(t: Tensor, axes: tuple, ndim: int) -> Tensor:
    """``t`` (leading batch axes, then a max's output) with the reduced axes back as size 1."""
    nb = t.ndim - (ndim - len(axes))
    it = iter(t.shape[nb:])
    return reshape(t, t.shape[:nb] + tuple(1 if a in axes else next(it) for a in range(ndim)))


def _spread_impl(g, mask, axes):
    xp = backend_of(g)
    r = xp.empty_like(mask)
    for o in _offsets(mask.shape, axes):
        xp.multiply(g, mask[o], out=r[o])
    return r


# spread(g, mask) = g, with the reduced axes put back, times the constant mask:
# max's VJP. One multiply per window position keeps NumPy's inner loops long,
# where the broadcast multiply runs them over the window's 2 or 3 entries.
spread_p = Primitive("spread", _spread_impl, linear=True)
spread_p.defvjp(lambda k, g, out, x, mask, axes:
                sum(g * Tensor(mask), tuple(g.ndim - mask.ndim + a for a in axes)))
spread_p.defjvp(lambda k, t, out, x, mask, axes: _spread(t, Tensor(mask), axes))


@spread_p.defbatch
def _spread_batch(bdims, shapes, out_shape, mask, axes):
    kept = [a for a in range(len(out_shape)) if a not in axes]
    return kept[bdims[0]]


def _spread(g: Tensor, mask: Tensor, axes: tuple) -> Tensor:
    """``_keep(g) * mask`` for max's rules, as one primitive where the window is small."""
    n = math.prod(mask.shape[a] for a in axes)
    # A C-ordered g (from a reshape) against a mask in another order is where
    # the broadcast multiply is slowest; otherwise (g laid out as the mask,
    # leading batch axes, one big window) it is as fast or faster.
    if (g.ndim + len(axes) != mask.ndim or n > _FOLD or n < 2 or g.ndim == 0
            or not g.data.flags.c_contiguous):
        return _keep(g, axes, mask.ndim) * mask
    return bind(spread_p, g, mask=mask.data, axes=axes)


@max_p.defvjp
def _max_vjp(k, g, out, x, axes):
    # The mask is built here from x and the saved max: the forward keeps nothing.
    mask, split = _max_mask(x, out, axes)
    return _spread(g if split is None else g * split, mask, axes)


@max_p.defjvp
def _max_jvp(k, t, out, x, axes):
    nb = t.ndim - x.ndim
    mask, split = _max_mask(x, out, axes)
    r = sum(t * mask, tuple(nb + a for a in axes))
    return r if split is None else r * split


@max_p.defbatch
def _max_batch(bdims, shapes, out_shape, axes):
    b = bdims[0]
    if b in axes:
        raise BatchMixingError("max over the batch axis: rows mix")
    return b - builtins.sum(1 for a in axes if a < b)


def max(x, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over ``axis``; its gradient is split evenly between ties."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    r = bind(max_p, x, axes=axes)
    return _keep(r, axes, x.ndim) if keepdims else r


def logsumexp(x, axis=-1, keepdims: bool = False) -> Tensor:
    """``log(sum(exp(x)))`` over ``axis``, stable for large inputs."""
    x = as_tensor(x)
    xp = backend_of(x.data)
    # The shift is a constant: it cancels in the value and in every derivative.
    m = xp.max(x.data, axis=_axes(axis, x.ndim), keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    r = log(sum(exp(x - Tensor(m)), axis, keepdims=True)) + Tensor(m)
    return r if keepdims else reshape(r, tuple(n for i, n in enumerate(r.shape)
                                               if i not in _axes(axis, x.ndim)))


def log_softmax(x, axis=-1) -> Tensor:
    x = as_tensor(x)
    return x - logsumexp(x, axis, keepdims=True)


def _softmax_impl(x, axis):
    xp = backend_of(x)
    m = xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(x - xp.where(xp.isfinite(m), m, 0))  # the shift cancels; -inf rows stay 0/0
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


softmax_p = Primitive("softmax", _softmax_impl)
# One primitive instead of exp(x - logsumexp(x)): three passes forward, and a
# VJP of three, in engine ops on the output, so it differentiates again.
softmax_p.defvjp(lambda k, g, out, x, axis: out * (g - sum(g * out, axis, keepdims=True)))
softmax_p.defjvp(lambda k, t, out, x, axis: out * (t - sum(t * out, axis, keepdims=True)))


@softmax_p.defbatch
def _softmax_batch(bdims, shapes, out_shape, axis):
    if bdims[0] == axis % len(out_shape):
        raise BatchMixingError("softmax along the batch axis: rows mix")
    return bdims[0]


def softmax(x, axis=-1) -> Tensor:
    """``exp(x) / sum(exp(x))`` along ``axis``, stable for large inputs."""
    x = as_tensor(x)
    # A negative axis names the same axis of a cotangent with leading batch axes.
    return bind(softmax_p, x, axis=_axes(axis, x.ndim)[0] - x.ndim)


# -- arithmetic with NumPy broadcasting ------------------------------------------------

def _pair(x, y):
    if isinstance(x, Tensor):
        return x, as_tensor(y, like=x)
    y = as_tensor(y)
    return as_tensor(x, like=y), y


def _binop(p):
    def op(x, y):
        x, y = _pair(x, y)
        return bind(p, x, y)
    return op


add, sub, mul, div, power = (_binop(p) for p in (add_p, sub_p, mul_p, div_p, pow_p))


def matmul(a, b) -> Tensor:
    """``a @ b`` with NumPy's matmul rules, as an einsum."""
    a, b = _pair(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: scalar operands are not allowed, use *")
    if a.ndim == 1 and b.ndim == 1:
        return einsum("i,i->", a, b)
    if a.ndim == 1:
        return einsum("j,...jk->...k", a, b)
    if b.ndim == 1:
        return einsum("...ij,j->...i", a, b)
    return einsum("...ij,...jk->...ik", a, b)


def _compare(fn):
    return lambda x, y: Tensor(fn(*(t.data for t in _pair(x, y))))


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
    T.__hash__ = object.__hash__
    T.T = property(lambda x: transpose(x))
    T.sum = lambda x, axis=None, keepdims=False: sum(x, axis, keepdims)
    T.mean = lambda x, axis=None, keepdims=False: mean(x, axis, keepdims)
    T.max = lambda x, axis=None, keepdims=False: max(x, axis, keepdims)
    T.reshape = lambda x, *shape: reshape(x, *shape)
    T.transpose = lambda x, *axes: transpose(x, axes[0] if len(axes) == 1 and isinstance(
        axes[0], (tuple, list)) else (axes or None))
    T.exp, T.log, T.tanh, T.sqrt = exp, log, tanh, sqrt
    T.sigmoid, T.relu, T.sin, T.cos = sigmoid, relu, sin, cos


_install_methods()
