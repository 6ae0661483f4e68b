"""Transforms on functions of Tensors, built on two walks: ``backprop`` and ``push``.

Each transform traces ``f`` (recording every op while it is in flight), then
pulls cotangents back (:func:`vjp`) or pushes tangents forward (:func:`jvp`).
The final walk records only what an enclosing transform or a user's
``requires_grad`` needs, so transforms nest: ``hessian`` is ``jacfwd`` of
``jacrev``. A whole Jacobian is one walk: the basis rides as one extra
leading index through every pattern.

Arguments and results may be pytrees (:mod:`einsumgrad.pytree`: nested
``dict`` / ``list`` / ``tuple`` of arrays or Tensors, as JAX reads them): each
leaf is one traced input, and results keep the structure, so ``grad`` of a
list of arrays is a list of gradients, never one stacked array. Keyword
arguments of ``f`` pass through undifferentiated. With ``has_aux=True``, ``f``
returns ``(out, aux)`` and ``aux`` comes back beside the result, as JAX lays
it out.

Inside :func:`einsumgrad.vmap` a transform works on the physical tensors: its
inputs get every vmap level's examples' axis in front (broadcast where they
have none), ``f`` sees them as one example's (Batched), and the walks carry
those axes as per-sample axes (as ``batch_jacobian`` carries its batch), so
``vmap(grad(f))`` is per-example gradients in one pass.

A Jacobian's basis goes through ``f`` in passes of ``chunk_size`` rows; with
``chunk_size=None``, of as many rows as keep the basis and the derivatives it
carries within :data:`JACOBIAN_MEMORY_BUDGET` bytes, so a Jacobian that fits
in memory is computed, in passes if it must.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy

from .backends import backend_of
from .distributed.blocks import is_dask, on_blocks
from .plan import CACHE_SIZE, Bounded, jacobian_of
from .pytree import LEAF, TreeDef, flatten, tree_map, unflatten
from .rules import concatenate, einsum_p, identity_p, reshape, transpose
from .rules.shape import active_levels, bottom, lift, wrap
from .spec import Spec, letters
from . import tensor as _tape
from .tensor import (BatchMixingError, Tensor, as_tensor, backprop_values, bind, differentiable,
                     ones_like_data, push, state, toposort)

JACOBIAN_MEMORY_BUDGET: int = 256 * 2 ** 20
"""Bytes that one pass of a Jacobian's basis may take, with the cotangents
(or tangents) it carries through ``f``'s ops, when ``chunk_size=None``
(``jacrev``, ``jacfwd``, ``hessian``, ``batch_jacobian``, ``batch_hessian``).
The result itself comes on top. Set ``einsumgrad.transforms.JACOBIAN_MEMORY_BUDGET``
to change it; it is read at each call."""


def _start(p: Any) -> Tensor:
    """A fresh tensor standing for one primal; tied to ``p`` if an outer graph needs it."""
    if type(p) is numpy.ndarray and state.tracing == 1:  # no Tensor of p's own needed
        if p.dtype.kind != "f":
            differentiable(p.dtype)  # raises
        return Tensor(p)
    p = _float_tensor(p)
    if p.requires_grad or state.tracing > 1:
        x = bind(identity_p, p)
    else:
        x = Tensor(p.data)
    x.bdim = p.bdim
    return x


def _float_tensor(p: Any) -> Tensor:
    t = as_tensor(p)
    differentiable(t.dtype)
    return t


def _finish(t: Tensor) -> Tensor:
    """Cut a result from the trace when nothing outside needs its graph."""
    return t if state.tracing or t.requires_grad else t.detach()


def _finish_out(out: Any) -> Any:
    """:func:`_finish` on each leaf of a traced output."""
    return _finish(out) if isinstance(out, Tensor) else tree_map(_finish, out)


def _finish_aux(aux: Any) -> Any:
    """``aux`` as JAX returns it: its Tensors cut from the trace (unless an enclosing
    transform or ``requires_grad`` needs their graph), anything else as it is."""
    return tree_map(lambda a: _finish(a) if isinstance(a, Tensor) else a, aux)


def _basis(like: Tensor, shape: tuple, nb_shape: tuple = (), start: int = 0,
           rows: int | None = None) -> Tensor:
    """Rows ``start:start + rows`` (default: all) of the identity over ``shape``'s
    elements, shaped ``(rows,) + nb_shape + shape``, broadcast over ``nb_shape``."""
    xp = backend_of(like.data)
    n = math.prod(shape)
    rows = n if rows is None else rows
    e = xp.eye(rows, n, start, dtype=like.dtype).reshape((rows,) + (1,) * len(nb_shape) + shape)
    return Tensor(xp.broadcast_to(e, (rows,) + nb_shape + shape) if nb_shape else e)


def _zeros(like: Tensor, shape: tuple) -> Tensor:
    return Tensor(backend_of(like.data).zeros(shape, dtype=like.dtype))


def _move_axis0(t: Tensor, to: int) -> Tensor:
    """Move axis 0 to position ``to``: an einsum (nothing to do for ``to=0``)."""
    if to == 0:
        return t
    ls = letters(t.ndim)
    return bind(einsum_p, t, spec=Spec((ls,), ls[1:to + 1] + ls[:1] + ls[to + 1:]))


def _argnums(argnums, n: int) -> tuple:
    key = (argnums, n) if type(argnums) in (int, tuple) else None
    try:
        nums = _checked_argnums.get(key) if key is not None else None
    except TypeError:  # an unhashable entry: checked below, which names it
        key = nums = None
    if nums is not None:
        return nums
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums {a} out of range for {n} argument(s)")
    nums = tuple(a % n for a in nums)
    if key is not None:
        _checked_argnums[key] = nums
    return nums


_checked_argnums = Bounded(CACHE_SIZE)  # (argnums, number of arguments) -> checked positions


def _per_arg(trees: Sequence[TreeDef], flat: Sequence, argnums) -> Any:
    """Results for the leaves of each differentiated argument, in each one's structure:
    that argument's tree for an int ``argnums``, a tuple of them for a tuple."""
    for t in trees:
        if t is not LEAF:
            break
    else:  # Tensors, no structure: the common case
        return flat[0] if isinstance(argnums, int) else tuple(flat)
    res, k = [], 0
    for t in trees:
        res.append(unflatten(t, flat[k:k + t.num_leaves]))
        k += t.num_leaves
    return res[0] if isinstance(argnums, int) else tuple(res)


