"""Programs (issue 19): ``eg.jit`` against JAX's jit, PyTorch and eager einsumgrad.

Run with ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py program``.
The cases run at the machine's thread count, then again in a child process
pinned to one core (every contender at one thread).
Each case times, in this one run: einsumgrad ``jit`` (the replayed program),
eager einsumgrad (the same function, traced on the tape every call), JAX's
``jit`` (where JAX is installed; float64 enabled), and PyTorch eager or
``torch.func``. The first call of each jit (trace + compile) is printed apart.

* seed 000: ``directional(f, 2)(x, x)``, MLP 16-64-8 tanh, B = 16, 256, 4096;
* seed 001: the ``[512, 10, 784]`` Jacobian of a 784-256-10 ReLU classifier;
* seed 002: per-point Jacobians of an MLP 3-64-64-3 tanh, 10^3 and 10^5 points;
* an MLP training step's loss and gradients, 512-1024-1024-10, batch 256, float32;
* the gradient of ``tanh(x @ w).sum()`` at 8x8 (per-call overhead).
"""
from __future__ import annotations

import os
import time

import numpy as np

import einsumgrad as eg
from common import fmt, median_time, median_times, report
from einsumgrad.program import jit as eg_jit

ALONE = "EINSUMGRAD_BENCH_ALONE"  # set in the child that loads einsumgrad and no peer
torch = jax = autograd = None
if not os.environ.get(ALONE):
    try:
        import torch
        from torch.func import jacrev as t_jacrev, jvp as t_jvp, vmap as t_vmap
    except ImportError:
        torch = None
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
    except ImportError:
        jax = None
    try:  # HIPS autograd (einsumgrad[bench]): the eager path's floor on seed 000
        import autograd
        import autograd.numpy as anp
    except ImportError:
        autograd = None

# mkl.blas_choices's labels: NumPy's matmul, MKL's GEMM, NumPy's OpenBLAS on MKL's team
LIBRARY = {"numpy": "NumPy", "mkl": "MKL", "openblas": "OpenBLAS-team",
           "openblas-small": "OpenBLAS-small-blocks"}
FIRST: list = []  # (case, contender, seconds of the first call: trace + compile)
TIMES: dict = {}  # case -> contender -> median seconds, for the run alone (:func:`alone`)


def first_call(case: str, name: str, fn):
    t = time.perf_counter()
    out = fn()
    if jax is not None and name.startswith("JAX"):
        jax.block_until_ready(out)
    FIRST.append((case, name, time.perf_counter() - t))
    return out


CHECKS: list = []  # this case's agreement lines, printed under its table


def close(name: str, a, b, tol=1e-9) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
    CHECKS.append(f"  check {name}: max relative difference {err:.1e}"
                  + ("" if err <= tol else "  (LARGER THAN EXPECTED)"))


def _mlp(sizes, rng, dtype=np.float64):
    return [((rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype),
             (0.1 * rng.standard_normal(o)).astype(dtype)) for i, o in zip(sizes[:-1], sizes[1:])]


def eg_mlp(params, act):
    def f(x):
        for n, (w, b) in enumerate(params):
            x = eg.einsum("...i,oi->...o", x, w) + b
            x = act(x) if n < len(params) - 1 else x
        return x
    return f


def jax_mlp(params, act):
    ps = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]

    def f(x):
        for n, (w, b) in enumerate(ps):
            x = x @ w.T + b
            x = act(x) if n < len(ps) - 1 else x
        return x
    return f


def autograd_mlp(params, act):
    def f(x):
        for n, (w, b) in enumerate(params):
            x = anp.dot(x, w.T) + b
            x = act(x) if n < len(params) - 1 else x
        return x
    return f


def torch_mlp(params, act):
    ps = [(torch.tensor(w), torch.tensor(b)) for w, b in params]

    def f(x):
        for n, (w, b) in enumerate(ps):
            x = x @ w.T + b
            x = act(x) if n < len(ps) - 1 else x
        return x
    return f


