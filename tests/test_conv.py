"""conv1d / conv2d against torch in float64: strides, paddings ('same' included),
dilations and groups (depthwise too); values, input, weight and bias gradients."""
import sys

import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn
from einsumgrad.nn import functional as F
from einsumgrad.rules import convolution, grid
from einsumgrad.rules.patches import patches, unpatch
from einsumgrad.testing import check_grads

from backends import npy, xb

TF = torch.nn.functional


def close(got, want, what=""):
    """Within 1e-9 of torch, relative to the largest entry (sums of a few dozen terms)."""
    want = np.asarray(want)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(npy(got), want, rtol=1e-9, atol=1e-9 * scale, err_msg=what)


def conv_both(ours, theirs, x, w, b, **kw):
    """Both convolutions on the same float64 arrays; values and every gradient."""
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    want = theirs(tx, tw, tb, **kw)
    g = np.random.default_rng(3).standard_normal(tuple(want.shape))
    want.backward(torch.tensor(g))
    ex, ew, eb = (eg.tensor(xb(a), requires_grad=True) for a in (x, w, b))
    y = ours(ex, ew, eb, **kw)
    close(y, want.detach().numpy(), "value")
    y.backward(xb(g))
    for name, got, ref in (("x", ex, tx), ("w", ew, tw), ("b", eb, tb)):
        close(got.grad, ref.grad.numpy(), f"gradient of {name}")


GROUPS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4), (6, 4, 2)]  # (C, F, groups)


@pytest.mark.parametrize("c,f,groups", GROUPS)
@pytest.mark.parametrize("stride,padding,dilation", [
    (1, 0, 1), (2, 1, 1), ((2, 1), (1, 2), 1), (1, "same", 1), (1, "same", 2),
    (1, "same", (1, 2)), (1, "valid", 2), (2, 2, (2, 1)), (3, (0, 1), 2)])
