"""Parameter groups, AdamW, schedulers, state dicts and gradient clipping against torch.

Every comparison runs the same float64 parameters and gradients through both
for 10 steps, two parameter groups with different hyperparameters, to 1e-12.
"""
import math
import os

import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn, optim
from einsumgrad.nn.utils import clip_grad_norm_, clip_grad_value_

from backends import npy, xb

TOL = dict(rtol=1e-12, atol=1e-12)
SHAPES = [(3, 4), (4,), (2, 2, 2), ()]


def params(seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in SHAPES]
    return ([eg.tensor(xb(a), requires_grad=True) for a in init],
            [torch.tensor(a, requires_grad=True) for a in init])


def groups(ps, **second):
    """Two groups: the first two parameters with the defaults, the rest with ``second``."""
    return [{"params": ps[:2]}, {"params": ps[2:], **second}]


def loss_of(ps, lib):
    sin = eg.sin if lib is eg else torch.sin
    return sum((sin(p) * p).sum() + (p * p).sum() * 0.5 for p in ps)


def step_both(opt, topt, ours, theirs, sched=None, tsched=None):
    for o in (opt, topt):
        o.zero_grad()
    loss_of(ours, eg).backward()
    loss_of(theirs, torch).backward()
    opt.step()
    topt.step()
    if sched is not None:
        sched.step()
        tsched.step()


def assert_same(ours, theirs, opt=None, topt=None):
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(npy(p), tp.detach().numpy(), **TOL)
    if opt is not None:
        for g, tg in zip(opt.param_groups, topt.param_groups):
            assert g["lr"] == pytest.approx(tg["lr"], rel=1e-15, abs=0)


