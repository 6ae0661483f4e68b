"""A loss and its gradient over a data set held by dask workers, block by block.

The gradient of a mean over samples is the sum of the blocks' gradients of
their sums, divided by the number of samples: each worker differentiates its
own blocks with ``eg.value_and_grad`` and the partial sums are added up in a
tree, so no block's rows ever leave the worker that holds them.
"""
from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Callable

import numpy as np

from .. import transforms  # a module object, read at call time: see __init__.py
from ..pytree import flatten, tree_map, unflatten
from ..tensor import Tensor
from .blocks import _positions, to_array


class Step:
    """What every worker needs for one step, sent once: ``f``, the parameters (the
    arguments in ``argnums``) and where the data blocks go among the arguments."""

    def __init__(self, f: Callable, args: list, argnums, data: tuple):
        self.f, self.args, self.argnums, self.data = f, args, argnums, data

    def __call__(self, *blocks) -> tuple:
        """``(sum of the block's losses, gradient of that sum)`` as arrays, on one block."""
        rows = blocks[0].shape[0]

        def total(*args):
            losses = self.f(*args)
            if tuple(losses.shape) != (rows,):
                raise ValueError(f"f must return per-sample losses of shape ({rows},), "
                                 f"got {tuple(losses.shape)}")
            return losses.sum()
        args = list(self.args)
        for i, b in zip(self.data, blocks):
            args[i] = b
        loss, grads = transforms.value_and_grad(total, self.argnums)(*args)
        return to_array(loss), tree_map(to_array, grads)


def _block(step: Step, *blocks) -> tuple:
    return step(*blocks)


def _add(*parts: tuple) -> tuple:
    """The sum of several ``(loss, gradients)`` pytrees of one structure."""
    flat = [flatten(p)[0] for p in parts]
    return unflatten(flatten(parts[0])[1], [sum(xs[1:], xs[0]) for xs in zip(*flat)])


def _client():
    """The dask.distributed client in use, or None (then dask's local scheduler runs the graph)."""
    try:
        from distributed import get_client
        return get_client()
    except (ImportError, ValueError):
        return None


def _check_rows(f: Callable, args: list, data: tuple) -> None:
    """Trace ``f`` on two rows of each data argument with ``batch_jacobian``, which raises
    ``BatchMixingError`` when a sample's loss depends on another sample's rows. Integer
    data (labels) cannot be traced: only the floating-point data arguments are checked."""
    call = list(args)
    for i in data:
        a = args[i]
        call[i] = np.ones_like(a._meta, shape=(2,) + a.shape[1:])
    floats = tuple(i for i in data if np.issubdtype(args[i].dtype, np.floating))
    with np.errstate(all="ignore"):  # ones may sit outside f's domain: only shapes matter
        out = f(*call)
        if tuple(getattr(out, "shape", ())) != (2,):
            raise ValueError(f"f must return per-sample losses (B,): for 2 samples it returned "
                             f"shape {tuple(getattr(out, 'shape', ()))}")
        if floats:
            transforms.batch_jacobian(f, floats)(*call)


def value_and_grad(f: Callable, argnums=0, reduction: str = "mean", *,
                   split_every: int = 8) -> Callable:
    """``eg.value_and_grad`` of the mean (or sum) of per-sample losses, over dask arrays.

    ``f(*args)`` returns per-sample losses ``(B,)``. The arguments in
    ``argnums`` are the parameters (arrays, or pytrees of arrays), the others
    the data: dask arrays chunked along axis 0 (NumPy arrays
    are taken as one block), all with ``B`` rows. Each call is one step:

    * the parameters and ``f`` go to every worker once, by
      ``Client.scatter(broadcast=True)``, not once per block;
    * each block's ``(loss sum, gradient of the sum)`` is computed by
      ``eg.value_and_grad`` on the worker holding the block;
    * the partial sums are added in a tree of ``split_every`` parts per node.

    Why futures and a tree of ``dask.delayed`` rather than
    ``dask.array.reduction``: a block's result is a pytree (a loss and
    gradients shaped like the parameters), not an array reduced along an
    axis; the tree of partial sums says that directly, and a delayed call can
    take the scattered parameters (a future) as its argument.

    A worker that dies mid-step has its blocks recomputed on the others (no
    block lost or counted twice). Where every worker holding its parameters dies
    before it ends, the step runs once more from its start with the parameters
    scattered again, and fails if they are lost again. Without a
    ``dask.distributed`` client the same graph runs on dask's local scheduler. Before anything is scheduled, ``f`` is traced on two rows to
    check that samples stay apart (``eg.BatchMixingError`` otherwise; integer
    data, such as labels, is not tracked).

    Args:
        f: ``f(*args) -> (B,)`` per-sample losses.
        argnums: the parameters' positions: an int, or a tuple (then a tuple of gradients).
        reduction: ``"mean"`` or ``"sum"`` over the samples.
        split_every: how many partial sums each node of the tree adds.

    Returns:
        A function of ``*args`` returning ``(loss, gradients)`` as Tensors, equal to
        ``eg.value_and_grad(lambda *a: f(*a).mean(), argnums)(*computed args)``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")

    def wrapped(*args):
        import dask.array as da
        from dask import delayed

        nums = _positions(argnums, len(args))
        data = tuple(i for i in range(len(args)) if i not in nums)
        if not data:
            raise ValueError("value_and_grad: no data argument (every argument is in argnums)")
        for i in nums:
            if any(isinstance(x, da.Array) for x in flatten(args[i])[0]):
                raise TypeError(f"argument {i} is a parameter (in argnums): a NumPy array, "
                                f"not a dask array")
        args = list(args)
        for i in data:
            args[i] = da.asarray(args[i])
        n, rows = args[data[0]].shape[0], args[data[0]].chunks[0]
        for i in data:
            if args[i].ndim == 0 or args[i].shape[0] != n:
                raise ValueError(f"the data arguments' first axes differ: {n} and "
                                 f"{args[i].shape[:1]}")
            # one chunk per block of rows, the first argument's blocks for all
            args[i] = args[i].rechunk({0: rows, **{a: -1 for a in range(1, args[i].ndim)}})
        _check_rows(f, args, data)

        step = Step(f, [None if i in data else a for i, a in enumerate(args)],
                    nums[0] if isinstance(argnums, int) else nums, data)
        blocks = list(zip(*(args[i].to_delayed().ravel() for i in data)))

        def total(ref):  # the sum of the blocks' (loss, grads), as a tree of additions
            parts = [delayed(_block)(ref, *b) for b in blocks]
            while len(parts) > 1:
                parts = [delayed(_add)(*parts[k:k + split_every])
                         for k in range(0, len(parts), split_every)]
            return parts[0]
        client = _client()
        if client is None:
            loss, grads = total(step).compute()
        else:
            for attempt in range(2):
                ref = client.scatter(step, broadcast=True, hash=False)
                try:
                    loss, grads = client.compute(total(ref)).result()
                    break
                except CancelledError:
                    # the workers holding the parameters died (a worker that joined as
                    # they were scattered had none): the whole step once more, anew
                    if attempt:
                        raise
                finally:
                    ref.release()  # this step's parameters: no longer needed on the workers
        if reduction == "mean":
            loss, grads = loss / n, tree_map(lambda g: g / n, grads)
        return Tensor(loss), tree_map(Tensor, grads)
    return wrapped
