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

import contextlib
from typing import Any, Callable, Sequence

import numpy

from .backends import backend_of
from .distributed.blocks import is_dask, on_blocks
from .derive import vjp_pattern
from .plan import path_info
from .pytree import TreeDef, flatten, unflatten
from .rules.batch_norm import batch_norm_p
from .rules.convolution import patch_einsum_p
from .rules.einsum import broadcast_to, constant_like, einsum_p, einsum_spec, moveaxis, transpose
from .rules.elementwise import (add_bias_p, add_p, div_p, maximum_p, minimum_p, mul_p, pow_p,
                                remainder_p, sub_p, where_p)
from .rules.norm import layer_norm_p
from .rules.shape import (Batched, _adv_start, _advanced, _as_tuple, active_levels,
                          batch_index_arrays, bind, bottom, broadcast, getitem_p, lift, pop_level,
                          push_level, reshape, scatter_add, wrap)
from .spec import ELLIPSIS, FRESH, Spec, fresh, render
from .tensor import (BatchMixingError, Tensor, as_tensor, no_grad, ones_like_data, state,
                     toposort)
from .transforms import _argnums, _per_arg, _trace

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
        # One entry per positional argument (JAX reads a top-level list as the tuple);
        # keyword arguments are mapped over axis 0.
        spec = tuple(in_axes) if type(in_axes) in (list, tuple) else (in_axes,) * len(args)
        if is_dask(args):  # dask arrays: blocks of the mapped axis 0, on the workers
            if out_axes != 0 or any(a not in (0, None) for a in spec):
                raise NotImplementedError("vmap of dask arrays maps axis 0 in and out only")
            return on_blocks(wrapped, tuple(i for i, a in enumerate(spec) if a == 0), 1)(
                *args, **kwargs)
        if len(spec) != len(args):
            raise ValueError(f"vmap: in_axes has {len(spec)} entries for {len(args)} "
                             f"positional arguments")
        leaves, tree = flatten((args, kwargs))
        if not kwargs and type(in_axes) is int and len(leaves) == len(args):  # plain arrays
            axes = [in_axes] * len(args)
        else:
            axes = _prefix_axes((spec, dict.fromkeys(kwargs, 0)), (args, kwargs), "in_axes")
        leaves = [x if a is None else as_tensor(x) for x, a in zip(leaves, axes)]
        sizes = set()
        for x, a in zip(leaves, axes):
            if a is not None:
                if not -x.ndim <= a < x.ndim:
                    raise ValueError(f"vmap: in_axes {a} is out of range for an argument of "
                                     f"shape {x.shape}")
                sizes.add(x.shape[a])
        if not sizes:
            raise ValueError("vmap: no argument is mapped (every in_axes entry is None)")
        if len(sizes) != 1:
            raise ValueError(f"vmap: the mapped axes have different sizes {sorted(sizes)}")
        size = sizes.pop()
        level = push_level(size)
        try:
            call = [x if a is None else Batched(_to_front(x, a), level)
                    for x, a in zip(leaves, axes)]
            cargs, ckwargs = unflatten(tree, call)
            out = f(*cargs, **ckwargs)
            outs, out_tree = flatten(out)
            oaxes = ([out_axes] * len(outs) if type(out_axes) is int
                     else _prefix_axes(out_axes, out, "out_axes"))
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


# -- per-sample gradients ------------------------------------------------------------------

def per_sample_grad(f: Callable, argnums=0) -> Callable:
    """Each example's gradient of ``f``, in one forward and one reverse pass.

    ``f`` is written for the batch and returns one value per example, shape
    ``(B,)``; the batch is axis 0 of the arguments not in ``argnums`` (the
    data). The gradient of value ``b`` with respect to each argument in
    ``argnums`` (the parameters, pytrees kept) comes back with a leading
    axis of ``B``: ``(B,) + arg.shape``. Where a parameter meets the data the
    reverse pass keeps the batch index instead of summing it (an einsum
    ``'bi,oi->bo'`` gives its weight ``'bo,bi->boi'``), so nothing is looped
    over and nothing is computed per example twice.

    Inside :func:`vmap` (``vmap(per_sample_grad(f), in_axes)``: one batch per
    mapped entry, parameters mapped or not) the batch is axis 0 of what ``f``
    sees: each result is ``(B,) + arg.shape`` per mapped entry, the same pass
    run once with the mapped axes in front.

    Raises:
        BatchMixingError: ``f`` mixes examples (a mean over the batch before the
            per-example loss, a batch norm in training mode): names the op.
        ValueError: ``f`` does not return ``(B,)`` values, or the data's axes 0 differ.

    Example:
        >>> g = per_sample_grad(lambda w, x: eg.tanh(x @ w).sum(axis=1))(w, x)  # doctest: +SKIP
    """
    def wrapped(*args, **kwargs):
        if is_dask(args):  # dask data: each block's examples on a worker
            nums = {argnums} if isinstance(argnums, int) else set(argnums)
            data = tuple(i for i in range(len(args)) if i not in nums and i - len(args) not in nums)
            return on_blocks(wrapped, data, 1)(*args, **kwargs)
        p = _Pass(f, argnums, args, kwargs)
        grads = p.walk()
        return p.per_arg([p.mapped(grads[id(x)]) for x in p.xs])
    return wrapped


