"""Row kernels on the OpenMP team MKL runs on (einsumgrad.backends.threads.openmp).

Where MKL runs on GNU OpenMP and numba's ``omp`` layer loads, the eager
kernels and a program's fused chains split their rows over that team by a
``prange`` twin of their loop. The twin must give what the kernel gives on one
thread, a forked child must still run (numba ends a child that starts a parallel
kernel after its parent did; GNU OpenMP's team waits forever there), and the
user's choice of MKL's threading layer and torch's thread count must hold.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import einsumgrad as eg
from einsumgrad.backends import kernels, mkl, threads

on_team = pytest.mark.skipif(not (kernels.available() and threads.openmp()),
                             reason="MKL is not on GNU OpenMP with numba's omp layer here")


@pytest.fixture
def team(monkeypatch):
    """Every kernel's rows on two threads of the team; the calls that went there."""
    calls = []
    real = threads.on_team

    def spy(k, loop, *args):
        calls.append(k)
        return real(k, loop, *args)
    monkeypatch.setattr(threads, "on_team", spy)
    monkeypatch.setattr(threads, "TEAM_WORK", 1)
    monkeypatch.setattr(threads, "cores", lambda: 2)
    monkeypatch.setattr(mkl, "gemm_threads", lambda: 2)
    return calls


def _alone(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(threads, "SHARE", False)
        return fn()


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    eps = np.finfo(want.dtype).eps
    np.testing.assert_allclose(got, want, rtol=8 * eps, atol=8 * eps * np.abs(want).max())


@on_team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eager_row_kernels_on_the_team_give_their_one_thread_results(team, monkeypatch, dtype):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((37, 24))).astype(dtype)
    g = rng.standard_normal((37, 24)).astype(dtype)
    w, b = rng.standard_normal(24).astype(dtype), rng.standard_normal(24).astype(dtype)
    cdf = 0.5 * (1 + np.tanh(x))  # any values in [0, 1] serve the kernels
    out = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    runs = {
        "layer_norm": lambda: kernels.layer_norm(x, 24, 1e-5, w, b),
        "gelu": lambda: kernels.gelu(x, cdf),
        "gelu_vjp": lambda: kernels.gelu_vjp(g, x, cdf),
        "relu_vjp": lambda: kernels.relu_vjp(g, np.maximum(x, 0)),
        "softmax_vjp": lambda: kernels.softmax_vjp(g, out),
    }
    def adam():  # in place, on copies: the parameter and its moments after one step
        p, m, v = x.copy(), g.copy(), np.abs(g)
        assert kernels.adam(p, g, m, v, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, step=3)
        return p, m, v
    runs["adam"] = adam
    # Batch norm over NCHW and channels-last images: the statistics' sums by parts of
    # the rows, a part a thread, added after; the output and dx row by row.
    for name, image in (("NCHW", rng.standard_normal((6, 5, 3, 4))),
                        ("channels-last",
                         rng.standard_normal((6, 3, 4, 5)).transpose(0, 3, 1, 2))):
        im, wc, bc = image.astype(dtype), w[:5], b[:5]
        y, mean, _, s = _alone(monkeypatch,
                               lambda im=im: kernels.batch_norm(im, wc, bc, 1e-5, True))
        cot = rng.standard_normal(im.shape).astype(dtype)
        runs[f"batch_norm, {name}"] = lambda im=im: kernels.batch_norm(im, wc, bc, 1e-5, True)
        runs[f"batch_norm_vjp, {name}"] = (
            lambda im=im, y=y, mean=mean, s=s, cot=cot:
            kernels.batch_norm_vjp(cot, y, im, mean, s, wc, True))
    # Max pooling's views (B, C, Ho, kh, Wo, kw), channels-last and NCHW, ties included.
    for name, image in (("channels-last", rng.integers(0, 4, (3, 8, 8, 16)).transpose(0, 3, 1, 2)),
                        ("NCHW", rng.integers(0, 4, (3, 4, 8, 8)))):
        view = image.astype(dtype).reshape(image.shape[:2] + (4, 2, 4, 2))
        most = _alone(monkeypatch, lambda: kernels.window_max(view))
        cot = rng.standard_normal(most.shape).astype(dtype)
        runs[f"window_max, {name}"] = lambda view=view: kernels.window_max(view)
        runs[f"window_max_vjp, {name}"] = (
            lambda view=view, most=most, cot=cot: kernels.window_max_vjp(view, most, cot))
    for name, run in runs.items():
        want = _alone(monkeypatch, run)
        before = len(team)
        got = run()
        assert len(team) > before, f"{name} did not run on the team"
        for a, c in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
            _close(a, c)