def _trace(f: Callable, args: Sequence, nums: tuple, kwargs: dict, has_aux: bool = False,
           batch: bool = False, bdims: Sequence | None = None) -> tuple:
    """Run ``f`` recording every op, with a fresh tensor for each leaf of ``args[i]``, ``i`` in ``nums``.

    With ``batch`` each op's batch rule tracks a batch axis: axis 0 of each
    traced leaf, or ``bdims[j]`` of those of argument ``nums[j]`` (None: not tracked).

    While ``f`` runs those tensors are the inputs being traced
    (``state.inputs``): turning anything that depends on them into NumPy
    values raises, and so does changing them in place.

    Returns:
        ``(xs, trees, out, aux)``: the fresh tensors (argument by argument, each
        one's leaves in order), each argument's structure, ``f``'s output with
        every leaf a Tensor, and ``aux`` (None without ``has_aux``).
    """
    # inside vmap: xs and out are physical, the levels' axes first (no vmap anywhere: none)
    lv = active_levels() if _tape.BATCHING else ()
    st = state  # recording every op while f runs (and tracking batch axes for batch_jacobian)
    prev = st.grad
    st.grad = True
    st.tracing += 1
    st.batch += batch
    try:
        args = list(args)
        xs, trees = [], []
        for j, i in enumerate(nums):
            a = args[i]
            if not lv and not (type(a) is list or a is None or isinstance(a, (tuple, dict))):
                fresh, tree = [_start(a)], LEAF  # the common case: a leaf, no structure to walk
                args[i] = fresh[0]
            else:
                leaves, tree = flatten(a)
                fresh = [_start(_physical(p, lv)) for p in leaves]
                args[i] = unflatten(tree, [wrap(x, lv) for x in fresh])
            if batch:
                for x in fresh:
                    b = 0 if bdims is None else bdims[j]
                    x.bdim = None if b is None else b + len(lv)
            xs += fresh
            trees.append(tree)
        inputs = st.inputs
        traced = dict(inputs)
        for x in xs:
            traced[id(x)] = x
        st.inputs = traced
        try:
            out = f(*args, **kwargs)
        finally:
            st.inputs = inputs
        aux = None
        if has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(f"has_aux=True: f must return a pair (out, aux), got "
                                f"{type(out).__name__}")
            out, aux = out
        out = out if isinstance(out, Tensor) else tree_map(as_tensor, out)
        if lv:  # recorded here, so an output broadcast along a level still reaches xs
            out = tree_map(lambda o: _physical(o, lv), out)
    finally:
        st.tracing -= 1
        st.batch -= batch
        st.grad = prev
    if has_aux:
        aux = _finish_aux(aux)
    return xs, trees, out, aux


def _physical(p: Any, lv: tuple) -> Tensor:
    """``p`` with an axis in front for each vmap level in ``lv`` (a plain Tensor)."""
    return bottom(lift(as_tensor(p), lv)) if lv else p


def _examples(lv: tuple) -> tuple:
    """The shape of the examples' axes of the vmap levels ``lv``."""
    return tuple(size for _, size in lv)


def _wrap_out(out: Any, lv: tuple) -> Any:
    """Physical outputs seen as one example's again (Batched at each level)."""
    if not lv:
        return out
    return wrap(out, lv) if isinstance(out, Tensor) else tree_map(lambda o: wrap(o, lv), out)


def _mapped_cotangents(given: Any, likes: Sequence[Tensor], tree: TreeDef, lv: tuple,
                       what: str, lead_ok: bool) -> tuple:
    """Inside vmap: cotangents (or tangents) given for one example, with the structure
    ``tree``, as physical Tensors for the physical ``likes``: any extra leading axes
    (many VJPs at once) first, then the levels' axes. Returns ``(tensors, extra)``."""
    leaves = [given]
    if tree is not LEAF:
        leaves, t = flatten(given)
        if t != tree:
            raise ValueError(f"{what} has structure {t}, expected {tree}")
    k, gs, lead = len(lv), [], None
    for g, x in zip(leaves, likes):
        p = bottom(lift(as_tensor(g, like=x), lv))
        m = p.ndim - x.ndim
        if m < 0 or p.shape[:k] + p.shape[k + m:] != x.shape or (m and not lead_ok) or \
                lead not in (None, p.shape[k:k + m]):
            raise ValueError(f"{what} shape {p.shape[k:]} does not match {x.shape[k:]}")
        lead = p.shape[k:k + m]
        if m:
            p = transpose(p, tuple(range(k, k + m)) + tuple(range(k)) + tuple(range(k + m, p.ndim)))
        gs.append(p)
    return gs, len(lead or ())


