"""Module.load_state_dict: all or nothing, torch tensors and tied parameters, as torch."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad import nn
from einsumgrad.backends import backend_of

from backends import npy, xb


def on_backend(model: nn.Module) -> nn.Module:
    """Move a model's parameters onto the backend under test."""
    return model.to(backend_of(xb(np.zeros(1))))


def make(mod=nn):
    """Linear, LayerNorm, Linear: torch's modules or ours, with the same names."""
    return mod.Sequential(mod.Linear(3, 4), mod.LayerNorm(4), mod.Linear(4, 2))


def snapshot(model: nn.Module) -> dict:
    """Each parameter's values (a host copy) and version counter."""
    return {n: (npy(p).copy(), p.version) for n, p in model.named_parameters()}


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for n, (values, version) in before.items():
        assert np.array_equal(after[n][0], values) and after[n][1] == version, n


def test_one_error_names_every_bad_key_and_loads_nothing():
    model = on_backend(make())
    before = snapshot(model)
    good = model.state_dict()
    state = dict(good)
    # The first parameters fine (loaded first before), then one of each problem.
    state["1.weight"] = np.ones(4, bool)                       # bool into float64
    state["1.bias"] = np.array(["a", "b", "c", "d"])           # text
    state["2.weight"] = good["2.weight"].tolist()              # a list, not an array
    state["2.bias"] = np.ones(3)                               # wrong shape
    del state["0.bias"]                                        # missing
    state["3.weight"] = np.ones(2)                             # no such parameter
    with pytest.raises(KeyError) as info:  # as a missing key raised before
        model.load_state_dict(state)
    msg = str(info.value)
    for key, why in [("0.bias", "missing"), ("3.weight", "unexpected"), ("1.weight", "bool"),
                     ("1.bias", "<U1"), ("2.weight", "list"), ("2.bias", "(3,)")]:
        line = next((s for s in msg.splitlines() if f"'{key}'" in s), "")
        assert why in line, (key, why, msg)
    # One error for every kind, caught as each kind and as torch's RuntimeError.
    assert all(isinstance(info.value, t) for t in (ValueError, TypeError, RuntimeError))
    assert_untouched(model, before)


@pytest.mark.parametrize("value,kind", [
    ([[0.0] * 3] * 4, TypeError),              # torch loads tensors, not lists
    (None, TypeError),
    (1.5, TypeError),
    (np.ones((4, 3), complex), TypeError),     # the imaginary part would be dropped
    (np.ones((4, 3), object), TypeError),
    (np.ones((4, 3), bool), TypeError),
    (np.ones((3, 4)), ValueError),             # transposed
])
def test_a_bad_value_names_its_key_and_leaves_the_model(value, kind):
    model = on_backend(make())
    before = snapshot(model)
    state = model.state_dict()
    state["0.bias"] = state["0.bias"] + 1       # a good change, before the bad key
    state["2.weight"] = state["2.weight"] + 1
    state["0.weight"] = value
    with pytest.raises(kind, match=r"'0\.weight'") as info:
        model.load_state_dict(state, strict=False)  # values are checked strict or not
    assert "0.bias" not in str(info.value) and "2.weight" not in str(info.value)
    assert_untouched(model, before)


def test_torch_tensors_load_and_cast_as_torch():
    torch.manual_seed(0)
    theirs = make(torch.nn)                              # float32, parameters require grad
    ours = on_backend(make())                            # float64
    state = dict(theirs.named_parameters())              # torch tensors that require grad
    state["1.bias"] = torch.arange(4)                    # int64 into a float parameter
    state["2.bias"] = torch.tensor([0.1, 3.0]).bfloat16()  # a dtype NumPy lacks
    ours.load_state_dict(state)
    reference = make(torch.nn).double()                  # torch's copy_ casts the same way
    reference.load_state_dict(state)
    for name, p in ours.named_parameters():
        want = reference.state_dict()[name].numpy()
        assert p.dtype == np.float64 and np.array_equal(npy(p), want), name
    # float64 values into float32 parameters: rounded, as torch's
    ours32 = on_backend(make().to(dtype=np.float32))
    ours32.load_state_dict(reference.state_dict())
    theirs.load_state_dict(reference.state_dict())
    for name, p in ours32.named_parameters():
        assert p.dtype == np.float32
        assert np.array_equal(npy(p), theirs.state_dict()[name].numpy()), name
    # einsumgrad Tensors load too
    ours.load_state_dict({n: eg.tensor(npy(p) * 2) for n, p in ours32.named_parameters()})
    for name, p in ours.named_parameters():
        assert np.array_equal(npy(p), npy(ours32.state_dict()[name]).astype(np.float64) * 2)


def tied(mod):
    """An embedding whose table is also the output projection (a language model's tie)."""
    m = mod.Sequential(mod.Embedding(5, 3), mod.Linear(3, 5, bias=False))
    m[1].weight = m[0].weight
    return m


def test_tied_parameters_load_from_a_torch_state_dict():
    torch.manual_seed(1)
    theirs, ours = tied(torch.nn).double(), on_backend(tied(nn))
    state = theirs.state_dict()
    assert list(state) == ["0.weight", "1.weight"]       # both names, one tensor
    ours.load_state_dict(state)
    assert ours[1].weight is ours[0].weight
    assert np.array_equal(npy(ours[0].weight), state["0.weight"].numpy())
    assert list(ours.state_dict()) == list(state)        # written back under both, as torch
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    # Either name alone loads it; two names with different values are refused.
    ours.load_state_dict({"1.weight": state["1.weight"] * 3})
    assert np.array_equal(npy(ours[0].weight), state["0.weight"].numpy() * 3)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"'1\.weight'.*'0\.weight'.*differ"):
        ours.load_state_dict({"0.weight": state["0.weight"], "1.weight": state["0.weight"] + 1})
    assert_untouched(ours, before)


def test_load_moves_the_version_counter_of_what_it_changed():
    model = on_backend(make())
    versions = {n: p.version for n, p in model.named_parameters()}
    state = model.state_dict()
    model.load_state_dict({"0.weight": state["0.weight"]}, strict=False)
    for n, p in model.named_parameters():
        assert p.version == versions[n] + (n == "0.weight"), n
