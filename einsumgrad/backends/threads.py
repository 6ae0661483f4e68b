"""Host threads: the cores, one pool, BLAS held at one thread, rows shared.

Users: a program's chunked replay (:mod:`einsumgrad.program.chunk`) shares a
row-independent program's blocks among a thread per core; a large fused kernel
(:mod:`einsumgrad.program.fuse`) and the eager path's large numba kernels
(:mod:`.kernels`: pooling, GELU, ReLU's VJP, a convolution's windows; at most as
many threads as MKL's GEMM is given) share their rows among them where that is
measured faster (:func:`rows`); a convolution's blocks may go to a thread per
core (einsumgrad.rules.convolution). Each pool thread runs MKL on itself alone.
NumPy's ufuncs, BLAS and the kernels release the GIL, so Python threads run
them side by side.
They never nest: a kernel run inside a block loop (:data:`one_thread` held) or
on a pool thread stays on its thread.

Where MKL runs on GNU OpenMP (:func:`.mkl.on_gnu_openmp`) and numba's ``omp``
layer loads, a kernel's rows go instead to a ``prange`` twin of its loop
(:func:`openmp`): numba's OpenMP team is the one MKL's last product ran on,
its workers still spinning, where a pool thread would wait for the core they
hold; and a convolution's block loop to the ``window_products`` kernel on that
team (waking a pool thread and hearing back from it took 80 us). The pool then
serves the program's chunked replays, and the block loops where MKL is not
on that team.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import os
import threading
from time import perf_counter
from typing import Callable

from . import mkl

_pools: dict = {}  # worker count -> a thread pool kept for the process
_NAME = "einsumgrad-blocks"
_pools_lock = threading.Lock()
os.register_at_fork(after_in_child=_pools.clear)  # their threads stay in the parent


def pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool of ``n`` workers, made once per process; each runs its BLAS
    on itself alone (:func:`_one_blas_thread`)."""
    with _pools_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = concurrent.futures.ThreadPoolExecutor(
                n, thread_name_prefix=_NAME, initializer=_one_blas_thread)
        return p


def _one_blas_thread() -> None:
    """MKL at one thread on this (pool) thread. MKL's count is per thread, as
    OpenMP's: the limit :data:`one_thread` sets reaches the thread that sets it,
    and a pool thread's products would each start a team of their own beside
    the other cores' work. OpenBLAS's count is global: one_thread holds it."""
    if mkl.matmul is not None:
        mkl.set_local_threads(1)


def _in_pool() -> bool:
    """Whether this thread is one of the pool's: it must not wait on the pool."""
    return threading.current_thread().name.startswith(_NAME)


def nested() -> bool:
    """Whether the cores are taken: this thread is one of the pool's, or a block
    loop holds BLAS at one thread (:data:`one_thread`). Work then stays on it."""
    return bool(one_thread.depth) or _in_pool()


mkl.nested = nested  # a product's race waits for the cores (mkl._may_race)


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
                if _openmp:
                    _rest_team()
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
TEAM_WORK = 1 << 19
""":data:`SPLIT_WORK` for numba's OpenMP team (:func:`openmp`), whose workers are
still spinning from the last product: a parallel kernel's start costs about as
much as this many operations take (bench/README: seed 000's fused chain at
B = 256, below it, ran slower split; at B = 1024 faster)."""
SHARE: bool | None = None
"""``None``: :func:`rows` times both ways; ``True`` / ``False``: always / never shares
the rows (tests and measurements set it)."""


class Timed:
    """Ways of running one thing, each timed as it runs: the fastest runs.

    A way's estimate is its best time over its last :attr:`TRIES` runs: noise
    only ever slows a run, so one slow call (an interrupt, another process) moves
    nothing, while a way slowed for good (a busy core) shows within as many calls.
    The first calls take the ways in turn, :attr:`TRIES` each; then the fastest
    runs, and now and then one of the others takes a turn, :attr:`TRIES` calls in
    a row, so a way that became the faster (a core another process freed) is
    found again: a turn's first call finds caches that another way's calls
    filled (timed on it alone, a whole replay lost to a slower blocked one), and
    its earlier estimate may hold costs its first calls paid once (a product's
    own BLAS race). A slower way takes its turn after ``every`` calls, then after
    twice as many each time the slower ways stay slower (up to :attr:`BACKOFF`
    times ``every``: a way that loses for good costs ever less), after ``every``
    again once another way leads (by winning its turn, or by the leader slowing).
    """

    TRIES = 3
    BACKOFF = 16

    __slots__ = ("times", "recent", "counts", "every", "gap", "left", "tried", "turn",
                 "streak", "leader")

    def __init__(self, ways: int, every: int):
        self.times, self.counts = [float("inf")] * ways, [0] * ways
        self.recent = [collections.deque(maxlen=self.TRIES) for _ in range(ways)]
        self.every = self.gap = self.left = every
        self.tried = 0  # slower ways' turns so far: whose comes next
        self.turn, self.streak = None, 0  # a turn under way: its way, its calls left
        self.leader = None  # the way run between turns

    def pick(self) -> int:
        """The way to run now."""
        n = min(self.counts)
        if n < self.TRIES:
            return self.counts.index(n)
        if self.streak:
            return self.turn
        best = min(range(len(self.times)), key=self.times.__getitem__)
        if best != self.leader:  # the others' turns come soon again
            self.leader, self.gap, self.left = best, self.every, self.every
        self.left -= 1
        if self.left > 0:
            return best
        others = [i for i in range(len(self.times)) if i != best]
        self.tried += 1
        self.turn, self.streak = others[self.tried % len(others)], self.TRIES
        return self.turn

    def record(self, way: int, seconds: float) -> None:
        """How long ``way`` took this time (per unit of work, where that varies)."""
        self.counts[way] += 1
        self.recent[way].append(seconds)
        self.times[way] = min(self.recent[way])
        if self.streak:  # a slower way's turn
            self.streak -= 1
            if not self.streak:  # over: did it win?
                won = self.times[way] == min(self.times)
                self.gap = self.every if won else min(2 * self.gap, self.BACKOFF * self.every)
                self.left = self.gap


