"""per_sample_grad and per_sample_grad_norm against torch.func.vmap(torch.func.grad(...)),
float64: an MLP, an attention block, an embedding model, a CNN, shared and transformed
parameters; pytrees kept; BatchMixingError where f mixes examples; the norm patterns.

Inputs are built with ``xb`` and results read with ``npy``, so the suite runs on
each backend under test (``EINSUMGRAD_BACKEND=strict`` too).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import einsumgrad as eg
from backends import npy, xb
from einsumgrad.nn import functional as F
from einsumgrad.vmap import per_sample_grad, per_sample_grad_norm, vmap

torch = pytest.importorskip("torch")
tf = torch.func
TOL = dict(rtol=1e-9, atol=1e-10)
B = 5


def rand(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def as_eg(tree):
    return {k: eg.tensor(xb(v)) for k, v in tree.items()}


def as_torch(tree):
    return {k: torch.tensor(v) for k, v in tree.items()}


def check(f, ft, params, data, argnums=0):
    """per_sample_grad and per_sample_grad_norm of ``f`` against torch's per-example
    gradients of ``ft`` (which takes one example, a leading axis of 1)."""
    got = per_sample_grad(f, argnums)(as_eg(params), *[xb(d) for d in data])
    want = tf.vmap(tf.grad(ft), in_dims=(None,) + (0,) * len(data))(
        as_torch(params), *[torch.tensor(d) for d in data])
    assert sorted(got) == sorted(params)
    for k in params:
        assert npy(got[k]).shape == (B,) + params[k].shape
        np.testing.assert_allclose(npy(got[k]), want[k].numpy(), **TOL, err_msg=k)
    norms = per_sample_grad_norm(f, argnums)(as_eg(params), *[xb(d) for d in data])
    want_n = torch.sqrt(sum((v.reshape(B, -1) ** 2).sum(1) for v in want.values()))
    np.testing.assert_allclose(npy(norms), want_n.numpy(), **TOL)


def test_mlp(rng):
    p = {"w1": rand(rng, 7, 6, scale=0.4), "b1": rand(rng, 7), "w2": rand(rng, 7, 7, scale=0.4),
         "b2": rand(rng, 7), "w3": rand(rng, 3, 7), "b3": rand(rng, 3)}
    x, y = rand(rng, B, 6), rng.integers(0, 3, B)

    def f(p, x, y):
        h = eg.tanh(F.linear(x, p["w1"], p["b1"]))
        h = eg.tanh(F.linear(h, p["w2"], p["b2"]))
        return F.cross_entropy(F.linear(h, p["w3"], p["b3"]), y, reduction="none")

    def ft(p, x, y):
        h = torch.tanh(x @ p["w1"].T + p["b1"])
        h = torch.tanh(h @ p["w2"].T + p["b2"])
        return torch.nn.functional.cross_entropy((h @ p["w3"].T + p["b3"])[None], y[None])
    check(f, ft, p, [x, y])


def test_attention_block(rng):
    d, T, h = 8, 4, 2
    p = {"ln_w": 1 + rand(rng, d, scale=0.1), "ln_b": rand(rng, d, scale=0.1),
         "wqkv": rand(rng, 3, h, d // h, d, scale=0.3), "wo": rand(rng, d, h, d // h, scale=0.3),
         "w_out": rand(rng, 2, d, scale=0.3)}
    x, y = rand(rng, B, T, d), rand(rng, B, 2)

    def f(p, x, y):
        z = F.layer_norm(x, (d,), p["ln_w"], p["ln_b"])
        q, k, v = (eg.einsum("bte,hce->bhtc", z, p["wqkv"][i]) for i in range(3))
        a = eg.softmax(eg.einsum("bhtc,bhsc->bhts", q, k) / math.sqrt(d // h), axis=-1)
        o = eg.einsum("bhts,bhsc->bthc", a, v)
        r = x + eg.einsum("bthc,ehc->bte", o, p["wo"])
        out = eg.einsum("bte,pe->bp", eg.gelu(r), p["w_out"]) / T
        return ((out - y) ** 2).sum(axis=1)

    def ft(p, x, y):
        z = torch.nn.functional.layer_norm(x, (d,), p["ln_w"], p["ln_b"])
        q, k, v = (torch.einsum("bte,hce->bhtc", z, p["wqkv"][i]) for i in range(3))
        a = torch.softmax(torch.einsum("bhtc,bhsc->bhts", q, k) / math.sqrt(d // h), -1)
        o = torch.einsum("bhts,bhsc->bthc", a, v)
        r = x + torch.einsum("bthc,ehc->bte", o, p["wo"])
        out = torch.einsum("bte,pe->bp", torch.nn.functional.gelu(r), p["w_out"]) / T
        return ((out - y) ** 2).sum()
    check(f, lambda p, x, y: ft(p, x[None], y[None]), p, [x, y])


def test_embedding_model(rng):
    V, d, T = 9, 4, 6
    p = {"emb": rand(rng, V, d), "w": rand(rng, 3, d), "pos": rand(rng, T, d, scale=0.1)}
    ids, y = rng.integers(0, V, (B, T)), rng.integers(0, 3, B)
    ids[0, :3] = 2  # a repeated id: its rows add up in that example's gradient

    def f(p, ids, y):
        h = eg.tanh(F.embedding(ids, p["emb"]) + p["pos"]).mean(axis=1)
        return F.cross_entropy(F.linear(h, p["w"]), y, reduction="none")

    def ft(p, ids, y):
        h = torch.tanh(p["emb"][ids] + p["pos"]).mean(0)
        return torch.nn.functional.cross_entropy((h @ p["w"].T)[None], y[None])
    check(f, ft, p, [ids, y])


def test_cnn(rng):
    p = {"w": rand(rng, 3, 2, 3, 3, scale=0.3), "b": rand(rng, 3),
         "v": rand(rng, 4, 3 * 2 * 2, scale=0.3)}
    x, y = rand(rng, B, 2, 6, 6), rng.integers(0, 4, B)

    def f(p, x, y):
        h = eg.relu(F.conv2d(x, p["w"], p["b"], stride=1, padding=0))
        h = F.max_pool2d(h, 2)
        return F.cross_entropy(F.linear(h.reshape(B, -1), p["v"]), y, reduction="none")

    def ft(p, x, y):
        h = torch.relu(torch.nn.functional.conv2d(x[None], p["w"], p["b"]))
        h = torch.nn.functional.max_pool2d(h, 2)
        return torch.nn.functional.cross_entropy(h.reshape(1, -1) @ p["v"].T, y[None])
    check(f, ft, p, [x, y])


def test_shared_and_transformed_parameters(rng):
    # w used twice (tied) and through w.T and a scale before it meets the data:
    # the norms take the cross terms of its uses
    p = {"w": rand(rng, 4, 4, scale=0.5), "s": rand(rng, 4)}
    x = rand(rng, B, 3, 4)

    def f(p, x):
        h = eg.tanh(eg.einsum("bti,oi->bto", x, p["w"]))
        h = eg.einsum("bto,oi->bti", h, p["w"].T * 2.0) * p["s"]
        return (eg.sin(h) ** 2).sum(axis=(1, 2))

    def ft(p, x):
        h = torch.tanh(torch.einsum("ti,oi->to", x, p["w"]))
        h = torch.einsum("to,oi->ti", h, p["w"].T * 2.0) * p["s"]
        return (torch.sin(h) ** 2).sum()
    check(f, ft, p, [x])


def test_argnums_tuple_and_plain_tensors(rng):
    w, b = rand(rng, 3, 4), rand(rng, 3)
    x = rand(rng, B, 4)
    f = lambda w, b, x: eg.tanh(eg.einsum("bi,oi->bo", x, w) + b).sum(axis=1)  # noqa: E731
    gw, gb = per_sample_grad(f, argnums=(0, 1))(xb(w), xb(b), xb(x))
    tw, tb = tf.vmap(tf.grad(lambda w, b, x: torch.tanh(w @ x + b).sum(), argnums=(0, 1)),
                     in_dims=(None, None, 0))(torch.tensor(w), torch.tensor(b), torch.tensor(x))
    np.testing.assert_allclose(npy(gw), tw.numpy(), **TOL)
    np.testing.assert_allclose(npy(gb), tb.numpy(), **TOL)


def test_pytree_structure_is_kept(rng):
    p = {"layers": [(rand(rng, 3, 4), rand(rng, 3)), (rand(rng, 2, 3), None)]}
    x = rand(rng, B, 4)

    def f(p, x):
        (w1, b1), (w2, _) = p["layers"]
        return eg.einsum("bo,po->b", eg.tanh(eg.einsum("bi,oi->bo", x, w1) + b1), w2)
    pe = {"layers": [(xb(p["layers"][0][0]), xb(p["layers"][0][1])),
                     (xb(p["layers"][1][0]), None)]}
    g = per_sample_grad(f)(pe, xb(x))
    assert isinstance(g, dict) and isinstance(g["layers"], list)
    assert isinstance(g["layers"][0], tuple) and g["layers"][1][1] is None
    assert npy(g["layers"][1][0]).shape == (B, 2, 3)


@pytest.mark.parametrize("mix", [
    lambda x: x - x.mean(axis=0),                     # a mean over the batch
    lambda x: x[::-1],                                # examples reordered
    lambda x: eg.einsum("bi,ci->bc", x, x),           # examples paired
    lambda x: F.batch_norm(x, None, None, training=True),
])
def test_mixing_examples_raises(rng, mix):
    w, x = rand(rng, 3, 4), rand(rng, B, 4)
    f = lambda w, x: eg.einsum("bi,oi->bo", mix(x), w).sum(axis=1)  # noqa: E731
    if mix(eg.tensor(x)).shape[-1] != 4:
        f = lambda w, x: (mix(x) @ eg.ones((B, 3)) @ w).sum(axis=1)  # noqa: E731
    with pytest.raises(eg.BatchMixingError):
        per_sample_grad(f)(xb(w), xb(x))
    with pytest.raises(eg.BatchMixingError):
        per_sample_grad_norm(f)(xb(w), xb(x))


def test_output_must_be_one_value_per_example(rng):
    w, x = rand(rng, 3, 4), rand(rng, B, 4)
    with pytest.raises(ValueError, match="one value per example"):
        per_sample_grad(lambda w, x: eg.einsum("bi,oi->bo", x, w))(xb(w), xb(x))
    with pytest.raises(ValueError, match="axis 0"):
        per_sample_grad(lambda w, x, z: x.sum(axis=1))(xb(w), xb(x), xb(rand(rng, B + 1)))


def test_norm_pattern_of_a_sequence_layer_and_its_path(rng):
    W, x = rand(rng, 20, 20), rand(rng, 4, 3, 20)
    f = lambda W, x: (eg.tanh(eg.einsum("bti,oi->bto", x, W)) ** 2).sum(axis=(1, 2))  # noqa
    text = per_sample_grad_norm(f).explain(xb(W), xb(x))
    assert "meets the data in einsum 'bti,oi->bto' (operand 1)" in text
    assert "per-sample VJP 'bto,bti->boi'" in text
    line = next(l for l in text.splitlines() if "squared norm" in l)
    assert line.startswith("  squared norm: 'bto,bti,b") and line.endswith("->b'")
    # T = 3 against 20 x 20: the Gram matrices are cheaper than the (B, o, i) gradient
    cost = next(l for l in text.splitlines() if "largest intermediate" in l)
    largest = int(cost.split("largest intermediate ")[1].split(" elements")[0].replace(",", ""))
    assert largest < 4 * 20 * 20
    got = per_sample_grad_norm(f)(xb(W), xb(x))
    want = np.linalg.norm(npy(per_sample_grad(f)(xb(W), xb(x))).reshape(4, -1), axis=1)
    np.testing.assert_allclose(npy(got), want, **TOL)


def test_float32_follows_the_data(rng):
    w, x = rand(rng, 3, 4).astype(np.float32), rand(rng, B, 4).astype(np.float32)
    f = lambda w, x: eg.tanh(eg.einsum("bi,oi->bo", x, w)).sum(axis=1)  # noqa: E731
    g = per_sample_grad(f)(xb(w), xb(x))
    assert npy(g).dtype == np.float32
    n = per_sample_grad_norm(f)(xb(w), xb(x))
    np.testing.assert_allclose(npy(n), np.linalg.norm(npy(g).reshape(B, -1), axis=1), rtol=1e-5)


def check_in_vmap(f, ft, params, data, params_mapped):
    """vmap of per_sample_grad (and of its norms) over a leading axis of the data (and of
    the parameters, ``params_mapped``) against torch's vmap of its per-example gradients."""
    pa = None if not params_mapped else 0
    axes = (pa,) + (0,) * len(data)
    got = vmap(per_sample_grad(f), axes)(as_eg(params), *[xb(d) for d in data])
    inner = tf.vmap(tf.grad(ft), in_dims=(None,) + (0,) * len(data))
    want = tf.vmap(inner, in_dims=axes)(as_torch(params), *[torch.tensor(d) for d in data])
    lead = data[0].shape[:2]
    for k in params:
        shape = params[k].shape[1:] if params_mapped else params[k].shape
        assert npy(got[k]).shape == lead + shape
        np.testing.assert_allclose(npy(got[k]), want[k].numpy(), **TOL, err_msg=k)
    norms = vmap(per_sample_grad_norm(f), axes)(as_eg(params), *[xb(d) for d in data])
    want_n = torch.sqrt(sum((v.reshape(lead + (-1,)) ** 2).sum(-1) for v in want.values()))
    np.testing.assert_allclose(npy(norms), want_n.numpy(), **TOL)


