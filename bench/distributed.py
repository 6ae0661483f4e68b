"""Seed 002 on 10^7 points: one process against a 2-worker LocalCluster.

``python bench/distributed.py [--points N]`` (standalone: ``make bench`` does
not run it; it needs ``einsumgrad[distributed]``). Prints, for each way of
computing the (B, N, 3, 3) per-point Jacobians of seed 002's MLP, the wall
time, the throughput and each process's peak resident memory:

* one process, ``eg.batch_jacobian`` on a NumPy array, the result in memory
  (run in a child process, so its peak is its own), with the BLAS / MKL
  threads it gets by default and again limited to one;
* a LocalCluster of two single-threaded worker processes (glibc's malloc
  left as it is: ``local_cluster`` in the example), the points made on
  the workers and the result written to a zarr store block by block (in a
  temporary folder), as ``examples/distributed_pointcloud.py`` does; and the
  same with each block summed on its worker instead of stored (the compute
  alone).

Peaks are the processes' own ``ru_maxrss``, imports included. The cluster's
time counts from the first task to the last block stored, without the
cluster's start (printed apart). CPU seconds (user + system, all processes'
threads, the workers' added up) say what the work cost whatever else runs on
the machine: on a shared machine the wall times move with its load.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
if sys.path and pathlib.Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # run as a script: this file's name would hide dask's ``distributed``
sys.path.insert(0, str(HERE.parent / "examples"))

CLOUD = 10 ** 6
BLOCK = 500_000


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, every thread."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_process(points: int) -> dict:
    """In this (child) process: the whole batch with eg.batch_jacobian, result in memory."""
    import resource

    import numpy as np

    import einsumgrad as eg
    from distributed_pointcloud import mlp
    x = np.random.default_rng(0).standard_normal((points // CLOUD, CLOUD, 3))
    t0, c0 = time.perf_counter(), cpu_seconds()
    J = eg.batch_jacobian(mlp, batch_ndim=2)(x)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert J.shape == x.shape + (3,)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"seconds": seconds, "cpu": cpu, "peak_mb": peak_mb}


def run_child(points: int, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                              "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")})
    out = subprocess.run([sys.executable, __file__, "--child", str(points)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def on_cluster(points: int, workers: int) -> dict:
    import cloudpickle
    import dask.array as da
    from distributed import Client

    import distributed_pointcloud
    import einsumgrad.distributed as egd
    from distributed_pointcloud import local_cluster, mlp, peak_rss_mb
    cloudpickle.register_pickle_by_value(distributed_pointcloud)  # workers need not import it

    t0 = time.perf_counter()
    cluster = local_cluster(workers)  # without dask's MALLOC_TRIM_THRESHOLD_: see there
    client = Client(cluster)
    start = time.perf_counter() - t0
    store = tempfile.mkdtemp(prefix="bench-jacobians-", suffix=".zarr")
    try:
        x = da.random.default_rng(0).standard_normal((points // CLOUD, CLOUD, 3),
                                                     chunks=(1, BLOCK, 3))
        J = egd.batch_jacobian(mlp, batch_ndim=2)(x)

        def timed(work) -> tuple:
            c0, t0 = client.run(cpu_seconds), time.perf_counter()
            client.compute(work).result()
            seconds, c1 = time.perf_counter() - t0, client.run(cpu_seconds)
            return seconds, sum(c1[w] - c0[w] for w in c1)
        seconds, cpu = timed(da.to_zarr(J, store, overwrite=True, compute=False))
        peaks = client.run(peak_rss_mb)
        summed, summed_cpu = timed(J.sum())
        return {"seconds": seconds, "cpu": cpu, "start": start, "peaks_mb": peaks,
                "summed": summed, "summed_cpu": summed_cpu}
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=10 ** 7, help="a multiple of 10^6")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child)))
        return
    n = args.points
    if n % CLOUD:
        ap.error(f"--points must be a multiple of {CLOUD}")
    gb = n * 9 * 8 / 1e9
    print(f"seed 002: (B, N, 3, 3) Jacobians of a 3-64-64-3 tanh MLP, {n:,} points "
          f"({gb:.2f} GB of float64 Jacobians), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    rows = []
    for label, threads in (("one process, default threads", None),
                           ("one process, 1 thread", 1)):
        r = run_child(n, threads)
        rows.append(r["seconds"])
        print(f"{label:<36} {r['seconds']:6.1f} s  {n / r['seconds'] / 1e6:5.2f} M points/s  "
              f"CPU {r['cpu']:5.1f} s  peak {r['peak_mb']:,.0f} MB (J in memory)")
    r = on_cluster(n, args.workers)
    peaks = ", ".join(f"{mb:,.0f} MB" for _, mb in sorted(r["peaks_mb"].items()))
    print(f"{f'LocalCluster, {args.workers} workers x 1 thread':<36} {r['seconds']:6.1f} s  "
          f"{n / r['seconds'] / 1e6:5.2f} M points/s  CPU {r['cpu']:5.1f} s  "
          f"peak per worker {peaks} (J to zarr); cluster start {r['start']:.1f} s")
    print(f"{'the same, blocks summed, not stored':<36} {r['summed']:6.1f} s  "
          f"{n / r['summed'] / 1e6:5.2f} M points/s  CPU {r['summed_cpu']:5.1f} s")
    print(f"cluster / one process: {r['seconds'] / rows[0]:.2f}x the time (default threads), "
          f"{r['seconds'] / rows[1]:.2f}x (1 thread); load average {os.getloadavg()[0]:.1f} "
          f"at the end")


if __name__ == "__main__":
    main()
