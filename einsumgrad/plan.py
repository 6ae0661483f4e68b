"""The planner: a contraction order from opt_einsum, planned once and cached.

A :class:`Plan` is made once per (spec, shapes, dtypes, backend, optimize) and
then only runs. opt_einsum picks the pairwise order (for three or more
operands; ``optimize`` as opt_einsum's, or an explicit path as NumPy's
``einsum_path`` gives); each pairwise step is lowered to the cheapest backend
call: a (batched) ``matmul`` when an index is contracted, a broadcast multiply
when none is, a ``sum`` and a transpose for one operand, and the backend's own
``einsum`` only where a term repeats an index (diagonals) or a step takes more
than two operands (``optimize=False``).

Dtypes follow NumPy's einsum: operands of different dtypes are cast to
``result_type`` of them all first, sums stay in that dtype (an ``int32``
einsum gives ``int32``, not the platform integer ``numpy.sum`` gives), and a
bool sum is an OR.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Sequence

import numpy
import opt_einsum
import opt_einsum.paths

from .backends import Backend, common_backend, memory_order
from .spec import EinsumError, EinsumTypeError, Spec, fresh

class Bounded(dict):
    """A cache of at most ``size`` entries, the oldest made dropped first: shapes
    that change every step (variable-length batches) must not grow it forever.
    Lookups stay plain dict lookups (every einsum call makes one); an entry
    still in use when dropped is planned again once."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if len(self) > self.size:
            del self[next(iter(self))]


_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")  # no frame per call
CACHE_SIZE = 512  # plans per cache: far more than one model's distinct shapes
_plans = Bounded(CACHE_SIZE)
stats = {"planned": 0}  # how many plans were made; a test reads it


def contract(spec: Spec, arrays: Sequence, order: tuple | None = None) -> object:
    """Evaluate ``spec`` on backend arrays, with the cached plan; ``order`` (the
    output's axes, outermost in memory first) asks for that layout where the
    last step is a matmul that can write it, or a broadcast multiply."""
    return plan_for(spec, arrays)(arrays, order)


AUTO = "auto"  # the default path choice: opt_einsum's


def path_option(optimize) -> object:
    """``optimize`` as a hashable key of the plan caches, checked.

    ``True`` and ``None`` are ``"auto"``; ``False`` contracts every operand in
    one step (the backend's einsum); a string names an opt_einsum path
    optimizer (``"greedy"``, ``"optimal"``, ``"auto"``, ``"dp"``, ...); a list
    of tuples is an explicit path, with or without the ``"einsum_path"`` head
    NumPy's ``einsum_path`` puts first; an opt_einsum ``PathOptimizer`` is used
    as is. An explicit path is checked against the operands when planned.

    Raises:
        EinsumError: an unknown optimizer name or a malformed path entry.
        EinsumTypeError (also a TypeError): ``optimize`` of another type.
    """
    if optimize is True or optimize is None:
        return AUTO
    if optimize is False:
        return False
    if isinstance(optimize, str):
        try:
            opt_einsum.paths.get_path_fn(optimize)
        except KeyError:
            raise EinsumError(f"einsum: unknown optimize={optimize!r}; use True, False, an "
                              f"explicit path, or one of opt_einsum's path optimizers: "
                              f"{', '.join(sorted(opt_einsum.paths._PATH_OPTIONS))}") from None
        return optimize
    if isinstance(optimize, opt_einsum.paths.PathOptimizer):
        return optimize
    if isinstance(optimize, (list, tuple)):
        steps = list(optimize)
        if steps and isinstance(steps[0], str) and steps[0] == "einsum_path":
            steps = steps[1:]
        path = []
        for step in steps:
            if isinstance(step, (str, bytes)) or not hasattr(step, "__iter__"):
                raise EinsumError(f"einsum: optimize path entry {step!r} is not a tuple of "
                                  f"operand positions")
            pos = []
            for p in step:
                try:
                    if isinstance(p, bool):
                        raise TypeError
                    pos.append(operator.index(p))
                except TypeError:
                    raise EinsumError(f"einsum: optimize path entry {tuple(step)!r} holds "
                                      f"{p!r}, not an operand position") from None
            path.append(tuple(pos))
        return tuple(path)
    raise EinsumTypeError(f"einsum: optimize must be a bool, a path optimizer's name or an "
                          f"explicit path (a list of tuples), got {type(optimize).__name__}")