@on_team
def test_a_programs_fused_chain_on_the_team_gives_its_one_thread_result(team, monkeypatch):
    rng = np.random.default_rng(1)
    x, b = rng.standard_normal((301, 17)), rng.standard_normal(17)
    f = eg.jit(lambda x, b: eg.tanh(x + b) * x - eg.exp(-x * x))
    want = _alone(monkeypatch, lambda: f(x, b))
    got = f(x, b)
    assert team, "the fused chain did not run on the team"
    _close(got, want)
    _close(got, np.tanh(x + b) * x - np.exp(-x * x))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=240)


@on_team
def test_a_forked_child_runs_products_and_kernels():
    """The parent's team ran a product and a kernel; its forked child runs both
    again (on one thread: MKL at one, the kernel's serial loop) and exits."""
    code = """
        import os, numpy as np
        from einsumgrad.backends import kernels, mkl, threads
        threads.TEAM_WORK = 1
        x = np.random.default_rng(0).standard_normal((512, 64))
        a = mkl.matmul(x, x.T); g = kernels.gelu_vjp(x, x, x)
        assert threads.openmp()
        pid = os.fork()
        if pid == 0:
            ok = np.allclose(mkl.matmul(x, x.T), a) and np.allclose(kernels.gelu_vjp(x, x, x), g)
            os._exit(0 if ok and not threads.openmp() and mkl.gemm_threads() == 1 else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["child", "0"]


@pytest.mark.skipif(not kernels.available(), reason="needs numba")
def test_a_second_process_loads_the_kernels_from_numbas_disk_cache(tmp_path):
    """The first process compiles and caches the kernels; the next loads them, a
    cache hit each, compiling none (a kernel keyed on something that pickles
    differently in each process compiled and wrote a new cache file every run)."""
    code = """
        import numpy as np
        from einsumgrad.backends import kernels
        x = np.random.default_rng(0).standard_normal((512, 64))
        kernels.gelu_vjp(x, x, x); kernels.relu_vjp(x, x)
        ran = ["gelu_vjp", "relu_vjp"]
        if kernels.team_matmul(x, x.T, workers=2) is not None:
            ran.append("blas_parts_team")
        for name in ran:
            stats = kernels._kernels()[name].stats
            print(name, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    """
    first, second = (_run(code, NUMBA_CACHE_DIR=str(tmp_path)) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    compiled = {line.split()[0]: line.split()[1:] for line in first.stdout.splitlines()}
    loaded = {line.split()[0]: line.split()[1:] for line in second.stdout.splitlines()}
    assert compiled == {name: ["0", "1"] for name in compiled}, first.stdout
    assert loaded == {name: ["1", "0"] for name in compiled}, second.stdout


@pytest.mark.skipif(not kernels.available(), reason="needs numba")
def test_no_kernel_closes_over_what_pickles_apart_in_each_process():
    """numba keys a kernel's disk cache on its closure, pickled: a module there
    pickles as its name, a jitted function or an intrinsic differently in each
    process, so every kernel reaches those through their module."""
    import types
    for name, entry in kernels._kernels().items():
        for k in entry if isinstance(entry, tuple) else (entry,):
            cells = k.py_func.__closure__ or ()
            held = {v: type(c.cell_contents).__name__
                    for v, c in zip(k.py_func.__code__.co_freevars, cells)
                    if not isinstance(c.cell_contents, types.ModuleType)}
            assert not held, (name, held)


@pytest.mark.skipif(mkl.matmul is None or not kernels.available(),
                    reason="needs the mkl wheel and numba")
def test_the_users_threading_layer_holds_and_the_kernels_then_share_rows_on_the_pool():
    code = """
        import numpy as np
        from einsumgrad.backends import kernels, mkl, threads
        x = np.random.default_rng(0).standard_normal((512, 64))
        g = kernels.gelu_vjp(x, x, x)
        print(mkl.on_gnu_openmp(), threads.openmp(), g is not None)
    """
    r = _run(code, MKL_THREADING_LAYER="INTEL")
    assert r.stdout.split() == ["False", "False", "True"], r.stderr


@on_team
def test_torchs_thread_count_holds_when_the_team_starts():
    pytest.importorskip("torch")
    code = """
        import torch
        torch.set_num_threads(1)
        import numpy as np
        from einsumgrad.backends import kernels, threads
        threads.TEAM_WORK = 1
        x = np.random.default_rng(0).standard_normal((512, 64))
        kernels.gelu_vjp(x, x, x)
        print(threads.openmp(), torch.get_num_threads())
    """
    r = _run(code)
    assert r.stdout.split() == ["True", "1"], r.stderr


@on_team
def test_a_block_loop_ends_the_teams_spinning_workers():
    """GNU OpenMP's idle workers spin long after a product, on the cores a block
    loop's pool threads need: entering one ends the team (the next product
    starts it again)."""
    code = """
        import os, time, numpy as np
        from einsumgrad.backends import kernels, mkl, threads
        from threadpoolctl import threadpool_limits
        threads.TEAM_WORK = 1
        tasks = lambda: len(os.listdir("/proc/self/task"))
        x = np.random.default_rng(0).standard_normal((512, 512))
        with threadpool_limits(2):
            kernels.gelu_vjp(x, x, x); mkl.matmul(x, x)
            busy = tasks()
            with threads.one_thread:
                for _ in range(100):
                    if tasks() < busy:
                        break
                    time.sleep(0.01)
                rested = tasks()
            a = mkl.matmul(x, x)
        print(busy > rested, np.allclose(a, x @ x))
    """
    r = _run(code)
    assert r.stdout.split() == ["True", "True"], r.stderr


@on_team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride,padding,dilation,kernel,channels_last", [
    (1, 1, 1, 3, True), (2, 1, 1, 3, False), ((1, 2), (2, 1), (2, 1), (3, 2), True),
    (1, 0, 1, 1, False)])
def test_convolution_blocks_on_the_team_match_torch(monkeypatch, dtype, stride, padding,
                                                     dilation, kernel, channels_last):
    """A convolution's blocks of images shared among the team's threads (the
    backend's window_products kernel: each thread pads and copies its blocks'
    windows and runs MKL's GEMM on itself alone): the value and every gradient
    as torch's, the weight gradient summed over the threads' parts; 7 images
    (in blocks of 2 for the 3 x 3 window at stride 1: the last block short)."""
    import torch
    from einsumgrad.backends import NUMPY
    from einsumgrad.nn import functional as F
    from einsumgrad.rules import convolution
    ran = []
    real = NUMPY.window_products
    monkeypatch.setattr(NUMPY, "window_products",
                        lambda *a, **k: ran.append(a[3]) or real(*a, **k))
    # blocks of two images where the windows are 7 x 7 x 3 x 3 x 8 an image
    monkeypatch.setattr(convolution, "BLOCK_BYTES", 2 * 7 * 7 * 9 * 8 * np.dtype(dtype).itemsize)
    monkeypatch.setattr(mkl, "gemm_threads", lambda: 2)
    monkeypatch.setattr(threads, "SHARE", True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 8, 7, 7)).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    w, b = rng.standard_normal((8, 8, kh, kw)).astype(dtype), rng.standard_normal(8).astype(dtype)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    want = torch.nn.functional.conv2d(tx, tw, tb, **kw_)
    g = rng.standard_normal(tuple(want.shape)).astype(dtype)
    want.backward(torch.tensor(g))
    ex, ew, eb = (eg.tensor(a, requires_grad=True) for a in (x, w, b))
    y = F.conv2d(ex, ew, eb, **kw_)
    y.backward(g)
    assert ran, "the blocks did not run on the team"
    assert ran[0] == 2 or (kh, kw, stride) != (3, 3, 1)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    for got, ref in ((y, want), (ex.grad, tx.grad), (ew.grad, tw.grad), (eb.grad, tb.grad)):
        ref = ref.detach().numpy()
        np.testing.assert_allclose(np.asarray(got.data), ref, rtol=tol,
                                   atol=tol * max(1.0, np.abs(ref).max()))


@on_team
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_attention_on_the_team_matches_the_rules(team, monkeypatch, dtype, tol):
    """Attention's core a pair of matrices at a time on the team (the backend's
    attention kernels, MKL's GEMM by address): the value and the three gradients
    as the rules give them, recorded; one pair's non-finite scores leave it all
    to the rules."""
    from einsumgrad.backends import NUMPY
    from einsumgrad.nn import functional as F
    ran = []
    for name in ("attention", "attention_vjp"):
        real = getattr(NUMPY, name)
        monkeypatch.setattr(NUMPY, name, lambda *a, real=real, name=name: ran.append(
            (name, (r := real(*a)) is not None)) or r)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((3, n, 2, m)).astype(dtype).transpose(0, 2, 1, 3)
               for n, m in ((5, 4), (6, 4), (6, 3)))
    f = lambda q, k, v: (F.scaled_dot_product_attention(q, k, v) ** 3).sum()  # noqa: E731
    fast = eg.grad(f, argnums=(0, 1, 2))(q, k, v)
    assert ("attention", True) in ran and ("attention_vjp", True) in ran
    ts = [eg.tensor(a.astype(np.float64), requires_grad=True) for a in (q, k, v)]
    f(*ts).backward(create_graph=True)  # the rules, in float64
    for a, t in zip(fast, ts):
        want = np.asarray(t.grad.data)
        np.testing.assert_allclose(np.asarray(a.data), want, rtol=tol,
                                   atol=tol * np.abs(want).max())
    import torch
    for bad in (np.inf, -np.inf, np.nan):  # one key's entry: one score in every row
        ran.clear()
        k2 = k.copy()
        k2[1, 0, 3, 1] = bad
        got = np.asarray(F.scaled_dot_product_attention(*map(eg.tensor, (q, k2, v))).data)
        want = torch.nn.functional.scaled_dot_product_attention(
            *(torch.tensor(np.ascontiguousarray(a)) for a in (q, k2, v))).numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        assert ("attention", False) in ran  # the arrays' path took it


def _bound(a, b):
    """How far any BLAS's ``a @ b`` may be from another's: a few units of each entry's terms."""
    return 16 * a.shape[1] * np.finfo(a.dtype).eps * (np.abs(a) @ np.abs(b))


@on_team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(300, 17, 5), (3, 40, 500), (1, 4, 9), (7, 1, 2),
                                     (65, 64, 63)])
