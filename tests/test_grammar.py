"""Einsum grammar corners where peers disagree, clear errors, and the call forms.

* ``...`` in the inputs but not in an explicit output sums those axes (torch,
  and NumPy's ``optimize=`` path): values against NumPy, gradients, JVPs and
  Jacobians against PyTorch, by hand and with hypothesis; ``derive`` and
  ``explain`` too.
* A space inside ``...`` or ``->`` is refused (NumPy and torch refuse it);
  spaces elsewhere are ignored as NumPy ignores them.
* Integer and bool einsums keep NumPy's result dtype on every path.
* Bad sizes, specs and operand numbers raise errors that name the culprit.
* torch's list form ``einsum(spec, [A, B])`` and ``optimize=``.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
import einsumgrad.plan
from backends import npy, xb
from einsum_cases import einsum_cases, full_shapes
from einsumgrad.testing import check_grads

TOL = dict(rtol=1e-9, atol=1e-9)
ROOT = Path(__file__).resolve().parent.parent


# -- helpers: references from NumPy (values) and PyTorch (derivatives) ----------------------

def _operands(shapes, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def _ellipsis_rank(spec: str, shapes) -> int:
    terms = spec.split("->")[0].split(",")
    return max([len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes) if "..." in t],
               default=0)


def numpy_dropped(spec: str, ops) -> np.ndarray:
    """NumPy's value for a spec whose explicit output drops the inputs' ``...``:
    the einsum keeping ``...`` in front of the output (NumPy's C einsum accepts
    that), then summed over those leading axes."""
    lhs, out = spec.split("->")
    r = _ellipsis_rank(spec, [o.shape for o in ops])
    return np.einsum(f"{lhs}->...{out}", *ops).sum(axis=tuple(range(r)))


def _torch_fn(spec: str, full):
    return lambda *xs: torch.einsum(spec, *[x.expand(f) for x, f in zip(xs, full)])


def check_all(spec: str, shapes, full, jacobian: bool = True) -> None:
    """Value against NumPy; VJP, JVP and (optionally) the Jacobian against PyTorch."""
    ops = _operands(shapes)
    want = numpy_dropped(spec, ops)
    out, pull = eg.vjp(lambda *xs: eg.einsum(spec, *xs), *[xb(o) for o in ops])
    assert npy(out).shape == want.shape, spec
    np.testing.assert_allclose(npy(out), want, **TOL, err_msg=spec)

    g = np.random.default_rng(1).standard_normal(want.shape)
    ts = [torch.tensor(o, requires_grad=True) for o in ops]
    ref = torch.autograd.grad(_torch_fn(spec, full)(*ts), ts, torch.tensor(g), allow_unused=True)
    for k, (got, r) in enumerate(zip(pull(xb(g)), ref)):
        r = np.zeros(shapes[k]) if r is None else r.numpy()
        assert npy(got).shape == tuple(shapes[k]), f"vjp {k} of {spec!r}"
        np.testing.assert_allclose(npy(got), r, **TOL, err_msg=f"vjp {k} of {spec!r}")

    tans = _operands(shapes, seed=2)
    _, got = eg.jvp(lambda *xs: eg.einsum(spec, *xs), [xb(o) for o in ops], [xb(t) for t in tans])
    _, r = torch.func.jvp(_torch_fn(spec, full), tuple(map(torch.tensor, ops)),
                          tuple(map(torch.tensor, tans)))
    np.testing.assert_allclose(npy(got), r.numpy(), **TOL, err_msg=f"jvp of {spec!r}")

    if jacobian:
        ref = torch.autograd.functional.jacobian(_torch_fn(spec, full),
                                                 tuple(map(torch.tensor, ops)))
        d = eg.derive(spec, *shapes)
        for k in range(len(ops)):
            J = d.jacobian(k).materialize(*[xb(o) for o in ops])
            np.testing.assert_allclose(npy(J), ref[k].numpy(), **TOL,
                                       err_msg=f"jacobian {k} of {spec!r}")


# -- 1a. '...' in the inputs, absent from an explicit output: summed ------------------------

DROPPED = [
    ("...i->i", [(2, 3, 4)]),
    ("...->", [(2, 3)]),
    ("i...->i", [(3, 2, 2)]),
    ("...ij,...j->i", [(2, 3, 4), (4,)]),
    ("...ij,...jk->ik", [(2, 3, 4), (1, 4, 5)]),   # an ellipsis axis broadcast from 1
    ("...ij,jk->ki", [(5, 2, 3), (3, 2)]),
    ("...ii->i", [(2, 3, 3)]),                     # with a diagonal
    ("a...b,b...->a", [(2, 3, 4, 5), (5, 4)]),     # ranks differ: right-aligned
    ("...i,...i->", [(2, 1, 3), (4, 3)]),
    ("...,...->", [(2, 3), (3,)]),
    ("...i,j->ij", [(3, 2), (4,)]),
]


@pytest.mark.parametrize("spec,shapes", DROPPED)
def test_dropped_ellipsis_is_summed_values_grads_jvps_jacobians(spec, shapes):
    check_all(spec, shapes, full_shapes(spec, shapes))


@pytest.mark.parametrize("spec,shapes", DROPPED)
def test_dropped_ellipsis_agrees_with_numpy_optimize_path_and_torch(spec, shapes):
    # NumPy's optimized path (np.einsum(..., optimize=True)) and torch both sum.
    ops = _operands(shapes)
    full = full_shapes(spec, shapes)
    got = npy(eg.einsum(spec, *[xb(o) for o in ops]))
    np.testing.assert_allclose(got, np.einsum(spec, *[np.broadcast_to(o, f) for o, f in
                                                      zip(ops, full)], optimize=True), **TOL)
    np.testing.assert_allclose(got, _torch_fn(spec, full)(*map(torch.tensor, ops)).numpy(), **TOL)


@pytest.mark.parametrize("spec,shapes", DROPPED[:4])
def test_dropped_ellipsis_second_order(spec, shapes):
    check_grads(lambda *xs: eg.einsum(spec, *xs), *[xb(o) for o in _operands(shapes)], order=2)


def test_dropped_ellipsis_derive_and_explain():
    d = eg.derive("...ij,...j->i", (2, 3, 4), (4,))
    assert d.out_shape == (3,)
    # The ellipsis summed away comes back by broadcasting, as any index summed away.
    assert str(d.vjp(0)) == "i,j->ij | broadcast ij->...ij"
    assert str(d.vjp(1)) == "i,...ij->j"
    assert str(d.jvp(0)) == "...ij,j->i"
    assert str(d.jacobian(1)) == "...ij->i|j"
    assert str(eg.derive("...i->i", (2, 3, 4)).vjp(0)) == "i->i | broadcast i->...i"
    assert str(eg.derive("...i->i").vjp(0)) == "i->i | broadcast i->...i"  # no shapes
    text = eg.explain("...ij,...j->i", (2, 3, 4), (4,))
    assert "output: i shape (3,)" in text and "summed over: ...[0], j" in text
    assert "leaves out '...'" in text
    text = eg.explain("...i->i")
    assert "summed over: ..." in text and "#" not in text and "leaves out '...'" in text
    assert "leaves out" not in eg.explain("...i->...", (2, 3))
    # What derive prints reads back as the same einsum.
    g, x0 = _operands([(3,), (2, 3, 4)])
    np.testing.assert_allclose(npy(eg.einsum(str(d.vjp(1)), xb(g), xb(x0))),
                               numpy_dropped("i,...ij->j", [g, x0]), **TOL)


@st.composite
def dropped_ellipsis_cases(draw, max_operands: int = 4):
    """Random cases (as :func:`einsum_cases`) whose explicit output drops ``...``."""
    spec, shapes, _ = draw(einsum_cases(max_operands))
    lhs, arrow, rhs = spec.partition("->")
    terms, shapes = lhs.split(","), list(shapes)
    if not any("..." in t for t in terms):
        k = draw(st.integers(0, len(terms) - 1))
        ell = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
        terms[k], shapes[k] = "..." + terms[k], tuple(ell) + tuple(shapes[k])
    if arrow:
        out = rhs.replace("...", "")
    else:
        seen = list(dict.fromkeys(c for t in terms for c in t if c != "."))
        out = "".join(draw(st.permutations(seen))[:draw(st.integers(0, len(seen)))])
    spec = ",".join(terms) + "->" + out
    return spec, shapes, full_shapes(spec, shapes)


@settings(max_examples=200)
@given(dropped_ellipsis_cases())
def test_random_dropped_ellipsis_forward_vjp_jvp(case):
    check_all(*case, jacobian=False)


@settings(max_examples=80)
@given(dropped_ellipsis_cases(max_operands=3))
def test_random_dropped_ellipsis_jacobian(case):
    check_all(*case)


@settings(max_examples=25)
@given(dropped_ellipsis_cases(max_operands=3))
def test_random_dropped_ellipsis_second_order(case):
    spec, shapes, _ = case
    check_grads(lambda *xs: eg.einsum(spec, *xs), *[xb(o) for o in _operands(shapes)], order=2)


# -- 1b. spaces: refused inside '...' and '->', ignored elsewhere ---------------------------

@pytest.mark.parametrize("spec,shape,what", [
    (". ..i->i", (2, 3), "'...'"),
    (".. .i->i", (2, 3), "'...'"),
    ("...i->. ..i", (2, 3), "'...'"),
    ("i- >i", (3,), "'->'"),
    ("i - > i", (3,), "'->'"),
    ("i-  >i", (3,), "'->'"),
])
def test_space_inside_ellipsis_or_arrow_is_refused(spec, shape, what):
    a = np.ones(shape)
    with pytest.raises(ValueError):          # NumPy refuses it ...
        np.einsum(spec, a)
    with pytest.raises(RuntimeError):        # ... and so does torch
        torch.einsum(spec, torch.tensor(a))
    with pytest.raises(eg.EinsumError, match="space") as e:
        eg.einsum(spec, xb(a))
    assert what in str(e.value)
    with pytest.raises(eg.EinsumError, match="space"):
        eg.derive(spec)
    with pytest.raises(eg.EinsumError, match="space"):
        eg.explain(spec, shape)


@pytest.mark.parametrize("spec,shapes", [
    (" ij , jk -> ik ", [(2, 3), (3, 4)]),
    ("i ->i", [(3,)]),
    ("i-> i", [(3,)]),
    ("i j->j i", [(2, 3)]),
    (" ...i -> ...i", [(2, 3)]),
    ("... i, i", [(2, 3), (3,)]),
])
def test_spaces_elsewhere_are_ignored_as_numpy_does(spec, shapes):
    ops = _operands(shapes)
    np.testing.assert_allclose(npy(eg.einsum(spec, *[xb(o) for o in ops])),
                               np.einsum(spec, *ops), **TOL)


# -- 1c. integer and bool einsums keep NumPy's result dtype --------------------------------

DTYPE_SPECS = [
    "ij->i", "ij->", "ij->ji", "ii->i", "ii->",          # one operand: sums, transpose, diag
    "ij,jk->ik", "bij,bjk->bik", "i,i->",                # matmul (BLAS lowering)
    "ij,j->ij", "i,j->ij", "ij,ij->ij",                  # broadcast multiply (MKL vsMul)
    "ij,jk->i", "ijk,k->i",                              # an index summed away first
    "ii,ij->j",                                          # a diagonal: the backend's einsum
    "ij,jk,kl->il", "ij,jk,kl,lm->im", "ab,bc,ca->",     # three or more: opt_einsum's path
]
SIZES = dict(i=3, j=4, k=5, l=2, m=3, b=2, a=3, c=2)
DTYPES = [np.int64, np.int32, np.int8, np.uint8, np.bool_, np.float32, np.float16]


def _int_operands(spec, dtypes, scale=1, seed=0):
    rng = np.random.default_rng(seed)
    terms = spec.split("->")[0].split(",")
    dtypes = [dtypes[k % len(dtypes)] for k in range(len(terms))]
    return [rng.integers(0, 3, tuple(SIZES[c] * scale for c in t)).astype(d)
            for t, d in zip(terms, dtypes)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec", DTYPE_SPECS)
@pytest.mark.parametrize("scale", [1, 20])   # 20: large enough for the matvec sums and BLAS
def test_dtype_and_values_follow_numpy(spec, dtype, scale):
    if spec.count(",") >= 2:  # NumPy's reference loops over every index at once
        scale = min(scale, 4)
    ops = _int_operands(spec, [dtype], scale)
    want = np.einsum(spec, *ops)
    got = npy(eg.einsum(spec, *[xb(o) for o in ops]))
    assert got.dtype == want.dtype, f"{spec} on {np.dtype(dtype).name}"
    if np.dtype(dtype).kind == "f":  # against exact sums: NumPy's float16 loop rounds more
        exact = np.einsum(spec, *[o.astype(np.float64) for o in ops])
        if dtype == np.float16:  # past float16's range (65504) NumPy's answer is inf too
            fits = exact < 3e4
            assert np.isinf(got[exact > 1e5]).all()
            np.testing.assert_allclose(got[fits], exact[fits], rtol=1e-2)
        else:
            np.testing.assert_allclose(got, exact, rtol=1e-5)
    else:  # integer arithmetic wraps as NumPy's does; bool sums are ORs
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtypes", [
    (np.int32, np.float32), (np.float32, np.int32), (np.bool_, np.int8), (np.int8, np.bool_),
    (np.int64, np.float32), (np.int8, np.uint8), (np.int8, np.uint8, np.float16),
    (np.float32, np.float64), (np.bool_, np.float32),
], ids=lambda ds: "+".join(np.dtype(d).name for d in ds))
@pytest.mark.parametrize("spec", ["ij,jk->ik", "ij,jk->i", "ij,j->ij", "ij,ij->ij", "ij,jk,kl->il",
                                  "ij,jk,kl->i"])
@pytest.mark.parametrize("optimize", ["auto", False])
def test_mixed_dtypes_follow_numpy_result_type(spec, dtypes, optimize):
    ops = _int_operands(spec, dtypes, scale=1)
    want = np.einsum(spec, *ops)
    got = npy(eg.einsum(spec, *[xb(o) for o in ops], optimize=optimize))
    assert got.dtype == want.dtype == np.result_type(*ops)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-2)


def test_bool_operand_summed_away_next_to_an_integer_counts_not_ors():
    # A bool operand whose own index is summed away first, against an int8 one:
    # NumPy computes in int8, so the sum counts (an OR would give 5, not 20).
    a, b = np.ones((3, 4), dtype=bool), np.ones((4, 5), dtype=np.int8)
    want = np.einsum("ij,jk->i", a, b)
    got = npy(eg.einsum("ij,jk->i", xb(a), xb(b)))
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    assert (got == 20).all()


def test_float_dtypes_on_the_blas_path():
    # Large enough for MKL's GEMM and the matvec sums where installed.
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        a, b = rng.standard_normal((64, 96)).astype(dt), rng.standard_normal((96, 80)).astype(dt)
        for spec in ("ij,jk->ik", "ij,jk->i", "ij->j", "ij,jk->"):
            got = npy(eg.einsum(spec, xb(a), xb(b)) if "," in spec else eg.einsum(spec, xb(a)))
            want = np.einsum(spec, a, b) if "," in spec else np.einsum(spec, a)
            assert got.dtype == want.dtype == dt
            np.testing.assert_allclose(got, want, rtol=1e-4 if dt == np.float32 else 1e-10,
                                       atol=1e-3 if dt == np.float32 else 1e-9)


# -- 2. clear errors ------------------------------------------------------------------------

@pytest.mark.parametrize("shapes,culprit", [
    ([(2, -3), (3, 4)], ["operand 0", "axis 1", "-3"]),
    ([(2, 3), (3, -1)], ["operand 1", "axis 1", "-1"]),
    ([(2, 3.5), (3, 4)], ["operand 0", "axis 1", "3.5"]),
    ([(2, "3"), (3, 4)], ["operand 0", "axis 1", "'3'"]),
    ([(2, 3), (None, 4)], ["operand 1", "axis 0", "None"]),
    ([3, (3, 4)], ["operand 0", "int"]),
])
def test_bad_sizes_in_explain_and_derive_name_operand_and_axis(shapes, culprit):
    for f in (eg.explain, eg.derive):
        with pytest.raises(eg.EinsumError) as e:
            f("ij,jk->ik", *shapes)
        for c in culprit:
            assert c in str(e.value), (f.__name__, str(e.value))


def test_shapes_as_lists_and_numpy_ints_are_fine():
    text = eg.explain("ij,jk->ik", [2, 3], [np.int64(3), 4])
    assert "output: ik shape (2, 4)" in text
    assert eg.derive("ij,jk->ik", [2, 3], (3, 4)) is eg.derive("ij,jk->ik", (2, 3), (3, 4))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "einsumgrad", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("shapes,culprit", [
    (["2x-3", "3x4"], ["operand 0", "axis 1", "-3"]),
    (["2x3", "3x-4"], ["operand 1", "axis 1", "-4"]),
    (["2x3.5", "3x4"], ["operand 0", "axis 1", "3.5"]),
    (["2xa", "3x4"], ["operand 0", "axis 1", "'a'"]),
    (["2x3", "3xx4"], ["operand 1", "axis 1"]),
])
def test_cli_bad_sizes_print_the_error_and_exit_nonzero(shapes, culprit):
    done = _cli("explain", "ij,jk->ik", "--shapes", *shapes)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error:")
    for c in culprit:
        assert c in done.stderr, done.stderr


def test_cli_good_call_and_bad_spec():
    done = _cli("explain", "...ij,...j->i", "--shapes", "2x3x4", "4")
    assert done.returncode == 0, done.stderr
    assert "output: i shape (3,)" in done.stdout
    done = _cli("explain", ". ..i->i")
    assert done.returncode != 0 and "Traceback" not in done.stderr and "space" in done.stderr


@pytest.mark.parametrize("spec,typename", [(None, "NoneType"), (b"ij", "bytes"),
                                           (bytearray(b"ij"), "bytearray"), (2.5, "float")])
def test_non_string_spec_is_a_type_error_naming_the_type(spec, typename):
    a = xb(np.ones((2, 3)))
    with pytest.raises(TypeError, match=typename) as e:
        eg.einsum(spec, a)
    assert isinstance(e.value, eg.EinsumError)  # one family: except EinsumError catches it too
    with pytest.raises(TypeError, match=typename):
        eg.derive(spec)
    with pytest.raises(TypeError, match=typename):
        eg.explain(spec)


def test_numpy_str_spec_is_a_string():
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(npy(eg.einsum(np.str_("ij->ji"), xb(a))), a.T)


@pytest.mark.parametrize("k", [2, -3, 7, 1.0, "0", None, True])
@pytest.mark.parametrize("method", ["vjp", "jvp", "jacobian"])
def test_bad_operand_number_names_the_operand_count(method, k):
    d = eg.derive("ij,jk->ik")
    with pytest.raises(eg.EinsumError, match="2 operands") as e:
        getattr(d, method)(k)
    assert repr(k) in str(e.value)


def test_good_operand_numbers_still_work():
    d = eg.derive("ij,jk->ik")
    assert str(d.vjp(np.int64(1))) == str(d.vjp(-1)) == "ik,ij->jk"
    assert d.jvp(-2).k == 0 and d.jacobian(np.int32(1)).k == 1


# -- 3. torch's list form and optimize= ------------------------------------------------------

def test_list_form_as_torch():
    a, b = _operands([(2, 3), (3, 4)])
    want = np.einsum("ij,jk->ik", a, b)
    for wrap in (list, tuple):
        np.testing.assert_allclose(npy(eg.einsum("ij,jk->ik", wrap([xb(a), xb(b)]))), want, **TOL)
    np.testing.assert_allclose(npy(eg.einsum("ij,jk", [xb(a), xb(b)])), want, **TOL)
    # Gradients reach Tensors inside the list, as torch's do.
    x, w = eg.tensor(xb(a), requires_grad=True), eg.tensor(xb(b), requires_grad=True)
    eg.einsum("ij,jk->ik", [x, w]).sum().backward()
    tx, tw = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch.einsum("ij,jk->ik", [tx, tw]).sum().backward()
    np.testing.assert_allclose(npy(x.grad), tx.grad.numpy(), **TOL)
    np.testing.assert_allclose(npy(w.grad), tw.grad.numpy(), **TOL)
    # A list of one Tensor for a one-operand spec: torch's form too.
    t = eg.tensor(xb(a), requires_grad=True)
    np.testing.assert_allclose(npy(eg.einsum("ij->ji", [t])), a.T)


def test_a_nested_list_for_one_operand_is_read_as_numpy_reads_it():
    # NumPy reads a list as an array-like: where NumPy accepts the call, we follow it.
    np.testing.assert_array_equal(npy(eg.einsum("ij->ji", [[1, 2], [3, 4]])),
                                  np.einsum("ij->ji", [[1, 2], [3, 4]]))
    a = np.arange(3.0)
    np.testing.assert_array_equal(npy(eg.einsum("ij", [a, a])), np.einsum("ij", [a, a]))


def test_list_form_with_the_wrong_count_names_both_counts():
    a = xb(np.ones((2, 3)))
    with pytest.raises(eg.EinsumError, match="3 operand"):
        eg.einsum("ij,jk,kl->il", [a, a.T])


OPT_SPEC = "ij,jk,kl,lm->im"
OPT_SHAPES = [(2, 30), (30, 3), (3, 40), (40, 2)]


@pytest.mark.parametrize("optimize", ["greedy", "optimal", "auto", "dp", True, False,
                                      "np_path", "np_path_bare", [(0, 1, 2, 3)]])
def test_optimize_values_match_numpy(optimize):
    ops = _operands(OPT_SHAPES)
    if optimize in ("np_path", "np_path_bare"):
        path = np.einsum_path(OPT_SPEC, *ops, optimize="greedy")[0]
        optimize = path if optimize == "np_path" else path[1:]
    want = np.einsum(OPT_SPEC, *ops)
    got, pull = eg.vjp(lambda *xs: eg.einsum(OPT_SPEC, *xs, optimize=optimize),
                       *[xb(o) for o in ops])
    np.testing.assert_allclose(npy(got), want, **TOL)
    ts = [torch.tensor(o, requires_grad=True) for o in ops]
    g = np.ones(want.shape)
    ref = torch.autograd.grad(torch.einsum(OPT_SPEC, *ts), ts, torch.tensor(g))
    for ours, r in zip(pull(xb(g)), ref):
        np.testing.assert_allclose(npy(ours), r.numpy(), **TOL)


def test_optimize_on_one_and_two_operands():
    a, b = _operands([(2, 3), (3, 4)])
    for opt in ("greedy", "optimal", True, False, [(0, 1)], ["einsum_path", (0, 1)]):
        np.testing.assert_allclose(npy(eg.einsum("ij,jk->ik", xb(a), xb(b), optimize=opt)),
                                   a @ b, **TOL)
    np.testing.assert_allclose(npy(eg.einsum("ij->j", xb(a), optimize=[(0,)])), a.sum(0), **TOL)
    np.testing.assert_allclose(npy(eg.einsum("ij,jk", [xb(a), xb(b)], optimize="greedy")),
                               a @ b, **TOL)


def test_cached_plans_key_on_optimize():
    from einsumgrad.plan import plan_for
    from einsumgrad.spec import parse
    ops = [xb(o) for o in _operands(OPT_SHAPES)]
    spec = parse(OPT_SPEC, tuple(o.ndim for o in ops))
    for path in ([(0, 1), (0, 1), (0, 1)], [(2, 3), (0, 1), (0, 1)], [(1, 2), (0, 2), (0, 1)]):
        run = plan_for(spec, ops, optimize=path)
        assert run.plan.path == path
        before = einsumgrad.plan.stats["planned"]
        assert plan_for(spec, ops, optimize=list(path)) is run   # the same plan, cached
        assert einsumgrad.plan.stats["planned"] == before
    assert plan_for(spec, ops, optimize=False).plan.path == [(0, 1, 2, 3)]
    # Through eg.einsum: each optimize value is planned once, then reused.
    want = np.einsum(OPT_SPEC, *map(npy, ops))
    for opt in ([(2, 3), (0, 1), (0, 1)], [(0, 1), (0, 1), (0, 1)], "greedy", False):
        np.testing.assert_allclose(npy(eg.einsum(OPT_SPEC, *ops, optimize=opt)), want, **TOL)
        before = einsumgrad.plan.stats["planned"]
        np.testing.assert_allclose(npy(eg.einsum(OPT_SPEC, *ops, optimize=opt)), want, **TOL)
        assert einsumgrad.plan.stats["planned"] == before


@pytest.mark.parametrize("optimize,error,match", [
    ("bogus", eg.EinsumError, "bogus"),
    ([(0, 1)], eg.EinsumError, "path"),                       # leaves operands uncontracted
    ([(0, 5), (0, 1), (0, 1)], eg.EinsumError, "5"),          # an index out of range
    ([(0, 0), (0, 1), (0, 1)], eg.EinsumError, "twice"),
    ([(0, 1.5), (0, 1), (0, 1)], eg.EinsumError, "1.5"),
    (3, TypeError, "int"),
])
def test_bad_optimize_raises(optimize, error, match):
    ops = [xb(o) for o in _operands(OPT_SHAPES)]
    with pytest.raises(error, match=match):
        eg.einsum(OPT_SPEC, *ops, optimize=optimize)