def run_case(case: str, x_args: tuple, ours, peers: dict, min_time: float = 0.3,
             tol: float = 1e-9, targets: dict | None = None,
             eager_targets: dict | None = None) -> None:
    """Time eg.jit(ours) (first call apart), ours eager, and each peer (name -> (fn, args)).

    ``targets`` bound the jit's time over a peer's, ``eager_targets`` the eager path's
    (reported as a case of its own, "..., eager").
    """
    n = _threads()
    case = f"{case}; {n} thread{'s' * (n > 1)}"
    j = eg_jit(ours)
    want = ours(*x_args)
    got = first_call(case, "einsumgrad jit", lambda: j(*x_args))
    close("jit vs eager einsumgrad", _flat(got), _flat(want), tol)
    fns = {"einsumgrad jit": lambda: j(*x_args), "einsumgrad eager": lambda: ours(*x_args)}
    for name, (fn, args) in peers.items():
        if name.startswith("JAX"):
            out = first_call(case, name, lambda fn=fn, args=args: fn(*args))
            fns[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
        else:
            out = fn(*args)
            fns[name] = lambda fn=fn, args=args: fn(*args)
        close(f"{name} vs einsumgrad", _flat(out), _flat(want), tol)
    times = median_times(fns, min_time=min_time)
    TIMES[case] = times
    report(case, times, ours="einsumgrad jit", targets=targets)
    if eager_targets:
        report(f"{case}, eager", {k: v for k, v in times.items() if k != "einsumgrad jit"},
               ours="einsumgrad eager", targets=eager_targets)
    for line in CHECKS:
        print(line)
    CHECKS.clear()
    p = j.program(*x_args)
    print(f"  program: {len(p.eqs)} steps ({sum(e.op[0] == 'fused' for e in p.eqs)} fused "
          f"kernels), {len(p.consts)} constants")


def _flat(out):
    if hasattr(out, "numpy"):
        return out.numpy()
    if isinstance(out, (list, tuple)):
        return np.concatenate([np.ravel(_flat(o)) for o in out])
    return np.asarray(out)


def seed000(rng) -> None:
    params = _mlp([16, 64, 8], rng)
    f = eg_mlp(params, eg.tanh)
    ours = lambda x: eg.directional(f, 2)(x, x)
    for batch in (16, 256, 4096):
        x = rng.standard_normal((batch, 16))
        peers = {}
        if jax is not None:
            fj = jax_mlp(params, jnp.tanh)
            d2 = jax.jit(lambda x: jax.jvp(lambda y: jax.jvp(fj, (y,), (x,))[1], (x,), (x,))[1])
            peers["JAX jit(nested jvp)"] = (d2, (jnp.asarray(x),))
        if torch is not None:
            ft = torch_mlp(params, torch.tanh)
            nested = lambda x: t_jvp(lambda y: t_jvp(ft, (y,), (x,))[1], (x,), (x,))[1]
            peers["torch.func nested jvp"] = (nested, (torch.tensor(x),))
        if autograd is not None:
            fa = autograd_mlp(params, anp.tanh)

            def a_d2(x, fa=fa):  # forward mode twice along x, as directional(f, 2)
                d1 = lambda y: autograd.make_jvp(fa)(y)(x)[1]
                return autograd.make_jvp(d1)(x)(x)[1]
            peers["HIPS autograd nested jvp"] = (a_d2, (x,))
        run_case(f"seed 000: directional(f, 2)(x, x), MLP 16-64-8 tanh, B = {batch}", (x,),
                 ours, peers, targets={"JAX jit(nested jvp)": 1.5 if batch == 16 else 1.0},
                 eager_targets={"HIPS autograd nested jvp": 1.0} if batch == 256 else None)


def seed001(rng, batch=512) -> None:
    params = _mlp([784, 256, 10], rng)
    f = eg_mlp(params, eg.relu)
    x = rng.standard_normal((batch, 784))
    peers = {}
    if jax is not None:
        fj = jax_mlp(params, jax.nn.relu)
        peers["JAX jit(vmap(jacrev))"] = (jax.jit(jax.vmap(jax.jacrev(fj))), (jnp.asarray(x),))
    if torch is not None:
        ft = torch_mlp(params, torch.relu)
        peers["torch.func vmap(jacrev)"] = (t_vmap(t_jacrev(ft)), (torch.tensor(x),))
    run_case(f"seed 001: Jacobian [{batch}, 10, 784] of a 784-256-10 ReLU classifier", (x,),
             eg.batch_jacobian(f), peers, targets={"JAX jit(vmap(jacrev))": 1.0})


def seed002(rng) -> None:
    params = _mlp([3, 64, 64, 3], rng)
    f = eg_mlp(params, eg.tanh)
    for n in (1_000, 100_000):
        x = rng.standard_normal((n, 3))
        peers = {}
        if jax is not None:
            fj = jax_mlp(params, jnp.tanh)
            peers["JAX jit(vmap(jacrev))"] = (jax.jit(jax.vmap(jax.jacrev(fj))), (jnp.asarray(x),))
        if torch is not None:
            ft = torch_mlp(params, torch.tanh)
            peers["torch.func vmap(jacrev)"] = (t_vmap(t_jacrev(ft)), (torch.tensor(x),))
        run_case(f"seed 002: per-point Jacobians, MLP 3-64-64-3 tanh, {n:,} points", (x,),
                 eg.batch_jacobian(f), peers, min_time=1.0,
                 targets={"JAX jit(vmap(jacrev))": 1.0 if n < 10_000 else 0.8})


def mlp_step(rng) -> None:
    B, sizes, f32 = 256, [512, 1024, 1024, 10], np.float32
    x = rng.standard_normal((B, sizes[0])).astype(f32)
    y = rng.integers(0, sizes[-1], B)
    onehot = np.eye(sizes[-1], dtype=f32)[y]
    params = [p for wb in _mlp(sizes, rng, f32) for p in wb]

    def loss(params, x, onehot):
        h = x
        for i in range(3):
            h = eg.einsum("bi,oi->bo", h, params[2 * i]) + params[2 * i + 1]
            h = eg.tanh(h) if i < 2 else h
        return -(eg.log_softmax(h) * onehot).sum() * (1.0 / B)
    peers = {}
    if jax is not None:
        def jloss(params, x, onehot):
            h = x
            for i in range(3):
                h = h @ params[2 * i].T + params[2 * i + 1]
                h = jnp.tanh(h) if i < 2 else h
            return -(jax.nn.log_softmax(h) * onehot).sum() / B
        peers["JAX jit(value_and_grad)"] = (jax.jit(jax.value_and_grad(jloss)),
                                            ([jnp.asarray(p) for p in params], jnp.asarray(x),
                                             jnp.asarray(onehot)))
    if torch is not None:
        tparams = [torch.tensor(p, requires_grad=True) for p in params]
        px, py = torch.from_numpy(x), torch.from_numpy(y)

        def torch_step(px, py):
            for p in tparams:
                p.grad = None
            h = px
            for i in range(3):
                h = torch.nn.functional.linear(h, tparams[2 * i], tparams[2 * i + 1])
                h = torch.tanh(h) if i < 2 else h
            out = torch.nn.functional.cross_entropy(h, py)
            out.backward()
            return [out.detach()] + [p.grad for p in tparams]
        peers["PyTorch eager (backward)"] = (torch_step, (px, py))
    run_case("MLP step 512-1024-1024-10, batch 256, float32: loss and gradients",
             (params, x, onehot), eg.value_and_grad(loss), peers, min_time=2.0, tol=1e-4,
             targets={"JAX jit(value_and_grad)": 1.0, "PyTorch eager (backward)": 0.7})
    print(gemm_rates(B, sizes, f32))


def gemm_rates(batch: int, sizes: list, dtype) -> str:
    """The MLP step's GEMMs (forward and both backward products per layer) in GFLOP/s
    by each library the contenders call, at this process's threads.

    The step is GEMM-bound: its ratio over a peer cannot drop far below the
    ratio of the BLAS each one calls, which this line shows.
    """
    rng = np.random.default_rng(1)
    shapes = [s for i, o in zip(sizes[:-1], sizes[1:])
              for s in ((batch, i, o), (batch, o, i), (i, batch, o))]
    mats = [(rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype))
            for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    pairs = {"NumPy's BLAS": (np.matmul, mats)}
    from einsumgrad.backends import mkl
    if mkl.matmul is not None:
        pairs["MKL (einsumgrad[mkl])"] = (mkl.matmul, mats)
        pairs["einsumgrad's choice"] = (mkl.chosen_matmul, mats)
    if torch is not None:
        pairs["torch"] = (torch.matmul, [(torch.from_numpy(a), torch.from_numpy(b))
                                         for a, b in mats])
    rates = {name: flops / median_time(lambda f=f, ms=ms: [f(a, b) for a, b in ms],
                                       min_time=0.5) / 1e9
             for name, (f, ms) in pairs.items()}
    # The floor no framework passes: the step's products (no gradient for x, so
    # not the first layer's backward product into it) at the best rate this
    # machine's BLAS reaches on any shape, a large square product.
    a, b = (rng.standard_normal((2048, 2048)).astype(dtype) for _ in range(2))
    peak = 2 * 2048 ** 3 / min(median_time(lambda: a @ b, min_time=0.3) for _ in range(3)) / 1e9
    step = flops - 2 * batch * sizes[0] * sizes[1]
    return ("  the step's GEMMs, GFLOP/s: "
            + ", ".join(f"{name} {r:.0f}" for name, r in rates.items())
            + f"\n  its floor: {step / 1e9:.2f} GFLOP at NumPy's BLAS peak here (2048^3 products, "
            f"{peak:.0f} GFLOP/s) take {fmt(step / peak / 1e9).strip()}")


def small_grad(rng) -> None:
    x, w = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    ours = eg.grad(lambda x, w: eg.tanh(eg.einsum("ij,jk->ik", x, w)).sum(), argnums=(0, 1))
    peers = {}
    if jax is not None:
        g = jax.jit(jax.grad(lambda x, w: jnp.tanh(x @ w).sum(), argnums=(0, 1)))
        peers["JAX jit(grad)"] = (g, (jnp.asarray(x), jnp.asarray(w)))
    if torch is not None:
        tx, tw = torch.tensor(x), torch.tensor(w)

        def torch_grad(tx, tw):
            a, b = tx.clone().requires_grad_(True), tw.clone().requires_grad_(True)
            torch.tanh(a @ b).sum().backward()
            return a.grad, b.grad
        peers["PyTorch eager (backward)"] = (torch_grad, (tx, tw))
        peers["torch.func grad"] = (torch.func.grad(lambda a, b: torch.tanh(a @ b).sum(),
                                                    argnums=(0, 1)), (tx, tw))
    run_case("grad of tanh(x @ w).sum(), 8x8", (x, w), ours, peers,
             targets={"JAX jit(grad)": 1.5}, eager_targets={"PyTorch eager (backward)": 1.5})


def main() -> None:
    from einsumgrad.backends import mkl
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    print(f"\n# programs: einsumgrad jit; JAX {jax.__version__ if jax else 'not installed'}; "
          f"OpenBLAS settings from the environment: {env or 'none'}")
    if mkl.matmul is not None:
        for dtype, kinds in mkl.blas_choices().items():
            text = "; ".join(f"{kind} " + " ".join(f"2^{b}:{LIBRARY[c]}"
                                                    for b, c in sorted(v.items()))
                             for kind, v in sorted(kinds.items()))
            print(f"  matmul chosen for {dtype} (by m*n*k): {text}")
    else:
        print("  matmul: NumPy's own (no MKL)")
    rng = np.random.default_rng(0)
    for case in (small_grad, seed000, seed001, seed002, mlp_step):
        case(rng)
    print("\n== first calls (trace + compile for the jits, one plain call otherwise)")
    for case, name, t in FIRST:
        print(f"  {case[:60]:<60} {name:<26} {t * 1e3:9.1f} ms")
    if os.environ.get(CHILD) or os.environ.get(ALONE):
        return
    alone()
    if _threads() > 1 and hasattr(os, "sched_setaffinity"):
        one_thread()


def alone() -> None:
    """The einsumgrad cases again in a child process that loads no peer, with glibc's
    malloc as it is: what a user's process runs. Loading torch makes MKL run on
    torch's OpenMP runtime instead of Intel's, and JAX or torch leave glibc
    keeping larger freed blocks; either may hide a cost that only a process of
    einsumgrad alone pays. Printed beside this run's figures, not in the picture.
    """
    import json
    import subprocess
    import sys
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
                "import json, os, bench_program; bench_program.main(); "
                f"json.dump(bench_program.TIMES, open(os.environ[{ALONE!r}], 'w'))")
        print("\n# einsumgrad alone in a process (no torch or JAX loaded, glibc's malloc "
              "as it is; a child process)", flush=True)
        done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{ALONE: path}),
                              capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(path):
            print(f"  the run alone failed (exit {done.returncode}): {done.stderr[-2000:]}")
            return
        with open(path) as f:
            times = json.load(f)
    print(f"  {'case':<64} {'jit alone':>12} {'jit here':>12} {'eager alone':>12} {'eager here':>12}")
    for case, here_times in TIMES.items():
        there = times.get(case, {})
        cols = [there.get("einsumgrad jit"), here_times.get("einsumgrad jit"),
                there.get("einsumgrad eager"), here_times.get("einsumgrad eager")]
        print(f"  {case[:64]:<64} " + " ".join(f"{fmt(t) if t else '-':>12}" for t in cols))