OPTIMIZERS = {
    "AdamW": (lambda ps: optim.AdamW(groups(ps, lr=0.05, weight_decay=0.1), lr=0.01),
              lambda ps: torch.optim.AdamW(groups(ps, lr=0.05, weight_decay=0.1), lr=0.01)),
    "AdamW-amsgrad": (
        lambda ps: optim.AdamW(groups(ps, lr=0.03, betas=(0.5, 0.9)), lr=0.01, amsgrad=True),
        lambda ps: torch.optim.AdamW(groups(ps, lr=0.03, betas=(0.5, 0.9)), lr=0.01,
                                     amsgrad=True)),
    "Adam-groups": (
        lambda ps: optim.Adam(groups(ps, lr=0.1, eps=1e-3, weight_decay=0.05), lr=0.01),
        lambda ps: torch.optim.Adam(groups(ps, lr=0.1, eps=1e-3, weight_decay=0.05), lr=0.01)),
    "Adam-maximize": (lambda ps: optim.Adam(ps, lr=0.01, maximize=True),
                      lambda ps: torch.optim.Adam(ps, lr=0.01, maximize=True)),
    "SGD-nesterov": (
        lambda ps: optim.SGD(groups(ps, lr=0.02, momentum=0.5), lr=0.05, momentum=0.9,
                             nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.SGD(groups(ps, lr=0.02, momentum=0.5), lr=0.05, momentum=0.9,
                                   nesterov=True, weight_decay=0.01)),
    "SGD-dampening": (
        lambda ps: optim.SGD(groups(ps, lr=0.02, dampening=0.3), lr=0.05, momentum=0.9),
        lambda ps: torch.optim.SGD(groups(ps, lr=0.02, dampening=0.3), lr=0.05, momentum=0.9)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_with_param_groups_match_torch(name):
    make, tmake = OPTIMIZERS[name]
    ours, theirs = params()
    opt, topt = make(ours), tmake(theirs)
    assert len(opt.param_groups) == len(topt.param_groups)
    for _ in range(10):
        step_both(opt, topt, ours, theirs)
        assert_same(ours, theirs)


SCHEDULERS = {
    "StepLR": (lambda o: optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
               lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    "Cosine": (lambda o: optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=1e-3),
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=1e-3)),
    "Cosine-long": (lambda o: optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
                    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", ["AdamW", "SGD-nesterov"])
def test_schedulers_match_torch_step_for_step(opt_name, sched_name):
    # Cosine with T_max 4 over 12 epochs passes its minimum and climbs back: torch's
    # recursive form, not only its closed one.
    make, tmake = OPTIMIZERS[opt_name]
    smake, tsmake = SCHEDULERS[sched_name]
    ours, theirs = params()
    opt, topt = make(ours), tmake(theirs)
    sched, tsched = smake(opt), tsmake(topt)
    assert sched.get_last_lr() == tsched.get_last_lr()
    for _ in range(12):
        step_both(opt, topt, ours, theirs, sched, tsched)
        assert_same(ours, theirs, opt, topt)
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-15)


def test_cosine_rates_are_torchs_closed_form_within_rounding():
    ours, _ = params()
    opt = optim.SGD(ours, lr=0.1)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.01)
    for t in range(1, 8):
        sched.step()
        want = 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * t / 7)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("opt_name", ["AdamW-amsgrad", "SGD-nesterov"])
def test_state_saved_mid_training_through_savez_resumes_bit_for_bit(tmp_path, opt_name):
    make, _ = OPTIMIZERS[opt_name]
    ours, _ = params()
    opt = make(ours)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)

    def train(ps, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_of(ps, eg).backward()
            opt.step()
            sched.step()

    train(ours, opt, sched, 4)
    path = os.path.join(tmp_path, "ckpt.npz")
    np.savez(path, **{f"p{i}": npy(p) for i, p in enumerate(ours)},
             **{f"opt.{k}": v for k, v in opt.state_dict().items()},
             **{f"sched.{k}": v for k, v in sched.state_dict().items()})
    train(ours, opt, sched, 5)  # the run that was not interrupted
    # A fresh process's view: new parameters, optimizer and scheduler, then the file.
    with np.load(path) as f:  # no allow_pickle: plain arrays only
        fresh = [eg.tensor(xb(f[f"p{i}"]), requires_grad=True) for i in range(len(SHAPES))]
        opt2 = make(fresh)
        opt2.load_state_dict({k[4:]: f[k] for k in f.files if k.startswith("opt.")})
        sched2 = optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)
        sched2.load_state_dict({k[6:]: f[k] for k in f.files if k.startswith("sched.")})
    train(fresh, opt2, sched2, 5)
    for p, q in zip(ours, fresh):
        assert np.array_equal(npy(p), npy(q))  # bit for bit
    assert opt2.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    for p, q in zip(ours, fresh):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            assert (w == v) if k == "step" else np.array_equal(npy(w), npy(v)), k


def test_optimizer_loads_torchs_own_state_dict():
    # torch's nested layout, tensors and all: the run goes on as torch's does.
    make, tmake = OPTIMIZERS["AdamW"]
    ours, theirs = params()
    opt, topt = make(ours), tmake(theirs)
    for _ in range(3):
        step_both(opt, topt, ours, theirs)
    opt2 = make(ours)
    opt2.load_state_dict(topt.state_dict())
    for _ in range(3):
        step_both(opt2, topt, ours, theirs)
        assert_same(ours, theirs)


def test_load_state_dict_is_all_or_nothing():
    ours, _ = params()
    opt = optim.Adam(groups(ours, lr=0.1), lr=0.01)
    loss_of(ours, eg).backward()
    opt.step()
    good = opt.state_dict()
    before = {k: v.copy() for k, v in opt.state_dict().items()}
    bad = dict(good)
    bad["param_groups.0.lr"] = np.array(5.0)               # fine alone
    bad["state.1.exp_avg"] = np.zeros(7)                   # the wrong shape
    bad["bogus"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"state\.1\.exp_avg.*\(7,\)") as info:
        opt.load_state_dict(bad)
    assert "bogus" in str(info.value)
    after = opt.state_dict()
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="group"):
        optim.Adam(ours, lr=0.01).load_state_dict(good)  # one group, two saved


