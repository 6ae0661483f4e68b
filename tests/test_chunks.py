"""Chunked Jacobians: the basis in passes of ``chunk_size`` rows, or of as many as keep a
pass within ``einsumgrad.transforms.JACOBIAN_MEMORY_BUDGET`` (``chunk_size=None``).

Chunks change no number: every chunked result equals the one-pass result (and torch.func).
Peak memory is measured with tracemalloc (NumPy reports its buffers to it). Inputs are
built with ``xb`` and results read with ``npy``, so the suite runs on each backend.
"""
import tracemalloc

import numpy as np
import pytest

import einsumgrad as eg
from backends import npy, xb
from einsumgrad import transforms
from einsumgrad.backends import mkl
from einsumgrad.pytree import flatten, tree_map

torch = pytest.importorskip("torch")
tf = torch.func

TOL = dict(rtol=1e-10, atol=1e-12)
rng = np.random.default_rng(0)
W1, W2 = rng.standard_normal((3, 5)) / 2, rng.standard_normal((5, 4)) / 2


def same(ours, theirs):
    lo, to = flatten(ours)
    lt, tt = flatten(theirs)
    assert to == tt, f"structure {to} != {tt}"
    for a, b in zip(lo, lt):
        b = b.detach().numpy() if isinstance(b, torch.Tensor) else npy(b)
        np.testing.assert_allclose(npy(a), b, **TOL)


def mlp(m, x, w1=W1, w2=W2):
    """Written once for einsumgrad (m=eg, weights via xb) and torch (m=torch)."""
    wrap = xb if m is eg else torch.tensor
    return m.tanh(m.sin(x @ wrap(w1)) @ wrap(w2))


def t(tree):
    return tree_map(torch.tensor, tree)


@pytest.fixture
def budget(monkeypatch):
    """Set the memory budget for one test (read at each call)."""
    return lambda nbytes: monkeypatch.setattr(transforms, "JACOBIAN_MEMORY_BUDGET", nbytes)


def peak_bytes(fn):
    """``(fn(), bytes allocated at the peak beyond what was held before)``."""
    if mkl.chosen_matmul is not None:  # the one-time BLAS and VML measurements (their
        for dtype in (np.float32, np.float64):  # arrays), done first
            mkl.blas_choices(np.dtype(dtype))
            mkl.vml_choices(np.dtype(dtype))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


# -- the same numbers in any number of passes ---------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 8, 100])
@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_chunks_equal_one_pass(which, chunk):
    x = rng.standard_normal((2, 3))  # 6 inputs, 8 outputs: chunks that do and do not divide
    f = lambda x: mlp(eg, x)
    one = getattr(eg, which)(f)(xb(x))
    same(getattr(eg, which)(f, chunk_size=chunk)(xb(x)), one)
    same(one, getattr(tf, which)(lambda x: mlp(torch, x))(torch.tensor(x)))


@pytest.mark.parametrize("chunk", [1, 3, 4])
@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_chunks_with_pytrees_and_tuple_argnums(which, chunk):
    p = {"w1": W1, "w2": W2}
    x = rng.standard_normal((2, 3))
    f = lambda m: lambda p, x: {"y": m.tanh(m.sin(x @ p["w1"]) @ p["w2"]), "s": m.sin(x).sum()}
    ours = getattr(eg, which)(f(eg), argnums=(0, 1), chunk_size=chunk)(tree_map(xb, p), xb(x))
    same(ours, getattr(eg, which)(f(eg), argnums=(0, 1))(tree_map(xb, p), xb(x)))
    same(ours, getattr(tf, which)(f(torch), argnums=(0, 1))(t(p), torch.tensor(x)))


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_hessian_chunks(chunk):
    x, w = rng.standard_normal(5), rng.standard_normal((5, 3))
    g = lambda m: lambda x, w: (m.tanh(x @ w) ** 2).sum() * m.sin(x).sum()
    same(eg.hessian(g(eg), chunk_size=chunk)(xb(x), xb(w)), tf.hessian(g(torch))(t(x), t(w)))
    H = eg.hessian(g(eg), argnums=(0, 1), chunk_size=chunk)(xb(x), xb(w))
    same(H, tf.hessian(g(torch), argnums=(0, 1))(t(x), t(w)))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_batch_jacobian_and_hessian_rows_in_chunks(chunk):
    # chunk_size counts batch rows here: 7 rows in passes of `chunk`
    x = rng.standard_normal((7, 3))
    J = eg.batch_jacobian(lambda x: mlp(eg, x), chunk_size=chunk)(xb(x))
    same(J, tf.vmap(tf.jacrev(lambda r: mlp(torch, r)))(torch.tensor(x)))
    g = lambda m: lambda x: m.sin(mlp(m, x)).sum(-1)  # one scalar per row
    H = eg.batch_hessian(g(eg), chunk_size=chunk)(xb(x))
    same(H, tf.vmap(tf.hessian(g(torch)))(torch.tensor(x)))