CHILD = "EINSUMGRAD_BENCH_ONE_THREAD"  # set in the child that runs the cases on one core


def _threads() -> int:
    """The cores this process may run on (every library sizes its pool by them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def one_thread() -> None:
    """The cases again on one core, every contender at one thread, in a child process.

    Each library sizes its thread pool at load, so the child pins itself to one
    core before importing any (JAX's XLA pool, OpenBLAS and MKL follow the affinity;
    torch and MKL's OpenMP follow ``OMP_NUM_THREADS``). Its results join this run's
    (and the picture's), each case titled with its thread count.
    """
    import json
    import subprocess
    import sys
    import tempfile

    import common
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        env = dict(os.environ, **{CHILD: path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                  "OPENBLAS_NUM_THREADS": "1"})
        code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                f"sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
                "import json, common; from common import keep_freed_memory; keep_freed_memory(); "
                f"common.SECTION = {common.SECTION!r}; import bench_program; bench_program.main(); "
                "json.dump([common.RESULTS, common.TARGETS, common.OURS], "
                f"open(os.environ[{CHILD!r}], 'w'))")
        print("\n# programs again on one core, every contender at one thread (a child process)",
              flush=True)
        done = subprocess.run([sys.executable, "-c", code], env=env)
        if done.returncode != 0 or not os.path.exists(path):
            print(f"  the one-thread run failed (exit {done.returncode})")
            return
        with open(path) as f:
            results, targets, ours = json.load(f)
    common.RESULTS.extend(tuple(r) for r in results)
    common.TARGETS.extend(tuple(t) for t in targets)
    common.OURS.update(ours)
