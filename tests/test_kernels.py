"""The fast paths chosen by layout, size or values give the plain answer.

Each kernel here picks a cheaper way to compute the same numbers (a shift by
a block max, a sum as a matrix-vector product, a matmul on an operand in its
own memory order, patches copied a chunk at a time); each test drives it down
every branch and compares with NumPy or PyTorch.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from einsumgrad.nn import functional as F
from einsumgrad.rules import grid
from einsumgrad.rules import convolution as pe
from einsumgrad import plan
from einsumgrad.backends import backend_of, memory_order
from einsumgrad.spec import parse
from einsumgrad.testing import check_grads
from tests.backends import NAME, npy, xb
from tests.einsum_cases import einsum_cases


def _torch_softmax(x):
    return torch.softmax(torch.tensor(x), -1).numpy()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the NaN rows, on purpose
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_shift_matches_torch_and_falls_back_exactly(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8)).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(npy(eg.softmax(xb(x))), _torch_softmax(x), **tol)
    # One row 500 below the rest of its block: shifted by the block max its
    # entries would underflow; the row-max path must give torch's numbers.
    far = x.copy()
    far[1, 2, 3] -= 500.0
    np.testing.assert_allclose(npy(eg.softmax(xb(far))), _torch_softmax(far), **tol)
    # Logits that exp would overflow (past 80 in float32, 700 in float64) take
    # the block shift; the others none. Both, with a row far under the rest.
    for lift in (0.0, 1000.0):
        big = x * 10 + lift
        big[1, 2, 3] -= 500.0
        np.testing.assert_allclose(npy(eg.softmax(xb(big))), _torch_softmax(big), **tol)
    # A fully masked row is NaN (as torch); +inf logits as torch too.
    masked = x.copy()
    masked[0, 0, 0] = -np.inf
    masked[2, 1, 5, 3] = np.inf
    got, want = npy(eg.softmax(xb(masked))), _torch_softmax(masked)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], **tol)


@pytest.mark.parametrize("spec,shape,order", [
    ("abc->ab", (8, 16, 64), None),            # short inner rows: matrix @ ones
    ("abc->c", (8, 16, 64), None),             # outer axes: ones @ matrix
    ("abcd->bd", (16, 4, 32, 16), None),       # summed axes on both sides of a kept one
    ("abcd->ad", (16, 4, 32, 16), (0, 2, 3, 1)),  # a channels-last layout
])
def test_sums_by_matrix_vector_products_match_numpy(spec, shape, order):
    x = np.random.default_rng(1).standard_normal(shape)
    if order is not None:  # the same values, laid out in memory in another order
        x = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
    np.testing.assert_allclose(npy(eg.einsum(spec, xb(x))), np.einsum(spec, x), rtol=1e-12)


@pytest.mark.parametrize("layout_a,layout_b", [((0, 1, 2), (0, 1, 2)), ((2, 0, 1), (0, 1, 2)),
                                               ((0, 1, 2), (2, 1, 0)), ((1, 2, 0), (1, 0, 2))])
def test_matmul_reads_operands_in_any_memory_order(layout_a, layout_b):
    rng = np.random.default_rng(2)

    def laid_out(shape, order):
        a = rng.standard_normal(tuple(shape[i] for i in order))
        return a.transpose(np.argsort(order))
    a, b = laid_out((5, 6, 7), layout_a), laid_out((5, 7, 3), layout_b)
    for spec in ("bij,bjk->bik", "bij,bjk->kib", "bij,bjk->ij"):
        np.testing.assert_allclose(npy(eg.einsum(spec, xb(a), xb(b))),
                                   np.einsum(spec, a, b), rtol=1e-12, err_msg=spec)
    # A strided view (every other row) is read as is.
    v = laid_out((5, 12, 7), layout_a)[:, ::2]
    np.testing.assert_allclose(npy(eg.einsum("bij,bjk->bik", xb(v), xb(b))),
                               np.einsum("bij,bjk->bik", v, b), rtol=1e-12)


@pytest.mark.parametrize("spec,shapes,order,honoured", [
    ("bhqk,bhkd->bhqd", [(3, 4, 5, 6), (3, 4, 6, 2)], (0, 2, 1, 3), True),  # heads inside queries
    ("ij,jk->ik", [(5, 6), (6, 7)], (1, 0), True),                          # column-major
    ("bij,bjk->bik", [(4, 1, 6), (4, 6, 3)], (2, 1, 0), True),              # a size-1 row
    ("bij,bj->bi", [(4, 5, 6), (4, 6)], (1, 0), True),                      # no column axis
    ("ibj,bjk->kbi", [(4, 3, 5), (3, 5, 6)], (1, 0, 2), True),              # batch outermost
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 6)], (1, 0), True),               # the last step's
    ("aibj,bjk->aibk", [(2, 4, 3, 5), (3, 5, 6)], (3, 2, 1, 0), False),     # rows span 2 axes
])
def test_contraction_written_in_the_order_asked(spec, shapes, order, honoured):
    # The planner writes a matmul's result in the layout asked for where its
    # rows and columns are one axis each, else as it would; the values never change.
    rng = np.random.default_rng(7)
    arrays = [xb(rng.standard_normal(s)) for s in shapes]
    got = plan.contract(parse(spec), arrays, order)
    np.testing.assert_allclose(npy(got), np.einsum(spec, *map(npy, arrays)), rtol=1e-12)
    real = lambda axes: [a for a in axes if got.shape[a] > 1]  # size 1: no place in memory
    assert (real(memory_order(got)) == real(order)) == honoured, spec


def test_cotangent_laid_out_like_its_primal():
    # q as a projection leaves it: heads inside tokens, (b, l, h, d) in memory.
    rng = np.random.default_rng(8)
    q = xb(np.ascontiguousarray(rng.standard_normal((2, 5, 3, 4)))).transpose(0, 2, 1, 3)
    k = xb(rng.standard_normal((2, 3, 6, 4)))
    _, pull = eg.vjp(lambda q, k: eg.einsum("bhqd,bhkd->bhqk", q, k), q, k)
    g = xb(rng.standard_normal((2, 3, 5, 6)))
    gq, gk = pull(g)
    assert memory_order(npy(gq)) == memory_order(npy(q))
    np.testing.assert_allclose(npy(gq), np.einsum("bhqk,bhkd->bhqd", npy(g), npy(k)), rtol=1e-12)
    np.testing.assert_allclose(npy(gk), np.einsum("bhqk,bhqd->bhkd", npy(g), npy(q)), rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_by_patch_chunks_matches_torch(monkeypatch, channels_last):
    # A chunk budget of a few KB forces the chunked im2col on small data; the
    # per-offset path (past the budget) is forced the same way.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 9, 8))
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = rng.standard_normal((4, 3, 3, 3))
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    want = torch.nn.functional.conv2d(tx, tw, stride=2, padding=1)
    gy = rng.standard_normal(tuple(want.shape))
    want_gx, want_gw = torch.autograd.grad(want, (tx, tw), torch.tensor(gy))
    monkeypatch.setattr(pe, "BLOCK_BYTES", 0)  # the whole-batch paths, not the blocks
    for chunk, budget in ((4096, 1 << 26), (4096, 4096), (1 << 20, 1 << 26)):
        monkeypatch.setattr(pe, "_CHUNK_BYTES", chunk)
        monkeypatch.setattr(pe, "_CHUNK_BYTES_MKL", chunk)
        monkeypatch.setattr(pe, "_PATCH_BYTES", budget)
        ex, ew = eg.tensor(xb(x), requires_grad=True), eg.tensor(xb(w), requires_grad=True)
        y = F.conv2d(ex, ew, stride=2, padding=1)
        np.testing.assert_allclose(npy(y), want.detach().numpy(), rtol=1e-10, atol=1e-12)
        y.backward(xb(gy))
        np.testing.assert_allclose(npy(ex.grad), want_gx.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(npy(ew.grad), want_gw.numpy(), rtol=1e-10, atol=1e-12)


def _grid_calls(monkeypatch) -> list:
    """Names of the padded-grid kernel (an input gradient) and of the patch copy
    as they run; the grid taken on any backend (it waits for an in-place GEMM,
    MKL's, to pay); the block path, which host backends take first, off."""
    monkeypatch.setattr(backend_of(xb(np.zeros(1))), "matmul_adds_in_place", True)
    monkeypatch.setattr(pe, "BLOCK_BYTES", 0)
    calls = []
    for name in ("unpatch_on_grid", "patches_array"):
        f = getattr(pe, name)
        monkeypatch.setattr(pe, name, lambda *a, f=f, name=name, **k: calls.append(name) or f(*a, **k))
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding,kernel", [(0, (3, 3)), (1, (3, 3)), (2, (2, 3)), (1, (1, 1))])
def test_conv_on_the_padded_grid_matches_torch(monkeypatch, channels_last, padding, kernel):
    # Stride 1 with enough channels: the input gradient as one product per
    # window offset on the padded grid; the patches copied once, forward, and
    # read again by the weight gradient.
    calls = _grid_calls(monkeypatch)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 9, 9, 8))
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = rng.standard_normal((10, 9) + kernel)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    want = torch.nn.functional.conv2d(tx, tw, padding=padding)
    gy = rng.standard_normal(tuple(want.shape))
    want_gx, want_gw = torch.autograd.grad(want, (tx, tw), torch.tensor(gy))
    ex, ew = eg.tensor(xb(x), requires_grad=True), eg.tensor(xb(w), requires_grad=True)
    y = F.conv2d(ex, ew, padding=padding)
    y.backward(xb(gy))
    for got, ref in ((y, want.detach()), (ex.grad, want_gx), (ew.grad, want_gw)):
        np.testing.assert_allclose(npy(got), ref.numpy(), rtol=1e-10, atol=1e-12)
    assert sorted(calls) == ["patches_array", "unpatch_on_grid"]