_paces: dict = {}  # kernel loop -> its Timed (0: alone, 1: rows shared), per element operation


def rows(loop: Callable, out, args: tuple, cut: tuple, work: int, limit: int | None = None,
         team: Callable | None = None) -> None:
    """``loop(out, *args)``, its rows (``out``'s axis 0, and that of each argument
    whose ``cut`` is true) shared among a thread per core where that is faster.

    Whether it is depends on the machine and on how busy its other cores are, so
    the kernel is timed both ways and runs the faster, trying the other way now
    and then (:class:`Timed`): the results are the same bit for bit, each element
    computed by the same code. Below :data:`SPLIT_WORK` element operations
    (:data:`TEAM_WORK` on the team), or inside a block loop (:data:`one_thread`
    held: the cores are taken) or on a pool thread, the kernel runs on the
    calling thread. ``limit``, where given, caps the threads
    (the eager path passes the BLAS's count: one thread means one). ``team``, where
    given, is ``loop``'s ``prange`` twin: on OpenMP's threads (:func:`openmp`) it
    takes the rows in place of the pool.
    """
    on = team is not None and openmp()
    if on:
        k = min(team_threads(work, limit), out.shape[0])
    else:
        k = 1 if work < SPLIT_WORK or SHARE is False or nested() \
            else min(cores(), out.shape[0], limit or out.shape[0])
    if k < 2:
        loop(out, *args)
        return
    if on:
        on_team(k, team, out, *args)
        return
    if SHARE:
        _shared(k, loop, out, args, cut)
        return
    pace = _paces.get(loop)
    if pace is None:
        pace = _paces[loop] = Timed(2, every=8)
    way = pace.pick()
    start = perf_counter()
    if way:
        _shared(k, loop, out, args, cut)
    else:
        loop(out, *args)
    pace.record(way, (perf_counter() - start) / work)


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


_openmp: bool | None = None  # decided once per process (a forked child decides again)
_team_size = threading.local()  # numba's thread count, per thread that launches


def openmp() -> bool:
    """Whether kernels' rows run on numba's OpenMP layer, the runtime MKL runs on.

    True where MKL is on GNU OpenMP (:mod:`.mkl` picks it where numba can share
    it) and numba's ``omp`` layer loads (it needs GNU OpenMP; ``NUMBA_THREADING_LAYER``
    unset or ``omp``). numba's parallel kernels cannot run in a child forked
    after its OpenMP layer started (numba ends that process), so a forked child
    answers False; its MKL runs on one thread (:mod:`.mkl`), and so do its kernels.
    """
    global _openmp
    if _openmp is None:
        with _pools_lock:
            if _openmp is None:
                _openmp = _start_openmp()
    return _openmp


def _start_openmp() -> bool:
    if not mkl.on_gnu_openmp():
        return False
    try:
        import numba
        from numba.np.ufunc import omppool  # noqa: F401  (ImportError without GNU OpenMP)
        from numba.np.ufunc import parallel
    except ImportError:
        return False
    if numba.config.THREADING_LAYER not in ("default", "omp"):
        return False
    if parallel._is_initialized and numba.threading_layer() != "omp":
        return False  # numba already runs another layer in this process
    numba.config.THREADING_LAYER = "omp"
    global _gomp
    gomp = _gomp = ctypes.CDLL("libgomp.so.1")
    before = gomp.omp_get_max_threads()
    parallel._launch_threads()
    gomp.omp_set_num_threads(before)  # numba's start sets it: torch reads it as its own count
    os.register_at_fork(after_in_child=_after_fork)
    return True


_gomp = None  # GNU OpenMP, once the team has started


def _rest_team() -> None:
    """End the calling thread's OpenMP team, whose workers would spin on the cores a
    block loop's pool threads are about to take (GNU OpenMP's spin is long); the
    next parallel region starts them again."""
    _gomp.omp_pause_resource_all(1)  # omp_pause_soft


def _after_fork() -> None:
    global _openmp
    _openmp = False


def team_threads(work: int, limit: int | None = None) -> int:
    """How many threads of the OpenMP team a ``prange`` kernel of ``work`` element
    operations should take (:func:`rows`' rule, at most ``limit``): 1 where there
    is no team (:func:`openmp`), the work is below :data:`TEAM_WORK`, the cores
    are taken or :data:`SHARE` is False."""
    if work < TEAM_WORK or SHARE is False or nested() or not openmp():
        return 1
    return min(cores(), limit or cores())


def on_team(k: int, team: Callable, out, *args) -> None:
    """``team(out, *args)``, a ``prange`` loop, on ``k`` threads of numba's OpenMP team."""
    if getattr(_team_size, "n", None) != k:
        import numba
        numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
        _team_size.n = k
    team(out, *args)
