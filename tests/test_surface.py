"""The array surface a NumPy or PyTorch user types by habit: shape ops against
NumPy (values) and torch (gradients), to second order against finite
differences, forward mode, and their batch rules (``batch_jacobian`` through
them matches ``jacrev``; along the batch axis they raise); constructors,
casts, copies and DLPack."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from backends import NAME, npy, xb
from einsumgrad.testing import check_grads

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _agree(ours, numpy_op, torch_op, x):
    """Values as NumPy's (or both refuse), gradients as torch's."""
    try:
        want = numpy_op(x)
    except (ValueError, TypeError, IndexError) as e:
        with pytest.raises(type(e) if isinstance(e, TypeError) else ValueError):
            ours(eg.tensor(xb(x)))
        return
    got = ours(eg.tensor(xb(x)))
    np.testing.assert_array_equal(npy(got), want)
    w = _x(np.shape(want), 1)
    g = eg.grad(lambda t: (ours(t) * xb(w)).sum())(xb(x))
    tx = torch.tensor(x, requires_grad=True)
    (torch_op(tx) * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(npy(g), tx.grad.numpy(), rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(shapes, st.one_of(st.none(), st.integers(-3, 3), st.lists(st.integers(-3, 3), max_size=2)))
def test_flip_as_numpy(shape, axis):
    x = _x(shape)
    try:
        dims = tuple(range(len(shape))) if axis is None else tuple(np.atleast_1d(axis) % len(shape))
    except ZeroDivisionError:
        dims = ()
    _agree(lambda t: eg.flip(t, axis), lambda v: np.flip(v, axis), lambda t: torch.flip(t, dims), x)


@settings(max_examples=80, deadline=None)
@given(shapes, st.one_of(st.integers(1, 4), st.lists(st.integers(0, 5), max_size=3)),
       st.integers(-3, 3))
def test_split_as_numpy(shape, sections, axis):
    x = _x(shape)

    def ours(t):
        return eg.concatenate([p * (i + 1) for i, p in enumerate(eg.split(t, sections, axis))],
                              axis)

    def ref(v):
        return np.concatenate([p * (i + 1) for i, p in enumerate(np.split(v, sections, axis))],
                              axis)

    def tref(t):
        parts = np.split(np.arange(t.shape[axis]), sections)
        return torch.cat([t.index_select(axis % t.ndim, torch.tensor(p, dtype=torch.long)) * (i + 1)
                          for i, p in enumerate(parts)], axis % t.ndim)
    _agree(ours, ref, tref, x)


widths = st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                   st.lists(st.tuples(st.integers(-1, 2), st.integers(0, 2)), min_size=1,
                            max_size=3))


@settings(max_examples=80, deadline=None)
@given(shapes, widths)
def test_pad_as_numpy(shape, width):
    x = _x(shape)
    w = np.broadcast_to(np.asarray(width).reshape(-1, 2) if np.ndim(width) else width,
                        (len(shape), 2)) if np.asarray(width).size in (1, 2, 2 * len(shape)) \
        else None

    def tref(t):
        flat = [int(n) for pair in reversed(w.tolist()) for n in pair]
        return torch.nn.functional.pad(t, flat)
    _agree(lambda t: eg.pad(t, width), lambda v: np.pad(v, width), tref, x)


OPS = {
    "flip": lambda x: eg.flip(x * x, -1),
    "split": lambda x: eg.concatenate(eg.split(eg.tanh(x), [1], -1)[::-1], -1),
    "pad": lambda x: eg.pad(eg.sin(x), ((0, 0), (1, 2))),
    "stack": lambda x: eg.stack([x, x * x], -1),
    "squeeze": lambda x: eg.squeeze(eg.expand_dims(x * x, (1, 3)), 1),
    "astype": lambda x: eg.astype(eg.astype(x, np.float32), np.float64) + x * x,
    "clone": lambda x: (x * x).clone() * x,
    "maximum": lambda x: eg.maximum(x * x, eg.sin(x)) + eg.minimum(x, 0.3),
    "clip": lambda x: eg.clip(x * x, 0.1, 1.0) * x,
    "remainder": lambda x: (x * 3.0) % 1.7 + x * (x // 0.5),
    "min prod": lambda x: eg.min(x * x, 1, keepdims=True) * eg.prod(x + 2.0, 1, keepdims=True),
    "var std": lambda x: eg.var(x, 1, keepdims=True) * x + eg.std(x, -1, ddof=1, keepdims=True),
    "cumsum": lambda x: eg.cumsum(eg.tanh(x), 1) * x,
}


@pytest.mark.parametrize("name", OPS)
def test_shape_ops_to_second_order_and_through_batch_rules(name):
    f = OPS[name]
    x = xb(_x((3, 4)))
    if name != "astype":  # a float32 round trip is not float64-exact
        check_grads(f, x, order=2)
    J = npy(eg.jacrev(f)(x))  # (3, ..., 3, 4): batch_jacobian is its diagonal
    B = npy(eg.batch_jacobian(f)(x))
    np.testing.assert_allclose(B, np.stack([J[b][..., b, :] for b in range(3)]), atol=1e-6)
    np.testing.assert_allclose(npy(eg.jacfwd(f)(x)), J, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("f", [lambda x: eg.flip(x, 0), lambda x: eg.pad(x, 1),
                               lambda x: eg.concatenate(eg.split(x, 3, 0)[::-1], 0),
                               lambda x: eg.concatenate([x, x], 0),
                               lambda x: x * eg.prod(x, 0), lambda x: eg.cumsum(x, 0),
                               lambda x: x - eg.var(x, 0), lambda x: eg.maximum(x, x[::-1])],
                         ids=["flip", "pad", "split", "concatenate", "prod", "cumsum", "var",
                              "maximum"])
def test_shape_ops_along_the_batch_axis_raise(f):
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(f)(xb(_x((3, 2))))


def test_constructors_as_numpy():
    cpu = None if NAME == "numpy" else ("cuda" if NAME == "cupy" else "strict")
    cases = [(eg.zeros(2, 3, device=cpu), np.zeros((2, 3))), (eg.zeros((2,), device=cpu), np.zeros(2)),
             (eg.ones((2, 1), dtype=np.float32, device=cpu), np.ones((2, 1), np.float32)),
             (eg.full((2,), 7, device=cpu), np.full((2,), 7)),
             (eg.arange(5, device=cpu), np.arange(5)), (eg.arange(1.0, 2.0, 0.25, device=cpu),
                                                        np.arange(1.0, 2.0, 0.25)),
             (eg.eye(3, 2, device=cpu), np.eye(3, 2)), (eg.linspace(0, 1, 5, device=cpu),
                                                        np.linspace(0, 1, 5))]
    for got, want in cases:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(npy(got), want)
    t = eg.tensor(xb(_x((2, 3)).astype(np.float32)))
    z = eg.zeros_like(t)
    assert z.dtype == np.float32 and z.device == t.device and eg.ones_like(t, dtype=np.float64).dtype == np.float64
    w = eg.zeros(3, requires_grad=True, device=cpu)
    assert w.requires_grad and w.is_leaf
    with pytest.raises(TypeError, match="floating-point"):
        eg.arange(3, requires_grad=True)


def test_casts_and_copies_stay_on_the_tape():
    x = eg.tensor(xb(_x(3)), requires_grad=True)
    y = x.float()
    assert y.dtype == np.float32 and x.to(np.float32).dtype == np.float32
    assert x.to("float32").dtype == np.float32 and y.double().dtype == np.float64
    (y.double() * 2 + x.clone() + x.copy() + x.astype(np.float64)).sum().backward()
    np.testing.assert_array_equal(npy(x.grad), [5.0, 5.0, 5.0])
    c = x.clone()
    with eg.no_grad():
        c += 1.0  # its own buffer: x is untouched
    np.testing.assert_array_equal(npy(c), npy(x) + 1.0)
    assert x.astype(np.int64).requires_grad is False  # no gradient through integers, as torch


@pytest.mark.skipif(NAME != "numpy", reason="host memory shared with torch")
def test_dlpack_shares_memory_with_torch_and_raw_torch_tensors_are_refused():
    t = eg.tensor(np.arange(3.0))
    u = torch.from_dlpack(t)
    u[0] = 42.0
    assert npy(t)[0] == 42.0
    v = torch.arange(4.0)
    w = eg.from_dlpack(v)
    v[1] = -1.0
    assert npy(w)[1] == -1.0
    with pytest.raises(TypeError, match=r"eg.tensor\(x\)"):
        eg.exp(torch.ones(2))
    with pytest.raises(TypeError, match="from_dlpack"):
        eg.tensor([1.0]) + torch.ones(1)


@pytest.mark.parametrize("name", ["sum", "mean", "max", "logsumexp", "softmax", "log_softmax"])
def test_torch_spellings_dim_and_keepdim(name):
    x = eg.tensor(xb(_x((2, 3, 4))))
    fn = getattr(eg, name)
    keep = {} if "softmax" in name else {"keepdim": True}
    keeps = {} if "softmax" in name else {"keepdims": True}
    np.testing.assert_array_equal(npy(fn(x, dim=1, **keep)), npy(fn(x, axis=1, **keeps)))
    want = getattr(torch, name)(torch.tensor(npy(x)), dim=1, **keep)
    want = want.values if name == "max" else want
    np.testing.assert_allclose(npy(fn(x, dim=1, **keep)), want.numpy(), rtol=1e-12)
    if hasattr(x, name):
        np.testing.assert_array_equal(npy(getattr(x, name)(dim=1, **keep)),
                                      npy(fn(x, axis=1, **keeps)))
    with pytest.raises(TypeError, match="same argument"):
        fn(x, axis=1, dim=1)


binary_shapes = st.sampled_from([((3,), (3,)), ((2, 3), (3,)), ((2, 1), (1, 3)), ((), (2,))])


@settings(max_examples=60, deadline=None)
@given(binary_shapes, st.sampled_from(["maximum", "minimum", "remainder"]), st.booleans())
def test_binary_ops_as_numpy_values_and_torch_gradients(shapes, name, ties):
    a, b = (np.round(_x(s, i), 0 if ties else 6) + (3.0 if name == "remainder" and i else 0.0)
            for i, s in enumerate(shapes))
    got = getattr(eg, name)(eg.tensor(xb(a)), eg.tensor(xb(b)))
    np.testing.assert_array_equal(npy(got), getattr(np, name)(a, b))
    ga, gb = eg.grad(lambda x, y: getattr(eg, name)(x, y).sum(), (0, 1))(xb(a), xb(b))
    ta, tb = (torch.tensor(v, requires_grad=True) for v in (a, b))
    getattr(torch, name)(ta, tb).sum().backward()
    np.testing.assert_allclose(npy(ga), ta.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(npy(gb), tb.grad.numpy(), rtol=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(npy(eg.tensor(xb(a)) // xb(b)), a // b)


@settings(max_examples=60, deadline=None)
@given(shapes, st.one_of(st.none(), st.floats(-1, 0)), st.one_of(st.none(), st.floats(0, 1)))
def test_clip_as_numpy_values_and_torch_clamp_gradients(shape, lo, hi):
    x = np.round(_x(shape), 1)
    if lo is None and hi is None:
        with pytest.raises(ValueError):
            eg.clip(eg.tensor(xb(x)), lo, hi)
        return
    _agree(lambda t: eg.clip(t, lo, hi), lambda v: np.clip(v, lo, hi),
           lambda t: torch.clamp(t, lo, hi), x)


def test_prod_gradient_with_zeros_is_torchs():
    x = np.array([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0], [0.0, 0.0, 5.0]])
    t = torch.tensor(x, requires_grad=True)
    torch.prod(t, 1).sum().backward()
    np.testing.assert_array_equal(npy(eg.grad(lambda a: eg.prod(a, 1).sum())(xb(x))), t.grad.numpy())
    H = npy(eg.hessian(lambda a: eg.prod(a, 1).sum())(xb(x)))
    Ht = torch.func.hessian(lambda a: torch.prod(a, 1).sum())(torch.tensor(x)).numpy()
    np.testing.assert_allclose(H, Ht, atol=1e-12)


@pytest.mark.parametrize("axis", [1, 0, (0, 2), None])
def test_prod_derivatives_of_every_order_with_zeros(axis):
    """d^k/dt^k prod(x + t v) is k! times the t^k coefficient of the product of
    (x_j + t v_j): exact with one, two and three zeros in a slice, both modes."""
    x = np.array([[[0.0, 2.0], [0.0, 3.0], [0.0, -1.5]],
                  [[0.0, 0.5], [1.25, 0.0], [2.0, 4.0]]])  # (2, 3, 2)
    v = _x(x.shape, 3)
    f = lambda a: eg.prod(a, axis)  # noqa: E731
    axes = tuple(range(3)) if axis is None else np.atleast_1d(axis)
    xs, vs = (np.moveaxis(a, axes, range(3 - len(axes), 3)) for a in (x, v))
    lead = xs.shape[:3 - len(axes)]
    xs, vs = xs.reshape(lead + (-1,)), vs.reshape(lead + (-1,))
    for k in range(1, 5):
        want = np.zeros(lead)
        for i in np.ndindex(lead):
            poly = np.poly1d([1.0])
            for a, b in zip(xs[i], vs[i]):
                poly = poly * np.poly1d([b, a])
            want[i] = poly.deriv(k)(0.0)
        got = npy(eg.directional(f, k)(xb(x), xb(v)))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    H = lambda outer: npy(outer(eg.jacrev(f))(xb(x)))  # noqa: E731
    np.testing.assert_allclose(H(eg.jacfwd), H(eg.jacrev), atol=1e-12)


def test_prod_beside_inf_and_overflow():
    """prod's gradient is the product of the others, not prod / x: inf beside an inf
    (not NaN), finite where only the whole product over- or underflows (reverse mode
    and batch_jacobian's forward mode)."""
    x = np.array([[np.inf, 0.5, -1.5, 2.0], [1e300, 1e300, 1.0, 2.0], [1e-300, 1e-300, 3.0, 1e10]])
    with np.errstate(all="ignore"):
        want = np.array([[np.prod(np.delete(r, j)) for j in range(4)] for r in x])
        got = npy(eg.grad(lambda a: eg.prod(a, 1).sum())(xb(x)))
        batch = npy(eg.batch_jacobian(lambda a: eg.prod(a, 1, keepdims=True))(xb(x)))[:, 0]
    assert np.isinf(want[0, 1:]).all() and np.isfinite(want[1:, :2]).all() and want[2, 0] > 0
    np.testing.assert_allclose(got, want, rtol=1e-14)
    np.testing.assert_allclose(batch, want, rtol=1e-14)


def test_torch_spellings_on_shape_ops():
    x = eg.tensor(xb(_x((2, 1, 3))))
    t = torch.tensor(npy(x))
    pairs = [(eg.cat([x, x], dim=2), torch.cat([t, t], dim=2)),
             (eg.stack([x, x], dim=1), torch.stack([t, t], dim=1)),
             (x.squeeze(dim=1), t.squeeze(dim=1)), (x.unsqueeze(dim=-1), t.unsqueeze(dim=-1)),
             (eg.flip(x, dim=2), torch.flip(t, dims=(2,))),
             (eg.split(x, [1], dim=2)[1], torch.split(t, [1, 2], dim=2)[1]),
             (eg.cumsum(x, dim=2), torch.cumsum(t, dim=2)),
             (x.argmax(dim=2), t.argmax(dim=2))]
    for ours, theirs in pairs:
        np.testing.assert_array_equal(npy(ours), theirs.numpy())
    with pytest.raises(TypeError, match="same argument"):
        eg.split(x, 3, 2, dim=2)


@pytest.mark.skipif(NAME != "numpy", reason="host memory shared with JAX")
def test_dlpack_with_jax():
    jnp = pytest.importorskip("jax.numpy")
    t = eg.from_dlpack(jnp.arange(4.0))
    np.testing.assert_array_equal(npy(t), [0.0, 1.0, 2.0, 3.0])
    j = jnp.from_dlpack(eg.tensor(np.arange(3.0)))
    np.testing.assert_array_equal(np.asarray(j), [0.0, 1.0, 2.0])


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(-3, 2), st.integers(-3, 2))
def test_flatten_and_ravel_as_torch_and_numpy(shape, start, end):
    x = _x(shape)
    _agree(lambda t: t.ravel(), np.ravel, lambda t: t.reshape(-1), x)
    _agree(lambda t: t.flatten(), lambda v: v.flatten(), lambda t: t.flatten(), x)
    try:
        want = torch.tensor(x).flatten(start, end).shape
    except (IndexError, RuntimeError):
        with pytest.raises(ValueError):
            eg.tensor(xb(x)).flatten(start, end)
        return
    _agree(lambda t: t.flatten(start, end), lambda v: v.reshape(want),
           lambda t: t.flatten(start, end), x)


