"""The NumPy backend's matmul: NumPy's or MKL's per dtype and size class, by measurement
(einsumgrad/backends/mkl.py: blas_choices, chosen_matmul), never MKL just for being there."""
import json

import numpy as np
import pytest

from einsumgrad.backends import NUMPY, mkl

needs_mkl = pytest.mark.skipif(mkl.matmul is None, reason="the mkl wheel is not installed")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A cache folder of the test's own and no choice made yet in this process; OpenBLAS
    in small blocks out of the race (the tests that time it say so: :func:`small`)."""
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    monkeypatch.delenv("EINSUMGRAD_BLAS", raising=False)
    real = mkl.openblas_team
    monkeypatch.setattr(mkl, "openblas_team",
                        lambda workers, small=False: None if small else real(workers))
    monkeypatch.setattr(mkl, "SHAPE_AFTER", 10 ** 9)  # classes only (:func:`shapes_raced`)
    mkl.forget_choices()
    yield tmp_path
    mkl.forget_choices()


@pytest.fixture
def small(fresh, monkeypatch):
    """:func:`fresh`, with OpenBLAS in small blocks racing; yields the shapes it ran."""
    from einsumgrad.backends import kernels
    ran = []
    real = kernels.team_matmul

    def team_matmul(a, b, out=None, workers=2, small=False):
        got = real(a, b, out, workers, small)
        if small and got is not None:
            ran.append(a.shape)
        return got
    monkeypatch.setattr(kernels, "team_matmul", team_matmul)
    monkeypatch.setattr(mkl, "openblas_team", kernels._openblas_team)
    yield ran


def assert_product(got, a, b):
    """``got`` is ``a @ b`` within the rounding any BLAS may give: each entry within a
    few units of its terms' magnitude (``|a| @ |b|``; a relative bound alone fails
    on entries that cancel to near zero, which two libraries round differently)."""
    want = np.matmul(a, b)
    assert got.dtype == want.dtype and got.shape == want.shape
    bound = 16 * a.shape[-1] * np.finfo(want.dtype).eps * np.matmul(np.abs(a), np.abs(b))
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def shapes(kind: str, n: int):
    rng = np.random.default_rng(0)
    a = {"mat": (n, n), "vec": (n, n), "batch": (3, n, n)}[kind]
    b = {"mat": (n, n), "vec": (n,), "batch": (3, n, n)}[kind]
    return rng.standard_normal(a), rng.standard_normal(b)


@needs_mkl
def test_measured_once_then_read_from_disk(fresh, monkeypatch):
    # MKL measured faster from 2^20 multiply-adds on (against NumPy's or OpenBLAS on
    # MKL's team): at several MKL threads the threaded classes never take NumPy's
    # (2^18 then MKL's or the team's); NumPy's below
    monkeypatch.setattr(mkl, "_race", lambda a, b, fns=None: (1.0, 2.0) if a.size * b.shape[-1]
                        * (a.shape[0] if a.ndim == 3 else 1) >= 1 << 20 else (2.0, 1.0))
    pooled = mkl._LIB.MKL_Get_Max_Threads() > 1
    low = "openblas" if mkl.openblas_team(2) is not None else "mkl"
    got = mkl.blas_choices(np.float64)
    assert got["mat"] == {b: "numpy" if b < 18 else low if b == 18 and pooled
                          else "numpy" if b == 18 else "mkl" for b in mkl._BUCKETS}
    saved = json.loads((fresh / "blas.json").read_text())
    assert any(k.endswith("|float64") for k in saved)
    mkl.forget_choices()
    monkeypatch.setattr(mkl, "measure", lambda dtype: pytest.fail("measured again"))
    assert mkl.blas_choices(np.float64) == got
    # the backend's matmul follows the choice, with NumPy's values
    calls = []
    real = mkl.matmul
    monkeypatch.setattr(mkl, "matmul", lambda a, b, out=None: calls.append(a.shape) or real(a, b))
    for n, want in ((48, 0), (128, 1)):  # 2^16.8 and 2^21 multiply-adds: NumPy's, MKL's
        a, b = shapes("mat", n)
        assert_product(NUMPY.matmul(a, b), a, b)
        assert len(calls) == want


@needs_mkl
@pytest.mark.parametrize("mkl_threads", [2, 1])
def test_the_threaded_classes_never_mix_the_two_pools(fresh, monkeypatch, mkl_threads):
    # NumPy's faster in most classes, MKL's in some: on several MKL threads no
    # threaded class takes NumPy's matmul (MKL's pool runs the backend's other MKL
    # work anyway: NumPy's products would add a second pool beside it); a single
    # product's classes race MKL against OpenBLAS on MKL's team (here the team
    # wins the square ones), the rest take MKL's; the small one its faster; on
    # one thread (no pool of MKL's), each class takes its faster
    def race(a, b, fns=None):
        kind, work = mkl._kind_and_work(a, b)
        if fns is not None:
            return (2.0, 1.0) if kind == "mat" else (1.0, 2.0)
        return (1.0, 2.0) if work < 1 << 17 or (1 << 21) <= work < 1 << 23 else (3.0, 1.0)
    team = mkl.openblas_team(2) is not None
    monkeypatch.setattr(mkl, "_race", race)
    monkeypatch.setattr(mkl._LIB, "MKL_Get_Max_Threads", lambda: mkl_threads)
    got = mkl.blas_choices(np.float32)
    rng = np.random.default_rng(0)
    for kind in mkl._KINDS:
        faster = {b: "mkl" if race(*mkl._case(kind, b, np.float32, rng))[0] == 1.0 else "numpy"
                  for b in mkl._BUCKETS}
        assert "numpy" in faster.values()  # the two rules differ here
        threaded = "openblas" if team and kind == "mat" else "mkl"
        want = {b: threaded if mkl_threads > 1 and b >= mkl._THREADED else c
                for b, c in faster.items()}
        assert got[kind] == want
        for suffix in ("-bt", "-at") if kind in ("mat", "thin") else ():
            assert got[kind + suffix] == want  # each layout raced alike: alike here
    assert set(got) == set(mkl.CHOICE_KINDS)


def test_size_classes_tell_thin_products_from_square_ones():
    # a convolution over im2col windows (as many output columns as channels) and
    # its transpose are thin; a dense layer's products, a vector, a batch are not
    cases = [((25088, 144), (144, 32), "thin"), ((32, 144), (144, 25088), "thin"),
             ((2048, 64), (64, 256), "mat"), ((256, 2048), (2048, 64), "mat"),
             ((512, 512), (512,), "vec"), ((4, 64, 64), (64, 64), "batch")]
    for sa, sb, kind in cases:
        a, b = np.empty(sa, np.float32), np.empty(sb, np.float32)
        assert mkl._kind_and_work(a, b) == (kind, a.size * (b.shape[-1] if b.ndim > 1 else 1)), sa
    rng = np.random.default_rng(0)
    for kind in mkl._KINDS:  # each class's measured cases land in its own class
        for bucket in mkl._BUCKETS:
            cases = mkl._cases(kind, bucket, np.float32, rng)
            assert len(cases) == (2 if kind == "thin" and bucket <= mkl._HEAD_TOP else 1)
            for a, b in cases:
                assert mkl._kind_and_work(a, b)[0] == kind
                want = min(bucket, mkl._VEC_TOP) if kind == "vec" else bucket
                assert mkl._bucket(mkl._kind_and_work(a, b)[1]) == want, (kind, bucket, a.shape)


def test_the_race_times_each_layout_a_model_uses():
    # as given, b transposed in memory (x @ w.T), a transposed (g.T @ x): the same
    # product each time, in another memory order; a vector and a batch keep theirs
    rng = np.random.default_rng(0)
    a, b, v = rng.standard_normal((5, 3)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    got = mkl._layouts(a, b)
    assert len(got) == 3
    assert [(x.flags.c_contiguous, y.flags.c_contiguous) for x, y in got] == [
        (True, True), (True, False), (False, True)]
    for x, y in got:
        np.testing.assert_array_equal(x @ y, a @ b)
    assert len(mkl._layouts(a, v)) == 2
    s, t = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 3, 4))
    assert [y.flags.c_contiguous for _, y in mkl._layouts(s, t)] == [True, False]
    for x, y in mkl._layouts(s, t):
        np.testing.assert_array_equal(x @ y, s @ t)


@needs_mkl
def test_a_thin_product_follows_its_own_class(fresh, monkeypatch):
    # MKL faster on thin products only, on one thread: a thin product takes MKL, a
    # square one of the same work NumPy's
    monkeypatch.setattr(mkl._LIB, "MKL_Get_Max_Threads", lambda: 1)
    monkeypatch.setattr(mkl, "_race", lambda a, b, fns=None: (1.0, 2.0)
                        if mkl._kind_and_work(a, b)[0] == "thin" else (2.0, 1.0))
    calls = []
    real = mkl.matmul
    monkeypatch.setattr(mkl, "matmul", lambda a, b, out=None: calls.append(a.shape) or real(a, b))
    rng = np.random.default_rng(0)
    for sa, sb, by_mkl in (((4096, 64), (64, 16), True), ((160, 160), (160, 160), False)):
        a, b = rng.standard_normal(sa), rng.standard_normal(sb)
        calls.clear()
        assert_product(NUMPY.matmul(a, b), a, b)
        assert bool(calls) == by_mkl, sa


@needs_mkl
def test_the_choices_follow_mkls_thread_count_within_a_process(fresh, monkeypatch):
    # One thread, then two (a bench's phases, threadpoolctl, torch.set_num_threads):
    # the products at two take the two-thread choices, not the one-thread ones,
    # which would leave NumPy's pool and MKL's fighting for the cores.
    monkeypatch.setattr(mkl, "_race", lambda a, b, fns=None: (1.0, 3.0) if fns is not None
                        else (2.0, 1.0) if mkl._LIB.MKL_Get_Max_Threads() == 1
                        or mkl._kind_and_work(a, b)[1] < 1 << 21 else (1.0, 3.0))
    calls = []
    real = mkl.matmul
    monkeypatch.setattr(mkl, "matmul", lambda a, b, out=None: calls.append(a.shape) or real(a, b))
    a, b = shapes("mat", 96)  # 2^19.8 multiply-adds: a threaded class
    for threads, by_mkl in ((1, False), (2, True), (1, False)):
        monkeypatch.setattr(mkl._LIB, "MKL_Get_Max_Threads", lambda threads=threads: threads)
        calls.clear()
        assert_product(NUMPY.matmul(a, b), a, b)
        assert bool(calls) == by_mkl, threads
        assert mkl.blas_choices(np.float64)["mat"][20] == ("mkl" if by_mkl else "numpy")


@needs_mkl
def test_a_product_openblas_keeps_on_one_thread_is_numpys_whatever_the_choice(fresh, monkeypatch):
    # up to 2^18 multiply-adds OpenBLAS runs a product on the calling thread: NumPy's takes
    # it even where MKL won the class (no pool to fight MKL's); a batch still follows the class
    monkeypatch.setenv("EINSUMGRAD_BLAS", "mkl")
    calls = []
    real = mkl.matmul
    monkeypatch.setattr(mkl, "matmul", lambda a, b, out=None: calls.append(a.shape) or real(a, b))
    rng = np.random.default_rng(0)
    for sa, sb, by_mkl in (((256, 16), (16, 64), False), ((64, 64), (64, 64), False),
                           ((256, 16), (16, 65), True), ((4, 64, 64), (64, 64), True)):
        a, b = rng.standard_normal(sa), rng.standard_normal(sb)
        calls.clear()
        assert_product(NUMPY.matmul(a, b), a, b)
        assert bool(calls) == by_mkl, (sa, sb)


@needs_mkl
@pytest.mark.parametrize("rule", ["mkl", "numpy"])
def test_a_fixed_rule_measures_nothing(fresh, monkeypatch, rule):
    monkeypatch.setenv("EINSUMGRAD_BLAS", rule)
    monkeypatch.setattr(mkl, "measure", lambda dtype: pytest.fail("measured"))
    got = mkl.blas_choices()
    assert {c for d in got.values() for k in d.values() for c in k.values()} == {rule}


@needs_mkl
def test_every_class_gives_numpys_product(fresh, monkeypatch):
    monkeypatch.setenv("EINSUMGRAD_BLAS", "mkl")
    for kind in ("mat", "vec", "batch"):
        for dtype in (np.float32, np.float64):
            a, b = (x.astype(dtype) for x in shapes(kind, 96))
            want = np.matmul(a, b)
            got = NUMPY.matmul(a, b)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert_product(got, a, b)
    out = np.empty((96, 96))
    a, b = shapes("mat", 96)
    assert NUMPY.matmul(a, b, out=out) is out
    assert_product(out, a, b)


def test_small_mixed_and_other_dtypes_take_numpys(fresh, monkeypatch):
    if mkl.matmul is None:
        assert NUMPY.matmul is np.matmul
        return
    monkeypatch.setattr(mkl, "measure", lambda dtype: pytest.fail("measured"))
    for a, b in ((np.ones((4, 4)), np.ones((4, 4))), (np.ones((64, 64), int), np.ones((64, 64), int)),
                 (np.ones((64, 64), np.float32), np.ones((64, 64)))):
        np.testing.assert_array_equal(NUMPY.matmul(a, b), np.matmul(a, b))


def test_the_key_names_numpys_blas_kernel(monkeypatch):
    # tests run OpenBLAS pinned to Haswell; the bench runs it native: two measurements
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    native = mkl._machine()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    pinned = mkl._machine()
    assert native != pinned and "OPENBLAS_CORETYPE=Haswell" in pinned
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1048576")
    assert mkl._machine() not in (native, pinned)
    try:  # NumPy's BLAS by name, where its build config says (NumPy >= 1.25)
        name = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except TypeError:
        return
    assert f"numpy_blas={name}-" in native


@needs_mkl
def test_a_choice_is_measured_again_at_another_kernel(fresh, monkeypatch):
    measured = []
    monkeypatch.setattr(mkl, "measure", lambda dtype: measured.append(1) or
                        {k: {b: "numpy" for b in mkl._BUCKETS} for k in mkl.CHOICE_KINDS})
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    mkl.blas_choices(np.float64)
    mkl.forget_choices()
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    mkl.blas_choices(np.float64)
    assert len(measured) == 2 and len(json.loads((fresh / "blas.json").read_text())) == 2


def racing_small_blocks(mkl_threads: int, race, monkeypatch) -> None:
    """MKL at ``mkl_threads`` threads, the races timed by ``race`` (the small blocks
    among the contenders: the ``small`` fixture); skipped where they cannot run."""
    if mkl.openblas_team(mkl_threads, small=True) is None:
        pytest.skip("no OpenBLAS found or no OpenMP team")
    monkeypatch.setattr(mkl._LIB, "MKL_Get_Max_Threads", lambda: mkl_threads)
    monkeypatch.setattr(mkl, "_race", race)


@needs_mkl
@pytest.mark.parametrize("mkl_threads", [1, 2])
def test_a_thin_class_where_small_blocks_win_takes_them(small, monkeypatch, mkl_threads):
    # the blocks faster wherever raced: the classes whose cases OpenBLAS's small kernels
    # would take only cut up (thin from 2^20, not a square layer's) take them, on one
    # thread and on the team; a thin product then runs so, with NumPy's values
    from einsumgrad.backends import openblas
    raced = []

    def race(a, b, fns=None):
        small_race = fns is not None and getattr(fns[1], "small", False)
        raced.append(small_race)
        return (2.0, 1.0) if small_race else (1.0, 2.0)
    racing_small_blocks(mkl_threads, race, monkeypatch)
    got = mkl.blas_choices(np.float64)
    assert any(raced)
    assert {b for b, c in got["thin"].items() if c == "openblas-small"} == {20, 22, 24, 26}
    rng = np.random.default_rng(0)
    cut = {b for b in mkl._BUCKETS if any(  # a square layer's cut only where blocks keep 32 rows
        openblas.small_parts(x.shape[0], y.shape[1], x.shape[1], mkl_threads)
        for x, y in mkl._cases("mat", b, np.float64, rng))}
    assert 26 not in cut and {b for b, c in got["mat"].items() if c == "openblas-small"} == cut
    assert all(c != "openblas-small" for k in ("vec", "batch") for c in got[k].values())
    a, b = rng.standard_normal((4096, 64)), rng.standard_normal((64, 8))
    assert openblas.small_parts(4096, 8, 64, mkl_threads) > mkl_threads
    assert_product(NUMPY.matmul(a, b), a, b)
    assert small == [(4096, 64)]


@needs_mkl
@pytest.mark.parametrize("mkl_threads", [1, 2])
def test_each_layout_of_a_product_takes_its_own_choice(small, monkeypatch, mkl_threads):
    # OpenBLAS's small blocks faster where b's rows lie contiguous, slower where b is
    # transposed in memory (a layer's x @ w.T; so on the bench's AMD CPU): a thin
    # product as given and one with a transposed run in blocks, one with b
    # transposed does not, each with NumPy's values
    def race(a, b, fns=None):
        if fns is not None and getattr(fns[1], "small", False):
            return (1.0, 2.0) if b.strides[-1] != b.itemsize else (2.0, 1.0)
        return (1.0, 2.0)
    racing_small_blocks(mkl_threads, race, monkeypatch)
    got = mkl.blas_choices(np.float64)
    for kind in ("thin", "thin-at"):
        assert {b for b, c in got[kind].items() if c == "openblas-small"} == {20, 22, 24, 26}
    assert "openblas-small" not in got["thin-bt"].values()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4096, 64)), rng.standard_normal((64, 8))
    bt, at = np.asfortranarray(b), np.asfortranarray(a)
    for x, y, blocks in ((a, b, True), (at, b, True), (a, bt, False)):
        small.clear()
        assert_product(NUMPY.matmul(x, y), a, b)
        assert small == ([(4096, 64)] if blocks else []), (x.flags.c_contiguous, blocks)


# -- a recurring product's own shape --------------------------------------------------------

@pytest.fixture
def shapes_raced(small, monkeypatch):
    """:func:`small`, each recurring shape raced with times ``faster`` sets (seconds
    per contender's name; the others 1.0); yields ``(faster, races)``, the latter the
    contenders of each race run."""
    if mkl.openblas_team(mkl._LIB.MKL_Get_Max_Threads(), small=True) is None:
        pytest.skip("no OpenBLAS found or no OpenMP team")
    monkeypatch.setattr(mkl, "SHAPE_AFTER", 3)
    monkeypatch.setattr(mkl, "_race", lambda a, b, fns=None: (1.0, 1.0))  # classes: a tie
    faster, races = {}, []
    names = {mkl.matmul: "mkl", np.matmul: "numpy"}

    def in_turns(sides, budget, most):
        ran = [names.get(fn.func, "openblas-small" if getattr(fn.func, "small", False)
                         else "openblas") for (fn,) in sides]
        races.append(ran)
        return tuple(faster.get(n, 1.0) for n in ran)
    monkeypatch.setattr(mkl, "_in_turns", in_turns)
    yield faster, races


@needs_mkl
def test_a_recurring_shape_is_raced_once_then_read_from_disk(shapes_raced, small, fresh):
    # a convolution's block (896 x 288 @ 288 x 32): its class's choice for its first
    # calls, then its own race's winner (the small blocks here), with NumPy's values;
    # another shape of the class keeps the class's choice; a later process reads it
    faster, races = shapes_raced
    faster["openblas-small"] = 0.5
    threads = mkl._LIB.MKL_Get_Max_Threads()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((896, 288)), rng.standard_normal((288, 32))
    for _ in range(mkl.SHAPE_AFTER - 1):
        assert_product(NUMPY.matmul(a, b), a, b)
    assert races == [] and small == []
    for _ in range(3):
        assert_product(NUMPY.matmul(a, b), a, b)
    assert races == [["mkl", "openblas", "openblas-small"] if threads > 1
                     else ["numpy", "mkl", "openblas-small"]]
    assert small == [(896, 288)] * 3
    saved = json.loads((fresh / "blas.json").read_text())
    (entry,) = [v for k, v in saved.items() if k.endswith("|float64|shapes")]
    assert entry == {f"thin|{threads}|896,32,288": "openblas-small"}
    c = a[:, :200].copy()  # another shape of the class: not raced yet
    for _ in range(mkl.SHAPE_AFTER - 1):
        assert_product(NUMPY.matmul(c, b[:200]), c, b[:200])
    assert len(races) == 1 and len(small) == 3
    mkl.forget_choices()
    for _ in range(mkl.SHAPE_AFTER + 1):
        assert_product(NUMPY.matmul(a, b), a, b)
    assert len(races) == 1 and len(small) == 5  # read back, not raced again


@needs_mkl
def test_the_shapes_saved_are_the_latest_raced(shapes_raced, fresh, monkeypatch):
    # a bounded file: a process meeting ever new shapes (sequences of every length)
    # keeps the latest races, the older ones dropped (raced again if they recur)
    faster, races = shapes_raced
    monkeypatch.setattr(mkl, "_SHAPES_SAVED", 2)
    rng = np.random.default_rng(0)
    b = rng.standard_normal((288, 32))
    for m in (896, 900, 904):
        a = rng.standard_normal((m, 288))
        for _ in range(mkl.SHAPE_AFTER):
            assert_product(NUMPY.matmul(a, b), a, b)
    assert len(races) == 3
    saved = json.loads((fresh / "blas.json").read_text())
    (entry,) = [v for k, v in saved.items() if k.endswith("|float64|shapes")]
    assert [name.split("|")[-1] for name in entry] == ["900,32,288", "904,32,288"]


@needs_mkl
def test_a_shape_takes_a_winner_only_by_five_percent(shapes_raced):
    faster, races = shapes_raced
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((896, 288)), rng.standard_normal((288, 32))
    faster.update({"openblas-small": 0.97, "mkl": 0.97, "openblas": 0.97})
    for _ in range(mkl.SHAPE_AFTER):
        NUMPY.matmul(a, b)
    (ran,) = races
    kind = mkl._kind_and_work(a, b)[0]
    now = mkl.blas_choices(np.float64)[kind][mkl._bucket(896 * 288 * 32)]
    assert now in ran
    saved = mkl._shape_saved[np.dtype(np.float64)]
    assert list(saved.values()) == [now]


@needs_mkl
@pytest.mark.parametrize("case", ["below 2^20", "from 2^27", "fixed rule", "worker thread",
                                  "block loop"])
def test_where_no_shape_is_raced(shapes_raced, monkeypatch, case):
    faster, races = shapes_raced
    rng = np.random.default_rng(0)
    m, k, n = {"below 2^20": (256, 64, 32), "from 2^27": (512, 512, 512)}.get(case, (896, 288, 32))
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    if case == "fixed rule":
        monkeypatch.setenv("EINSUMGRAD_BLAS", "mkl")
    run = lambda: [NUMPY.matmul(a, b) for _ in range(mkl.SHAPE_AFTER + 1)][-1]  # noqa: E731
    if case == "worker thread":
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            got = pool.submit(run).result(timeout=120)
    elif case == "block loop":  # the cores held: times there say nothing
        from einsumgrad.backends import threads
        with threads.one_thread:
            got = run()
    else:
        got = run()
    assert_product(got, a, b)
    assert races == []


@needs_mkl
def test_an_accumulated_product_takes_its_shapes_library(shapes_raced, small):
    # a convolution's weight gradient, block by block (c += a @ b): where its shape's
    # product is not MKL's, that product added into c, in place
    faster, races = shapes_raced
    faster["openblas-small"] = 0.5
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((896, 288)).T, rng.standard_normal((896, 32))
    c0 = rng.standard_normal((288, 32))
    for _ in range(mkl.SHAPE_AFTER + 1):
        c = c0.copy()
        assert mkl.matmul_add(a, b, c) is True  # taken, not left to the backend
        assert_product(c - c0, a, b)
    assert len(races) == 1 and small == [(288, 896)] * 2
