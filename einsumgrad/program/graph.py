"""What the passes know of a program's slots: who reads them, which share memory."""
from __future__ import annotations

import numpy

from .trace import Eq, Ref

# Primitives whose result may be (a view of) an input or a parameter.
_VIEW_PRIMS = frozenset(("identity", "reshape", "broadcast_to", "getitem", "einsum", "normalize",
                         "inv_std", "layer_norm", "batch_norm", "patches", "add_bias"))


def alias_groups(p, owned=frozenset(), into: dict | None = None) -> dict:
    """slot -> a representative: slots that may share memory share one.

    ``owned``: results known to be new buffers (``p.owned``), linked to no
    input; ``into``: step index -> the slot it writes its result into in place.
    """
    parent: dict = {}

    def find(s):
        while parent.get(s, s) != s:
            parent[s] = parent.get(parent[s], parent[s])
            s = parent[s]
        return s

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    for i, eq in enumerate(p.eqs):
        if into and i in into:
            for o in eq.outs:
                union(o, into[i])
        if _fresh(eq) or (eq.outs and eq.outs[0] in owned):
            continue
        for o in eq.outs:
            for r in eq.refs():
                union(o, r)
        for w in eq.writes:
            for o in eq.outs:
                union(o, w)
    return {s: find(s) for s in set(parent) | {s for s in p.avals}}


def _fresh(eq: Eq) -> bool:
    """Whether the step's result is a new array, sharing no memory with its inputs."""
    kind = eq.op[0]
    if kind == "fused":
        return True
    if kind == "prim":
        return eq.op[1] not in _VIEW_PRIMS and not eq.writes
    if kind == "ufunc":
        return eq.op[2] == "__call__" and "out" not in eq.kwargs
    if kind == "backend":  # a backend's ufunc (xp.minimum(x, 1)) without out= makes a new array
        return is_ufunc(eq.op[2]) and "out" not in eq.kwargs and not eq.writes
    return kind == "guard"


def is_ufunc(name: str) -> bool:
    """Whether a backend's function ``name`` is NumPy's ufunc of one result (each
    backend's function of that name is its own ufunc: CuPy's, the strict stand-in's)."""
    u = getattr(numpy, name, None)
    return isinstance(u, numpy.ufunc) and u.nout == 1 and u.signature is None


def written(p) -> set:
    """The alias groups that some step writes into."""
    groups = alias_groups(p)
    return {groups[w] for eq in p.eqs for w in eq.writes}, groups


def replace(t, mapping: dict):
    """A template with Refs renamed by ``mapping`` (slot -> slot)."""
    tp = type(t)
    if tp is Ref:
        return Ref(mapping[t.slot]) if t.slot in mapping else t
    if tp is tuple or tp is list:
        return tp(replace(x, mapping) for x in t)
    if tp is dict:
        return {k: replace(v, mapping) for k, v in t.items()}
    return t


def rename(p, mapping: dict) -> None:
    """Every read of a slot in ``mapping`` reads its replacement instead."""
    if not mapping:
        return
    for s in list(mapping):  # follow chains a -> b -> c
        t = mapping[s]
        while t in mapping:
            t = mapping[t]
        mapping[s] = t
    for eq in p.eqs:
        eq.args = replace(eq.args, mapping)
        eq.kwargs = replace(eq.kwargs, mapping)
    p.outputs = [replace(o, mapping) for o in p.outputs]


def uses(p) -> dict:
    """slot -> how many times steps (and the outputs) read it."""
    n: dict = {}
    for eq in p.eqs:
        for s in eq.refs():
            n[s] = n.get(s, 0) + 1
    for o in p.outputs:
        if type(o) is Ref:
            n[o.slot] = n.get(o.slot, 0) + 1
    return n
