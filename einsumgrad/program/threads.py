"""Threads for a program's replay: the cores, one pool, BLAS held at one thread.

Two users: chunked replay (:mod:`.chunk`) shares a row-independent program's
blocks among a thread per core, and a large fused kernel (:mod:`.fuse`) shares
its rows among them where that is measured faster (:func:`rows`). NumPy's
ufuncs, BLAS and the fused kernels release the GIL, so Python threads run them
side by side. The two never nest: a kernel run inside a block loop
(:data:`one_thread` held) stays on its thread.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from time import perf_counter
from typing import Callable

_pools: dict = {}  # worker count -> a thread pool kept for the process
_pools_lock = threading.Lock()


def pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool of ``n`` workers, made once per process."""
    with _pools_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = concurrent.futures.ThreadPoolExecutor(
                n, thread_name_prefix="einsumgrad-blocks")
        return p


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class OneThread:
    """BLAS libraries at one thread while a block loop runs (threadpoolctl).

    A block's products are small: a BLAS thread pool's start and barrier cost
    more than its second core gives, and on a loaded machine a pool waiting for
    a descheduled thread stalls every product. Nested and concurrent loops
    share one limit: the first in saves the libraries' counts, the last out
    restores them.
    """

    def __init__(self):
        self.lock, self.depth, self.saved = threading.Lock(), 0, []
        self.libs: list | None = None

    def available(self) -> bool:
        if self.libs is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                self.libs = []
            else:
                self.libs = [c for c in ThreadpoolController().lib_controllers
                             if c.user_api == "blas"]
        return bool(self.libs)

    def __enter__(self):
        if self.libs is None:
            self.available()
        with self.lock:
            if self.depth == 0:
                self.saved = [c.get_num_threads() for c in self.libs]
                for c in self.libs:
                    c.set_num_threads(1)
            self.depth += 1

    def __exit__(self, *exc):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for c, n in zip(self.libs, self.saved):
                    c.set_num_threads(n)


one_thread = OneThread()

SPLIT_WORK = 1 << 21
"""Element operations (elements times each one's cost, see :func:`rows`) below
which a fused kernel always runs on the calling thread: handing rows to another
thread and waiting for it costs about as much as that many operations take."""
TRY_EVERY = 8
"""Every this many calls of a kernel, :func:`rows` runs it the way it estimates slower."""
SHARE: bool | None = None
"""``None``: :func:`rows` times both ways; ``True`` / ``False``: always / never shares
the rows (tests and measurements set it)."""


class _Pace:
    """A kernel's seconds per element operation, on the calling thread alone and with
    its rows shared (moving averages; None until first timed)."""

    __slots__ = ("alone", "shared", "calls")

    def __init__(self):
        self.alone = self.shared = None
        self.calls = 0


_paces: dict = {}  # kernel loop -> its _Pace


def rows(loop: Callable, out, args: tuple, cut: tuple, work: int) -> None:
    """``loop(out, *args)``, its rows (``out``'s axis 0, and that of each argument
    whose ``cut`` is true) shared among a thread per core where that is faster.

    Whether it is depends on the machine and on how busy its other cores are, so
    the kernel is timed both ways and runs the faster, trying the other way now
    and then (:data:`TRY_EVERY`): the results are the same bit for bit, each
    element computed by the same code. Below :data:`SPLIT_WORK` element operations,
    or inside a block loop (:data:`one_thread` held: the cores are taken), the
    kernel runs on the calling thread.
    """
    k = 1 if work < SPLIT_WORK or one_thread.depth or SHARE is False \
        else min(cores(), out.shape[0])
    if k < 2:
        loop(out, *args)
        return
    if SHARE:
        _shared(k, loop, out, args, cut)
        return
    pace = _paces.get(loop)
    if pace is None:
        pace = _paces[loop] = _Pace()
    pace.calls += 1
    if pace.alone is None or pace.shared is None:
        shared = pace.alone is not None
    else:
        shared = (pace.shared < pace.alone) != (pace.calls % TRY_EVERY == 0)
    start = perf_counter()
    if shared:
        _shared(k, loop, out, args, cut)
    else:
        loop(out, *args)
    took = (perf_counter() - start) / work
    before = pace.shared if shared else pace.alone
    took = took if before is None else before + (took - before) / 4
    if shared:
        pace.shared = took
    else:
        pace.alone = took


def _shared(k: int, loop: Callable, out, args: tuple, cut: tuple) -> None:
    n = out.shape[0]
    bounds = [n * i // k for i in range(k + 1)]
    part = lambda i: (out[bounds[i]:bounds[i + 1]],  # noqa: E731
                      *[a[bounds[i]:bounds[i + 1]] if c else a for a, c in zip(args, cut)])
    futures = [pool(k - 1).submit(loop, *part(i)) for i in range(1, k)]
    try:
        loop(*part(0))
    finally:
        concurrent.futures.wait(futures)
    for f in futures:
        f.result()  # a worker's error, raised here
