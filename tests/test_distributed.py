"""einsumgrad.distributed on a LocalCluster of two worker processes.

Every result is checked against the NumPy call on the whole array (float64,
1e-12); the blocks are uneven, and feature axes arrive split in chunks too.
One cluster serves the whole module.
"""
import concurrent.futures
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

import cloudpickle  # noqa: E402 (dask's dependency)

import einsumgrad as eg  # noqa: E402
from einsumgrad import distributed as egd  # noqa: E402
from einsumgrad import transforms  # noqa: E402
from einsumgrad.pytree import flatten  # noqa: E402

# The worker processes cannot import this file: its functions go to them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

rng = np.random.default_rng(0)
W1, B1 = rng.standard_normal((3, 8)) / 2, rng.standard_normal(8) / 4
W2 = rng.standard_normal((8, 2)) / 2


def mlp(x):
    """Row-wise R^3 -> R^2."""
    return eg.tanh(eg.tanh(x @ W1 + B1) @ W2)


def slow_mlp(x):
    time.sleep(0.25)  # long enough blocks for a worker to die among them
    return mlp(x)


def dask_of(x, chunks):
    return da.from_array(x, chunks=chunks)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def scheduler_quiet(client) -> int:
    """Wait for the scheduler to forget earlier tests' tasks; its transition count then."""
    def state(dask_scheduler):
        return len(dask_scheduler.tasks), dask_scheduler.transition_counter
    for _ in range(100):
        n, count = client.run_on_scheduler(state)
        if n == 0:
            return count
        time.sleep(0.05)
    raise AssertionError(f"the scheduler still holds {n} tasks")


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


# -- 1. the batch transforms on dask arrays equal the NumPy calls ---------------------

def cases():
    x = rng.standard_normal((11, 3))
    xd = dask_of(x, ((3, 5, 2, 1), (2, 1)))       # uneven rows, split features
    x3 = rng.standard_normal((4, 7, 3))
    x3d = dask_of(x3, ((1, 3), (4, 3), 3))        # seed 002's (B, N, 3), both axes chunked
    v = rng.standard_normal((11, 3))
    vd = dask_of(v, ((6, 5), 3))                  # chunked differently from x: aligned
    T, K = np.meshgrid(np.linspace(1, 2, 6), np.linspace(-1, 1, 5), indexing="ij")
    grid = lambda a: dask_of(a, ((2, 4), (3, 2)))
    pair = lambda x, y: (mlp(x) * y[:, :2], eg.sin(y))   # two arguments, two outputs
    seed004 = lambda t, k: t * k + 2 * t * k ** 2
    return [
        ("batch_jacobian", (mlp,), {}, (x,), (xd,)),
        ("batch_jacobian", (mlp,), {"batch_ndim": 2}, (x3,), (x3d,)),
        ("batch_jacobian", (pair,), {"argnums": (0, 1)}, (x, v), (xd, vd)),
        ("batch_hessian", (mlp,), {}, (x,), (xd,)),
        ("batch_hessian", (mlp,), {"batch_ndim": 2}, (x3,), (x3d,)),
        ("directional", (mlp, 2), {}, (x, v), (xd, vd)),
        ("directional", (mlp, 3), {}, (x, x), (xd, xd)),
        ("elementwise_grad", (seed004,), {"argnums": (0, 1)}, (T, K), (grid(T), grid(K))),
    ]


@pytest.mark.parametrize("name,targs,tkwargs,arrays,dasks", cases(),
                         ids=lambda c: c if isinstance(c, str) else "")
