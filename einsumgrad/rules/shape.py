"""Shape primitives: identity, reshape, and indexing with its adjoint, scatter-add;
and the core of :func:`einsumgrad.vmap`, the batched tensors every rules module binds through.

Rules receive the cotangent ``g`` (or tangent ``t``), the output and the inputs
as Tensors and use only engine ops, so each differentiates again. ``g`` and
``t`` may carry leading batch axes (a whole Jacobian's basis): reshape keeps
them in front, indexing passes ``nb`` leading axes over whole. Broadcasting
and its adjoint (a sum) are einsums: :mod:`.einsum`.

Inside ``vmap(f)`` every mapped value is a :class:`Batched` tensor: it shows
``f`` the shape of one example and holds the whole batch in a physical tensor,
the mapped axis first. The tape's ``bind`` (re-exported here as :func:`bind`)
runs the batching step installed from here while a vmap is in flight: a
primitive given a Batched input runs its batching rule (``Primitive.vmap``) on
the physical tensors, which uses the same convention as every VJP and JVP rule
(a leading axis passed through: an einsum gains one index, indexing one
``nb``). So every primitive, bound from any module, is batched; the tape only
ever records physical ops, and no rule sees a Batched tensor.
"""
from __future__ import annotations

import builtins
import itertools
import math
import operator
import sys
import threading

import numpy

from ..backends import backend_of, common_backend
from .. import tensor as _tape
from ..tensor import (BatchMixingError, Primitive, Tensor, TracerConversionError, as_tensor, bind,
                      pair, state)

# -- vmap's batched tensors ---------------------------------------------------------------

class _Levels(threading.local):
    def __init__(self):
        self.active = {}  # level -> batch size, outermost vmap first


_levels = _Levels()
_next_level = itertools.count(1)
_lock = threading.Lock()
_depth = 0  # vmaps in flight in any thread (tensor.BATCHING too): front ends read this global


class Batched(Tensor):
    """One example's view of a batch, inside :func:`einsumgrad.vmap`.

    ``shape``, ``ndim``, ``size`` and ``len`` are one example's; ``phys`` holds
    the batch, the mapped axis first (a Tensor, or an outer vmap's Batched).
    Its values cannot be read (``.data``, ``numpy()``, ``float()``, a branch on
    it): inside ``vmap`` there is one value per example.
    """

    __slots__ = ("phys", "level")

    def __init__(self, phys: Tensor, level: int):  # noqa: super().__init__ would set data
        self.phys, self.level = phys, level
        self.grad = self.node = self.bdim = None
        self.version = 0

    shape = property(lambda self: self.phys.shape[1:])
    ndim = property(lambda self: self.phys.ndim - 1)
    dtype = property(lambda self: self.phys.dtype)
    size = property(lambda self: math.prod(self.phys.shape[1:]))
    device = property(lambda self: self.phys.device)

    @property
    def requires_grad(self) -> bool:
        return self.phys.requires_grad

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        if flag != self.phys.requires_grad:
            raise RuntimeError("requires_grad of a batched tensor inside vmap cannot change: "
                               "set it on the array given to vmap, or use eg.grad inside")

    @property
    def data(self):
        _size(self.level)  # an escaped Batched says so first
        f = sys._getframe(1)
        where = f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} ({f.f_code.co_name})"
        raise TracerConversionError(_NO_VALUE.format(what=f"its array (read at {where})"))

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.phys.shape[1]

    def _no_value(self, what: str):
        raise TracerConversionError(_NO_VALUE.format(what=what))

    numpy = lambda self: self._no_value("numpy()")  # noqa: E731
    item = lambda self: self._no_value("item()")  # noqa: E731
    tolist = lambda self: self._no_value("tolist()")  # noqa: E731
    __float__ = lambda self: self._no_value("float()")  # noqa: E731
    __int__ = lambda self: self._no_value("int()")  # noqa: E731
    __bool__ = lambda self: self._no_value("its truth value (an if or while on it)")  # noqa: E731
    __array__ = lambda self, dtype=None, copy=None: self._no_value("numpy.asarray")  # noqa: E731
    __dlpack__ = lambda self, *a, **k: self._no_value("__dlpack__")  # noqa: E731

    def backward(self, *args, **kwargs):
        raise RuntimeError("backward() inside vmap: use eg.grad (or eg.vjp) inside the mapped "
                           "function, or call backward on vmap's result")

    def to_device(self, device):
        raise RuntimeError("to_device inside vmap: move the arrays before calling vmap")

    def detach(self) -> "Batched":
        return Batched(self.phys.detach(), self.level)

    def __repr__(self) -> str:
        return (f"Batched(level {self.level}, {self.phys.shape[0]} examples of shape "
                f"{self.shape}, dtype {self.dtype})")

    # Comparisons give a mask per example (Tensor's compare the arrays).
    __hash__ = Tensor.__hash__
    __lt__ = lambda x, y: _compare(x, y, operator.lt)  # noqa: E731
    __le__ = lambda x, y: _compare(x, y, operator.le)  # noqa: E731
    __gt__ = lambda x, y: _compare(x, y, operator.gt)  # noqa: E731
    __ge__ = lambda x, y: _compare(x, y, operator.ge)  # noqa: E731
    __eq__ = lambda x, y: _compare(x, y, operator.eq)  # noqa: E731
    __ne__ = lambda x, y: _compare(x, y, operator.ne)  # noqa: E731

    # In place, as Tensor's: the result replaces this example's view of the batch.
    __iadd__ = lambda x, y: x._becomes(x + y)  # noqa: E731
    __isub__ = lambda x, y: x._becomes(x - y)  # noqa: E731
    __imul__ = lambda x, y: x._becomes(x * y)  # noqa: E731
    __itruediv__ = lambda x, y: x._becomes(x / y)  # noqa: E731

    def __setitem__(self, index, v) -> None:
        v = as_tensor(v, like=stand_in(self))
        shape = region(self, index)
        w = astype(v, self.dtype)
        if w.shape != shape:  # NumPy's broadcasting of v to the region
            if w.ndim > len(shape):
                w = reshape(w, w.shape[w.ndim - len(shape):])
            w = _broadcast_to(reshape(w, (1,) * (len(shape) - w.ndim) + w.shape), shape)
        self._becomes(assign(self, index, w))

    def _becomes(self, r: Tensor) -> "Batched":
        if type(r) is not Batched or r.level != self.level:
            raise RuntimeError("an in-place change inside vmap would give this tensor a mapped "
                               "axis it does not have: compute a new tensor instead")
        r = astype(r, self.dtype)
        if r.shape != self.shape:
            raise ValueError(f"in-place result of shape {r.shape} does not fit a tensor of "
                             f"shape {self.shape}")
        self.phys = r.phys
        self.version += 1
        return self