def plan_for(spec: Spec, arrays: Sequence, optimize=AUTO):
    """The cached plan for ``spec`` at these arrays' shapes, dtypes and backend,
    and the path choice ``optimize`` (see :func:`path_option`), as a function of
    the arrays (and an optional output ``order``); ``.plan`` is the :class:`Plan`."""
    xp = common_backend(arrays)
    if optimize is not AUTO:
        optimize = path_option(optimize)
    key = (spec, tuple(map(_SHAPE, arrays)), tuple(map(_DTYPE, arrays)), xp.name, optimize)
    run = _plans.get(key)
    if run is None:
        # NumPy's einsum computes in the operands' result type: mixed operands
        # are cast to it first.
        cast = xp.result_type(*key[2]) if len(set(key[2])) > 1 else None
        plan = Plan(spec, key[1], optimize, cast)
        run = _plans[key] = plan.bind(xp)
    return run


def letters_of(spec: Spec) -> str:
    """``spec`` as a string opt_einsum and the backends accept (labels renamed)."""
    sym = {l: opt_einsum.get_symbol(i) for i, l in enumerate(spec.labels)}
    return ",".join("".join(sym[l] for l in t) for t in spec.inputs) + "->" + \
        "".join(sym[l] for l in spec.output)


def path_info(spec: Spec, shapes: Sequence[tuple], optimize=AUTO):
    """opt_einsum's contraction path and its cost report for ``spec``."""
    return opt_einsum.contract_path(letters_of(spec), *shapes, shapes=True, optimize=optimize)


def _check_path(path: Sequence[tuple], n: int) -> list:
    """An explicit contraction path, checked against ``n`` operands."""
    left = n
    for i, pos in enumerate(path):
        if len(set(pos)) != len(pos):
            raise EinsumError(f"einsum: optimize path step {i} {pos} names an operand twice")
        bad = [p for p in pos if not 0 <= p < left]
        if bad or not pos:
            raise EinsumError(f"einsum: optimize path step {i} {pos} is out of range: "
                              f"{left} operand(s) are left at that step, positions 0 to "
                              f"{left - 1}")
        left -= len(pos) - 1
    if left != 1:
        raise EinsumError(f"einsum: optimize path {list(path)} leaves {left} operands "
                          f"uncontracted: a path contracts all {n} into one")
    return [tuple(p) for p in path]


class Plan:
    """The steps that evaluate one spec at one set of shapes (and dtypes)."""

    def __init__(self, spec: Spec, shapes: Sequence[tuple], optimize=AUTO, cast=None):
        stats["planned"] += 1
        self.spec = spec
        sizes = {l: n for t, s in zip(spec.inputs, shapes) for l, n in zip(t, s)}
        terms = list(spec.inputs)
        if isinstance(optimize, tuple):
            path = _check_path(optimize, len(terms))
        elif len(terms) <= 2 or optimize is False:
            path = [tuple(range(len(terms)))]
        else:
            path = [tuple(p) for p in path_info(spec, shapes, optimize)[0]]
        self.path = path
        self.cast = cast  # the dtype mixed operands are cast to first, or None
        self.steps = []
        for pos in path:
            pos = tuple(sorted(pos, reverse=True))
            picked = [terms.pop(p) for p in pos]
            rest = set(spec.output).union(*terms) if terms else set(spec.output)
            if terms:  # an intermediate keeps what is still needed, in first-seen order
                result = tuple(dict.fromkeys(l for t in picked[::-1] for l in t if l in rest))
            else:
                result = spec.output
            self.steps.append((pos, _lower(picked[::-1], result, sizes)))
            terms.append(result)

    def bind(self, xp: Backend):
        """This plan as a function of the arrays (and an output order), on backend ``xp``."""
        if self.cast is not None:
            dt = self.cast
            run = lambda arrays, order=None: self(xp, [a if a.dtype == dt else a.astype(dt)
                                                       for a in arrays], order)
        elif len(self.steps) == 1:
            step = self.steps[0][1]
            ordered = getattr(step, "ordered", None)
            if ordered is None:
                run = lambda arrays, order=None: step(xp, arrays)
            elif ordered is step:
                run = functools.partial(step, xp)
            else:
                run = lambda arrays, order=None: (step(xp, arrays) if order is None
                                                  else ordered(xp, arrays, order))
        else:
            run = lambda arrays, order=None: self(xp, arrays, order)
        run.plan = self
        return run

    def __call__(self, xp: Backend, arrays: Sequence, order: tuple | None = None) -> object:
        arrays = list(arrays)
        for i, (pos, run) in enumerate(self.steps):
            picked = [arrays.pop(p) for p in pos][::-1]
            ordered = getattr(run, "ordered", None) if i == len(self.steps) - 1 else None
            arrays.append(run(xp, picked) if order is None or ordered is None
                          else ordered(xp, picked, order))
        return arrays[0]


