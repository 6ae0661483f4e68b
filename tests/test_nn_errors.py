"""Clear errors (and torch's answers) where einsumgrad.nn used to guess or crash."""
import warnings

import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn
from einsumgrad.backends import backend_of
from einsumgrad.nn import functional as F

from backends import npy, xb


def on_backend(model: nn.Module) -> nn.Module:
    """Move a model's parameters onto the backend under test."""
    return model.to(backend_of(xb(np.zeros(1))))


def test_embedding_index_out_of_range_names_the_index_and_the_table():
    emb = on_backend(nn.Embedding(10, 4))
    for bad in (-1, -10, 10, 11):  # a negative id is not counted from the end
        ids = np.array([[0, 3], [bad, 9]])
        with pytest.raises(IndexError, match=rf"index {bad}\b.*10 rows"):
            emb(xb(ids))
        with pytest.raises(IndexError, match=rf"index {bad}\b"):
            F.embedding(xb(ids), emb.weight)
        with pytest.raises(IndexError):  # torch refuses it too
            torch.nn.Embedding(10, 4)(torch.tensor(ids))
    # Booleans would pick rows as a mask: refused, as torch refuses them.
    with pytest.raises(TypeError, match="integers"):
        emb(xb(np.ones(10, bool)))
    # In range, the rows as before, from an array or a list.
    assert np.array_equal(npy(emb(xb(np.array([9, 0])))), npy(emb.weight)[[9, 0]])
    assert np.array_equal(npy(F.embedding([9, 0], emb.weight)), npy(emb.weight)[[9, 0]])


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_probability_outside_0_1_raises_at_construction(p):
    if not np.isnan(p):  # torch lets NaN through (to NaN outputs); refused here too
        with pytest.raises(ValueError):
            torch.nn.Dropout(p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(xb(np.ones(3)), p)


def test_dropout_probability_0_and_1_still_work():
    x = xb(np.ones((4, 5)))
    assert np.array_equal(npy(nn.Dropout(0.0)(x)), np.ones((4, 5)))
    assert np.array_equal(npy(nn.Dropout(1)(x)), np.zeros((4, 5)))
    with pytest.raises(ValueError):  # fails before: only here are 0 and 1 checked at all
        nn.Dropout(1.0 + 1e-12)


def test_linear_with_no_inputs_is_torchs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero, no warning
        ours = on_backend(nn.Linear(0, 3))
        conv = nn.Conv2d(0, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "Initializing zero-element tensors is a no-op"
        theirs = torch.nn.Linear(0, 3).double()
    assert ours.weight.shape == tuple(theirs.weight.shape) == (3, 0)
    # torch's bias bound 1/sqrt(fan_in) is 0 with no inputs: zeros
    assert np.array_equal(npy(ours.bias), theirs.bias.detach().numpy())
    assert np.array_equal(npy(conv.bias), np.zeros(2))
    x = np.ones((2, 5, 0))
    xe, xt = eg.tensor(xb(x), requires_grad=True), torch.tensor(x, requires_grad=True)
    y, ty = ours(xe), theirs(xt)
    assert np.array_equal(npy(y), ty.detach().numpy()) and y.shape == (2, 5, 3)
    g = np.random.default_rng(0).standard_normal((2, 5, 3))
    y.backward(xb(g))
    ty.backward(torch.tensor(g))
    assert npy(xe.grad).shape == (2, 5, 0) and npy(ours.weight.grad).shape == (3, 0)
    np.testing.assert_allclose(npy(ours.bias.grad), theirs.bias.grad.numpy(), rtol=1e-15)


@pytest.mark.parametrize("data", [np.arange(3), np.array([True, False]), [1, 2], 3,
                                  np.int64(2)], ids=["int array", "bool", "int list", "int",
                                                     "numpy int"])
def test_parameter_of_integers_raises_as_tensor_does(data):
    message = "only floating-point tensors can require grad"
    with pytest.raises(TypeError, match=message):
        eg.tensor(data, requires_grad=True)
    with pytest.raises(TypeError, match=message):
        nn.Parameter(data)
    with pytest.raises(TypeError, match=message):
        nn.Parameter(eg.tensor(data))


def test_parameter_of_a_tensor_holds_its_array():
    t = eg.tensor(xb(np.ones(3)))
    p = nn.Parameter(t)
    assert p.requires_grad and p.data is t.data  # torch's Parameter shares the storage too
    assert nn.Parameter([1.0, 2.0]).dtype == np.float64