def _compare(x, y, fn):
    if not (isinstance(y, (Tensor, int, float, bool, numpy.generic, list, tuple))
            or hasattr(y, "shape")):
        return NotImplemented
    x, y = pair(x, y)
    return elementwise_apply(lambda a, b: Tensor(fn(a.data, b.data)), x, y)


_NO_VALUE = ("{what} of a batched tensor inside vmap: it stands for one value per example. "
             "Keep to einsumgrad ops inside the mapped function (eg.where instead of if, ...)")


def active_levels() -> tuple:
    """``((level, batch size), ...)`` of the vmaps in flight in this thread, outermost first."""
    return tuple(_levels.active.items()) if _levels.active else ()


def push_level(size: int) -> int:
    """Open a vmap level of ``size`` examples (inside those open now); returns its id."""
    global _depth
    level = next(_next_level)
    _levels.active[level] = size
    with _lock:
        _depth += 1
        _tape.BATCHING += 1
    return level


def pop_level(level: int) -> None:
    global _depth
    del _levels.active[level]
    with _lock:
        _depth -= 1
        _tape.BATCHING -= 1


def top_level(args) -> int | None:
    """The innermost vmap level among Batched ``args`` (None: none is batched)."""
    level = None
    for a in args:
        if type(a) is Batched and (level is None or a.level > level):
            level = a.level
    return level


def _size(level: int) -> int:
    size = _levels.active.get(level)
    if size is None:
        raise RuntimeError("a batched tensor escaped the vmap that made it (kept in a closure, "
                           "a global or an aux output) and was used after that vmap returned")
    return size


def _batch_step(prim: Primitive, inputs: tuple, params: dict) -> Batched | None:
    """The tape's batching step (``tensor.bind`` runs it while a vmap is in flight):
    ``prim``'s batching rule where an input is :class:`Batched`, else None."""
    for t in inputs:
        if type(t) is Batched:
            return batch_bind(prim, inputs, params)
    return None


def batch_bind(prim: Primitive, inputs: tuple, params: dict) -> Batched:
    """``prim`` on inputs some of which are Batched: its batching rule on the innermost
    level's physical tensors (the outer levels' Batched go in as they are, and their
    own rules run when the rule binds)."""
    level = top_level(inputs)
    size = _size(level)
    if prim.vmap is None:
        raise NotImplementedError(f"op {prim.name!r} has no batching rule: vmap cannot run it")
    bdims, xs = [], []  # one loop: this runs once per op inside vmap
    for t in inputs:
        if type(t) is Batched and t.level == level:
            bdims.append(0)
            xs.append(t.phys)
        else:
            bdims.append(None)
            xs.append(t)
    out = prim.vmap(tuple(bdims), *xs, **params)
    if out.ndim == 0 or out.shape[0] != size:
        raise RuntimeError(f"op {prim.name!r}: its batching rule gave shape {out.shape}, not "
                           f"{size} examples first")
    return Batched(out, level)