def test_batch_transforms_on_dask_equal_numpy(client, name, targs, tkwargs, arrays, dasks):
    want = getattr(eg, name)(*targs, **tkwargs)(*arrays)
    got = getattr(egd, name)(*targs, **tkwargs)(*dasks)
    (want_leaves, _), (got_leaves, _) = flatten(want), flatten(got)
    assert len(got_leaves) == len(want_leaves)
    assert type(got) is type(want) if isinstance(want, tuple) else isinstance(got, da.Array)
    assert all(isinstance(g, da.Array) for g in got_leaves)         # lazy
    for g, w, c in zip(got_leaves, want_leaves, client.compute(got_leaves, sync=True)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if len(dasks) == 1:  # several batched arrays: blockwise aligns their chunks
            assert g.chunks[0] == dasks[0].chunks[0]
        close(c, w)


@pytest.mark.skipif(not hasattr(transforms, "on_blocks"),
                    reason="the one-line hooks in einsumgrad/transforms.py are not in yet")
def test_the_transforms_themselves_take_dask_arrays(client):
    x = rng.standard_normal((9, 3))
    xd = dask_of(x, ((4, 5), 3))
    for got, want in [(eg.batch_jacobian(mlp)(xd), eg.batch_jacobian(mlp)(x)),
                      (eg.batch_hessian(mlp)(xd), eg.batch_hessian(mlp)(x)),
                      (eg.directional(mlp, 2)(xd, xd), eg.directional(mlp, 2)(x, x)),
                      (eg.elementwise_grad(eg.sin)(xd), eg.elementwise_grad(eg.sin)(x))]:
        assert isinstance(got, da.Array)
        close(client.compute(got, sync=True), want)


def test_vmap_and_per_sample_grad_take_dask_arrays(client):
    x = rng.standard_normal((9, 3))
    xd = dask_of(x, ((4, 5), 3))
    row = lambda v: eg.tanh(v * 2.0).sum()  # noqa: E731  written for one example
    got = eg.vmap(eg.grad(row))(xd)
    assert isinstance(got, da.Array)
    close(client.compute(got, sync=True), eg.vmap(eg.grad(row))(x))
    w = rng.standard_normal((3, 2))
    per = lambda w, x: eg.tanh(x @ w).sum(axis=1)  # noqa: E731
    got = eg.per_sample_grad(per)(w, xd)
    assert isinstance(got, da.Array)
    close(client.compute(got, sync=True), eg.per_sample_grad(per)(w, x))


def test_results_go_to_zarr_blockwise(client, tmp_path):
    x = rng.standard_normal((4, 50, 3))
    J = egd.batch_jacobian(mlp, batch_ndim=2)(dask_of(x, (1, 25, 3)))
    client.compute(da.to_zarr(J, str(tmp_path / "J.zarr"), compute=False), sync=True)
    close(zarr.open_array(str(tmp_path / "J.zarr"), mode="r")[...],
          eg.batch_jacobian(mlp, batch_ndim=2)(x))


# -- 2. a mixing f raises before anything is scheduled --------------------------------

def test_mixing_raises_with_nothing_scheduled(client):
    x = dask_of(rng.standard_normal((10, 3)), 4)
    y = dask_of(rng.standard_normal((10, 2)), 4)
    centred = lambda x: mlp(x - x.mean(axis=0))
    before = scheduler_quiet(client)
    with pytest.raises(eg.BatchMixingError):
        egd.batch_jacobian(centred)(x)
    with pytest.raises(eg.BatchMixingError):
        egd.batch_hessian(centred)(x)
    with pytest.raises(eg.BatchMixingError):
        egd.directional(centred, 2)(x, x)
    with pytest.raises(eg.BatchMixingError):
        egd.elementwise_grad(lambda a: a[::-1] * a)(x)
    with pytest.raises(eg.BatchMixingError):   # a batch norm: each loss reads every row
        egd.value_and_grad(lambda W, x, y: ((centred(x) @ W - y) ** 2).sum(axis=1))(
            np.eye(2), x, y)
    assert scheduler_quiet(client) == before and not client.futures


# -- 3. value_and_grad equals eg.value_and_grad of the mean and of the sum ------------

def loss(params, x, onehot):
    """Per-sample cross-entropy of a one-layer softmax model."""
    logits = x @ params["w"] + params["b"]
    return -(eg.log_softmax(logits, axis=1) * onehot).sum(axis=1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_grad_equals_the_whole_batch(client, reduction):
    n = 37
    params = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4)}
    x, onehot = rng.standard_normal((n, 5)), np.eye(4)[rng.integers(0, 4, n)]
    whole = (lambda p, x, y: loss(p, x, y).mean()) if reduction == "mean" else \
        (lambda p, x, y: loss(p, x, y).sum())
    want_l, want_g = eg.value_and_grad(whole)(params, x, onehot)
    xd, yd = dask_of(x, ((10, 10, 10, 7), 5)), dask_of(onehot, ((20, 17), 4))
    got_l, got_g = egd.value_and_grad(loss, reduction=reduction, split_every=2)(params, xd, yd)
    assert isinstance(got_l, eg.Tensor) and sorted(got_g) == ["b", "w"]
    close(got_l, want_l)
    for k in params:
        close(got_g[k], want_g[k])


