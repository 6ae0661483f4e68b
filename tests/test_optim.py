"""einsumgrad.optim against torch.optim: the same parameters and gradients, 10 steps, 1e-12."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn, optim

from backends import npy, xb


def run_both(make_ours, make_theirs, steps=10, seed=0):
    """Step both optimizers on a quadratic-plus-sine loss; compare parameters after each step."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    init = [rng.standard_normal(s) for s in shapes]
    ours = [eg.tensor(xb(a), requires_grad=True) for a in init]
    theirs = [torch.tensor(a, requires_grad=True) for a in init]
    opt, topt = make_ours(ours), make_theirs(theirs)
    for _ in range(steps):
        opt.zero_grad()
        topt.zero_grad()
        loss = sum((eg.sin(p) * p).sum() + (p * p).sum() * 0.5 for p in ours)
        tloss = sum((torch.sin(p) * p).sum() + (p * p).sum() * 0.5 for p in theirs)
        loss.backward()
        tloss.backward()
        opt.step()
        topt.step()
        for p, tp in zip(ours, theirs):
            np.testing.assert_allclose(npy(p), tp.detach().numpy(), rtol=1e-12, atol=1e-12)
    return ours


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01), (0.0, 0.1)])
def test_sgd_matches_torch(momentum, wd):
    run_both(lambda ps: optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=wd),
             lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=wd))


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_matches_torch(wd):
    run_both(lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd),
             lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd))
    run_both(lambda ps: optim.Adam(ps), lambda ps: torch.optim.Adam(ps))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_momentum_on_a_0d_parameter_matches_torch(wd):
    # A 0-d parameter's momentum buffer must update in place (a NumPy scalar would rebind).
    s = eg.tensor(xb(np.array(2.0)), requires_grad=True)
    ts = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    opt = optim.SGD([s], lr=0.1, momentum=0.9, weight_decay=wd)
    topt = torch.optim.SGD([ts], lr=0.1, momentum=0.9, weight_decay=wd)
    for _ in range(3):
        opt.zero_grad()
        topt.zero_grad()
        (eg.sin(s) * s).backward()
        (torch.sin(ts) * ts).backward()
        opt.step()
        topt.step()
        assert npy(s) == pytest.approx(ts.item(), abs=1e-12)
    assert npy(s).shape == ()


def test_updates_in_place_and_skips_missing_grads():
    model = nn.Linear(3, 2).to(eg.backends.backend_of(xb(np.zeros(1))))
    w_array, w_before = model.weight.data, npy(model.weight).copy()
    opt = optim.Adam(model.parameters(), lr=0.1)
    model(xb(np.ones((4, 3)))).sum().backward()
    model.bias.grad = None
    bias_before = npy(model.bias).copy()
    opt.step()
    assert model.weight.data is w_array  # same array, changed in place
    assert not np.array_equal(npy(model.weight), w_before)
    assert np.array_equal(npy(model.bias), bias_before)
    opt.zero_grad()
    assert model.weight.grad is None


def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError):
        optim.SGD([], lr=0.1)
