"""einsumgrad.nn against torch.nn in float64: forward values and every gradient to 1e-9."""
import os

import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn
from einsumgrad.backends import backend_of
from einsumgrad.nn import functional as F
from einsumgrad.rules import norm
from einsumgrad.tensor import bind
from einsumgrad.testing import check_grads

from backends import npy, xb

TF = torch.nn.functional
TOL = dict(rtol=1e-9, atol=1e-9)


def on_backend(model: nn.Module) -> nn.Module:
    """Move a model's parameters onto the backend under test."""
    return model.to(backend_of(xb(np.zeros(1))))


def compare(eg_fn, torch_fn, *arrays, grad_of=None, seed=1):
    """Run both functions on the same float64 arrays; compare outputs and input gradients."""
    grad_of = range(len(arrays)) if grad_of is None else grad_of
    ours = [eg.tensor(xb(a), requires_grad=i in grad_of) for i, a in enumerate(arrays)]
    theirs = [torch.tensor(a, requires_grad=i in grad_of) for i, a in enumerate(arrays)]
    y, ty = eg_fn(*ours), torch_fn(*theirs)
    np.testing.assert_allclose(npy(y), ty.detach().numpy(), **TOL)
    g = np.random.default_rng(seed).standard_normal(ty.shape)
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    for i in grad_of:
        np.testing.assert_allclose(npy(ours[i].grad), theirs[i].grad.numpy(), **TOL,
                                   err_msg=f"gradient of argument {i}")


def compare_module(ours: nn.Module, theirs: torch.nn.Module, x, *, call=None):
    """Load torch's parameters into ours; compare output, input grad and every parameter grad."""
    theirs = theirs.double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    on_backend(ours)
    call = call or (lambda m, x: m(x))
    xe = eg.tensor(xb(x), requires_grad=x.dtype.kind == "f")
    xt = torch.tensor(x, requires_grad=x.dtype.kind == "f")
    y, ty = call(ours, xe), call(theirs, xt)
    np.testing.assert_allclose(npy(y), ty.detach().numpy(), **TOL)
    g = np.random.default_rng(2).standard_normal(ty.shape)
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    if xe.requires_grad:
        np.testing.assert_allclose(npy(xe.grad), xt.grad.numpy(), **TOL)
    tp = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(npy(p.grad), tp[name].grad.numpy(), **TOL, err_msg=name)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_conv2d_matches_torch(rng, stride, padding):
    x, w, b = rng.standard_normal((2, 3, 7, 8)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    compare(lambda x, w, b: F.conv2d(x, w, b, stride, padding),
            lambda x, w, b: TF.conv2d(x, w, b, stride, padding), x, w, b)


def test_conv2d_module_matches_torch(rng):
    compare_module(nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.Conv2d(2, 3, 3, 2, 1),
                   rng.standard_normal((2, 2, 6, 6)))


@pytest.mark.parametrize("kernel,stride,size", [(2, None, 7), (3, 1, 7), ((2, 3), 2, 7),
                                                (2, None, 8), ((2, 3), (2, 3), 6)])
def test_pools_match_torch(rng, kernel, stride, size):
    # size 8 and 6 with stride == kernel: the windows tile the image (reshape path).
    x = rng.standard_normal((2, 3, size, size))
    compare(lambda x: F.max_pool2d(x, kernel, stride), lambda x: TF.max_pool2d(x, kernel, stride), x)
    compare(lambda x: F.avg_pool2d(x, kernel, stride), lambda x: TF.avg_pool2d(x, kernel, stride), x)


def test_layer_norm_matches_torch(rng):
    compare_module(nn.LayerNorm(5), torch.nn.LayerNorm(5), rng.standard_normal((3, 4, 5)))
    x, w, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    compare(lambda x, w, b: F.layer_norm(x, (4, 5), w, b),
            lambda x, w, b: TF.layer_norm(x, (4, 5), w, b), x, w, b)


def test_layer_norm_primitive_second_order_and_batch_rule(rng):
    # normalize and layer_norm (with weight and bias) are primitives; their
    # rules are engine ops, so orders 2 and up hold, in every input.
    x, w, b = (xb(rng.standard_normal(s)) for s in ((3, 4, 5), (5,), (5,)))
    check_grads(lambda x: F.layer_norm(x, 5, eg.tensor(w)) * 1.0, x, order=2)
    check_grads(lambda x: F.layer_norm(x, (4, 5)), x, order=2)
    check_grads(lambda x, w, b: F.layer_norm(x, 5, w, b), x, w, b, order=2)
    w2, b2 = xb(rng.standard_normal((4, 5))), xb(rng.standard_normal((4, 5)))
    check_grads(lambda x, w, b: F.layer_norm(x, (4, 5), w, b), x, w2, b2, order=2)
    g = lambda x: F.layer_norm(x, 5, eg.tensor(w), eg.tensor(b))
    jb, full = npy(eg.batch_jacobian(g)(x)), npy(eg.jacrev(g)(x))
    for i in range(3):
        np.testing.assert_allclose(jb[i], full[i, :, :, i], **TOL)
    with pytest.raises(eg.BatchMixingError, match="weight or bias"):
        eg.batch_jacobian(lambda w: F.layer_norm(eg.tensor(x), 5, w, eg.tensor(b)))(w)
    # 1/sqrt(var + eps), which normalize's rule binds: its own rules, to order 2
    inv_std = lambda x: bind(norm.inv_std_p, x, axes=(-2, -1), eps=1e-5)
    check_grads(inv_std, x, order=2)
    f = lambda x: F.layer_norm(x, 5)
    jb, full = npy(eg.batch_jacobian(f)(x)), npy(eg.jacrev(f)(x))
    for b in range(3):
        np.testing.assert_allclose(jb[b], full[b, :, :, b], **TOL)
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda x: F.layer_norm(x, (3, 4, 5)))(x)