def test_param_groups_edits_take_effect_and_groups_are_checked():
    ours, _ = params()
    opt = optim.SGD(ours, lr=0.1)
    opt.param_groups[0]["lr"] = 0.0
    loss_of(ours, eg).backward()
    before = [npy(p).copy() for p in ours]
    opt.step()
    assert all(np.array_equal(npy(p), b) for p, b in zip(ours, before))
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([{"params": ours[:2]}, {"params": ours[1:]}], lr=0.1)
    with pytest.raises(TypeError):
        optim.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError):
        optim.AdamW(ours, lr=-1.0)
    with pytest.raises(ValueError):
        optim.SGD(ours, lr=0.1, nesterov=True)
    opt.add_param_group({"params": [eg.tensor(xb(np.zeros(2)), requires_grad=True)], "lr": 3.0})
    assert opt.param_groups[1]["lr"] == 3.0 and opt.param_groups[1]["momentum"] == 0.0


def test_step_keeps_bumping_the_version_counter():
    ours, _ = params()
    opt = optim.AdamW(ours, lr=0.1)
    y = (ours[0] * 2.0).sum()
    y.backward(retain_graph=True)
    versions = [p.version for p in ours]
    opt.step()  # only the parameter with a gradient changes, and says so
    assert [p.version for p in ours] == [versions[0] + 1] + versions[1:]
    with pytest.raises(RuntimeError, match="changed in place"):
        y.backward()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, theirs = params(1)
    loss_of(ours, eg).backward()
    loss_of(theirs, torch).backward()
    total = clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert float(npy(total)) == pytest.approx(want.item(), rel=1e-12)
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(npy(p.grad), tp.grad.numpy(), **TOL)


def test_clip_grad_norm_on_a_model_skips_missing_grads_and_can_refuse_nonfinite():
    model = nn.Linear(3, 2).to(eg.backends.backend_of(xb(np.zeros(1))))
    model(xb(np.ones((4, 3)))).sum().backward()
    model.bias.grad = None
    clip_grad_norm_(model.parameters(), 0.1)
    assert float(np.linalg.norm(npy(model.weight.grad))) == pytest.approx(0.1, rel=1e-4)
    model.weight.grad = eg.tensor(xb(np.full((2, 3), np.nan)))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    model.weight.grad = eg.tensor(xb(np.array([[3.0, -5.0, 0.5]] * 2)))
    clip_grad_value_(model.parameters(), 1.0)
    assert np.array_equal(npy(model.weight.grad), [[1.0, -1.0, 0.5]] * 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [{}, dict(weight_decay=0.1),
                                   dict(weight_decay=0.1, decoupled_weight_decay=True),
                                   dict(maximize=True)])
def test_adams_one_pass_kernel_gives_the_numpy_paths_bits(monkeypatch, dtype, decay):
    """Where the backend has the Adam kernel (numba's, on NumPy arrays) a step is one
    pass; each of its operations is the NumPy path's, so the bits are too. A
    transposed parameter whose gradient comes in C order takes the NumPy path."""
    from einsumgrad.backends import NUMPY, kernels
    if not kernels.available():
        pytest.skip("numba is not installed: the NumPy path runs")
    rng = np.random.default_rng(0)
    inits = [rng.standard_normal(s).astype(dtype) for s in ((37, 5), (6,), ())]
    inits.append(rng.standard_normal((4, 3)).astype(dtype).T)  # not C order
    runs, calls = [], []
    real = NUMPY.adam
    for kernel in (True, False):
        ps = [eg.tensor(a.copy(), requires_grad=True) for a in inits]
        ps[-1].data = inits[-1].copy(order="K")
        opt = optim.Adam(ps, lr=1e-2, **decay)
        with monkeypatch.context() as m:
            m.setattr(NUMPY, "adam", (lambda p, *a, **k: calls.append((p.shape, real(p, *a, **k)))
                                      or calls[-1][1]) if kernel else None)
            for i in range(4):
                for p in ps:  # the last one's gradient in C order, its parameter's not
                    p.grad = eg.tensor((np.sin(p.data * (i + 1)) + p.data).copy(order="C"))
                opt.step()
        runs.append([p.data for p in ps])
    taken = {shape for shape, took in calls if took}
    assert {(37, 5), (6,)} <= taken and (3, 4) not in taken
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
