"""Exact rewrites of a traced program, run once after the trace.

* :func:`fold_constants`: a step whose inputs are all constants (a ``ones``
  buffer nothing writes into, a basis, a guard on a constant) becomes a
  constant: the value the trace computed. Then a product with a constant
  ones operand (an einsum's ``ones`` broadcast, ``x * 1``) is the other
  operand (:func:`drop_ones`).
* :func:`common_subexpressions`: two equal pure steps on the same slots are one.
* :func:`merge_einsums`: an einsum whose result only feeds another einsum is
  merged into it, one multi-operand einsum, where opt_einsum's cost for the
  merged contraction is lower than the two apart.
* :func:`fuse_elementwise` (:mod:`.fuse`): chains of element-wise steps as one
  numba kernel, where numba is installed.
* :func:`dead_code`: steps whose results nothing reads are dropped.
* :func:`transposed_products` (:mod:`.layouts`): a wide product the BLAS writes
  faster transposed is written so, with the element-wise steps around it.
* :func:`mark_owned`: the slots whose buffer a step makes and nothing else
  shares; an element-wise step then writes its result into such an input
  where that input dies (:func:`einsumgrad.program.compile.reuse_plan`).

Buffers are freed after their last use by the generated code itself
(:func:`einsumgrad.program.compile.last_uses`).

In-place writes (``x[i] = v``, ``out=``, a bias added into a fresh product)
make the rewrites careful: slots that may share memory are grouped
(:func:`alias_groups`), and nothing in a group that is ever written into is
folded, merged or shared.
"""
from __future__ import annotations

import numpy

from ..plan import path_info
from ..spec import Spec, fresh
from .fuse import fuse_elementwise
from .graph import _fresh, alias_groups, rename, replace, uses, written
from .layouts import transposed_products
from .trace import Eq, Ref

# Element-wise primitives: their result is a new array.
ELEMENTWISE = frozenset(("add", "sub", "mul", "div", "pow", "maximum", "minimum", "remainder",
                         "neg", "exp", "log", "sin", "cos", "tanh", "sqrt", "abs", "relu",
                         "sigmoid", "softplus", "erf", "normal_pdf", "where"))


def optimize(p, values: dict | None = None, whole: dict | None = None) -> None:
    """All the passes, in place on ``p`` (``values``: what the trace computed per slot;
    ``whole``: those of them computed whole, where a trace ran on a block of rows)."""
    if values is not None:
        fold_constants(p, values if whole is None else whole)
    drop_ones(p)
    common_subexpressions(p)
    merge_einsums(p)
    constant_layouts(p)
    dead_code(p)
    fuse_elementwise(p)
    dead_code(p)
    transposed_products(p)
    if values is not None:
        mark_owned(p, values)


def _read_only(v):
    if isinstance(v, numpy.ndarray) and v.flags.writeable:
        v = v.view()
        v.flags.writeable = False
    return v


# -- constants -----------------------------------------------------------------------------

def fold_constants(p, values: dict) -> None:
    """Steps whose inputs are all constants become constants (their traced values)."""
    bad, groups = written(p)
    kept = []
    for eq in p.eqs:
        refs = eq.refs()
        if shape_only(eq):  # ones_like(x): x's shape and dtype, not its values
            refs = [s for s in refs if not (type(eq.args[0]) is Ref and s == eq.args[0].slot)]
        if (not eq.writes and all(s in p.consts for s in refs)
                and not any(groups[o] in bad for o in eq.outs)
                and all(o in values for o in eq.outs) and eq.op[0] != "setitem"):
            for o in eq.outs:
                p.consts[o] = _read_only(values[o])
            continue  # a guard on a constant held at trace time: it always holds
        kept.append(eq)
    p.eqs = kept


_SHAPE_ONLY = frozenset(("ones_like", "zeros_like", "full_like", "empty_like"))


