"""Fused kernels for the NumPy backend, compiled by numba when it is installed.

NumPy cannot fuse: a layer norm over 64-wide rows is six passes over the
activation (a row sum, a broadcast subtract, a square, a second row sum, a
row scale, the weight and bias), each a trip through memory, and its VJP as
many again. Here each is one loop over the rows, every row read once and
written once. On the 2-core bench machine (2048x64 float32, hot), the
forward with weight and bias takes 54 us against NumPy's ~250 (torch's
fused kernel: 45 at 2 threads), the VJP 61 us against ~480 (torch: 136).
With ``pip install einsumgrad[jit]`` the NumPy backend runs:

* ``layer_norm``: ``xhat = (x - mean) * s`` over the trailing entries of each
  row, ``s = 1 / sqrt(var + eps)``, two-pass (mean first, then the squared
  deviations) as the NumPy path, and ``xhat * weight + bias`` in the same pass;
* ``layer_norm_vjp``: the rules of :data:`einsumgrad.rules.norm.layer_norm_p`
  (and ``normalize_p``) on the forward's ``xhat`` and ``s``: the input's
  cotangent, and the weight's and bias's summed over the rows;
* ``softmax_vjp``: ``out * (g - sum(g * out))`` along each row (NumPy: a
  product, a row sum, a broadcast subtract and a product);
* ``normal_cdf``: float32 Phi(x), GELU's, by the rational erf in float64
  arithmetic, one pass (NumPy: two dozen chunked passes; MKL's vector CDF);
* ``gelu`` and ``gelu_vjp``: GELU given Phi(x), one pass, and its VJP, two
  passes around VML's exp (NumPy: two passes, and eight back);
* ``relu_vjp``: ReLU's VJP from its output, one pass (NumPy: four);
* ``divide_by_row_sums``: a softmax's rows divided by their sums in place,
  saying whether each sum was safely positive (else the softmax redoes it);
* ``window_copy``: a convolution's windows of channels-last images copied
  into rows (im2col; NumPy's strided copy of a one-channel image is 5x slower);
* ``window_max`` and ``window_max_vjp``: max pooling's tiling windows, the
  max and its VJP (mask, even split between ties, spread) in one pass each,
  on channels-last images, and on NCHW ones by kernels specialized to the
  window's size (NumPy: a fold over strided slices, and four passes back);
* ``batch_norm`` and ``batch_norm_vjp``: training-mode batch norm over the
  channels (axis 1) of NCHW or channels-last images, the statistics and the
  output in three passes, the VJP in two (NumPy: about ten each way), with a
  following ReLU's max and mask fused in on request;
* ``adam``: one Adam step, one pass (NumPy: eleven), the NumPy path's bits;
* ``attention`` and ``attention_vjp``: attention's core (``einsumgrad.rules.attention``)
  a pair of matrices at a time on MKL's OpenMP team, each pair's scores in
  cache between its GEMMs (MKL's, by address), the softmax between them;
* ``window_products``: a convolution's blocks of images shared among the
  threads of MKL's OpenMP team, each padding and copying its blocks' windows
  and multiplying them by MKL's GEMM (called by address) on itself alone. The
  team's workers spin between products, so the blocks start at once where a
  thread of einsumgrad's pool has to be woken (the bench CNN step at two
  threads: 13.6-14.1 ms on the pool, 10.6-10.7 on the team).

The engine-op rules stay the definition: the VJPs only serve a backward that
records nothing, and the tests hold every kernel to the NumPy path or the
rule. Compiled with ``fastmath`` limited to reassociation and contraction (so
sums vectorize): NaN and inf propagate as in NumPy, and results agree with it
to rounding.

Kernels take float32 and float64 NumPy arrays in C order (a cotangent in
another layout is copied first; the element-wise GELU and ReLU kernels take any
dense layout their arrays share); anything else (other dtypes, CuPy, strided
inputs) returns None and the caller's NumPy path runs. They release the GIL
and share their rows among at most as many threads as MKL's GEMM is given.
Where MKL runs on GNU OpenMP (:mod:`.mkl` picks it where numba is installed),
the layer norm, softmax VJP, GELU, ReLU, max-pooling, batch-norm and Adam kernels
have ``prange`` twins that numba's ``omp`` layer runs on that same team, whose
workers are still spinning from the last product (:func:`.threads.openmp`); the
twin is the same loop compiled for threads, so it agrees with the serial kernel
to rounding.
Elsewhere, and for a convolution's window copies, rows go to einsumgrad's
Python threads (:mod:`.threads`) where that is measured faster: a second
OpenMP runtime beside MKL's would fight it for the cores, and set the thread
count torch reads (measured: torch "at one thread" then ran on two).
``EINSUMGRAD_JIT=0`` turns them off. The first call per dtype compiles
(about a second, a few for a twin), cached on disk afterwards.
"""
from __future__ import annotations

import math
import os
import types
from typing import Any

import numpy

from . import compiled, mkl, openblas, threads
from .base import memory_order

_ENABLED = os.environ.get("EINSUMGRAD_JIT", "1") != "0"
_KINDS = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_compiled: Any = None  # the kernels once built, False when numba is missing


