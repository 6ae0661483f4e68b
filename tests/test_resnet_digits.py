"""The residual CNN example (BatchNorm, ModuleList, AdamW, cosine schedule) learns the digits.

Marked ``slow``: it trains to an accuracy target, the same run
``python examples/resnet_digits.py`` prints (its time is the example's to print, not
the test's to hold: CI must pass on a busy machine).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")


@pytest.mark.slow
def test_resnet_learns_digits():
    import resnet_digits
    acc, seconds = resnet_digits.run(seed=0, progress=False)
    assert acc >= 0.98, (acc, seconds)