def _lower(terms: list, result: tuple, sizes: dict):
    """A function (xp, arrays) -> array for one step of a plan."""
    if any(len(set(t)) != len(t) for t in terms) or len(terms) > 2:
        sub = letters_of(Spec(tuple(terms), result))
        return lambda xp, arrs: xp.einsum(sub, *arrs)
    if len(terms) == 1:
        return _lower_one(terms[0], result)
    a, b = terms
    # An index in one operand only and not kept is summed away first.
    lone_a = tuple(l for l in a if l not in b and l not in result)
    lone_b = tuple(l for l in b if l not in a and l not in result)
    pre_a = _lower_one(a, tuple(l for l in a if l not in lone_a)) if lone_a else None
    pre_b = _lower_one(b, tuple(l for l in b if l not in lone_b)) if lone_b else None
    a = tuple(l for l in a if l not in lone_a)
    b = tuple(l for l in b if l not in lone_b)
    contracted = [l for l in a if l in b and l not in result]
    if not contracted:
        body = _broadcast_multiply(a, b, result)
    else:
        body = _matmul(a, b, result, contracted, sizes)
    if pre_a is None and pre_b is None:
        return body
    pre = lambda xp, x, y: (pre_a(xp, [x]) if pre_a else x, pre_b(xp, [y]) if pre_b else y)

    def run(xp, arrs):
        return body(xp, pre(xp, *arrs))
    if hasattr(body, "ordered"):
        run.ordered = lambda xp, arrs, order: body.ordered(xp, pre(xp, *arrs), order)
    return run


def _lower_one(term: tuple, result: tuple):
    summed = tuple(i for i, l in enumerate(term) if l not in result)
    kept = [l for l in term if l in result]
    perm = tuple(kept.index(l) for l in result)
    if not summed:
        if perm == tuple(range(len(perm))):
            return lambda xp, arrs: arrs[0]
        return lambda xp, arrs: arrs[0].transpose(perm)
    keep = tuple(i for i, l in enumerate(term) if l in result)

    def reduce(xp, a):
        kind = a.dtype.kind
        if kind in "fc":
            if keep and a.size >= 4096:
                return _sum_by_matvec(xp, a, summed, keep)
            if type(a) is numpy.ndarray:  # numpy.sum's own reduce, without its Python layers
                return numpy.add.reduce(a, axis=summed)
            return xp.sum(a, axis=summed)
        if kind == "b":  # NumPy's einsum sums bools as bools: an OR
            return xp.any(a, axis=summed)
        return xp.sum(a, axis=summed, dtype=a.dtype)  # an int32 sum stays int32
    if perm == tuple(range(len(perm))):
        return lambda xp, arrs: reduce(xp, arrs[0])
    return lambda xp, arrs: reduce(xp, arrs[0]).transpose(perm)