def test_constructors_take_the_default_dtype():
    eg.set_default_dtype(np.float32)
    try:
        assert eg.get_default_dtype() == np.float32
        for t in (eg.zeros(2), eg.ones((2,)), eg.eye(2), eg.linspace(0, 1, 3)):
            assert t.dtype == np.float32
        assert eg.arange(3).dtype.kind == "i" and eg.full((2,), 1.5).dtype == np.float64
    finally:
        eg.set_default_dtype(np.float64)


PLAIN = {
    "pad": lambda a: eg.pad(a, 1), "flip": lambda a: eg.flip(a, 0),
    "squeeze": lambda a: eg.squeeze(a[None]),
    "expand_dims": lambda a: eg.expand_dims(a, 0), "unsqueeze": lambda a: eg.unsqueeze(a, 1),
    "reshape": lambda a: eg.reshape(a, (6,)), "split": lambda a: eg.split(a, 3)[1],
    "copy": eg.copy, "clone": eg.clone, "astype": lambda a: eg.astype(a, np.float32),
    "moveaxis": lambda a: eg.moveaxis(a, 0, 1), "swapaxes": lambda a: eg.swapaxes(a, 0, 1),
    "transpose": eg.transpose, "cumsum": lambda a: eg.cumsum(a, 1), "prod": eg.prod,
    "var": lambda a: eg.var(a, axis=1), "std": eg.std, "max": lambda a: eg.max(a, 0),
    "logsumexp": eg.logsumexp, "softmax": eg.softmax, "clip": lambda a: eg.clip(a, 1, 4),
    "where": lambda a: eg.where(a > 2, a, 0.0), "concatenate": lambda a: eg.concatenate([a, a]),
    "stack": lambda a: eg.stack([a, a]),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_ops_take_a_plain_array_as_numpys_functions_do(name):
    # a NumPy habit: eg.pad(x, 1) on the array itself, not a Tensor made of it
    x = xb(np.arange(6.0).reshape(3, 2))
    op = PLAIN[name]
    np.testing.assert_array_equal(npy(op(x)), npy(op(eg.tensor(x))))


def test_a_matrix_trace_by_habit_names_the_einsum():
    with pytest.raises(TypeError, match="einsum"):
        eg.trace(xb(np.eye(3)))


@pytest.mark.parametrize("join", [eg.concatenate, eg.stack])
def test_joining_an_array_and_a_tensor_stays_on_their_backend(join):
    # a plain array beside a Tensor, as in np.concatenate([x, f(x)]): not pulled to NumPy
    x = xb(np.arange(6.0).reshape(3, 2))
    got = join([x, eg.tanh(eg.tensor(x))])
    assert type(got.data) is type(x)
    np.testing.assert_array_equal(npy(got), np.asarray(join([npy(x), np.tanh(npy(x))]).data))
    assert join([eg.tensor(x), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]).dtype == x.dtype
