"""exp, log, tanh and the sigmoid as numba functions that LLVM vectorizes.

numba calls libm's scalar ``exp`` and ``tanh`` one element at a time, so a
loop over them never becomes SIMD code. These have no calls, no tables and no
branches (every case is computed and picked with a select), so a loop of them
compiles to AVX / AVX-512 instructions. They are Python source, pasted into
the generated kernels of :mod:`.fuse` (:func:`source`): a kernel's text, and
with it its disk-cache entry, changes whenever they do.

Each works in float64; the float32 forms (``T`` the kernel's dtype) round the
float64 result once. Accuracy against NumPy over the whole range (see
tests/test_program_fuse.py): within 3 ulp, special values exact (+-0 with
its sign, +-inf, NaN, overflow to inf, underflow through the subnormals to 0).

* ``exp``: Cody-Waite reduction ``x = k ln2 + r``, ``|r| <= ln2/2`` (``ln2`` in
  two parts, ``k ln2_hi`` exact), ``e^r - 1`` by its Taylor series to ``r^13``
  by Estrin's scheme (short dependency chains), and ``2^k`` built from
  exponent bits in two halves, so that every ``k`` from -1076 to 1024 is a
  normal number's exponent.
* ``tanh``: ``e = e^{-2|x|} - 1`` by the same reduction, as ``2^k (e^r - 1) +
  (2^k - 1)`` (no cancellation near 0, where ``k = 0``), then ``-e / (2 + e)``
  with the sign restored, ``-2|x|`` capped at -40 (where the result is 1
  already): one division and no branch for small ``|x|`` (Cephes' rational
  there costs a third more per element).
* ``log``: ``x = 2^k m``, ``m`` in ``[sqrt(1/2), sqrt(2))`` (subnormals scaled by
  ``2^54`` first), ``log m = 2 atanh(f)``, ``f = (m-1)/(m+1)``, by fdlibm's
  polynomial in ``f^2``, ``k ln2`` added in two parts.
* ``sigmoid``: the rule's stable form: ``e = exp(-|x|)``, ``1/(1+e)`` for
  ``x >= 0``, ``e/(1+e)`` below.

Polynomials use fused multiply-adds (``_fma``, from :data:`PRELUDE`), written out:
numba's ``fastmath`` flags would apply to the whole kernel once these are
inlined into it, and the kernel's own arithmetic must round as NumPy's does.
"""
from __future__ import annotations

import hashlib
import pathlib

# Imported by every kernel module: two LLVM operations numba has no spelling for. The
# digest of their module (read, not imported: that would load numba) is part of the
# text, so numba's cache of a kernel follows them.
_INTRINSICS = hashlib.sha1((pathlib.Path(__file__).parents[1] / "backends" / "intrinsics.py")
                           .read_bytes()).hexdigest()[:12]
PRELUDE = f'''
from einsumgrad.backends.intrinsics import fma as _fma, wide as _wide  # {_INTRINSICS}
'''