def _sum_by_matvec(xp, a, summed: tuple, keep: tuple):
    """``a`` summed over axes ``summed``, the rest left in the order ``keep``.

    Summed axes outermost in memory (a bias gradient of channels-last data)
    go as ``ones @ matrix``, innermost ones (a softmax's short rows) as
    ``matrix @ ones``: NumPy's axis sum goes row by row, 5 to 20 times slower
    on short rows. What is left between them is one run of summed axes (a
    batched ``ones @ matrix``) or several (summed by NumPy), on an array
    already that much smaller.
    """
    order = memory_order(a)
    t = xp.transpose(a, order)
    if not t.flags.c_contiguous:
        return xp.sum(a, axis=summed)
    lead = next((j for j, i in enumerate(order) if i not in summed), len(order))
    if lead:
        n = math.prod(t.shape[:lead])
        t = xp.reshape(xp.matmul(xp.ones(n, dtype=a.dtype), xp.reshape(t, (n, -1))), t.shape[lead:])
        order = order[lead:]
    trail = next((j for j, i in enumerate(reversed(order)) if i not in summed), len(order))
    if trail:
        n = math.prod(t.shape[len(order) - trail:])
        t = xp.reshape(xp.matmul(xp.reshape(t, (-1, n)), xp.ones(n, dtype=a.dtype)),
                       t.shape[:len(order) - trail])
        order = order[:len(order) - trail]
    rest = tuple(j for j, i in enumerate(order) if i in summed)
    if rest and rest == tuple(range(rest[0], rest[-1] + 1)):
        # One run of summed axes between kept ones (a spatial mean of
        # channels-last images): ones @ each (run, after) matrix, batched
        # over the axes before it; NumPy's axis sum walks the short rows.
        shape = t.shape
        before, after = shape[:rest[0]], shape[rest[-1] + 1:]
        t3 = xp.reshape(t, (math.prod(before), math.prod(shape[rest[0]:rest[-1] + 1]),
                            math.prod(after)))
        t = xp.reshape(xp.matmul(xp.ones(t3.shape[1], dtype=a.dtype), t3), before + after)
        order = [i for i in order if i not in summed]
    elif rest:
        t = xp.sum(t, axis=rest)
        order = [i for i in order if i not in summed]
    return xp.transpose(t, tuple(order.index(i) for i in keep))


def _on_one_slice(a, b, result, batch, left, contracted, right, sizes, sa, sb, a_larger, flat):
    """The matmul on the first slice along the ``flat`` (stride-0) labels,
    broadcast back along them (a read-only view, as ``broadcast_to`` gives)."""
    one = dict(sizes) | {l: 1 for l in flat}
    go = _arrange(a, b, result, batch, left, contracted, right, one,
                  tuple(sa[l] for l in a), tuple(sb[l] for l in b), a_larger)
    cut_a = tuple(slice(0, 1) if l in flat else slice(None) for l in a)
    cut_b = tuple(slice(0, 1) if l in flat else slice(None) for l in b)
    shape = tuple(sizes[l] for l in result)
    # out= goes unused: the result is one slice's product broadcast, a view to nothing
    # written (a caller that passed it keeps the returned array, as with any runner)
    return lambda xp, x, y, out=None: xp.broadcast_to(go(xp, x[cut_a], y[cut_b]), shape)


def _broadcast_multiply(a: tuple, b: tuple, result: tuple):
    def lay(t):  # transpose t into result order, with size-1 axes for what it lacks
        order = [l for l in result if l in t]
        perm = tuple(t.index(l) for l in order)
        shape_idx = [order.index(l) if l in t else None for l in result]
        return perm, shape_idx
    pa, ia = lay(a)
    pb, ib = lay(b)
    ident_a, ident_b = pa == tuple(range(len(a))), pb == tuple(range(len(b)))

    def expand(xp, x, perm, idx, ident):
        if not ident:
            x = x.transpose(perm)
        if None in idx:
            x = x.reshape(tuple(1 if i is None else x.shape[i] for i in idx))
        return x

    def run(xp, arrs):
        x, y = arrs
        return xp.multiply(expand(xp, x, pa, ia, ident_a), expand(xp, y, pb, ib, ident_b))

    def ordered(xp, arrs, order):
        # The product written into an array laid out in ``order``: a sum's
        # cotangent (a broadcast) then comes out in its primal's layout, and
        # the element-wise rules after it read operands of one layout.
        if len(order) != len(result) or order == tuple(range(len(result))):
            return run(xp, arrs)
        x, y = arrs
        # Both operands viewed in the memory order, so the multiply walks the
        # buffer as it lies (into a transposed view it walks it out of order).
        x = xp.transpose(expand(xp, x, pa, ia, ident_a), order)
        y = xp.transpose(expand(xp, y, pb, ib, ident_b), order)
        buf = xp.empty(tuple(p if q == 1 else q for p, q in zip(x.shape, y.shape)),
                       dtype=xp.result_type(x.dtype, y.dtype))
        xp.multiply(x, y, out=buf)
        return xp.transpose(buf, tuple(order.index(i) for i in range(len(order))))
    run.ordered = ordered
    return run


