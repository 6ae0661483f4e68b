"""A hypothesis strategy for random einsum problems NumPy accepts.

A case is ``(subscripts, shapes, full)``: 1 to 4 operands over a few letters,
with repeated indices inside one operand, indices summed away, ``...`` (rank 0
to 2, placed anywhere in a term), size-1 broadcasting of labelled and of
ellipsis axes, scalars (empty terms), and implicit or explicit output.
``full[k]`` is operand k's shape with every broadcast axis at its full size,
for references (PyTorch) that should see the broadcast spelled out.
"""
from __future__ import annotations

from hypothesis import strategies as st

LETTERS = "abcdef"


def _sometimes(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


@st.composite
def einsum_cases(draw, max_operands: int = 4):
    """``(subscripts, shapes, full)`` with 1 to ``max_operands`` operands."""
    n = draw(st.integers(1, max_operands))
    pool = draw(st.lists(st.sampled_from(LETTERS), min_size=1, max_size=5, unique=True))
    size = {l: draw(st.integers(1, 3)) for l in pool}
    ell = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) if _sometimes(draw, 35) else None
    terms, shapes = [], []
    for _ in range(n):
        labels = draw(st.lists(st.sampled_from(pool), max_size=3))
        # One size per label inside an operand (repeats must agree); 1 broadcasts.
        mine = {l: 1 if _sometimes(draw, 20) else size[l] for l in labels}
        shape = [mine[l] for l in labels]
        term = "".join(labels)
        if ell is not None and _sometimes(draw, 70):
            r = draw(st.integers(0, len(ell)))
            at = draw(st.integers(0, len(labels)))
            term = term[:at] + "..." + term[at:]
            shape[at:at] = [1 if _sometimes(draw, 20) else d for d in ell[len(ell) - r:]]
        terms.append(term)
        shapes.append(tuple(shape))
    subscripts = ",".join(terms)
    if _sometimes(draw, 70):  # explicit output: some of the labels, in any order
        seen = list(dict.fromkeys(l for t in terms for l in t if l != "."))
        out = draw(st.permutations(seen))[:draw(st.integers(0, len(seen)))]
        out = "".join(out)
        if any("..." in t for t in terms):
            at = draw(st.integers(0, len(out)))
            out = out[:at] + "..." + out[at:]
        subscripts += "->" + out
    return subscripts, shapes, full_shapes(subscripts, shapes)


def full_shapes(subscripts: str, shapes) -> list:
    """Each operand's shape with its size-1 broadcast axes at full size.

    An axis is a letter or an ellipsis position counted from the right; its
    full size is the largest any operand gives it (NumPy's broadcasting).
    """
    keys = []
    for term, shape in zip(subscripts.split("->")[0].split(","), shapes):
        before, _, after = term.partition("...")
        r = len(shape) - len(before) - len(after)
        keys.append(list(before) + [("...", i - r) for i in range(r)] + list(after))
    top: dict = {}
    for key, shape in zip(keys, shapes):
        for k, n in zip(key, shape):
            top[k] = max(top.get(k, 1), n)
    return [tuple(top[k] for k in key) for key in keys]