def test_linear_and_sequential_match_torch(rng):
    ours = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False))
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=False))
    compare_module(ours, theirs, rng.standard_normal((4, 2, 5)))


def test_sequential_pools_before_relu_with_the_same_values_and_derivatives(rng, monkeypatch):
    # Sequential runs ReLU -> MaxPool2d as pool, then ReLU: the same numbers
    # and derivatives as in order (tied, zero and all-negative windows
    # included), and as torch's, which runs them in order.
    shapes = []
    monkeypatch.setattr(nn.layers.ops, "relu", lambda t, f=eg.relu: shapes.append(t.shape) or f(t))
    ours = nn.Sequential(nn.Tanh(), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    in_order = lambda t: eg.reshape(F.max_pool2d(eg.relu(eg.tanh(t)), 2), (2, -1))
    x = rng.integers(-2, 3, (2, 3, 6, 4)).astype(float)
    x[0, 0, :2, :2] = [[0.0, -0.0], [-1.0, 0.0]]
    x = xb(x)
    np.testing.assert_array_equal(npy(ours(x)), npy(in_order(x)))
    assert shapes == [(2, 3, 3, 2)]  # the ReLU ran on the pooled tensor
    for jac in (eg.jacrev, eg.jacfwd):
        np.testing.assert_array_equal(npy(jac(ours)(x)), npy(jac(in_order)(x)))
    _, pull = eg.vjp(ours, x)
    _, pull_in_order = eg.vjp(in_order, x)
    g = xb(rng.standard_normal((2, 18)))
    np.testing.assert_array_equal(npy(pull(g)[0]), npy(pull_in_order(g)[0]))
    check_grads(ours, xb(rng.standard_normal((2, 3, 6, 4))), order=2)
    # Average pooling does not commute with ReLU: it stays in order.
    avg = nn.Sequential(nn.ReLU(), nn.AvgPool2d(2))
    np.testing.assert_allclose(npy(avg(x)), npy(F.avg_pool2d(eg.relu(x), 2)), rtol=1e-15)
    theirs = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 torch.nn.Flatten())
    compare_module(ours, theirs, rng.standard_normal((2, 3, 6, 4)))


def test_embedding_matches_torch(rng):
    ids = rng.integers(0, 10, size=(3, 6))
    compare_module(nn.Embedding(10, 4), torch.nn.Embedding(10, 4), ids)