def test_conv_on_the_padded_grid_second_order_and_jacobians(monkeypatch):
    # Forced onto the grid for every size: derivatives of any order and the
    # leading axes of a Jacobian basis (grid rows) match the patch copy's.
    rng = np.random.default_rng(6)
    x, w = xb(rng.standard_normal((2, 3, 5, 4))), xb(rng.standard_normal((2, 3, 3, 2)))
    f = lambda x, w: F.conv2d(x, w, padding=1)
    want = [npy(eg.jacrev(f, argnums=(0, 1))(x, w)[i]) for i in (0, 1)]
    want_fwd = npy(eg.jacfwd(f)(x, w))
    calls = _grid_calls(monkeypatch)
    monkeypatch.setattr(grid, "MIN_INNER", 1)
    check_grads(f, x, w, order=2)
    got = eg.jacrev(f, argnums=(0, 1))(x, w)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(npy(g), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npy(eg.jacfwd(f)(x, w)), want_fwd, rtol=1e-12, atol=1e-12)
    assert "unpatch_on_grid" in calls


def test_forward_patches_serve_only_their_own_image(monkeypatch):
    # A conv whose weight needs a gradient keeps its forward patch copy for the
    # weight gradient; a JVP or VJP whose patch operand is another array (the
    # tangent of the image) must not read it. Checked against torch.
    calls = _grid_calls(monkeypatch)
    rng = np.random.default_rng(7)
    x, t = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 6, 5))
    w, tw = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 3, 3, 3))
    conv = lambda a, b: torch.nn.functional.conv2d(torch.tensor(a), torch.tensor(b), padding=1)
    ew = eg.tensor(xb(w), requires_grad=True)
    _, got = eg.jvp(lambda a: F.conv2d(a, ew, padding=1), (xb(x),), (xb(t),))
    np.testing.assert_allclose(npy(got), conv(t, w).numpy(), rtol=1e-10, atol=1e-12)
    assert calls.count("patches_array") == 2  # the image's (kept, unread) and the tangent's
    ex = eg.tensor(xb(x), requires_grad=True)
    _, got = eg.jvp(lambda b: F.conv2d(ex, b, padding=1), (xb(w),), (xb(tw),))
    np.testing.assert_allclose(npy(got), conv(x, tw).numpy(), rtol=1e-10, atol=1e-12)
    assert calls.count("patches_array") == 3  # the image's, read again for the tangent


