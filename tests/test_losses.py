"""Losses against torch.nn.functional in float64: values and gradients to 1e-9 (1e-12 relative
for the sums a loss is), every reduction, label smoothing, ignore_index, class weights."""
import warnings

import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad.nn import functional as F

from backends import npy, xb

TF = torch.nn.functional
TOL = dict(rtol=1e-9, atol=1e-12)


def both(ours, theirs, arrays, grad_of=(0,), consts=()):
    """Both losses on the same float64 arrays (``consts``: extra arrays, not
    differentiated); values and the gradients of ``grad_of`` under a random cotangent."""
    es = [eg.tensor(xb(a), requires_grad=i in grad_of) for i, a in enumerate(arrays)]
    ts = [torch.tensor(a, requires_grad=i in grad_of) for i, a in enumerate(arrays)]
    y = ours(*es, *[xb(c) for c in consts])
    ty = theirs(*ts, *[torch.tensor(c) for c in consts])
    np.testing.assert_allclose(npy(y), ty.detach().numpy(), **TOL)
    g = np.random.default_rng(9).standard_normal(tuple(ty.shape))
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    for i in grad_of:
        np.testing.assert_allclose(npy(es[i].grad), ts[i].grad.numpy(), **TOL,
                                   err_msg=f"gradient of argument {i}")


SHAPES = [(6, 4), (3, 4, 5), (2, 4, 3, 2), (4,)]


@pytest.mark.parametrize("shape", SHAPES, ids=["N,C", "N,C,d", "N,C,d1,d2", "C"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(rng, shape, reduction, smoothing, weighted):
    axis = 0 if len(shape) == 1 else 1
    labels = rng.integers(0, 4, shape[:axis] + shape[axis + 1:])
    if labels.ndim:
        labels.reshape(-1)[::3] = -100  # ignored targets among them
    w = rng.random(4) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    both(lambda z, y: F.cross_entropy(z, y, weight=None if w is None else xb(w), **kw),
         lambda z, y: TF.cross_entropy(z, y, weight=None if w is None else torch.tensor(w), **kw),
         [rng.standard_normal(shape)], consts=[labels])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_matches_torch(rng, reduction, ignore_index, weighted):
    logp = np.log(rng.dirichlet(np.ones(4), size=(5, 3)).transpose(0, 2, 1))  # (5, 4, 3)
    labels = rng.integers(0, 4, (5, 3))
    w = rng.random(4) + 0.5 if weighted else None
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    both(lambda x, y: F.nll_loss(x, y, None if w is None else xb(w), **kw),
         lambda x, y: TF.nll_loss(x, y, None if w is None else torch.tensor(w), **kw),
         [logp], consts=[labels])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_with_probability_targets_matches_torch(rng, reduction, smoothing):
    # Differentiable in the targets too.
    target = rng.dirichlet(np.ones(4), size=(3, 5)).transpose(0, 2, 1)  # (3, 4, 5)
    w = rng.random(4) + 0.5
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    both(lambda z, t: F.cross_entropy(z, t, weight=xb(w), **kw),
         lambda z, t: TF.cross_entropy(z, t, weight=torch.tensor(w), **kw),
         [rng.standard_normal((3, 4, 5)), target], grad_of=(0, 1))


def test_cross_entropy_hessian_with_smoothing_and_weights(rng):
    logits, labels, w = rng.standard_normal((5, 3)), rng.integers(0, 3, 5), rng.random(3) + 0.5
    ours = eg.hessian(lambda z: F.cross_entropy(z, xb(labels), label_smoothing=0.1,
                                                weight=xb(w)))(xb(logits))
    theirs = torch.func.hessian(lambda z: TF.cross_entropy(
        z, torch.tensor(labels), label_smoothing=0.1, weight=torch.tensor(w)))(torch.tensor(logits))
    np.testing.assert_allclose(npy(ours), theirs.numpy(), **TOL)


def test_everything_ignored_gives_nan_as_torch(rng):
    logits, labels = rng.standard_normal((3, 4)), np.full(3, -100)
    for smoothing in (0.0, 0.2):
        ours = float(npy(F.cross_entropy(xb(logits), xb(labels), label_smoothing=smoothing)))
        theirs = TF.cross_entropy(torch.tensor(logits), torch.tensor(labels),
                                  label_smoothing=smoothing).item()
        assert np.isnan(ours) and np.isnan(theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits_matches_torch(rng, reduction, weighted):
    x = rng.standard_normal((4, 3)) * 3
    t = rng.random((4, 3))
    w, pw = (rng.random((4, 3)) + 0.5, rng.random(3) + 0.5) if weighted else (None, None)

    def ours(x, t):
        return F.binary_cross_entropy_with_logits(
            x, t, None if w is None else xb(w), reduction, None if pw is None else xb(pw))

    def theirs(x, t):
        return TF.binary_cross_entropy_with_logits(
            x, t, None if w is None else torch.tensor(w), reduction=reduction,
            pos_weight=None if pw is None else torch.tensor(pw))
    both(ours, theirs, [x, t], grad_of=(0, 1))


def test_bce_with_logits_is_stable_for_huge_logits():
    x = np.array([1e4, -1e4, 800.0, -800.0, 0.0, 40.0])
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.0])
    both(lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="none"),
         lambda x, t: TF.binary_cross_entropy_with_logits(x, t, reduction="none"), [x, t])
    loss = npy(F.binary_cross_entropy_with_logits(xb(x), xb(t), reduction="none"))
    assert np.all(np.isfinite(loss)) and loss[0] == 1e4 and loss[2] == 0.0
    xs = eg.tensor(xb(x.astype(np.float32)), requires_grad=True)
    F.binary_cross_entropy_with_logits(xs, xb(t.astype(np.float32))).backward()
    assert np.all(np.isfinite(npy(xs.grad)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_and_l1_match_torch(rng, reduction):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    for ours, theirs in ((F.mse_loss, TF.mse_loss), (F.l1_loss, TF.l1_loss)):
        both(lambda a, b: ours(a, b, reduction), lambda a, b: theirs(a, b, reduction=reduction),
             [a, b], grad_of=(0, 1))


def test_mse_warns_on_shapes_that_broadcast_as_torch(rng):
    a, b = rng.standard_normal(3), rng.standard_normal((3, 1))
    with pytest.warns(UserWarning, match="different to the input size"):
        ours = F.mse_loss(xb(a), xb(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TF.mse_loss(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(npy(ours), theirs.numpy(), **TOL)  # the (3, 3) mean, as torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.mse_loss(xb(a), xb(a))  # same shapes: no warning


def test_losses_refuse_what_torch_refuses(rng):
    z, y = xb(rng.standard_normal((3, 4))), xb(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(z, y, reduction="avg")
    with pytest.raises(TypeError, match="weight="):
        F.cross_entropy(z, y, xb(np.ones(4)))  # torch's positional weight: named here
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(z, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight of shape"):
        F.nll_loss(z, y, xb(np.ones(3)))
    with pytest.raises(ValueError, match="same as input size"):
        F.binary_cross_entropy_with_logits(z, xb(np.ones((4, 3))))
    with pytest.raises(ValueError, match="out of range"):
        F.nll_loss(z, xb(np.array([0, 4, 1])))