@pytest.mark.parametrize("mask", [None, "causal", "random"])
def test_multi_head_attention_matches_torch(rng, mask):
    b, l, e, h = 2, 5, 8, 2
    x = rng.standard_normal((b, l, e))
    allowed = None
    if mask == "causal":
        allowed = np.tril(np.ones((l, l), bool))
    elif mask == "random":
        allowed = rng.random((l, l)) < 0.6
        allowed[np.arange(l), np.arange(l)] = True  # no row fully masked
    theirs = torch.nn.MultiheadAttention(e, h, batch_first=True)
    tmask = None if allowed is None else torch.tensor(~allowed)  # torch: True = blocked

    def call(m, x):
        if isinstance(m, torch.nn.Module):
            return m(x, x, x, attn_mask=tmask, need_weights=False)[0]
        return m(x, mask=None if allowed is None else xb(allowed))
    compare_module(nn.MultiHeadAttention(e, h), theirs, x, call=call)


def test_causal_flag_equals_causal_mask(rng):
    x = xb(rng.standard_normal((2, 4, 6)))
    m = on_backend(nn.MultiHeadAttention(6, 3, causal=True))
    plain = nn.MultiHeadAttention(6, 3)
    plain.load_state_dict(m.state_dict())
    on_backend(plain)
    np.testing.assert_allclose(npy(m(x)), npy(plain(x, mask=xb(np.tril(np.ones((4, 4), bool))))),
                               **TOL)


def test_cross_attention_matches_torch(rng):
    # Keys and values apart from the queries: three products, not one (the
    # self-attention path), with gradients for the queries and every weight.
    q, kv = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 6, 4))

    def call(m, x):
        if isinstance(m, torch.nn.Module):
            return m(x, torch.tensor(kv), torch.tensor(kv), need_weights=False)[0]
        return m(x, xb(kv), xb(kv))
    compare_module(nn.MultiHeadAttention(4, 2), torch.nn.MultiheadAttention(4, 2, batch_first=True),
                   q, call=call)


def test_sdpa_with_float_mask_matches_torch(rng):
    q, k, v = (rng.standard_normal((2, 3, 4, 5)) for _ in range(3))
    add = rng.standard_normal((4, 4))
    compare(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, xb(add)),
            lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, torch.tensor(add)), q, k, v)


def test_cross_entropy_and_mse_match_torch(rng):
    logits, labels = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    compare(lambda z: F.cross_entropy(z, xb(labels)),
            lambda z: TF.cross_entropy(z, torch.tensor(labels)), logits)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    compare(F.mse_loss, TF.mse_loss, a, b)


@pytest.mark.parametrize("logits_shape", [(6, 4), (3, 4, 5), (2, 4, 3, 2), (4,)],
                         ids=["N,C", "N,C,d", "N,C,d1,d2", "C"])
def test_cross_entropy_takes_classes_on_axis_1_as_torch(rng, logits_shape):
    # Labels drop the class axis (axis 1, or axis 0 of a (C,) input).
    axis = 0 if len(logits_shape) == 1 else 1
    labels = rng.integers(0, 4, logits_shape[:axis] + logits_shape[axis + 1:])
    logits = rng.standard_normal(logits_shape)
    compare(lambda z: F.cross_entropy(z, xb(labels)),
            lambda z: TF.cross_entropy(z, torch.tensor(labels)), logits)
    hess = eg.hessian(lambda z: F.cross_entropy(z, xb(labels)))(xb(logits))
    want = torch.func.hessian(lambda z: TF.cross_entropy(z, torch.tensor(labels)))(
        torch.tensor(logits))
    np.testing.assert_allclose(npy(hess), want.numpy(), **TOL)


