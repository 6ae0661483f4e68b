"""Pytrees: nested containers of leaves, read as JAX reads them.

A pytree is a leaf, or a ``list``, ``tuple``, namedtuple, ``dict`` or
``OrderedDict`` of pytrees, or ``None`` (a node with no leaves). Anything else
(a Tensor, an array, a number, a dict subclass) is a leaf. The transforms
flatten their arguments and outputs into leaves, differentiate leaf by leaf,
and rebuild the structure, so ``grad`` of a list of arrays is a list of
gradients and ``grad`` of a dict of parameters a dict of gradients.

A ``dict``'s keys are taken in sorted order (JAX's), so two dicts with the same
keys flatten alike whatever order they were built in; an ``OrderedDict`` keeps
its own order.

>>> leaves, tree = flatten({"w": [1.0, 2.0], "b": None, "a": (3.0,)})
>>> leaves
[3.0, 1.0, 2.0]
>>> unflatten(tree, [x * 10 for x in leaves])
{'a': (30.0,), 'b': None, 'w': [10.0, 20.0]}
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator


class TreeDef:
    """The structure of a pytree, without its leaves: what :func:`unflatten` rebuilds.

    Attributes:
        kind: the node's type (``list``, ``tuple``, a namedtuple class, ``dict``,
            ``OrderedDict``, ``type(None)``), or ``None`` for a leaf.
        keys: a dict's keys in flattening order (``None`` for other nodes).
        children: the children's structures.
        num_leaves: how many leaves the tree holds.
    """

    __slots__ = ("kind", "keys", "children", "num_leaves", "_hash")

    def __init__(self, kind: type | None, keys: tuple | None = None, children: tuple = ()):
        self.kind, self.keys, self.children = kind, keys, children
        self.num_leaves = 1 if kind is None else sum(c.num_leaves for c in children)
        self._hash = None

    def __eq__(self, other: object) -> bool:
        return (self is other or isinstance(other, TreeDef) and self.kind is other.kind
                and self.keys == other.keys and self.children == other.children)

    def __hash__(self) -> int:  # a structure is hashed on every jit call: once is enough
        h = self._hash
        if h is None:
            h = self._hash = hash((self.kind, self.keys, self.children))
        return h

    def __reduce__(self):  # not the hash: a type's differs in another process
        return TreeDef, (self.kind, self.keys, self.children)

    def __repr__(self) -> str:
        if self.kind is None:
            return "*"
        if self.kind is type(None):
            return "None"
        inner = [repr(c) for c in self.children]
        if self.keys is not None:
            inner = [f"{k!r}: {c}" for k, c in zip(self.keys, inner)]
            return "{" + ", ".join(inner) + "}"
        if self.kind is list:
            return "[" + ", ".join(inner) + "]"
        trail = "," if len(inner) == 1 else ""
        name = "" if self.kind is tuple else self.kind.__name__
        return f"{name}(" + ", ".join(inner) + trail + ")"


LEAF = TreeDef(None)
_NONE = TreeDef(type(None))


def _dict_keys(d: dict) -> tuple:
    try:
        return tuple(sorted(d))
    except TypeError:  # keys that do not compare (1 and "a"): their own order, still deterministic
        return tuple(d)


def _flatten(x: Any, out: list) -> TreeDef:
    kind = type(x)
    if kind is list or kind is tuple:
        return TreeDef(kind, None, tuple([_flatten(c, out) for c in x]))
    if kind is dict or kind is OrderedDict:
        keys = _dict_keys(x) if kind is dict else tuple(x)
        return TreeDef(kind, keys, tuple([_flatten(x[k], out) for k in keys]))
    if x is None:
        return _NONE
    if isinstance(x, tuple) and hasattr(kind, "_fields"):  # a namedtuple
        return TreeDef(kind, None, tuple([_flatten(c, out) for c in x]))
    out.append(x)
    return LEAF


def flatten(tree: Any) -> tuple[list, TreeDef]:
    """The leaves of ``tree`` in order, and its structure.

    A leaf on its own gives ``([tree], LEAF)`` without walking anything (the
    transforms' common case, a single Tensor, stays cheap).
    """
    if not (type(tree) is list or tree is None or isinstance(tree, (tuple, dict))):
        return [tree], LEAF
    out: list = []
    return out, _flatten(tree, out)


def _build(t: TreeDef, leaves: Iterator) -> Any:
    if t.kind is None:
        return next(leaves)
    if t.kind is type(None):
        return None
    children = [_build(c, leaves) for c in t.children]
    if t.keys is not None:
        return t.kind(zip(t.keys, children))
    if t.kind is list:
        return children
    if t.kind is tuple:
        return tuple(children)
    return t.kind(*children)  # a namedtuple


def unflatten(tree: TreeDef, leaves) -> Any:
    """Rebuild a pytree of structure ``tree`` with ``leaves`` in order.

    Raises:
        ValueError: ``leaves`` does not hold exactly ``tree.num_leaves`` items.
    """
    if tree is LEAF and len(leaves) == 1:  # the common case: one Tensor
        return leaves[0]
    leaves = list(leaves)
    if len(leaves) != tree.num_leaves:
        raise ValueError(f"a pytree of structure {tree} takes {tree.num_leaves} leaves, "
                         f"got {len(leaves)}")
    return _build(tree, iter(leaves))


def tree_map(f: Callable, tree: Any, *rest: Any) -> Any:
    """``f`` applied leaf by leaf, the structure kept; ``rest`` are trees of the same structure.

    Raises:
        ValueError: a tree in ``rest`` is structured otherwise.
    """
    leaves, t = flatten(tree)
    others = []
    for r in rest:
        more, u = flatten(r)
        if u != t:
            raise ValueError(f"tree_map: structures differ: {t} and {u}")
        others.append(more)
    return unflatten(t, [f(*xs) for xs in zip(leaves, *others)])