def trace_call(f: Callable, args: Sequence, nums: tuple, batch: bool = False,
               bdims: Sequence | None = None):
    """Run ``f`` recording every op, with fresh tensors at ``nums``; returns ``(xs, out)``.

    ``xs`` holds every leaf of the traced arguments, flat; ``out`` is ``f``'s
    output with Tensor leaves. See :func:`_trace` for ``batch`` and ``bdims``.
    """
    xs, _, out, _ = _trace(f, args, nums, {}, batch=batch, bdims=bdims)
    return xs, out


def _cotangents(given: Any, likes: Sequence[Tensor], tree: TreeDef, what: str,
                lead_ok: bool) -> list:
    """``given`` (a cotangent or tangent with the structure ``tree``) as Tensors shaped like ``likes``.

    Where ``tree`` is a single leaf, ``given`` is that leaf as it is (an
    array-like: a list of numbers is read as an array there). With
    ``lead_ok`` every leaf may carry the same extra leading axes.
    """
    if tree is LEAF:
        leaves = [given]
    else:
        leaves, t = flatten(given)
        if t != tree:
            raise ValueError(f"{what} has structure {t}, expected {tree}")
    gs = [as_tensor(g, like=x) for g, x in zip(leaves, likes)]
    lead = gs[0].shape[:gs[0].ndim - likes[0].ndim] if gs else ()
    for g, x in zip(gs, likes):
        nb = g.ndim - x.ndim
        if nb < 0 or g.shape[nb:] != x.shape or g.shape[:nb] != lead or (nb and not lead_ok):
            raise ValueError(f"{what} shape {g.shape} does not match {x.shape}")
    return gs


# -- the two foundations ----------------------------------------------------------

def vjp(f: Callable, *primals, has_aux: bool = False, **kwargs) -> tuple:
    """Reverse mode: ``(out, vjp_fn)``, with ``vjp_fn(cotangent)`` a tuple, one per primal.

    ``vjp_fn(g)[k][j...] = sum_i g[i...] d out[i...] / d primal_k[j...]``.
    Primals and the output may be pytrees: the cotangent has the output's
    structure, each entry of the result its primal's. A cotangent may carry
    extra leading axes (then so does each result): many VJPs in one pass.

    Args:
        f: takes the primals (and ``kwargs``, passed through undifferentiated).
        has_aux: ``f`` returns ``(out, aux)``; the result is then ``(out, vjp_fn, aux)``.
    """
    xs, trees, out, aux = _trace(f, primals, tuple(range(len(primals))), kwargs, has_aux)
    lv = active_levels()
    outs, out_tree = flatten(out)

    def vjp_fn(cotangent) -> tuple:
        if not lv:
            gs = _cotangents(cotangent, outs, out_tree, "vjp: cotangent", lead_ok=True)
            return _per_arg(trees, _pull(outs, gs, xs, finish=True), ())
        gs, m = _mapped_cotangents(cotangent, outs, out_tree, lv, "vjp: cotangent", True)
        k = len(lv)  # each result: the extra axes first, then the levels' axes: swap them
        rs = [transpose(r, tuple(range(m, m + k)) + tuple(range(m)) + tuple(range(m + k, r.ndim)))
              for r in _pull(outs, gs, xs)]
        return _per_arg(trees, [_finish(wrap(r, lv)) for r in rs], ())
    res = (_finish_out(_wrap_out(out, lv)), vjp_fn)
    return res + (aux,) if has_aux else res


def _pull(outs: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor],
          finish: bool = False) -> list:
    """Cotangents of ``xs`` (zeros where no output depends on them); with ``finish``,
    each through :func:`_finish` (outside vmap: its levels would come first)."""
    got = {}
    for t, c in backprop_values(outs, gs, xs):
        got[id(t)] = c
    res = []
    for x in xs:
        c = got.get(id(x))
        if c is None:
            lead = gs[0].shape[:gs[0].ndim - outs[0].ndim] if gs else ()
            c = _zeros(gs[0] if gs else x, lead + x.shape)
        elif not isinstance(c, Tensor):  # an array of the pass's own: a Tensor cut already
            res.append(Tensor(c))
            continue
        res.append(_finish(c) if finish else c)
    return res


