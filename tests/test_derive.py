"""The derivation layer: the printed patterns, the Jacobian, and pattern caching."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from backends import npy, xb
from einsum_cases import full_shapes


def test_matmul_vjp_patterns_are_canonical():
    d = eg.derive("ij,jk->ik")
    assert str(d.vjp(0)) == "ik,jk->ij"
    assert str(d.vjp(1)) == "ik,ij->jk"
    assert str(d.vjp(-1)) == "ik,ij->jk"


def test_jvp_pattern_is_the_einsum_with_the_tangent_in_place():
    d = eg.derive("ij,jk->ik")
    assert str(d.jvp(0)) == "ij,jk->ik" and d.jvp(0).k == 0
    assert d.jvp(1).k == 1


@pytest.mark.parametrize("spec,k,expected", [
    # An index summed away comes back by broadcasting.
    ("ij->i", 0, "i->i | broadcast i->ij"),
    # An index repeated inside the operand: the cotangent goes onto the diagonal.
    ("ii->", 0, "-> | broadcast ->i | diag i->ii"),
    ("ii->i", 0, "i->i | diag i->ii"),
    ("iij->j", 0, "j->j | broadcast j->ij | diag ij->iij"),
    ("iji->j", 0, "j->j | broadcast j->ij | diag ij->iji"),
    ("nd,nn->d", 0, "d,nn->nd"),
    ("nd,nn->d", 1, "d,nd->n | diag n->nn"),
    ("bii,bi->b", 0, "b,bi->bi | diag bi->bii"),
    ("bii,bi->b", 1, "b,bii->bi"),
])
def test_extra_steps_show_in_str(spec, k, expected):
    assert str(eg.derive(spec).vjp(k)) == expected


def test_size_one_broadcast_shows_as_unsqueeze():
    d = eg.derive("ij,j->ij", (2, 3), (1,))
    assert str(d.vjp(1)) == "ij,ij-> | unsqueeze ->1"
    d = eg.derive("ij,jk->ik", (2, 1), (3, 4))
    assert str(d.vjp(0)) == "ik,jk->i | unsqueeze i->i1"
    assert str(d.vjp(1)) == "ik,i->k | broadcast k->jk"


def test_ellipsis_prints_back_as_ellipsis():
    d = eg.derive("...ij,...jk->...ik")
    assert str(d.vjp(0)) == "...ik,...jk->...ij"
    assert str(d.vjp(1)) == "...ik,...ij->...jk"


def test_jacobian_str_is_embedding_then_collapse():
    d = eg.derive("ij,jk->ik")
    assert str(d.jacobian(0)) == "jk->ik|ij"
    assert str(d.jacobian(1)) == "ij->ik|jk"
    assert str(eg.derive("ii->").jacobian(0)) == "->|ii"


def test_patterns_are_cached_per_spec():
    assert eg.derive("ij,jk->ik") is eg.derive("ij,jk->ik")
    assert eg.derive("ij,jk->ik").vjp(0) is eg.derive("ij,jk->ik").vjp(0)
    assert eg.derive("ij,jk->ik", (2, 3), (3, 4)) is eg.derive("ij,jk->ik", (2, 3), (3, 4))


def test_operand_out_of_range_raises():
    # An EinsumError naming the operand count, and an IndexError as before.
    for method in ("vjp", "jvp", "jacobian"):
        for k in (2, -3, 0.0):
            with pytest.raises(eg.EinsumError, match=f"operand.*{k}.*has 2 operands") as e:
                getattr(eg.derive("ij,jk->ik"), method)(k)
            assert isinstance(e.value, IndexError)


def test_ellipsis_left_out_of_the_output_is_summed_in_every_pattern():
    d = eg.derive("...ij,jk->ik", (5, 2, 3), (3, 4))
    assert str(d.vjp(0)) == "ik,jk->ij | broadcast ij->...ij"
    assert str(d.vjp(1)) == "ik,...ij->jk"
    assert str(d.jvp(1)) == "...ij,jk->ik"
    assert str(d.jacobian(1)) == "...ij->ik|jk"
    assert d.out_shape == (2, 4)


@pytest.mark.parametrize("spec,shapes", [
    ("ij,jk->ik", [(2, 3), (3, 4)]),
    ("ii->i", [(3, 3)]),
    ("bii,bi->b", [(2, 3, 3), (2, 3)]),
    ("iij->j", [(2, 2, 3)]),
    ("ij,jk->ik", [(2, 1), (3, 4)]),     # size-1 broadcast in the other operand
    ("ij,j->ij", [(2, 3), (1,)]),        # size-1 broadcast in the operand itself
    ("ii,i->i", [(1, 1), (3,)]),         # a repeated index broadcast from 1
    ("...i,...i->...", [(2, 1, 3), (4, 3)]),
    ("...i,...i->i", [(2, 1, 3), (4, 3)]),  # '...' left out of the output: summed
])
def test_jacobian_materialize_matches_torch(spec, shapes):
    rng = np.random.default_rng(0)
    ops = [rng.standard_normal(s) for s in shapes]
    d = eg.derive(spec, *shapes)
    full = full_shapes(spec, shapes)
    ref = torch.autograd.functional.jacobian(
        lambda *xs: torch.einsum(spec, *[x.expand(f) for x, f in zip(xs, full)]),
        tuple(map(torch.tensor, ops)))
    for k, op in enumerate(ops):
        J = d.jacobian(k).materialize(*[xb(o) for o in ops])
        assert J.shape == d.out_shape + op.shape
        np.testing.assert_allclose(npy(J), ref[k].numpy(), rtol=1e-12, atol=1e-12)


def test_jacobian_materialize_keeps_tensors_and_dtype():
    x = eg.tensor(np.ones((2, 3), dtype=np.float32))
    w = eg.tensor(np.ones((3, 4), dtype=np.float32))
    J = eg.derive("ij,jk->ik").jacobian(1).materialize(x, w)
    assert isinstance(J, eg.Tensor) and J.shape == (2, 4, 3, 4) and J.dtype == np.float32


def test_jacobian_jvp_and_vjp_without_building_it():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3)), rng.standard_normal((3, 4))
    jac = eg.derive("ij,jk->ik").jacobian(0)
    J = npy(jac.materialize(xb(x), xb(w)))
    v, u = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    np.testing.assert_allclose(npy(jac.jvp(xb(v), xb(x), xb(w))),
                               np.einsum("ikab,ab->ik", J, v), rtol=1e-12)
    np.testing.assert_allclose(npy(jac.vjp(xb(u), xb(x), xb(w))),
                               np.einsum("ik,ikab->ab", u, J), rtol=1e-12)