def shape_only(eq: Eq) -> bool:
    """A step whose result depends on its first argument's shape and dtype only."""
    op = eq.op
    name = op[2] if op[0] == "backend" else op[1].__name__ if op[0] == "function" else None
    return name in _SHAPE_ONLY and name != "empty_like"


def _const_ones(p, s: int) -> bool:
    c = p.consts.get(s)
    if c is None or getattr(c, "dtype", None) is None or c.dtype.kind not in "fiu":
        return False
    try:
        return bool((numpy.asarray(c.view(numpy.ndarray) if isinstance(c, numpy.ndarray)
                                   else c) == 1).all())
    except Exception:
        return False


def drop_ones(p) -> None:
    """``x * 1`` and ``x ** 1`` are ``x``; an einsum's constant ones operand whose indices all
    appear in another operand multiplies each term by 1: dropped (``x * 1`` is
    exact; the einsum's sums may come out in another order)."""
    bad, groups = written(p)
    mapping = {}
    for eq in p.eqs:
        if eq.op == ("prim", "mul") and not eq.writes:
            out_aval = p.avals[eq.outs[0]]
            for k in (0, 1):
                x, c = eq.args[k], eq.args[1 - k]
                if (type(x) is Ref and type(c) is Ref and _const_ones(p, c.slot)
                        and p.avals[x.slot] == out_aval and groups[eq.outs[0]] not in bad):
                    mapping[eq.outs[0]] = x.slot
                    break
        elif eq.op == ("prim", "pow") and not eq.writes:  # x ** 1 is x, NaN and inf too
            x, c = eq.args
            if (type(x) is Ref and type(c) is Ref and _const_ones(p, c.slot)
                    and p.avals[x.slot] == p.avals[eq.outs[0]] and groups[eq.outs[0]] not in bad):
                mapping[eq.outs[0]] = x.slot
        elif eq.op == ("prim", "einsum") and len(eq.args) > 1:
            spec = eq.kwargs["spec"]
            keep = list(range(len(eq.args)))
            for k, (a, term) in enumerate(zip(eq.args, spec.inputs)):
                others = {l for j in keep if j != k for l in spec.inputs[j]}
                if (len(keep) > 1 and _const_ones(p, a.slot) and set(term) <= others
                        and len(set(term)) == len(term)):
                    keep.remove(k)
            if len(keep) < len(eq.args) and \
                    {p.avals[eq.args[j].slot][1] for j in keep} == {p.avals[eq.outs[0]][1]}:
                eq.args = tuple(eq.args[j] for j in keep)
                eq.kwargs = {"spec": Spec(tuple(spec.inputs[j] for j in keep), spec.output)}
    rename(p, mapping)


# -- common subexpressions -----------------------------------------------------------------

def _key(t):
    """A hashable form of a template (None where it has none)."""
    tp = type(t)
    if tp is Ref:
        return ("ref", t.slot)
    if tp is tuple or tp is list:
        return (tp.__name__,) + tuple(_key(x) for x in t)
    if tp is dict:
        return ("dict",) + tuple((k, _key(v)) for k, v in sorted(t.items()))
    if tp is slice:
        return ("slice", t.start, t.stop, t.step)
    try:
        hash(t)
    except TypeError:
        return ("id", id(t))
    return (tp.__name__, t) if tp in (bool, int, float) else t


def common_subexpressions(p) -> None:
    """One step for equal pure steps on the same slots (the second reads the first's)."""
    bad, groups = written(p)
    seen, mapping, kept = {}, {}, []
    for eq in p.eqs:
        pure = (eq.op[0] not in ("guard", "setitem") and not eq.writes and eq.outs
                and not any(groups[o] in bad for o in eq.outs)
                and not any(groups.get(s) in bad for s in eq.refs()))
        if eq.op[0] == "backend" and eq.op[2] in ("empty", "empty_like"):
            pure = False
        if pure:
            args = replace(eq.args, mapping)
            kwargs = replace(eq.kwargs, mapping)
            if eq.op == ("prim", "einsum"):  # how a plan runs (and lays out) is no value
                kwargs = {"spec": kwargs["spec"]}
            key = (_key(eq.op), _key(args), _key(kwargs), eq.scalar, eq.seq)
            first = seen.get(key)
            if first is not None and len(first.outs) == len(eq.outs):
                mapping.update(zip(eq.outs, first.outs))
                continue
            seen[key] = eq
        kept.append(eq)
    p.eqs = kept
    rename(p, mapping)