@pytest.mark.parametrize("params_mapped", [False, True])
def test_inside_vmap_embedding_mlp(rng, params_mapped):
    # under an outer vmap the per-sample batch is an inner axis: gradients (V, B) + shape
    n = 3 if params_mapped else None
    lead = (n,) if n else ()
    p = {"E": rand(rng, *lead, 6, 4), "w": rand(rng, *lead, 3, 4), "b": rand(rng, *lead, 3)}
    x, ids, y = rand(rng, 3, B, 4), rng.integers(0, 6, (3, B, 2)), rng.integers(0, 3, (3, B))

    def f(p, x, ids, y):
        h = eg.tanh(F.linear(x + F.embedding(ids, p["E"]).sum(axis=1), p["w"], p["b"]))
        return F.cross_entropy(h, y, reduction="none")

    def ft(p, x, ids, y):
        h = torch.tanh((x + p["E"][ids].sum(0)) @ p["w"].T + p["b"])
        return torch.nn.functional.cross_entropy(h[None], y[None])
    check_in_vmap(f, ft, p, [x, ids, y], params_mapped)


def test_inside_vmap_cnn(rng):
    p = {"w": rand(rng, 3, 2, 3, 3, scale=0.3), "b": rand(rng, 3),
         "v": rand(rng, 4, 3 * 3 * 3, scale=0.3)}
    x, y = rand(rng, 2, B, 2, 6, 6), rng.integers(0, 4, (2, B))

    def f(p, x, y):
        h = eg.relu(F.conv2d(x, p["w"], p["b"], padding=1, stride=2))
        return F.cross_entropy(F.linear(h.reshape(B, -1), p["v"]), y, reduction="none")

    def ft(p, x, y):
        h = torch.relu(torch.nn.functional.conv2d(x[None], p["w"], p["b"], padding=1, stride=2))
        return torch.nn.functional.cross_entropy(h.reshape(1, -1) @ p["v"].T, y[None])
    check_in_vmap(f, ft, p, [x, y], False)


