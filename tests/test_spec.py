"""The spec layer: parsing NumPy's grammar, the errors it raises, and plan caching."""
import numpy as np
import pytest

import einsumgrad as eg
import einsumgrad.plan
from backends import npy, xb
from einsumgrad.spec import ELLIPSIS, parse


def ones(*shape):
    return xb(np.ones(shape))


# -- parsing --------------------------------------------------------------------------

def test_labels_are_ints_and_letters_keep_their_code():
    spec = parse("ij,jk->ik")
    assert spec.inputs == ((ord("i"), ord("j")), (ord("j"), ord("k")))
    assert spec.output == (ord("i"), ord("k"))
    assert str(spec) == "ij,jk->ik"


@pytest.mark.parametrize("implicit,explicit", [
    ("ij,jk", "ij,jk->ik"),
    ("ba", "ba->ab"),
    ("ii", "ii->"),
    ("Ba,a", "Ba,a->B"),         # uppercase sorts first, as in NumPy
    ("...ij,...jk", "...ij,...jk->...ik"),
    (",", ",->"),
])
def test_implicit_output_follows_numpy(implicit, explicit):
    # Every axis of size 2; a '...' covers one axis.
    rng = np.random.default_rng(0)
    ops = [rng.standard_normal((2,) * (len(t.replace("...", "")) + ("..." in t)))
           for t in implicit.split(",")]
    ndims = tuple(o.ndim for o in ops)
    assert parse(implicit, ndims) == parse(explicit, ndims)
    np.testing.assert_allclose(npy(eg.einsum(implicit, *[xb(o) for o in ops])),
                               np.einsum(implicit, *ops))


def test_ellipsis_expands_right_aligned_from_the_ranks():
    spec = parse("...i,j...->ij...", (3, 2))
    a, b = ELLIPSIS, ELLIPSIS + 1
    assert spec.inputs == ((a, b, ord("i")), (ord("j"), b))
    assert spec.output == (ord("i"), ord("j"), a, b)


def test_spaces_are_ignored():
    assert parse(" ij , jk -> ik ") == parse("ij,jk->ik")
    assert parse("... i , i -> ... ", (2, 1)) == parse("...i,i->...", (2, 1))


def test_ellipsis_left_out_of_an_explicit_output_is_summed():
    # As torch and NumPy's optimize path: the axes under '...' are summed.
    spec = parse("...ij,...j->i", (3, 1))
    a = ELLIPSIS
    assert spec.inputs == ((a, ord("i"), ord("j")), (ord("j"),))
    assert spec.output == (ord("i"),)
    assert str(spec) == "...ij,j->i"
    assert parse("...i->i").output == (ord("i"),)  # no ranks: the opaque group summed


# -- errors name the culprit ----------------------------------------------------------

def test_one_index_two_sizes_names_index_and_both_sizes():
    with pytest.raises(eg.EinsumError) as e:
        eg.einsum("ij,jk->ik", ones(2, 3), ones(4, 5))
    msg = str(e.value)
    assert "'j'" in msg and "3" in msg and "4" in msg


@pytest.mark.parametrize("spec,shapes,culprit", [
    ("i$,j->ij", [(2, 2), (2,)], "'$'"),
    ("ij,j1->i", [(2, 2), (2, 2)], "'1'"),
    ("ij,jk->ik", [(2, 3)], "2 operand(s) but 1"),
    ("ij", [(2, 3), (3,)], "1 operand(s) but 2"),
    ("ij->i", [(2, 3, 4)], "rank 3"),
    ("ijk->i", [(2, 3)], "operand 0 has rank 2"),
    ("ij->k", [(2, 3)], "'k'"),
    ("ij->ii", [(2, 3)], "'i' is repeated"),
    ("ij-i", [(2, 3)], "malformed arrow"),
    ("ij>i", [(2, 3)], "malformed arrow"),
    ("ij-->i", [(2, 3)], "malformed arrow"),
    ("ij->i->j", [(2, 3)], "malformed arrow"),
    ("ii->i", [(2, 3)], "'i' is repeated in operand 0"),
    ("i...j...->", [(2, 3, 4)], "'...' more than once"),
    (". ..i->i", [(2, 3)], "space inside '...'"),
    ("i- >i", [(3,)], "space inside '->'"),
])
def test_bad_spec_raises_einsum_error_naming_the_culprit(spec, shapes, culprit):
    with pytest.raises(eg.EinsumError) as e:
        eg.einsum(spec, *[ones(*s) for s in shapes])
    assert culprit in str(e.value)
    assert isinstance(e.value, ValueError)


def test_no_operands_and_non_string_spec():
    with pytest.raises(eg.EinsumError, match="no operands"):
        eg.einsum("ij->j")
    # A TypeError, as NumPy and torch raise, and still an EinsumError.
    for spec in (3, None, b"i"):
        with pytest.raises(eg.EinsumError, match="must be a string") as e:
            eg.einsum(spec, ones(2))
        assert isinstance(e.value, TypeError) and type(spec).__name__ in str(e.value)


def test_derive_validates_too():
    with pytest.raises(eg.EinsumError, match="'j'"):
        eg.derive("ij,jk->ik", (2, 3), (4, 5))
    with pytest.raises(eg.EinsumError, match="'k'"):
        eg.derive("ij->k")
    with pytest.raises(eg.EinsumError, match="operand 1.*axis 0.*negative"):
        eg.derive("ij,jk->ik", (2, 3), (-3, 4))


def test_size_one_broadcasts_as_in_numpy():
    # Size 1 broadcasts against any size, exactly as NumPy allows.
    a, b = np.ones((2, 1)), np.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(npy(eg.einsum("ij,jk->ik", xb(a), xb(b))),
                               np.einsum("ij,jk->ik", a, b))


# -- planning happens once ---------------------------------------------------------------

def test_second_call_with_same_spec_and_shapes_does_not_plan_again():
    a, b, c = ones(3, 5), ones(5, 7), ones(7, 2)
    eg.einsum("ab,bc,cd->ad", a, b, c)
    before = einsumgrad.plan.stats["planned"]
    for _ in range(3):
        eg.einsum("ab,bc,cd->ad", a, b, c)
    assert einsumgrad.plan.stats["planned"] == before
    eg.einsum("ab,bc,cd->ad", ones(4, 5), b, c)  # new shapes: a new plan
    assert einsumgrad.plan.stats["planned"] > before


def test_plan_caches_stay_bounded_over_changing_batch_sizes():
    # Variable-length batches make a new shape every step: the caches keep the
    # most recent plans only, so memory stays flat however many shapes pass.
    import gc
    import tracemalloc
    from einsumgrad.plan import CACHE_SIZE
    w = eg.tensor(xb(np.ones((3, 2))))
    run = lambda lo, hi: [eg.einsum("bi,ij->bj", xb(np.ones((b, 3))), w) for b in range(lo, hi)]
    tracemalloc.start()  # before the caches fill: what they drop later is traced too
    run(1, 2 * CACHE_SIZE)
    gc.collect()  # a dropped plan is a cycle of closures: freed by the collector
    before = tracemalloc.get_traced_memory()[0]
    run(2 * CACHE_SIZE, 6 * CACHE_SIZE)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(einsumgrad.plan._plans) <= CACHE_SIZE
    assert grown < 1 << 20, f"{grown / 2**20:.1f} MB more after {4 * CACHE_SIZE} new shapes"
    before = einsumgrad.plan.stats["planned"]
    eg.einsum("bi,ij->bj", xb(np.ones((6 * CACHE_SIZE - 1, 3))), w)  # recent: still planned
    assert einsumgrad.plan.stats["planned"] == before