# -- einsum chains ----------------------------------------------------------------------------

def _cost(spec: Spec, shapes: list) -> float:
    return float(path_info(spec, shapes)[1].opt_cost)


def merged_spec(outer: Spec, k: int, inner: Spec) -> Spec:
    """``outer`` with its operand ``k`` replaced by ``inner``'s operands: ``inner``'s
    output indices renamed to that operand's, its summed indices made fresh."""
    names = dict(zip(inner.output, outer.inputs[k]))
    summed = [l for l in inner.labels if l not in names]
    names.update(zip(summed, fresh(set(outer.labels) | set(inner.labels), len(summed))))
    terms = tuple(tuple(names[l] for l in t) for t in inner.inputs)
    return Spec(outer.inputs[:k] + terms + outer.inputs[k + 1:], outer.output)


def merge_einsums(p) -> None:
    """Fold an einsum read once, by another einsum, into it, where that costs less."""
    bad, groups = written(p)
    changed = True
    while changed:
        changed = False
        n = uses(p)
        made = {eq.outs[0]: eq for eq in p.eqs if eq.op == ("prim", "einsum") and eq.outs}
        for eq in p.eqs:
            if eq.op != ("prim", "einsum") or groups[eq.outs[0]] in bad:
                continue
            for k, a in enumerate(eq.args):
                inner = made.get(a.slot)
                if (inner is None or inner is eq or n.get(a.slot) != 1 or inner.scalar
                        or groups[a.slot] in bad or "order" in inner.kwargs
                        and inner.kwargs["order"] is not None):
                    continue
                dtypes = {p.avals[x.slot][1] for x in (*eq.args, *inner.args)}
                if len(dtypes) != 1:
                    continue
                outer_spec, inner_spec = eq.kwargs["spec"], inner.kwargs["spec"]
                spec = merged_spec(outer_spec, k, inner_spec)
                args = eq.args[:k] + inner.args + eq.args[k + 1:]
                shapes = [p.avals[x.slot][0] for x in args]
                before = _cost(outer_spec, [p.avals[x.slot][0] for x in eq.args]) + \
                    _cost(inner_spec, [p.avals[x.slot][0] for x in inner.args])
                if _cost(spec, shapes) >= before:
                    continue
                eq.args, eq.kwargs = args, {"spec": spec}
                p.eqs.remove(inner)
                changed = True
                break
            if changed:
                break


# -- constant layouts ----------------------------------------------------------------------------

# A product runs faster with its matrices in the order the GEMM reads them than
# with one transposed: the BLAS packs a transposed operand at a cost comparable
# to a small product's, and the small-block kernels chosen for thin products
# (einsumgrad.backends.mkl) read a transposed right factor slower at any size;
# where neither holds the two orders run level. So a constant matrix read
# transposed (a linear layer's [out, in] weight in x @ w.T) is stored once in
# the other order, beside the original where another step reads that as is.
# NumPy's arrays only: it is NumPy's BLAS whose packing this saves.
LAYOUT_MAX_SIZE = 1 << 16  # elements of a constant re-laid (the copy it keeps)


