"""Image patches as an engine primitive: the op that turns convolution into an einsum.

``patches(x)`` maps ``(..., H, W)`` to ``(..., OH, OW, kh, kw)``: entry
``[..., i, j, k, l]`` is ``xpad[..., i*sh + k*dh, j*sw + l*dw]`` (``d`` the
dilation, 1 for adjacent window entries). Forward it is a
strided view of the padded input (``as_strided``), copied once into the
memory order a convolution's matmul reads. Its adjoint, :func:`unpatch`,
adds every patch back where it came from (overlap-add) and crops the padding.
Both are linear, and each one's VJP is the other, so every derivative of a
convolution, to any order and in either mode, is again patches, unpatch and
einsums. Leading axes (batch, channels, a Jacobian's basis) pass through.
"""
from __future__ import annotations

import concurrent.futures
import operator
import threading

from ..backends import backend_of, in_order_of, threads
from ..tensor import BatchMixingError, Primitive, Tensor, bind
from .shape import same_op


def out_size(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Output length of a window of ``k`` entries ``d`` apart, with stride ``s``,
    over ``n`` padded by ``p`` each side."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def span(k: int, d: int) -> int:
    """How far a window of ``k`` entries ``d`` apart reaches: ``d*(k-1) + 1``."""
    return d * (k - 1) + 1


def padded(x, padding):
    """``x`` zero-padded, keeping its memory order (channels-last stays so)."""
    (ph, pw), (h, w) = padding, x.shape[-2:]
    if not (ph or pw):
        return x
    z = in_order_of(x, x.shape[:-2] + (h + 2 * ph, w + 2 * pw))
    z[..., ph:ph + h, pw:pw + w] = x
    return z


def patches_array(x, kernel, stride, padding, contiguous, dilation=(1, 1)):
    xp = backend_of(x)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    x = padded(x, padding)
    oh, ow = (out_size(n, k, s, 0, d) for n, k, s, d in zip(x.shape[-2:], kernel, stride, dilation))
    *lead, s_h, s_w = x.strides
    view = xp.as_strided(x, shape=x.shape[:-2] + (oh, ow, kh, kw),
                         strides=tuple(lead) + (s_h * sh, s_w * sw, s_h * dh, s_w * dw))
    if not contiguous or x.ndim < 3:
        return view
    return _im2col(x, view, kernel, (oh, ow), (s_h * sh, s_w * sw), dilation)


def _im2col(x, view, kernel, out_hw, step, dilation=(1, 1)):
    """The windows copied once (im2col), in a memory order that follows ``x``'s.

    A convolution's matmul then reads them as a matrix without another copy
    (the planner takes each operand in its memory order), and the copy itself
    runs over long contiguous stretches: for a channels-last image a window
    row ``(kw, C)`` is one run, and all of them go in one copy (three copies,
    one per kernel row, each writing every third run, took 2.5x as long:
    1.6 against 0.66 ms for the bench CNN's second conv); otherwise each of the
    ``kh*kw`` offsets copies whole output rows into ``(C, kh, kw, ..., OH, OW)``.
    Either way the result is indexed ``(..., C, OH, OW, kh, kw)``. (A window
    row is one run only where its entries are adjacent: dilation 1 across.)
    """
    xp = backend_of(x)
    (kh, kw), (oh, ow), c, item = kernel, out_hw, x.shape[-3], x.itemsize
    lead = x.shape[:-3]
    if c > 1 and x.strides[-3] == item and x.strides[-1] == c * item and dilation[1] == 1:
        out = xp.empty(lead + (oh, ow, kh, kw * c), dtype=x.dtype)
        out[...] = xp.as_strided(x, shape=out.shape,
                                 strides=x.strides[:-3] + step + (x.strides[-2] * dilation[0],
                                                                  item))
        out = xp.reshape(out, lead + (oh, ow, kh, kw, c))
        return xp.moveaxis(out, -1, -5)
    out = xp.empty((c, kh, kw) + lead + (oh, ow), dtype=x.dtype)
    for k in range(kh):
        for l in range(kw):
            out[:, k, l] = xp.moveaxis(view[..., k, l], -3, 0)
    n = len(lead)
    return xp.transpose(out, tuple(range(3, 3 + n)) + (0, 3 + n, 4 + n, 1, 2))


def unpatch_array(g, size, kernel, stride, padding, dilation=(1, 1)):
    xp = backend_of(g)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    (h, w), (oh, ow) = size, g.shape[-4:-2]
    shape = g.shape[:-4] + (h + 2 * ph, w + 2 * pw)
    if g.ndim >= 5 and g.strides[-5] < g.strides[-4]:
        # Channels vary fastest in g (a conv's patch cotangent): add into a
        # channels-last image so each strided add reads and writes nearby memory.
        z = xp.moveaxis(xp.zeros(shape[:-3] + shape[-2:] + shape[-3:-2], dtype=g.dtype), -1, -3)
    else:
        z = xp.zeros(shape, dtype=g.dtype)
    # One strided add per kernel offset: kh*kw vectorized adds, not one per patch.
    for k in range(kh):
        for l in range(kw):
            i, j = k * dh, l * dw
            z[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += g[..., k, l]
    return z[..., ph:ph + h, pw:pw + w] if (ph or pw) else z


patches_p = Primitive("patches", patches_array)
unpatch_p = Primitive("unpatch", unpatch_array)


@patches_p.defvjp
def _patches_vjp(k, g, out, x, kernel, stride, padding, contiguous, dilation=(1, 1)):
    return unpatch(g, x.shape[-2:], kernel, stride, padding, dilation)


patches_p.deflinear()


@unpatch_p.defvjp
def _unpatch_vjp(k, g, out, x, size, kernel, stride, padding, dilation=(1, 1)):
    return patches(g, kernel, stride, padding, dilation=dilation)


unpatch_p.deflinear()


def _lead_batch(n_core_in: int, n_core_out: int):
    """Batch rule: a leading axis keeps its place; a spatial (core) axis would mix rows."""
    def rule(bdims, shapes, out_shape, **params):
        b = bdims[0]
        if b >= len(shapes[0]) - n_core_in:
            raise BatchMixingError(f"patches/unpatch along batch axis {b}: windows mix rows")
        return b
    return rule


patches_p.defbatch(_lead_batch(2, 4))
unpatch_p.defbatch(_lead_batch(4, 2))
patches_p.defvmap(same_op(patches_p))  # vmap: leading axes pass through the windows
unpatch_p.defvmap(same_op(unpatch_p))


def as_pair(v) -> tuple:
    try:
        n = operator.index(v)  # an int, NumPy's included
    except TypeError:
        return tuple(int(n) for n in v)
    return (n, n)


def patches(x: Tensor, kernel_size, stride=1, padding=0, contiguous: bool = False,
            dilation=1) -> Tensor:
    """Sliding windows of the last two axes: ``(..., H, W) -> (..., OH, OW, kh, kw)``.

    Args:
        x: a Tensor with at least two axes (the image's height and width last).
        kernel_size: window size, an int or ``(kh, kw)``.
        stride: step between windows, an int or a pair.
        padding: zeros added on each side of both axes, an int or a pair.
        contiguous: copy the windows once (im2col), in a memory order a
            convolution's matmul reads as a matrix, instead of returning a view.
        dilation: the step between a window's entries, an int or a pair.
    """
    kernel, stride, padding = as_pair(kernel_size), as_pair(stride), as_pair(padding)
    dilation = as_pair(dilation)
    check_fit("patches", x.shape[-2:], kernel, padding, dilation)
    return bind(patches_p, x, kernel=kernel, stride=stride, padding=padding,
                contiguous=contiguous, dilation=dilation)


def check_fit(what: str, hw, kernel, padding, dilation) -> None:
    """Raise ValueError where a window (dilated) does not fit the padded image."""
    if any(n + 2 * p < span(k, d) for n, k, p, d in zip(hw, kernel, padding, dilation)):
        raise ValueError(f"{what}: a {kernel} window (dilation {dilation}) does not fit a "
                         f"{tuple(hw)} image padded by {padding}")


def unpatch(g: Tensor, size, kernel_size, stride=1, padding=0, dilation=1) -> Tensor:
    """The adjoint of :func:`patches`: add each window back onto a ``size`` image."""
    return bind(unpatch_p, g, size=tuple(int(n) for n in size), kernel=as_pair(kernel_size),
                stride=as_pair(stride), padding=as_pair(padding), dilation=as_pair(dilation))



class _Blocks:
    """Buffers for the patches of a block of ``nb`` images ``(H, W, I)``: a
    zero-bordered image ``pad`` ``(nb, Hp, Wp, I)``, the window buffer ``cols``
    ``(nb, OH, OW, kh, kw, I)``, and ``view``, the windows of ``pad`` as a strided
    view shaped as ``cols``. Only the inside of ``pad`` is ever written: its
    border stays zero, so the buffers serve call after call (:func:`_blocks`)."""

    def __init__(self, xp, hwi: tuple, dtype, kernel, stride, padding, dilation, nb: int):
        h, w, i = hwi
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, padding, stride, dilation
        oh, ow = (out_size(n, k, s, p, d) for n, k, s, p, d in
                  zip((h, w), kernel, stride, padding, dilation))
        self.nb = nb
        self.pad = xp.zeros((nb, h + 2 * ph, w + 2 * pw, i), dtype=dtype)
        self.cols = xp.empty((nb, oh, ow, kh, kw, i), dtype=dtype)
        s_r, s_h, s_w, s_i = self.pad.strides
        self.view = xp.as_strided(self.pad, shape=self.cols.shape,
                                  strides=(s_r, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_i))
        self.inside = (slice(None), slice(ph, ph + h), slice(pw, pw + w))
        self.xp, self.k = xp, kh * kw * i
        self.steps = (sh, sw), (dh, dw)
        # A whole block's views, made once (most blocks are whole).
        self.whole = self.pad[self.inside], xp.reshape(self.cols, (-1, self.k))

    def windows(self, x, s: int, m: int):
        """Images ``s : s + m`` of ``x``, padded, their windows copied (im2col): the
        matrix ``(m*OH*OW, kh*kw*I)``, a window a row."""
        if m == self.nb:
            inside, mat = self.whole
            inside[...] = x[s:s + m]
            self._copy(self.pad, self.cols, self.view)
            return mat
        self.pad[:m][self.inside] = x[s:s + m]
        cols = self.cols[:m]
        self._copy(self.pad[:m], cols, self.view[:m])
        return self.xp.reshape(cols, (-1, self.k))

    def _copy(self, pad, cols, view):
        copy = self.xp.window_copy
        if copy is None or not copy(pad, cols, *self.steps):
            cols[...] = view


# Block buffers kept per thread (two threads never share one) for the next
# convolution of the same shapes: a step's convolutions reuse them instead of
# allocating and zeroing them anew. At most this many, each at most
# _KEPT_BYTES (a block larger than that, one huge image, is allocated each time).
_KEPT = 8
_KEPT_BYTES = 16 << 20
_kept = threading.local()


def _block_images(x, kernel, stride, padding, dilation, block_bytes: int) -> int:
    """How many images ``(H, W, I)`` of ``x`` make about ``block_bytes`` of windows."""
    r, h, w, i = x.shape
    oh, ow = (out_size(n, k, s, p, d) for n, k, s, p, d in
              zip((h, w), kernel, stride, padding, dilation))
    row_bytes = oh * ow * kernel[0] * kernel[1] * i * x.itemsize
    return max(1, min(r, block_bytes // max(row_bytes, 1)))


def _blocks(x, kernel, stride, padding, dilation, block_bytes: int) -> _Blocks:
    """Block buffers for ``x`` ``(R, H, W, I)``: about ``block_bytes`` of windows a block."""
    xp = backend_of(x)
    h, w, i = x.shape[1:]
    nb = _block_images(x, kernel, stride, padding, dilation, block_bytes)
    key = (xp, (h, w, i), x.dtype, kernel, stride, padding, dilation, nb)
    cache = getattr(_kept, "blocks", None)
    if cache is None:
        cache = _kept.blocks = {}
    got = cache.get(key)
    if got is None:
        got = _Blocks(xp, (h, w, i), x.dtype, kernel, stride, padding, dilation, nb)
        if got.cols.nbytes <= _KEPT_BYTES:
            if len(cache) >= _KEPT:
                del cache[next(iter(cache))]
            cache[key] = got
    return got


def conv_blocks(x, w, kernel, stride, padding, dilation, block_bytes: int, other=None,
                workers: int = 1):
    """``patches(x) @ w`` over channels-last images, a block of images at a time.

    ``x`` is ``(R, H, W, I)`` in any memory layout (R the images and any other
    leading axes, I the channels), ``w`` is ``(kh*kw*I, J)`` with rows in
    ``(kh, kw, I)`` order. Each block of images is padded and its windows
    copied (im2col) into buffers of about ``block_bytes`` that stay in cache
    for the block's matmul; the patches never exist whole. Returns
    ``(R, OH, OW, J)`` in C order.

    With ``other`` ``(R, OH, OW, L)`` it also returns ``patches(x)^T @ other``
    summed over the images, ``(kh*kw*I, L)``, from the same window copies: a
    stride-1 convolution's input gradient (``x`` its cotangent) and weight
    gradient (``other`` its image) in one pass. With ``workers`` > 1 the images
    are shared among that many threads, each with its own buffers and BLAS at
    one thread: the OpenMP team's where the backend has the kernel
    (:func:`_on_team`), else einsumgrad's pool (:func:`_on_threads`).
    """
    xp = backend_of(x)
    got = _on_team(x, w, kernel, stride, padding, dilation, block_bytes, other, workers)
    if got is not None:
        return got[0] if other is None else got
    r, j = x.shape[0], w.shape[-1]
    oh, ow = _blocks(x, kernel, stride, padding, dilation, block_bytes).cols.shape[1:3]
    out = xp.empty((r, oh, ow, j), dtype=x.dtype)
    flat = xp.reshape(out, (r * oh * ow, j))

    def images(lo: int, hi: int):
        blocks, total = _blocks(x, kernel, stride, padding, dilation, block_bytes), None
        for s in range(lo, hi, blocks.nb):
            m = min(blocks.nb, hi - s)
            a = blocks.windows(x, s, m)
            xp.matmul(a, w, out=flat[s * oh * ow:(s + m) * oh * ow])
            if other is not None:
                total = _add_product(xp, xp.transpose(a), other[s:s + m], total)
        return total
    total = _on_threads(images, r, workers, xp)
    return out if other is None else (out, total)


def _on_team(x, w, kernel, stride, padding, dilation, block_bytes: int, other, workers: int):
    """``(patches(x) @ w, patches(x)^T @ other)`` (either None where its operand is)
    by the backend's ``window_products`` kernel, on ``workers`` threads of the
    OpenMP team its GEMM runs on, whose workers spin between products where the
    pool's threads sleep (waking one and hearing back took 80 us a block loop);
    or None where there is no such kernel or team."""
    xp = backend_of(x)
    if workers < 2 or xp.window_products is None or threads.nested():
        return None
    geometry = tuple(kernel) + tuple(stride) + tuple(padding) + tuple(dilation)
    nb = _block_images(x, kernel, stride, padding, dilation, block_bytes)
    return xp.window_products(x, w, geometry, nb, other, workers)


def _on_threads(images, r: int, workers: int, xp):
    """``images(lo, hi)`` over the images ``0:r``, in ``workers`` contiguous parts
    on as many threads (the calling one first) with BLAS at one thread; their
    returns (sums over the images, or None) added up in the parts' order."""
    workers = min(workers, r)
    if workers < 2 or threads.nested():
        return images(0, r)
    bounds = [r * i // workers for i in range(workers + 1)]
    with threads.one_thread:
        futures = [threads.pool(workers - 1).submit(images, bounds[i], bounds[i + 1])
                   for i in range(1, workers)]
        try:
            totals = [images(bounds[0], bounds[1])]
        finally:
            concurrent.futures.wait(futures)
        totals += [f.result() for f in futures]  # a worker's error, raised here
    if totals[0] is None:
        return None
    for t in totals[1:]:
        totals[0] += t
    return totals[0]


def _add_product(xp, a, b, total):
    """``total + a @ b`` (in place after the first), ``b`` an image block taken as
    a matrix of its pixels' rows."""
    b = xp.reshape(b, (a.shape[1], b.shape[-1]))
    if total is None:
        return xp.matmul(a, b)
    xp.matmul_add(a, b, total)
    return total


def conv_weight_blocks(x, g, kernel, stride, padding, dilation, block_bytes: int,
                       workers: int = 1):
    """``patches(x)^T @ g`` summed over images, a block of images at a time: a
    convolution's weight gradient without the whole patches.

    ``x`` is ``(R, H, W, I)`` and ``g`` ``(R, OH, OW, J)``, any layouts. Returns
    ``(kh*kw*I, J)``, rows in ``(kh, kw, I)`` order. ``workers``: as :func:`conv_blocks`.
    """
    xp = backend_of(x)
    got = _on_team(x, None, kernel, stride, padding, dilation, block_bytes, g, workers)
    if got is not None:
        return got[1]

    def images(lo: int, hi: int):
        blocks, total = _blocks(x, kernel, stride, padding, dilation, block_bytes), None
        for s in range(lo, hi, blocks.nb):
            m = min(blocks.nb, hi - s)
            total = _add_product(xp, xp.transpose(blocks.windows(x, s, m)), g[s:s + m], total)
        return total
    return _on_threads(images, x.shape[0], workers, xp)