def bottom(t: Tensor) -> Tensor:
    """The plain Tensor under every level of ``t`` (all its batch axes first)."""
    while type(t) is Batched:
        t = t.phys
    return t


def xp_of(t: Tensor):
    """``t``'s backend, Batched or not."""
    return backend_of(bottom(t).data)


def stand_in(t: Tensor) -> Tensor:
    """A plain Tensor with ``t``'s backend and dtype: what ``as_tensor(v, like=...)``
    reads (a Python scalar next to a Batched takes its dtype from it)."""
    return bottom(t) if type(t) is Batched else t


_tape.install_batching(_batch_step, stand_in)


def lift(t: Tensor, levels: tuple) -> Tensor:
    """``t`` batched at every one of ``levels`` (``active_levels()``'s pairs): where it
    is not, broadcast along that level's examples (a view)."""
    if not levels:
        return t
    level, size = levels[-1]
    if type(t) is Batched and t.level == level:
        inner = t.phys
    else:
        inner = broadcast(t, size)
    return Batched(lift(inner, levels[:-1]), level)


def wrap(t: Tensor, levels: tuple) -> Tensor:
    """The plain ``t`` (one leading axis per level, outermost first) as Batched at ``levels``."""
    for level, _ in levels:
        t = Batched(t, level)
    return t


_broadcast_to = _transpose = None  # .einsum's, installed by it (it imports this module)


def install_einsum_ops(broadcast_to, transpose) -> None:
    """Give this module the einsum module's ``broadcast_to`` and ``transpose``."""
    global _broadcast_to, _transpose
    _broadcast_to, _transpose = broadcast_to, transpose


def broadcast(t: Tensor, size: int) -> Tensor:
    """``t`` with a leading axis of ``size`` copies (a broadcast view, on the tape)."""
    return _broadcast_to(reshape(t, (1,) + t.shape), (size,) + t.shape)


def rank_up(x: Tensor, rank: int) -> Tensor:
    """A physical ``x`` (its mapped axis first) with size-1 axes after that axis, up to one
    example's rank ``rank``: lined up with other inputs as broadcasting lines them up."""
    n = x.ndim - 1
    return x if n >= rank else reshape(x, x.shape[:1] + (1,) * (rank - n) + x.shape[1:])


def elementwise_apply(fn, *args):
    """``fn(*args)`` for an element-wise ``fn`` (NumPy broadcasting between its
    arguments), some of them Batched: ``fn`` runs on the physical tensors, each
    mapped axis first and the ranks lined up. Front ends that compute on values
    (masks, comparisons) batch this way; arguments that are not Tensors pass as they are."""
    level = top_level(args)
    if level is None:
        return fn(*args)
    _size(level)
    rank = builtins.max((a.ndim for a in args if hasattr(a, "ndim")), default=0)
    phys = [rank_up(a.phys, rank) if type(a) is Batched and a.level == level else a
            for a in args]
    return Batched(elementwise_apply(fn, *phys), level)


def shifted_axes(axis, ndim: int) -> tuple:
    """One example's ``axis`` (None, an int or a sequence) as the physical axes, past the
    mapped axis."""
    return tuple(a + 1 for a in normalize_axes(axis, ndim))


def same_op(p: Primitive, align: bool = False):
    """The batching rule of a primitive that passes a leading axis through with the same
    parameters (axes counted from the end, element-wise). ``align``: inputs broadcast
    against each other, so batched ones get size-1 axes up to the widest example's rank."""
    if not align:
        return lambda bdims, *xs, **params: bind(p, *xs, **params)

    def rule(bdims, *xs, **params):
        rank = builtins.max(x.ndim - (b is not None) for x, b in zip(xs, bdims))
        xs = [rank_up(x, rank) if b is not None else x for x, b in zip(xs, bdims)]
        return bind(p, *xs, **params)
    return rule


def batched_all(bdims, xs) -> list:
    """Every input batched: the unbatched ones broadcast along the examples."""
    size = next(x.shape[0] for x, b in zip(xs, bdims) if b is not None)
    return [x if b is not None else broadcast(x, size) for x, b in zip(xs, bdims)]


def int_axis(a):
    """One axis argument: an integer, else a TypeError naming it."""
    if isinstance(a, bool) or not isinstance(a, (int, numpy.integer)):
        raise TypeError(f"axis {a!r} is not an integer")
    return int(a)


