"""einsum against NumPy (forward) and PyTorch (VJP, JVP, Jacobian), float64 to 1e-9.

Random specs come from :func:`einsum_cases.einsum_cases`; the specs that
trip up other engines (repeated indices inside one operand, indices summed
away) are also checked one by one.
"""
import numpy as np
import pytest
import torch
from hypothesis import event, given, settings

import einsumgrad as eg
from backends import npy, xb
from einsum_cases import einsum_cases, full_shapes
from einsumgrad.testing import check_grads

TOL = dict(rtol=1e-9, atol=1e-9)

# Repeated indices inside one operand and indices summed away: the specs of item 3.
NAMED = [
    ("ii->", [(3, 3)]),
    ("ii->i", [(3, 3)]),
    ("iij->j", [(3, 3, 2)]),
    ("nd,nn->d", [(3, 2), (3, 3)]),
    ("iji->j", [(3, 2, 3)]),
    ("bii,bi->b", [(2, 3, 3), (2, 3)]),
    ("ij->i", [(2, 3)]),
    ("ij,jk->ik", [(2, 3), (3, 4)]),
]


def _torch_fn(spec: str, full):
    """einsum in PyTorch with every broadcast spelled out by ``expand``."""
    return lambda *xs: torch.einsum(spec, *[x.expand(f) for x, f in zip(xs, full)])