def test_grid_only_for_products_per_offset():
    groups = lambda spec: grid.grid_groups(*parse(spec).inputs, parse(spec).output)
    b, c, h, w, k, l, f = (parse("bchwklf->").inputs[0])
    assert groups("bchwkl,fckl->bfhw") == ((b,), (c,), (f,))
    assert groups("bchwkl,bfckl->bfhw") is None   # per-sample weights: b in all three
    assert groups("bchwkl,fckl->bfhwkl") is None  # window labels kept
    assert groups("bchwkl,fcckl->bfhw") is None   # a repeated label
    assert groups("bchwkl,fkl->bfhw") is None     # c summed on the patches alone


def test_float32_gelu_kernel_matches_torch():
    # The NumPy backend computes float32 Phi(x) in one chunked kernel with its erf.
    x = (np.random.default_rng(4).standard_normal(70000) * 4).astype(np.float32)
    x[:4] = [0.0, -0.0, 1e-30, -30.0]
    got = npy(eg.gelu(xb(x)))
    exact = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64)).numpy()
    assert got.dtype == np.float32
    # 1 + erf cancels for negative x: the error is a few float32 ulps of x/2,
    # as for torch's own float32 GELU (checked on the same points).
    theirs = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    bound = 4 * np.spacing(np.float32(1)) * np.maximum(np.abs(x), 1)
    assert np.all(np.abs(got - exact) <= bound)
    assert np.all(np.abs(theirs - exact) <= bound)


