"""Linear primitives: einsum, the one linear-algebra primitive, and the shape ops.

Rules receive the cotangent ``g`` (or tangent ``t``), the output and the
inputs as Tensors, and use only the engine's ops, so every rule can itself be
differentiated. ``g`` and ``t`` may carry leading batch axes (a whole
Jacobian's basis); rules keep them, by broadcasting or by giving the einsum
fresh leading indices. Sums, means, transposes, traces and matmul are einsums;
reshape, broadcast and indexing (with its adjoint, scatter-add) are the shape
ops the other rules need.
"""
from __future__ import annotations

import builtins
import math
from typing import Any, Sequence

import numpy

from .backend import backend_of, memory_order
from .derive import JVP, _vjp, derive
from .plan import contract, plan_for
from .spec import EinsumError, Spec, letters
from .tensor import BatchMixingError, Primitive, Tensor, as_tensor, bind, pair

# -- einsum: the one linear-algebra primitive ----------------------------------

def _einsum_impl(*arrays, spec, run=None, order=None):
    return run(arrays) if run is not None else contract(spec, arrays, order)


einsum_p = Primitive("einsum", _einsum_impl)


@einsum_p.defvjp
def _einsum_vjp(k, g, out, *xs, spec, run=None, order=None):
    others = xs[:k] + xs[k + 1:]
    nb = g.ndim - out.ndim
    # The cotangent laid out like its primal: the ops that meet it next (the
    # primal's other rules, its producer's VJP) then read it without a copy.
    like = tuple(memory_order(xs[k].data)) if nb == 0 and xs[k].ndim > 2 else None
    return _vjp(spec, k, (), spec.inputs[k]).apply(g, *others, shape=xs[k].shape, nb=nb,
                                                   order=like)


@einsum_p.defjvp
def _einsum_jvp(k, t, out, *xs, spec, run=None, order=None):
    return JVP(spec, k).apply(t, *(xs[:k] + xs[k + 1:]), nb=t.ndim - xs[k].ndim)