def constant_layouts(p) -> None:
    """A 2-D constant that a two-operand einsum reads transposed, as the left or the
    right factor of a matrix product (its kept index first or last in the output),
    becomes a constant in the other order, the einsum's term for it swapped: the
    same sums, each term the same product."""
    relaid: dict = {}  # constant slot -> the slot of its transpose
    for eq in p.eqs:
        if (eq.op != ("prim", "einsum") or len(eq.args) != 2 or eq.writes
                or eq.kwargs.get("order") is not None):
            continue
        spec = eq.kwargs["spec"]
        for k, a in enumerate(eq.args):
            c = p.consts.get(a.slot)
            term, other = spec.inputs[k], spec.inputs[1 - k]
            if (type(c) is not numpy.ndarray or c.ndim != 2 or len(set(term)) != 2
                    or c.size > LAYOUT_MAX_SIZE or not c.flags.c_contiguous):
                continue
            kept = [l for l in term if l in spec.output]
            summed = [l for l in term if l not in spec.output and l in other]
            if len(kept) != 1 or len(summed) != 1 or kept[0] in other:
                continue
            (o,), (i,) = kept, summed
            # the kept index last or first in the output: the right or the left factor;
            # inside it (a product laid out by a transpose after), the operand's place says
            want = ((i, o) if spec.output[-1] == o else (o, i) if spec.output[0] == o
                    else (i, o) if k else (o, i))
            if want == term:
                continue
            slot = relaid.get(a.slot)
            if slot is None:  # one copy however many steps read it so
                slot = relaid[a.slot] = max(p.avals) + 1
                p.consts[slot] = _read_only(numpy.ascontiguousarray(c.T))
                p.avals[slot] = (c.shape[::-1], p.avals[a.slot][1])
            inputs = list(spec.inputs)
            inputs[k] = want
            args = list(eq.args)
            args[k] = Ref(slot)
            eq.args = type(eq.args)(args)
            eq.kwargs = {"spec": Spec(tuple(inputs), spec.output)}
            break


# -- dead code -----------------------------------------------------------------------------------

def dead_code(p) -> None:
    """Drop steps whose results nothing reads (guards stay; so do writes into a
    buffer something reads)."""
    groups = alias_groups(p)
    live = {o.slot for o in p.outputs if type(o) is Ref}
    keep = [False] * len(p.eqs)
    changed = True
    while changed:
        changed = False
        live_groups = {groups[s] for s in live}
        for i in range(len(p.eqs) - 1, -1, -1):
            if keep[i]:
                continue
            eq = p.eqs[i]
            if (eq.op[0] == "guard" or any(o in live for o in eq.outs)
                    or any(groups[w] in live_groups for w in eq.writes)):
                keep[i] = True
                live.update(eq.refs())
                live_groups = {groups[s] for s in live}
                changed = True
    p.eqs = [eq for eq, k in zip(p.eqs, keep) if k]
    used = {s for eq in p.eqs for s in eq.refs()} | live
    for s in [s for s in p.consts if s not in used]:
        del p.consts[s]


# -- buffers ---------------------------------------------------------------------------------

def mark_owned(p, values: dict) -> None:
    """``p.owned``: slots whose array is a new buffer of the program's own (a ufunc's, a
    fused kernel's, an einsum's product), sharing memory with no input, constant or
    other slot of the trace, so that once it is dead a step may write over it.

    An einsum's result is a view for some specs (a transpose) and new for others; the
    trace's value says which, and the replay runs the same plan on the same shapes.
    """
    consts = [values[c] for c in p.consts if c in values]
    owned = set()
    for eq in p.eqs:
        if (len(eq.outs) != 1 or eq.writes or eq.scalar or eq.seq
                or not (_fresh(eq) or eq.op == ("prim", "einsum"))):
            continue
        o = eq.outs[0]
        v = values.get(o)
        if not isinstance(v, numpy.ndarray) or not v.flags.writeable or v.ndim == 0:
            continue
        others = [values[r] for r in eq.refs() if r in values] + consts
        if any(isinstance(a, numpy.ndarray) and numpy.may_share_memory(v, a) for a in others):
            continue
        owned.add(o)
    p.owned = frozenset(owned)
