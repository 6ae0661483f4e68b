"""The spec layer: NumPy's einsum grammar parsed into integer index labels.

A :class:`Spec` names every axis of every operand, and of the output, by an
integer label. Letters keep their character code (so sorting labels sorts them
the way NumPy's implicit mode does, uppercase first); the axes covered by
``...`` get labels from :data:`ELLIPSIS` on, aligned from the right as NumPy
broadcasts them; derived patterns draw fresh labels above :data:`FRESH`.
Nothing here touches an array: this layer is pure, and rendering back to
letters happens only at the edge (:func:`render`).
"""
from __future__ import annotations

import operator
import re
from functools import lru_cache
from typing import NamedTuple, Sequence

ELLIPSIS = 1000   # labels of the axes under '...': ELLIPSIS + position in the group
ELLIPSIS_GROUP = -1  # '...' of unknown rank (no shapes given): one opaque label
FRESH = 2000      # labels made up by the derivation layer

Labels = tuple  # tuple[int, ...]


class EinsumError(ValueError):
    """A bad einsum spec or operands; the message names the index or operand at fault."""


class EinsumTypeError(EinsumError, TypeError):
    """A spec (or argument) of the wrong type, e.g. ``None`` or ``bytes`` for the
    spec: a ``TypeError``, as NumPy and torch raise, and an :class:`EinsumError`."""


class OperandIndexError(EinsumError, IndexError):
    """An operand number out of range or not an integer (``derive(...).vjp(k)``):
    an ``IndexError`` for indexing and an :class:`EinsumError`."""


def spec_type_error(what: str, got) -> EinsumTypeError:
    """The error for a spec that is not a ``str``, naming the type received."""
    hint = ""
    if isinstance(got, (bytes, bytearray)):
        hint = f"; decode it first: {bytes(got)!r}.decode()"
    return EinsumTypeError(f"{what}: the spec must be a string, got {type(got).__name__}{hint}")


def check_shapes(shapes: Sequence, subscripts=None) -> tuple:
    """The operands' shapes as tuples of Python ints (NumPy integers accepted).

    Raises:
        EinsumError: a shape that is not a sequence, or a size that is not an
            integer or is negative; the message names the operand and the axis.
    """
    where = f" of {subscripts!r}" if isinstance(subscripts, str) else ""
    out = []
    for k, shape in enumerate(shapes):
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise EinsumError(f"operand {k}{where}: a shape is a tuple of ints, "
                              f"got {type(shape).__name__} {shape!r}")
        sizes = []
        for ax, n in enumerate(shape):
            try:
                if isinstance(n, bool):
                    raise TypeError
                n = operator.index(n)
            except TypeError:
                raise EinsumError(f"operand {k}{where}, axis {ax}: size {n!r} "
                                  f"({type(n).__name__}) is not an integer") from None
            if n < 0:
                raise EinsumError(f"operand {k}{where}, axis {ax}: size {n} is negative")
            sizes.append(n)
        out.append(tuple(sizes))
    return tuple(out)


class Spec(NamedTuple):
    """An einsum over integer labels: one label tuple per operand, and the output's."""

    inputs: tuple
    output: tuple

    def __str__(self) -> str:
        return render(self)

    @property
    def labels(self) -> tuple:
        """Every label, in order of first appearance (inputs, then output)."""
        return tuple(dict.fromkeys(l for t in self.inputs + (self.output,) for l in t))


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _label_char(label: int) -> str | None:
    return chr(label) if 0 <= label < 128 and chr(label) in _LETTERS else None


def letters(n: int) -> tuple:
    """``n`` distinct labels that print as a, b, c, ... (fresh ones past 52)."""
    return tuple(map(ord, _LETTERS[:n])) + tuple(range(FRESH, FRESH + n - len(_LETTERS)))


def render(spec: Spec, names: dict | None = None) -> str:
    """Render a spec as an einsum string.

    Letters keep their letter; an ellipsis group that sits as NumPy would put it
    (a contiguous run, right-aligned in the group) prints as ``...``; any other
    label gets the first letter unused by the spec.
    """
    return render_terms(spec.inputs, spec.output, names)


