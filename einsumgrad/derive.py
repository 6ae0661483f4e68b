"""The derivation layer: the derivatives of one einsum, derived on index labels.

For ``z = einsum(spec, x_0, ..., x_n)``:

* **VJP** for operand k: one einsum, the cotangent ``g`` first and then the
  other operands, producing operand k's subscripts. Where one einsum cannot
  say it, extra steps follow: ``broadcast`` an index that only operand k has
  (it was summed away), ``diag`` for an index repeated inside operand k (the
  cotangent is written onto the diagonal), ``unsqueeze`` for axes that NumPy
  broadcast from size 1. ``'ij,jk->ik'`` gives ``'ik,jk->ij'``.
* **JVP** for operand k: the same einsum with the tangent in slot k.
* **Jacobian** w.r.t. operand k: ``J[out..., x...]``, the other operands'
  contraction written onto the generalized diagonal that ties each index of
  ``x`` to the same index of ``out`` (the diagonal embedding), every index
  that is not kept summed (the collapse).

All of it is pure: labels in, patterns out, cached per spec; this module
imports the spec layer alone and never touches an array. Running a pattern
is the rules layer's business (:mod:`einsumgrad.rules.einsum`: the extra
steps fused into one einsum as constant operands, so the result is itself
differentiable); it installs the runner behind ``Jacobian.materialize`` and
the Jacobian products with :func:`install_runner`.
"""
from __future__ import annotations

import operator
from functools import lru_cache
from typing import Sequence

from .spec import (OperandIndexError, Spec, bind_sizes, check_shapes, fresh, parse, render,
                   render_terms, spec_type_error)

COT = "g"  # how the cotangent / tangent is named in printed patterns


class Derivation:
    """The derivatives of one einsum: ``eg.derive(spec, *shapes)``."""

    def __init__(self, subscripts: str, shapes: Sequence[tuple] | None = None):
        if not isinstance(subscripts, str):
            raise spec_type_error("derive", subscripts)
        shapes = None if shapes is None or len(shapes) == 0 else check_shapes(shapes, subscripts)
        self.subscripts = subscripts
        self.shapes = shapes
        self.spec = parse(subscripts, None if shapes is None else tuple(len(s) for s in shapes))
        if shapes is None:
            self.sizes, self.broadcast = None, tuple(() for _ in self.spec.inputs)
        else:
            self.sizes, self.broadcast = bind_sizes(self.spec, shapes, subscripts)
        # The spec the engine executes: axes broadcast from size 1 are squeezed away.
        self.clean = Spec(tuple(tuple(l for ax, l in enumerate(t) if ax not in b)
                                for t, b in zip(self.spec.inputs, self.broadcast)),
                          self.spec.output)
        self.squeezed_shapes = None if shapes is None else tuple(
            tuple(n for ax, n in enumerate(s) if ax not in b) if b else None
            for s, b in zip(shapes, self.broadcast))

    @property
    def n(self) -> int:
        return len(self.spec.inputs)

    @property
    def out_shape(self) -> tuple | None:
        return None if self.sizes is None else tuple(self.sizes[l] for l in self.spec.output)

    def _k(self, k: int) -> int:
        """Operand number ``k`` (negative counts from the end) as an index in range.

        Raises:
            OperandIndexError (an EinsumError and an IndexError): ``k`` out of
                range or not an integer; the message names the operand count.
        """
        n = self.n
        try:
            if isinstance(k, bool):
                raise TypeError
            i = operator.index(k)
        except TypeError:
            raise OperandIndexError(f"operand number {k!r} ({type(k).__name__}) is not an "
                                    f"integer: {self.subscripts!r} has {n} operand"
                                    f"{'s' if n != 1 else ''}, numbered 0 to {n - 1} "
                                    f"(or -{n} to -1)") from None
        if not -n <= i < n:
            raise OperandIndexError(f"operand {k!r} out of range: {self.subscripts!r} has {n} "
                                    f"operand{'s' if n != 1 else ''}, numbered 0 to {n - 1} "
                                    f"(or -{n} to -1)")
        return i % n

    def vjp(self, k: int) -> "VJP":
        """The reverse-mode pattern for operand ``k``."""
        k = self._k(k)
        return vjp_pattern(self.clean, k, self.broadcast[k], self.spec.inputs[k])

    def jvp(self, k: int) -> "JVP":
        """The forward-mode pattern for a tangent in operand ``k``."""
        return JVP(self.spec, self._k(k))

    def jacobian(self, k: int) -> "Jacobian":
        """The full Jacobian with respect to operand ``k``."""
        return Jacobian(self, self._k(k))

    def __repr__(self) -> str:
        return f"derive({self.subscripts!r})"


