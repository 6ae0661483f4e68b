"""A NumPy batch transform run on dask arrays, one block of rows per task.

A batch transform proves while it traces that the rows of its batched
arguments never mix, so blocks of rows are independent problems: each dask
task runs the transform itself, on its block's NumPy (or CuPy) arrays, with
no communication, and the blocks' results lie side by side along the same
batch axes. Dask arrays never enter the tape.

This module knows no transform: ``transforms.py`` hands itself over
(``on_blocks(wrapped, argnums, batch_ndim)`` inside ``batch_jacobian``),
which keeps the import graph acyclic. Importing it imports neither the
transforms nor dask: ``is_dask`` looks dask up in ``sys.modules``, and dask
is imported only when a dask array is actually lifted.
"""
from __future__ import annotations

import copyreg
import operator
import sys
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from ..pytree import TreeDef, flatten, unflatten
from ..tensor import Tensor, state

# The tracer's state is per process (per thread): a transform's closure pickled by
# value for a worker must use the worker's own, so it pickles as a reference by name.
copyreg.pickle(type(state), lambda s: "state")


def to_array(x: Any) -> Any:
    """A Tensor's backend array (NumPy or CuPy); anything else as it is."""
    return x.data if isinstance(x, Tensor) else x


# -- the test the transforms run on every call ----------------------------------------

def is_dask(x: Any) -> bool:
    """Whether ``x``, or a leaf of the pytree ``x``, is a dask array.

    Never imports dask: where ``dask.array`` is not in ``sys.modules`` no
    argument can be a dask array, and this is one dictionary lookup.
    """
    mod = sys.modules.get("dask.array")
    array = getattr(mod, "Array", None)
    return array is not None and any(isinstance(leaf, array) for leaf in flatten(x)[0])


# -- lifting -------------------------------------------------------------------------