@pytest.mark.parametrize("kernel", [3, (2, 3), 1])
def test_conv2d_matches_torch(rng, c, f, groups, stride, padding, dilation, kernel):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rng.standard_normal((2, c, 9, 8))
    w, b = rng.standard_normal((f, c // groups, kh, kw)), rng.standard_normal(f)
    conv_both(F.conv2d, TF.conv2d, x, w, b, stride=stride, padding=padding, dilation=dilation,
              groups=groups)


@pytest.mark.parametrize("c,f,groups", [(4, 6, 1), (4, 4, 4), (4, 8, 2), (3, 6, 3)])
@pytest.mark.parametrize("stride,padding,dilation,kernel", [
    (1, 0, 1, 3), (2, 2, 1, 3), (1, "same", 1, 2), (1, "same", 3, 3), (1, "valid", 2, 2),
    (2, (1,), (2,), 3), (3, 1, 2, 1)])
def test_conv1d_matches_torch(rng, c, f, groups, stride, padding, dilation, kernel):
    x = rng.standard_normal((2, c, 11))
    w, b = rng.standard_normal((f, c // groups, kernel)), rng.standard_normal(f)
    conv_both(F.conv1d, TF.conv1d, x, w, b, stride=stride, padding=padding, dilation=dilation,
              groups=groups)


def test_unbatched_inputs_as_torch(rng):
    x, w, b = (rng.standard_normal(s) for s in ((4, 7, 6), (6, 2, 3, 3), (6,)))
    conv_both(F.conv2d, TF.conv2d, x, w, b, padding=1, groups=2)
    x, w = rng.standard_normal((4, 9)), rng.standard_normal((2, 4, 3))
    conv_both(F.conv1d, TF.conv1d, x, w, rng.standard_normal(2), padding="same")


@pytest.mark.parametrize("groups,dilation", [(1, 2), (4, 1), (2, (2, 1))])
def test_conv_on_the_grid_with_groups_and_dilation(rng, monkeypatch, groups, dilation):
    # The stride-1 input gradient on the padded grid (any backend: the in-place
    # GEMM it waits for is switched on) with a dilated window: each offset is a
    # shift of d*k rows. Grouped convs keep to the patches (no grid for them).
    # The block path (taken first on host backends) is switched off.
    from einsumgrad.backends import backend_of
    monkeypatch.setattr(convolution, "BLOCK_BYTES", 0)
    monkeypatch.setattr(backend_of(xb(np.zeros(1))), "matmul_adds_in_place", True)
    monkeypatch.setattr(grid, "MIN_INNER", 1)
    calls = []
    f = convolution.unpatch_on_grid
    monkeypatch.setattr(convolution, "unpatch_on_grid",
                        lambda *a, **k: calls.append(1) or f(*a, **k))
    x, w, b = (rng.standard_normal(s) for s in ((2, 8, 12, 11), (8, 8 // groups, 3, 2), (8,)))
    conv_both(F.conv2d, TF.conv2d, x, w, b, padding="same", dilation=dilation, groups=groups)
    assert bool(calls) == (groups == 1)



def _block_calls(monkeypatch, block_bytes: int) -> list:
    """Names of the block kernels as they run, with blocks of ``block_bytes`` of
    patches (a few images each on the small test images) and no channel minimum,
    on any backend (the strict one's arrays too: the path makes no host data)
    and however many threads MKL has."""
    monkeypatch.setattr(convolution, "BLOCK_BYTES", block_bytes)
    here = eg.backends.backend_of(xb(np.zeros(1)))
    monkeypatch.setattr(convolution, "BLOCK_DEVICES", (here.device,))
    monkeypatch.setattr(here, "gemm_threads", lambda: 1, raising=False)
    monkeypatch.setattr(convolution, "MIN_BLOCK_CHANNELS", 1)
    calls = []
    for name in ("conv_blocks", "conv_weight_blocks"):
        f = getattr(convolution, name)
        monkeypatch.setattr(convolution, name,
                            lambda *a, f=f, name=name, **k: calls.append(name) or f(*a, **k))
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,padding,dilation,kernel", [
    (1, 1, 1, 3), (1, 0, 1, (2, 3)), (2, 1, 1, 3), ((1, 2), (2, 1), (2, 1), 3),
    (1, "same", 2, (3, 2)), (1, 3, 1, 3), (1, 0, 1, 1)])
def test_conv_by_blocks_matches_torch(rng, monkeypatch, channels_last, stride, padding,
                                      dilation, kernel):
    # The host backends' path: the patches of a few images at a time (blocks of
    # 2, 2 and 1 images here), the forward, the weight gradient and, at stride
    # 1 with a padding within the window's span, the input gradient as the
    # convolution of the cotangent with the flipped window, with the weight
    # gradient from the same window copies (one pass). Else the input
    # gradient takes the other paths and the weight gradient its own blocks.
    calls = _block_calls(monkeypatch, 60_000)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rng.standard_normal((5, 8, 9, 8))
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w, b = rng.standard_normal((6, 8, kh, kw)), rng.standard_normal(6)
    conv_both(F.conv2d, TF.conv2d, x, w, b, stride=stride, padding=padding, dilation=dilation)
    one_pass = stride == 1 and padding != 3
    assert calls == ["conv_blocks"] + (["conv_blocks"] if one_pass else ["conv_weight_blocks"])


def test_conv_by_blocks_weight_gradient_alone(rng, monkeypatch):
    # An image that needs no gradient (a first layer): the backward makes the
    # weight's cotangent alone, not the image's with it.
    calls = _block_calls(monkeypatch, 60_000)
    x, w = rng.standard_normal((5, 8, 6, 7)), rng.standard_normal((4, 8, 3, 3))
    tw = torch.tensor(w, requires_grad=True)
    y = TF.conv2d(torch.tensor(x), tw, padding=1)
    g = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(g))
    ew = eg.tensor(xb(w), requires_grad=True)
    F.conv2d(xb(x), ew, padding=1).backward(xb(g))
    close(ew.grad, tw.grad.numpy(), "gradient of w")
    assert calls == ["conv_blocks", "conv_weight_blocks"]


def test_conv_by_blocks_second_order_and_jacobians(rng, monkeypatch):
    # Higher derivatives and Jacobian bases (leading axes: more block rows)
    # through the block path match the whole-batch paths.
    x, w = xb(rng.standard_normal((3, 2, 5, 4))), xb(rng.standard_normal((2, 2, 3, 2)))
    f = lambda x, w: F.conv2d(x, w, padding=1)
    monkeypatch.setattr(convolution, "BLOCK_BYTES", 0)
    want = [npy(j) for j in eg.jacrev(f, argnums=(0, 1))(x, w)]
    want_fwd = npy(eg.jacfwd(f)(x, w))
    calls = _block_calls(monkeypatch, 2_000)
    check_grads(f, x, w, order=2)
    for got, ref in zip(eg.jacrev(f, argnums=(0, 1))(x, w), want):
        np.testing.assert_allclose(npy(got), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npy(eg.jacfwd(f)(x, w)), want_fwd, rtol=1e-12, atol=1e-12)
    assert {"conv_blocks", "conv_weight_blocks"} <= set(calls)


def test_conv_by_larger_blocks_for_a_gemm_on_several_threads(rng, monkeypatch):
    # A GEMM that threads one large product (MKL's at several threads): blocks
    # of WHOLE_BLOCK_BYTES (here the whole batch), so fewer products, each one
    # parallel region; on one thread, blocks of BLOCK_BYTES (two and one images).
    import sys
    pt = sys.modules["einsumgrad.rules.patches"]
    calls = _block_calls(monkeypatch, 60_000)
    here = eg.backends.backend_of(xb(np.zeros(1)))
    monkeypatch.setattr(here, "threads_large_gemm", True)
    windows = []
    real = pt._Blocks.windows
    monkeypatch.setattr(pt._Blocks, "windows",
                        lambda self, x, s, m: windows.append(m) or real(self, x, s, m))
    monkeypatch.setattr(eg.backends.threads, "SHARE", False)  # not the blocks on threads
    x, w, b = (rng.standard_normal(s) for s in ((3, 8, 6, 6), (8, 8, 3, 3), (8,)))
    for threads, blocks in ((2, [3, 3]), (1, [2, 1, 2, 1])):
        monkeypatch.setattr(here, "gemm_threads", lambda: threads, raising=False)
        calls.clear()
        windows.clear()
        conv_both(F.conv2d, TF.conv2d, x, w, b, padding=1)
        assert calls == ["conv_blocks", "conv_blocks"]
        assert windows == blocks, threads


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1)])
def test_conv_by_blocks_on_a_thread_per_core(rng, monkeypatch, stride, padding):
    # At several MKL threads the blocks may instead be shared among a thread per
    # core (threads.SHARE forces it here), each with its own buffers, BLAS at one
    # thread, and the weight gradient's per-thread sums added up: torch's
    # numbers. Stride 1 runs the input and weight gradients in one pass. Here
    # on einsumgrad's pool (the OpenMP team's kernel: test_openmp.py).
    import threading
    pt = sys.modules["einsumgrad.rules.patches"]
    calls = _block_calls(monkeypatch, 60_000)
    here = eg.backends.backend_of(xb(np.zeros(1)))
    monkeypatch.setattr(here, "window_products", None)
    monkeypatch.setattr(here, "threads_large_gemm", True)
    monkeypatch.setattr(here, "gemm_threads", lambda: 3, raising=False)
    monkeypatch.setattr(eg.backends.threads, "cores", lambda: 3)
    monkeypatch.setattr(eg.backends.threads, "SHARE", True)
    ran = set()
    real = pt._Blocks.windows
    monkeypatch.setattr(pt._Blocks, "windows", lambda self, x, s, m: ran.add(
        threading.current_thread().name) or real(self, x, s, m))
    x, w, b = (rng.standard_normal(s) for s in ((7, 8, 6, 6), (8, 8, 3, 3), (8,)))
    conv_both(F.conv2d, TF.conv2d, x, w, b, stride=stride, padding=padding)
    assert calls == ["conv_blocks", "conv_blocks" if stride == 1 else "conv_weight_blocks"]
    assert threading.current_thread().name in ran and len(ran) >= 2  # and the pool's


def test_conv_of_an_empty_batch_where_blocks_run(rng, monkeypatch):
    # No images: no blocks to sum a weight gradient over; the other paths give
    # zeros, shaped as torch's.
    calls = _block_calls(monkeypatch, 60_000)
    x, w, b = (rng.standard_normal(s) for s in ((0, 8, 5, 5), (8, 8, 3, 3), (8,)))
    conv_both(F.conv2d, TF.conv2d, x, w, b, padding=1)
    assert calls == []


def test_conv_by_blocks_needs_enough_channels(rng, monkeypatch):
    # Fewer channels than MIN_BLOCK_CHANNELS in the product's sum (the image's
    # for the forward and weight gradient, the filters' for the input gradient):
    # a window row is too short a copy, the whole-batch paths run.
    calls = _block_calls(monkeypatch, 1 << 20)
    monkeypatch.setattr(convolution, "MIN_BLOCK_CHANNELS", 8)
    x, w, b = (rng.standard_normal(s) for s in ((2, 1, 6, 6), (3, 1, 3, 3), (3,)))
    conv_both(F.conv2d, TF.conv2d, x, w, b, padding=1)
    assert calls == []


def test_conv_second_order_with_groups_and_dilation(rng):
    x, w = xb(rng.standard_normal((2, 4, 6, 5))), xb(rng.standard_normal((4, 2, 3, 2)))
    check_grads(lambda x, w: F.conv2d(x, w, None, 1, "same", (2, 1), 2), x, w, order=2)
    x, w = xb(rng.standard_normal((2, 4, 9))), xb(rng.standard_normal((8, 1, 2)))
    check_grads(lambda x, w: F.conv1d(x, w, None, 2, 1, 2, 4), x, w, order=2)


def test_dilated_patches_and_their_adjoint(rng):
    x = rng.standard_normal((2, 3, 9, 8))
    p = patches(eg.tensor(xb(x)), (3, 2), (2, 1), (1, 2), dilation=(2, 3))
    xpad = np.pad(x, [(0, 0), (0, 0), (1, 1), (2, 2)])
    assert p.shape == (2, 3, 4, 9, 3, 2)
    np.testing.assert_array_equal(npy(p)[1, 2, 2, 4], xpad[1, 2, 4:9:2, 4:8:3])
    g = rng.standard_normal(p.shape)
    lhs = np.vdot(npy(p), g)
    rhs = np.vdot(x, npy(unpatch(eg.tensor(xb(g)), (9, 8), (3, 2), (2, 1), (1, 2), (2, 3))))
    assert abs(lhs - rhs) <= 1e-12 * np.abs(g).sum() * np.abs(x).max()
    check_grads(lambda x: patches(x, 2, 1, 1, dilation=2), xb(x[:1, :1]), order=2)


def test_batch_jacobian_through_grouped_dilated_conv(rng):
    w = xb(rng.standard_normal((4, 1, 3, 3)))
    x = xb(rng.standard_normal((3, 2, 5, 5)))
    f = lambda x: F.conv2d(x, w, padding="same", dilation=2, groups=2)
    jb, full = npy(eg.batch_jacobian(f)(x)), npy(eg.jacrev(f)(x))
    for i in range(3):
        np.testing.assert_allclose(jb[i], full[i, :, :, :, i], rtol=1e-12, atol=1e-12)


def test_float32_input_to_a_float64_layer_computes_in_float64(rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    here = eg.backends.backend_of(xb(np.zeros(1)))
    conv = nn.Conv2d(3, 4, 3).to(here)
    y = conv(xb(x))
    assert y.dtype == np.float64  # NumPy's promotion, not a cast to the layer's dtype
    want = F.conv2d(xb(x.astype(np.float64)), conv.weight, conv.bias)
    np.testing.assert_array_equal(npy(y), npy(want))
    assert nn.Conv1d(3, 4, 3, dtype=np.float32).to(here)(xb(x[:, :, 0])).dtype == np.float32


@pytest.mark.parametrize("bad,match", [
    (dict(padding="same", stride=2), "strided"),
    (dict(padding="full"), "'same' or 'valid'"),
    (dict(padding=-1), "non-negative"),
    (dict(padding=(1, 1, 1)), "2 non-negative"),
    (dict(groups=3), "group"),
    (dict(dilation=4), "does not fit"),
])
def test_conv2d_refuses_what_torch_refuses(rng, bad, match):
    x, w = xb(rng.standard_normal((1, 6, 7, 7))), xb(rng.standard_normal((4, 3, 3, 3)))
    kw = dict(groups=2) | bad
    with pytest.raises(ValueError, match=match):
        F.conv2d(x, w, **kw)
    tkw = {k: v for k, v in kw.items()}
    with pytest.raises((ValueError, RuntimeError)):
        TF.conv2d(torch.tensor(npy(x)), torch.tensor(npy(w)), **tkw)


@pytest.mark.parametrize("cls,dims", [("Conv1d", 1), ("Conv2d", 2)])
def test_conv_modules_load_torch_weights(rng, cls, dims):
    kw = dict(stride=1, padding="same", dilation=2, groups=2, bias=True)
    ours, theirs = getattr(nn, cls)(4, 6, 3, **kw), getattr(torch.nn, cls)(4, 6, 3, **kw).double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    ours.to(eg.backends.backend_of(xb(np.zeros(1))))
    x = rng.standard_normal((2, 4) + (7,) * dims)
    close(ours(xb(x)), theirs(torch.tensor(x)).detach().numpy())
    assert ours.weight.shape == tuple(theirs.weight.shape)
    assert repr(ours).startswith(cls) and "groups=2" in repr(ours)


def test_conv_modules_take_torchs_argument_order_and_check_it():
    conv = nn.Conv2d(4, 6, 3, 2, 1, 2, 2, False)  # torch's positions: ..., dilation, groups, bias
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((2, 2), (1, 1), (2, 2), 2)
    assert conv.bias is None and conv.weight.shape == (6, 2, 3, 3)
    with pytest.raises(ValueError, match="dilation"):
        nn.Conv2d(4, 6, 3, 1, 0, False)  # a bias flag where torch has dilation: refused
    with pytest.raises(ValueError, match="groups"):
        nn.Conv1d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="strided"):
        nn.Conv2d(4, 6, 3, stride=2, padding="same")


def test_conv_by_blocks_reuses_its_buffers_across_calls_and_keeps_threads_apart(rng, monkeypatch):
    # The block buffers are kept per thread for the next convolution of the
    # same shapes: a second call (other images, a whole and a partial block, a
    # border that must still be zero) gives torch's values again, and threads
    # running the same shapes at once each have their own.
    import sys
    import threading
    pt = sys.modules["einsumgrad.rules.patches"]  # the module (the package exports a function)
    calls = _block_calls(monkeypatch, 60_000)
    monkeypatch.setattr(pt._kept, "blocks", {}, raising=False)  # this thread's, emptied
    w = rng.standard_normal((6, 8, 3, 3))
    xs = [rng.standard_normal((5, 8, 7, 6)) * (k + 1) for k in range(4)]
    want = [TF.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy() for x in xs]
    for x, y in zip(xs, want):
        close(F.conv2d(xb(x), xb(w), padding=1), y)
    assert calls == ["conv_blocks"] * len(xs)
    assert len(pt._kept.blocks) == 1  # one set of buffers served every call
    got, errors = {}, []

    def run(k):
        try:
            for _ in range(20):
                got[k] = npy(F.conv2d(xb(xs[k]), xb(w), padding=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, y in enumerate(want):
        close(got[k], y, f"thread {k}")


def test_conv_by_blocks_plan_follows_the_channel_minimum(rng, monkeypatch):
    # The plan by blocks is cached per shapes, and a changed minimum of
    # channels is a new key: the same convolution leaves the blocks.
    calls = _block_calls(monkeypatch, 60_000)
    x, w = rng.standard_normal((3, 4, 6, 6)), rng.standard_normal((5, 4, 3, 3))
    want = TF.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy()
    close(F.conv2d(xb(x), xb(w), padding=1), want)
    monkeypatch.setattr(convolution, "MIN_BLOCK_CHANNELS", 8)
    close(F.conv2d(xb(x), xb(w), padding=1), want)
    assert calls == ["conv_blocks"]