def test_inside_vmap_over_the_parameters_alone(rng):
    # an ensemble: the data (ids and labels too) shared, lifted to the mapped axis
    P = {"w": rand(rng, 2, 3, 4), "E": rand(rng, 2, 6, 4)}
    x, ids, y = rand(rng, B, 4), rng.integers(0, 6, (B, 2)), rng.integers(0, 3, B)

    def f(p, x, ids, y):
        h = x + F.embedding(ids, p["E"]).sum(axis=1)
        return F.cross_entropy(F.linear(h, p["w"]), y, reduction="none")
    got = vmap(per_sample_grad(f), (0, None, None, None))(as_eg(P), xb(x), xb(ids), xb(y))
    for v in range(2):
        one = per_sample_grad(f)(as_eg({k: a[v] for k, a in P.items()}), xb(x), xb(ids), xb(y))
        for k in P:
            np.testing.assert_allclose(npy(got[k])[v], npy(one[k]), **TOL, err_msg=k)


def test_inside_two_vmaps_and_mixing_raises_there(rng):
    w, x = rand(rng, 3, 4), rand(rng, 2, 3, B, 4)
    f = lambda w, x: (eg.tanh(eg.einsum("bi,oi->bo", x, w)) ** 2).sum(axis=1)  # noqa: E731
    got = vmap(vmap(per_sample_grad(f), (None, 0)), (None, 0))(xb(w), xb(x))
    want = np.stack([np.stack([npy(per_sample_grad(f)(xb(w), xb(x[i, j]))) for j in range(3)])
                     for i in range(2)])
    np.testing.assert_allclose(npy(got), want, **TOL)
    mixing = lambda w, x: f(w, x - x.mean(axis=0))  # noqa: E731
    with pytest.raises(eg.BatchMixingError):
        vmap(per_sample_grad(mixing), (None, 0))(xb(w), xb(x[0]))
    with pytest.raises(ValueError, match=r"one value per example, shape \(5,\), got \(5, 3\)"):
        vmap(per_sample_grad(lambda w, x: eg.einsum("bi,oi->bo", x, w)), (None, 0))(
            xb(w), xb(x[0]))


@pytest.mark.slow
def test_dp_sgd_digits_example_reaches_90_percent():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "dp_sgd_digits.py"),
                           "--no-progress", "--no-torch"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    acc = float(done.stdout.split("test accuracy ")[1].split("%")[0]) / 100
    assert acc >= 0.90, done.stdout
    assert "epsilon" in done.stdout