def render_terms(inputs: Sequence[tuple], output: tuple, names: dict | None = None,
                  sep: str = "->") -> str:
    terms = list(inputs) + [output]
    letters = dict(names or {})
    for l in {l for t in terms for l in t}:
        if l not in letters and _label_char(l):
            letters[l] = chr(l)
    ell = sorted({l for t in terms for l in t if l >= ELLIPSIS and l < FRESH})
    # '...' prints only where it reads back: the output holds the whole group
    # or none of it (then it is summed), and each input that has some of it
    # holds a right-aligned run.
    if not ell:
        ell_ok = False
    elif ell[0] in output:
        ell_ok = _ellipsis_run(output, ell) == (output.index(ell[0]), len(ell))
    else:
        ell_ok = not any(l in ell for l in output)
    ell_ok = ell_ok and all(_ellipsis_run(t, ell) is not None for t in inputs
                            if any(l in ell for l in t))
    used = set(letters.values())
    free = (c for c in _LETTERS if c not in used)
    out = []
    for t in terms:
        s, i = "", 0
        run = _ellipsis_run(t, ell) if ell_ok and any(l in ell for l in t) else None
        while i < len(t):
            l = t[i]
            if l == ELLIPSIS_GROUP:
                s += "..."
            elif run is not None and i == run[0]:
                s += "..."
                i += run[1]
                continue
            else:
                if l not in letters:
                    letters[l] = next(free)
                s += letters[l]
            i += 1
        out.append(s)
    return ",".join(out[:-1]) + sep + out[-1]


def _ellipsis_run(term: tuple, ell: list) -> tuple | None:
    """(start, length) of the ellipsis labels in ``term`` if they can print as '...'."""
    pos = [i for i, l in enumerate(term) if l in ell]
    if not pos:
        return None
    k = len(pos)
    if pos != list(range(pos[0], pos[0] + k)) or list(term[pos[0]:pos[0] + k]) != ell[len(ell) - k:]:
        return None
    return pos[0], k


def fresh(labels, count: int) -> list:
    """``count`` labels made up for a derivation, none of them among ``labels``."""
    top = max([FRESH - 1] + [l for l in labels if l >= FRESH])
    return list(range(top + 1, top + 1 + count))


def letter_label(c: str) -> int:
    return ord(c)


@lru_cache(maxsize=4096)
def parse(subscripts: str, ndims: tuple | None = None) -> Spec:
    """Parse an einsum string into a :class:`Spec`.

    Args:
        subscripts: NumPy's einsum grammar, e.g. ``'ij,jk->ik'``, ``'...ii'``.
            Spaces are ignored, except inside ``...`` or ``->``. An explicit
            output that leaves out the inputs' ``...`` sums its axes (as torch
            and NumPy's optimized path do): ``'...i->i'``.
        ndims: the operands' ranks, which expand ``...``; ``None`` keeps each
            ``...`` as one opaque label (enough to derive patterns symbolically).

    Raises:
        EinsumError: a bad character, a malformed arrow, a space inside ``...``
            or ``->``, a wrong operand count, a rank that does not match the
            subscripts, or a bad output index; :class:`EinsumTypeError` (also a
            ``TypeError``) for a spec that is not a string.
    """
    if not isinstance(subscripts, str):
        raise spec_type_error("einsum", subscripts)
    # Spaces are ignored, as NumPy ignores them, except inside '...' and '->'
    # (NumPy and torch refuse those: '. ..' and '- >' are no tokens).
    if " " in subscripts:
        if _SPACED_ELLIPSIS.search(subscripts):
            raise EinsumError(f"a space inside '...' in {subscripts!r}: an ellipsis is three "
                              f"dots together")
        if _SPACED_ARROW.search(subscripts):
            raise EinsumError(f"malformed arrow in {subscripts!r}: a space inside '->'")
    s = subscripts.replace(" ", "")
    if s.count("->") > 1:
        raise EinsumError(f"malformed arrow in {subscripts!r}: '->' may appear once")
    lhs, arrow, rhs = s.partition("->")
    for part in (lhs, rhs):
        if "-" in part or ">" in part:
            raise EinsumError(f"malformed arrow in {subscripts!r}: a lone '-' or '>'")
    terms = lhs.split(",")
    if ndims is not None and len(terms) != len(ndims):
        raise EinsumError(f"spec {subscripts!r} names {len(terms)} operand(s) but "
                          f"{len(ndims)} were given")
    ell_rank = 0
    inputs = []
    for k, term in enumerate(terms):
        letters, has_ell = _split_term(term, f"operand {k}", subscripts)
        if ndims is None:
            inputs.append(letters[0] + ((ELLIPSIS_GROUP,) if has_ell else ()) + letters[1])
            continue
        n = len(letters[0]) + len(letters[1])
        if has_ell:
            r = ndims[k] - n
            if r < 0:
                raise EinsumError(f"operand {k} has rank {ndims[k]} but its subscripts "
                                  f"{term!r} name at least {n} axes")
            ell_rank = max(ell_rank, r)
            inputs.append((letters[0], r, letters[1]))
        else:
            if ndims[k] != n:
                raise EinsumError(f"operand {k} has rank {ndims[k]} but its subscripts "
                                  f"{term!r} name {n} axes")
            inputs.append((letters[0], None, letters[1]))
    if ndims is not None:
        group = tuple(range(ELLIPSIS, ELLIPSIS + ell_rank))
        inputs = [a + (group[ell_rank - r:] if r is not None else ()) + b for a, r, b in inputs]
        group_label = group
    else:
        group_label = (ELLIPSIS_GROUP,) if any(ELLIPSIS_GROUP in t for t in inputs) else ()
    inputs = tuple(tuple(t) for t in inputs)
    seen = {l for t in inputs for l in t}
    if arrow:
        letters, has_ell = _split_term(rhs, "the output", subscripts)
        for l in letters[0] + letters[1]:
            if l not in seen:
                raise EinsumError(f"output index {chr(l)!r} appears in no input of {subscripts!r}")
        flat = letters[0] + letters[1]
        for l in flat:
            if flat.count(l) > 1:
                raise EinsumError(f"output index {chr(l)!r} is repeated in {subscripts!r}")
        # '...' in the inputs but not in the explicit output: its axes are
        # summed, as torch and NumPy's optimize path do ('...i->i').
        output = letters[0] + (group_label if has_ell else ()) + letters[1]
    else:
        counts: dict = {}
        for t in inputs:
            for l in t:
                counts[l] = counts.get(l, 0) + 1
        once = sorted(l for l, c in counts.items() if c == 1 and 0 <= l < 128)
        output = tuple(group_label) + tuple(once)
    return Spec(inputs, tuple(output))


