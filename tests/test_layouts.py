"""Results laid out in memory as the engine asks, with the values unchanged.

A cotangent that comes out in its primal's memory order (channels-last
activations) lets the element-wise rules and kernels after it read every
operand in one layout, without a copy. Each test checks the strides and the
values, on the backend under test (``EINSUMGRAD_BACKEND``).
"""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import plan
from einsumgrad.backends import memory_order
from einsumgrad.spec import parse

from backends import npy, xb


def channels_last(a: np.ndarray) -> np.ndarray:
    """``a`` (N, C, H, W) with the channels innermost in memory."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def real(shape: tuple, axes) -> list:
    """``axes`` without those of size 1 (which have no place in memory)."""
    return [a for a in axes if shape[a] > 1]


@pytest.mark.parametrize("spec,shapes,order", [
    ("nc,h,w->nchw", [(3, 4), (5,), (6,)], (0, 2, 3, 1)),   # a spatial sum's cotangent
    ("nc,hw->nchw", [(3, 4), (5, 6)], (0, 2, 3, 1)),        # one broadcast multiply
    ("nc,h,w->nchw", [(3, 4), (5,), (6,)], (3, 2, 1, 0)),   # column-major
    ("nc,h,w->nchw", [(3, 1), (5,), (6,)], (0, 2, 3, 1)),   # a size-1 channel axis
    ("ab,c->abc", [(2, 3), (4,)], (2, 0, 1)),
])
def test_broadcast_written_in_the_order_asked(spec, shapes, order):
    rng = np.random.default_rng(0)
    arrays = [xb(rng.standard_normal(s)) for s in shapes]
    got = plan.contract(parse(spec), arrays, order)
    np.testing.assert_allclose(npy(got), np.einsum(spec, *map(npy, arrays)), rtol=1e-15)
    assert real(got.shape, memory_order(got)) == real(got.shape, order)
    assert type(got) is type(arrays[0])  # the backend's own array


def test_broadcast_in_order_keeps_dtype_and_empty_axes():
    ones = np.ones(3, np.float32)
    got = plan.contract(parse("nc,h,w->nchw"), [xb(np.ones((2, 4), np.float32)), xb(ones),
                                                  xb(ones)], (0, 2, 3, 1))
    assert got.dtype == np.float32 and got.strides == (144, 4, 48, 16)
    empty = plan.contract(parse("nc,h,w->nchw"), [xb(np.ones((0, 4))), xb(np.ones(3)),
                                                  xb(np.ones(3))], (0, 2, 3, 1))
    assert empty.shape == (0, 4, 3, 3)


@pytest.mark.parametrize("keepdims", [False, True])
def test_spatial_mean_cotangent_laid_out_like_its_channels_last_primal(keepdims):
    # The residual CNN's global average pool: its cotangent meets the blocks'
    # channels-last activations.
    rng = np.random.default_rng(1)
    a = channels_last(rng.standard_normal((4, 5, 3, 6)))
    gy = rng.standard_normal((4, 5, 1, 1) if keepdims else (4, 5))
    x = eg.tensor(xb(a), requires_grad=True)
    (x.mean(axis=(2, 3), keepdims=keepdims) * eg.tensor(xb(gy))).sum().backward()
    got = npy(x.grad)
    assert memory_order(got) == memory_order(a) == [0, 2, 3, 1]
    tx = torch.tensor(a, requires_grad=True)
    (tx.mean(dim=(2, 3), keepdim=keepdims) * torch.tensor(gy)).sum().backward()
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-14)


def test_sum_cotangent_in_c_order_stays_c_order():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 4, 5, 6))
    x = eg.tensor(xb(a), requires_grad=True)
    x.sum(axis=(2, 3)).sum().backward()
    got = npy(x.grad)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, np.ones_like(a))


@pytest.mark.parametrize("spec,shape,order", [
    ("nchw->nc", (16, 32, 8, 8), (0, 2, 3, 1)),     # a spatial sum of channels-last images
    ("nchw->nc", (3, 5, 64, 64), (0, 2, 3, 1)),     # a long run between short kept axes
    ("abcde->ace", (4, 6, 5, 7, 3), None),          # runs apart: NumPy's axis sum
    ("abcd->ad", (2, 1, 4096, 3), (0, 2, 3, 1)),    # a size-1 axis in the run
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sum_over_a_run_of_middle_axes_matches_numpy(spec, shape, order, dtype):
    # Summed axes between kept ones in memory go as one batched ones @ matrix.
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    if order is not None:
        x = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
    got = npy(eg.einsum(spec, xb(x)))
    assert got.dtype == dtype
    want = np.einsum(spec, x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-12 if dtype == np.float64 else 1e-5,
                               atol=1e-12 if dtype == np.float64 else 1e-4)


@pytest.mark.parametrize("spec,shapes", [
    ("abcd->ab", [(3, 4, 5, 6)]),          # a spatial sum
    ("ij->", [(4, 5)]),                     # a sum to a scalar
    ("ij,jk->i", [(3, 4), (4, 5)]),         # k summed away from operand 1 alone
    ("bij,bj->b", [(2, 3, 4), (2, 4)]),     # i from operand 0, with a batch index
])
def test_array_vjp_of_a_sum_equals_the_recorded_rule(spec, shapes):
    # A backward that records nothing copies the contraction out along the
    # indices a sum took away; the recorded rule multiplies by ones vectors:
    # the same values, bit for bit, and the gradient a writable array.
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(s) for s in shapes]
    out_shape = np.einsum(spec, *arrays).shape
    g = rng.standard_normal(out_shape)
    grads = []
    for create_graph in (False, True):
        ts = [eg.tensor(xb(a), requires_grad=True) for a in arrays]
        eg.einsum(spec, *ts).backward(xb(g), create_graph=create_graph)
        grads.append([npy(t.grad) for t in ts])
    for fast, rule in zip(*grads):
        np.testing.assert_array_equal(fast, rule)
        assert fast.flags.writeable
    tts = [torch.tensor(a, requires_grad=True) for a in arrays]
    torch.einsum(spec, *tts).backward(torch.tensor(g))
    for fast, t in zip(grads[0], tts):
        np.testing.assert_allclose(fast, t.grad.numpy(), rtol=1e-12, atol=1e-12)
