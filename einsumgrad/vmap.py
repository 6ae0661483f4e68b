"""``vmap``, and per-sample gradients and their norms without a loop.

:func:`vmap` is JAX's: ``f`` is written for one example and runs once on the
whole batch. Each mapped argument becomes a :class:`~einsumgrad.rules.shape.Batched`
tensor that shows ``f`` one example's shape; every primitive ``f`` applies runs
its batching rule (``Primitive.vmap``, beside its other rules) on the physical
tensors, so an einsum gains one index (``eg.trace`` of a vmapped function
prints the batched specs) and the tape records the batched ops. Transforms
nest either way round: inside ``vmap`` a transform works on the physical
tensors, the examples' axes riding in front as a Jacobian's basis does.

:func:`per_sample_grad` and :func:`per_sample_grad_norm` take ``f`` written for
the batch (it returns one value per example). ``f`` is traced once with the
batch axis tracked (``batch_jacobian``'s batch rules, so mixing examples
raises), and a reverse pass keeps the batch index where a parameter meets the
data: the einsum ``'bi,oi->bo'`` gives its weight ``'bo,bi->boi'`` instead of
``'bo,bi->oi'``. For the norms each parameter's pattern is contracted with
itself, ``'bo,bi,bo,bi->b'``, in the order opt_einsum finds cheapest.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy

from .backends import backend_of
from .derive import vjp_pattern
from .pytree import LEAF, TreeDef, flatten, unflatten
from .rules.einsum import einsum_p
from .rules.shape import getitem_p
from .rules.einsum import constant_like, einsum_spec, moveaxis, transpose
from .rules.shape import (Batched, _advanced, _as_tuple, active_levels, bind, broadcast,
                          pop_level, push_level, reshape)
from .spec import Spec, fresh, render
from .tensor import BatchMixingError, Tensor, as_tensor, no_grad, state, toposort

__all__ = ["vmap", "per_sample_grad", "per_sample_grad_norm"]


# -- vmap -------------------------------------------------------------------------------

def vmap(f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
    """``f`` mapped over an axis of its arguments, as ``jax.vmap``.

    Args:
        f: written for one example; takes and returns pytrees of Tensors.
        in_axes: which axis of each positional argument is mapped: an int
            (negative counts from the end), None (not mapped: the same value for
            every example), or a pytree prefix of the arguments (a tuple with one
            entry per argument, each a prefix of that argument's structure).
            Keyword arguments are mapped over axis 0, as JAX maps them.
        out_axes: where the mapped axis goes in each output leaf: an int, None
            (an output that does not depend on the mapped axis, returned once),
            or a pytree prefix of the output.

    Returns:
        A function taking the batched arguments and returning ``f``'s outputs
        with the mapped axis at ``out_axes`` (an output that does not depend on
        the mapped arguments is broadcast there).

    Raises:
        ValueError: no mapped argument, mapped axes of different sizes, an axis
            out of range, or ``out_axes=None`` for an output that is mapped.
        NotImplementedError: ``f`` applies an op that has no batching rule.
    """
    def wrapped(*args, **kwargs):
        if isinstance(in_axes, list):  # JAX reads a top-level list as the tuple
            axes_spec = tuple(in_axes)
        else:
            axes_spec = in_axes
        if isinstance(axes_spec, tuple) and len(axes_spec) != len(args):
            raise ValueError(f"vmap: in_axes has {len(axes_spec)} entries for {len(args)} "
                             f"positional arguments")
        leaves, tree = flatten((args, kwargs))
        axes = _prefix_axes((axes_spec, {k: 0 for k in kwargs}) if isinstance(axes_spec, tuple)
                            else (tuple(axes_spec for _ in args), {k: 0 for k in kwargs}),
                            (args, kwargs), "in_axes")
        mapped = [(as_tensor(x), a) for x, a in zip(leaves, axes) if a is not None]
        if not mapped:
            raise ValueError("vmap: no argument is mapped (every in_axes entry is None)")
        sizes = set()
        for x, a in mapped:
            if not -x.ndim <= a < x.ndim:
                raise ValueError(f"vmap: in_axes {a} is out of range for an argument of "
                                 f"shape {x.shape}")
            sizes.add(x.shape[a])
        if len(sizes) != 1:
            raise ValueError(f"vmap: the mapped axes have different sizes {sorted(sizes)}")
        size = sizes.pop()
        level = push_level(size)
        try:
            call = [x if a is None else Batched(_to_front(as_tensor(x), a), level)
                    for x, a in zip(leaves, axes)]
            cargs, ckwargs = unflatten(tree, call)
            out = f(*cargs, **ckwargs)
            outs, out_tree = flatten(out)
            oaxes = _prefix_axes(out_axes, out, "out_axes")
            res = [_unbatch(o, a, level, size) for o, a in zip(outs, oaxes)]
        finally:
            pop_level(level)
        return unflatten(out_tree, res)
    wrapped.__name__ = f"vmap({getattr(f, '__name__', 'f')})"
    wrapped.__doc__ = f.__doc__
    return wrapped


def _to_front(x: Tensor, axis: int) -> Tensor:
    a = axis % x.ndim
    return x if a == 0 else moveaxis(x, a, 0)


def _unbatch(o: Any, axis, level: int, size: int) -> Any:
    """One output leaf with the mapped axis at ``axis`` (broadcast there if unmapped)."""
    if type(o) is Batched and o.level > level:
        raise RuntimeError("vmap: f returned a batched tensor of a vmap inside it")
    mapped = type(o) is Batched and o.level == level
    if axis is None:
        if mapped:
            raise ValueError("vmap: out_axes is None for an output that depends on the mapped "
                             "arguments")
        return o
    p = o.phys if mapped else broadcast(as_tensor(o), size)
    if not -p.ndim <= axis < p.ndim:
        raise ValueError(f"vmap: out_axes {axis} is out of range for an output of "
                         f"{p.ndim - 1} axes")
    a = axis % p.ndim
    return p if a == 0 else moveaxis(p, 0, a)


def _prefix_axes(prefix: Any, tree: Any, what: str) -> list:
    """One axis per leaf of ``tree``: ``prefix`` (a pytree prefix of ``tree`` with int or
    None leaves) broadcast over the subtrees its leaves stand for."""
    if prefix is None or isinstance(prefix, (int, numpy.integer)) and not isinstance(prefix, bool):
        return [None if prefix is None else int(prefix)] * len(flatten(tree)[0])
    _, ptree = flatten(prefix)
    _, ttree = flatten(tree)
    out: list = []
    _match(prefix, ptree, tree, ttree, out, what)
    return out


def _match(prefix, ptree: TreeDef, tree, ttree: TreeDef, out: list, what: str) -> None:
    if ptree.kind is None or ptree.kind is type(None):  # a leaf (an axis) or None: the subtree
        if ptree.kind is None and (isinstance(prefix, bool) or
                                   not isinstance(prefix, (int, numpy.integer))):
            raise TypeError(f"vmap: {what} entries are ints or None, got {prefix!r}")
        out.extend([None if prefix is None else int(prefix)] * ttree.num_leaves)
        return
    if ptree.kind is not ttree.kind or ptree.keys != ttree.keys or \
            len(ptree.children) != len(ttree.children):
        raise ValueError(f"vmap: {what} structure {ptree} is not a prefix of the "
                         f"{'arguments' if what == 'in_axes' else 'output'}' {ttree}")
    pkids = [prefix[k] for k in ptree.keys] if ptree.keys is not None else list(prefix)
    tkids = [tree[k] for k in ttree.keys] if ttree.keys is not None else list(tree)
    for p, pt, t, tt in zip(pkids, ptree.children, tkids, ttree.children):
        _match(p, pt, t, tt, out, what)