def normalize_axes(axis, ndim: int) -> tuple:
    """``axis`` (None for all, an int or a sequence, negatives counted from the end)
    as a tuple of non-negative axes of a rank-``ndim`` tensor. A 0-d tensor has
    no axis 0: NumPy's ``sum`` takes one there but its ``mean`` and
    ``moveaxis`` refuse it, so every op here refuses it.

    Raises:
        ValueError: an axis out of bounds, or named twice.
        TypeError: an axis that is not an integer.
    """
    if axis is None:
        return tuple(range(ndim))
    axes = tuple(axis) if isinstance(axis, (tuple, list, range)) else (axis,)
    out = []
    for a in map(int_axis, axes):
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of bounds for a tensor of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} names an axis twice (rank {ndim})")
    return tuple(out)


def permutation(axes, ndim: int) -> tuple:
    """``axes`` as a permutation of a rank-``ndim`` tensor's axes, as
    ``ndarray.transpose`` takes it: every axis once (negatives counted from
    the end); ``None`` reverses them.

    Raises:
        ValueError: ``axes`` is not a full permutation (an axis missing,
            repeated or out of bounds); torch's ``t.transpose(-2, -1)`` on a
            4-D tensor is one, and ``swapaxes`` is what it means.
    """
    if axes is None:
        return tuple(reversed(range(ndim)))
    axes = tuple(axes)
    if len(axes) != ndim:
        raise ValueError(f"axes {tuple(axes)} are not a permutation of the {ndim} axes of the "
                         f"tensor (as ndarray.transpose); to swap two axes use swapaxes(a, b)")
    return normalize_axes(axes, ndim)


identity_p = Primitive("identity", lambda x: x)
identity_p.defvjp(lambda k, g, out, x: g)
identity_p.defjvp(lambda k, t, out, x: t)
identity_p.defbatch(lambda bdims, shapes, out_shape: bdims[0])
identity_p.defvmap(same_op(identity_p))

reshape_p = Primitive("reshape", lambda x, shape: x.reshape(shape))
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


reshape_p.defvmap(lambda bdims, x, shape: reshape(x, x.shape[:1] + shape))