def test_cross_entropy_rejects_labels_that_do_not_fit(rng):
    logits = eg.tensor(xb(rng.standard_normal((3, 4, 5))))
    for bad in [np.zeros(3, int), np.zeros((3, 4), int), np.zeros((3, 5, 1), int)]:
        with pytest.raises(ValueError, match=r"labels must have shape \(3, 5\)"):
            F.cross_entropy(logits, xb(bad))
    with pytest.raises(ValueError, match=r"must have shape \(\)"):
        F.cross_entropy(eg.tensor(xb(np.ones(4))), xb(np.array([1])))
    with pytest.raises(ValueError, match="integer"):
        F.cross_entropy(logits, xb(np.zeros((3, 5))))
    # A label outside [0, C) would pick no class and count as a zero loss: refused.
    for label in (4, -1):
        out_of_range = np.zeros((3, 5), int)
        out_of_range[2, 1] = label
        with pytest.raises(ValueError, match=f"label {label} is out of range for 4 classes"):
            F.cross_entropy(logits, xb(out_of_range))


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_ignore_index_as_torch(rng, ignore_index):
    logits = rng.standard_normal((7, 4, 3))
    labels = rng.integers(0, 4, (7, 3))
    labels[[0, 3, 5], [1, 0, 2]] = ignore_index
    compare(lambda z: F.cross_entropy(z, xb(labels), ignore_index=ignore_index),
            lambda z: TF.cross_entropy(z, torch.tensor(labels), ignore_index=ignore_index),
            logits)
    every = np.full((7, 3), ignore_index)  # nothing left to average: nan, as torch
    assert np.isnan(float(npy(F.cross_entropy(xb(logits), xb(every), ignore_index=ignore_index))))


def test_dropout_train_and_eval(rng):
    nn.manual_seed(3)
    d = nn.Dropout(0.25)
    x = xb(np.ones((200, 50)))
    y = npy(d(x))
    assert set(np.unique(y)) == {0.0, 1 / 0.75}
    assert abs((y == 0).mean() - 0.25) < 0.02
    assert np.array_equal(npy(d.eval()(x)), npy(x))


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_patch_op_check_grads_order_2(rng, stride, padding):
    x = xb(rng.standard_normal((2, 5, 6)))
    check_grads(lambda x: nn.patches(x, (3, 2), stride, padding), x, order=2)
    g = xb(rng.standard_normal(nn.patches(eg.tensor(x), (3, 2), stride, padding).shape))
    check_grads(lambda g: nn.unpatch(g, (5, 6), (3, 2), stride, padding), g, order=2)


def test_conv_second_order_and_jvp(rng):
    x, w = xb(rng.standard_normal((1, 2, 5, 5))), xb(rng.standard_normal((3, 2, 3, 3)))
    check_grads(lambda x, w: F.conv2d(x, w, stride=2, padding=1), x, w, order=2)
    check_grads(lambda x: F.max_pool2d(F.conv2d(x, w), 2), x, order=1)
    check_grads(lambda x: F.max_pool2d(x, 2), xb(rng.standard_normal((2, 3, 4, 6))), order=2)


@pytest.mark.parametrize("c,f", [(4, 1), (1, 8)])  # per-offset loop; patches materialized
def test_patch_einsum_is_einsum_of_patches_order_2(rng, c, f):
    x, w = xb(rng.standard_normal((2, c, 5, 6))), xb(rng.standard_normal((f, c, 3, 2)))
    g = xb(rng.standard_normal((2, f, 3, 4)))
    ref = eg.einsum("bchwkl,fckl->bfhw", nn.patches(eg.tensor(x), (3, 2), 2, 1), w)
    y = F.patch_einsum("bchwkl,fckl->bfhw", x, w, (3, 2), 2, 1)
    np.testing.assert_allclose(npy(y), npy(ref), **TOL)
    dx = F.unpatch_einsum("bfhw,fckl->bchwkl", g, w, (5, 6), (3, 2), 2, 1)
    ref = nn.unpatch(eg.einsum("bfhw,fckl->bchwkl", g, w), (5, 6), (3, 2), 2, 1)
    np.testing.assert_allclose(npy(dx), npy(ref), **TOL)
    check_grads(lambda x, w: F.patch_einsum("bchwkl,fckl->bfhw", x, w, (3, 2), 2, 1),
                x, w, order=2)
    check_grads(lambda x, g: F.patch_einsum("bchwkl,bfhw->fckl", x, g, (3, 2), 2, 1),
                x, g, order=2)
    check_grads(lambda g, w: F.unpatch_einsum("bfhw,fckl->bchwkl", g, w, (5, 6), (3, 2), 2, 1),
                g, w, order=2)