def _positions(nums, n: int) -> tuple:
    nums = (nums,) if isinstance(nums, int) else tuple(nums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums {a} out of range for {n} argument(s)")
    return tuple(a % n for a in nums)


def _place(args: Sequence, nums: tuple, trees: Sequence[TreeDef], blocks: Sequence) -> list:
    """``args`` with argument ``nums[j]`` rebuilt as ``trees[j]`` from ``blocks``, in order."""
    call, k = list(args), 0
    for i, tree in zip(nums, trees):
        call[i] = unflatten(tree, blocks[k:k + tree.num_leaves])
        k += tree.num_leaves
    return call


class Block:
    """What one task needs and no more: the NumPy transform, the arguments
    that are not blocked (constants such as parameters), the keyword arguments, and
    where the blocks go. One instance is one key of the graph, fetched once by each
    worker; dask pickles it with cloudpickle, so ``f`` may be a closure or a lambda."""

    def __init__(self, local: Callable, args: list, nums: tuple, trees: list[TreeDef],
                 kwargs: dict):
        self.local, self.args, self.nums, self.trees, self.kwargs = local, args, nums, trees, kwargs

    def __call__(self, *blocks) -> tuple:
        out = self.local(*_place(self.args, self.nums, self.trees, blocks), **self.kwargs)
        return tuple(to_array(x) for x in flatten(out)[0])


def _run(block: Block, *arrays) -> tuple:
    """One task: the transform on one block (module level, so it pickles by reference)."""
    return block(*arrays)


def on_blocks(local: Callable, batched=0, batch_ndim: int | None = 1,
              check: Callable | None = None) -> Callable:
    """``local``, a NumPy transform, lifted to dask arrays chunked along the batch axes.

    The lifted function traces ``local`` once on a sample of two rows per
    batch axis (which raises ``BatchMixingError`` for a mixing ``f`` before
    anything is scheduled, and gives each result's shape and dtype), merges
    the non-batch axes of the batched arguments into one chunk, and returns
    lazy dask arrays with the structure of the transform's result, built with
    ``blockwise`` and explicit ``meta``: dask never calls the transform on fake
    inputs. Each block runs the transform on a worker.

    Args:
        local: the transform on NumPy (or CuPy) arrays, e.g. ``batch_jacobian(f, argnums)``,
            returning each result with the batch axes first. It goes to the workers
            pickled by cloudpickle (a closure by value, ``f`` with it).
        batched: the positions of the arguments that carry the batch (an int or a
            tuple; each argument may be a pytree of arrays).
            NumPy arrays there are chunked like the dask ones. The other arguments
            are constants, given whole to every block: they may not be dask arrays.
        batch_ndim: how many leading axes are batch axes; ``None``: every axis
            (``elementwise_grad``), then the batched arrays share one shape.
        check: called on the sample with the same arguments, before the transform:
            for a transform that does not prove by itself that rows stay apart
            (``directional``), a function that does (``batch_jacobian(f)``).

    Returns:
        A function of the same arguments as the transform.
    """
    def lifted(*args, **kwargs):
        import dask.array as da
        from dask import delayed
        from dask.array.utils import meta_from_array

        nums = _positions(batched, len(args))
        for i, a in enumerate(args):
            if i not in nums and is_dask(a):
                raise TypeError(f"argument {i} is a dask array but not batched: constants go "
                                f"whole to every block, as NumPy arrays")
        if is_dask(kwargs):
            raise TypeError("keyword arguments go whole to every block: no dask arrays there")
        xs, trees = [], []
        for i in nums:
            ls, tree = flatten(args[i])
            xs += [x if isinstance(x, da.Array) else da.asarray(x) for x in ls]
            trees.append(tree)
        if not xs:
            raise ValueError("no batched argument")
        bn = xs[0].ndim if batch_ndim is None else batch_ndim
        lead = xs[0].shape if batch_ndim is None else xs[0].shape[:bn]
        for x in xs:
            if x.shape[:bn] != lead or (batch_ndim is None and x.shape != lead):
                raise ValueError(f"the batched arrays' batch axes differ: {lead} and {x.shape}")
            if any(np.isnan(c) for cs in x.chunks for c in cs):
                raise ValueError("chunk sizes unknown: call compute_chunk_sizes() first")

        # One trace on a sample: proves the rows stay apart before anything is scheduled,
        # and tells each result's shape past the batch axes and its dtype.
        sample = [np.ones_like(x._meta, shape=(2,) * bn + x.shape[bn:]) for x in xs]
        call = _place(args, nums, trees, sample)
        with np.errstate(all="ignore"):  # ones may sit outside f's domain: only shapes matter
            if check is not None:
                check(*call, **kwargs)
            out = local(*call, **kwargs)
        outs, out_tree = flatten(out)
        outs = [to_array(o) for o in outs]
        for o in outs:
            if o.shape[:bn] != (2,) * bn:
                raise ValueError(f"a result of shape {o.shape} for a sample of batch shape "
                                 f"{(2,) * bn} does not keep the batch axes first")

        # Blockwise indices: 0..bn-1 the batch axes, shared by every array (blockwise
        # aligns their chunks); fresh ones for each array's feature axes, one chunk each.
        b_ind, fresh = tuple(range(bn)), iter(range(bn, 1 << 30))
        pairs = []
        for x in xs:
            x = x.rechunk({a: -1 for a in range(bn, x.ndim)})
            pairs += [x, b_ind + tuple(next(fresh) for _ in range(bn, x.ndim))]
        label = getattr(local, "__qualname__", "transform").split(".")[0]
        token = uuid.uuid4().hex
        # the constants, and the batched arguments' structure without their arrays
        plain = [None if i in nums else a for i, a in enumerate(args)]
        block = delayed(Block(local, plain, nums, trees, kwargs),
                        name=f"einsumgrad-{label}-fn-{token}")
        # Every block's results, as a tuple per block; one array per result leaf from it
        # (a result with one leaf is fused with it into one task per block).
        both = da.blockwise(_run, b_ind, block, None, *pairs, concatenate=True,
                            name=f"einsumgrad-{label}-{token}",
                            meta=np.empty((0,) * bn, dtype=object))
        res = []
        for k, o in enumerate(outs):
            rest = tuple(next(fresh) for _ in o.shape[bn:])
            res.append(da.blockwise(operator.itemgetter(k), b_ind + rest, both, b_ind,
                                    new_axes=dict(zip(rest, o.shape[bn:])),
                                    name=f"einsumgrad-{label}-{k}-{token}",
                                    meta=meta_from_array(xs[0]._meta, o.ndim, dtype=o.dtype)))
        return unflatten(out_tree, res)
    return lifted