def reshape(x: Tensor, *shape) -> Tensor:
    """``x`` with a new shape (NumPy rules, one ``-1`` allowed)."""
    x = as_tensor(x)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    shape = tuple(int(n) for n in shape)
    if shape.count(-1) > 1 or builtins.min(shape, default=0) < -1:
        raise ValueError(f"reshape to {shape}: only one -1 (an unknown size) is allowed, and "
                         f"no other negative size")
    if -1 in shape:
        known = math.prod(n for n in shape if n != -1)
        shape = tuple(x.size // known if n == -1 else n for n in shape)
    if shape == x.shape:
        return x
    if math.prod(shape) != x.size:
        raise ValueError(f"cannot reshape a tensor of shape {x.shape} into {shape}")
    return bind(reshape_p, x, shape=shape)


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


getitem_p = Primitive("getitem", _getitem_impl)
getitem_p.defvjp(lambda k, g, out, x, index, nb:
                 scatter_add(g, g.shape[:g.ndim - out.ndim] + x.shape, index,
                             g.ndim - out.ndim + nb))
getitem_p.defjvp(lambda k, t, out, x, index, nb: getitem(t, index, t.ndim - x.ndim + nb))
getitem_p.defaccum(lambda buf, g, out, x, index, nb:
                   _scatter_into(buf, g.data, index, g.ndim - out.ndim + nb))

scatter_p = Primitive("scatter_add", _scatter_impl)
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


getitem_p.defvmap(lambda bdims, x, index, nb: bind(getitem_p, x, index=index, nb=nb + 1))
scatter_p.defvmap(lambda bdims, g, shape, index, nb:
                  bind(scatter_p, g, shape=g.shape[:1] + shape, index=index, nb=nb + 1))


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
    if _depth and _batched_entries(index):
        return _batched_gather(x, index)
    index = _norm_index(index, backend_of(x.data) if type(x) is not Batched else xp_of(x))
    out = bind(getitem_p, x, index=index, nb=nb)
    if state.batch and _index_batch.arrays:
        _track_index_batch(x, index, nb, out)
    return out


class _IndexBatch(threading.local):
    def __init__(self):
        self.arrays = {}  # id -> (array, its batch axis): index arrays that carry the batch


_index_batch = _IndexBatch()


class batch_index_arrays:
    """While tracing with the batch axis tracked (``per_sample_grad``), the given arrays
    (the data's own, an embedding's ids) are known to have the batch on ``axis`` (0;
    inside vmap, after the levels' axes), so ``w[ids]`` is batched though ``w`` is not:
    NumPy's advanced indexing drops the Tensor around an index array, so they are
    known by identity."""

    def __init__(self, arrays, axis: int = 0):
        self.arrays = {id(a): (a, axis) for a in arrays}

    def __enter__(self):
        self.saved = _index_batch.arrays
        _index_batch.arrays = {**self.saved, **self.arrays}

    def __exit__(self, *exc):
        _index_batch.arrays = self.saved


def _track_index_batch(x: Tensor, index, nb: int, out: Tensor) -> None:
    idx = _as_tuple(index)
    hits = [e for e in idx if id(e) in _index_batch.arrays]
    if not hits:
        return
    if x.bdim is not None or len(hits) > 1:
        raise BatchMixingError("indexing a batched tensor with the batch's own index arrays "
                               "(or with two of them) pairs examples: rows mix")
    _, n_adv, _ = _advanced(idx)
    # the index array's dims end the advanced block (broadcasting lines them up right)
    out.bdim = _adv_start(x.ndim, idx, nb) + n_adv - hits[0].ndim + _index_batch.arrays[
        id(hits[0])][1]


def _adv_start(ndim: int, idx: tuple, nb: int = 0) -> int:
    """Where ``x[(:,)*nb, idx]`` puts the dims of its advanced (array) entries."""
    pos, _, front = _advanced(idx)
    if front:
        return nb
    before = builtins.sum(1 for e in idx[:pos[0]] if e is None or isinstance(e, slice))
    if Ellipsis in idx[:pos[0]]:
        used = builtins.sum(1 if isinstance(e, slice) else _entry(e)[0]
                            for e in idx if e is not None and e is not Ellipsis)
        before += ndim - nb - used
    return nb + before


def _batched_entries(index) -> bool:
    return any(type(e) is Batched for e in _as_tuple(index))


def _batched_gather(x: Tensor, index) -> Tensor:
    """``x[index]`` inside vmap where index arrays are Batched (one example's indices
    each): on the physical tensors, an ``arange`` over the examples joins the
    advanced entries, so example ``b`` reads its own row ``b`` of ``x``."""
    idx = _as_tuple(index)
    level = top_level((x,) + idx)
    size = _size(level)
    pos, n_adv, front = _advanced(idx)
    if any(hasattr(e, "dtype") and e.dtype == bool for e in idx):
        raise NotImplementedError("vmap: indexing with a batched boolean mask (its size "
                                  "differs per example); use eg.where")
    xp = xp_of(x)
    phys = [rank_up(e.phys, n_adv) if type(e) is Batched and e.level == level else e
            for e in idx]
    ar = Tensor(xp.arange(size).reshape((size,) + (1,) * n_adv))
    xb = x.phys if type(x) is Batched and x.level == level else broadcast(x, size)
    r = getitem(xb, (ar, *phys))
    # The advanced dims (with the examples' axis) come first on the physical side;
    # one example's result has them after the axes of the slices before them.
    before = _adv_start(x.ndim, idx)
    if before:
        a = 1 + n_adv
        r = transpose_axes(r, (0,) + tuple(range(a, a + before)) + tuple(range(1, a))
                           + tuple(range(a + before, r.ndim)))
    return Batched(r, level)


def transpose_axes(x: Tensor, perm: tuple) -> Tensor:
    """``x`` with its axes permuted: an einsum (installed with broadcast_to by .einsum)."""
    return _transpose(x, perm)


def scatter_add(g: Tensor, shape: tuple, index, nb: int = 0) -> Tensor:
    """Zeros of ``shape`` with ``g`` added at ``[(:,)*nb, index]`` (the adjoint of getitem);
    ``g``'s ``nb`` leading axes come first, as getitem leaves them."""
    return bind(scatter_p, g, shape=tuple(shape), index=index, nb=nb)


# -- assignment: out-of-place ``x[index] = v``, what ``t[index] = v`` records ------

def _assign_impl(x, v, index, nb):
    """A copy of ``x`` with ``v`` (the region's full shape, its ``nb`` axes
    first, or a 0-d fill) written at ``[(:,)*nb, index]``."""
    out = x.copy()
    lead = _numpy_lead(index, nb)
    out[_full(index, nb)] = _to_front(v, nb, lead) if lead and v.ndim else v
    return out


assign_p = Primitive("assign", _assign_impl)


@assign_p.defvjp
def _assign_vjp(k, g, out, x, v, index, nb):
    nb = g.ndim - out.ndim + nb
    if k == 0:  # the region was overwritten: nothing flows back into x there
        return bind(assign_p, g, Tensor(backend_of(g.data).zeros((), g.dtype)), index=index, nb=nb)
    return getitem(g, index, nb)


@assign_p.defjvp
def _assign_jvp(k, t, out, x, v, index, nb):
    lead = t.shape[:t.ndim - (x.ndim if k == 0 else v.ndim)]
    if k == 0:
        return bind(assign_p, t, Tensor(backend_of(t.data).zeros((), t.dtype)), index=index,
                    nb=len(lead) + nb)
    zeros = Tensor(backend_of(t.data).zeros(lead + x.shape, t.dtype))
    return bind(assign_p, zeros, t, index=index, nb=len(lead) + nb)


@assign_p.defbatch
def _assign_batch(bdims, shapes, out_shape, index, nb):
    mapping = _index_map(len(shapes[0]), index, nb)
    axes = set()
    if bdims[0] is not None:
        if not _whole(mapping[bdims[0]][1]):
            raise BatchMixingError(f"t[{index!r}] = v writes along the batch axis: rows mix")
        axes.add(bdims[0])
    if bdims[1] is not None:
        x_axes = [a for a, (o, e) in enumerate(mapping) if o == bdims[1] and _whole(e)]
        if not x_axes:
            raise BatchMixingError(f"t[{index!r}] = v puts v's batch axis where t has none: "
                                   f"rows mix")
        axes.add(x_axes[0])
    if len(axes) > 1:
        raise BatchMixingError(f"t[{index!r}] = v lines v's batch axis up with another axis "
                               f"of t: rows mix")
    return axes.pop()


@assign_p.defvmap
def _assign_vmap(bdims, x, v, index, nb):
    size = (x if bdims[0] is not None else v).shape[0]
    x = x if bdims[0] is not None else broadcast(x, size)
    if bdims[1] is None:
        v = v if v.ndim == 0 else broadcast(v, size)
    elif v.ndim == 1:  # one example's fill value (0-d): line it up with the region
        v = reshape(v, v.shape + (1,) * (len(_region_shape(x, index, nb + 1)) - 1))
    return bind(assign_p, x, v, index=index, nb=nb + 1)


def _region_shape(x: Tensor, index, nb: int = 0) -> tuple:
    """The shape of ``x[(:,)*nb, index]`` from the shapes alone (a broadcast dummy)."""
    xp = xp_of(x)
    return xp.broadcast_to(xp.zeros((), dtype=bool), x.shape)[_full(index, nb)].shape


def region(x: Tensor, index) -> tuple:
    """The shape of ``x[index]``."""
    if type(x) is Batched:
        return _region_shape(x, _norm_index(index, xp_of(x)))
    return x.data[_norm_index(index, backend_of(x.data))].shape


def assign(x: Tensor, index, v: Tensor) -> Tensor:
    """``x`` with ``v`` written at ``index`` (NumPy's ``x[index] = v``, out of place);
    ``v`` has the region's shape (:func:`region`) and ``x``'s dtype.

    Where array indices name one position twice NumPy keeps the last write;
    which write a derivative should follow is then undefined, so that raises.

    Raises:
        ValueError: repeated positions while the assignment is recorded.
    """
    if _depth and _batched_entries(index):
        raise NotImplementedError("vmap: t[index] = v with a batched index array is not "
                                  "supported; build the result with eg.where")
    if type(v) is Batched and type(x) is not Batched:
        raise RuntimeError("t[index] = v inside vmap: v is mapped and t is not, so t would "
                           "need the mapped axis; compute a new tensor (eg.where, concatenate)")
    xp = xp_of(x)
    index = _norm_index(index, xp)
    if _advanced(index)[0] and (x.node is not None or x.requires_grad or v.node is not None
                                or v.requires_grad):
        count = xp.zeros(x.shape, dtype=numpy.int64)
        xp.add_at(count, index, 1)
        if count.max() > 1:
            raise ValueError(f"t[{index!r}] = v names a position more than once: which write "
                             f"the derivative follows is undefined")
    return bind(assign_p, x, v, index=index, nb=0)


astype_p = Primitive("astype", lambda x, dtype: x.astype(dtype))
astype_p.defvjp(lambda k, g, out, x, dtype: astype(g, x.dtype))
astype_p.defjvp(lambda k, t, out, x, dtype: astype(t, dtype))
astype_p.defbatch(lambda bdims, shapes, out_shape, dtype: bdims[0])
astype_p.defvmap(same_op(astype_p))


def astype(x: Tensor, dtype) -> Tensor:
    """``x`` cast to ``dtype``, on the tape (the cotangent is cast back); to a
    non-floating dtype it leaves the tape, as torch's ``to``."""
    x, dtype = as_tensor(x), numpy.dtype(dtype)
    if x.dtype == dtype:
        return x
    if dtype.kind != "f":
        if type(x) is Batched:  # leaves the tape, the examples' axis kept
            return Batched(astype(x.phys, dtype), x.level)
        return Tensor(x.data.astype(dtype))
    return bind(astype_p, x, dtype=dtype)


# -- squeeze, expand_dims, concatenate, stack --------------------------------------

def squeeze(x: Tensor, axis=None) -> Tensor:
    """``x`` without size-1 axes: all of them, or those in ``axis`` (as NumPy).

    Raises:
        ValueError: an axis named whose size is not 1 (NumPy refuses it;
            torch's ``squeeze(dim)`` would leave it silently).
    """
    x = as_tensor(x)
    if axis is None:
        axes = tuple(a for a, n in enumerate(x.shape) if n == 1)
    else:
        axes = normalize_axes(axis, x.ndim)
        for a in axes:
            if x.shape[a] != 1:
                raise ValueError(f"squeeze: axis {a} has size {x.shape[a]}, not 1")
    return reshape(x, tuple(n for a, n in enumerate(x.shape) if a not in axes))


def expand_dims(x: Tensor, axis) -> Tensor:
    """``x`` with size-1 axes inserted at ``axis`` (an int or a tuple), as NumPy's:
    each axis counts in the result's rank."""
    x = as_tensor(x)
    n = len(axis) if isinstance(axis, (tuple, list)) else 1
    axes = normalize_axes(axis, x.ndim + n)
    dims = iter(x.shape)
    return reshape(x, tuple(1 if a in axes else next(dims) for a in range(x.ndim + n)))


def _concat_impl(*xs, axis):
    return common_backend(xs).concatenate(xs, axis=axis)


concat_p = Primitive("concatenate", _concat_impl)  # axis counts from the end: batch axes go first


@concat_p.defvjp
def _concat_vjp(k, g, out, *xs, axis):
    start = builtins.sum(x.shape[axis] for x in xs[:k])
    piece = getitem(g, (Ellipsis, slice(start, start + xs[k].shape[axis]))
                    + (slice(None),) * (-axis - 1))
    return astype(piece, xs[k].dtype)


@concat_p.defjvp
def _concat_jvp(k, t, out, *xs, axis):
    lead = t.shape[:t.ndim - xs[k].ndim]
    xp = backend_of(t.data)
    parts = [t if j == k else Tensor(xp.zeros(lead + x.shape, t.dtype)) for j, x in enumerate(xs)]
    return bind(concat_p, *parts, axis=axis)


@concat_p.defbatch
def _concat_batch(bdims, shapes, out_shape, axis):
    axes = {b for b in bdims if b is not None}
    if len(axes) > 1 or len(out_shape) + axis in axes:
        raise BatchMixingError("concatenate joins along the batch axis, or lines batch axes "
                               "of two inputs up with different axes: rows mix")
    return axes.pop()


concat_p.defvmap(lambda bdims, *xs, axis: bind(concat_p, *batched_all(bdims, xs), axis=axis))


def _joined(ts) -> list:
    """The parts as Tensors: arrays on their own backend, lists and scalars on the
    Tensors' (not NumPy's, which would pull a GPU array to the host or refuse it)."""
    ts = list(ts)
    like = next((t for t in ts if isinstance(t, Tensor)), None)
    return [as_tensor(t, like=like) for t in ts]


def concatenate(ts, axis=0) -> Tensor:
    """Join tensors along an existing axis (NumPy's ``concatenate``; ``axis=None``
    joins them flattened).

    Raises:
        ValueError: no tensors, 0-d tensors, ranks or shapes (off ``axis``) that differ.
    """
    ts = _joined(ts)
    if not ts:
        raise ValueError("concatenate needs at least one tensor")
    if axis is None:
        ts, axis = [reshape(t, (t.size,)) for t in ts], 0
    ndim = ts[0].ndim
    if ndim == 0:
        raise ValueError("zero-dimensional tensors cannot be concatenated")
    (a,) = normalize_axes(axis, ndim)
    for i, t in enumerate(ts):
        if t.ndim != ndim or t.shape[:a] + t.shape[a + 1:] != ts[0].shape[:a] + ts[0].shape[a + 1:]:
            raise ValueError(f"concatenate along axis {a}: tensor {i} has shape {t.shape}, "
                             f"tensor 0 {ts[0].shape}: only axis {a} may differ")
    return bind(concat_p, *ts, axis=a - ndim)


def stack(ts, axis=0) -> Tensor:
    """Join same-shaped tensors along a new axis (NumPy's ``stack``).

    Raises:
        ValueError: no tensors, or shapes that differ.
    """
    ts = _joined(ts)
    if not ts:
        raise ValueError("stack needs at least one tensor")
    for i, t in enumerate(ts):
        if t.shape != ts[0].shape:
            raise ValueError(f"stack: tensor {i} has shape {t.shape}, tensor 0 {ts[0].shape}")
    (a,) = normalize_axes(axis, ts[0].ndim + 1)
    parts = [expand_dims(t, a) for t in ts]
    return bind(concat_p, *parts, axis=a - ts[0].ndim - 1)


# -- copy, flip, split, pad -------------------------------------------------------------

copy_p = Primitive("copy", lambda x: x.copy())  # a new buffer: changing it leaves x alone
copy_p.defvjp(lambda k, g, out, x: g)
copy_p.defjvp(lambda k, t, out, x: t)
copy_p.defbatch(lambda bdims, shapes, out_shape: bdims[0])
copy_p.defvmap(same_op(copy_p))


def copy(x: Tensor) -> Tensor:
    """A copy of ``x`` on the tape (torch's ``clone``, NumPy's ``copy``)."""
    return bind(copy_p, as_tensor(x))


def flip(x: Tensor, axis=None) -> Tensor:
    """``x`` reversed along ``axis`` (all axes if None), as NumPy's ``flip``: a view."""
    x = as_tensor(x)
    axes = normalize_axes(axis, x.ndim)
    return getitem(x, tuple(slice(None, None, -1) if a in axes else slice(None)
                            for a in range(x.ndim)))


def split(x: Tensor, indices_or_sections, axis=0) -> list:
    """``x`` cut along ``axis`` as NumPy's ``split``: into that many equal parts
    (an int), or at those indices (a sequence); each part a view.

    Raises:
        ValueError: a number of sections that does not divide the axis.
    """
    x = as_tensor(x)
    (a,) = normalize_axes(axis, x.ndim)
    n = x.shape[a]
    if isinstance(indices_or_sections, (int, numpy.integer)):
        k = int(indices_or_sections)
        if k <= 0 or n % k:
            raise ValueError(f"split: {k} sections do not divide axis {a} of size {n} equally")
        cuts = [n // k * i for i in range(1, k)]
    else:
        cuts = [int(i) for i in indices_or_sections]
    bounds = [0] + cuts + [n]
    lead = (slice(None),) * a
    return [getitem(x, lead + (slice(lo, builtins.max(lo, hi)),))
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def _pad_impl(x, width):
    xp = backend_of(x)
    full = ((0, 0),) * (x.ndim - len(width)) + width  # leading batch axes: not padded
    return xp.pad(x, full)


pad_p = Primitive("pad", _pad_impl)  # width covers the trailing axes: batch axes go first
# An axis not padded is taken whole (slice(None)): a batch axis stays one the batch
# rules see whole.
pad_p.defvjp(lambda k, g, out, x, width: getitem(g, (Ellipsis,) + tuple(
    slice(b, b + n) if b or a else slice(None)
    for (b, a), n in zip(width, x.shape[x.ndim - len(width):]))))
pad_p.defjvp(lambda k, t, out, x, width: bind(pad_p, t, width=width))
pad_p.defvmap(same_op(pad_p))  # the widths cover the trailing axes


@pad_p.defbatch
def _pad_batch(bdims, shapes, out_shape, width):
    b = bdims[0] - (len(shapes[0]) - len(width))  # the widths cover the trailing axes
    if b >= 0 and width[b] != (0, 0):
        raise BatchMixingError("pad adds rows along the batch axis: rows mix")
    return bdims[0]


def pad(x: Tensor, pad_width) -> Tensor:
    """``x`` with zeros around it, as NumPy's ``pad(x, pad_width)`` (constant mode):
    ``pad_width`` an int, a ``(before, after)`` pair, or one pair per axis.

    Raises:
        ValueError: a negative width, or widths that do not fit the rank.
    """
    x, w = as_tensor(x), numpy.asarray(pad_width)
    if w.dtype.kind not in "iu" or w.ndim > 2 or (w.ndim == 2 and w.shape[1] != 2):
        raise ValueError(f"pad: pad_width {pad_width!r} is not an int, a (before, after) pair "
                         f"or one pair per axis")
    try:
        w = numpy.broadcast_to(w.reshape((-1, 2) if w.ndim == 2 else (1, -1)
                                         if w.ndim == 1 else (1, 1)), (x.ndim, 2))
    except ValueError:
        raise ValueError(f"pad: pad_width {pad_width!r} does not fit a tensor of rank "
                         f"{x.ndim}") from None
    if (w < 0).any():
        raise ValueError(f"pad: negative width in {pad_width!r}")
    width = tuple((int(b), int(a)) for b, a in w)
    return bind(pad_p, x, width=width)