def _split_term(term: str, who: str, subscripts: str) -> tuple:
    """Split one term into (letters before '...', letters after), has_ellipsis."""
    if term.count("...") > 1:
        raise EinsumError(f"{who} in {subscripts!r} has '...' more than once")
    before, ell, after = term.partition("...")
    for c in before + after:
        if not ("a" <= c <= "z" or "A" <= c <= "Z"):
            raise EinsumError(f"bad character {c!r} in {who} of {subscripts!r}: "
                              f"subscripts are letters a-z, A-Z and '...'")
    return (tuple(map(ord, before)), tuple(map(ord, after))), bool(ell)


_SPACED_ELLIPSIS = re.compile(r"\. +\.")
_SPACED_ARROW = re.compile(r"- +>")


def name(label: int) -> str:
    """A label as a person reads it: its letter, '...[i]' for an ellipsis axis,
    '...' for the whole ellipsis (no shapes given)."""
    if label == ELLIPSIS_GROUP:
        return "..."
    if 0 <= label < 128:
        return chr(label)
    if ELLIPSIS <= label < FRESH:
        return f"...[{label - ELLIPSIS}]"
    return f"#{label - FRESH}"


def bind_sizes(spec: Spec, shapes: Sequence[tuple], subscripts: str | None = None) -> tuple:
    """Check the operands' shapes against ``spec``.

    Returns:
        ``(sizes, broadcast)``: the size of each label, and for each operand the
        axes that are size 1 against a larger size elsewhere (NumPy broadcasts
        those; the operand is constant along them).

    Raises:
        EinsumError: one index with two sizes (both named), or a repeated index
            inside one operand whose axes differ.
    """
    sizes: dict = {}
    where: dict = {}
    for k, (t, shape) in enumerate(zip(spec.inputs, shapes)):
        for ax, (l, n) in enumerate(zip(t, shape)):
            if t.count(l) > 1:
                first = t.index(l)
                if shape[first] != n:
                    raise EinsumError(f"index {name(l)!r} is repeated in operand {k} but its axes "
                                      f"have sizes {shape[first]} and {n}")
            if l not in sizes or (sizes[l] == 1 and n != 1):
                sizes[l], where[l] = n, k
            elif n != sizes[l] and n != 1:
                raise EinsumError(f"index {name(l)!r} has size {sizes[l]} in operand {where[l]} "
                                  f"but size {n} in operand {k}")
    broadcast = tuple(
        tuple(ax for ax, (l, n) in enumerate(zip(t, shape)) if n == 1 and sizes[l] != 1)
        for t, shape in zip(spec.inputs, shapes))
    return sizes, broadcast