def test_patch_einsum_batch_rule(rng):
    x, w = xb(rng.standard_normal((3, 4, 5, 5))), xb(rng.standard_normal((1, 4, 3, 3)))
    f = lambda x: F.patch_einsum("bchwkl,fckl->bfhw", x, w, 3, 1, 1)
    jb, full = npy(eg.batch_jacobian(f)(x)), npy(eg.jacrev(f)(x))
    for b in range(3):
        np.testing.assert_allclose(jb[b], full[b, :, :, :, b], **TOL)
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda x: f(eg.transpose(x, (2, 1, 0, 3))))(x)


def test_patch_op_values_and_unpatch_is_its_adjoint(rng):
    x = rng.standard_normal((2, 3, 6, 7))
    p = nn.patches(eg.tensor(xb(x)), 3, 2, 1)
    assert p.shape == (2, 3, 3, 4, 3, 3)
    xpad = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    assert np.array_equal(npy(p)[1, 2, 2, 3], xpad[1, 2, 4:7, 6:9])
    g = rng.standard_normal(p.shape)
    lhs = np.vdot(npy(p), g)
    rhs = np.vdot(x, npy(nn.unpatch(eg.tensor(xb(g)), (6, 7), 3, 2, 1)))
    assert abs(lhs - rhs) < 1e-9 * abs(lhs)


def test_batch_jacobian_through_conv(rng):
    w = xb(rng.standard_normal((2, 1, 3, 3)))
    x = xb(rng.standard_normal((4, 1, 5, 5)))
    f = lambda x: F.conv2d(x, w, padding=1)
    jb = npy(eg.batch_jacobian(f)(x))
    full = npy(eg.jacrev(f)(x))
    assert jb.shape == (4, 2, 5, 5, 1, 5, 5)
    for b in range(4):
        np.testing.assert_allclose(jb[b], full[b, :, :, :, b], **TOL)
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda x: nn.patches(eg.transpose(x, (1, 0, 2, 3)), 2))(x)


def test_torch_cnn_state_dict_gives_same_logits(rng):
    def make(mod):
        return mod.Sequential(mod.Conv2d(1, 4, 3, padding=1), mod.ReLU(), mod.MaxPool2d(2),
                              mod.Conv2d(4, 6, 3, stride=2), mod.ReLU(), mod.Flatten(),
                              mod.Linear(6 * 1 * 1, 5))
    theirs = make(torch.nn).double()
    ours = on_backend(make(nn))
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    assert [n for n, _ in ours.named_parameters()] == list(theirs.state_dict())
    x = rng.standard_normal((3, 1, 6, 6))
    np.testing.assert_allclose(npy(ours(xb(x))), theirs(torch.tensor(x)).detach().numpy(), **TOL)


def test_state_dict_round_trips_through_a_file(tmp_path, rng):
    model = on_backend(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3),
                                     nn.LayerNorm(3)))
    x = xb(rng.standard_normal((2, 1, 4, 4)))
    before = npy(model(x))
    path = os.path.join(tmp_path, "model.npz")
    np.savez(path, **model.state_dict())
    fresh = on_backend(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3),
                                     nn.LayerNorm(3)))
    with np.load(path) as f:
        fresh.load_state_dict(f)
    for (n, a), (m, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n == m and a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(npy(fresh(x)), before)
    with pytest.raises(KeyError):
        fresh.load_state_dict({"0.weight": model.state_dict()["0.weight"]})


def test_init_matches_torch_defaults():
    nn.manual_seed(0)
    lin = nn.Linear(100, 50)
    w, b = npy(lin.weight), npy(lin.bias)
    assert w.shape == (50, 100) and np.abs(w).max() <= 0.1 and np.abs(w).max() > 0.09
    assert np.abs(b).max() <= 0.1 and abs(w.std() - 0.1 / np.sqrt(3)) < 0.005
    conv = nn.Conv2d(4, 8, 3)
    assert np.abs(npy(conv.weight)).max() <= 1 / 6
    nn.manual_seed(0)
    assert np.array_equal(npy(nn.Linear(100, 50).weight), w)


def test_module_surface():
    m = on_backend(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)))
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(list(m.parameters())) == 4
    assert not m.eval()[1].training and m.train()[1].training
    out = m(xb(np.ones((5, 3))))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    m.to(dtype=np.float32)
    assert all(p.dtype == np.float32 for p in m.parameters())
