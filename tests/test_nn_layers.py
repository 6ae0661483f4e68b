"""Containers, activations, dtypes and a torch model with BatchNorm, ModuleList and grouped
convolutions whose state dict loads into the einsumgrad twin (float64, 1e-9)."""
import warnings

import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn
from einsumgrad.backends import backend_of
from einsumgrad.defaults import get_default_dtype, set_default_dtype

from backends import npy, xb

TOL = dict(rtol=1e-9, atol=1e-9)


def on_backend(model):
    return model.to(backend_of(xb(np.zeros(1))))


def load_from_torch(ours, theirs):
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    return on_backend(ours)


def compare_module(ours, theirs, x):
    """Values, input gradient and every parameter gradient against torch's."""
    xe, xt = eg.tensor(xb(x), requires_grad=True), torch.tensor(x, requires_grad=True)
    y, ty = ours(xe), theirs(xt)
    np.testing.assert_allclose(npy(y), ty.detach().numpy(), **TOL)
    g = np.random.default_rng(4).standard_normal(tuple(ty.shape))
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(npy(xe.grad), xt.grad.numpy(), **TOL)
    tp = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(npy(p.grad), tp[name].grad.numpy(), **TOL, err_msg=name)


@pytest.mark.parametrize("make", [
    lambda m: m.Identity(), lambda m: m.ReLU(), lambda m: m.Tanh(), lambda m: m.Sigmoid(),
    lambda m: m.GELU(), lambda m: m.GELU(approximate="tanh"), lambda m: m.Softmax(dim=1),
    lambda m: m.Softmax(dim=-1), lambda m: m.LogSoftmax(dim=0), lambda m: m.Flatten(),
    lambda m: m.Flatten(0, 1), lambda m: m.Flatten(start_dim=2)],
    ids=["Identity", "ReLU", "Tanh", "Sigmoid", "GELU", "GELU-tanh", "Softmax1", "Softmax-1",
         "LogSoftmax0", "Flatten", "Flatten01", "Flatten2"])
def test_activations_and_shape_layers_match_torch(rng, make):
    compare_module(make(nn), make(torch.nn), rng.standard_normal((3, 4, 2, 5)))


