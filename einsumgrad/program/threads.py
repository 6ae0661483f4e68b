"""Threads for a program's replay: the cores, one pool, BLAS held at one thread.

Two users: chunked replay (:mod:`.chunk`) shares a row-independent program's
blocks among a thread per core, and a fused kernel (:mod:`.fuse`) large enough
to pay splits its rows among them (:func:`rows`). NumPy's ufuncs, BLAS and the
fused kernels release the GIL, so Python threads run them side by side. The
two never nest: a kernel run inside a block loop (:data:`one_thread` held)
stays on its thread.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
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

SPLIT_WORK = 1 << 19
"""Element operations (elements times each one's cost, see :func:`rows`) below
which a fused kernel runs on the calling thread alone: handing rows to another
thread and waiting for it costs about as much as that many operations take."""


def rows(loop: Callable, out, args: tuple, cut: tuple, work: int) -> None:
    """``loop(out, *args)``, its rows (``out``'s axis 0, and that of each argument
    whose ``cut`` is true) shared among a thread per core where the ``work``
    (element operations) pays for the hand-over and no block loop holds the cores."""
    k = 1 if work < SPLIT_WORK or one_thread.depth else min(cores(), out.shape[0])
    if k < 2:
        loop(out, *args)
        return
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
