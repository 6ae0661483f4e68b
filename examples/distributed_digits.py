"""The digits MLP trained on two dask workers with ``einsumgrad.distributed.value_and_grad``.

``python examples/distributed_digits.py [--scheduler tcp://host:8786]``: the
64 -> 128 -> relu -> 10 MLP of ``examples/mlp_digits.py`` (same weights at
the start), trained by full-batch Adam on the 1347 training digits held by
the workers, then tested in this process against the single-process example.

What runs where: the training set goes to the workers once (``persist``), in
one block per worker. Each step, this process (the client) sends the
parameters and the per-sample loss function to every worker once
(``Client.scatter(broadcast=True)``); each worker computes the loss sum and
its gradient on its block with ``eg.value_and_grad``; the partial sums are
added on the cluster and only the gradient (the parameters' size) comes
back, where the optimizer steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import einsumgrad as eg  # noqa: E402
import einsumgrad.distributed as egd  # noqa: E402
from einsumgrad import optim  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402

import mlp_digits  # noqa: E402
from _common import accuracy, few_blas_threads, load_digits_split  # noqa: E402


def per_sample_loss(p: dict, x, y):
    """The MLP's cross-entropy for each sample, ``(B,)``, from its parameters ``p``."""
    h = eg.relu(F.linear(x, p["0.weight"], p["0.bias"]))
    return F.cross_entropy(F.linear(h, p["2.weight"], p["2.bias"]), y, reduction="none")


def run(client, steps: int = 100, lr: float = 1e-2, seed: int = 0,
        progress: bool = True) -> tuple:
    """Train on the workers; returns ``(test accuracy, training seconds)``."""
    import dask.array as da
    from tqdm import tqdm

    xtr, ytr, xte, yte = load_digits_split(seed)
    blocks = max(1, len(client.scheduler_info()["workers"]))
    rows = -(-len(xtr) // blocks)
    x = client.persist(da.from_array(xtr, chunks=(rows, xtr.shape[1])))  # to the workers, once
    y = client.persist(da.from_array(ytr, chunks=rows))
    model = mlp_digits.build_mlp(seed)
    opt = optim.Adam(model.parameters(), lr=lr)
    step = egd.value_and_grad(per_sample_loss)              # the mean over all 1347 digits
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="MLP on digits, 2 workers", disable=not progress, leave=False)
    for _ in bar:
        params = {k: p.data for k, p in model.named_parameters()}
        loss, grads = step(params, x, y)
        for k, p in model.named_parameters():
            p.grad = grads[k]
        opt.step()
        bar.set_postfix(loss=f"{float(loss):.4f}")
    return accuracy(model, xte, yte), time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheduler", help="address of an existing cluster, e.g. tcp://host:8786")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster
    client = Client(args.scheduler) if args.scheduler else \
        Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                            dashboard_address=None))
    try:
        with few_blas_threads():
            acc, seconds = run(client, steps=args.steps)
    finally:
        client.close()
    print(f"MLP on 8x8 digits, {args.steps} full-batch Adam steps on 2 dask workers: "
          f"test accuracy {acc:.2%}, trained in {seconds:.1f} s")
    single, single_s = mlp_digits.run(progress=False)
    print(f"examples/mlp_digits.py in one process (40 epochs of mini-batches of 32): "
          f"test accuracy {single:.2%}, trained in {single_s:.1f} s")
    return {"accuracy": acc, "single": single}


if __name__ == "__main__":
    main()