def test_softmax_without_dim_picks_torchs_axis_and_warns(rng):
    for shape in [(4,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]:
        x = rng.standard_normal(shape)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            ours = nn.Softmax()(xb(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = torch.nn.Softmax()(torch.tensor(x))
        np.testing.assert_allclose(npy(ours), theirs.numpy(), **TOL)


def test_module_list_and_dict_register_as_torch():
    def make(mod):
        class Net(mod.Module):
            def __init__(self):
                super().__init__()
                self.layers = mod.ModuleList([mod.Linear(3, 3) for _ in range(2)])
                self.layers.append(mod.Linear(3, 2))
                self.heads = mod.ModuleDict({"a": mod.Linear(2, 1), "c": mod.Linear(2, 2)})
                self.heads["b"] = mod.Linear(2, 4)
        return Net()
    ours, theirs = make(nn), make(torch.nn)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    layers = ours.layers
    assert len(layers) == 3 and isinstance(layers[1:], nn.ModuleList) and len(layers[-2:]) == 2
    assert [m.out_features for m in layers] == [3, 3, 2]
    assert list(ours.heads) == ["a", "c", "b"] and "b" in ours.heads
    assert ours.heads["c"].out_features == 2 and ours.heads.a.out_features == 1
    with pytest.raises(KeyError, match="already exists"):  # would hide the method, as torch
        ours.heads["keys"] = nn.Linear(2, 2)
    layers.insert(0, nn.Identity())
    assert [type(m).__name__ for m in layers] == ["Identity", "Linear", "Linear", "Linear"]
    del layers[0]
    assert [n for n, _ in layers.named_children()] == ["0", "1", "2"]
    ours.heads.pop("c")
    assert list(ours.heads.keys()) == ["a", "b"]
    with pytest.raises(IndexError):
        layers[3]
    ours.eval()
    assert not any(m.training for m in ours.modules())


def test_sequential_slices_iterates_and_appends(rng):
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert isinstance(seq[:2], nn.Sequential) and len(seq[:2]) == 2
    assert [type(m).__name__ for m in seq] == ["Linear", "ReLU", "Linear"]
    seq.append(nn.Tanh())
    assert len(seq) == 4 and [n for n, _ in seq.named_children()][-1] == "3"


def resnet_like(mod, **kw):
    """BatchNorm, a ModuleList of blocks, grouped and depthwise convolutions, a dilated one."""
    class Block(mod.Module):
        def __init__(self, c, groups):
            super().__init__()
            self.conv = mod.Conv2d(c, c, 3, padding="same", groups=groups, bias=False, **kw)
            self.bn = mod.BatchNorm2d(c, **kw)
            self.act = mod.ReLU()

        def forward(self, x):
            return self.act(x + self.bn(self.conv(x)))

    class Net(mod.Module):
        def __init__(self):
            super().__init__()
            self.stem = mod.Sequential(mod.Conv2d(2, 8, 3, padding=1, **kw),
                                       mod.BatchNorm2d(8, **kw), mod.ReLU())
            self.blocks = mod.ModuleList([Block(8, 2), Block(8, 8), Block(8, 4)])
            self.down = mod.Conv2d(8, 12, 2, stride=2, dilation=2, groups=4, **kw)
            self.seq = mod.Conv1d(12, 6, 3, padding=1, groups=3, **kw)
            self.bn1d = mod.BatchNorm1d(6, **kw)
            self.head = mod.Linear(6, 5, **kw)

        def forward(self, x):
            x = self.stem(x)
            for b in self.blocks:
                x = b(x)
            x = self.down(x)
            x = self.bn1d(self.seq(x.flatten(2)))
            return self.head(x.mean(dim=2))
    return Net()


def test_torch_model_with_batch_norm_and_grouped_convs_loads_and_gives_the_same_logits(rng):
    torch.manual_seed(0)
    theirs = resnet_like(torch.nn).double()
    theirs.train()
    with torch.no_grad():  # running statistics worth loading: a few training batches
        for _ in range(3):
            theirs(torch.tensor(rng.standard_normal((6, 2, 9, 9)) * 2 + 0.5))
    theirs.eval()
    ours = load_from_torch(resnet_like(nn), theirs)
    ours.eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "blocks.1.bn.num_batches_tracked" in ours.state_dict()
    x = rng.standard_normal((4, 2, 9, 9))
    compare_module(ours, theirs, x)
    # ... and training mode from there on, statistics included.
    ours.train()
    theirs.train()
    compare_module(ours, theirs, x)
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=k)


def test_dtype_on_every_layer_and_the_default_dtype():
    assert get_default_dtype() == np.float64
    layers = lambda **kw: [  # noqa: E731
        nn.Linear(2, 3, **kw), nn.Conv1d(2, 2, 3, **kw), nn.Conv2d(2, 2, 3, **kw),
        nn.BatchNorm1d(2, **kw), nn.BatchNorm2d(2, **kw), nn.LayerNorm(2, **kw),
        nn.Embedding(4, 2, **kw), nn.MultiHeadAttention(4, 2, **kw)]
    for m in layers(dtype=np.float32):
        assert {p.dtype for p in m.parameters()} == {np.dtype(np.float32)}, m
    set_default_dtype(np.float32)
    try:
        assert get_default_dtype() == np.float32
        for m in layers():
            assert {p.dtype for p in m.parameters()} == {np.dtype(np.float32)}, m
            assert all(b.dtype in (np.float32, np.int64) for b in m.buffers())
        assert nn.Linear(2, 2, dtype="float64").weight.dtype == np.float64
    finally:
        set_default_dtype(np.float64)
    with pytest.raises(TypeError):
        set_default_dtype(np.int32)


def test_module_to_float_double(rng):
    m = on_backend(resnet_like(nn))
    m.to(np.float32)
    assert {t.dtype for t in m.parameters()} == {np.dtype(np.float32)}
    assert {t.dtype for t in m.buffers()} == {np.dtype(np.float32), np.dtype(np.int64)}
    x = xb(rng.standard_normal((2, 2, 9, 9)).astype(np.float32))
    m.eval()
    assert m(x).dtype == np.float32
    m.double()
    assert {t.dtype for t in m.parameters()} == {np.dtype(np.float64)}
    assert m(x).dtype == np.float64  # a float32 input to float64 layers: NumPy's promotion
    m.float()
    assert m.to(dtype="float64") is m and m.head.weight.dtype == np.float64
    with pytest.raises(TypeError):
        m.to(np.int32)
