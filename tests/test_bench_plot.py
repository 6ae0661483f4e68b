"""bench/plot.py: the run's ratios as bars, targets marked (no timing here)."""
import importlib.util
import pathlib

import pytest

# Loaded from its file, bench/ kept off sys.path: bench/distributed.py would
# shadow dask's distributed for every test after this one.
_spec = importlib.util.spec_from_file_location(
    "bench_plot", pathlib.Path(__file__).resolve().parents[1] / "bench" / "plot.py")
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)

RESULTS = [("seed 000, B = 16", "einsumgrad jit", 3e-5), ("seed 000, B = 16", "JAX jit", 2e-5),
           ("seed 000, B = 16", "torch", 1.2e-3), ("seed 000, B = 16", "skipped peer", 0.0),
           ("MLP step", "ours", 8e-3), ("MLP step", "torch", 1e-2),
           ("no peer", "ours", 1.0)]
TARGETS = [("seed 000, B = 16", "JAX jit", 1.0), ("seed 000, B = 16", "torch", 0.1),
           ("MLP step", "torch", 0.7)]
OURS = {"seed 000, B = 16": "einsumgrad jit", "MLP step": "ours", "no peer": "ours"}


def test_ratios_are_ours_over_each_peer_with_its_target():
    rows = plot.ratios(RESULTS, TARGETS, OURS)
    assert [case for case, _ in rows] == ["seed 000, B = 16", "MLP step"]
    assert rows[0][1] == [("JAX jit", pytest.approx(1.5), 1.0), ("torch", pytest.approx(0.025), 0.1)]
    assert rows[1][1] == [("torch", pytest.approx(0.8), 0.7)]


def test_png_written_and_missed_targets_counted(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert plot.write_png(RESULTS, TARGETS, OURS, str(path), title="fake run") == 2
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.write_png(RESULTS, [], OURS, str(path)) == 0