def test_openblas_on_the_team_gives_numpys_product_in_every_layout(dtype, m, k, n):
    # rows split among the threads where the product has more rows, columns where it
    # has more columns; operands as laid out or transposed in memory; into ``out``
    from einsumgrad.backends import openblas
    if not openblas.available():
        pytest.skip("NumPy does not link the OpenBLAS of its wheels here")
    rng = np.random.default_rng(0)
    before = openblas.threads()
    laid = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    for a in (laid(m, k), laid(k, m).T):
        for b in (laid(k, n), laid(n, k).T):
            got = kernels.team_matmul(a, b, workers=2)
            assert got.dtype == dtype and got.shape == (m, n)
            assert np.all(np.abs(got - a @ b) <= _bound(a, b))
            out = np.full((m, n), np.nan, dtype)
            assert kernels.team_matmul(a, b, out, workers=2) is out
            assert np.all(np.abs(out - a @ b) <= _bound(a, b))
    assert openblas.threads() == before  # OpenBLAS's count as it was


@on_team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(4096, 64, 8), (10, 256, 1024), (3000, 64, 3), (1000, 7, 1000),
                                     (256, 1024, 1024)])
@pytest.mark.parametrize("workers", [1, 2])
def test_openblas_in_small_blocks_gives_numpys_product_in_every_layout(dtype, m, k, n, workers):
    # cut where the product is thin (rows, or columns where it has more), each block
    # within OpenBLAS's small-matrix kernels' 10^6 multiply-adds; a square one is not cut
    from einsumgrad.backends import openblas
    if not openblas.available():
        pytest.skip("NumPy does not link the OpenBLAS of its wheels here")
    parts = openblas.small_parts(m, n, k, workers)
    assert (parts > workers) == ((m, k, n) not in ((3000, 64, 3), (256, 1024, 1024)))
    assert parts == 0 or (parts % workers == 0 and m * n * k / parts <= openblas.SMALL_WORK
                          and max(m, n) // parts >= 32)
    rng = np.random.default_rng(0)
    before = openblas.threads()
    laid = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    for a in (laid(m, k), laid(k, m).T):
        for b in (laid(k, n), laid(n, k).T):
            got = kernels.team_matmul(a, b, workers=workers, small=True)
            assert got.dtype == dtype and got.shape == (m, n)
            assert np.all(np.abs(got - a @ b) <= _bound(a, b))
            out = np.full((m, n), np.nan, dtype)
            assert kernels.team_matmul(a, b, out, workers=workers, small=True) is out
            assert np.all(np.abs(out - a @ b) <= _bound(a, b))
    assert openblas.threads() == before


@on_team
def test_openblas_on_the_team_declines_what_it_does_not_take():
    from einsumgrad.backends import openblas
    if not openblas.available():
        pytest.skip("NumPy does not link the OpenBLAS of its wheels here")
    a, b = np.ones((8, 6)), np.ones((6, 4))
    c = np.zeros((8, 12))
    memory = np.ones(8 * 6 + 8 * 4)
    shared, overlapping = memory[:48].reshape(8, 6), memory[40:72].reshape(8, 4)
    for args in ((np.ones((2, 8, 6)), b), (a, b.astype(np.float32)), (a.astype(int), b.astype(int)),
                 (a, np.ones((5, 4))), (a, b, c[:, ::3]), (a, b, np.zeros((8, 4), np.float32)),
                 (shared, b, overlapping)):  # batched, mixed, ints, mismatched; a strided or
        out = args[2] if len(args) > 2 else None  # wrong-typed out, or one overlapping an input
        snapshot = None if out is None else out.copy()
        assert kernels.team_matmul(args[0], args[1], out, workers=2) is None
        if out is not None:
            np.testing.assert_array_equal(out, snapshot)  # nothing written
    assert kernels.team_matmul(a, b, workers=1) is None  # no team of one


@on_team
def test_a_class_the_team_won_runs_there_with_numpys_values(monkeypatch, tmp_path):
    # at two MKL threads a square class raced MKL against OpenBLAS on the team, and
    # the team won: the backend's matmul goes there, and gives NumPy's product
    from einsumgrad.backends import NUMPY, openblas
    if not openblas.available() or mkl.matmul is None:
        pytest.skip("needs MKL and NumPy's OpenBLAS")
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    monkeypatch.delenv("EINSUMGRAD_BLAS", raising=False)
    monkeypatch.setattr(mkl._LIB, "MKL_Get_Max_Threads", lambda: 2)
    monkeypatch.setattr(mkl, "_race", lambda a, b, fns=None: (1.0, 2.0) if fns is not None
                        and getattr(fns[1], "small", False) else (2.0, 1.0))  # not in blocks
    ran = []
    real = kernels.team_matmul
    monkeypatch.setattr(kernels, "team_matmul", lambda *a: ran.append(a[0].shape) or real(*a))
    mkl.forget_choices()
    try:
        assert mkl.blas_choices(np.float64)["mat"][20] == "openblas"
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((128, 128)), rng.standard_normal((128, 128)).T
        got = NUMPY.matmul(a, b)
        assert ran == [(128, 128)]
        assert np.all(np.abs(got - a @ b) <= _bound(a, b))
    finally:
        mkl.forget_choices()


@on_team
def test_openblas_on_the_team_from_several_threads_restores_its_count():
    # two threads each running products on the team at once: OpenBLAS at one thread
    # while any runs, at its own count again once both are done
    import concurrent.futures
    from einsumgrad.backends import openblas
    if not openblas.available():
        pytest.skip("NumPy does not link the OpenBLAS of its wheels here")
    before = openblas.threads()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 64)), rng.standard_normal((64, 90))

    def products(_):
        return all(np.all(np.abs(kernels.team_matmul(a, b, workers=2) - a @ b) <= _bound(a, b))
                   for _ in range(50))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert all(pool.map(products, range(4)))
    assert openblas.threads() == before
