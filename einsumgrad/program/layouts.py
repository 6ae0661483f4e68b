"""Wide products written transposed, where the BLAS writes them faster so.

A matrix product comes out in C order: rows of the left operand's free index.
The BLAS runs the product of the transposes into the transposed array, the
same sums, with the roles of its rows and columns swapped; for a wide product
(fewer rows than columns: a layer's ``x @ w.T`` on a batch of 256 against 1024
units) one way round can be the faster (on the bench's AMD CPU the transposed
one in float32, by 5-10%; neither in float64). Which, is measured per machine
(:func:`einsumgrad.backends.mkl.writes_transposed`).

:func:`transposed_products` gives such an einsum the output order ``(1, 0)``:
its plan writes the result in Fortran order. What is computed from it element
by element keeps that layout (NumPy's ufuncs follow their operands' order; a
fused kernel runs its reversed loops, :func:`einsumgrad.program.fuse.kernel_source`),
and the einsums reading it take any layout. So the pass takes a whole
*component* or nothing: the 2-D values of one shape joined by element-wise
steps (a layer's product, its bias add, its activation; backward, the
activation's derivative times the product that brings the cotangent), each
made by an einsum of a matrix by a matrix or an element-wise step, each read
only by einsums and by the element-wise steps of the component, none an
output of the program or written into. The products of a component all write
transposed (a kernel reading both layouts would read one across its rows).
``p.layouts`` records the component's slots (the workspace gives an
element-wise result there a buffer of that layout: :mod:`.compile`). The
values are the same sums, as the BLAS rounds them in either order.
"""
from __future__ import annotations

import math

from .compile import DIRECT
from .graph import written
from .trace import Ref

TRANSPOSED = (1, 0)  # a matrix's axes, outermost in memory first: Fortran order


def transposed_products(p) -> None:
    """Write the products of each component where a wide one gains by it transposed
    (see the module docstring); ``p.layouts``: slot -> its order, for those."""
    p.layouts = {}
    if p.device != "cpu" or set(p.devices) != {"numpy"}:
        return
    from ..backends import mkl
    if mkl.chosen_matmul is None:
        return
    bad, groups = written(p)
    made = {eq.outs[0]: eq for eq in p.eqs if len(eq.outs) == 1}
    readers: dict = {}
    for eq in p.eqs:
        for s in set(eq.refs()):
            readers.setdefault(s, []).append(eq)
    fixed = {o.slot for o in p.outputs if type(o) is Ref} | set(p.inputs) | set(p.consts)
    parent: dict = {}

    def root(s):
        while parent.get(s, s) != s:
            s = parent[s]
        return s
    for eq in p.eqs:  # components: 2-D values of one shape joined by element-wise steps
        if _elementwise(eq) and len(p.avals[eq.outs[0]][0]) == 2:
            for s in eq.refs():
                if p.avals[s][0] == p.avals[eq.outs[0]][0]:
                    parent[root(s)] = root(eq.outs[0])
    components: dict = {}
    for s in set(parent) | set(made):
        components.setdefault(root(s), set()).add(s)
    for inside in components.values():
        products = [made[s] for s in inside if s in made and _product(made[s], p)]
        # the measured choice last: a component that fails the rest measures nothing
        if (not products or inside & fixed
                or any(s not in made or groups.get(s) in bad
                       or not (_product(made[s], p) or _elementwise(made[s])) for s in inside)
                or any(not (r.op == ("prim", "einsum")
                            or (_elementwise(r) and r.outs[0] in inside))
                       for s in inside for r in readers.get(s, ()))
                or not any(_wide(eq, p) for eq in products)):
            continue
        for eq in products:
            eq.kwargs = {"spec": eq.kwargs["spec"], "order": TRANSPOSED}
        p.layouts.update((s, TRANSPOSED) for s in inside)


def _elementwise(eq) -> bool:
    """A step NumPy's ufunc or a fused kernel runs over operands of any layout."""
    return (len(eq.outs) == 1 and not (eq.writes or eq.scalar or eq.seq or eq.kwargs)
            and (eq.op[0] == "fused" or (eq.op[0] == "prim" and eq.op[1] in DIRECT)))


def _product(eq, p) -> bool:
    """An einsum of two matrices whose result's rows come from one and its columns
    from the other (one matmul: its plan writes either layout)."""
    if (eq.op != ("prim", "einsum") or len(eq.args) != 2 or len(eq.outs) != 1
            or eq.writes or eq.seq or eq.scalar or "order" in eq.kwargs
            or any(type(a) is not Ref for a in eq.args)):
        return False
    spec = eq.kwargs["spec"]
    shape = p.avals[eq.outs[0]][0]
    if len(spec.output) != 2 or len(shape) != 2 or min(shape) < 2:
        return False
    (a, b), (r, c) = spec.inputs, spec.output
    return (r in a) != (r in b) and (c in a) != (c in b) and (r in a) != (c in a) \
        and len(set(a)) == len(a) and len(set(b)) == len(b)


def _wide(eq, p) -> bool:
    """A product measured faster written transposed (rows fewer than columns)."""
    from ..backends import mkl
    spec = eq.kwargs["spec"]
    (m, n), dtype = p.avals[eq.outs[0]][:2]
    sizes = {l: d for t, a in zip(spec.inputs, eq.args) for l, d in zip(t, p.avals[a.slot][0])}
    k = math.prod(d for l, d in sizes.items() if l not in spec.output)
    return mkl.writes_transposed(dtype, m, n, k)
