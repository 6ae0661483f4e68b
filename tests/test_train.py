"""Models learn real data: digits (MLP, CNN) and sorting digit sequences (attention).

Marked ``slow``: each trains a model to an accuracy target, the same runs the
examples print (their times are the examples' to print, not a test's to hold: CI
must pass on a busy machine).
"""
import os
import sys

import numpy as np
import pytest

import einsumgrad as eg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")


@pytest.mark.slow
def test_mlp_learns_digits():
    import mlp_digits
    acc, seconds = mlp_digits.run(seed=0, progress=False)
    assert acc >= 0.96, (acc, seconds)


@pytest.mark.slow
def test_cnn_learns_digits():
    import cnn_digits
    acc, seconds = cnn_digits.run(seed=0, progress=False)
    assert acc >= 0.97, (acc, seconds)


@pytest.mark.slow
def test_transformer_learns_to_sort():
    import transformer_sort
    acc, seconds, model = transformer_sort.run(steps=1000, seed=0, progress=False)
    assert acc >= 0.99, (acc, seconds)
    # The example's printout: three sequences alone give the logits they get
    # inside a batch of 2000 (a batch of 3 once took another, broken, GEMM path).
    x, _ = transformer_sort.batch(np.random.default_rng(1), 2000)
    with eg.no_grad():
        alone, among = np.asarray(model(x[:3])), np.asarray(model(x))[:3]
    np.testing.assert_allclose(alone, among, rtol=1e-4, atol=1e-4)