def _operands(shapes, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def _features(spec: str, shapes, full) -> None:
    """Label the case for ``--hypothesis-show-statistics``: what the run covered."""
    terms = spec.split("->")[0].split(",")
    event(f"{len(terms)} operand(s)")
    for name, hit in [("repeated index", any(len(set(t) - {"."}) < len(t.replace("...", ""))
                                             for t in terms)),
                      ("ellipsis", "..." in spec), ("implicit output", "->" not in spec),
                      ("size-1 broadcast", shapes != full), ("scalar operand", "" in terms)]:
        if hit:
            event(name)


def _check_forward_and_vjp(spec: str, shapes, full) -> None:
    ops = _operands(shapes)
    want = np.einsum(spec, *ops)
    out, pull = eg.vjp(lambda *xs: eg.einsum(spec, *xs), *[xb(o) for o in ops])
    assert npy(out).shape == want.shape
    np.testing.assert_allclose(npy(out), want, **TOL)

    g = np.random.default_rng(1).standard_normal(want.shape)
    ts = [torch.tensor(o, requires_grad=True) for o in ops]
    ref = torch.autograd.grad(_torch_fn(spec, full)(*ts), ts, torch.tensor(g),
                              allow_unused=True)
    for k, (got, r) in enumerate(zip(pull(xb(g)), ref)):
        r = np.zeros(shapes[k]) if r is None else r.numpy()
        assert npy(got).shape == shapes[k], f"vjp {k} of {spec!r}"
        np.testing.assert_allclose(npy(got), r, **TOL, err_msg=f"vjp {k} of {spec!r}")


def _check_jvp(spec: str, shapes, full) -> None:
    ops, tans = _operands(shapes), _operands(shapes, seed=2)
    _, got = eg.jvp(lambda *xs: eg.einsum(spec, *xs), [xb(o) for o in ops],
                    [xb(t) for t in tans])
    _, ref = torch.func.jvp(_torch_fn(spec, full), tuple(map(torch.tensor, ops)),
                            tuple(map(torch.tensor, tans)))
    np.testing.assert_allclose(npy(got), ref.numpy(), **TOL, err_msg=f"jvp of {spec!r}")


def _check_jacobian(spec: str, shapes, full) -> None:
    ops = _operands(shapes)
    ref = torch.autograd.functional.jacobian(_torch_fn(spec, full),
                                             tuple(map(torch.tensor, ops)))
    d = eg.derive(spec, *shapes)
    for k in range(len(ops)):
        got = d.jacobian(k).materialize(*[xb(o) for o in ops])
        np.testing.assert_allclose(npy(got), ref[k].numpy(), **TOL,
                                   err_msg=f"jacobian {k} of {spec!r}")


# -- random specs: 500 + 500 + 200 + 60 = 1260 cases a run -----------------------------

@settings(max_examples=500)
@given(einsum_cases())
def test_random_forward_and_vjp_match_numpy_and_torch(case):
    _features(*case)
    _check_forward_and_vjp(*case)


@settings(max_examples=500)
@given(einsum_cases())
def test_random_jvp_matches_torch(case):
    _check_jvp(*case)


@settings(max_examples=200)
@given(einsum_cases(max_operands=3))
def test_random_jacobian_materialize_matches_torch(case):
    _check_jacobian(*case)


@settings(max_examples=60)
@given(einsum_cases(max_operands=3))
def test_random_second_order_against_finite_differences(case):
    # VJPs and JVPs of the derived patterns (diag, broadcast, unsqueeze) are
    # themselves differentiated: fwd/rev over fwd/rev.
    spec, shapes, _ = case
    check_grads(lambda *xs: eg.einsum(spec, *xs), *[xb(o) for o in _operands(shapes)], order=2)


# -- the named specs, one by one -------------------------------------------------------

@pytest.mark.parametrize("spec,shapes", NAMED)
def test_named_spec_forward_vjp_jvp_jacobian(spec, shapes):
    full = full_shapes(spec, shapes)
    _check_forward_and_vjp(spec, shapes, full)
    _check_jvp(spec, shapes, full)
    _check_jacobian(spec, shapes, full)


@pytest.mark.parametrize("spec,shapes", NAMED)
def test_named_spec_second_order(spec, shapes):
    check_grads(lambda *xs: eg.einsum(spec, *xs), *[xb(o) for o in _operands(shapes)], order=2)


@pytest.mark.parametrize("spec,shapes", [
    ("ij,jk->ik", [(2, 1), (3, 4)]),      # labelled index broadcast from 1
    ("...ij,...jk->...ik", [(2, 1, 3, 2), (1, 4, 2, 3)]),  # ellipsis axes broadcast
    ("ii,i->i", [(1, 1), (3,)]),          # a repeated index, broadcast
    ("i,i->", [(1,), (3,)]),
    (",->", [(), ()]),                    # scalars
    ("ij,ij", [(2, 3), (2, 3)]),          # implicit output: a full contraction
    ("ba", [(2, 3)]),                     # implicit output: letters sorted, a transpose
])
def test_broadcast_and_implicit_cases(spec, shapes):
    full = full_shapes(spec, shapes)
    _check_forward_and_vjp(spec, shapes, full)
    _check_jvp(spec, shapes, full)
    _check_jacobian(spec, shapes, full)


# -- NumPy's sublist form: einsum(op0, sublist0, op1, sublist1, ..., [output]) ---------------

E = Ellipsis
SUBLISTS = [
    ([(2, 3), [0, 1], (3, 4), [1, 2]], None),            # implicit output
    ([(2, 3), [0, 1], (3, 4), [1, 2]], [0, 2]),
    ([(2, 3, 4), [E, 0, 1], (4, 5), [1, 2]], [E, 2, 0]),  # ... inside sublists
    ([(5, 2, 3), (0, E), (3,), [E]], [E, 0]),              # tuples work too
    ([(2, 3), [27, 0]], None),                            # implicit: sorted by int, a transpose
    ([(3, 3), [4, 4], (3,), [4]], []),                    # trace times a vector
]


@pytest.mark.parametrize("args,out", SUBLISTS)
def test_sublist_form_matches_numpy_and_torch(args, out):
    shapes = args[0::2]
    ops = _operands(shapes)
    sublists = args[1::2]

    def interleave(xs):
        return [v for pair in zip(xs, sublists) for v in pair] + ([] if out is None else [out])
    want = np.einsum(*interleave(ops))
    got, pull = eg.vjp(lambda *xs: eg.einsum(*interleave(xs)), *[xb(o) for o in ops])
    assert npy(got).shape == want.shape
    np.testing.assert_allclose(npy(got), want, **TOL)
    g = np.random.default_rng(1).standard_normal(want.shape)
    ts = [torch.tensor(o, requires_grad=True) for o in ops]
    ref = torch.autograd.grad(torch.einsum(*interleave(ts)), ts, torch.tensor(g))
    for k, (ours, r) in enumerate(zip(pull(xb(g)), ref)):
        np.testing.assert_allclose(npy(ours), r.numpy(), **TOL, err_msg=f"vjp {k}")


def test_malformed_sublists_name_the_operand():
    a, b = xb(np.ones((2, 3))), xb(np.ones((3, 4)))
    for args, match in [((a, [0, 1], b, [1, 1.5]), "operand 1's sublist has 1.5"),
                        ((a, [0, 52]), "operand 0's sublist has index 52"),
                        ((a, [-1, 0]), "operand 0's sublist has index -1"),
                        ((a, "ab"), "operand 0's sublist is a str"),
                        ((a, [0, 1], b, [1, 2], [0, "c"]), "output sublist"),
                        ((a, [0], b, [1, 2]), "operand 0")]:
        with pytest.raises(eg.EinsumError, match=match):
            eg.einsum(*args)
