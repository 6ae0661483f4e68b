"""Einsum, the one linear-algebra primitive, and the execution of its derived patterns.

The derivation layer (:mod:`einsumgrad.derive`) writes an einsum's VJP, JVP
and Jacobian as patterns on index labels; here they run on Tensors
(:func:`run_vjp`, :func:`run_jvp`, :func:`materialize` and the Jacobian
products), as einsums over the engine's own ops, so every rule can itself be
differentiated. ``g`` and ``t`` may carry leading batch axes (a whole
Jacobian's basis): the patterns gain fresh leading indices for them. Sums,
transposes, traces, matmul, broadcasting and its adjoint (``sum_to``) are
einsums too, and live here.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Sequence

import numpy

from ..backends import backend_of, common_backend, memory_order
from ..derive import JVP, VJP, Jacobian, batched, derive, install_runner, vjp_pattern
from ..plan import CACHE_SIZE, Bounded, jacobian_of, path_option, plan_for
from ..spec import EinsumError, EinsumTypeError, Spec, letters, spec_type_error
from ..tensor import BatchMixingError, Primitive, Tensor, as_tensor, backprop, enable_grad
from . import shape as _shape
from .shape import (Batched, bind, install_einsum_ops, int_axis, normalize_axes, pair,
                    permutation, rank_up, reshape)

# -- einsum: the one linear-algebra primitive ----------------------------------

def _einsum_impl(*arrays, spec, run=None, order=None):
    return run(arrays) if run is not None else plan_for(spec, arrays)(arrays, order)


einsum_p = Primitive("einsum", _einsum_impl)


def _layout(x) -> tuple | None:
    """The memory order of an operand's cotangent: its own, so that the ops meeting it
    next (the operand's other rules, its producer's VJP) read it without a copy; C
    order for a matrix, or where it is broadcast (a weight vmap gives every example:
    a stride-0 axis has no place in memory, and laid out innermost it would put each
    example's gradient entries an example apart)."""
    if x.ndim <= 2 or any(st == 0 and n > 1 for st, n in zip(x.strides, x.shape)):
        return None
    return tuple(memory_order(x))


@einsum_p.defvjp
def _einsum_vjp(k, g, out, *xs, spec, run=None, order=None):
    others = xs[:k] + xs[k + 1:]
    nb = g.ndim - out.ndim
    like = _layout(xs[k].data) if nb == 0 else None
    return run_vjp(vjp_pattern(spec, k, (), spec.inputs[k]), g, *others, shape=xs[k].shape,
                   nb=nb, order=like)


@einsum_p.deffused
class _ArrayVJPs:
    """A backward that records nothing: operand k's cotangent (a backend array) on
    ``[k]``, its pattern run on arrays then (the same einsum run_vjp binds), asked
    for only for the operands the tape needs."""

    __slots__ = ("g", "nb", "xs", "spec", "key")

    def __init__(self, g, out, *xs, spec: Spec, run=None, order=None):
        self.g, self.nb, self.xs, self.spec = g, g.ndim - out.ndim, xs, spec
        self.key = None

    def __getitem__(self, k: int):
        g, xs = self.g, self.xs
        x = xs[k]
        like = _layout(x) if self.nb == 0 else None
        key = self.key
        if key is None:  # shared by the operands: one node's arrays
            key = self.key = (self.spec, type(g), g.shape, g.dtype, tuple(map(type, xs)),
                              tuple(map(_SHAPE, xs)), tuple(map(_DTYPE, xs)))
        run = _array_vjp_runs.get((key, k, like))
        if run is None:
            run = _array_vjp_runs[key, k, like] = _array_vjp_runner(self.spec, k, self.nb, like,
                                                                    g, xs)
        return run((g, *xs[:k], *xs[k + 1:]))


# (spec, arrays' types, shapes and dtypes, operand, layout) -> a runner of that VJP on arrays
_array_vjp_runs = Bounded(CACHE_SIZE)
_SHAPE, _DTYPE, _DATA = (operator.attrgetter(a) for a in ("shape", "dtype", "data"))


def _array_vjp_runner(spec: Spec, k: int, nb: int, like: tuple | None, g, xs: tuple):
    """Operand k's VJP on arrays shaped (and typed) as ``g`` and ``xs``, planned once:
    a function of the operands ``(g, *others)``."""
    p = vjp_pattern(spec, k, (), spec.inputs[k])
    spec, consts, order, shape = _vjp_call(p, xs[k].shape, nb, like)
    xp = backend_of(g)
    ops = (g, *xs[:k], *xs[k + 1:])
    if consts and all(kind == "ones" for kind, _ in consts):
        run = _spread_back(xp, spec, ops, [n for _, n in consts], order)
    elif consts:
        dtype = g.dtype  # the runner keeps no array alive
        made = lambda: tuple(xp.eye(n, dtype=dtype) if kind == "eye" else  # noqa: E731
                             xp.ones(n, dtype=dtype) for kind, n in consts)
        plan = plan_for(spec, ops + made())
        run = lambda ops: plan(ops + made(), order)  # noqa: E731
    else:
        run = plan_for(spec, ops)
        run = run if order is None else functools.partial(run, order=order)
    if shape is None:
        return run

    def reshaped(ops):
        r = run(ops)
        return r.reshape(r.shape[:nb] + shape)
    return reshaped


def _spread_back(xp, spec: Spec, ops: tuple, sizes: list, order: tuple | None):
    """An array VJP whose constants are all ones vectors (the indices a sum took
    away, ``sizes`` long, one per input of ``spec`` after ``ops``), as a function
    of operands shaped as ``ops``: the einsum of ``ops`` alone, then copied out
    along those indices into a buffer laid out in ``order`` (C order without
    one). The values of the product with the ones, exactly, from one copy
    instead of broadcast multiplies."""
    real = spec.inputs[:len(ops)]
    present = set().union(*real)
    kept = tuple(l for l in spec.output if l in present)
    core = plan_for(Spec(real, kept), ops)
    lone = {t[0]: n for t, n in zip(spec.inputs[len(ops):], sizes)}
    sizes_of = {l: n for t, a in zip(real, ops) for l, n in zip(t, a.shape)}
    have = {l: sizes_of[l] for l in kept}
    full = tuple(have[l] if l in have else lone[l] for l in spec.output)
    view = tuple(have.get(l, 1) for l in spec.output)
    if order is None or order == tuple(range(len(full))):  # C order: no transposes
        def run(ops):
            c = core(ops)
            buf = xp.empty(full, dtype=c.dtype)
            buf[...] = c.reshape(view)  # broadcast along the lone indices
            return buf
        return run
    buf_shape = tuple(full[i] for i in order)
    back = tuple(order.index(i) for i in range(len(order)))

    def run_ordered(ops):
        c = core(ops)
        buf = xp.empty(buf_shape, dtype=c.dtype)
        buf[...] = c.reshape(view).transpose(order)  # broadcast along the lone indices
        return buf.transpose(back)
    return run_ordered


@einsum_p.defjvp
def _einsum_jvp(k, t, out, *xs, spec, run=None, order=None):
    p = _jvps.get((spec, k))
    if p is None:
        p = _jvps[spec, k] = JVP(spec, k)
    return run_jvp(p, t, *(xs[:k] + xs[k + 1:]), nb=t.ndim - xs[k].ndim)


_jvps = Bounded(CACHE_SIZE)  # (spec, k) -> JVP(spec, k)


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


_vmap_derived = Bounded(CACHE_SIZE)  # (spec, one example's shapes...) -> derive(...) inside vmap


@einsum_p.defvmap
def _einsum_vmap(bdims, *xs, spec, run=None, order=None):
    # One fresh index, on the mapped operands and first in the output: the
    # batched spec is what a trace of the vmapped function prints.
    return einsum_spec(batched(spec, tuple(k for k, b in enumerate(bdims) if b is not None), 1),
                       *xs)


def einsum(subscripts: str, *operands: Any, optimize="auto") -> Tensor:
    """NumPy's einsum on Tensors, differentiable to any order in both modes.

    The full grammar: explicit and implicit output, ``...`` (summed where an
    explicit output leaves it out, as torch and NumPy's optimized path do),
    repeated indices (diagonals, traces), indices summed away, size-1
    broadcasting, any number of operands. NumPy's second form, operands each
    followed by a sublist of ints in ``[0, 52)`` (and ``...``), then an
    optional output sublist, works too: ``einsum(a, [0, 1], b, [1, 2], [0, 2])``
    is ``einsum('ab,bc->ac', a, b)``; so does torch's list form,
    ``einsum('ij,jk->ik', [a, b])`` (one list or tuple of operands where the
    spec names several, or a list of Tensors; a list NumPy would read as one
    array-like operand, ``einsum('ij', [[1, 2], [3, 4]])``, is read as NumPy
    reads it). Integer and bool einsums keep NumPy's result dtype.

    ``optimize`` picks the contraction order for three or more operands, as
    opt_einsum's: ``"auto"`` (the default; also ``True``), ``"greedy"``,
    ``"optimal"``, ``"dp"``, ..., ``False`` (one step: the backend's einsum), or
    an explicit path (``numpy.einsum_path``'s first result, or its list of
    tuples). The plan is made once and cached per (spec, shapes, dtypes,
    backend, optimize).

    Raises:
        EinsumError: a bad spec, sublist, path or operands; the message names
            the culprit. A spec that is not a string (``None``, ``bytes``) raises
            one that is also a ``TypeError``, naming the type received.
    """
    if type(subscripts) is not str:
        subscripts, operands = _spec_and_operands(subscripts, operands)
    elif len(operands) == 1 and type(operands[0]) in (list, tuple):
        operands = _list_form(subscripts, operands[0])
    ts = [o if type(o) is Tensor else _operand(o, k) for k, o in enumerate(operands)]
    if _shape._depth and any(type(t) is Batched for t in ts):  # inside vmap: the rule plans
        key = (subscripts,) + tuple(t.shape for t in ts)
        d = _vmap_derived.get(key)
        if d is None:
            d = _vmap_derived[key] = derive(subscripts, *key[1:])
        ts = [reshape(t, s) if s is not None else t for t, s in zip(ts, d.squeezed_shapes)]
        return bind(einsum_p, *ts, spec=d.clean)
    if type(optimize) is not str or optimize != "auto":
        optimize = path_option(optimize)
    arrays = tuple(map(_DATA, ts))
    key = (subscripts, optimize, tuple(map(_SHAPE, arrays)), tuple(map(_DTYPE, arrays)),
           tuple(map(type, arrays)))
    hit = _prepared.get(key)
    if hit is None:
        hit = _prepared[key] = _prepare(subscripts, ts, optimize)
    clean, squeezed, run = hit
    if squeezed:
        ts = [reshape(t, s) if s is not None else t for t, s in zip(ts, squeezed)]
    return bind(einsum_p, *ts, spec=clean, run=run)


def _spec_and_operands(first: Any, operands: tuple) -> tuple:
    """A spec that is no plain ``str``: a ``str`` subclass (``numpy.str_``), or
    NumPy's sublist form (the second argument a sublist); anything else is a
    type error naming the type received (``None``, ``bytes``, a number...)."""
    if isinstance(first, str):
        return str(first), operands
    if first is None or isinstance(first, (bytes, bytearray)) or not operands:
        raise spec_type_error("einsum", first)
    if _is_sublist(operands[0]):
        return _from_sublists((first,) + operands)
    raise EinsumTypeError(f"einsum: the spec must be a string, got {type(first).__name__}; "
                          f"or, NumPy's second form, each operand followed by its sublist of "
                          f"ints and ...: operand 0's sublist is a {type(operands[0]).__name__}")


def _is_sublist(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (isinstance(x, numpy.ndarray) and x.ndim == 1
                                            and x.dtype.kind in "iu")


def _list_form(subscripts: str, ops: Any) -> tuple:
    """torch's ``einsum(spec, [A, B])``: the list's items as the operands where
    the spec names more than one operand (NumPy would refuse the call) or the
    list holds Tensors only; otherwise the list is one array-like, as NumPy reads it."""
    several = "," in subscripts.partition("->")[0]
    if several or (ops and all(isinstance(o, Tensor) for o in ops)):
        return tuple(ops)
    return (ops,)


_prepared = Bounded(CACHE_SIZE)  # (spec, shapes, dtypes, array types) -> parsed, planned

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


def _prepare(subscripts: str, ts: list, optimize="auto") -> tuple:
    """Parse, check and plan once per (spec, shapes, dtypes, array types, optimize)."""
    if not ts:
        raise EinsumError(f"einsum {subscripts!r} was given no operands")
    d = derive(subscripts, *[t.shape for t in ts])
    # A shape squeezed to () is falsy: test for None, not truth.
    squeezed = d.squeezed_shapes if any(s is not None for s in d.squeezed_shapes) else None
    arrays = [t.data if s is None else t.data.reshape(s)
              for t, s in zip(ts, squeezed or [None] * len(ts))]
    return d.clean, squeezed, plan_for(d.clean, arrays, optimize)


def _operand(o: Any, k: int) -> Tensor:
    t = as_tensor(o)
    if type(t) is Batched:
        return t
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


# -- derived patterns, run on Tensors ------------------------------------------------

def run_vjp(p: VJP, g: Tensor, *others: Tensor, shape: tuple, nb: int = 0,
            order: tuple | None = None) -> Tensor:
    """Run a VJP pattern: operand k (of ``shape``, squeezed) from the cotangent ``g``.

    ``g`` may carry ``nb`` leading batch axes; the result carries them too.
    The pattern's extra steps run fused into its one einsum as constant
    operands: an identity matrix ties a repeated index to its copy (the
    diagonal embedding), a ones vector broadcasts an index summed away.
    ``order``: the layout asked of the result (its axes, outermost in memory
    first), honoured where the pattern gives operand k's axes as they are.
    """
    spec, consts, order, squeezed = _vjp_call(p, shape, nb, order)
    ops = [g, *others, *[constant_like(g, kind, n) for kind, n in consts]]
    r = einsum_spec(spec, *ops, order=order)
    return r if squeezed is None else reshape(r, r.shape[:nb] + squeezed)


def _vjp_call(p: VJP, shape: tuple, nb: int, order: tuple | None) -> tuple:
    """How to run VJP pattern ``p`` for an operand of ``shape``, the cotangent with
    ``nb`` batch axes: ``(spec, [(constant kind, size)], order, shape or None)``,
    the last the result's shape past its batch axes where the einsum gives it
    without the axes the operand broadcast (None: as it comes)."""
    spec = p.fused if nb == 0 else batched(p.fused, (0,), nb)
    sizes = dict(zip(p.spec.inputs[p.k], shape))
    consts = [("eye" if kind == "eye" else "ones", sizes[labels[0]]) for kind, labels in p.extra]
    if order is not None and (nb or p.broadcast_axes or len(spec.output) != len(order)):
        order = None
    squeezed = None
    if p.broadcast_axes:
        it = iter(shape[i] for i in range(len(p.raw_term)) if i not in p.broadcast_axes)
        squeezed = tuple(1 if ax in p.broadcast_axes else next(it)
                         for ax in range(len(p.raw_term)))
    return spec, consts, order, squeezed


def run_jvp(p: JVP, t: Tensor, *operands: Tensor, nb: int = 0) -> Tensor:
    """Run a JVP pattern: the einsum with tangent ``t`` (``nb`` leading batch axes) in slot k."""
    ops = list(operands)
    ops.insert(p.k, t)
    return bind(einsum_p, *ops, spec=p.spec if nb == 0 else batched(p.spec, (p.k,), nb))


def materialize(jac: Jacobian, *operands):
    """Build ``J`` with shape ``out.shape + operand_k.shape`` (a Tensor when given
    Tensors, else a backend array): zeros, the other operands' contraction
    written onto its generalized diagonal (:func:`einsumgrad.plan.jacobian_of`)."""
    wrap = any(isinstance(o, Tensor) for o in operands)
    arrays = [o.data if isinstance(o, Tensor) else o for o in operands]
    xp = common_backend(arrays)
    arrays = [xp.asarray(a) for a in arrays]
    d = derive(jac.d.subscripts, *[a.shape for a in arrays])
    k = jac.k
    clean = [a.reshape(s) if s is not None and j != k else a
             for j, (a, s) in enumerate(zip(arrays, d.squeezed_shapes))]
    J = jacobian_of(d.clean, k, clean, d.broadcast[k])
    return Tensor(J) if wrap else J


def jacobian_jvp(jac: Jacobian, v, *operands) -> Tensor:
    """``J @ v`` (v shaped like operand k) without building ``J``: the einsum on ``v``."""
    ops = list(operands)
    ops[jac.k] = v
    return einsum(jac.d.subscripts, *ops)


def jacobian_vjp(jac: Jacobian, u, *operands) -> Tensor:
    """``u @ J`` (u shaped like the output) without building ``J``: one reverse pass."""
    k = jac.k
    x = as_tensor(operands[k])
    x = Tensor(x.data, requires_grad=True) if not x.requires_grad else x
    with enable_grad():
        out = einsum(jac.d.subscripts, *operands[:k], x, *operands[k + 1:])
    ((_, g),) = backprop([out], [as_tensor(u, like=out)], [x])  # the einsum reaches x
    return g if g.requires_grad else g.detach()


# derive.py derives and never runs: the Jacobian's methods run through these.
install_runner(materialize=materialize, jvp=jacobian_jvp, vjp=jacobian_vjp)


# -- broadcasting and its adjoint, a sum ------------------------------------------------

broadcast_p = Primitive("broadcast_to", lambda x, shape: backend_of(x).broadcast_to(x, shape))
broadcast_p.defvjp(lambda k, g, out, x, shape: sum_to(g, x.shape, g.ndim - out.ndim))


broadcast_p.defjvp(lambda k, t, out, x, shape: broadcast_to(lift(t, x.ndim, len(shape)),
                                                            t.shape[:t.ndim - x.ndim] + shape))


@broadcast_p.defbatch
def _broadcast_batch(bdims, shapes, out_shape, shape):
    return bdims[0] + len(shape) - len(shapes[0])


broadcast_p.defvmap(lambda bdims, x, shape:
                    broadcast_to(rank_up(x, len(shape)), x.shape[:1] + tuple(shape)))


def broadcast_to(x: Tensor, shape: tuple) -> Tensor:
    shape = tuple(shape)
    return x if x.shape == shape else bind(broadcast_p, x, shape=shape)


def lift(t: Tensor, ndim: int, to: int) -> Tensor:
    """A tangent ``t`` (leading batch axes, then an input of rank ``ndim``) with
    size-1 axes after its batch axes up to rank ``to``: lined up, as NumPy
    broadcasting lines the input up, with an output of rank ``to``."""
    nb = t.ndim - ndim
    return t if ndim >= to else reshape(t, t.shape[:nb] + (1,) * (to - ndim) + t.shape[nb:])


def _summed_to(gshape: tuple, shape: tuple, nb: int) -> Spec | None:
    """The sum that takes a broadcast of ``shape`` (after ``nb`` batch axes) back to
    it, as an einsum, or None where there is none to take."""
    lead = len(gshape) - nb - len(shape)
    labels = letters(len(gshape))
    keep = labels[:nb] + tuple(l for i, l in enumerate(labels[nb + lead:])
                               if not (shape[i] == 1 and gshape[nb + lead + i] != 1))
    return Spec((labels,), keep) if len(keep) < len(gshape) else None


def sum_to(g: Tensor, shape: tuple, nb: int = 0) -> Tensor:
    """Sum ``g`` (``nb`` leading batch axes, then a broadcast of ``shape``) back to ``shape``."""
    shape = tuple(shape)
    spec = _summed_to(g.shape, shape, nb)
    if spec is not None:
        g = einsum_spec(spec, g)
    return reshape(g, g.shape[:nb] + shape)


def sum_to_array(g, shape: tuple):
    """:func:`sum_to` on a backend array (no batch axes), for a backward that records
    nothing: the same einsum, run on the array."""
    shape = tuple(shape)
    spec = _summed_to(g.shape, shape, 0)
    if spec is not None:
        g = plan_for(spec, (g,))((g,))
    return g.reshape(shape)


# -- sums, means, transposes, matmul: einsums ------------------------------------------

def sum(x, axis=None, keepdims: bool = False) -> Tensor:
    """Sum over ``axis`` (an einsum that drops those indices)."""
    x = x if type(x) is Tensor else as_tensor(x)
    key = (x.ndim, axis) if axis is None or type(axis) is int else None
    spec = _sum_specs.get(key) if key is not None else None
    if spec is None:
        axes = normalize_axes(axis, x.ndim)
        labels = letters(x.ndim)
        spec = Spec((labels,), tuple(l for i, l in enumerate(labels) if i not in axes))
        if key is not None:
            _sum_specs[key] = spec
    r = bind(einsum_p, x, spec=spec)
    if keepdims:
        axes = normalize_axes(axis, x.ndim)
        r = reshape(r, tuple(1 if i in axes else n for i, n in enumerate(x.shape)))
    return r


_sum_specs = Bounded(CACHE_SIZE)  # (rank, axis: None or an int) -> the sum's spec, checked


def transpose(x, axes: Sequence[int] | None = None) -> Tensor:
    """Permute axes as ``numpy.transpose``: ``axes`` a full permutation, or None
    to reverse them; an einsum that reorders indices.

    Raises:
        ValueError: ``axes`` is not a permutation of the axes (see :func:`swapaxes`).
    """
    x = as_tensor(x)
    axes = permutation(axes, x.ndim)
    if axes == tuple(range(x.ndim)):
        return x
    labels = letters(x.ndim)
    return einsum_spec(Spec((labels,), tuple(labels[a] for a in axes)), x)


def swapaxes(x, axis1: int, axis2: int) -> Tensor:
    """``x`` with two axes swapped, as ``numpy.swapaxes`` (torch's ``transpose(a, b)``)."""
    x = as_tensor(x)
    a, b = (normalize_axes(int_axis(v), x.ndim)[0] for v in (axis1, axis2))
    perm = list(range(x.ndim))
    perm[a], perm[b] = b, a
    return transpose(x, perm)


def moveaxis(x, source, destination) -> Tensor:
    """``x`` with axes moved to new positions, the rest in order, as ``numpy.moveaxis``."""
    x = as_tensor(x)
    src, dst = normalize_axes(source, x.ndim), normalize_axes(destination, x.ndim)
    if len(src) != len(dst):
        raise ValueError(f"moveaxis: {len(src)} source axes but {len(dst)} destinations")
    rest = [a for a in range(x.ndim) if a not in src]
    for d, s in sorted(zip(dst, src)):
        rest.insert(d, s)
    return transpose(x, rest)


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


install_einsum_ops(broadcast_to, transpose)  # shape.py's vmap helpers broadcast and transpose