def jvp(f: Callable, primals: Sequence, tangents: Sequence, has_aux: bool = False,
        **kwargs) -> tuple:
    """Forward mode: ``(out, tangent_out)``, tangents pushed through each JVP rule.

    ``primals`` and ``tangents`` are tuples of pytrees of one structure; the
    output tangent has the output's structure.

    Args:
        f: takes the primals (and ``kwargs``, passed through undifferentiated).
        has_aux: ``f`` returns ``(out, aux)``; the result is then ``(out, tangent_out, aux)``.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    xs, trees, out, aux = _trace(f, primals, tuple(range(len(primals))), kwargs, has_aux)
    lv = active_levels()
    ts, k = [], 0
    for tree, t in zip(trees, tangents):
        likes = xs[k:k + tree.num_leaves]
        ts += (_mapped_cotangents(t, likes, tree, lv, "jvp: tangent", False)[0] if lv else
               _cotangents(t, likes, tree, "jvp: tangent", lead_ok=False))
        k += tree.num_leaves
    outs, out_tree = flatten(out)
    # push walks from one root: an output of several leaves is one walk each
    res = (_finish_out(_wrap_out(out, lv)),
           unflatten(out_tree, [_finish(wrap(_push(o, xs, ts), lv)) for o in outs]))
    return res + (aux,) if has_aux else res


def _push(out: Tensor, xs: Sequence[Tensor], ts: Sequence[Tensor]) -> Tensor:
    """The tangent of ``out`` (zeros where it does not depend on ``xs``)."""
    r = push(out, xs, ts) if ts else None
    if r is not None:
        return r
    lead = ts[0].shape[:ts[0].ndim - xs[0].ndim] if ts else ()
    return _zeros(ts[0] if ts else out, lead + out.shape)


# -- gradients -------------------------------------------------------------------------

def value_and_grad(f: Callable, argnums=0, has_aux: bool = False) -> Callable:
    """``(f(*args), gradient)`` of a scalar ``f``; a tuple of gradients for tuple ``argnums``.

    Each gradient has its argument's structure (a pytree of arrays gives the
    same pytree of gradients). Keyword arguments pass through to ``f``
    undifferentiated. With ``has_aux``, ``f`` returns ``(value, aux)`` and the
    result is ``((value, aux), gradient)``.
    """
    def wrapped(*args, **kwargs):
        nums = _argnums(argnums, len(args))
        xs, trees, out, aux = _trace(f, args, nums, kwargs, has_aux)
        # inside vmap: a scalar per example, its gradient per example
        lv = active_levels() if _tape.BATCHING else ()
        if not isinstance(out, Tensor):
            raise TypeError(f"grad needs f to return one scalar, got {flatten(out)[1]}; "
                            f"with has_aux=True f returns (scalar, aux)")
        if out.size != (math.prod(_examples(lv)) if lv else 1):
            raise ValueError(f"grad needs a scalar output, got shape {out.shape[len(lv):]}; "
                             f"use jacrev, or vjp with a cotangent")
        ones = Tensor(ones_like_data(out.data))
        if lv:
            g = _per_arg(trees, [_finish(wrap(g, lv)) for g in _pull([out], [ones], xs)], argnums)
        else:
            g = _per_arg(trees, _pull([out], [ones], xs, finish=True), argnums)
        out = _finish(wrap(out, lv) if lv else out)
        return ((out, aux) if has_aux else out), g
    return wrapped


def grad(f: Callable, argnums=0, has_aux: bool = False) -> Callable:
    """The gradient of a scalar ``f`` with respect to ``args[argnums]`` (its structure kept).

    With ``has_aux``, ``f`` returns ``(value, aux)`` and the result is ``(gradient, aux)``.
    """
    vg = value_and_grad(f, argnums, has_aux)
    if has_aux:
        def with_aux(*args, **kwargs):
            (_, aux), g = vg(*args, **kwargs)
            return g, aux
        return with_aux
    return lambda *args, **kwargs: vg(*args, **kwargs)[1]


def elementwise_grad(f: Callable, argnums=0) -> Callable:
    """For element-wise ``f``: the diagonal of its Jacobian, in one reverse pass.

    It is the gradient of ``sum(f)``, which equals the diagonal exactly when each
    output element depends on the matching input element only (broadcast inputs
    get the sum over the broadcast axes, as a meshgrid's partials are). That is
    proved while ``f`` runs: each axis of the arguments (lined up from the
    right, as broadcasting lines them up) is tracked as a batch axis in turn,
    and every op's batch rule checks that it keeps those slices apart. Axis 0
    is tracked while tracing for the gradient; each further axis costs one
    more forward pass of ``f``. The differentiated arguments are arrays (a
    list of numbers is read as one, as NumPy reads it); keyword arguments
    pass through to ``f``.

    Raises:
        BatchMixingError: ``f`` mixes elements (names the op).
    """
    def wrapped(*args, **kwargs):
        if is_dask(args):  # dask arrays: this transform on each block (distributed/)
            return on_blocks(wrapped, argnums, None)(*args, **kwargs)
        nums = _argnums(argnums, len(args))
        args = list(args)
        for i in nums:
            args[i] = as_tensor(args[i])
        ranks = [args[i].ndim for i in nums]
        rank = max(ranks)
        for axis in range(1, rank):
            _, _, out, _ = _trace(f, args, nums, kwargs, batch=True,
                                  bdims=[_lined_up(axis, r, rank) for r in ranks])
            _check_elementwise(out, axis, rank)
        xs, _, out, _ = _trace(f, args, nums, kwargs, batch=rank > 0,
                               bdims=[_lined_up(0, r, rank) for r in ranks])
        if rank:
            _check_elementwise(out, 0, rank)
        lv = active_levels()
        gs = [_finish(wrap(g, lv))
              for g in _pull([out], [Tensor(ones_like_data(out.data))], xs)]
        return gs[0] if isinstance(argnums, int) else tuple(gs)
    return wrapped


def _lined_up(axis: int, ndim: int, rank: int):
    """Axis ``axis`` of the broadcast shape (rank ``rank``) in an argument of rank ``ndim``."""
    a = axis - (rank - ndim)
    return a if a >= 0 else None


def _check_elementwise(out, axis: int, rank: int) -> None:
    if not isinstance(out, Tensor):
        raise TypeError("elementwise_grad: f must return one Tensor")
    want = out.ndim - rank + axis
    if out.bdim is not None and out.bdim != want:
        raise BatchMixingError(f"elementwise_grad: f moves the arguments' axis {axis} to "
                               f"axis {out.bdim} of its output: not element-wise")


# -- Jacobians and Hessians ----------------------------------------------------------

def _single_einsum(out: Tensor, x: Tensor):
    """If ``out`` is one einsum with ``x`` as one operand and nothing else traced, its slot."""
    node = out.node
    if state.tracing or node is None or node.prim is not einsum_p:
        return None
    slots = [k for k, t in enumerate(node.inputs) if t is x]
    if len(slots) != 1 or any(t.node is not None for t in node.inputs):
        return None
    return slots[0]


def _materialized(out: Tensor, x: Tensor) -> Tensor | None:
    """``J`` built by the derivation layer when ``out`` is one einsum of ``x``."""
    k = _single_einsum(out, x)
    if k is None:
        return None
    node = out.node
    return Tensor(jacobian_of(node.params["spec"], k, [t.data for t in node.inputs]))


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _path_elements(outs: Sequence[Tensor], xs: Sequence[Tensor]) -> int:
    """Elements of every tensor from ``xs`` to ``outs`` (both included): each carries
    one cotangent (or tangent) row per basis row through a pass."""
    on = {id(x) for x in xs}
    total = sum(x.size for x in xs)
    for t in toposort(outs, _always, set(on)):  # inputs first: a tensor's inputs are settled
        node = t.node
        if node is not None and id(t) not in on:
            for i in node.inputs:
                if id(i) in on:
                    on.add(id(t))
                    total += t.size
                    break
    return total


def _always(t: Tensor) -> bool:
    return True


class _Block:
    """One Jacobian block ``nb + fo + fi`` (output leaf by input leaf), gathered pass by pass.

    Reverse mode hands it rows ``(k, *nb, *fi)`` (output features ``a:b``),
    forward mode columns ``(k, *nb, *fo)`` (input features ``a:b``). Where
    the result must stay differentiable, or comes in one pass, the parts are
    joined with the engine's ops; otherwise each is written into the result
    (``into``, a contiguous backend array, where the caller has one) as it
    comes, so no more than one pass's part is held beside it.
    """

    def __init__(self, o: Tensor, x: Tensor, nb: tuple, forward: bool, passes: int, keep: bool,
                 into=None):
        self.fo, self.fi = o.shape[len(nb):], x.shape[len(nb):]
        self.nb, self.forward = nb, forward
        self.parts = [] if keep or (passes == 1 and into is None) else None
        self.buf = into

    def add(self, part: Tensor, a: int, b: int) -> None:
        if self.parts is not None:
            self.parts.append(part)
            return
        nb, n_o, n_x = self.nb, math.prod(self.fo), math.prod(self.fi)
        if self.buf is None:
            self.buf = backend_of(part.data).empty(nb + self.fo + self.fi, dtype=part.dtype)
        view = self.buf.reshape(nb + (n_o, n_x))  # a view: the buffer is contiguous
        m = len(nb)
        if self.forward:  # (k, *nb, n_o) -> (*nb, n_o, k)
            p = part.data.reshape((b - a,) + nb + (n_o,)).transpose(tuple(range(1, m + 2)) + (0,))
            view[..., a:b] = p
        else:             # (k, *nb, n_x) -> (*nb, k, n_x)
            p = part.data.reshape((b - a,) + nb + (n_x,))
            view[..., a:b, :] = p.transpose(tuple(range(1, m + 1)) + (0, m + 1))

    def result(self) -> Tensor:
        if self.parts is None:
            return Tensor(self.buf)
        t = self.parts[0] if len(self.parts) == 1 else concatenate(self.parts, axis=0)
        t = _move_axis0(t, t.ndim - 1 if self.forward else len(self.nb))
        return _finish(reshape(t, self.nb + self.fo + self.fi))


def _blocks(outs: Sequence[Tensor], xs: Sequence[Tensor], forward: bool, nb: tuple = (),
            chunk_size: int | None = None, into: list | None = None) -> list:
    """The Jacobian of each output leaf by each input leaf: ``J[i][j]``.

    Each block has shape ``nb + fo_i + fi_j``, ``fo`` and ``fi`` the leaves'
    shapes past the ``nb`` leading (per-sample) axes, which the basis is
    broadcast over. Reverse mode pulls the identity over each output leaf's
    features back to every input leaf at once; forward mode pushes the
    identity over each input leaf's features (``push`` walks from one root:
    an output of several leaves is one walk each). Either goes
    ``chunk_size`` basis rows at a time; with None, as many as keep a pass
    within :data:`JACOBIAN_MEMORY_BUDGET`, or all where the result must stay
    differentiable (an enclosing transform's recorded graph keeps every
    pass anyway). ``into[i][j]``: where to write block ``(i, j)``, if not kept.
    """
    if not nb and len(outs) == 1:
        fast = [_materialized(outs[0], x) for x in xs]
        if all(J is not None for J in fast):
            return [fast]
    keep = bool(state.tracing) or any(t.requires_grad for t in (*outs, *xs))
    path = None

    def rows(n: int) -> int:
        nonlocal path
        if chunk_size is not None:
            return min(chunk_size, n) or 1
        if keep or n <= 1:
            return n or 1
        if path is None:
            path = _path_elements(outs, xs)
        itemsize = max(t.dtype.itemsize for t in (*outs, *xs))
        # the basis row, and each tensor's cotangent (or tangent) with room for one
        # rule's temporaries beside it
        return max(1, min(n, JACOBIAN_MEMORY_BUDGET // (itemsize * (n + 2 * path))))

    J = [[None] * len(xs) for _ in outs]
    if forward:
        for j, x in enumerate(xs):
            fi = x.shape[len(nb):]
            n = math.prod(fi)
            k = rows(n)
            parts = [_Block(o, x, nb, True, -(-n // k), keep, into and into[i][j])
                     for i, o in enumerate(outs)]
            for a in range(0, n, k) if n else [0]:  # an empty basis still gives the shapes
                e = _basis(x, fi, nb, a, min(k, n - a))
                for i, o in enumerate(outs):
                    parts[i].add(_push(o, [x], [e]), a, a + e.shape[0])
            for i in range(len(outs)):
                J[i][j] = parts[i].result()
    else:
        for i, o in enumerate(outs):
            fo = o.shape[len(nb):]
            n = math.prod(fo)
            k = rows(n)
            parts = [_Block(o, x, nb, False, -(-n // k), keep, into and into[i][j])
                     for j, x in enumerate(xs)]
            for a in range(0, n, k) if n else [0]:
                e = _basis(o, fo, nb, a, min(k, n - a))
                for j, g in enumerate(_pull([o], [e], xs)):
                    parts[j].add(g, a, a + e.shape[0])
            J[i] = [p.result() for p in parts]
    return J


def _jacobian(f: Callable, argnums, has_aux: bool, chunk_size, forward: bool) -> Callable:
    """Trace ``f``; the Jacobian of each output leaf by each differentiated argument.

    The result has the output's structure, each leaf replaced by the
    arguments' (one argument's structure for an int ``argnums``, a tuple of
    them for a tuple), as JAX lays it out; so ``hessian`` with tuple
    ``argnums`` gives the blocks ``H[i][j]``, as ``torch.func`` does.
    """
    _check_chunk_size(chunk_size)

    def wrapped(*args, **kwargs):
        nums = _argnums(argnums, len(args))
        xs, trees, out, aux = _trace(f, args, nums, kwargs, has_aux)
        lv = active_levels()  # inside vmap: one Jacobian per example, the basis broadcast
        outs, out_tree = flatten(out)
        J = _blocks(outs, xs, forward, _examples(lv), chunk_size=chunk_size)
        res = unflatten(out_tree, [_per_arg(trees, [wrap(b, lv) for b in row], argnums)
                                   for row in J])
        return (res, aux) if has_aux else res
    return wrapped


def jacrev(f: Callable, argnums=0, has_aux: bool = False, *,
           chunk_size: int | None = None) -> Callable:
    """Full Jacobian ``out.shape + arg.shape`` by reverse mode, in one batched pass.

    The cotangent is the identity basis over the output, carried as one extra
    leading index through every VJP pattern, so all ``out.size`` rows come out
    of one backward walk. When ``f`` is a single einsum of the argument, ``J``
    is built directly by the derivation layer (``jacobian_of``) instead.

    Args:
        f: takes Tensors (pytrees of them), returns a Tensor or a pytree of
            them; keyword arguments pass through undifferentiated.
        argnums: which argument(s): an int, or a tuple (then a tuple of Jacobians).
        has_aux: ``f`` returns ``(out, aux)``; the result is then ``(J, aux)``.
        chunk_size: at most this many basis rows (output elements) per
            backward walk, the same result in ``ceil(out.size / chunk_size)``
            walks. None: as many as keep one walk within
            :data:`JACOBIAN_MEMORY_BUDGET` (all, where the result must stay
            differentiable: inside another transform, or an input requires grad).

    Returns:
        For each output leaf, the arguments' structure with Jacobian leaves
        ``out_leaf.shape + arg_leaf.shape``.
    """
    return _jacobian(f, argnums, has_aux, chunk_size, forward=False)


def jacfwd(f: Callable, argnums=0, has_aux: bool = False, *,
           chunk_size: int | None = None) -> Callable:
    """Full Jacobian ``out.shape + arg.shape`` by forward mode, in one batched pass.

    The tangent is the identity basis over the argument, one extra leading
    index pushed through every JVP rule: cheaper than :func:`jacrev` when the
    argument is smaller than the output. Arguments as for :func:`jacrev`;
    ``chunk_size`` counts the argument's elements per forward walk.
    """
    return _jacobian(f, argnums, has_aux, chunk_size, forward=True)


def hessian(f: Callable, argnums=0, has_aux: bool = False, *,
            chunk_size: int | None = None) -> Callable:
    """Hessian ``out.shape + arg.shape + arg.shape``: forward over reverse.

    With tuple ``argnums`` the result is the blocks ``H[i][j]`` (derivative by
    argument ``j`` of the gradient by argument ``i``), as ``torch.func.hessian``;
    pytree arguments nest as JAX's (output, argument, argument). ``has_aux``
    and ``chunk_size`` as for :func:`jacrev` (the basis of both passes).
    """
    inner = jacrev(f, argnums, has_aux, chunk_size=chunk_size)
    return jacfwd(inner, argnums, has_aux, chunk_size=chunk_size)


def hvp(f: Callable) -> Callable:
    """Hessian-vector product ``H(x) v`` of a scalar ``f``, without building ``H``.

    Forward over reverse: the JVP of ``grad(f)`` at ``x`` along ``v``, about
    the cost of two gradients. ``x`` and ``v`` may be pytrees of one
    structure; keyword arguments pass through to ``f``.
    """
    return lambda x, v, **kwargs: jvp(grad(f), (x,), (v,), **kwargs)[1]


def directional(f: Callable, order: int = 1) -> Callable:
    """``d^n/dt^n f(x + t v)`` at ``t = 0``: nested forward mode, no Hessian built.

    Each order nests one more :func:`jvp`, so order ``n`` costs about ``2^n``
    forward passes and no derivative tensor larger than ``f``'s output. For a
    row-wise ``f``, ``directional(f, 2)(x, x)[b, j] ==
    einsum('bi,bjik,bk->bj', x, H, x)`` with ``H = batch_hessian(f)(x)`` of
    shape ``(B, out, in, in)``: seed 000's contraction, H never built.

    Args:
        f: takes one Tensor (keyword arguments pass through), returns a Tensor.
        order: the derivative's order, at least 1.
    """
    if order < 1:
        raise ValueError("directional: order must be at least 1")

    def wrapped(x, v, **kwargs):
        if is_dask((x, v)):  # blocks of rows, once batch_jacobian(f) proves f keeps them apart
            rows_apart = lambda x, v, **kw: batch_jacobian(f)(x, **kw)  # noqa: E731
            return on_blocks(wrapped, (0, 1), 1, check=rows_apart)(x, v, **kwargs)
        g = lambda y: f(y, **kwargs)
        for _ in range(order):
            g = (lambda h: lambda y: jvp(h, (y,), (v,))[1])(g)
        return g(x)
    return wrapped


# -- per-sample derivatives ----------------------------------------------------------

_ALL_ROWS = 1 << 62  # a chunk_size for _blocks: the whole basis in one pass

FIRST_PASS_ROWS = 16384
"""With ``chunk_size=None``, ``batch_jacobian`` traces at most this many batch rows
in its first pass, and measures there what a row costs against
:data:`JACOBIAN_MEMORY_BUDGET`; later passes take as many rows as fit."""


def batch_jacobian(f: Callable, argnums=0, batch_ndim: int = 1, *,
                   chunk_size: int | None = None) -> Callable:
    """Per-sample Jacobian ``(B,) + out.shape[1:] + x.shape[1:]`` of a row-wise ``f``.

    The batch axis stays one free index through every pattern: the basis covers
    one sample's features and is broadcast over ``B``, so no ``B x B`` block is
    ever built. Forward mode (one push of ``prod(fin)`` tangents) when a
    sample has no more inputs than outputs, else reverse mode (one pull of
    ``prod(fout)`` cotangents). While ``f`` runs, each op's batch rule checks
    that it keeps rows apart, so a mixing ``f`` is an error, never a silently
    summed answer.

    Args:
        f: maps ``x`` of shape ``(B, *fin)`` to ``(B, *fout)``, row ``b`` of the
            output depending on row ``b`` of ``x`` alone. Parameters without a
            batch axis (closed over, broadcast, or passed as arguments not in
            ``argnums``: those are constants, their axis 0 no batch axis) are
            fine; keyword arguments pass through.
        argnums: which argument(s) carry the batch: an int, or a tuple (then a
            tuple of Jacobians). An argument may be a pytree: each leaf has the
            batch axes first, and the result keeps the structure; an output
            pytree gives, for each output leaf, the arguments' structure.
        batch_ndim: how many leading axes of ``x`` are batch axes. With
            ``batch_ndim=2`` and ``x`` of shape ``(B, N, 3)`` (seed 002's
            point clouds) ``f`` is called on the points flattened to
            ``(B * N, 3)`` and the result is ``(B, N) + fout + fin``; every
            point is checked to stay apart from every other, across ``B``
            and ``N`` alike.
        chunk_size: unlike :func:`jacrev`'s, counts batch rows (samples, after
            flattening ``batch_ndim`` axes): at most this many go through
            ``f`` at once, each with the whole per-sample basis (rows are
            independent, so this changes no number). ``None`` (the default)
            traces at most :data:`FIRST_PASS_ROWS` rows first, measures what
            a row costs, and then takes as many rows per pass as fit
            :data:`JACOBIAN_MEMORY_BUDGET`; where one sample alone does not
            fit, its basis goes in chunks as jacrev's. Inside another
            transform, or when an input requires grad, all rows go at once, so
            the result stays differentiable.

    Raises:
        BatchMixingError: ``f`` mixes batch rows (names the op).
    """
    _check_chunk_size(chunk_size)

    def wrapped(*args, **kwargs):
        if is_dask(args):  # dask arrays: this transform on each block of rows (distributed/)
            return on_blocks(wrapped, argnums, batch_ndim)(*args, **kwargs)
        nums = _argnums(argnums, len(args))
        trees, leaves = [], []
        for i in nums:
            ls, tree = flatten(args[i])
            trees.append(tree)
            leaves += [_float_tensor(p) for p in ls]
        lead = leaves[0].shape[:batch_ndim] if leaves else ()
        for x in leaves:
            if x.ndim < batch_ndim:
                raise ValueError(f"batch_jacobian: x of shape {x.shape} has fewer than "
                                 f"batch_ndim={batch_ndim} axes")
            if x.shape[:batch_ndim] != lead:
                raise ValueError(f"batch_jacobian: the batch axes of the arguments differ: "
                                 f"{lead} and {x.shape[:batch_ndim]}")
        B = math.prod(lead)
        if batch_ndim != 1:
            leaves = [reshape(x, (B,) + x.shape[batch_ndim:]) for x in leaves]

        def run(rows: list) -> tuple:
            """Trace ``f`` on these rows of the batched leaves; checks its outputs."""
            call, k = list(args), 0
            for i, tree in zip(nums, trees):
                call[i] = unflatten(tree, rows[k:k + tree.num_leaves])
                k += tree.num_leaves
            xs, _, out, _ = _trace(f, call, nums, kwargs, batch=True)
            outs, out_tree = flatten(out)
            size = rows[0].shape[0] if rows else 0
            for o in outs:  # inside vmap, past the levels' axes (nlv of them)
                if o.ndim == nlv or o.shape[nlv] != size:
                    raise BatchMixingError(f"batch_jacobian: f's output {o.shape[nlv:]} does not "
                                           f"keep the batch axis of size {size} first")
                if o.bdim not in (nlv, None):
                    raise BatchMixingError(f"batch_jacobian: f moved the batch axis to "
                                           f"{o.bdim - nlv}")
            return xs, outs, out_tree

        lv = active_levels()
        nlv = len(lv)
        if state.tracing or any(x.requires_grad for x in leaves) or lv:
            xs, outs, out_tree = run(leaves)   # all rows at once: the result stays differentiable
            J = _per_sample(outs, xs, lead=_examples(lv))
            J = [[wrap(b, lv) for b in row] for row in J]
        else:
            J, out_tree = _in_row_chunks(run, leaves, B, chunk_size)
        if batch_ndim != 1:
            J = [[reshape(b, lead + b.shape[1:]) for b in row] for row in J]
        J = [[_finish(b) for b in row] for row in J]
        return unflatten(out_tree, [_per_arg(trees, row, argnums) for row in J])
    return wrapped


def _forward(outs: Sequence[Tensor], xs: Sequence[Tensor], nb: int = 1) -> tuple:
    """``(forward, n)``: forward mode when a sample has no more input features than
    output features, and the most basis rows a pass takes then (one leaf's features);
    a sample's features follow ``nb`` leading axes."""
    fin = [math.prod(x.shape[nb:]) for x in xs]
    fout = [math.prod(o.shape[nb:]) for o in outs]
    forward = sum(fin) <= sum(fout)
    return forward, max(fin if forward else fout, default=1)


def _per_sample(outs: Sequence[Tensor], xs: Sequence[Tensor], into: list | None = None,
                chunk_size: int | None = None, lead: tuple = ()) -> list:
    """Per-sample Jacobian blocks ``J[i][j]``, the basis as :func:`_blocks` takes it;
    ``lead``: axes before the batch axis that are per-sample too (vmap's examples)."""
    nb = lead + (xs[0].shape[len(lead)] if xs else 0,)
    return _blocks(outs, xs, _forward(outs, xs, len(nb))[0], nb, chunk_size, into)


def _rows_that_fit(outs: Sequence[Tensor], xs: Sequence[Tensor], size: int) -> int:
    """How many batch rows one pass of the whole per-sample basis may take within the
    budget, from a trace of ``size`` rows (0: not even one)."""
    n = _forward(outs, xs)[1]                            # basis rows per sample
    per_row = _path_elements(outs, xs) / max(size, 1)   # a row's tensors
    itemsize = max(t.dtype.itemsize for t in (*outs, *xs))
    room = JACOBIAN_MEMORY_BUDGET / itemsize - n * n     # less the basis
    # each tensor's cotangent (or tangent) per basis row, twice as in _blocks, and its value
    return max(0, int(room // ((2 * n + 1) * per_row or 1)))


def _in_row_chunks(run: Callable, leaves: list, B: int, chunk_size: int | None) -> tuple:
    """The per-sample blocks over all ``B`` rows, ``run`` on a chunk of rows at a time.

    Each chunk's blocks are written into the result as they come; where they
    carry a graph (closed-over parameters that require grad) they are joined
    with the engine's ``concatenate`` instead, so the result stays differentiable.
    """
    step = chunk_size or min(B, FIRST_PASS_ROWS)
    basis = None  # basis rows per pass within a chunk; None: _blocks picks by the budget
    r, measured, bufs, parts = 0, chunk_size is not None, None, None
    while True:
        size = min(step, B - r)
        rows = leaves if size == B else [Tensor(x.data[r:r + size]) for x in leaves]
        xs, outs, out_tree = run(rows)
        if not measured:  # rows are alike: what the first pass measures holds for all
            measured, fit = True, _rows_that_fit(outs, xs, size)
            step, basis = max(fit, 1), (_ALL_ROWS if fit else None)
            if step < size:  # more rows traced than one pass may take: trace fewer
                continue
        if parts is None and bufs is None:  # the first chunk decides how chunks are joined
            if size == B or any(o.requires_grad for o in outs):
                parts = [[[] for _ in xs] for _ in outs]
            else:
                xp = backend_of(outs[0].data) if outs else None
                bufs = [[xp.empty((B,) + o.shape[1:] + x.shape[1:],
                                  dtype=xp.result_type(o.dtype, x.dtype)) for x in xs]
                        for o in outs]
        if parts is not None:
            for prow, row in zip(parts, _per_sample(outs, xs, None, basis)):
                for p, b in zip(prow, row):
                    p.append(b)
        else:
            _per_sample(outs, xs, [[buf[r:r + size] for buf in row] for row in bufs], basis)
        r += size
        if r >= B:
            break
    if parts is not None:
        return [[p[0] if len(p) == 1 else concatenate(p, axis=0) for p in row]
                for row in parts], out_tree
    return [[Tensor(buf) for buf in row] for row in bufs], out_tree


def batch_hessian(f: Callable, argnums=0, batch_ndim: int = 1, *,
                  chunk_size: int | None = None) -> Callable:
    """Per-sample Hessian ``(B,) + out.shape[1:] + x.shape[1:] * 2``: forward over reverse.

    ``batch_jacobian`` of ``batch_jacobian``; the arguments (``chunk_size``
    counting batch rows), the rule on ``f`` and the error are as there. With
    tuple ``argnums`` the result is the blocks ``H[i][j]``, as :func:`hessian`'s.
    """
    inner = batch_jacobian(f, argnums, chunk_size=None)
    return batch_jacobian(inner, argnums, batch_ndim, chunk_size=chunk_size)