def derive(subscripts: str, *shapes) -> Derivation:
    """Derive the VJP, JVP and Jacobian patterns of one einsum, symbolically.

    Args:
        subscripts: an einsum spec in NumPy's grammar.
        *shapes: the operands' shapes; needed only to expand ``...`` and to see
            size-1 broadcasting.

    Raises:
        EinsumError: a bad spec, or a shape with a size that is negative or not
            an integer (the operand and the axis named); a ``TypeError`` too
            where the spec is not a string.

    Example:
        >>> str(derive('ij,jk->ik').vjp(1))
        'ik,ij->jk'
    """
    if not isinstance(subscripts, str):
        raise spec_type_error("derive", subscripts)
    return _derive(subscripts, check_shapes(shapes, subscripts) if shapes else None)


# Keyed by shapes too: as small as the plan caches (einsumgrad.plan.CACHE_SIZE),
# so batch sizes that change every step do not grow it.
@lru_cache(maxsize=512)
def _derive(subscripts: str, shapes: tuple | None) -> Derivation:
    return Derivation(subscripts, shapes)


class VJP:
    """Reverse-mode pattern: ``g, *others -> operand k`` plus steps.

    Attributes:
        core: the one einsum (cotangent first, then the other operands).
        steps: ``('broadcast', from, to)``, ``('diag', from, to)``,
            ``('unsqueeze', from, raw)`` where one einsum cannot say it.
    """

    def __init__(self, spec: Spec, k: int, broadcast_axes: tuple, raw_term: tuple):
        self.spec, self.k = spec, k
        term = spec.inputs[k]
        others = (spec.output,) + tuple(t for j, t in enumerate(spec.inputs) if j != k)
        present = set().union(*others)
        uniq = tuple(dict.fromkeys(term))
        self.core = Spec(others, tuple(l for l in uniq if l in present))
        self.steps = []
        lone = tuple(l for l in uniq if l not in present)
        if lone:
            self.steps.append(("broadcast", self.core.output, uniq))
        if len(uniq) != len(term):
            self.steps.append(("diag", uniq, term))
        self.raw_term, self.broadcast_axes = raw_term, broadcast_axes
        if broadcast_axes:
            self.steps.append(("unsqueeze", term, raw_term))
        # The fused einsum that runs: identity matrices tie each repeat of an
        # index to a fresh copy, ones vectors broadcast the lone indices.
        copies = iter(fresh(spec.labels, len(term)))
        out, seen, extra = [], set(), []
        for l in term:
            if l in seen:
                f = next(copies)
                extra.append(("eye", (l, f)))
                out.append(f)
            else:
                seen.add(l)
                out.append(l)
        extra += [("ones", (l,)) for l in lone]
        self.extra = tuple(extra)
        self.fused = Spec(others + tuple(t for _, t in extra), tuple(out))

    def __str__(self) -> str:
        s = render(self.core)
        letters = _letters(self.spec)
        for kind, a, b in self.steps:
            if kind == "unsqueeze":
                raw = "".join("1" if ax in self.broadcast_axes else "?" for ax in range(len(b)))
                it = iter(_term_str(a, letters))
                b_s = "".join(c if c == "1" else next(it) for c in raw)
                s += f" | unsqueeze {_term_str(a, letters)}->{b_s}"
            else:
                s += f" | {kind} {_term_str(a, letters)}->{_term_str(b, letters)}"
        return s

    def __repr__(self) -> str:
        return f"<VJP {self}>"


