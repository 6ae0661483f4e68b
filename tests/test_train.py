"""Models learn real data: digits (MLP, CNN) and sorting digit sequences (attention).

Marked ``slow``: each trains a model to an accuracy target within a time budget,
the same runs the examples print.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")


@pytest.mark.slow
def test_mlp_learns_digits():
    import mlp_digits
    acc, seconds = mlp_digits.run(seed=0, progress=False)
    assert acc >= 0.96 and seconds < 60, (acc, seconds)


@pytest.mark.slow
def test_cnn_learns_digits():
    import cnn_digits
    acc, seconds = cnn_digits.run(seed=0, progress=False)
    assert acc >= 0.97 and seconds < 60, (acc, seconds)


@pytest.mark.slow
def test_transformer_learns_to_sort():
    import transformer_sort
    acc, seconds, _ = transformer_sort.run(steps=1000, seed=0, progress=False)
    assert acc >= 0.99 and seconds < 180, (acc, seconds)
