"""Seed 002 past one machine: per-point Jacobians of a point-wise MLP over 10^8 points.

``python examples/distributed_pointcloud.py`` computes the (B, N, 3, 3)
Jacobians of seed 002's MLP R^3 -> R^3 over 2 * 10^7 points (20 clouds of a
million) on a LocalCluster of two worker processes, writes them to a zarr
store block by block (nothing is gathered), and prints the throughput and
each worker's peak memory. ``--full`` does 10^8 points (7.2 GB of
Jacobians); ``--points N`` any multiple of the cloud size;
``--scheduler tcp://host:8786`` uses an existing cluster instead (the store
must then be a path every worker can write, or a URL zarr understands).

What runs where: this script (the client) traces ``mlp`` once on a sample of
two points (a function that mixes points raises ``eg.BatchMixingError`` here,
before anything is scheduled) and builds a lazy dask graph; the workers make
the random points themselves, run ``eg.batch_jacobian`` on their blocks of
points with NumPy, and each writes its blocks straight into the store. What
goes to a worker is the MLP (pickled by value from this script, weights
included), once, and the graph's small tasks.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

import einsumgrad as eg
import einsumgrad.distributed as egd

CLOUD = 10 ** 6      # points per cloud: x is (points // CLOUD, CLOUD, 3)
BLOCK = 500_000      # points per task: 12 MB of points, 36 MB of Jacobians

# seed 002's point-wise MLP, weights drawn as in examples/seeds/seed002_pointwise_jacobians.py
rng = np.random.default_rng(0)
H = 64
params = [(rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
          for i, o in ((3, H), (H, H), (H, 3))]


def mlp(p):  # point-wise: acts on the last axis only
    for n, (w, b) in enumerate(params):
        p = eg.einsum("...i,oi->...o", p, w) + b
        p = eg.tanh(p) if n < len(params) - 1 else p
    return p


def local_cluster(n_workers: int):
    """A LocalCluster of single-threaded worker processes with glibc's malloc as it is.

    dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins
    glibc's mmap threshold at 128 KiB: every temporary of a block is then
    mapped and page-faulted anew (measured on seed 002's blocks: 2.5x the
    system time, 1.3x the wall time). Without it, glibc reuses freed memory.
    """
    import dask
    from distributed import LocalCluster
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    dask.config.set({"distributed.nanny.pre-spawn-environ": env})  # restarted workers too
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=None)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=2 * 10 ** 7, help="a multiple of 10^6")
    ap.add_argument("--full", action="store_true", help="10^8 points (7.2 GB of Jacobians)")
    ap.add_argument("--scheduler", help="address of an existing cluster, e.g. tcp://host:8786")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers (one thread each)")
    ap.add_argument("--store", help="zarr store for J (default: a temporary folder, removed)")
    ap.add_argument("--chunk-size", type=int, help="points per pass inside a block "
                    "(batch_jacobian's chunk_size; default: its memory budget decides)")
    args = ap.parse_args(argv)
    points = 10 ** 8 if args.full else args.points
    clouds, per = (points // CLOUD, CLOUD) if points >= CLOUD else (1, points)
    if clouds * per != points:
        ap.error(f"--points must be a multiple of {CLOUD}")

    import dask.array as da
    from distributed import Client, progress

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        client = Client(local_cluster(args.workers))
    store = args.store or tempfile.mkdtemp(prefix="jacobians-", suffix=".zarr")
    try:
        n = len(client.scheduler_info()["workers"])
        print(f"{n} workers; {points:,} points as {clouds} clouds of {per:,}, "
              f"blocks of {min(BLOCK, per):,}")
        # the points are made on the workers, block by block, from one seed
        x = da.random.default_rng(0).standard_normal((clouds, per, 3),
                                                     chunks=(1, min(BLOCK, per), 3))
        J = egd.batch_jacobian(mlp, batch_ndim=2, chunk_size=args.chunk_size)(x)  # lazy
        print(f"J: {J.shape} float64, {J.nbytes / 1e9:.1f} GB, {J.npartitions} blocks -> {store}")
        t0 = time.perf_counter()
        done = client.compute(da.to_zarr(J, store, overwrite=True, compute=False))
        progress(done)
        done.result()
        seconds = time.perf_counter() - t0
        peaks = client.run(peak_rss_mb)
        print(f"\n{points:,} points in {seconds:.1f} s: {points / seconds / 1e6:.2f} M points/s")
        for w, mb in sorted(peaks.items()):
            print(f"  worker {w}: peak memory {mb:,.0f} MB")
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store)
                      for f in fs)
        print(f"store: {on_disk / 1e9:.2f} GB on disk")

        # a spot check against the NumPy call in this process
        import zarr
        k = min(1000, per)
        got = zarr.open_array(store, mode="r")[clouds - 1, :k]
        want = np.asarray(eg.batch_jacobian(mlp)(x[clouds - 1, :k].compute()))
        err = float(np.abs(got - want).max())
        print(f"last cloud's first {k} points against eg.batch_jacobian in one process: "
              f"max difference {err:.1e}")
        return {"seconds": seconds, "peaks_mb": peaks, "bytes": on_disk, "max_err": err}
    finally:
        client.close()
        if not args.store:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
