"""Axis arguments, as a NumPy or PyTorch user types them: every op taking axes
either matches NumPy (values, and gradients against torch) or raises
``ValueError`` (``TypeError`` for an axis that is not an integer); never a
silently different answer. ``t.transpose(-2, -1)`` on a 4-D tensor is the
torch habit that used to sum over the batch."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from backends import npy, xb

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=4).map(tuple)
some_axes = st.lists(st.integers(-5, 5), min_size=0, max_size=5).map(tuple)
axis_args = st.one_of(st.none(), st.integers(-5, 5), some_axes)


def _check(ours, numpy_op, torch_op, x, refuse=False):
    """``ours(t)`` equals ``numpy_op(x)`` and its VJP equals torch's, or both refuse
    (``refuse``: ours refuses where NumPy itself is inconsistent)."""
    try:
        if refuse:
            raise ValueError("refused")
        want = numpy_op(x)
    except (ValueError, TypeError) as e:  # numpy.exceptions.AxisError is a ValueError
        with pytest.raises(type(e) if isinstance(e, TypeError) else ValueError):
            ours(eg.tensor(xb(x)))
        return
    got = ours(eg.tensor(xb(x)))
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(npy(got), want, rtol=1e-12, atol=1e-12)
    w = np.random.default_rng(1).standard_normal(np.shape(want))
    g = eg.grad(lambda t: (ours(t) * xb(w)).sum())(xb(x))
    tx = torch.tensor(x, requires_grad=True)
    (torch_op(tx) * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(npy(g), tx.grad.numpy(), rtol=1e-10, atol=1e-12)


def _x(shape):
    return np.random.default_rng(0).standard_normal(shape)


def _dims(axis, ndim):
    """torch's dims for NumPy's (valid) ``axis``: None and () differ in torch."""
    return tuple(range(ndim)) if axis is None else axis


@settings(max_examples=150, deadline=None)
@given(shapes, st.one_of(st.none(), some_axes), st.booleans())
def test_transpose_and_permute_as_ndarray_transpose(shape, axes, method):
    x = _x(shape)
    ref = lambda a: np.transpose(a, axes)  # noqa: E731
    order = tuple(reversed(range(len(shape)))) if axes is None else axes
    tref = lambda t: t.permute(tuple(a % len(shape) for a in order))  # noqa: E731
    if method:
        _check(lambda t: t.transpose(axes), ref, tref, x)
        if axes:  # one by one, as ndarray.transpose(*axes) takes them
            _check(lambda t: t.transpose(*axes), ref, tref, x)
        _check(lambda t: t.permute(axes) if axes is not None else t.permute(), ref, tref, x)
    else:
        _check(lambda t: eg.transpose(t, axes), ref, tref, x)


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(-5, 5), st.integers(-5, 5))
def test_swapaxes_as_numpy(shape, a, b):
    x = _x(shape)
    _check(lambda t: eg.swapaxes(t, a, b), lambda v: np.swapaxes(v, a, b),
           lambda t: torch.swapaxes(t, a, b), x)
    _check(lambda t: t.swapaxes(a, b), lambda v: np.swapaxes(v, a, b),
           lambda t: torch.swapaxes(t, a, b), x)


@settings(max_examples=100, deadline=None)
@given(shapes, some_axes, some_axes)
def test_moveaxis_as_numpy(shape, src, dst):
    x = _x(shape)
    _check(lambda t: eg.moveaxis(t, src, dst), lambda v: np.moveaxis(v, src, dst),
           lambda t: torch.movedim(t, src, dst), x)


@settings(max_examples=150, deadline=None)
@given(shapes, st.one_of(st.none(), st.integers(-5, 5), some_axes), st.booleans())
def test_squeeze_and_expand_dims_as_numpy(shape, axis, method):
    x = _x(shape)
    try:
        want = np.squeeze(x, axis).shape
    except ValueError:
        want = None
    squeeze = (lambda t: t.squeeze(axis)) if method else (lambda t: eg.squeeze(t, axis))
    # A 0-d tensor has no axis 0 (NumPy's squeeze takes one there, its mean refuses it).
    _check(squeeze, lambda v: np.squeeze(v, axis), lambda t: t.reshape(want), x,
           refuse=shape == () and axis not in (None, ()))
    if axis is None:
        return
    try:
        want = np.expand_dims(x, axis).shape
    except ValueError:
        want = None
    _check(lambda t: eg.expand_dims(t, axis), lambda v: np.expand_dims(v, axis),
           lambda t: t.reshape(want), x)
    if isinstance(axis, int):  # torch's unsqueeze takes one axis
        _check(lambda t: t.unsqueeze(axis), lambda v: np.expand_dims(v, axis),
               lambda t: t.reshape(want), x)


@settings(max_examples=150, deadline=None)
@given(shapes, st.one_of(st.none(), st.integers(-5, 5)), st.booleans())
def test_concatenate_and_stack_take_axes_as_numpy(shape, axis, stack):
    x = _x(shape)
    if stack:
        if axis is None:
            return
        a = axis % (len(shape) + 1) if -len(shape) - 1 <= axis <= len(shape) else axis
        _check(lambda t: eg.stack([t, t * t], axis), lambda v: np.stack([v, v * v], axis),
               lambda t: torch.stack([t, t * t], a), x)
        return
    a = axis % len(shape) if shape and axis is not None and -len(shape) <= axis < len(shape) \
        else axis
    tref = (lambda t: torch.cat([t.reshape(-1), (t * t).reshape(-1)])) if axis is None else \
        (lambda t: torch.cat([t, t * t], a))
    _check(lambda t: eg.concatenate([t, t * t], axis), lambda v: np.concatenate([v, v * v], axis),
           tref, x)


REDUCTIONS = {
    "sum": (eg.sum, np.sum, lambda t, a: torch.sum(t, dim=a) if a != () else t),
    "mean": (eg.mean, np.mean, lambda t, a: torch.mean(t, dim=a) if a != () else t),
    "max": (eg.max, np.max, lambda t, a: torch.amax(t, dim=a) if a != () else t),
    "logsumexp": (eg.logsumexp, lambda v, axis: np.log(np.sum(np.asarray(np.exp(v)), axis=axis)),
                  lambda t, a: torch.logsumexp(t, dim=a) if a != () else t),
    "min": (eg.min, np.min, lambda t, a: torch.amin(t, dim=a) if a != () else t),
    "prod": (eg.prod, np.prod, lambda t, a: _torch_prod(t, a)),
    "var": (eg.var, np.var, lambda t, a: torch.var(t, dim=a, correction=0) if a != () else t * 0),
    "std": (lambda t, axis: eg.std(t * t + 1.0, axis), lambda v, axis: np.std(v * v + 1.0, axis=axis),
            lambda t, a: torch.std(t * t + 1.0, dim=a, correction=0) if a != () else t * 0),
}


def _torch_prod(t, dims):
    for d in sorted((dims,) if isinstance(dims, int) else dims, reverse=True):
        t = torch.prod(t, d)
    return t


@settings(max_examples=200, deadline=None)
@given(shapes, axis_args, st.sampled_from(sorted(REDUCTIONS)))
def test_reductions_take_axes_as_numpy(shape, axis, name):
    ours, ref, tref = REDUCTIONS[name]
    x = _x(shape)
    if name in ("max", "min") and (x.size == 0 or axis == ()):
        return  # NumPy's max over no axis is the identity; ours too, checked by sum
    # A 0-d tensor has no axis 0: NumPy's sum takes one, its mean refuses it.
    _check(lambda t: ours(t, axis), lambda v: ref(v, axis=axis),
           lambda t: tref(t, _dims(axis, len(shape))), x,
           refuse=shape == () and axis not in (None, ()))


@settings(max_examples=100, deadline=None)
@given(shapes, st.one_of(st.none(), st.integers(-5, 5), some_axes), st.booleans())
def test_cumsum_and_argmax_take_one_axis_as_numpy(shape, axis, arg):
    x = _x(shape)
    if arg:
        for name in ("argmax", "argmin"):
            try:
                if shape == () and isinstance(axis, int):
                    raise ValueError("a 0-d tensor has no axis 0")  # NumPy's argmax takes one
                want = getattr(np, name)(x, axis=axis)
            except (ValueError, TypeError) as e:
                with pytest.raises(type(e) if isinstance(e, TypeError) else ValueError):
                    getattr(eg.tensor(xb(x)), name)(axis)
                continue
            np.testing.assert_array_equal(npy(getattr(eg.tensor(xb(x)), name)(axis)), want)
        return
    dim = axis % len(shape) if isinstance(axis, int) and shape and -len(shape) <= axis < len(shape) \
        else axis
    tref = (lambda t: torch.cumsum(t.reshape(-1), 0)) if axis is None else \
        (lambda t: torch.cumsum(t, dim))
    _check(lambda t: eg.cumsum(t, axis), lambda v: np.cumsum(v, axis=axis), tref, x,
           refuse=shape == () and isinstance(axis, int))


@settings(max_examples=100, deadline=None)
@given(shapes, st.one_of(st.integers(-5, 5), some_axes), st.booleans())
def test_softmax_axis_is_one_integer(shape, axis, log):
    x = _x(shape)
    ours = eg.log_softmax if log else eg.softmax
    if not isinstance(axis, int):
        with pytest.raises(TypeError):
            ours(eg.tensor(xb(x)), axis)
        return

    def ref(v):
        np.moveaxis(v, axis, 0)  # the same axis check as NumPy's
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        r = e / e.sum(axis=axis, keepdims=True)
        return np.log(r) if log else r
    tref = (lambda t: torch.log_softmax(t, axis)) if log else (lambda t: torch.softmax(t, axis))
    _check(lambda t: ours(t, axis), ref, tref, x)


def test_the_torch_habits_that_summed_the_batch_now_raise_or_work():
    q = eg.tensor(xb(_x((2, 4, 8, 8))))
    with pytest.raises(ValueError, match="swapaxes"):
        q.transpose(-2, -1)
    with pytest.raises(ValueError, match="swapaxes"):
        eg.tensor(xb(_x((2, 3, 4)))).transpose(1, 2)
    with pytest.raises(ValueError, match="twice"):
        q.transpose(0, 0, 1, 2)
    s = q @ q.mT
    tq = torch.tensor(_x((2, 4, 8, 8)))
    np.testing.assert_allclose(npy(s), (tq @ tq.transpose(-2, -1)).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="mT"):
        eg.tensor(xb(_x(3))).mT
    with pytest.raises(TypeError, match="not an integer"):
        eg.sum(q, axis=1.0)
