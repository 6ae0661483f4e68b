"""Inspection for people: ``explain`` one einsum, ``trace`` a whole function."""
from __future__ import annotations

from typing import Any, Callable

from .derive import derive, vjp_pattern
from .plan import path_info
from .spec import ELLIPSIS, ELLIPSIS_GROUP, FRESH, name, render, spec_type_error
from .tensor import toposort
from .transforms import trace_call


def explain(spec: str, *shapes) -> str:
    """A text for people: the parsed spec, the contraction path and its cost,
    and each operand's VJP, JVP and Jacobian pattern.

    Example:
        >>> print(explain('ij,jk->ik', (2, 3), (3, 4)))  # doctest: +SKIP

    Raises:
        EinsumError: a bad spec, or a shape whose size is negative or not an
            integer (the operand and the axis named).
    """
    if not isinstance(spec, str):
        raise spec_type_error("explain", spec)
    d = derive(spec, *shapes)
    s = d.spec
    n = len(s.inputs)
    ops = [f"x{k}" for k in range(n)]
    lines = [f"einsum {spec!r}"]
    lhs, rhs = render(s).split("->")
    for k, term in enumerate(lhs.split(",")):
        shape = f" shape {d.shapes[k]}" if d.shapes else ""
        lines.append(f"  operand {k} ({ops[k]}): {term or '(scalar)'}{shape}")
    lines.append(f"  output: {rhs or '(scalar)'}" + (f" shape {d.out_shape}" if d.shapes else ""))
    summed = [l for l in s.labels if l not in s.output]
    if summed:
        lines.append("  summed over: " + ", ".join(name(l) for l in summed))
    if any(l == ELLIPSIS_GROUP or ELLIPSIS <= l < FRESH for l in summed):
        lines.append("  the output leaves out '...': its axes are summed")
    for k, t in enumerate(s.inputs):
        rep = sorted({name(l) for l in t if t.count(l) > 1})
        if rep:
            lines.append(f"  operand {k} repeats {', '.join(rep)}: a diagonal")
        if d.broadcast[k]:
            lines.append(f"  operand {k} broadcasts axes {d.broadcast[k]} from size 1")
    if d.shapes:
        path, info = path_info(d.clean, [s2 for s2 in _clean_shapes(d)])
        lines.append("")
        lines.append("contraction path (opt_einsum): " + " -> ".join(str(p) for p in path))
        lines.append(f"  cost: {int(info.opt_cost):,} FLOPs; largest intermediate: "
                     f"{int(info.largest_intermediate):,} elements")
    lines.append("")
    lines.append("reverse mode (VJP): g is the output's cotangent; each pattern takes g, then")
    lines.append("the other operands in order, and gives the gradient of operand k")
    for k in range(n):
        lines.append(f"  d/d{ops[k]}: {d.vjp(k)}")
    lines.append("forward mode (JVP): the same einsum with the tangent in slot k, summed over k")
    for k in range(n):
        lines.append(f"  tangent in {ops[k]}: {d.jvp(k)}")
    lines.append("Jacobian J[out | operand]: the other operands written onto the diagonal")
    lines.append("(an index on both sides of '|'), indices on the left only summed")
    for k in range(n):
        shape = ""
        if d.shapes:
            shape = f"  shape {d.out_shape + tuple(d.shapes[k])}"
        lines.append(f"  d out/d{ops[k]}: {d.jacobian(k)}{shape}")
    return "\n".join(lines)


def _clean_shapes(d) -> list:
    return [s if q is None else q for s, q in zip(d.shapes, d.squeezed_shapes)]


class Tape:
    """The ops ``f`` recorded, in order, with their shapes and derived patterns."""

    def __init__(self, tensors: list, inputs: list, output):
        self.tensors, self.inputs, self.output = tensors, inputs, output

    def _names(self) -> dict:
        names = {id(x): f"x{i}" for i, x in enumerate(self.inputs)}
        c = 0
        for t in self.tensors:
            if id(t) not in names:
                if t.node is None:
                    names[id(t)] = f"c{c}"
                    c += 1
                else:
                    names[id(t)] = f"v{len([1 for v in names.values() if v.startswith('v')])}"
        return names

    def __str__(self) -> str:
        names = self._names()
        lines = []
        for t in self.tensors:
            node = t.node
            if node is None or id(t) in {id(x) for x in self.inputs}:
                continue
            args = ", ".join(f"{names[id(x)]}{tuple(x.shape)}" for x in node.inputs)
            head = f"{names[id(t)]}{tuple(t.shape)} = {node.prim.name}"
            if node.prim.name == "einsum":
                spec = node.params["spec"]
                head += f" '{render(spec)}'"
                lines.append(f"{head}({args})")
                for k in range(len(node.inputs)):
                    lines.append(f"    vjp {k}: {vjp_pattern(spec, k, (), spec.inputs[k])}")
            else:
                params = {k: v for k, v in node.params.items() if k in ("shape",)}
                lines.append(f"{head}({args}{', ' if params else ''}"
                             f"{', '.join(f'{k}={v}' for k, v in params.items())})")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz source of the recorded graph."""
        names = self._names()
        out = ["digraph tape {", "  rankdir=LR;"]
        for t in self.tensors:
            label = f"{names[id(t)]} {tuple(t.shape)}"
            out.append(f'  "{names[id(t)]}" [label="{label}", shape=box];')
            node = t.node
            if node is not None and id(t) not in {id(x) for x in self.inputs}:
                op = f"op_{names[id(t)]}"
                out.append(f'  "{op}" [label="{node.prim.name}", shape=ellipse];')
                out.append(f'  "{op}" -> "{names[id(t)]}";')
                for x in node.inputs:
                    out.append(f'  "{names[id(x)]}" -> "{op}";')
        out.append("}")
        return "\n".join(out)


def trace(f: Callable, *args: Any) -> Tape:
    """Run ``f`` once, recording every op, and return the :class:`Tape`.

    Raises:
        TypeError: ``f`` is not callable (a matrix, as for NumPy's ``trace``).
    """
    if not callable(f):
        raise TypeError(f"eg.trace(f, *args) records the ops f runs; f is a "
                        f"{type(f).__name__}. A matrix's trace is eg.einsum('ii', a)")
    xs, out = trace_call(f, args, tuple(range(len(args))))
    return Tape(toposort([out], lambda t: True, {id(x) for x in xs}), xs, out)