def per_sample_grad_norm(f: Callable, argnums=0) -> "_GradNorm":
    """The L2 norm of each example's gradient over all of ``argnums``, shape ``(B,)``.

    As :func:`per_sample_grad`, without building the per-example gradients
    where a parameter meets the data in an einsum: that parameter's share of the
    squared norm is its per-example VJP pattern contracted with itself (for
    ``'bti,oi->bto'``, ``'bto,bti,bso,bsi->b'``), in the order opt_einsum finds
    cheapest, which builds the ``(B, o, i)`` gradient only where that costs less.
    The returned callable's ``explain(*args)`` prints those patterns. Inside
    :func:`vmap` as :func:`per_sample_grad`: ``(B,)`` per mapped entry.

    Raises:
        BatchMixingError, ValueError: as :func:`per_sample_grad`.
    """
    return _GradNorm(f, argnums)


class _GradNorm:
    """``per_sample_grad_norm(f, argnums)``: call it for the norms, ``explain`` for the patterns."""

    def __init__(self, f: Callable, argnums):
        self.f, self.argnums = f, argnums
        self.__name__ = f"per_sample_grad_norm({getattr(f, '__name__', 'f')})"

    def __call__(self, *args, **kwargs) -> Tensor:
        p = _Pass(self.f, self.argnums, args, kwargs)
        grads = p.walk(terms=True)
        total = None
        for x in p.xs:
            sq = _squared_norm(grads.get(id(x)), p.terms.get(id(x), []), len(p.levels))
            total = sq if total is None else total + sq
        return p.mapped(total ** 0.5)

    def explain(self, *args, **kwargs) -> str:
        """For each parameter leaf: where it meets the data, its per-sample VJP pattern,
        and the contraction its squared norm runs (opt_einsum's path and cost)."""
        p = _Pass(self.f, self.argnums, args, kwargs)
        p.walk(terms=True)
        lines = []
        names = _leaf_names(p.trees, p.nums)
        for name, x in zip(names, p.xs):
            lines.append(f"{name}: shape {x.shape}")
            terms = p.terms.get(id(x), [])
            for t in terms:
                lines.append(f"  meets the data in einsum {_show(t.source)!r} (operand "
                             f"{t.k}): per-sample VJP {_show(t.spec)!r}")
            if len(terms) == 1:
                norm = _pair_spec(terms[0], terms[0], len(p.levels))
                shapes = [o.shape for o in terms[0].ops] * 2
                path, info = path_info(norm, shapes)
                lines.append(f"  squared norm: {_show(norm)!r}")
                lines.append("  contraction path (opt_einsum): " +
                             " -> ".join(str(q) for q in path))
                lines.append(f"    cost {int(info.opt_cost):,} FLOPs, largest intermediate "
                             f"{int(info.largest_intermediate):,} elements (the per-sample "
                             f"gradient: {p.size * x.size:,})")
            elif terms:
                lines.append(f"  squared norm: {len(terms) ** 2} contractions (each pair of "
                             f"uses)")
            if p.materialized.get(id(x)):
                lines.append("  other uses: per-sample gradients built, then squared and summed")
        return "\n".join(lines)


class _Term:
    """One use of a parameter where it meets the data in an einsum: its per-sample
    gradient is ``einsum(spec, *ops)``, output the batch label then the parameter's axes."""

    __slots__ = ("spec", "ops", "source", "k")

    def __init__(self, spec: Spec, ops: list, source: Spec, k: int):
        self.spec, self.ops, self.source, self.k = spec, ops, source, k