def _matmul(a: tuple, b: tuple, result: tuple, contracted: list, sizes: dict):
    batch = [l for l in result if l in a and l in b]
    left = [l for l in a if l in result and l not in b]
    right = [l for l in b if l in result and l not in a]
    layouts: dict = {}  # (strides of a, strides of b[, output order]) -> the arrangement

    def arranged(key, x, y, order):
        go = layouts[key] = _arrange(a, b, result, batch, left, contracted, right, sizes,
                                     x.strides, y.strides, x.size >= y.size, order)
        return go

    def run(xp, arrs, order=None, out=None):  # kept short: a per-call einsum pays for each step
        x, y = arrs
        key = (x.strides, y.strides) if order is None else (x.strides, y.strides, order)
        go = layouts.get(key) or arranged(key, x, y, order)
        return go(xp, x, y, out)
    run.ordered = run  # it takes the order itself: a plan of this one step is run bound to xp
    run.takes_out = True  # out: a C-contiguous array of the result's size it may write into
    return run


def _arrange(a, b, result, batch, left, contracted, right, sizes, sa, sb, a_larger,
             order=None):
    """One matmul for these operand layouts: each operand is read in its own memory order.

    Groups of labels are flattened in the order they lie in memory, and an
    operand whose contracted axes lie outside its free ones goes to the matmul
    transposed (a view BLAS reads as is): no copy where the layout allows none,
    and where one is needed (a strided view) it reads memory in order. With
    ``order`` (the result's axes, outermost in memory first), the matmul writes
    straight into an array of that layout, where its rows and columns are one
    axis each: a cotangent laid out like its primal (attention's heads inside
    its tokens) reaches the next matmul without a copy.
    """
    real = lambda ls: [l for l in ls if sizes[l] > 1]  # size-1 axes have no layout
    sa = {l: sa[a.index(l)] for l in a}
    sb = {l: sb[b.index(l)] for l in b}
    # A free axis along which an operand is broadcast (stride 0: a Jacobian's
    # basis, shared by every sample) leaves the product constant along it:
    # multiply one slice and broadcast the result, not every copy.
    flat = [l for l in real(left) if sa[l] == 0] + [l for l in real(right) if sb[l] == 0] + \
        [l for l in real(batch) if sa[l] == 0 and sb[l] == 0]
    if flat:
        return _on_one_slice(a, b, result, batch, left, contracted, right, sizes, sa, sb,
                             a_larger, flat)
    key_a = lambda l: -sa[l] if sizes[l] > 1 else 0
    key_b = lambda l: -sb[l] if sizes[l] > 1 else 0
    batch = sorted(batch, key=key_a if a_larger else key_b)
    contracted = sorted(contracted, key=key_a if a_larger else key_b)
    left, right = sorted(left, key=key_a), sorted(right, key=key_b)
    inner_a = min(real(left + contracted), key=lambda l: sa[l], default=None)
    inner_b = min(real(contracted + right), key=lambda l: sb[l], default=None)
    trans_a = inner_a in left     # contracted axes outer in memory: read a^T
    trans_b = inner_b in contracted
    order_a = batch + (contracted + left if trans_a else left + contracted)
    order_b = batch + (right + contracted if trans_b else contracted + right)
    prod = lambda ls: math.prod(sizes[l] for l in ls)
    m, k, n = prod(left), prod(contracted), prod(right)
    # Batch axes stay apart (matmul broadcasts over them): merged, two axes
    # whose strides do not nest (heads inside tokens) would force a copy.
    bs = tuple(sizes[l] for l in batch)
    shape_a = bs + ((k, m) if trans_a else (m, k))
    shape_b = bs + ((n, k) if trans_b else (k, n))
    out_shape = tuple(sizes[l] for l in batch + left + right)
    mm_shape = bs + (m, n)
    out_labels = batch + left + right
    ident = lambda p: None if p == tuple(range(len(p))) else p
    perm_a = ident(tuple(a.index(l) for l in order_a))
    perm_b = ident(tuple(b.index(l) for l in order_b))
    perm_c = ident(tuple(out_labels.index(l) for l in result))
    into = _into(order, result, batch, left, right, sizes)

    def go(xp, x, y, out=None):  # array methods, not the namespace's functions: a frame less each
        if perm_a:
            x = x.transpose(perm_a)
        if perm_b:
            y = y.transpose(perm_b)
        if x.shape != shape_a:
            x = x.reshape(shape_a)
        if y.shape != shape_b:
            y = y.reshape(shape_b)
        if trans_a:
            x = x.swapaxes(-1, -2)
        if trans_b:
            y = y.swapaxes(-1, -2)
        if into is not None:
            buf_shape, to_mm, index, to_result = into
            buf = (xp.empty(buf_shape, dtype=xp.result_type(x.dtype, y.dtype)) if out is None
                   else out.reshape(buf_shape))
            xp.matmul(x, y, out=xp.transpose(buf, to_mm)[index])
            return xp.transpose(buf, to_result)
        c = xp.matmul(x, y) if out is None else xp.matmul(x, y, out=out.reshape(mm_shape))
        if c.shape != out_shape:
            c = c.reshape(out_shape)
        return c.transpose(perm_c) if perm_c else c
    return go