def test_value_and_grad_tuple_argnums(client):
    w, b = rng.standard_normal((5, 4)), rng.standard_normal(4)
    x, onehot = rng.standard_normal((12, 5)), np.eye(4)[rng.integers(0, 4, 12)]
    f = lambda x, w, onehot, b: loss({"w": w, "b": b}, x, onehot)
    want = eg.value_and_grad(lambda *a: f(*a).mean(), argnums=(1, 3))(x, w, onehot, b)
    got = egd.value_and_grad(f, argnums=(1, 3))(dask_of(x, 5), w, dask_of(onehot, 5), b)
    close(got[0], want[0])
    close(got[1][0], want[1][0])
    close(got[1][1], want[1][1])


# -- 4. what goes to the workers -------------------------------------------------------

def test_a_lifted_graph_holds_the_function_once(client):
    big = rng.standard_normal((3, 4000))          # 96 kB of constants closed over
    f = lambda x: eg.tanh(x @ big)
    J = egd.batch_jacobian(f)(dask_of(rng.standard_normal((12, 3)), 3))
    sizes = {k: len(cloudpickle.dumps(v)) for k, v in dict(J.__dask_graph__()).items()}
    fn = [k for k in sizes if isinstance(k, str) and "-fn-" in k]
    assert len(fn) == 1 and big.nbytes < sizes[fn[0]] < big.nbytes + 30_000
    # every other task names the function by its key: no task carries the constants again
    assert max(s for k, s in sizes.items() if k != fn[0]) < 5_000


def test_parameters_are_scattered_once_per_step(client, monkeypatch):
    params = {"w": rng.standard_normal((500, 40)), "b": rng.standard_normal(40)}  # 160 kB
    x = client.persist(dask_of(rng.standard_normal((64, 500)), 8))
    onehot = client.persist(dask_of(np.eye(40)[rng.integers(0, 40, 64)], 8))
    scattered, computed = [], []
    scatter, compute = client.scatter, client.compute

    def spy_scatter(data, **kw):
        scattered.append(kw)
        return scatter(data, **kw)

    def spy_compute(c, **kw):
        computed.append(len(cloudpickle.dumps(dict(c.__dask_graph__()))))
        return compute(c, **kw)
    monkeypatch.setattr(client, "scatter", spy_scatter)
    monkeypatch.setattr(client, "compute", spy_compute)
    egd.value_and_grad(loss)(params, x, onehot)
    assert len(scattered) == 1 and scattered[0]["broadcast"] is True
    assert len(computed) == 1 and computed[0] < 40_000   # 8 blocks; no copy of the parameters


def test_a_step_whose_parameters_were_lost_runs_once_more(client, monkeypatch):
    """The workers holding a step's scattered parameters gone (its result cancelled):
    scattered again and the whole step run again, once; a second loss raises."""
    params = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4)}
    x, onehot = rng.standard_normal((24, 5)), np.eye(4)[rng.integers(0, 4, 24)]
    want = eg.value_and_grad(lambda p, x, y: loss(p, x, y).mean())(params, x, onehot)
    scattered, compute = [], client.compute
    lost = [1]  # how many computations to cancel, first to last

    def spy_compute(c, **kw):
        fut = compute(c, **kw)
        if lost[0]:
            lost[0] -= 1
            client.cancel(fut)
        return fut
    monkeypatch.setattr(client, "compute", spy_compute)
    monkeypatch.setattr(client, "scatter", lambda data, _s=client.scatter, **kw:
                        scattered.append(kw) or _s(data, **kw))
    got_l, got_g = egd.value_and_grad(loss)(params, dask_of(x, 4), dask_of(onehot, 4))
    close(got_l, want[0])
    close(got_g["w"], want[1]["w"])
    close(got_g["b"], want[1]["b"])
    assert len(scattered) == 2
    lost[0] = 2
    with pytest.raises(concurrent.futures.CancelledError):
        egd.value_and_grad(loss)(params, dask_of(x, 4), dask_of(onehot, 4))


# -- 5. a worker killed mid-computation -------------------------------------------------