# -- batch_jacobian with argnums --------------------------------------------------------

def test_batch_jacobian_argnums_leaves_other_arguments_constant():
    # m's axis 0 has the batch's size, yet it is a constant: not a batch axis, no mixing
    x, m = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    f = lambda mod: lambda x, m: mod.tanh(x @ m)
    same(eg.batch_jacobian(f(eg))(xb(x), xb(m)),
         tf.vmap(tf.jacrev(f(torch)), in_dims=(0, None))(t(x), t(m)))
    g = lambda mod: lambda m, x: mod.sin(x @ m) * x
    same(eg.batch_jacobian(g(eg), 1, chunk_size=3)(xb(m), xb(x)),
         tf.vmap(tf.jacrev(g(torch), argnums=1), in_dims=(None, 0))(t(m), t(x)))


def test_batch_jacobian_and_hessian_tuple_argnums():
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    f = lambda m: lambda x, y, c: m.sin(x * y) * c + x.sum(-1, keepdims=True) * y
    c = rng.standard_normal(3)
    for chunk in (None, 2):
        J = eg.batch_jacobian(f(eg), (0, 1), chunk_size=chunk)(xb(x), xb(y), xb(c))
        assert isinstance(J, tuple) and len(J) == 2
        same(J, tf.vmap(tf.jacrev(f(torch), argnums=(0, 1)), in_dims=(0, 0, None))(
            t(x), t(y), t(c)))
    s = lambda m: lambda x, y: (m.sin(x * y) * x).sum(-1)
    H = eg.batch_hessian(s(eg), (0, 1), chunk_size=2)(xb(x), xb(y))
    same(H, tf.vmap(tf.hessian(s(torch), argnums=(0, 1)))(t(x), t(y)))


def test_batch_jacobian_of_a_dict_and_two_batch_axes():
    p = {"a": rng.standard_normal((2, 3, 2)), "b": rng.standard_normal((2, 3, 1))}
    f = lambda m: lambda p: m.tanh(p["a"] * p["b"])
    J = eg.batch_jacobian(f(eg), batch_ndim=2, chunk_size=4)(tree_map(xb, p))
    same(J, tf.vmap(tf.vmap(tf.jacrev(f(torch))))(t(p)))


def test_batch_jacobian_mixing_through_an_argument_still_raises():
    x = xb(rng.standard_normal((4, 3)))
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda x, y: x * y.sum(axis=0), (0, 1))(x, x)
    with pytest.raises(ValueError, match="batch axes"):
        eg.batch_jacobian(lambda x, y: x * y, (0, 1))(x, xb(np.ones((3, 3))))


# -- the memory budget ---------------------------------------------------------------

def test_budget_is_a_module_setting():
    assert transforms.JACOBIAN_MEMORY_BUDGET == 256 * 2 ** 20
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            eg.jacrev(eg.sin, chunk_size=bad)


def test_jacrev_beyond_the_budget_runs_in_passes_within_it(budget):
    # 6,000 outputs of 4 inputs: the one-pass basis alone is 6000^2 doubles, 288 MB
    N, limit = 6000, 8 * 2 ** 20
    W = rng.standard_normal((N, 4))
    x = rng.standard_normal(4)
    budget(limit)
    w = xb(W)
    J, peak = peak_bytes(lambda: eg.jacrev(lambda x: eg.tanh(eg.einsum("od,d->o", w, x)) * 2.0)(xb(x)))
    np.testing.assert_allclose(npy(J), 2 * (1 - np.tanh(W @ x) ** 2)[:, None] * W, **TOL)
    assert N * N * 8 > 30 * limit and peak < limit + J.data.nbytes, peak


def test_jacfwd_beyond_the_budget_runs_in_passes_within_it(budget):
    N, limit = 6000, 8 * 2 ** 20
    W = rng.standard_normal((N, 4))
    v = rng.standard_normal(N) / 50
    budget(limit)
    w = xb(W)
    J, peak = peak_bytes(lambda: eg.jacfwd(lambda v: eg.sin(eg.einsum("od,o->d", w, v)) * 2.0)(xb(v)))
    np.testing.assert_allclose(npy(J), 2 * np.cos(W.T @ v)[:, None] * W.T, **TOL)
    assert peak < limit + J.data.nbytes, peak


