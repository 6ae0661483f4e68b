"""Run the benchmarks: ``make bench`` or ``python bench/run.py [case ...]``.

Each ``bench/bench_*.py`` module has ``main()``, which times einsumgrad and
its peers (NumPy, PyTorch eager, torch.func, hand-written NumPy) in this one
run and prints medians and ratios. Name modules (``mlp``, ``seeds``, ...) to
run only those. The ratios are drawn into ``bench/latest.png`` (a run of named
modules: ``bench/latest-<names>.png``) where matplotlib is installed
(``einsumgrad[bench]``).

A benchmark measures as a user's machine runs: when ``OPENBLAS_CORETYPE`` or
``OPENBLAS_L2_SIZE`` is set (the test machine pins OpenBLAS's kernel with them),
the run starts itself again without them, before any BLAS is loaded, and its
header prints each side's BLAS, kernel and threads.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
PINNING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def native_blas_env() -> dict | None:
    """This process's environment without the OpenBLAS kernel settings, or None if none is set."""
    if not any(k in os.environ for k in PINNING):
        return None
    return {k: v for k, v in os.environ.items() if k not in PINNING}


def main(argv: list) -> None:
    from common import blas_header, keep_freed_memory
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(keep_freed_memory())
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    except ImportError:
        print("torch not installed: its columns are skipped")
    import numpy
    from einsumgrad.backends import kernels, mkl
    header = blas_header()
    print("\n".join(header))
    print(f"numpy {numpy.__version__}, cores {os.cpu_count()}; einsumgrad's NumPy backend: "
          + ("MKL GEMM and VML (einsumgrad[mkl]; EINSUMGRAD_MKL=0 turns it off), "
             "NumPy's own BLAS for the hand-written NumPy peers" if mkl.matmul is not None
             else "NumPy's own BLAS")
          + ("; numba row kernels (einsumgrad[jit]; EINSUMGRAD_JIT=0 turns them off)"
             if kernels.available() else "; no numba row kernels"))
    if mkl.matmul is not None:  # which GEMM the NumPy backend takes (measured per size class)
        short = {"numpy": "n", "mkl": "M", "openblas": "O", "openblas-small": "s"}
        print("matmul: the faster by measurement (einsumgrad.backends.mkl.blas_choices) of "
              "NumPy's (n), MKL's (M), NumPy's OpenBLAS on MKL's team (O) and that in "
              "blocks for its small-matrix kernels (s), by m*n*k "
              f"2^{min(mkl._BUCKETS)} to 2^{max(mkl._BUCKETS)}: "
              + "; ".join(f"{d} " + ", ".join(
                  f"{k} " + "".join(short[c] for _, c in sorted(v.items()))
                  for k, v in sorted(kinds.items()))
                          for d, kinds in mkl.blas_choices().items()))
        print("wide products (fewer rows than columns) written transposed where measured "
              "faster (einsumgrad.backends.mkl.transposed_choices), by m*n*k: "
              + "; ".join(f"{d} " + ", ".join(f"2^{b} {c}" for b, c in sorted(v.items()))
                          for d, v in mkl.transposed_choices().items()))
        print("element-wise ops: VML's (M) or NumPy's ufunc (n), the faster by measurement "
              "(einsumgrad.backends.mkl.vml_choices), by entries "
              f"2^{mkl._VML_BUCKETS[0]} to 2^{mkl._VML_BUCKETS[-1]}: "
              + "; ".join(f"{d} " + ", ".join(
                  f"{op} " + "".join("M" if c == "mkl" else "n" for _, c in sorted(v.items()))
                  for op, v in sorted(ops.items()))
                          for d, ops in mkl.vml_choices().items()))
    import common
    for n in names:
        common.SECTION = n.removeprefix("bench_")
        importlib.import_module(n).main()
    picture(argv, started, [line for line in header if line.startswith("NumPy:")])


def picture(argv: list, started: str, blas: list) -> None:
    """Draw this run's ratios (bench/plot.py) and say where the PNG went."""
    from common import OURS, RESULTS, TARGETS
    path = HERE / ("latest.png" if not argv else f"latest-{'-'.join(argv)}.png")
    from einsumgrad.backends.mkl import cpu_model
    title = (f"python bench/run.py {' '.join(argv)}".rstrip() + f", {started}; {cpu_model()}, "
             f"{os.cpu_count()} cores" + "".join(f"; {line}" for line in blas))
    try:
        import plot
        missed = plot.write_png(RESULTS, TARGETS, OURS, str(path), title)
    except ImportError:
        print("\nmatplotlib not installed (pip install einsumgrad[bench]): no picture")
        return
    print(f"\npicture: {path.relative_to(HERE.parent)} ({missed} target"
          f"{'s' * (missed != 1)} missed)")


if __name__ == "__main__":
    env = native_blas_env()
    if env is not None:  # OpenBLAS reads these once, at load: a fresh process is the only way
        print(f"bench: starting again without {', '.join(k for k in PINNING if k in os.environ)}",
              flush=True)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    main(sys.argv[1:])