def two_live_workers(client) -> None:
    """Wait until a killed worker is gone from the scheduler and its restart has joined."""
    for _ in range(300):
        if len(client.scheduler_info()["workers"]) == 2:
            try:
                if len(client.run(os.getpid, on_error="raise")) == 2:
                    return
            except (OSError, distributed.comm.CommClosedError):
                pass
        time.sleep(0.1)
    raise AssertionError("the cluster did not get two live workers back")


def kill_one_worker_when_started(client, fut_done):
    """Once some tasks are done (and before all are), SIGKILL one worker process."""
    def finished(dask_scheduler):
        return sum(ts.state == "memory" for ts in dask_scheduler.tasks.values())
    deadline = time.time() + 30
    while client.run_on_scheduler(finished) < 3:
        assert time.time() < deadline, "the computation never started"
        time.sleep(0.02)
    assert not fut_done(), "the computation finished before the worker was killed"
    pid = next(iter(client.run(os.getpid).values()))
    os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_loses_no_block(client, tmp_path):
    two_live_workers(client)
    x = rng.standard_normal((48, 3))
    J = egd.batch_jacobian(slow_mlp)(dask_of(x, 4))                  # 12 blocks
    store = str(tmp_path / "J.zarr")
    fut = client.compute(da.to_zarr(J, store, compute=False))
    kill_one_worker_when_started(client, fut.done)
    fut.result(timeout=60)
    close(zarr.open_array(store, mode="r")[...], eg.batch_jacobian(mlp)(x))


def test_a_killed_worker_counts_no_block_twice(client):
    def slow_loss(params, x, onehot):
        time.sleep(0.25)
        return loss(params, x, onehot)
    params = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4)}
    x, onehot = rng.standard_normal((48, 5)), np.eye(4)[rng.integers(0, 4, 48)]
    want = eg.value_and_grad(lambda p, x, y: loss(p, x, y).mean())(params, x, onehot)
    two_live_workers(client)  # so both hold the step's parameters: one of them is killed
    got = []

    def run():
        try:
            got.append(egd.value_and_grad(slow_loss)(params, dask_of(x, 4), dask_of(onehot, 4)))
        except BaseException as e:  # noqa: B036 (raised again below, in the test's thread)
            got.append(e)
    step = threading.Thread(target=run)
    step.start()
    kill_one_worker_when_started(client, lambda: not step.is_alive())
    step.join(60)
    (result,) = got
    if isinstance(result, BaseException):
        raise result
    got_l, got_g = result
    close(got_l, want[0])
    close(got_g["w"], want[1]["w"])
    two_live_workers(client)


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_as_written(tmp_path):
    found = re.search(r"## Past one machine.*?```python\n(.*?)```", README.read_text(), re.S)
    if found is None or not hasattr(transforms, "on_blocks"):
        pytest.skip("the README's section and the hooks in transforms.py are not in yet")
    done = subprocess.run([sys.executable, "-c", found.group(1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    J = zarr.open_array(str(tmp_path / "J.zarr"), mode="r")
    assert J.shape == (4, 10 ** 5, 3, 3) and np.isfinite(J[0, :10]).all()


# -- 6. without dask ----------------------------------------------------------------------

NO_DASK = """
import sys
import numpy as np
import einsumgrad as eg
import einsumgrad.distributed as egd
assert not egd.is_dask(np.ones(3)) and not egd.is_dask((np.ones(2), {"a": [1.0]}))
eg.batch_jacobian(lambda x: eg.tanh(x))(np.ones((2, 3)))
loaded = [m for m in sys.modules if m == "dask" or m.startswith(("dask.", "distributed"))]
assert not loaded, loaded
"""


def test_importing_einsumgrad_imports_no_dask():
    done = subprocess.run([sys.executable, "-c", NO_DASK], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_is_dask():
    x = da.ones(3)
    assert egd.is_dask(x) and egd.is_dask((1, {"k": [np.ones(2), x]}))
    assert not egd.is_dask(np.ones(3)) and not egd.is_dask(eg.tensor(np.ones(3)))


def test_a_dask_constant_is_refused():
    x = da.ones((4, 3), chunks=2)
    with pytest.raises(TypeError, match="not batched"):
        egd.batch_jacobian(lambda x, w: x @ w)(x, da.ones((3, 3)))