@lru_cache(maxsize=4096)
def vjp_pattern(spec: Spec, k: int, broadcast_axes: tuple, raw_term: tuple) -> VJP:
    """The VJP pattern for operand ``k`` of a clean ``spec`` (cached): what
    ``derive(...).vjp(k)`` gives, and what the einsum primitive's rule runs."""
    return VJP(spec, k, broadcast_axes, raw_term)


@lru_cache(maxsize=4096)
def batched(spec: Spec, slots: tuple, nb: int) -> Spec:
    """``spec`` with ``nb`` fresh leading indices on the given slots and the output."""
    lead = tuple(fresh(spec.labels, nb))
    return Spec(tuple(lead + t if i in slots else t for i, t in enumerate(spec.inputs)),
                lead + spec.output)


class JVP:
    """Forward-mode pattern: the einsum with the tangent in slot k."""

    def __init__(self, spec: Spec, k: int):
        self.spec, self.k = spec, k

    def __str__(self) -> str:
        return render(self.spec)

    def __repr__(self) -> str:
        return f"<JVP slot {self.k}: {self}>"


class Jacobian:
    """``J[out..., x_k...]``: a diagonal embedding, then a collapse.

    ``str()`` reads as a generalized einsum: the other operands on the left,
    ``J``'s subscripts on the right with a bar between the output's and
    operand k's. An index on both sides of the bar is a diagonal (``J`` is zero
    off it); an index on the right only is broadcast; one on the left only is
    summed (the collapse). ``'ij,jk->ik'`` w.r.t. 0 reads ``'jk->ik|ij'``:
    ``J[i,k,i',j] = w[j,k]`` where ``i' = i``.
    """

    def __init__(self, d: Derivation, k: int):
        self.d, self.k = d, k
        spec = d.clean
        self.others = tuple(t for j, t in enumerate(spec.inputs) if j != k)

    def __str__(self) -> str:
        spec = self.d.spec
        return render_terms(self.others, spec.output, None) + "|" + \
            _term_str(spec.inputs[self.k], _letters(spec))

    def __repr__(self) -> str:
        return f"<Jacobian wrt operand {self.k}: {self}>"

    def materialize(self, *operands):
        """Build ``J`` with shape ``out.shape + operand_k.shape``.

        ``J`` starts as zeros; the other operands' contraction is written onto
        its generalized diagonal through a strided view. Peak memory is ``J``
        plus that contraction: no ``x.shape x w.shape x x.shape`` intermediate.
        Returns a Tensor when given Tensors, else a backend array.
        """
        return _runner("materialize")(self, *operands)

    def jvp(self, v, *operands):
        """``J @ v`` (v shaped like operand k) without building ``J``."""
        return _runner("jvp")(self, v, *operands)

    def vjp(self, u, *operands):
        """``u @ J`` (u shaped like the output) without building ``J``."""
        return _runner("vjp")(self, u, *operands)


_runners: dict = {}


def install_runner(**runners) -> None:
    """How Jacobians run on arrays: ``materialize``, ``jvp`` and ``vjp``, each
    ``fn(jacobian, ...)`` (the rules layer installs them; this layer never runs)."""
    _runners.update(runners)


def _runner(what: str):
    if what not in _runners:
        raise RuntimeError(f"Jacobian.{what} runs on arrays: import einsumgrad (its rules "
                           f"layer installs the runner), not einsumgrad.derive alone")
    return _runners[what]


def _letters(spec: Spec) -> dict:
    """The letters ``render`` gives each label of ``spec`` (so steps print alike)."""
    s = render(spec)
    lhs, rhs = s.split("->")
    letters = {}
    for t, txt in zip(spec.inputs + (spec.output,), lhs.split(",") + [rhs]):
        if "..." not in txt and len(txt) == len(t):
            letters.update(zip(t, txt))
    return letters


def _term_str(term: tuple, letters: dict) -> str:
    return render_terms([], term, letters, sep="")