def _build(numba, cache: bool) -> dict:
    # One thread each, on purpose (see above). error_model "numpy": x / 0 is
    # inf or NaN, as in NumPy, not an exception.
    opts = dict(cache=cache, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
    # The kernels reach the intrinsics and helpers through their module: numba keys
    # its disk cache on a kernel's closure, pickled, and a jitted function or an
    # intrinsic there pickles differently in each process (a miss, a compile and a
    # new cache file every run); a module pickles as its name.
    from . import intrinsics as native

    # Constants come in as arguments of the array's dtype: a Python literal
    # would promote float32 arithmetic to float64 (no longer 16 lanes wide).
    @numba.njit(**opts)
    def layer_norm(x, w, b, xhat, y, s, n, eps, zero, one, affine):
        for i in numba.prange(x.shape[0]):
            acc = zero
            for j in range(x.shape[1]):
                acc += x[i, j]
            mean = acc / n
            var = zero
            for j in range(x.shape[1]):
                d = x[i, j] - mean
                var += d * d
            r = one / numpy.sqrt(var / n + eps)
            s[i] = r
            for j in range(x.shape[1]):
                h = (x[i, j] - mean) * r
                xhat[i, j] = h
                if affine:
                    y[i, j] = h * w[j] + b[j]

    @numba.njit(**opts)
    def layer_norm_vjp(g, xhat, s, w, dx, dw, db, n, zero, affine):
        for i in range(g.shape[0]):
            a = zero
            m = zero
            if affine:
                for j in range(g.shape[1]):
                    gw = g[i, j] * w[j]
                    a += gw
                    m += gw * xhat[i, j]
                    dw[j] += g[i, j] * xhat[i, j]
                    db[j] += g[i, j]
            else:
                for j in range(g.shape[1]):
                    a += g[i, j]
                    m += g[i, j] * xhat[i, j]
            a /= n
            m /= n
            r = s[i]
            if affine:
                for j in range(g.shape[1]):
                    dx[i, j] = r * (g[i, j] * w[j] - a - xhat[i, j] * m)
            else:
                for j in range(g.shape[1]):
                    dx[i, j] = r * (g[i, j] - a - xhat[i, j] * m)

    # GELU, x Phi(x) with x floored at tail = -40 (a NaN stays NaN), and the two
    # passes of its VJP around an exp (VML's, vectorized): t = -x^2 / 2 at x
    # clipped to +-40, then dx = g (Phi + x exp(t) / sqrt(2 pi)), the operations
    # in the order of the rule's NumPy path (einsumgrad.rules.elementwise).
    @numba.njit(**opts)
    def gelu(x, cdf, out, tail):
        for i in numba.prange(x.shape[0]):
            v = x[i]
            out[i] = (tail if v < tail else v) * cdf[i]

    # The normal CDF Phi(x) = (1 + erf(c)) / 2 at c = x / sqrt 2 clipped to +-lim (a
    # NaN stays NaN), erf(c) ~ c P(c^2) / Q(c^2) (p, q: the coefficients, highest
    # degree first), in float64 arithmetic whatever x's dtype: no call, so the loop
    # is SIMD code.
    @numba.njit(**opts)
    def normal_cdf(x, out, p, q, lim, sqrt_half):
        for i in numba.prange(x.shape[0]):
            c = numba.float64(x[i]) * sqrt_half
            c = -lim if c < -lim else lim if c > lim else c
            c2 = c * c
            a = p[0]
            for j in range(1, len(p)):
                a = a * c2 + p[j]
            b = q[0]
            for j in range(1, len(q)):
                b = b * c2 + q[j]
            e = c * a / b  # within a few ulps of +-1 past |c| = 3.9: kept within
            out[i] = ((-1.0 if e < -1.0 else 1.0 if e > 1.0 else e) + 1.0) * 0.5

    @numba.njit(**opts)
    def gelu_vjp_square(x, t, tail, half):
        for i in numba.prange(x.shape[0]):
            c = native.clipped(x[i], tail)
            t[i] = c * half * c

    @numba.njit(**opts)
    def gelu_vjp(t, g, x, cdf, tail, scale):
        for i in numba.prange(x.shape[0]):
            t[i] = g[i] * (t[i] * scale * native.clipped(x[i], tail) + cdf[i])

    @numba.njit(**opts)
    def softmax_vjp(g, out, dx, zero):
        for i in numba.prange(g.shape[0]):
            t = zero
            for j in range(g.shape[1]):
                t += g[i, j] * out[i, j]
            for j in range(g.shape[1]):
                dx[i, j] = out[i, j] * (g[i, j] - t)

    @numba.njit(**opts)
    def divide_by_row_sums(e, floor, zero):
        ok = True
        for i in range(e.shape[0]):
            t = zero
            for j in range(e.shape[1]):
                t += e[i, j]
            ok = ok and t >= floor  # False for a NaN sum too
            for j in range(e.shape[1]):
                e[i, j] /= t
        return ok

    # Max pooling's VJP, x as (rows, window rows, cols, window cols, channels)
    # in memory order, channels innermost: the loops over channels run along
    # memory, 16 float32 lanes at a time (wide(): in 256-bit vectors, 16
    # channels ran as a remainder, in scalar code). The forward and the VJP
    # over NCHW images are kernels specialized to the window (_WINDOW_MAX).
    @numba.njit(**opts)
    def window_max_vjp(x, out, g, dx, one):
        share = numpy.empty((x.shape[0], x.shape[4]), x.dtype)  # a row each: prange-safe
        zero = one - one
        for b in numba.prange(x.shape[0]):
            native.wide()  # in the loop: numba compiles a prange body as a function of its own
            for w in range(x.shape[2]):
                for c in range(x.shape[4]):
                    share[b, c] = zero
                for i in range(x.shape[1]):
                    for j in range(x.shape[3]):
                        for c in range(x.shape[4]):
                            v, m = x[b, i, w, j, c], out[b, w, c]
                            # a NaN max: at its NaNs; selects, not branches: SIMD code
                            share[b, c] += one if (v == m) | ((v != v) & (m != m)) else zero
                for c in range(x.shape[4]):  # ties split g evenly, as max's rule
                    share[b, c] = g[b, w, c] * (one / share[b, c])
                for i in range(x.shape[1]):
                    for j in range(x.shape[3]):
                        for c in range(x.shape[4]):
                            v, m = x[b, i, w, j, c], out[b, w, c]
                            hit = (v == m) | ((v != v) & (m != m))
                            dx[b, i, w, j, c] = share[b, c] if hit else zero

    # Batch norm, one pass over x each, in two layouts of C order: (N, M, C),
    # channels-last, with per-channel sums in vectors of C along the rows; and
    # (N, C, M) (the ``_by_row`` twins), each channel's M entries a row.
    @numba.njit(**opts)
    def relu_vjp(g, y, dx):  # ReLU's VJP from its output, one pass
        for i in numba.prange(y.shape[0]):
            dx[i] = native.relu_grad(g[i], y[i])

    # The sums' kernels add into out[p] the rows of part p of out.shape[0] (one
    # part on the calling thread; a part a thread in the team twins, their rows
    # added up after).
    @numba.njit(**opts)
    def channel_sums(x, mean, s, out):
        # out[p, c] += sum of x[:, :, c] (mean None), else of ((x - mean) * s)^2
        parts = out.shape[0]
        for p in numba.prange(parts):
            for i in range(x.shape[0] * p // parts, x.shape[0] * (p + 1) // parts):
                for j in range(x.shape[1]):
                    for c in range(x.shape[2]):
                        if mean is None:
                            out[p, c] += x[i, j, c]
                        else:
                            d = (x[i, j, c] - mean[c]) * s[c]
                            out[p, c] += d * d

    @numba.njit(**opts)
    def channel_sums_by_row(x, mean, s, out):
        parts = out.shape[0]
        for p in numba.prange(parts):
            for i in range(x.shape[0] * p // parts, x.shape[0] * (p + 1) // parts):
                for c in range(x.shape[1]):
                    t = out[p, c] * 0
                    for j in range(x.shape[2]):
                        if mean is None:
                            t += x[i, c, j]
                        else:
                            d = (x[i, c, j] - mean[c]) * s[c]
                            t += d * d
                    out[p, c] += t

    @numba.njit(**opts)
    def batch_norm(x, mean, a, b, y, relu):
        # y = (x - mean) * a + b (a = s * w), then relu's max(y, 0) (NaN stays)
        for i in numba.prange(x.shape[0]):
            for j in range(x.shape[1]):
                for c in range(x.shape[2]):
                    v = (x[i, j, c] - mean[c]) * a[c] + b[c]
                    y[i, j, c] = v if not relu or v != v else max(v, 0)

    @numba.njit(**opts)
    def batch_norm_by_row(x, mean, a, b, y, relu):
        for i in numba.prange(x.shape[0]):
            for c in range(x.shape[1]):
                for j in range(x.shape[2]):
                    v = (x[i, c, j] - mean[c]) * a[c] + b[c]
                    y[i, c, j] = v if not relu or v != v else max(v, 0)

    @numba.njit(**opts)
    def batch_norm_sums(g, y, x, mean, s, sg, sgx, relu):
        # sg[p, c] += sum of g, sgx[p, c] += sum of g * xhat (relu's rule first with relu)
        parts = sg.shape[0]
        for p in numba.prange(parts):
            for i in range(x.shape[0] * p // parts, x.shape[0] * (p + 1) // parts):
                for j in range(x.shape[1]):
                    for c in range(x.shape[2]):
                        gv = native.relu_grad(g[i, j, c], y[i, j, c]) if relu else g[i, j, c]
                        sg[p, c] += gv
                        sgx[p, c] += gv * ((x[i, j, c] - mean[c]) * s[c])

    @numba.njit(**opts)
    def batch_norm_sums_by_row(g, y, x, mean, s, sg, sgx, relu):
        parts = sg.shape[0]
        for p in numba.prange(parts):
            for i in range(x.shape[0] * p // parts, x.shape[0] * (p + 1) // parts):
                for c in range(x.shape[1]):
                    t, u = sg[p, c] * 0, sg[p, c] * 0
                    for j in range(x.shape[2]):
                        gv = native.relu_grad(g[i, c, j], y[i, c, j]) if relu else g[i, c, j]
                        t += gv
                        u += gv * ((x[i, c, j] - mean[c]) * s[c])
                    sg[p, c] += t
                    sgx[p, c] += u

    @numba.njit(**opts)
    def batch_norm_dx(g, y, x, mean, s, a, mg, mgx, dx, relu):
        # dx = w s (g - mean(g) - xhat mean(g xhat)), a = w s
        for i in numba.prange(x.shape[0]):
            for j in range(x.shape[1]):
                for c in range(x.shape[2]):
                    gv = native.relu_grad(g[i, j, c], y[i, j, c]) if relu else g[i, j, c]
                    dx[i, j, c] = a[c] * (gv - mg[c] - (x[i, j, c] - mean[c]) * s[c] * mgx[c])

    @numba.njit(**opts)
    def batch_norm_dx_by_row(g, y, x, mean, s, a, mg, mgx, dx, relu):
        for i in numba.prange(x.shape[0]):
            for c in range(x.shape[1]):
                for j in range(x.shape[2]):
                    gv = native.relu_grad(g[i, c, j], y[i, c, j]) if relu else g[i, c, j]
                    dx[i, c, j] = a[c] * (gv - mg[c] - (x[i, c, j] - mean[c]) * s[c] * mgx[c])

    # One Adam step in one pass, each operation as optim.Adam's NumPy path writes
    # it, in the parameter's dtype (no fastmath here: the same bits as that path).
    @numba.njit(cache=cache, nogil=True, error_model="numpy")
    def adam(p, g, m, v, shrink, l2, c1, b2, c2, bc2, eps, step):
        for i in numba.prange(p.shape[0]):
            pi = p[i] * shrink if shrink != 1 else p[i]  # decoupled weight decay
            gi = g[i] + l2 * pi if l2 != 0 else g[i]  # L2 weight decay
            mi = m[i] + c1 * (gi - m[i])
            vi = v[i] * b2 + c2 * gi * gi
            m[i], v[i] = mi, vi
            p[i] = pi - step * (mi / (numpy.sqrt(vi) / bc2 + eps))

    # A convolution's blocks of images on the team (window_products): each thread
    # pads and copies its blocks' windows (im2col) into buffers of its own and
    # multiplies them by MKL's GEMM at the address ``gemm_at``, on itself alone
    # (MKL_Set_Num_Threads_Local at ``local_at``: inside a parallel region MKL
    # ran these products 3-7x slower than on a thread of its own).
    @numba.njit(cache=cache, nogil=True, error_model="numpy", parallel=True)
    def window_products(x, w, trans_w, ldw, out, other, totals, geometry, nb, zero, one,
                        gemm_at, local_at):
        kh, kw, sh, sw, ph, pw, dh, dw = geometry
        r, h, wd, c = x.shape
        hp, wp = h + 2 * ph, wd + 2 * pw
        oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        k, j, n = kh * kw * c, out.shape[1], other.shape[1]
        parts = totals.shape[0]
        for p in numba.prange(parts):
            native.wide()
            before = native.call_int(local_at, 1)  # MKL on this thread alone, then as it was
            pad = numpy.zeros((nb, hp, wp, c), x.dtype)  # its border stays zero
            cols = numpy.empty((nb, oh, ow, kh, kw, c), x.dtype)
            for s in range(r * p // parts, r * (p + 1) // parts, nb):
                m = min(nb, r * (p + 1) // parts - s)
                for b in range(m):
                    for y in range(h):
                        for xo in range(wd):
                            for ch in range(c):
                                pad[b, ph + y, pw + xo, ch] = x[s + b, y, xo, ch]
                for b in range(m):
                    for y in range(oh):
                        for xo in range(ow):
                            for i in range(kh):
                                for jj in range(kw):
                                    for ch in range(c):
                                        cols[b, y, xo, i, jj, ch] = pad[b, y * sh + i * dh,
                                                                        xo * sw + jj * dw, ch]
                rows = m * oh * ow  # CBLAS's codes: 111 as laid out, 112 transposed
                if j:  # out[block] = windows @ w
                    native.gemm(gemm_at, 111, trans_w, rows, j, k, cols.ctypes.data, k, w, ldw,
                                zero, out[s * oh * ow:].ctypes.data, j)
                if n:  # totals[p] += windows^T @ other[block]
                    native.gemm(gemm_at, 112, 111, k, n, rows, cols.ctypes.data, k,
                                other[s * oh * ow:].ctypes.data, n, one, totals[p].ctypes.data, n)
            native.call_int(local_at, before)

    # One product c = op(a) @ op(b) (row-major, c's rows ldc apart) in ``parts`` blocks
    # of rows (by_rows) or of columns of c, each by the CBLAS ?gemm at ``gemm_at``
    # (64-bit integers where ``ilp``), the operands given by address; blas_parts_team
    # shares the blocks among the team, a run of neighbours a thread (OpenMP's static
    # schedule), so a thread's rows are those the next row-split kernel gives it.
    @numba.njit(cache=cache, nogil=True, error_model="numpy")
    def blas_parts(a, ta, lda, b, tb, ldb, c, ldc, m, n, k, item, by_rows, parts, zero, gemm_at,
                   ilp):
        for p in numba.prange(parts):
            if by_rows:
                lo, hi = m * p // parts, m * (p + 1) // parts
                ap = a + (lo * lda if ta == 111 else lo) * item
                bp, cp, rows, cols = b, c + lo * ldc * item, hi - lo, n
            else:
                lo, hi = n * p // parts, n * (p + 1) // parts
                bp = b + (lo if tb == 111 else lo * ldb) * item
                ap, cp, rows, cols = a, c + lo * item, m, hi - lo
            if rows > 0 and cols > 0:
                if ilp:
                    native.gemm64(gemm_at, ta, tb, rows, cols, k, ap, lda, bp, ldb, zero, cp,
                                  ldc)
                else:
                    native.gemm(gemm_at, ta, tb, rows, cols, k, ap, lda, bp, ldb, zero, cp, ldc)

    def team(kernel):
        # The prange twin (threads.openmp), cached by numba under a name of its own:
        # its cache's key does not tell a parallel build from a serial one.
        f = kernel.py_func
        twin = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__,
                                  f.__closure__)
        twin.__qualname__ = f"{f.__qualname__}_team"
        options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
        return numba.njit(parallel=True, cache=cache, **options)(twin)

    by_layout = {"channel_sums": (channel_sums, channel_sums_by_row),  # (N, M, C), (N, C, M)
                 "batch_norm": (batch_norm, batch_norm_by_row),
                 "batch_norm_sums": (batch_norm_sums, batch_norm_sums_by_row),
                 "batch_norm_dx": (batch_norm_dx, batch_norm_dx_by_row)}
    rows = (layer_norm, gelu, gelu_vjp_square, gelu_vjp, relu_vjp, softmax_vjp, window_max_vjp,
            adam, normal_cdf)
    return {**{f"{k.__name__}_team": team(k) for k in rows},
            "layer_norm": layer_norm, "layer_norm_vjp": layer_norm_vjp, "gelu": gelu,
            "normal_cdf": normal_cdf,
            "gelu_vjp_square": gelu_vjp_square, "gelu_vjp": gelu_vjp, "relu_vjp": relu_vjp,
            "softmax_vjp": softmax_vjp, "divide_by_row_sums": divide_by_row_sums,
            "window_max_vjp": window_max_vjp, "adam": adam, "window_products": window_products,
            "blas_parts": blas_parts, "blas_parts_team": team(blas_parts),
            **by_layout, **{f"{k}_team": tuple(map(team, v)) for k, v in by_layout.items()}}


def _kernels() -> dict | None:
    """The compiled kernels by name, or None without numba (or with ``EINSUMGRAD_JIT=0``)."""
    global _compiled
    if _compiled is None:
        try:
            import numba  # an ImportError too where numba does not support this NumPy
        except ImportError:
            numba = None
        if not _ENABLED or numba is None:
            _compiled = False
        else:
            try:
                _compiled = _build(numba, cache=True)
            except RuntimeError:  # nowhere to write numba's cache: compile in memory
                _compiled = _build(numba, cache=False)
    return _compiled or None


def available() -> bool:
    """Whether the kernels run (numba importable and not turned off)."""
    return _kernels() is not None


def _rows(a, n: int):
    """``a`` as a ``(rows, n)`` view when the kernels take it, else None."""
    if (type(a) is not numpy.ndarray or a.dtype not in _KINDS or n == 0 or a.size == 0
            or not a.flags.c_contiguous):
        return None
    return a.reshape(-1, n)


def _cotangent(g, like, n: int):
    """Cotangent ``g`` as ``(rows, n)`` in C order (copied if laid out otherwise)
    when it is shaped and typed as ``like``, else None."""
    if type(g) is not numpy.ndarray or g.shape != like.shape or g.dtype != like.dtype:
        return None
    return _rows(numpy.ascontiguousarray(g), n)


def _run(name: str, *args):
    return _compiled[name](*args)


def _run_rows(name: str, args: tuple, cut: tuple, work: int, pool: bool = True) -> None:
    """Kernel ``name`` on ``args``, the rows (axis 0) of those ``cut`` marks shared
    among as many threads as MKL's GEMM is given (:func:`.threads.rows`; one BLAS
    thread: the calling thread alone): on numba's OpenMP team where MKL runs on it
    (the kernel's ``prange`` twin), else on einsumgrad's pool where that is measured
    faster, or (``pool=False``) never. The pool's threads run each row by the same
    code, so its results are the same bits; the twin, compiled apart, agrees to
    rounding."""
    team = _compiled.get(f"{name}_team")
    if not pool and not (team is not None and threads.openmp()):
        _compiled[name](*args)
        return
    threads.rows(_compiled[name], args[0], args[1:], cut[1:], work, limit=mkl.gemm_threads(),
                 team=team)


def layer_norm(x, n: int, eps: float, weight=None, bias=None):
    """Layer norm over the last ``n`` entries of each row of C-ordered ``x``, or None.

    Returns:
        ``(xhat, s)`` with ``xhat = (x - mean) * s`` and ``s = 1 / sqrt(var + eps)``
        (one entry per row); with ``weight`` and ``bias`` (``n`` entries each)
        ``(y, xhat, s)``, ``y = xhat * weight + bias`` written in the same pass.
    """
    rows = _rows(x, n)
    affine = weight is not None
    if affine and not all(_vector(v, x.dtype, n) for v in (weight, bias)):
        return None
    if rows is None or _kernels() is None:
        return None
    t = x.dtype.type
    xhat = numpy.empty_like(rows)
    y = numpy.empty_like(rows) if affine else xhat
    s = numpy.empty(rows.shape[0], x.dtype)
    w, b = (weight.reshape(-1), bias.reshape(-1)) if affine else (xhat[0], xhat[0])
    _run_rows("layer_norm", (rows, w, b, xhat, y, s, t(n), t(eps), t(0), t(1), affine),
              (True, False, False, True, True, True, False, False, False, False, False),
              4 * rows.size, pool=False)
    if affine:
        return y.reshape(x.shape), xhat.reshape(x.shape), s
    return xhat.reshape(x.shape), s


def layer_norm_vjp(g, xhat, s, n: int, weight=None):
    """The VJP of :func:`layer_norm` row by row, or None.

    Args:
        g: the cotangent, shaped and typed as ``xhat``.
        xhat: the normalized forward output, ``(x - mean) * s``.
        s: ``1 / sqrt(var + eps)``, one entry per row.
        n: how many entries one row has.
        weight: the scale applied after normalizing, if any.

    Returns:
        ``dx = s * (gw - mean(gw) - xhat * mean(gw * xhat))`` with ``gw = g * weight``
        (``g`` without one); with ``weight``, ``(dx, dweight, dbias)``, the
        latter two ``g * xhat`` and ``g`` summed over the rows.
    """
    affine = weight is not None
    if affine and not _vector(weight, xhat.dtype, n):
        return None
    gr, yr = _cotangent(g, xhat, n), _rows(xhat, n)
    if gr is None or yr is None or _kernels() is None:
        return None
    sr = numpy.ascontiguousarray(s, dtype=xhat.dtype).reshape(-1)
    if sr.size != yr.shape[0]:
        return None
    dx = numpy.empty_like(yr)
    t = xhat.dtype.type
    dw = numpy.zeros(n if affine else 1, xhat.dtype)
    db = numpy.zeros_like(dw)
    w = weight.reshape(-1) if affine else dw
    _run("layer_norm_vjp", gr, yr, sr, w, dx, dw, db, t(n), t(0), affine)
    dx = dx.reshape(xhat.shape)
    return (dx, dw, db) if affine else dx


def _vector(v, dtype, n: int) -> bool:
    return type(v) is numpy.ndarray and v.dtype == dtype and v.size == n


def _takes(x) -> bool:
    """Whether the element-wise kernels may take ``x`` (before anything is allocated)."""
    return type(x) is numpy.ndarray and x.dtype in _KINDS and x.size > 0 and _kernels() is not None


def _flat_alike(*arrays):
    """The arrays as flat views of their memory when the kernels take them: one
    shape, one float dtype, one layout (the same strides), dense in memory in any
    axis order (a channels-last image too); else None."""
    a = arrays[0]
    if not all(type(v) is numpy.ndarray and v.shape == a.shape and v.dtype == a.dtype
               and v.strides == a.strides for v in arrays):
        return None
    if a.flags.c_contiguous:
        return [v.reshape(-1) for v in arrays]
    order = memory_order(a)
    if not a.transpose(order).flags.c_contiguous:
        return None
    return [v.transpose(order).reshape(-1) for v in arrays]


def _in_layout_of(x, a):
    """``a`` (shaped as ``x``) in ``x``'s memory layout: itself, or a copy."""
    if type(a) is not numpy.ndarray or a.strides == x.strides or a.shape != x.shape:
        return a
    b = numpy.empty_like(x, dtype=a.dtype)
    b[...] = a
    return b


def normal_cdf(x, p: tuple, q: tuple, lim: float):
    """The normal CDF ``(1 + erf(x / sqrt 2)) / 2`` in one pass, ``erf(c)`` as ``c P(c^2)
    / Q(c^2)`` at ``c`` clipped to ``+-lim`` (``p``, ``q``: the coefficients, highest
    degree first), evaluated in float64 and rounded once to ``x``'s dtype; or None.
    The NumPy backend's float32 CDF (GELU's): faster than MKL's vector CDF and
    NumPy's passes on the bench's AMD CPU (README, "numba")."""
    if not _takes(x):
        return None
    out = numpy.empty_like(x)
    flat = _flat_alike(x, out)
    if flat is None:
        return None
    f = lambda v: tuple(float(a) for a in v)  # noqa: E731
    _run_rows("normal_cdf", (*flat, f(p), f(q), float(lim), math.sqrt(0.5)),
              (True, True, False, False, False, False), 24 * x.size)
    return out


def gelu(x, cdf):
    """``max(x, -40) * cdf`` in one pass (GELU with ``cdf`` = Phi(x)), or None."""
    if not _takes(x):
        return None
    out = numpy.empty_like(x)  # x's layout, where x is dense
    flat = _flat_alike(x, _in_layout_of(x, cdf), out)
    if flat is None:
        return None
    _run_rows("gelu", (*flat, x.dtype.type(-40.0)), (True, True, True, False), 2 * x.size)
    return out


def gelu_vjp(g, x, cdf):
    """GELU's VJP ``g * (cdf + x phi(x))``, ``x`` clipped to +-40 in ``x phi(x)``
    (0 beyond, not inf * 0), in two passes around VML's exp; or None."""
    if not _takes(x):
        return None
    dx = numpy.empty_like(x)
    flat = _flat_alike(g, x, _in_layout_of(x, cdf), dx)
    if flat is None:
        return None
    gf, xf, cf, t = flat
    c = x.dtype.type
    cut = (True, True, False, False)
    _run_rows("gelu_vjp_square", (xf, t, c(40.0), c(-0.5)), cut, 3 * x.size)
    mkl.ufuncs.get("exp", numpy.exp)(t, out=t)
    _run_rows("gelu_vjp", (t, gf, xf, cf, c(40.0), c(1.0 / math.sqrt(2.0 * math.pi))),
              (True, True, True, True, False, False), 4 * x.size)
    return dx


def relu_vjp(g, y):
    """ReLU's VJP from its output ``y`` in one pass: ``g`` where ``y > 0``, 0 where
    ``y`` is 0 (``g * 0``: a NaN or inf ``g`` gives NaN, as the rule's product),
    NaN where ``y`` is; or None."""
    if not _takes(y):
        return None
    dx = numpy.empty_like(y)
    flat = _flat_alike(g, y, dx)
    if flat is None:
        return None
    _run_rows("relu_vjp", tuple(flat), (True, True, True), 2 * y.size)
    return dx


def adam(p, g, m, v, *, lr: float, betas: tuple, eps: float, step: int,
         weight_decay: float = 0.0, decoupled: bool = False):
    """One Adam step in place (``optim.Adam``'s rule, its bits), or None where the
    kernel declines (nothing then written): ``p``, ``g`` and the moments ``m``,
    ``v`` one shape, dtype and layout, dense.

    Args:
        p: the parameter's array, rewritten.
        g: its gradient.
        m, v: the first and second moments, rewritten.
        lr, betas, eps: Adam's hyperparameters.
        step: this step's number, counted from 1 (the bias corrections').
        weight_decay: added to the gradient as ``weight_decay * p`` (L2), or with
            ``decoupled`` ``p`` first shrunk by ``1 - lr * weight_decay`` (AdamW).
    """
    flat = _flat_alike(p, g, m, v) if _takes(p) and p.flags.writeable else None
    if flat is None:
        return None
    (b1, b2), c = betas, p.dtype.type
    shrink = c(1 - lr * weight_decay) if weight_decay and decoupled else c(1)
    l2 = c(weight_decay) if weight_decay and not decoupled else c(0)
    _run_rows("adam", (*flat, shrink, l2, c(1 - b1), c(b2), c(1 - b2),
                       c((1 - b2 ** step) ** 0.5), c(eps), c(lr / (1 - b1 ** step))),
              (True,) * 4 + (False,) * 8, 10 * p.size)
    return True


def softmax_vjp(g, out):
    """``out * (g - sum(g * out))`` along the last axis, row by row, or None.

    Args:
        g: the cotangent, shaped and typed as ``out``.
        out: the softmax's output.
    """
    if not out.ndim:
        return None
    n = out.shape[-1]
    gr, orows = _cotangent(g, out, n), _rows(out, n)
    if gr is None or orows is None or _kernels() is None:
        return None
    dx = numpy.empty_like(orows)
    _run_rows("softmax_vjp", (gr, orows, dx, out.dtype.type(0)), (True, True, True, False),
              3 * gr.size, pool=False)
    return dx.reshape(out.shape)


def divide_by_row_sums(e, floor: float):
    """Divide each row (last axis) of ``e`` by its sum, in place; None if not taken.

    Returns:
        whether every row's sum was at least ``floor`` (False for a NaN sum):
        a softmax redoes the rows otherwise (see ``einsumgrad.rules.reductions``).
    """
    rows = _rows(e, e.shape[-1]) if getattr(e, "ndim", 0) else None
    if rows is None or not e.flags.writeable or _kernels() is None:
        return None
    return bool(_run("divide_by_row_sums", rows, e.dtype.type(floor), e.dtype.type(0)))


# A convolution's windows (im2col): cols[b, y, x, i, j, :] is the pixel
# pad[b, y*sh + i*dh, x*sw + j*dw, :] of channels-last padded images. The
# window's sizes and steps are constants of each kernel: with kh, kw and the
# channels as loop counts the loops are 5x slower than with them as constants.
_WINDOW_COPY = """import numba


@numba.njit(cache=CACHE, nogil=True)
def kernel(pad, cols):
    for b in range(cols.shape[0]):
        for y in range(cols.shape[1]):
            for x in range(cols.shape[2]):
                for i in range({kh}):
                    for j in range({kw}):
                        for c in range({channels}):
                            cols[b, y, x, i, j, c] = pad[b, y * {sh} + i * {dh}, x * {sw} + j * {dw}, c]
"""
def window_products(x, w, geometry: tuple, nb: int, other=None, workers: int = 2):
    """A convolution's products by blocks of ``nb`` images on ``workers`` threads of
    numba's OpenMP team, each block's windows copied once (im2col) and multiplied
    by MKL's GEMM on its thread alone; or None where the kernel does not take
    the arrays or there is no team (nothing then written).

    Args:
        x: the images ``(R, H, W, I)``, channels last in index order, any layout.
        w: ``(kh*kw*I, J)``, rows in ``(kh, kw, I)`` order, or None.
        geometry: ``(kh, kw, sh, sw, ph, pw, dh, dw)``: the window, its stride,
            the padding and the dilation.
        nb: images a block.
        other: ``(R, OH, OW, L)``, or None.

    Returns:
        ``(patches(x) @ w`` as ``(R, OH, OW, J)`` or None, ``patches(x)^T @ other``
        summed over the images as ``(kh*kw*I, L)`` or None``)``.
    """
    if (workers < 2 or getattr(x, "ndim", 0) != 4 or len(x) < 2 or not _takes(x)
            or mkl.matmul is None or not threads.openmp()
            or any(type(v) is not numpy.ndarray or v.dtype != x.dtype for v in (w, other)
                   if v is not None)):
        return None
    (r, h, wd, c), (kh, kw, sh, sw, ph, pw, dh, dw) = x.shape, geometry
    oh, ow = ((n + 2 * p - d * (k - 1) - 1) // s + 1
              for n, k, s, p, d in ((h, kh, sh, ph, dh), (wd, kw, sw, pw, dw)))
    k, parts = kh * kw * c, min(workers, r)
    # w as BLAS reads it: (CBLAS's transpose code, leading dimension); none: unread
    form = mkl.as_blas(w, k, w.shape[1]) if w is not None else (111, 1)
    if oh < 1 or ow < 1 or form is None or max(nb * oh * ow, k, r * oh * ow) >= 1 << 31:
        return None
    t = x.dtype.type
    out = numpy.empty((r * oh * ow, w.shape[1] if w is not None else 0), x.dtype)
    mat = (numpy.ascontiguousarray(other).reshape(r * oh * ow, -1) if other is not None
           else numpy.empty((r * oh * ow, 0), x.dtype))
    totals = numpy.zeros((parts, k, mat.shape[1]), x.dtype)
    gemm = mkl.address("cblas_sgemm" if x.dtype == numpy.float32 else "cblas_dgemm")
    threads.on_team(parts, _compiled["window_products"], x,
                    w.ctypes.data if w is not None else 0, *form, out, mat, totals,
                    numpy.array(geometry, numpy.int64), nb, t(0), t(1), gemm,
                    mkl.address("MKL_Set_Num_Threads_Local"))
    total = totals[0] if other is not None else None
    for more in totals[1:] if other is not None else ():
        total += more
    return (out.reshape(r, oh, ow, -1) if w is not None else None), total


def team_matmul(a, b, out=None, workers: int = 2, small: bool = False):
    """``numpy.matmul(a, b, out=out)`` for two matrices by NumPy's own OpenBLAS, on
    ``workers`` threads of numba's OpenMP team: each thread's block of the
    result's rows (or columns, where it has fewer rows) by OpenBLAS set to one
    thread, so no OpenBLAS pool wakes beside the team (see :mod:`.openblas`).
    ``small``: in blocks of at most :data:`.openblas.SMALL_WORK` multiply-adds
    where the product is thin enough to cut so (:func:`.openblas.small_parts`), which
    OpenBLAS runs on its small-matrix kernels, without packing the operands;
    with one worker, on the calling thread. None (nothing written) where the
    kernel does not take the operands."""
    m, k = a.shape if getattr(a, "ndim", 0) == 2 else (0, 0)
    n = b.shape[1] if getattr(b, "ndim", 0) == 2 and b.shape[0] == k else 0
    if (workers < (1 if small else 2) or not (m and n and k) or type(a) is not numpy.ndarray
            or type(b) is not numpy.ndarray or a.dtype != b.dtype or a.dtype not in _KINDS
            or max(m, n, k) >= 1 << 31 or (out is not None and (
                type(out) is not numpy.ndarray or out.shape != (m, n) or out.dtype != a.dtype
                or not out.flags.c_contiguous or not out.flags.writeable
                or mkl._overlaps(out, a, b)))):
        return None
    form_a, form_b = mkl.as_blas(a, m, k), mkl.as_blas(b, k, n)
    if (form_a is None or form_b is None or not openblas.available() or not threads.openmp()
            or _kernels() is None):
        return None
    c = numpy.empty((m, n), a.dtype) if out is None else out
    team = min(workers, max(m, n))
    parts = max(team, openblas.small_parts(m, n, k, team) if small else 0)
    args = (a.ctypes.data, *form_a, b.ctypes.data, *form_b, c.ctypes.data, n, m, n, k,
            a.itemsize, m >= n, parts, a.dtype.type(0), openblas.gemm_address(a.dtype),
            openblas.ilp64())
    with openblas.one_thread:
        if team > 1:
            threads.on_team(team, _compiled["blas_parts_team"], *args)
        else:
            _compiled["blas_parts"](*args)
    return c


def _openblas_team(workers: int, small: bool = False):
    """:func:`einsumgrad.backends.mkl.openblas_team`: :func:`team_matmul` on
    ``workers`` threads (``small``: in small blocks, from one worker), MKL's GEMM
    where it declines; None where it cannot run."""
    if (workers < (1 if small else 2) or not openblas.available() or not available()
            or not threads.openmp()):
        return None

    def matmul(a, b, out=None):
        got = team_matmul(a, b, out, workers, small)
        return got if got is not None else mkl.matmul(a, b, out=out)
    matmul.small = small
    return matmul


mkl.openblas_team = _openblas_team


# Attention's core (einsumgrad.rules.attention) a pair of matrices at a time, each
# thread's pairs on it alone (MKL's GEMM by address, at one thread), each pair's
# scores in a buffer of the thread's: S = scale q k^T, P its rows' softmax, then
# out = P v; backward, P again, dv = P^T g, dP = g v^T, dS = P (dP - rowsum(dP P)),
# dq = scale dS k, dk = scale dS^T q. ``bad[p]`` counts part p's rows whose max is
# not finite or whose sum is under ``floor``: the caller then takes the rules'
# path, which says what NaN and inf give. The exp is _EXP32's polynomial for
# float32 (within 2 ulp over the scores' range, vectorized), libm's for float64.
_ATTENTION = """import math
import numba
import numpy as np
from einsumgrad.backends.intrinsics import call_int, gemm, wide


@numba.njit(inline="always", error_model="numpy")
def _exp32(x):
    # e^x for x <= 0 in float32: x = k ln2 + r (ln2 in two parts), degree-6 polynomial
    x = np.float32(-87.0) if x < np.float32(-87.0) else x  # a NaN stays NaN
    k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * np.int32((np.int32(k) + 127) << 23).view(np.float32)


@numba.njit(inline="always", error_model="numpy")
def _softmax_rows(s, scale, floor, zero, one):
    # s's rows: softmax(scale * s) in place; the number of rows the caller must redo
    bad = 0
    for i in range(s.shape[0]):
        wide()
        row = s[i]
        m = row[0]
        for j in range(row.shape[0]):
            m = max(m, row[j])
        if not (abs(m) < np.inf):
            bad += 1
            continue
        for j in range(row.shape[0]):
            row[j] = {exp}((row[j] - m) * scale)
        t = zero
        for j in range(row.shape[0]):
            t += row[j]
        if not (t >= floor):
            bad += 1
            continue
        r = one / t
        for j in range(row.shape[0]):
            row[j] *= r
    return bad


@numba.njit(cache=CACHE, nogil=True, error_model="numpy", parallel=True,
            fastmath={{"reassoc", "contract"}})
def kernel(q, k, v, g, out, dq, dk, dv, forward, scale, floor, bad, gemm_at, local_at):
    # q, k, v, g (the cotangent) and the results (B, H, L, D) with unit strides
    # along D; forward writes out (g, dq, dk, dv unread), backward dq, dk, dv
    zero, one = scale - scale, scale / scale
    nb, nh, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    d, dv_ = q.shape[3], v.shape[3]
    size = q.itemsize
    parts = bad.shape[0]
    for p in numba.prange(parts):
        before = call_int(local_at, 1)
        s = np.empty((lq, lk), q.dtype)
        ds = np.empty((lq, lk), q.dtype)
        for pair in range(nb * nh * p // parts, nb * nh * (p + 1) // parts):
            b, h = pair // nh, pair % nh
            qm, km, vm = q[b, h], k[b, h], v[b, h]
            gemm(gemm_at, 111, 112, lq, lk, d, qm.ctypes.data, qm.strides[0] // size,
                 km.ctypes.data, km.strides[0] // size, zero, s.ctypes.data, lk)
            wrong = _softmax_rows(s, scale, floor, zero, one)
            if wrong:
                bad[p] += wrong
                continue
            if forward:
                om = out[b, h]
                gemm(gemm_at, 111, 111, lq, dv_, lk, s.ctypes.data, lk, vm.ctypes.data,
                     vm.strides[0] // size, zero, om.ctypes.data, om.strides[0] // size)
                continue
            gm, dqm, dkm, dvm = g[b, h], dq[b, h], dk[b, h], dv[b, h]
            ldg = gm.strides[0] // size
            gemm(gemm_at, 112, 111, lk, dv_, lq, s.ctypes.data, lk, gm.ctypes.data, ldg, zero,
                 dvm.ctypes.data, dvm.strides[0] // size)
            gemm(gemm_at, 111, 112, lq, lk, dv_, gm.ctypes.data, ldg, vm.ctypes.data,
                 vm.strides[0] // size, zero, ds.ctypes.data, lk)
            for i in range(lq):
                wide()
                t = zero
                for j in range(lk):
                    t += ds[i, j] * s[i, j]
                for j in range(lk):
                    ds[i, j] = s[i, j] * (ds[i, j] - t) * scale
            gemm(gemm_at, 111, 111, lq, d, lk, ds.ctypes.data, lk, km.ctypes.data,
                 km.strides[0] // size, zero, dqm.ctypes.data, dqm.strides[0] // size)
            gemm(gemm_at, 112, 111, lk, d, lq, ds.ctypes.data, lk, qm.ctypes.data,
                 qm.strides[0] // size, zero, dkm.ctypes.data, dkm.strides[0] // size)
        call_int(local_at, before)
"""


# by float32 or not: the exp of its softmax
_ATTENTION_SOURCES = {True: _ATTENTION.format(exp="_exp32"),
                      False: _ATTENTION.format(exp="math.exp")}


def _attention_parts(q, k, v, g=None) -> int:
    """How many threads of the team :data:`_ATTENTION`'s kernel takes for these arrays
    (``g`` the cotangent, or None); 0 where it does not take them, or where one
    thread would (there NumPy's passes around MKL's batched GEMM ran faster)."""
    arrays = (q, k, v) if g is None else (q, k, v, g)
    if (mkl.matmul is None or not _takes(q) or not threads.openmp()
            or any(type(a) is not numpy.ndarray or a.ndim != 4 or a.dtype != q.dtype
                   or a.strides[-1] != a.itemsize or 0 in a.shape for a in arrays)):
        return 0
    (nb, nh, lq, d), lk, dv = q.shape, k.shape[2], v.shape[3]
    if (k.shape != (nb, nh, lk, d) or v.shape[:3] != (nb, nh, lk)
            or (g is not None and g.shape != (nb, nh, lq, dv))):
        return 0
    parts = threads.team_threads(4 * nb * nh * lq * lk * (d + dv), mkl.gemm_threads())
    return parts if parts > 1 else 0


def attention_team(q, k, v) -> bool:
    """Whether :func:`attention` runs on the team for these arrays (else the composition
    of einsums and a softmax is the faster)."""
    return _attention_parts(q, k, v) > 0


def _attention_run(q, k, v, g, scale: float):
    """:data:`_ATTENTION`'s kernel on the team: ``out`` (``g`` None) or ``[dq, dk, dv]``,
    each laid out with its heads inside its rows ((B, L, H, D) in memory, as the
    projections around read them); None where the arrays do not suit or a row
    needs the rules' path."""
    parts = _attention_parts(q, k, v, g)
    if not parts or not scale > 0:
        return None
    (nb, nh, lq, d), lk, dv = q.shape, k.shape[2], v.shape[3]
    like = lambda n, m: numpy.empty((nb, n, nh, m), q.dtype).transpose(0, 2, 1, 3)  # noqa: E731
    t = q.dtype.type
    bad = numpy.zeros(parts, numpy.int64)
    forward = g is None
    if forward:  # what the forward does not read or write stands in for the rest
        out = like(lq, dv)
        g, grads = q, (out,) * 3
    else:
        grads = (like(lq, d), like(lk, d), like(lk, dv))
        out = grads[0]
    gemm = mkl.address("cblas_sgemm" if q.dtype == numpy.float32 else "cblas_dgemm")
    kernel = compiled.compile_kernel(_ATTENTION_SOURCES[q.dtype == numpy.float32])
    threads.on_team(parts, kernel, q, k, v, g, out, *grads, forward,
                    t(scale),
                    t(math.sqrt(numpy.finfo(q.dtype).tiny)), bad, gemm,
                    mkl.address("MKL_Set_Num_Threads_Local"))
    if bad.any():
        return None
    return out if forward else list(grads)


def attention(q, k, v, scale: float):
    """``softmax(scale * q k^T) v`` over the last two axes of ``(B, H, L, D)`` arrays,
    a pair of matrices at a time on the team, or None (see :data:`_ATTENTION`)."""
    return _attention_run(q, k, v, None, scale)


def attention_vjp(g, q, k, v, scale: float):
    """:func:`attention`'s VJP ``[dq, dk, dv]`` for the cotangent ``g``, or None."""
    return _attention_run(q, k, v, g, scale)


_COPY_BYTES = 32
"""Channels of at most this many bytes a pixel take the kernel: NumPy's strided
copy moves a whole pixel per step, and at 16 float32 channels it is the faster."""


def window_copy(pad, cols, stride: tuple, dilation: tuple) -> bool:
    """Copy the windows of channels-last padded images ``pad`` ``(B, Hp, Wp, I)``
    into ``cols`` ``(B, OH, OW, kh, kw, I)`` (im2col); False (nothing written)
    where the kernel does not take the arrays or NumPy's copy is as fast."""
    if (type(pad) is not numpy.ndarray or type(cols) is not numpy.ndarray or pad.dtype not in _KINDS
            or cols.dtype != pad.dtype or not (pad.flags.c_contiguous and cols.flags.c_contiguous)
            or cols.size == 0 or cols.shape[5] * cols.itemsize > _COPY_BYTES or _kernels() is None):
        return False
    (kh, kw, channels), (sh, sw), (dh, dw) = cols.shape[3:], stride, dilation
    src = _WINDOW_COPY.format(kh=kh, kw=kw, channels=channels, sh=int(sh), sw=int(sw),
                              dh=int(dh), dw=int(dw))
    threads.rows(compiled.compile_kernel(src), pad, (cols,), (True,), cols.size,
                 limit=mkl.gemm_threads())
    return True


# Max pooling, x as (rows, kh, cols, kw, channels) in memory order: the window's
# sizes and the channels are constants, so LLVM unrolls the window and runs
# the channels (one, for an NCHW image: the columns) as vectors. With them as
# loop counts 16 float32 channels ran as a scalar remainder, and an NCHW
# image's single channel 17x slower than this.
_WINDOW_MAX = """import numba
from einsumgrad.backends.intrinsics import wide


@numba.njit(cache=CACHE, nogil=True, error_model="numpy"{parallel})
def kernel(x, out):
    for b in {over}(x.shape[0]):
        wide()
        for w in range(x.shape[2]):
            for c in range({channels}):
                m = x[b, 0, w, 0, c]
                for i in range({kh}):
                    for j in range({kw}):
                        v = x[b, i, w, j, c]
                        m = v if (v > m) | (v != v) else m  # NaN wins, as numpy.maximum
                out[b, w, c] = m
"""
# Its VJP over NCHW images, x as (rows, kh, cols, kw), the window's sizes constants
# (_build's window_max_vjp, its channel loop of one, ran 6x slower). Over channels
# that one is the faster: this form with a loop over the channels ran slower.
_NCHW_MAX_VJP = """import numba
from einsumgrad.backends.intrinsics import wide


@numba.njit(cache=CACHE, nogil=True, error_model="numpy"{parallel})
def kernel(x, out, g, dx, one):
    zero = one - one
    for b in {over}(x.shape[0]):
        wide()
        for w in range(x.shape[2]):
            m = out[b, w]
            n = zero
            for i in range({kh}):
                for j in range({kw}):
                    v = x[b, i, w, j]
                    n += one if (v == m) | ((v != v) & (m != m)) else zero
            share = g[b, w] * (one / n)  # ties split g evenly, as max's rule
            for i in range({kh}):
                for j in range({kw}):
                    v = x[b, i, w, j]
                    dx[b, i, w, j] = share if (v == m) | ((v != v) & (m != m)) else zero
"""


def _window_kernels(template: str, **sizes) -> tuple:
    """The pooling kernel of ``template`` for these window sizes, and its ``prange``
    twin where kernels' rows run on numba's OpenMP team (:func:`.threads.openmp`),
    else None."""
    kernel = compiled.compile_kernel(template.format(parallel="", over="range", **sizes))
    team = (compiled.compile_kernel(template.format(parallel=", parallel=True",
                                                    over="numba.prange", **sizes))
            if threads.openmp() else None)
    return kernel, team


def _windows(x):
    """A pooling view ``(B, C, Ho, kh, Wo, kw)`` as the kernels' 5-D C-ordered
    ``(B*Ho or B*C*Ho, kh, Wo, kw, C or 1)`` and how to lay a result out back,
    or None: channels innermost in memory (channels-last) or NCHW."""
    if type(x) is not numpy.ndarray or x.ndim != 6 or x.dtype not in _KINDS or x.size == 0:
        return None
    b, c, ho, kh, wo, kw = x.shape
    last = x.transpose(0, 2, 3, 4, 5, 1)
    if last.flags.c_contiguous:
        return last.reshape(b * ho, kh, wo, kw, c), (b, ho, wo, c), (0, 3, 1, 2)
    if x.flags.c_contiguous:
        return x.reshape(b * c * ho, kh, wo, kw, 1), (b, c, ho, wo), (0, 1, 2, 3)
    return None


def window_max(x):
    """Max over axes 3 and 5 of a pooling view ``(B, C, Ho, kh, Wo, kw)``, laid
    out as ``x`` (channels-last or NCHW), or None."""
    view = _windows(x)
    if view is None or _kernels() is None:
        return None
    xk, shape, back = view
    out = numpy.empty(shape, x.dtype)
    kernel, team = _window_kernels(_WINDOW_MAX, kh=xk.shape[1], kw=xk.shape[3],
                                   channels=xk.shape[4])
    threads.rows(kernel, xk, (out.reshape(xk.shape[0], xk.shape[2], xk.shape[4]),), (True,),
                 2 * xk.size, limit=mkl.gemm_threads(), team=team)
    return out.transpose(back)


def window_max_vjp(x, out, g):
    """``g / (ties)`` where ``x`` attains the max ``out`` of its window, else 0:
    max's VJP over a pooling view, laid out as ``x``, or None. A window whose
    max is NaN attains it at its NaNs, as max's rule (and torch.max).

    Args:
        x: the pooling view ``(B, C, Ho, kh, Wo, kw)``.
        out: its max over axes 3 and 5, ``(B, C, Ho, Wo)``.
        g: the cotangent, shaped and typed as ``out``.
    """
    view = _windows(x)
    if (view is None or type(g) is not numpy.ndarray or type(out) is not numpy.ndarray
            or g.shape != out.shape or g.dtype != x.dtype or out.dtype != x.dtype
            or _kernels() is None):
        return None
    xk, shape, back = view
    order = tuple(numpy.argsort(back))  # out's axes in the kernel's order
    rows = lambda a: numpy.ascontiguousarray(a.transpose(order)).reshape(
        xk.shape[0], xk.shape[2], xk.shape[4])
    dx = numpy.empty_like(xk)
    if xk.shape[4] == 1:
        kernel, team = _window_kernels(_NCHW_MAX_VJP, kh=xk.shape[1], kw=xk.shape[3])
        threads.rows(kernel, xk[..., 0], (rows(out)[..., 0], rows(g)[..., 0], dx[..., 0],
                                          x.dtype.type(1)),
                     (True, True, True, False), 4 * xk.size, limit=mkl.gemm_threads(), team=team)
    else:
        _run_rows("window_max_vjp", (xk, rows(out), rows(g), dx, x.dtype.type(1)),
                  (True, True, True, True, False), 4 * xk.size)
    b, c, ho, kh, wo, kw = x.shape
    if back == (0, 3, 1, 2):
        return dx.reshape(b, ho, kh, wo, kw, c).transpose(0, 5, 1, 2, 3, 4)
    return dx.reshape(x.shape)


def _by_channel(x):
    """``x`` ``(N, C, ...)`` as a C-ordered view, ``(N, C, M)`` (``by_row``) or
    ``(N, M, C)`` (channels-last), and ``by_row``; None where it is neither."""
    if (type(x) is not numpy.ndarray or x.dtype not in _KINDS or x.ndim < 2 or x.size == 0
            or _kernels() is None):
        return None
    try:
        v = x.reshape(x.shape[0], x.shape[1], -1, copy=False)
    except ValueError:  # no (N, C, M) view of this layout
        return None
    if v.flags.c_contiguous and v.shape[2] > 1:
        return v, True
    v = v.transpose(0, 2, 1)  # (N, 1, C) for (N, C): rows along the channels
    return (v, False) if v.flags.c_contiguous else None


def _run_layout(name: str, by_row: bool, *args):
    """Kernel ``name`` for the layout, its rows (axis 0 of its first argument)
    shared among the OpenMP team's threads where that pays (``prange`` twins)."""
    k = threads.team_threads(2 * args[0].size, mkl.gemm_threads())
    if k > 1:
        threads.on_team(k, _compiled[f"{name}_team"][by_row], *args)
    else:
        _compiled[name][by_row](*args)


def _sums(name: str, by_row: bool, shape: tuple, *args, relu=None) -> list:
    """Kernel ``name``'s per-channel sums over ``args`` (``shape``: ``(accumulators,
    channels)``), in float64, as that many ``(C,)`` arrays; the rows' parts on
    threads of the team where that pays, each part's sums added after. ``relu``,
    where given, is the kernel's last argument, after the sums."""
    k = threads.team_threads(2 * args[0].size, mkl.gemm_threads())
    outs = [numpy.zeros((k, shape[1])) for _ in range(shape[0])]
    call = (*args, *outs) + (() if relu is None else (relu,))
    kernel = _compiled[f"{name}_team" if k > 1 else name][by_row]
    if k > 1:
        threads.on_team(k, kernel, *call)
    else:
        kernel(*call)
    return [o.sum(0) if k > 1 else o[0] for o in outs]


def batch_norm(x, weight, bias, eps: float, relu: bool = False):
    """Batch norm of ``x`` ``(N, C, ...)`` over every axis but the channels (1),
    with the batch's statistics, in three passes over ``x``; or None.

    Two passes for the statistics (the mean, then the squared deviations from
    it), summed in float64, and one writing ``y``, laid out as ``x``.

    Args:
        weight, bias: ``C`` entries each, ``x``'s dtype.
        relu: write ``max(y, 0)`` instead (a ReLU fused after the norm).

    Returns:
        ``(y, mean, var, s)``: the output, the batch mean and biased variance,
        and ``s = 1 / sqrt(var + eps)``, the last three ``(C,)``.
    """
    view = _by_channel(x)
    if view is None or not all(_vector(v, x.dtype, x.shape[1]) for v in (weight, bias)):
        return None
    (v, by_row), c, t = view, x.shape[1], x.dtype.type
    n = x.size // c
    (acc,) = _sums("channel_sums", by_row, (1, c), v, None, None)
    mean = (acc / n).astype(x.dtype)
    (acc,) = _sums("channel_sums", by_row, (1, c), v, mean, numpy.ones(c, x.dtype))
    var = (acc / n).astype(x.dtype)
    s = t(1) / numpy.sqrt(var + t(eps))
    y = _laid_out_as(x, v, by_row)
    _run_layout("batch_norm", by_row, v, mean, s * weight.reshape(-1), bias.reshape(-1),
                y[1], relu)
    return y[0], mean, var, s


def batch_norm_vjp(g, y, x, mean, s, weight, relu: bool = False):
    """The VJP of :func:`batch_norm` (the rules of
    :data:`einsumgrad.rules.batch_norm.batch_norm_p`) in two passes, or None.

    Args:
        g: the cotangent, shaped and typed as ``x``.
        y: the forward's output (read for the ReLU's mask with ``relu``).
        x, mean, s, weight: the forward's input and statistics (``(C,)`` each).

    Returns:
        ``(dx, dweight, dbias)``: ``dx = w s (g - mean(g) - xhat mean(g xhat))``
        with ``xhat = (x - mean) s``, ``dweight = sum(g xhat)``, ``dbias = sum(g)``
        (``g`` masked by the ReLU's rule first with ``relu``).
    """
    view = _by_channel(x)
    if (view is None or type(g) is not numpy.ndarray or g.shape != x.shape
            or g.dtype != x.dtype or type(y) is not numpy.ndarray or y.shape != x.shape
            or not all(_vector(a, x.dtype, x.shape[1]) for a in (mean, s, weight))):
        return None
    (v, by_row), c = view, x.shape[1]
    gv = _like(g, x, v, by_row)
    yv = _like(y, x, v, by_row) if relu else gv
    mean, s, w = (a.reshape(-1) for a in (mean, s, weight))
    n = x.size // c
    sg, sgx = _sums("batch_norm_sums", by_row, (2, c), gv, yv, v, mean, s, relu=relu)
    dx, dv = _laid_out_as(x, v, by_row)
    _run_layout("batch_norm_dx", by_row, gv, yv, v, mean, s, w * s, (sg / n).astype(x.dtype),
                (sgx / n).astype(x.dtype), dv, relu)
    return dx, sgx.astype(x.dtype), sg.astype(x.dtype)


def _laid_out_as(x, v, by_row: bool) -> tuple:
    """An empty array shaped as ``x`` and the same C-ordered view of it as ``v`` is of ``x``."""
    e = numpy.empty(v.shape, x.dtype)
    return (e if by_row else e.transpose(0, 2, 1)).reshape(x.shape), e


def _like(a, x, v, by_row: bool):
    """``a`` (shaped as ``x``) viewed as ``v`` is, copied into that layout if it is not."""
    if a.strides == x.strides:
        return a.reshape(x.shape[0], x.shape[1], -1).transpose((0, 1, 2) if by_row else (0, 2, 1))
    b, e = _laid_out_as(x, v, by_row)
    b[...] = a
    return e