def _into(order, result, batch, left, right, sizes):
    """How the matmul writes into an array laid out in ``order``: the buffer's
    shape, the transpose and basic index that view it as ``(batch..., m, n)``
    (size-1 axes dropped or added, so the view is never a copy), and the
    transpose back to ``result``; None without an order, or where the rows or
    the columns span several axes."""
    real = lambda ls: [l for l in ls if sizes[l] > 1]
    if order is None or len(real(left)) > 1 or len(real(right)) > 1:
        return None
    mem = [result[i] for i in order]
    rows, cols = real(left), real(right)
    labels = batch + rows + cols
    index = (slice(None),) * len(batch) + (() if rows else (None,)) + \
        (slice(None),) * len(rows) + (() if cols else (None,)) + (slice(None),) * len(cols)
    # The buffer holds every result label; those of size 1 outside batch, rows
    # and cols are indexed away (their 0) after the transpose puts them last.
    extra = [l for l in result if l not in labels]
    to_mm = tuple(mem.index(l) for l in labels + extra)
    index += (0,) * len(extra)
    return (tuple(sizes[l] for l in mem), to_mm, index, tuple(mem.index(l) for l in result))


def jacobian_of(spec: Spec, k: int, arrays: Sequence, broadcast_axes: tuple = ()):
    """Materialize ``J = d einsum(spec) / d operand k`` on backend arrays.

    ``spec`` is clean (one size per label); operand k may keep axes of size 1
    that broadcast (``broadcast_axes``, absent from ``spec.inputs[k]``). ``J``
    starts as zeros and the other operands' contraction is written onto its
    generalized diagonal through a strided view: peak memory is ``J`` plus that
    contraction, never an ``x.shape x w.shape x x.shape`` intermediate.
    """
    xp = common_backend(arrays)
    dtype = xp.result_type(*arrays)
    # Operand k's broadcast axes are absent from its term: skip them when sizing.
    sizes = {l: n for j, (t, a) in enumerate(zip(spec.inputs, arrays))
             for l, n in zip(t, (n for ax, n in enumerate(a.shape)
                                 if j != k or ax not in broadcast_axes))}
    x_shape = arrays[k].shape
    J = xp.zeros(tuple(sizes[l] for l in spec.output) + x_shape, dtype=dtype)
    # J's axes: the output's labels, then operand k's (a broadcast axis of size
    # 1 is an axis of its own). Axes sharing a label are one axis of the
    # diagonal view, whose stride is the sum of theirs.
    made = iter(fresh(spec.labels, len(x_shape)))
    term = iter(spec.inputs[k])
    x_labels = [next(made) if ax in broadcast_axes else next(term) for ax in range(len(x_shape))]
    axes = list(spec.output) + x_labels
    view_labels = tuple(dict.fromkeys(axes))
    strides = tuple(sum(s for a, s in zip(axes, J.strides) if a == l) for l in view_labels)
    view = xp.as_strided(J, shape=tuple(J.shape[axes.index(l)] for l in view_labels),
                         strides=strides)
    terms = [t for j, t in enumerate(spec.inputs) if j != k]
    others = [a for j, a in enumerate(arrays) if j != k]
    present = set().union(*terms) if terms else set()
    if terms:
        D = contract(Spec(tuple(terms), tuple(l for l in view_labels if l in present)), others)
    else:
        D = xp.ones((), dtype=dtype)
    view[...] = xp.reshape(D, tuple(n if l in present else 1
                                    for l, n in zip(view_labels, view.shape)))
    return J