@einsum_p.defbatch
def _einsum_batch(bdims, shapes, out_shape, spec, run=None, order=None):
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
    of operands. NumPy's second form, operands each followed by a sublist of
    ints in ``[0, 52)`` (and ``...``), then an optional output sublist, works
    too: ``einsum(a, [0, 1], b, [1, 2], [0, 2])`` is ``einsum('ab,bc->ac', a, b)``.
    The contraction order is planned once by opt_einsum and cached per
    (spec, shapes, dtypes, backend).

    Raises:
        EinsumError: a bad spec, sublist or operands; the message names the culprit.
    """
    if type(subscripts) is not str:
        subscripts, operands = _from_sublists((subscripts,) + operands)
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

# Sublist ints 0-25 are 'A'-'Z', 26-51 'a'-'z' (NumPy's map): an implicit
# output sorted by letter is then sorted by int, as NumPy sorts it.
_SUBLIST_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _from_sublists(args: tuple) -> tuple:
    """``(op0, sub0, op1, sub1, ..., [out])`` as ``(spec string, operands)``."""
    if len(args) < 2:
        raise EinsumError(f"einsum: the spec must be a string, got {type(args[0]).__name__}")
    out = args[-1] if len(args) % 2 else None
    pairs = args[:len(args) - len(args) % 2]
    terms = [_sublist_term(sub, f"operand {k}'s sublist") for k, sub in enumerate(pairs[1::2])]
    spec = ",".join(terms)
    if out is not None:
        spec += "->" + _sublist_term(out, "the output sublist")
    return spec, pairs[0::2]


def _sublist_term(sub: Any, what: str) -> str:
    if isinstance(sub, numpy.ndarray) and sub.ndim == 1 and sub.dtype.kind in "iu":
        sub = sub.tolist()
    if not isinstance(sub, (list, tuple)):
        raise EinsumError(f"einsum: the spec must be a string, or each operand followed by its "
                          f"sublist of ints and ... (NumPy's second form): {what} is a "
                          f"{type(sub).__name__}")
    term = []
    for e in sub:
        if e is Ellipsis:
            term.append("...")
        elif isinstance(e, (int, numpy.integer)) and not isinstance(e, bool):
            if not 0 <= e < len(_SUBLIST_LETTERS):
                raise EinsumError(f"einsum: {what} has index {e}, outside [0, 52)")
            term.append(_SUBLIST_LETTERS[e])
        else:
            raise EinsumError(f"einsum: {what} has {e!r}: each entry must be an int or ...")
    return "".join(term)


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


def einsum_spec(spec: Spec, *operands: Tensor, order: tuple | None = None) -> Tensor:
    """Einsum of a clean :class:`Spec` (labels already bound): the rules' entry.
    ``order``: the output's axes, outermost in memory first, where the planner
    can write that layout (see :func:`einsumgrad.plan.contract`)."""
    if order is None:
        return bind(einsum_p, *operands, spec=spec)
    return bind(einsum_p, *operands, spec=spec, order=order)


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


def _as_tuple(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _entry(e) -> tuple:
    """One index entry as (axes it consumes, broadcast dims it adds if advanced, is an array).

    An int is (1, 0, False): advanced only beside an array. A bool (scalar or 0-d)
    consumes no axis and adds one; a k-d bool mask consumes k axes and adds one.
    """
    if isinstance(e, (bool, numpy.bool_)):
        return 0, 1, True
    if isinstance(e, (int, numpy.integer)):
        return 1, 0, False
    if hasattr(e, "dtype") and hasattr(e, "ndim"):
        return (e.ndim, 1, True) if e.dtype == bool else (1, e.ndim, True)
    raise BatchMixingError(f"index entry {e!r} is not followed by the batch check")


def _advanced(index) -> tuple:
    """NumPy's rule for where advanced (array) indices put their broadcast dims.

    Returns ``(positions, n_adv, front)``: the tuple positions of the advanced
    entries (ints among them when any array is present), how many dims their
    broadcast adds, and whether those dims go first (entries not adjacent:
    any slice, None or Ellipsis between them) or replace the entries in place.
    """
    idx = _as_tuple(index)
    info = [None if e is None or e is Ellipsis or isinstance(e, slice) else _entry(e)
            for e in idx]
    if not any(i is not None and i[2] for i in info):
        return (), 0, False
    pos = tuple(k for k, i in enumerate(info) if i is not None)
    return pos, builtins.max(info[k][1] for k in pos), pos[-1] - pos[0] + 1 != len(pos)


def _index_map(ndim: int, index, nb: int = 0) -> list:
    """Each input axis's output axis under ``[(:,)*nb, index]`` (None: it is dropped or
    replaced by advanced-index dims), with the index entry that took it.

    The ``nb`` leading axes stay first whatever ``index`` is (as the rules pass
    batch axes); the rest follow NumPy's indexing, advanced indices included.
    """
    idx = _as_tuple(index)
    pos, n_adv, front = _advanced(idx)
    adv = set(pos)
    used = 0
    for e in idx:
        if not (e is None or e is Ellipsis):
            used += 1 if isinstance(e, slice) else _entry(e)[0]
    fill = ndim - nb - used
    mapping = [(a, slice(None)) for a in range(nb)]
    out_ax = nb + (n_adv if front else 0)
    placed = front
    for k, e in enumerate(idx):
        if e is Ellipsis:
            for _ in range(fill):
                mapping.append((out_ax, slice(None)))
                out_ax += 1
            fill = 0
        elif e is None:
            out_ax += 1
        elif isinstance(e, slice):
            mapping.append((out_ax, e))
            out_ax += 1
        else:
            if k in adv and not placed:
                out_ax += n_adv  # adjacent advanced entries: their dims go here
                placed = True
            mapping.extend([(None, e)] * _entry(e)[0])
    return mapping + [(out_ax + i, slice(None)) for i in range(fill)]


def _numpy_lead(index, nb: int) -> int:
    """How many dims NumPy puts before the ``nb`` leading axes of ``x[(:,)*nb, index]``.

    The rules keep those axes first; NumPy does too, except that separated
    advanced entries put their broadcast dims before everything.
    """
    if not nb:
        return 0
    _, n_adv, front = _advanced(index)
    return n_adv if front else 0


def _to_front(a, k: int, n: int):
    """``a`` with its axes ``k .. k+n-1`` moved before axes ``0 .. k-1``."""
    return a.transpose(tuple(range(k, k + n)) + tuple(range(k)) + tuple(range(k + n, a.ndim)))


def _full(index, nb: int) -> tuple:
    return (slice(None),) * nb + _as_tuple(index)


def _getitem_impl(x, index, nb):
    if not nb:
        return x[index]
    lead = _numpy_lead(index, nb)
    y = x[_full(index, nb)]
    return _to_front(y, lead, nb) if lead else y


def _scatter_into(z, g, index, nb, fresh: bool = False):
    """``z[(:,)*nb, index] += g`` in place, ``g`` with its ``nb`` axes first
    (``fresh``: ``z`` is zeros, so basic indexing just copies ``g`` in)."""
    lead = _numpy_lead(index, nb)
    if lead:  # g has its nb axes first; the index puts NumPy's lead dims there
        g = _to_front(g, nb, lead)
    if _advanced(index)[0]:
        backend_of(z).add_at(z, _full(index, nb), g)  # array indices may repeat a position
    elif fresh:
        z[_full(index, nb)] = g  # basic indexing reaches each position once
    else:
        z[_full(index, nb)] += g
    return z


def _scatter_impl(g, shape, index, nb):
    return _scatter_into(backend_of(g).zeros(shape, dtype=g.dtype), g, index, nb, fresh=True)


getitem_p = Primitive("getitem", _getitem_impl, linear=True)
getitem_p.defvjp(lambda k, g, out, x, index, nb:
                 scatter_add(g, g.shape[:g.ndim - out.ndim] + x.shape, index,
                             g.ndim - out.ndim + nb))
getitem_p.defjvp(lambda k, t, out, x, index, nb: getitem(t, index, t.ndim - x.ndim + nb))
getitem_p.defaccum(lambda buf, g, out, x, index, nb:
                   _scatter_into(buf, g.data, index, g.ndim - out.ndim + nb))

scatter_p = Primitive("scatter_add", _scatter_impl, linear=True)
scatter_p.defvjp(lambda k, g, out, x, shape, index, nb: getitem(g, index, g.ndim - len(shape) + nb))
scatter_p.defjvp(lambda k, t, out, x, shape, index, nb:
                 scatter_add(t, t.shape[:t.ndim - x.ndim] + shape, index, t.ndim - x.ndim + nb))


def _whole(e) -> bool:
    return isinstance(e, slice) and e == slice(None)


@getitem_p.defbatch
def _getitem_batch(bdims, shapes, out_shape, index, nb):
    out_ax, e = _index_map(len(shapes[0]), index, nb)[bdims[0]]
    if not _whole(e):
        raise BatchMixingError(f"getitem: indexing with {index!r} selects along the batch "
                               f"axis: rows mix")
    return out_ax


@scatter_p.defbatch
def _scatter_batch(bdims, shapes, out_shape, shape, index, nb):
    for in_ax, (out_ax, e) in enumerate(_index_map(len(shape), index, nb)):
        if out_ax == bdims[0]:
            if not _whole(e):
                break
            return in_ax
    raise BatchMixingError(f"scatter_add with {index!r} writes along the batch axis: rows mix")


def getitem(x: Tensor, index, nb: int = 0) -> Tensor:
    """``x[index]`` (NumPy indexing); ``nb`` leading axes are passed over whole and stay first."""
    return bind(getitem_p, x, index=_norm_index(index, backend_of(x.data)), nb=nb)


def scatter_add(g: Tensor, shape: tuple, index, nb: int = 0) -> Tensor:
    """Zeros of ``shape`` with ``g`` added at ``[(:,)*nb, index]`` (the adjoint of getitem);
    ``g``'s ``nb`` leading axes come first, as getitem leaves them."""
    return bind(scatter_p, g, shape=tuple(shape), index=index, nb=nb)


# -- sums, means, transposes, matmul: einsums ------------------------------------------

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


def matmul(a, b) -> Tensor:
    """``a @ b`` with NumPy's matmul rules, as an einsum."""
    a, b = pair(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: scalar operands are not allowed, use *")
    if a.ndim == 1 and b.ndim == 1:
        return einsum("i,i->", a, b)
    if a.ndim == 1:
        return einsum("j,...jk->...k", a, b)
    if b.ndim == 1:
        return einsum("...ij,j->...i", a, b)
    return einsum("...ij,...jk->...ik", a, b)
