"""The seed scripts run (checking against the users' PyTorch code when torch is
installed) and reproduce the numbers of the posts."""
import pathlib
import runpy
import sys

import numpy as np
import pytest

SEEDS = pathlib.Path(__file__).resolve().parent.parent / "examples" / "seeds"


@pytest.fixture
def seed(monkeypatch, capsys):
    """Load one seed script, run its main(), return (results, printed text)."""
    monkeypatch.syspath_prepend(str(SEEDS))

    def run(prefix: str):
        (path,) = SEEDS.glob(f"{prefix}_*.py")
        results = runpy.run_path(str(path))["main"]()
        return results, capsys.readouterr().out
    yield run
    sys.modules.pop("_timing", None)


def test_seed000_result_without_building_h(seed):
    r, out = seed("seed000")
    np.testing.assert_allclose(r["result"], [[288, 450, 648], [1152, 1800, 2592]])
    assert r["H"].shape == (2, 3, 3, 3) and r["J"].shape == (2, 3, 3)
    assert "ms" in out


def test_seed001_batched_jacobian(seed):
    r, out = seed("seed001")
    assert r["J"].shape == (64, 10, 784)
    assert "einsum('bc,bcd->bd', u, J)" in out


def test_seed002_pointwise_jacobians_and_error(seed):
    r, _ = seed("seed002")
    assert r["J"].shape == (4, 256, 3, 3)
    assert "sums over the batch index" in r["error"]


def test_seed003_patterns_printed(seed):
    r, out = seed("seed003")
    assert r["patterns"]["ij,jk->ik"] == "jk->ik|ij"
    assert r["J"].shape == (5, 3, 9, 5, 3, 8)
    assert "jk->ik|ij" in out


def test_seed004_meshgrid_partials(seed):
    r, out = seed("seed004")
    np.testing.assert_array_equal(r["dfdk"], [[9, 13], [18, 26], [36, 52]])
    np.testing.assert_array_equal(r["dfdt"], [[10, 21]] * 3)
    assert "[[ 9. 13.]\n [18. 26.]\n [36. 52.]]" in out