def test_matmul_on_broadcast_operands_multiplies_one_slice():
    # Stride-0 free axes (a Jacobian basis shared by every sample) are multiplied
    # once and broadcast; contracted and batch axes broadcast in one operand only
    # take the general path. Values as NumPy's either way.
    rng = np.random.default_rng(5)
    basis = np.broadcast_to(rng.standard_normal((4, 1, 3)), (4, 6, 3))
    w = rng.standard_normal((3, 5))
    wide = np.broadcast_to(rng.standard_normal((1, 5)), (6, 5))
    cases = [("abo,oi->abi", basis, w), ("ij,jk->ik", rng.standard_normal((2, 6)), wide),
             ("bij,bjk->bik", np.broadcast_to(rng.standard_normal((1, 2, 3)), (4, 2, 3)),
              np.broadcast_to(rng.standard_normal((1, 3, 2)), (4, 3, 2))),
             ("bij,bjk->bik", np.broadcast_to(rng.standard_normal((1, 2, 3)), (4, 2, 3)),
              rng.standard_normal((4, 3, 2)))]
    for spec, a, b in cases:
        np.testing.assert_allclose(npy(eg.einsum(spec, xb(a), xb(b))), np.einsum(spec, a, b),
                                   rtol=1e-12, err_msg=spec)
    # A per-sample Jacobian of a conv: its basis is broadcast over the batch.
    x = rng.standard_normal((3, 2, 5, 5))
    wc = rng.standard_normal((4, 2, 3, 3))
    J = npy(eg.batch_jacobian(lambda t: F.conv2d(t, xb(wc), padding=1))(xb(x)))
    want = torch.func.vmap(torch.func.jacrev(lambda t: torch.nn.functional.conv2d(
        t[None], torch.tensor(wc), padding=1)[0]))(torch.tensor(x)).numpy()
    np.testing.assert_allclose(J, want, rtol=1e-10, atol=1e-12)