# name -> (the helpers it calls, its source); source() adds the decorator
_DEFS = {
    "_em1": ((), '''
def _em1(r):
    # e^r - 1 for |r| <= ln2/2: Taylor to r^13, Estrin's scheme
    r2 = r * r
    r4 = r2 * r2
    hi = _fma(r4, _fma(r, 1.60590438368216145994e-10, 2.08767569878680989792e-09),
              _fma(r2, _fma(r, 2.50521083854417187751e-08, 2.75573192239858906526e-07),
                   _fma(r, 2.75573192239858906526e-06, 2.48015873015873015873e-05)))
    lo = _fma(r4, _fma(r2, _fma(r, 1.98412698412698412698e-04, 1.38888888888888888889e-03),
                       _fma(r, 8.33333333333333333333e-03, 4.16666666666666666667e-02)),
              r2 * _fma(r, 1.66666666666666666667e-01, 0.5))
    return r + _fma(r4 * r4, hi, lo)
'''),
    "_expc": (("_em1",), '''
def _expc(x):
    # e^x for x in [-746, 710], not NaN
    kf = np.floor(_fma(x, 1.4426950408889634, 0.5))
    r = _fma(kf, -1.90821492927058770002e-10, _fma(kf, -6.93147180369123816490e-01, x))
    p = 1.0 + _em1(r)
    k = np.int64(kf)
    h = k >> 1
    return (p * np.int64((h + 1023) << 52).view(np.float64)
            * np.int64((k - h + 1023) << 52).view(np.float64))
'''),
    "_exp64": (("_expc",), '''
def _exp64(x):
    xc = x if x > -746.0 else -746.0  # NaN lands here too, restored below
    y = _expc(xc if xc < 710.0 else 710.0)
    return y if x == x else x
'''),
    "_tanh64": (("_em1",), '''
def _tanh64(x):
    z = np.abs(x)
    w = z * -2.0
    w = w if w > -40.0 else -40.0  # NaN lands here too, restored below
    kf = np.floor(_fma(w, 1.4426950408889634, 0.5))
    r = _fma(kf, -1.90821492927058770002e-10, _fma(kf, -6.93147180369123816490e-01, w))
    s = np.int64((np.int64(kf) + 1023) << 52).view(np.float64)
    em = _fma(s, _em1(r), s - 1.0)  # e^w - 1 = 2^k (e^r - 1) + 2^k - 1
    t = np.copysign(em / (-2.0 - em), x)
    return t if z == z else x
'''),
    "_log64": ((), '''
def _log64(x):
    tiny = x < 2.2250738585072014e-308
    b = np.float64(x * 18014398509481984.0 if tiny else x).view(np.int64)  # 2^54
    # the exponent of x / sqrt(1/2), so that m lands in [sqrt(1/2), sqrt(2))
    ke = ((b + 0x00095F619980C433) >> 52) - 1023
    m = np.int64(b - (ke << 52)).view(np.float64)
    kf = np.float64(ke) - (54.0 if tiny else 0.0)
    g = m - 1.0
    f = g / (m + 1.0)
    f2 = f * f
    f4 = f2 * f2
    t = _fma(f2, _fma(f4, _fma(f4, _fma(f4, 1.479819860511658591e-01, 1.818357216161805012e-01),
                               2.857142874366239149e-01), 6.666666666666735130e-01),
             f4 * _fma(f4, _fma(f4, 1.531383769920937332e-01, 2.222219843214978396e-01),
                       3.999999999940941908e-01))
    hfsq = 0.5 * g * g
    y = kf * 6.93147180369123816490e-01 - (
        (hfsq - _fma(f, hfsq + t, kf * 1.90821492927058770002e-10)) - g)
    y = y if x > 0.0 else (-np.inf if x == 0.0 else np.nan)
    return y if x < np.inf else x + x
'''),
    "_sigmoid64": (("_exp64",), '''
def _sigmoid64(x):
    e = _exp64(-np.abs(x))
    return (1.0 if x >= 0.0 else e) / (1.0 + e)
'''),
}

# primitive -> its helper in a kernel (one argument and result, of the kernel's dtype T)
FUNCTIONS = {"exp": "_exp", "log": "_log", "tanh": "_tanh", "sigmoid": "_sigmoid"}

_DECORATOR = '@numba.njit(inline="always", error_model="numpy")'


def _closure(names) -> list:
    order: list = []

    def visit(n):
        if n not in order:
            for d in _DEFS[n][0]:
                visit(d)
            order.append(n)
    for n in names:
        visit(n)
    return order


def source(prims) -> str:
    """:data:`PRELUDE` and the helpers of the primitives ``prims`` that are in
    :data:`FUNCTIONS`, as source for a kernel module whose globals include
    ``numba``, ``np`` and ``T`` (its dtype): each helper ``_name(x)`` takes and
    returns a ``T``."""
    wanted = [FUNCTIONS[p] for p in sorted(set(prims)) if p in FUNCTIONS]
    parts = [PRELUDE.strip() + "\n"]
    parts += [f"{_DECORATOR}{_DEFS[n][1]}" for n in _closure([n + "64" for n in wanted])]
    parts += [f"{_DECORATOR}\ndef {n}(x):\n    return T({n}64(np.float64(x)))\n" for n in wanted]
    return "\n\n".join(parts)
