"""The eager fast paths give what the general ones give, on the first call and from the caches."""
import numpy as np
import pytest

import einsumgrad as eg
from einsumgrad.backends import base


def _recorded_grads(f, *arrays):
    """Gradients by the VJP rules on Tensors (create_graph records the backward)."""
    ts = [eg.tensor(a, requires_grad=True) for a in arrays]
    f(*ts).backward(create_graph=True)
    return [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("spec, shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ii->i", [(4, 4)]),                      # a repeated index: an identity constant
    ("ij->i", [(3, 4)]),                      # an index summed away: a ones constant
    ("bij->", [(2, 3, 4)]),
    ("ijk,kl->lji", [(2, 3, 4), (4, 5)]),
])
def test_array_vjps_match_the_rules_and_their_cache(spec, shapes):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]
    f = lambda *xs: eg.tanh(eg.einsum(spec, *xs)).sum()  # noqa: E731
    want = _recorded_grads(f, *arrays)
    g = eg.grad(f, argnums=tuple(range(len(arrays))))
    for _ in range(2):  # the second call runs the cached runners
        got = g(*arrays)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes", [
    [(3, 4), (4,)], [(3, 4), (3, 1)], [(2, 3, 4), (1, 3, 1)], [(3, 4), ()], [(4,), (3, 4)],
    [(3, 4), (3, 4)]])
def test_sums_array_vjps_match_the_rules(shapes):
    """x + y and a layer's bias add: the cotangent, summed where an input was broadcast,
    on arrays in a backward that records nothing; the rules where one records."""
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(s) for s in shapes]
    from einsumgrad.rules import add_bias
    sums = [lambda x, y: eg.tanh(x + y).sum(), lambda x, y: eg.tanh(x + x + y).sum()]
    if len(shapes[1]) <= len(shapes[0]):  # a bias broadcasts against the layer's output
        sums.append(lambda x, y: eg.tanh(add_bias(x * 1.0, y)).sum())
    for f in sums:
        want = _recorded_grads(f, *arrays)
        got = eg.grad(f, argnums=(0, 1))(*arrays)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)


def test_array_vjp_in_a_primal_layout():
    rng = np.random.default_rng(1)
    x = np.asfortranarray(rng.standard_normal((2, 3, 4)))  # a cotangent laid out as x
    f = lambda x: (eg.einsum("ijk->ij", x) ** 2).sum()  # noqa: E731
    want = _recorded_grads(f, x)[0]
    for _ in range(2):
        np.testing.assert_allclose(eg.grad(f)(x).numpy(), want, rtol=1e-12)


def test_grad_results_are_fresh_leaves():
    x = np.ones(3)
    g = eg.grad(lambda x: (x * 2.0).sum())(x)
    assert g.node is None and not g.requires_grad
    np.testing.assert_array_equal(g.numpy(), 2.0)


def test_vjp_with_a_cotangent_that_requires_grad_records():
    x = np.arange(3.0)
    out, pull = eg.vjp(lambda x: eg.sin(x), x)
    c = eg.tensor(np.ones(3), requires_grad=True)
    (g,) = pull(c)
    assert g.requires_grad  # the pass recorded: the cotangent's graph goes on
    g.sum().backward()
    np.testing.assert_allclose(c.grad.numpy(), np.cos(x))


def test_sum_axis_cache_keeps_its_checks():
    t = eg.tensor(np.ones((2, 3)))
    assert t.sum(axis=1).shape == (2,)
    with pytest.raises(TypeError):
        t.sum(axis=True)  # not the cached axis 1
    with pytest.raises(ValueError):
        t.sum(axis=2)
    assert t.sum(axis=-1).shape == (2,) and t.sum(axis=0, keepdims=True).shape == (1, 3)


def test_argnums_cache_keeps_its_checks():
    f = lambda x, y: (x * y).sum()  # noqa: E731
    g = eg.grad(f, argnums=(0, 1))
    for _ in range(2):
        gx, gy = g(np.ones(2), np.full(2, 3.0))
        np.testing.assert_array_equal(gx.numpy(), 3.0)
    with pytest.raises(ValueError, match="out of range"):
        eg.grad(f, argnums=2)(np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        eg.grad(f, argnums=2)(np.ones(2), np.ones(2))


def test_in_place_change_still_refused_in_both_walks():
    w = eg.tensor(np.ones(3))

    def f(x):
        y = x * w
        w.data[...] = 0  # not through the tape
        w.version += 1   # as an in-place op marks it
        return y.sum()
    with pytest.raises(RuntimeError, match="changed in place"):
        eg.grad(f)(np.ones(3))
    w2 = eg.tensor(np.ones(3))

    def h(x):
        y = x * w2
        w2.version += 1
        return y
    with pytest.raises(RuntimeError, match="changed in place"):
        eg.jvp(h, (np.ones(3),), (np.ones(3),))


def test_backend_of_forgets_unowned_types_on_register():
    class Scalarish(float):
        pass
    numpy_backend = base.backend_of(np.ones(1))
    assert base.backend_of(Scalarish(1.0)) is numpy_backend
    assert Scalarish in base._unowned
    base.register_backend(Scalarish, numpy_backend)
    try:
        assert Scalarish not in base._unowned
        assert base.backend_of(Scalarish(1.0)) is numpy_backend
    finally:
        del base._registry[Scalarish]
