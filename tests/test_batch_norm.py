"""BatchNorm1d / 2d and F.batch_norm against torch in float64: outputs and gradients (inputs and
affine parameters) in train mode, running statistics after several steps, outputs in eval
mode, state dicts both ways; batch_jacobian refuses train mode and is exact in eval mode."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn
from einsumgrad.backends import backend_of
from einsumgrad.nn import functional as F
from einsumgrad.testing import check_grads

from backends import npy, xb

TOL = dict(rtol=1e-9, atol=1e-9)


def on_backend(model):
    return model.to(backend_of(xb(np.zeros(1))))


def twins(cls, c, **kw):
    """Ours and torch's with the same random affine parameters (torch's start at 1 and 0)."""
    theirs = getattr(torch.nn, cls)(c, **kw).double()
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours = getattr(nn, cls)(c, **kw)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return on_backend(ours), theirs


def forward_backward(ours, theirs, x, seed):
    xe, xt = eg.tensor(xb(x), requires_grad=True), torch.tensor(x, requires_grad=True)
    y, ty = ours(xe), theirs(xt)
    np.testing.assert_allclose(npy(y), ty.detach().numpy(), **TOL)
    g = np.random.default_rng(seed).standard_normal(x.shape)
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(npy(xe.grad), xt.grad.numpy(), **TOL)
    tp = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(npy(p.grad), tp[name].grad.numpy(), **TOL, err_msg=name)
    ours.zero_grad()
    theirs.zero_grad()


def assert_same_state(ours, theirs):
    want = theirs.state_dict()
    got = ours.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.numpy().dtype, k
        np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-12, atol=1e-12, err_msg=k)


CASES = [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 5)), ("BatchNorm2d", (4, 3, 5, 6))]


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("kw", [{}, dict(momentum=None), dict(momentum=0.3, eps=1e-3),
                                dict(affine=False)], ids=["default", "cumulative", "m0.3", "plain"])
def test_train_steps_then_eval_match_torch(rng, cls, shape, kw):
    ours, theirs = twins(cls, shape[1], **kw)
    for step in range(4):  # statistics that differ batch to batch (a shifted, scaled input)
        forward_backward(ours, theirs, rng.standard_normal(shape) * (step + 1) + step, step)
    assert_same_state(ours, theirs)  # running mean, unbiased running var, 4 batches tracked
    assert int(npy(ours.num_batches_tracked)) == 4
    ours.eval()
    theirs.eval()
    forward_backward(ours, theirs, rng.standard_normal(shape), 7)
    assert_same_state(ours, theirs)  # eval mode leaves the statistics alone


def test_without_running_stats_batch_statistics_always(rng):
    ours, theirs = twins("BatchNorm2d", 3, track_running_stats=False)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    ours.eval()
    theirs.eval()
    forward_backward(ours, theirs, rng.standard_normal((4, 3, 2, 2)), 0)


@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_matches_torch(rng, training):
    x, w, b = rng.standard_normal((5, 4, 3)), rng.standard_normal(4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5
    erm, erv = eg.tensor(xb(rm)), eg.tensor(xb(rv))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    es = [eg.tensor(xb(a), requires_grad=True) for a in (x, w, b)]
    ts = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    y = F.batch_norm(es[0], erm, erv, es[1], es[2], training, 0.2, 1e-4)
    ty = torch.nn.functional.batch_norm(ts[0], trm, trv, ts[1], ts[2], training, 0.2, 1e-4)
    np.testing.assert_allclose(npy(y), ty.detach().numpy(), **TOL)
    g = rng.standard_normal(x.shape)
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    for e, t in zip(es, ts):
        np.testing.assert_allclose(npy(e.grad), t.grad.numpy(), **TOL)
    np.testing.assert_allclose(npy(erm), trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(npy(erv), trv.numpy(), rtol=1e-12)


def test_batch_jacobian_refuses_train_mode_and_is_exact_in_eval(rng):
    bn, _ = twins("BatchNorm2d", 3)
    x = xb(rng.standard_normal((4, 3, 2, 2)))
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(bn)(x)
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(nn.BatchNorm1d(3).to(backend_of(x)))(xb(rng.standard_normal((4, 3))))
    bn(x)  # running statistics that are not 0 and 1
    bn.eval()
    jb, full = npy(eg.batch_jacobian(bn)(x)), npy(eg.jacrev(bn)(x))
    assert jb.shape == (4, 3, 2, 2, 3, 2, 2)
    for i in range(4):
        np.testing.assert_allclose(jb[i], full[i, :, :, :, i], rtol=1e-12, atol=1e-12)


def test_train_mode_second_order_and_forward_mode(rng):
    x = xb(rng.standard_normal((4, 2, 3)))
    w, b = xb(rng.random(2) + 0.5), xb(rng.standard_normal(2))
    check_grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x, w, b, order=2)
    fwd = npy(eg.jacfwd(lambda x: F.batch_norm(x, None, None, w, b, True))(x))
    rev = npy(eg.jacrev(lambda x: F.batch_norm(x, None, None, w, b, True))(x))
    np.testing.assert_allclose(fwd, rev, rtol=1e-10, atol=1e-12)


def test_batch_norm_refusals_as_torch(rng):
    bn = on_backend(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="4-D"):
        bn(xb(rng.standard_normal((2, 3, 4))))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(xb(rng.standard_normal((1, 3, 1, 1))))
    with pytest.raises(ValueError, match="running_mean"):
        F.batch_norm(xb(rng.standard_normal((2, 3))), None, None)
    with pytest.raises(ValueError, match="channels"):
        F.batch_norm(xb(rng.standard_normal((2, 3))), None, None, xb(np.ones(4)), training=True)
    bn.eval()
    assert bn(xb(rng.standard_normal((1, 3, 1, 1)))).shape == (1, 3, 1, 1)  # fine in eval


def test_buffers_move_cast_and_load_all_or_nothing(rng):
    bn = nn.BatchNorm1d(4)
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var",
                                                  "num_batches_tracked"]
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    bn.float()
    assert bn.running_mean.dtype == np.float32 and bn.weight.dtype == np.float32
    assert bn.num_batches_tracked.dtype == np.int64  # integers stay
    bn.double()
    on_backend(bn)
    state = bn.state_dict()
    bad = dict(state, running_var=np.ones(5), num_batches_tracked=np.array(7))
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(ValueError, match="running_var"):
        bn.load_state_dict(bad)
    assert all(np.array_equal(bn.state_dict()[k], v) for k, v in before.items())
    del bad["running_var"]
    with pytest.raises(KeyError, match="'running_var': missing"):
        bn.load_state_dict(bad)
    bn.load_state_dict(dict(state, num_batches_tracked=torch.tensor(7)))
    assert int(npy(bn.num_batches_tracked)) == 7
    assert bn.num_batches_tracked.dtype == np.int64


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_backward_equals_the_rules(rng, channels_last):
    # A backward that records nothing takes the fused pass; create_graph=True
    # takes the rules (engine ops): the same gradients, in either memory order.
    x = rng.standard_normal((4, 3, 5, 6)) * 2 + 1
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    g = rng.standard_normal(x.shape)
    grads, (first, _) = [], twins("BatchNorm2d", 3)
    for create_graph in (False, True):
        bn = on_backend(nn.BatchNorm2d(3))
        bn.load_state_dict(first.state_dict())
        xe = eg.tensor(xb(x), requires_grad=True)
        bn(xe).backward(xb(g), create_graph=create_graph)
        grads.append([npy(t.grad) for t in (xe, bn.weight, bn.bias)])
    for fused, rule in zip(*grads):
        np.testing.assert_allclose(fused, rule, rtol=1e-12, atol=1e-12)


def test_float32_statistics_of_a_large_mean(rng):
    # Two passes for the variance: a mean of 1e4 does not swamp a spread of 1.
    x = (rng.standard_normal((64, 2, 4, 4)) + 1e4).astype(np.float32)
    y = npy(on_backend(nn.BatchNorm2d(2, dtype=np.float32))(xb(x)))
    want = torch.nn.functional.batch_norm(torch.tensor(x, dtype=torch.float64), None, None,
                                          training=True).numpy()
    np.testing.assert_allclose(y, want, atol=2e-3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_after_batch_norm_is_one_op_matching_torch(rng, channels_last, dtype):
    # F.relu of a recorded batch norm's output joins the norm's op: torch's values
    # and gradients, the fused backward equal to the rules, and the output left alone.
    x = rng.standard_normal((8, 3, 4, 5)) * 2 + 1
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    g = rng.standard_normal(x.shape)
    ours, theirs = twins("BatchNorm2d", 3)
    ours.to(dtype)
    tol = TOL if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    xt = torch.tensor(x, requires_grad=True)
    ty = torch.relu(theirs(xt))
    ty.backward(torch.tensor(g))
    grads = []
    for create_graph in (False, True):
        xe = eg.tensor(xb(x.astype(dtype)), requires_grad=True)
        y = ours(xe)
        before = npy(y).copy()
        r = nn.ReLU()(y)
        assert r.node.params["relu"] and r.node.prim is y.node.prim
        np.testing.assert_array_equal(npy(y), before)
        np.testing.assert_allclose(npy(r), ty.detach().numpy(), **tol)
        r.backward(xb(g.astype(dtype)), create_graph=create_graph)
        grads.append([npy(t.grad) for t in (xe, ours.weight, ours.bias)])
        ours.zero_grad()
    want = [xt.grad.numpy(), theirs.weight.grad.numpy(), theirs.bias.grad.numpy()]
    for fused, rule, w in zip(*grads, want):
        np.testing.assert_allclose(fused, w, **tol)
        np.testing.assert_allclose(fused, rule, **tol)


def test_relu_after_batch_norm_second_order_and_changed_output(rng):
    x = rng.standard_normal((6, 2, 3, 3))
    bn = on_backend(nn.BatchNorm2d(2))
    check_grads(lambda x: F.relu(bn(x)), xb(x), order=2)
    y = bn(eg.tensor(xb(x), requires_grad=True))
    with eg.no_grad():
        y += 1.0  # changed in place since recorded: a plain ReLU of the new values
    r = F.relu(y)
    assert r.node.prim.name == "relu"