class _Pass:
    """``f`` traced once with the batch axis tracked, and its per-sample reverse pass."""

    def __init__(self, f: Callable, argnums, args: tuple, kwargs: dict):
        # Inside vmap the tensors traced are physical: the levels' axes first (nlv of
        # them), then the examples' batch axis; every parameter carries the levels' axes.
        self.levels = lv = active_levels()
        nlv = len(lv)
        nums = _argnums(argnums, len(args))
        call, arrays, sizes = list(args), [], set()
        for i in range(len(args)):
            if i in nums:
                continue
            leaves, tree = flatten(args[i])
            data = []
            for leaf in leaves:
                if hasattr(leaf, "shape"):  # an array or a Tensor: axis 0 is the batch
                    t = as_tensor(leaf)
                    if t.ndim == 0:
                        raise ValueError("per_sample_grad: a data argument is 0-d: the batch is "
                                         "axis 0 of the arguments not in argnums")
                    sizes.add(t.shape[0])
                    # a fresh tensor: the user's keeps its own bdim
                    t = Tensor((bottom(lift(t, lv)) if lv else t).data)
                    t.bdim = nlv
                    arrays.append(t.data)
                    leaf = wrap(t, lv)
                data.append(leaf)
            call[i] = unflatten(tree, data)
        if len(sizes) != 1:
            raise ValueError("per_sample_grad: the batch is axis 0 of the arguments not in "
                             f"argnums; their axes 0 are {sorted(sizes) or 'missing'}")
        self.size = sizes.pop()
        with batch_index_arrays(arrays, nlv):
            self.xs, self.trees, out, _ = _trace(f, call, nums, kwargs, batch=True,
                                                 bdims=[None] * len(nums))
        lead = tuple(n for _, n in lv)
        if not isinstance(out, Tensor) or out.shape != lead + (self.size,):
            got = out.shape[nlv:] if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"per_sample_grad: f must return one value per example, shape "
                             f"({self.size},), got {got}")
        if out.bdim != nlv:
            raise BatchMixingError("per_sample_grad: f's output does not follow the batch axis "
                                   "of its data (it mixes examples, or does not depend on them)")
        self.out, self.nums = out, nums
        self.per_arg = lambda flat: _per_arg(self.trees, flat, argnums)
        self.terms: dict = {}
        self.materialized: dict = {}

    def mapped(self, r: Tensor) -> Tensor:
        """A per-sample result ``(B,) + ...`` as the caller sees it: inside vmap its
        physical ``(B, levels..., ...)`` with ``B`` after the levels' axes, and batched."""
        if not self.levels:
            return r
        return wrap(moveaxis(r, 0, len(self.levels)), self.levels)

    def walk(self, terms: bool = False) -> dict:
        """Per-sample cotangents of the parameters: ``{id(x): (B,) + x.shape}`` (with
        ``terms``, a parameter's einsum uses are kept as :class:`_Term` s instead)."""
        with (contextlib.nullcontext() if state.tracing else no_grad()):
            return self._walk(terms)

    def _walk(self, terms: bool) -> dict:
        xs, out = self.xs, self.out
        targets = {id(x) for x in xs}
        keep = _reaching(out, targets)
        cots = {id(out): Tensor(ones_like_data(out.data))}
        done: dict = {}
        for t in reversed(toposort([out], keep, targets)):
            g = cots.pop(id(t), None)
            if g is None:
                continue
            if id(t) in targets:
                done[id(t)] = g
                continue
            node = t.node
            node.check(t)
            prim, ins = node.prim, node.inputs
            fused = None
            if prim.fused is not None and not state.grad and t.bdim is not None and \
                    all(x.bdim is not None or not keep(x) for x in ins):
                fused = prim.fused(g.data, t.data, *[x.data for x in ins], **node.params)
            for k, x in enumerate(ins):
                if not keep(x):
                    continue
                if fused is not None:
                    gk = Tensor(fused[k])
                elif t.bdim is None or x.bdim is not None:
                    # Both on the parameters' side (g has the examples in front) or both on
                    # the data's (g has them at t's batch axis): the rule as it is.
                    gk = prim.vjp(k, g, t, *ins, **node.params)
                else:
                    if terms and prim is einsum_p and id(x) in targets:
                        self.terms.setdefault(id(x), []).append(
                            _keep_batch_term(k, g, t, ins, node.params["spec"]))
                        continue
                    gk = _per_sample_vjp(prim, k, g, t, ins, node.params)
                    if id(x) in targets:
                        self.materialized[id(x)] = True
                cots[id(x)] = cots[id(x)] + gk if id(x) in cots else gk
        for x in xs:  # a parameter the output does not depend on
            if id(x) not in done and id(x) not in self.terms:
                done[id(x)] = Tensor(backend_of(x.data).zeros((self.size,) + x.shape, x.dtype))
        return done