def test_layer_bias_added_in_place_only_into_fresh_products():
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    # Through F.linear (the product is fresh): values, gradients and a Hessian as torch.
    f = lambda x_: eg.tanh(F.linear(x_, eg.tensor(xb(w)), eg.tensor(xb(b)))).sum()
    tf = lambda x_: torch.tanh(torch.nn.functional.linear(x_, torch.tensor(w), torch.tensor(b))).sum()
    np.testing.assert_allclose(npy(eg.hessian(f)(xb(x))),
                               torch.func.hessian(tf)(torch.tensor(x)).numpy(), rtol=1e-10, atol=1e-12)
    # A y that cannot take the sum in place (a broadcast view, a read-only NumPy
    # array, a wider b) is left as it was.
    readonly = np.ones((5, 3))
    readonly.flags.writeable = False
    for y in (np.broadcast_to(rng.standard_normal(3), (5, 3)), readonly) if NAME == "numpy" else ():
        before = y.copy()
        np.testing.assert_allclose(npy(eg.rules.add_bias(eg.tensor(y), b)), before + b)
        np.testing.assert_array_equal(y, before)
    wide = eg.rules.add_bias(eg.tensor(xb(np.ones((1, 3)))), xb(np.ones((4, 3))))
    assert wide.shape == (4, 3)


@st.composite
def _laid_out(draw):
    """A random einsum problem whose operands lie in memory in random ways:
    axes permuted, every other entry of a doubled axis, broadcast (stride 0)
    along a size-1 axis widened to its full size."""
    subscripts, shapes, full = draw(einsum_cases())
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    ops = []
    for shape, wide in zip(shapes, full):
        kind = draw(st.sampled_from(["plain", "permuted", "strided", "broadcast"]))
        if kind == "broadcast" and shape != wide and "..." not in subscripts:
            # the same values einsum would broadcast itself, as a stride-0 view
            op = np.broadcast_to(rng.standard_normal(shape), wide)
        elif kind == "permuted" and len(shape) > 1:
            order = draw(st.permutations(range(len(shape))))
            op = rng.standard_normal(tuple(shape[i] for i in order)).transpose(np.argsort(order))
        elif kind == "strided" and len(shape):
            op = rng.standard_normal(shape[:-1] + (2 * shape[-1],))[..., ::2]
        else:
            op = rng.standard_normal(shape)
        ops.append(op)
    return subscripts, ops


@settings(max_examples=300, deadline=None)
@given(_laid_out())
def test_random_einsums_on_any_memory_layout_match_numpy(case):
    subscripts, ops = case
    want = np.einsum(subscripts, *ops)
    out, pull = eg.vjp(lambda *a: eg.einsum(subscripts, *a), *[xb(o) for o in ops])
    np.testing.assert_allclose(npy(out), want, rtol=1e-10, atol=1e-12, err_msg=subscripts)
    # The VJPs read the saved operands in those layouts too: as from plain copies.
    g = xb(np.random.default_rng(0).standard_normal(want.shape))
    _, pull_plain = eg.vjp(lambda *a: eg.einsum(subscripts, *a),
                           *[xb(np.array(o, order="C")) for o in ops])
    for k, (a, b) in enumerate(zip(pull(g), pull_plain(g))):
        np.testing.assert_allclose(npy(a), npy(b), rtol=1e-10, atol=1e-12,
                                   err_msg=f"{subscripts}: vjp {k}")


@st.composite
def _windowed_max(draw):
    """A max over small window axes of an array in a random memory layout, its
    values from a handful of levels so that windows tie."""
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1, max_size=ndim))))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    order = draw(st.permutations(range(ndim)))
    x = rng.integers(-2, 2, tuple(shape[i] for i in order)).astype(float)
    x = x.transpose(np.argsort(order))
    if draw(st.booleans()):  # every other entry along the innermost axis
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    return x, axes


