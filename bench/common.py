"""Timing and reporting shared by the bench cases.

Every case times its contenders in one run, on this machine, and prints the
median per call and the ratio against each named peer, with the target when
the issue sets one. Nothing here asserts: speed is read, not unit-tested.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
import tracemalloc
from typing import Callable

RESULTS: list = []  # (case, contender, seconds) of this run, for a summary
TARGETS: list = []  # (case, peer, ratio ours / peer must not exceed), for the picture
OURS: dict = {}  # case -> the einsumgrad contender's name
SECTION = ""  # the bench module running (run.py sets it): two modules may share a case title


def keep_freed_memory() -> str:
    """Let glibc reuse freed buffers instead of unmapping them, for this whole process.

    By default glibc serves large allocations with fresh ``mmap``s and returns
    freed heap to the kernel, so every multi-MB temporary is page-faulted and
    zeroed again on each step (measured: ~12 ms of a ~55 ms CNN step). The
    setting is process-wide, so every contender timed in the run gets it;
    ``EINSUMGRAD_BENCH_MALLOC=default`` leaves glibc's defaults.

    Returns:
        a line saying what was set, for the run's header.
    """
    if os.environ.get("EINSUMGRAD_BENCH_MALLOC") == "default":
        return "malloc: glibc defaults (EINSUMGRAD_BENCH_MALLOC=default)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        # 32 MiB is glibc's ceiling for the mmap threshold on 64-bit.
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        ok = False
    return ("malloc: freed memory kept for reuse (mmap threshold 32 MiB, trim 1 GiB), all "
            "contenders" if ok else "malloc: defaults (not glibc)")


WARM_CALLS, WARM_SECONDS = 12, 1.0
"""Calls before timing (at most this long): plans, caches, the allocator, and a
library's choices among its ways over its first calls (einsumgrad's replay race
tries each of its three ways three times) settle as in a loop of many calls."""


def warm_up(fn: Callable, sync: Callable | None = None) -> None:
    """``fn()`` :data:`WARM_CALLS` times, or as many as fit :data:`WARM_SECONDS` (one at least)."""
    t0 = time.perf_counter()
    for _ in range(WARM_CALLS):
        fn()
        if sync:
            sync()
        if time.perf_counter() - t0 > WARM_SECONDS:
            break


def median_time(fn: Callable, *, min_time: float = 0.3, repeat: int = 7, sync: Callable | None = None) -> float:
    """Median seconds per call of ``fn()`` over ``repeat`` batches of at least ``min_time``/``repeat``."""
    warm_up(fn, sync)
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / repeat / one))
    samples = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def median_times(fns: dict, *, min_time: float = 0.3, repeat: int = 7) -> dict:
    """Median seconds per call of each ``fns[name]()``, the contenders taking turns.

    Each of ``repeat`` rounds times every contender in turn for its share of
    ``min_time``, so a change in the machine's load during the run reaches all
    of them alike rather than whichever ran then. Each turn starts with one
    call untimed: the library just run leaves its thread pool spinning for a
    while (OpenMP's, OpenBLAS's, XLA's), and a user running one library never
    has another's pool on the cores.
    """
    number = {}
    for name, fn in fns.items():
        warm_up(fn)
        t0 = time.perf_counter()
        fn()
        number[name] = max(1, int(min_time / repeat / max(time.perf_counter() - t0, 1e-7)))
    samples: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            fn()
            t0 = time.perf_counter()
            for _ in range(number[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / number[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def _thread_ticks() -> dict:
    """``{tid: (CPU clock ticks used so far, comm)}`` for this process's threads (Linux)."""
    got = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from the state on: utime, stime are 11, 12
        got[int(tid)] = (int(fields[11]) + int(fields[12]), comm)
    return got


def cores_busy(fn: Callable, seconds: float = 1.0) -> dict | None:
    """Cores each group of threads kept busy while ``fn()`` ran back to back for
    ``seconds``: the calling thread, einsumgrad's pool, other Python threads, and
    native threads by name (Intel OpenMP's ``openmp_worker`` runs MKL; GNU
    OpenMP's workers, which run torch and MKL once torch is loaded, and BLAS
    pools set no name); a worker spinning while it waits for work counts as busy. A calling thread
    near 1.0 with the rest well below the other cores is work that stays serial.
    ``None`` where ``/proc`` has no per-thread counters (not Linux)."""
    if not os.path.isdir("/proc/self/task"):
        return None
    fn()
    before, t0, n = _thread_ticks(), time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    wall, after = time.perf_counter() - t0, _thread_ticks()
    me = threading.get_native_id()
    python = {t.native_id: t.name for t in threading.enumerate()}
    with open("/proc/self/comm") as f:
        own = f.read().strip()  # what a native thread that set no name of its own is called
    groups: dict = {}
    for tid, (ticks, comm) in after.items():
        used = (ticks - before.get(tid, (0,))[0]) / os.sysconf("SC_CLK_TCK") / wall
        name = python.get(tid, "")
        label = ("calling thread" if tid == me else "einsumgrad pool"
                 if name.startswith("einsumgrad") else "other Python threads" if name
                 else "unnamed native threads (BLAS, OpenMP)" if comm == own else comm)
        groups[label] = groups.get(label, 0.0) + used
    return {k: v for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def fmt_cores(groups: dict | None) -> str:
    """``cores_busy``'s groups on one line."""
    if groups is None:
        return "n/a (no /proc)"
    each = ", ".join(f"{k} {v:.2f}" for k, v in groups.items())
    return f"{each}; {sum(groups.values()):.2f} in all"


def peak_memory(fn: Callable) -> int:
    """Peak bytes NumPy allocates while ``fn()`` runs (tracemalloc sees NumPy's buffers)."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:9.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:9.2f} ms"
    return f"{seconds:9.3f} s "


def report(case: str, times: dict, *, ours: str, targets: dict | None = None, note: str = "") -> None:
    """Print one case: each contender's median, and ours as a ratio to each peer.

    Args:
        case: the case's title.
        times: contender name -> median seconds (measured in this run).
        ours: the einsumgrad contender's name.
        targets: peer name -> the ratio ours must not exceed (ours / peer).
    """
    targets = targets or {}
    key = f"[{SECTION}] {case}" if SECTION else case
    OURS[key] = ours
    TARGETS.extend((key, peer, limit) for peer, limit in targets.items())
    print(f"\n== {case}" + (f"  ({note})" if note else ""))
    for name, t in times.items():
        RESULTS.append((key, name, t))
        line = f"  {name:<34} {fmt(t)}"
        if name != ours and t:
            r = times[ours] / t
            line += f"   ours/this = {r:6.2f}x"
            if name in targets:
                line += f"  (target <= {targets[name]}x: {'met' if r <= targets[name] else 'MISSED'})"
        print(line)


def _mkl_kernel(path: str) -> str:
    """MKL's code path as MKL names it (``MKL_Get_Version``'s processor field)."""
    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                    ("status", ctypes.c_char_p), ("build", ctypes.c_char_p),
                    ("processor", ctypes.c_char_p), ("platform", ctypes.c_char_p)]
    try:
        v = Version()
        ctypes.CDLL(path).MKL_Get_Version(ctypes.byref(v))
        return (v.processor or b"?").decode(errors="replace").split(" with ")[0]
    except (OSError, AttributeError):
        return "?"


def blas_header() -> list:
    """One line per side's BLAS and kernel, as loaded in this process (threadpoolctl).

    NumPy's OpenBLAS with the kernel it runs (``architecture``), the MKL
    einsumgrad's backend loads (einsumgrad[mkl]), torch's BLAS and CPU
    capability, and JAX/XLA's device and thread settings, each with its
    thread count. Imports torch and JAX where installed, so their libraries
    are loaded when threadpoolctl looks.
    """
    import numpy
    from einsumgrad.backends import mkl
    try:
        import torch
    except ImportError:
        torch = None
    try:
        import jax
    except ImportError:
        jax = None
    try:
        from threadpoolctl import threadpool_info
        pools = threadpool_info()
    except ImportError:
        pools = None
    lines = ["OpenBLAS settings in the environment: " + (", ".join(
        f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
        if k in os.environ) or "none (each BLAS picks its native kernel)")]
    if pools is None:
        return lines + ["threadpoolctl not installed: BLAS libraries not listed"]

    def where(path: str) -> str:
        for part, side in (("numpy.libs", "NumPy"), ("scipy.libs", "SciPy"), ("/torch/", "torch"),
                           ("jaxlib", "JAX"), ("/sklearn/", "scikit-learn")):
            if part in path:
                return side
        if mkl._LIB is not None and os.path.realpath(path) == os.path.realpath(mkl._LIB._name):
            return "einsumgrad[mkl]"
        return os.path.basename(path)

    for p in pools:
        if p["user_api"] != "blas":
            continue
        kernel = p.get("architecture") or (_mkl_kernel(p["filepath"])
                                           if p["internal_api"] == "mkl" else "?")
        lines.append(f"{where(p['filepath'])}: {p['internal_api']} {p.get('version')}, "
                     f"kernel {kernel}, {p['num_threads']} threads ({p.get('threading_layer')})")
    if torch is not None:
        blas = "MKL" if torch.backends.mkl.is_available() else "its own"
        lines.append(f"torch {torch.__version__}: {blas} BLAS (linked in), CPU capability "
                     f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    for p in pools:
        if p["user_api"] == "openmp":
            lines.append(f"OpenMP ({where(p['filepath'])}): {p['internal_api']}, "
                         f"{p['num_threads']} threads")
    if jax is not None:
        import jaxlib
        flags = os.environ.get("XLA_FLAGS", "")
        lines.append(f"JAX {jax.__version__} (jaxlib {jaxlib.__version__}): XLA's own kernels, "
                     f"compiled for this CPU (device {jax.devices()[0].platform}), "
                     + (f"XLA_FLAGS={flags}" if flags else f"threads: all {os.cpu_count()} cores"))
    return lines