def test_batch_jacobian_within_the_budget(budget):
    # many rows: passes of fewer rows; and a sample whose own basis is over the budget:
    # one row a pass, its basis in chunks
    limit = 2 * 2 ** 20
    budget(limit)
    x = rng.standard_normal((20000, 3))
    f = lambda x: mlp(eg, x)
    J, peak = peak_bytes(lambda: eg.batch_jacobian(f)(xb(x)))
    assert peak < limit + J.data.nbytes, peak
    budget(1 << 40)
    same(J, eg.batch_jacobian(f)(xb(x)))  # in one pass
    budget(limit)
    y = rng.standard_normal((2, 1500))
    g = lambda x: eg.sin(x) * eg.tanh(x)
    J, peak = peak_bytes(lambda: eg.batch_jacobian(g)(xb(y)))
    assert peak < limit + J.data.nbytes, peak
    diag = np.cos(y) * np.tanh(y) + np.sin(y) * (1 - np.tanh(y) ** 2)
    np.testing.assert_allclose(npy(J), diag[:, :, None] * np.eye(1500), **TOL)


def test_batch_jacobian_that_fits_traces_f_once(budget):
    # seed 001's shape: 784 inputs, 10 outputs a row; reverse mode's basis is the 10
    calls = []
    w1, w2 = xb(rng.standard_normal((784, 64)) / 28), xb(rng.standard_normal((64, 10)) / 8)

    def f(x):
        calls.append(x.shape[0])
        return eg.tanh(x @ w1) @ w2
    x = xb(rng.standard_normal((64, 784)))
    J = eg.batch_jacobian(f)(x)
    assert J.shape == (64, 10, 784) and calls == [64]
    budget(2 ** 20)  # now a pass holds fewer rows: 64 traced first, then chunks that fit
    calls.clear()
    same(eg.batch_jacobian(f)(x), J)
    assert calls[0] == 64 and len(calls) > 2 and sum(calls[1:]) == 64 and max(calls[1:]) < 64


def test_a_tiny_budget_changes_no_number(budget):
    x = rng.standard_normal((2, 3))
    f = lambda x: mlp(eg, x)
    g = lambda x: (mlp(eg, x) ** 2).sum()
    want = [eg.jacrev(f)(xb(x)), eg.jacfwd(f)(xb(x)), eg.hessian(g)(xb(x)),
            eg.batch_jacobian(f)(xb(x)), eg.batch_hessian(lambda x: mlp(eg, x))(xb(x))]
    budget(1)  # one row per pass everywhere
    got = [eg.jacrev(f)(xb(x)), eg.jacfwd(f)(xb(x)), eg.hessian(g)(xb(x)),
           eg.batch_jacobian(f)(xb(x)), eg.batch_hessian(lambda x: mlp(eg, x))(xb(x))]
    same(got, want)


# -- chunks keep results differentiable ------------------------------------------------

@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_chunked_jacobian_inside_a_transform_is_differentiable(which):
    x = rng.standard_normal((2, 3))
    ours = eg.grad(lambda x: (getattr(eg, which)(lambda x: mlp(eg, x), chunk_size=3)(x) ** 2)
                   .sum())(xb(x))
    theirs = tf.grad(lambda x: (getattr(tf, which)(lambda x: mlp(torch, x))(x) ** 2).sum())(
        torch.tensor(x))
    same(ours, theirs)


@pytest.mark.parametrize("which", ["jacrev", "jacfwd", "batch_jacobian"])
def test_chunked_jacobian_of_an_input_that_requires_grad(which, budget):
    budget(1)
    x = eg.tensor(xb(rng.standard_normal((4, 3))), requires_grad=True)
    J = getattr(eg, which)(lambda x: mlp(eg, x), chunk_size=3)(x)
    (J ** 2).sum().backward()
    xt = torch.tensor(npy(x), requires_grad=True)
    tj = tf.vmap(tf.jacrev(lambda r: mlp(torch, r)))(xt) if which == "batch_jacobian" else \
        getattr(tf, which)(lambda x: mlp(torch, x))(xt)
    (tj ** 2).sum().backward()
    same(x.grad, xt.grad)


def test_closed_over_parameters_that_require_grad_keep_their_graph():
    # rows in chunks, each chunk's Jacobian depending on w: joined on the tape, not copied
    w = eg.tensor(xb(W1), requires_grad=True)
    x = rng.standard_normal((5, 3))
    J = eg.batch_jacobian(lambda x: eg.tanh(x @ w), chunk_size=2)(xb(x))
    J.sum().backward()
    wt = torch.tensor(W1, requires_grad=True)
    tf.vmap(tf.jacrev(lambda r: torch.tanh(r @ wt)))(torch.tensor(x)).sum().backward()
    same(w.grad, wt.grad)
    J = eg.jacrev(lambda x: eg.tanh(x @ w), chunk_size=4)(xb(x))
    assert J.requires_grad
    w.grad = None
    J.sum().backward()
    wt.grad = None
    tf.jacrev(lambda x: torch.tanh(x @ wt))(torch.tensor(x)).sum().backward()
    same(w.grad, wt.grad)