@settings(max_examples=300, deadline=None)
@given(_windowed_max())
def test_windowed_max_and_its_rules_on_any_layout(case):
    # max over pooling windows folds one axis at a time and aligns its saved
    # output (and the cotangent) with the input's rows; ties split evenly.
    x, axes = case
    np.testing.assert_array_equal(npy(eg.max(xb(x), axis=axes)), np.max(x, axis=axes))
    winners = x == np.max(x, axis=axes, keepdims=True)
    g = np.random.default_rng(1).standard_normal(np.max(x, axis=axes).shape)
    want = np.expand_dims(g / winners.sum(axis=axes), axes) * winners
    _, pull = eg.vjp(lambda t: eg.max(t, axis=axes), xb(x))
    np.testing.assert_allclose(npy(pull(xb(g))[0]), want, rtol=1e-12, atol=0)
    t = np.random.default_rng(2).standard_normal(x.shape)
    _, tangent = eg.jvp(lambda a: eg.max(a, axis=axes), (xb(x),), (xb(t),))
    np.testing.assert_allclose(npy(tangent), (winners * t).sum(axis=axes) / winners.sum(axis=axes),
                               rtol=1e-12, atol=1e-15)


@st.composite
def _image(draw):
    """An image ``(lead..., C, H, W)`` in a random memory layout (channels-last
    among them), with a window, stride and padding that fit it."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    shape = lead + (draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    order = draw(st.permutations(range(len(shape))))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = rng.standard_normal(tuple(shape[i] for i in order)).transpose(np.argsort(order))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    kernel = tuple(draw(st.integers(1, n + 2 * p)) for n, p in zip(shape[-2:], padding))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return x, kernel, stride, padding


@settings(max_examples=200, deadline=None)
@given(_image())
def test_patches_copied_in_one_pass_equal_the_strided_view(case):
    # The patch copy (im2col) in the image's memory order, one strided copy for
    # a channels-last image, holds the same entries as the view of the windows.
    from einsumgrad.rules.patches import patches_array
    x, kernel, stride, padding = case
    x = xb(x)
    view = patches_array(x, kernel, stride, padding, contiguous=False)
    np.testing.assert_array_equal(npy(patches_array(x, kernel, stride, padding, contiguous=True)),
                                  npy(view))


@pytest.mark.parametrize("shape,layout", [((6, 3, 4, 5), "nchw"), ((6, 3, 4, 5), "last"),
                                          ((7, 3), "nchw"), ((6, 3, 4, 5), "strided")])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_kernels_equal_the_formulas(rng, shape, layout, relu):
    # numba's batch norm (statistics, output, fused VJP) against the formulas of the
    # NumPy passes it replaces, in either memory order; a layout with no (N, C, M)
    # view, or an array of another type (the strict stand-in's), declines.
    from einsumgrad.backends import kernels
    if not kernels.available():
        pytest.skip("numba kernels not installed")
    x = rng.standard_normal(shape) * 2 + 1
    if layout == "last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    elif layout == "strided":
        x = np.repeat(x, 2, axis=2)[:, :, ::2]
    c = shape[1]
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    got = kernels.batch_norm(x, w, b, 1e-5, relu)
    if layout == "strided":
        assert got is None
        return
    assert kernels.batch_norm(x.view(type("Sub", (np.ndarray,), {})), w, b, 1e-5) is None
    kept = (c,) + (1,) * (x.ndim - 2)
    axes = (-x.ndim,) + tuple(range(2 - x.ndim, 0))
    y, mean, var, s = got
    assert y.strides == x.strides
    xhat = (x - mean.reshape(kept)) * s.reshape(kept)
    ref = xhat * w.reshape(kept) + b.reshape(kept)
    np.testing.assert_allclose(y, np.maximum(ref, 0) if relu else ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=tuple(a % x.ndim for a in axes)), rtol=1e-12)
    g = rng.standard_normal(shape)  # C order, whatever x's layout
    dx, dw, db = kernels.batch_norm_vjp(g, y, x, mean, s, w, relu)
    gm = g * (y > 0) if relu else g
    red = tuple(a % x.ndim for a in axes)
    n = x.size // c
    want_dx = (w * s).reshape(kept) * (gm - gm.sum(red, keepdims=True) / n
                                       - xhat * (gm * xhat).sum(red, keepdims=True) / n)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, (gm * xhat).sum(red), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, gm.sum(red), rtol=1e-10, atol=1e-12)
