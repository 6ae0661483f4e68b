"""The rule writer's face (einsumgrad.extend): a primitive defined outside the
package, with broadcasting and a batch rule, behaves as the built-in ones."""
import doctest

import numpy as np
import pytest
import torch

import einsumgrad as eg
import einsumgrad.extend as ext
from backends import npy, xb


def test_the_docstring_example_runs():
    assert doctest.testmod(ext, raise_on_error=False).failed == 0


def _hypot():
    # hypot(x, y) = sqrt(x^2 + y^2), its rules in engine ops; broadcasting
    # between x and y is the rules' own, through ext.broadcasting.
    p = ext.Primitive("hypot", lambda x, y: ext.backend_of(x).hypot(x, y))
    p.defvjp(lambda k, g, out, x, y: g * (x if k == 0 else y) / out)
    p.defjvp(lambda k, t, out, x, y: t * (x if k == 0 else y) / out)
    p.defbatch(ext.elementwise_batch)
    ext.broadcasting(p)
    return lambda x, y: ext.bind(p, *ext.pair(x, y))


def test_a_broadcasting_primitive_matches_torch_to_second_order():
    hypot = _hypot()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal(3)
    ext.check_grads(hypot, xb(x), xb(y), order=2)
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    want = torch.autograd.grad(torch.hypot(tx, ty).sum(), (tx, ty))
    got = eg.grad(lambda a, b: hypot(a, b).sum(), argnums=(0, 1))(xb(x), xb(y))
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(npy(g), w.numpy(), rtol=1e-12)
    J = npy(eg.jacfwd(lambda b: hypot(xb(x), b))(xb(y)))
    np.testing.assert_allclose(J, npy(eg.jacrev(lambda b: hypot(xb(x), b))(xb(y))), rtol=1e-12)


def test_its_batch_rule_keeps_rows_apart_and_names_what_mixes():
    hypot = _hypot()
    x = xb(np.random.default_rng(1).standard_normal((5, 3)))
    jb = npy(eg.batch_jacobian(lambda t: hypot(t, t[:, ::-1]))(x))
    full = npy(eg.jacrev(lambda t: hypot(t, t[:, ::-1]))(x))
    for b in range(5):
        np.testing.assert_allclose(jb[b], full[b, :, b], rtol=1e-12)
    with pytest.raises(eg.BatchMixingError):  # rows paired with a reversed batch: they mix
        eg.batch_jacobian(lambda t: hypot(t, t[::-1]))(x)


def test_deflinear_gives_the_primitive_itself_as_its_jvp():
    scale = ext.Primitive("scale", lambda x, c: x * c)
    scale.defvjp(lambda k, g, out, x, c: g * c)
    scale.deflinear()
    f = lambda x: ext.bind(scale, ext.as_tensor(x), c=3.0)
    ext.check_grads(f, xb(np.arange(4.0)), order=2)
    node = eg.jvp(f, (xb(np.ones(4)),), (xb(np.ones(4)),))
    np.testing.assert_allclose(npy(node[1]), 3.0 * np.ones(4))