def _show(spec: Spec) -> str:
    """``spec`` as an einsum string with a letter for every index (no '...')."""
    ell = [l for l in spec.labels if ELLIPSIS <= l < FRESH]
    to = dict(zip(ell, fresh(spec.labels, len(ell))))
    term = lambda t: tuple(to.get(l, l) for l in t)  # noqa: E731
    return render(Spec(tuple(map(term, spec.inputs)), term(spec.output)))


def _leaf_names(trees: Sequence[TreeDef], nums: tuple) -> list:
    """``args[i]['w'][0]``-style names of the differentiated leaves, in order."""
    def walk(t: TreeDef, path: str) -> list:
        if t.kind is None:
            return [path]
        keys = t.keys if t.keys is not None else range(len(t.children))
        return [n for k, c in zip(keys, t.children) for n in walk(c, f"{path}[{k!r}]")]
    return [n for i, t in zip(nums, trees) for n in walk(t, f"args[{i}]")]


def _reaching(out: Tensor, targets: set) -> Callable:
    """Is a tensor on a path from the parameters to ``out``?"""
    memo = {i: True for i in targets}
    for t in toposort([out], lambda t: True, targets):
        if id(t) not in memo:
            node = t.node
            memo[id(t)] = node is not None and any(memo.get(id(x), False) for x in node.inputs)
    return lambda t: memo.get(id(t), False)


def _keep_batch_term(k: int, g: Tensor, t: Tensor, ins: Sequence[Tensor], spec: Spec) -> _Term:
    """The VJP pattern of einsum operand ``k`` (a parameter) with the batch label kept:
    for ``'bi,oi->bo'`` and the weight, ``'bo,bi->boi'`` (the output's batch label first)."""
    b = spec.output[t.bdim]
    if b in spec.inputs[k]:
        raise NotImplementedError(f"per_sample_grad: in einsum {render(spec)!r} a parameter "
                                  f"axis lines up with the batch axis")
    p = vjp_pattern(spec, k, (), spec.inputs[k])
    sizes = dict(zip(spec.inputs[k], ins[k].shape))
    extra = [constant_like(g, kind, sizes[labels[0]]) for kind, labels in p.extra]
    ops = [g, *ins[:k], *ins[k + 1:], *extra]
    return _Term(Spec(p.fused.inputs, (b,) + p.fused.output), ops, spec, k)


def _run_term(term: _Term) -> Tensor:
    """The per-sample gradient a term stands for. An outer product per example (two
    operands, nothing summed: a dense layer's ``'bo,bi->boi'``) runs as a batched
    matmul over a size-1 index: the backend's GEMM (MKL's, threaded) writes the
    ``(B, o, i)`` result 2-3x faster than a broadcast multiply does."""
    spec, ops = term.spec, term.ops
    summed = set(spec.labels) - set(spec.output)
    if len(ops) == 2 and not summed and all(o.ndim == len(t) for o, t in zip(ops, spec.inputs)):
        (k,) = fresh(spec.labels, 1)
        spec = Spec(tuple(t + (k,) for t in spec.inputs), spec.output)
        ops = [reshape(o, o.shape + (1,)) for o in ops]
    return einsum_spec(spec, *ops)


# Primitives whose VJP rules broadcast an input against the output (NumPy's rules):
# a parameter given the batch axis as a size-B broadcast gets its VJP per example.
_LIFTED = {add_p, sub_p, mul_p, div_p, pow_p, where_p, add_bias_p, maximum_p, minimum_p,
           remainder_p, layer_norm_p}


def _lifted_vjp(prim, k: int, g: Tensor, t: Tensor, ins: Sequence[Tensor], params: dict) -> Tensor:
    x, d, r = ins[k], t.bdim, t.ndim
    size, pad = t.shape[d], r - ins[k].ndim
    lifted = [1] * pad + list(x.shape)
    if lifted[d] != 1:
        raise NotImplementedError(f"per_sample_grad: in op {prim.name!r} a parameter axis lines "
                                  f"up with the batch axis")
    lifted[d] = size
    big = broadcast_to(reshape(x, (1,) * pad + x.shape), tuple(lifted))
    gk = prim.vjp(k, g, t, *ins[:k], big, *ins[k + 1:], **params)
    return reshape(moveaxis(gk, d, 0) if d else gk, (size,) + x.shape)


def _per_sample_scatter(g: Tensor, t: Tensor, x: Tensor, index, nb: int) -> Tensor:
    """``w[ids]``'s per-example VJP for ``w``, ``ids`` the data's: each example's
    cotangent added into its own copy of ``w``'s shape."""
    idx = _as_tuple(index)
    _, n_adv, _ = _advanced(idx)
    start = _adv_start(x.ndim, idx, nb)
    # The examples' axis of the advanced block: where t's batch axis falls in it.
    q = t.bdim - start
    size = t.shape[t.bdim]
    if not 0 <= q < n_adv:
        raise NotImplementedError("per_sample_grad: indexing whose batch axis is not an "
                                  "index array's")
    xp = backend_of(g.data)
    ar = xp.arange(size).reshape((1,) * q + (size,) + (1,) * (n_adv - q - 1))
    if start:  # (ar, ...) puts the advanced dims first
        g = transpose(g, tuple(range(start, start + n_adv)) + tuple(range(start)) +
                      tuple(range(start + n_adv, g.ndim)))
    return scatter_add(g, (size,) + x.shape, (ar,) + idx, nb)


# Per-sample VJPs of other modules' primitives, by primitive: fn(k, g, out, ins, params).
PER_SAMPLE: dict = {}


def _per_sample_vjp(prim, k: int, g: Tensor, t: Tensor, ins: Sequence[Tensor],
                    params: dict) -> Tensor:
    """Input ``k``'s VJP per example, ``(B,) + x.shape``, where ``t`` is batched and
    input ``k`` (on the parameters' side) is not."""
    if prim is einsum_p:
        return _run_term(_keep_batch_term(k, g, t, ins, params["spec"]))
    if prim is getitem_p:
        return _per_sample_scatter(g, t, ins[0], params["index"], params["nb"])
    if prim in PER_SAMPLE:
        return PER_SAMPLE[prim](k, g, t, ins, params)
    if prim in _LIFTED:
        return _lifted_vjp(prim, k, g, t, ins, params)
    # Any other rule, mapped over the examples: the batched inputs, the output and g
    # along their batch axis, the parameter as it is.
    axes = (t.bdim, t.bdim) + tuple(x.bdim for x in ins)
    return vmap(lambda g_, t_, *xs_: prim.vjp(k, g_, t_, *xs_, **params), in_axes=axes)(g, t, *ins)


def _squared_norm(m: Tensor | None, terms: list, nlv: int = 0) -> Tensor:
    """``(B,)``: the squared norm of ``m`` (a per-sample gradient built, or None) plus
    the einsum terms, each pair of them one contraction (inside vmap ``(B,) + levels``:
    the ``nlv`` axes after the batch's are the levels', kept)."""
    parts = list(terms)
    if m is not None:
        labels = tuple(range(m.ndim))
        parts.insert(0, _Term(Spec((labels,), labels), [m], None, None))
    total = None
    for i, a in enumerate(parts):
        for b in parts[i:]:
            v = einsum_spec(_pair_spec(a, b, nlv), *a.ops, *b.ops)
            v = v if b is a else v * 2.0
            total = v if total is None else total + v
    return total


def _pair_spec(a: _Term, b: _Term, nlv: int = 0) -> Spec:
    """``<a, b>`` per example as one einsum: ``b``'s output labels renamed to ``a``'s,
    its other labels to fresh ones, the batch label (and ``nlv`` levels' after it) kept."""
    names = dict(zip(b.spec.output, a.spec.output))
    rest = [l for l in b.spec.labels if l not in names]
    names.update(zip(rest, fresh(a.spec.labels, len(rest))))
    return Spec(a.spec.inputs + tuple(tuple(names[l] for l in term) for term in b.spec.inputs),
                a.spec.output[:1 + nlv])


# -- per-sample rules of the convolution and batch-norm primitives --------------------------

def _patch_einsum_per_sample(k, g, t, ins, params):
    """A convolution's weight gradient per example: ``'bchwkl,bfhw->bfckl'``, the
    batch label kept, one patch einsum as the weight gradient is."""
    spec = params["spec"]
    (pt, ot), b = spec.inputs, spec.output[t.bdim]
    if k != 1 or b in ot:
        raise NotImplementedError("per_sample_grad: a convolution's image as a parameter")
    rest = {n: v for n, v in params.items() if n not in ("spec", "patches")}
    return bind(patch_einsum_p, ins[0], g, spec=Spec((pt, spec.output), (b,) + ot),
                patches=None, **rest)


PER_SAMPLE[patch_einsum_p] = _patch_einsum_per_sample
_LIFTED.add(batch_norm_p)
