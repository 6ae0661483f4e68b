"""Einsums against image patches, without the whole patch tensor.

``patch_einsum(spec, x, o)`` is ``einsum(spec, patches(x), o)`` and
``unpatch_einsum(spec, a, b, size)`` is ``unpatch(einsum(spec, a, b))``: a
convolution, its weight gradient and its input gradient. Materialized whole,
the patch tensor is ``kh*kw`` times the image (14 MB per conv of the bench
CNN), copied from and to memory. ``patch_einsum`` copies the patches (im2col)
a chunk at a time (1 MB, or 16 MB with MKL), each chunk one matmul over
``kh*kw*C``; ``unpatch_einsum`` (and ``patch_einsum`` past 64 MB a chunk)
runs each of the ``kh*kw`` offsets as one planned einsum on a strided view of
the padded image (a matmul), added into the result or onto the image: no
buffer larger than the image. Where the patches are copied whole and ``o``
needs a gradient (a conv's weight), the copy is made before the op is
recorded and kept on its node: the weight gradient reads it again instead of
copying it anew. At stride 1 with enough channels the input gradient runs on
the padded grid instead (:mod:`.grid`): one product per window offset, with
no patch-shaped product and no strided adds.

On a host backend, an einsum shaped as a convolution, its weight gradient or
(at stride 1) its input gradient runs by blocks instead (:data:`BLOCK_BYTES`):
the patches of a few images at a time are copied (im2col) into a buffer that
stays in cache for the block's matmul, so neither the patches nor a padded
grid ever pass through main memory whole; the input gradient is the
convolution of the cotangent with the window flipped, and the weight's comes
from the same copies. Where the GEMM threads one large product (MKL's on
several threads) a block is larger (:data:`WHOLE_BLOCK_BYTES`): fewer
products, fewer parallel regions. The other paths serve other devices,
other einsums (grouped, per-sample weights) and few channels.

The patch term is the first operand of ``patch_einsum`` and the output of
``unpatch_einsum``; its last four labels are (OH, OW, kh, kw). The two
primitives are each other's transposes in the patch operand, so every VJP
and JVP is again one of them, and derivatives of any order stay cheap.
"""
from __future__ import annotations

import math
from time import perf_counter

from ..backends import backend_of, in_order_of, threads
from ..derive import batched
from ..plan import CACHE_SIZE, Bounded, plan_for
from ..spec import Spec
from ..tensor import BatchMixingError, Primitive, Tensor, as_tensor, bind, state
from .grid import grid_groups, grid_pays, unpatch_on_grid
from .patches import (as_pair, check_fit, conv_blocks, conv_weight_blocks, out_size, padded,
                      patches_array, unpatch_array)
from .shape import Batched


def _shifted(xpad, k, l, oh, ow, stride, dilation=(1, 1)):
    """The ``(k, l)`` offset of every window: a strided view ``(..., OH, OW)``."""
    (sh, sw), (i, j) = stride, (k * dilation[0], l * dilation[1])
    return xpad[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]


def _drop(spec: Spec, gone: tuple) -> Spec:
    return Spec(tuple(tuple(a for a in t if a not in gone) for t in spec.inputs),
                tuple(a for a in spec.output if a not in gone))


def _at(term: tuple, kl: tuple, k: int, l: int) -> tuple:
    """An index taking offset ``(k, l)`` along the window labels that ``term`` has."""
    return tuple(k if a == kl[0] else l if a == kl[1] else slice(None) for a in term)


def _lay_out(o, term: tuple, first: tuple):
    """``o`` copied once into memory order ``first`` then the rest, same axes.

    Each offset's matmul then reshapes it into a matrix for free instead of
    copying it again, ``kh*kw`` times.
    """
    xp = backend_of(o)
    order = [term.index(a) for a in first if a in term]
    order += [i for i in range(len(term)) if i not in order]
    if o.ndim < 2 or order == list(range(len(term))):
        return o
    buf = xp.empty(tuple(o.shape[i] for i in order), dtype=o.dtype)
    buf[...] = xp.transpose(o, order)
    return xp.transpose(buf, tuple(order.index(i) for i in range(len(term))))


def _small(patch_shape, *others) -> bool:
    """Whether the patch tensor is no larger than an array the op touches anyway:
    then it adds no more memory than is already in use."""
    return math.prod(patch_shape) <= max(math.prod(s) for s in others)


def _owned(r):
    """``r`` if it can be added into in place, else a copy: a product constant
    along a broadcast axis comes back as a stride-0 (read-only) view."""
    return r.copy() if 0 in r.strides else r


# Patches are copied (im2col) at most this many bytes at a time. A chunk that
# stays in cache between its copy and its matmul suits OpenBLAS (bench CNN step
# 38.4 -> 36.3 ms at 1 thread against 16 MB chunks); MKL threads one large GEMM
# better than 15 small ones (the 14 MB whole: 29.3 -> 27.0 ms at 2 threads, the
# same at 1), so with it only large batches or Jacobian bases are cut.
_CHUNK_BYTES = 1 << 20
_CHUNK_BYTES_MKL = 1 << 24
_PATCH_BYTES = 64 << 20  # past this per chunk the offsets run one at a time


def _chunks(x, p: tuple, out_term: tuple, sizes: dict) -> tuple:
    """How to cut the patches: the leading image axis (outermost in memory, or
    None for no cut), how many of its entries go in one chunk, and a chunk's bytes.

    No cut where the output is cut too and is not much smaller than the
    patches (a conv of few input channels): copying its pieces costs more.
    """
    total = math.prod(sizes[a] for a in p) * x.itemsize
    axes = [i for i in range(len(p) - 4) if x.shape[i] > 1]
    limit = _CHUNK_BYTES_MKL if backend_of(x).threads_large_gemm else _CHUNK_BYTES
    if total <= limit or not axes:
        return None, 0, total
    ax = max(axes, key=lambda i: x.strides[i])
    if p[ax] in out_term and 2 * math.prod(sizes[a] for a in out_term) * x.itemsize > total:
        return None, 0, total
    step = max(1, x.shape[ax] * limit // total)
    return ax, step, total // x.shape[ax] * step


def _sizes(x, o, spec: Spec, kernel, stride, padding, dilation) -> dict:
    oh, ow = (out_size(n, k, s, q, d) for n, k, s, q, d in
              zip(x.shape[-2:], kernel, stride, padding, dilation))
    return dict(zip(spec.inputs[0], x.shape[:-2] + (oh, ow) + kernel)) | dict(zip(spec.inputs[1],
                                                                                  o.shape))


def _copied_whole(x, o, spec: Spec, kernel, stride, padding, dilation):
    """The patches of ``x``, copied, where ``patch_einsum`` copies them in one
    piece (not cut into chunks, not offset by offset); else None."""
    if _block_plan(x, o, spec, kernel, stride, padding, dilation) is not None:
        return None  # by blocks: the weight gradient copies its blocks again
    p, out_term = spec.inputs[0], spec.output
    ax, _, nbytes = _chunks(x, p, out_term, _sizes(x, o, spec, kernel, stride, padding, dilation))
    if ax is not None or nbytes > _PATCH_BYTES:
        return None
    return patches_array(x, kernel, stride, padding, contiguous=True, dilation=dilation)


# On a host backend each convolution product runs on the patches of a block of
# images at a time, about this many bytes of them, copied into a buffer that
# stays in cache for the block's matmul (:func:`.patches.conv_blocks`); 0 turns
# it off (the paths below: whole or chunked copies, offsets, the grid).
BLOCK_BYTES = 1 << 20
# Where the GEMM runs one large product on several threads, a block holds up to
# this many bytes of patches: each block's product is a parallel region, and a
# thread descheduled by other work on the machine holds every region up, so
# blocks are larger than on one thread; but not the whole batch, whose patches
# then stream through memory (a 28x28 CNN's step lost to the paths below).
WHOLE_BLOCK_BYTES = 4 << 20
# Fewer channels than this make a window row too short a copy: the paths below.
MIN_BLOCK_CHANNELS = 8


def _axes(term: tuple, labels: tuple) -> list:
    return [term.index(a) for a in labels]


# Label bookkeeping of the block paths, per (labels, groups, shape): a step's
# convolutions ask for the same few several times each.
_groupings = Bounded(CACHE_SIZE)


def _grouped(a, term: tuple, groups: tuple, xp):
    """``a`` (labels ``term``) transposed to the label groups' order and each group
    merged into one axis (a view where the layout allows, else a copy)."""
    key = (term, groups, a.shape)
    how = _groupings.get(key)
    if how is None:
        size = dict(zip(term, a.shape))
        how = _groupings[key] = (tuple(sum((_axes(term, g) for g in groups), [])),
                                 tuple(math.prod(size[n] for n in g) for g in groups))
    return xp.reshape(xp.transpose(a, how[0]), how[1])


def _ungrouped(a, groups: tuple, sizes: dict, want: tuple, xp):
    """The inverse of :func:`_grouped`: ``a``'s merged axes split into ``groups``'
    labels, then transposed to the label order ``want``."""
    key = (groups, want)
    perm = _groupings.get(key)
    if perm is None:
        perm = _groupings[key] = tuple(_axes(sum(groups, ()), want))
    a = xp.reshape(a, tuple(sizes[n] for g in groups for n in g))
    return xp.transpose(a, perm)


# Devices whose caches the blocks are sized for (a GPU's products are better whole).
BLOCK_DEVICES = ("cpu",)


def _by_blocks(xp, *arrays) -> bool:
    """Whether convolution products on ``arrays`` run by blocks: a host device, one
    dtype, no empty operand (see :func:`_block_bytes` for the blocks' size)."""
    return (BLOCK_BYTES > 0 and xp.device in BLOCK_DEVICES and len({a.dtype for a in arrays}) == 1
            and 0 not in (a.size for a in arrays))


def _block_bytes(xp) -> int:
    """How many bytes of patches a block holds: :data:`BLOCK_BYTES` (a cache's
    worth) for a GEMM on one thread, :data:`WHOLE_BLOCK_BYTES` for one that
    threads one large product better than many cache-sized ones (MKL's at
    several threads): then each product is one parallel region, not one a block."""
    threads = getattr(xp, "gemm_threads", None) if xp.threads_large_gemm else None
    return BLOCK_BYTES if threads is None or threads() == 1 else max(BLOCK_BYTES,
                                                                      WHOLE_BLOCK_BYTES)


# (plan key) -> threads.Timed: a convolution's two ways at several MKL threads.
_paces = Bounded(CACHE_SIZE)


def _by_threads(key: tuple, xp, run):
    """``run(block_bytes, workers)`` the way measured faster for this convolution
    where MKL runs on several threads: each product on all of them (blocks of
    :func:`_block_bytes`), or cache-sized blocks shared among a thread per core,
    each product on one (which also shares the window copies). Which pays
    depends on the shapes and on how busy the cores are, so both are timed as
    they run (:class:`einsumgrad.backends.threads.Timed`); ``threads.SHARE``
    forces one."""
    gemm = getattr(xp, "gemm_threads", None) if xp.threads_large_gemm else None
    workers = min(gemm(), threads.cores()) if gemm is not None else 1
    if (workers < 2 or threads.SHARE is False or threads.nested()
            or not threads.one_thread.available()):  # no threadpoolctl: no BLAS at one thread
        return run(_block_bytes(xp), 1)
    if threads.SHARE:
        return run(BLOCK_BYTES, workers)
    pace = _paces.get(key)
    if pace is None:
        pace = _paces[key] = threads.Timed(2, every=16)
    way = pace.pick()
    start = perf_counter()
    got = run(BLOCK_BYTES, workers) if way else run(_block_bytes(xp), 1)
    pace.record(way, perf_counter() - start)
    return got


def _block_form(spec: Spec):
    """``('conv', groups)`` for a patch einsum shaped as a convolution (window labels
    on the other operand, ``(OH, OW)`` in the output), ``('weight', groups)`` for
    one shaped as its weight gradient (the reverse), else None; ``groups`` is
    ``(rows, inner, cols)`` as :func:`.grid.grid_groups` gives them."""
    (p, ot), r = spec.inputs, spec.output
    hw, kl = set(p[-4:-2]), set(p[-2:])
    if kl <= set(ot) and hw <= set(r):
        groups = grid_groups(p, ot, r)
        return None if groups is None else ("conv", groups)
    if kl <= set(r) and hw <= set(ot):
        groups = grid_groups(p, r, ot)
        return None if groups is None else ("weight", groups)
    return None


# (kind, spec, shapes, window, MIN_BLOCK_CHANNELS) -> the plan by blocks or None
# (:func:`_block_plan`, :func:`_unpatch_blocks`): each convolution asks several
# times a step, and the answer is shape-only.
_block_plans = Bounded(CACHE_SIZE)


def _block_plan(x, o, spec, kernel, stride, padding, dilation):
    """``(kind, groups, sizes)`` where ``patch_einsum`` runs by blocks (see
    :func:`_block_form`; ``sizes`` every label's, not to be changed), else None."""
    if not _by_blocks(backend_of(x), x, o):  # threads and dtypes: asked every time
        return None
    key = ("patch", spec, x.shape, o.shape, kernel, stride, padding, dilation,
           MIN_BLOCK_CHANNELS)
    plan = _block_plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED:
        plan = _block_plans[key] = _shape_plan(x, o, spec, kernel, stride, padding, dilation)
    return plan


_UNPLANNED = object()


def _shape_plan(x, o, spec, kernel, stride, padding, dilation):
    form = _block_form(spec)
    if form is None:
        return None
    sizes = _sizes(x, o, spec, kernel, stride, padding, dilation)
    if math.prod(sizes[n] for n in form[1][1]) < MIN_BLOCK_CHANNELS:
        return None
    return form + (sizes,)


def _patch_blocks(x, o, spec, kernel, stride, padding, dilation):
    """``patch_einsum`` by :func:`.patches.conv_blocks` / :func:`.patches.conv_weight_blocks`
    where the einsum is a convolution or its weight gradient; else None."""
    plan = _block_plan(x, o, spec, kernel, stride, padding, dilation)
    if plan is None:
        return None
    xp = backend_of(x)
    (p, ot), r = spec.inputs, spec.output
    kind, (rows, inner, cols), sizes = plan
    lead, hw, kl = p[:-4], p[-4:-2], p[-2:]
    xr = _grouped(x, lead + ("H", "W"), (rows, ("H",), ("W",), inner), xp)
    key = ("patch", spec, x.shape, o.shape, kernel, stride, padding, dilation)
    if kind == "conv":
        w = _grouped(o, ot, (kl + inner, cols), xp)
        y = _by_threads(key, xp, lambda nbytes, workers: conv_blocks(
            xr, w, kernel, stride, padding, dilation, nbytes, workers=workers))
        return _ungrouped(y, (rows, hw, cols), sizes, r, xp)
    g = _grouped(o, ot, (rows, hw[:1], hw[1:], cols), xp)
    dw = _by_threads(key, xp, lambda nbytes, workers: conv_weight_blocks(
        xr, g, kernel, stride, padding, dilation, nbytes, workers=workers))
    return _ungrouped(dw, (kl, inner, cols), sizes, r, xp)


def _input_gradient_plan(spec, a_shape, b_shape, size, kernel, padding, dilation):
    """``(groups, back, sizes)`` for :func:`_unpatch_blocks` (the padding of the
    flipped window, every label's size, the image's included), or None where an
    ``unpatch_einsum`` of these shapes is no convolution's input gradient by blocks."""
    (at, bt), p = spec.inputs, spec.output
    groups = grid_groups(p, bt, at)
    if groups is None:
        return None
    back = tuple((k - 1) * d - q for k, d, q in zip(kernel, dilation, padding))
    sizes = {n: s for t, shape in zip(spec.inputs, (a_shape, b_shape)) for n, s in zip(t, shape)}
    fits = all(sizes[n] + 2 * q - (k - 1) * d == s for n, q, k, d, s in
               zip(p[-4:-2], back, kernel, dilation, size))
    if min(back) < 0 or not fits or math.prod(sizes[n] for n in groups[2]) < MIN_BLOCK_CHANNELS:
        return None
    return groups, back, sizes | dict(zip(p[-4:-2], size))


def _unpatch_blocks(a, b, spec, size, kernel, stride, padding, dilation, image=None):
    """``unpatch_einsum`` of stride 1 shaped as a convolution's input gradient, as
    the convolution of the cotangent with the window flipped (padded by the
    window's span less the forward's padding): :func:`.patches.conv_blocks`.
    None where it does not apply.

    With ``image`` (the forward's, labelled as the output) it returns the
    weight's cotangent too, shaped as ``b``, from the same window copies: the
    weight gradient is the image against the cotangent's flipped windows.
    """
    xp = backend_of(a)
    if stride != (1, 1) or not _by_blocks(xp, a, b):
        return None
    key = ("unpatch", spec, a.shape, b.shape, size, kernel, padding, dilation,
           MIN_BLOCK_CHANNELS)
    plan = _block_plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED:
        plan = _block_plans[key] = _input_gradient_plan(spec, a.shape, b.shape, size, kernel,
                                                        padding, dilation)
    if plan is None:
        return None
    (at, bt), p = spec.inputs, spec.output
    (rows, inner, cols), back, sizes = plan
    hw, kl = p[-4:-2], p[-2:]
    g = _grouped(a, at, (rows, hw[:1], hw[1:], cols), xp)
    w = _grouped(b, bt, (kl[:1], kl[1:], cols, inner), xp)[::-1, ::-1]  # the window flipped
    w = xp.reshape(w, (-1, w.shape[-1]))
    other = None if image is None else _grouped(image, p[:-4] + hw, (rows, hw[:1], hw[1:], inner),
                                                xp)
    z = _by_threads(key + (image is None,), xp, lambda nbytes, workers: conv_blocks(
        g, w, kernel, (1, 1), back, dilation, nbytes, other, workers=workers))
    if image is None:
        return _ungrouped(z, (rows, hw, inner), sizes, p[:-4] + hw, xp)
    z, dw = z
    dw = xp.reshape(dw, kernel + (-1, dw.shape[-1]))[::-1, ::-1]  # back from the flipped window
    dw = _ungrouped(dw, (kl[:1], kl[1:], cols, inner), sizes, bt, xp)
    return _ungrouped(z, (rows, hw, inner), sizes, p[:-4] + hw, xp), dw


def _patch_einsum_impl(x, o, spec, kernel, stride, padding, patches=None, dilation=(1, 1)):
    if patches is not None:  # the forward's copy, kept for the weight gradient
        return plan_for(spec, [patches, o])([patches, o])
    got = _patch_blocks(x, o, spec, kernel, stride, padding, dilation)
    if got is not None:
        return got
    xp = backend_of(x)
    (kh, kw), p, out_term = kernel, spec.inputs[0], spec.output
    sizes = _sizes(x, o, spec, kernel, stride, padding, dilation)
    oh, ow = sizes[p[-4]], sizes[p[-3]]
    ax, step, nbytes = _chunks(x, p, out_term, sizes)
    if nbytes <= _PATCH_BYTES:
        # One copy of the windows and one matmul over kh*kw*C beat kh*kw thin
        # matmuls over C and their accumulation; a chunk at a time.
        return _by_chunks(x, o, spec, kernel, stride, padding, ax, step, dilation)
    xpad, o = padded(x, padding), _lay_out(o, spec.inputs[1], p[:-2])
    kl = p[-2:]
    sub = _drop(spec, kl)
    kept = any(a in out_term for a in kl)
    out, run = None, None
    for k in range(kh):
        for l in range(kw):
            arrs = [_shifted(xpad, k, l, oh, ow, stride, dilation),
                    o[_at(spec.inputs[1], kl, k, l)]]
            run = run or plan_for(sub, arrs)
            r = run(arrs)
            if kept:  # a window label in the output: each offset fills its own slice
                if out is None:
                    shape = dict(zip(sub.output, r.shape)) | dict(zip(kl, kernel))
                    out = xp.zeros(tuple(shape[a] for a in out_term), dtype=r.dtype)
                out[_at(out_term, kl, k, l)] += r
            elif out is None:
                out = _owned(r)  # accumulate in the matmul result's own layout
            else:
                out += r
    return out


def _by_chunks(x, o, spec, kernel, stride, padding, ax, step, dilation):
    """``einsum(spec, patches(x), o)``, the patches materialized ``step`` entries of
    image axis ``ax`` at a time (all at once where ``ax`` is None)."""
    p, ot, out_term = spec.inputs[0], spec.inputs[1], spec.output
    if ax is None:
        arrs = [patches_array(x, kernel, stride, padding, contiguous=True, dilation=dilation), o]
        return plan_for(spec, arrs)(arrs)
    label, out = p[ax], None
    cut = lambda term, sl: (slice(None),) * term.index(label) + (sl,)
    xpad = padded(x, padding)  # once: a chunk's own padding is a copy per chunk
    for s in range(0, x.shape[ax], step):
        sl = slice(s, s + step)
        arrs = [patches_array(xpad[cut(p, sl)], kernel, stride, (0, 0), contiguous=True,
                              dilation=dilation),
                o[cut(ot, sl)] if label in ot else o]
        r = plan_for(spec, arrs)(arrs)
        if label not in out_term:  # the cut axis is summed: add the chunks up
            out = _owned(r) if out is None else out.__iadd__(r)
            continue
        if out is None:
            shape = r.shape[:out_term.index(label)] + (x.shape[ax],) + \
                r.shape[out_term.index(label) + 1:]
            out = in_order_of(r, shape, fill="empty")
        out[cut(out_term, sl)] = r
    return out


def _unpatch_einsum_impl(a, b, spec, size, kernel, stride, padding, dilation=(1, 1)):
    got = _unpatch_blocks(a, b, spec, size, kernel, stride, padding, dilation)
    if got is not None:
        return got
    xp = backend_of(a)
    (kh, kw), (ph, pw), p = kernel, padding, spec.output
    sizes = {n: s for t, arr in zip(spec.inputs, (a, b)) for n, s in zip(t, arr.shape)}
    oh, ow = sizes[p[-4]], sizes[p[-3]]
    groups = grid_groups(p, spec.inputs[1], spec.inputs[0])
    grid_hw = (size[0] + 2 * ph, size[1] + 2 * pw)
    if groups and grid_pays(xp, groups[2], sizes, stride, grid_hw, (oh, ow), (a.dtype, b.dtype)):
        return unpatch_on_grid(a, b, spec, size, kernel, padding, groups, dilation)
    if _small(tuple(sizes.get(n, 0) for n in p[:-2]) + kernel, a.shape, b.shape):
        r = plan_for(spec, [a, b])([a, b])
        return unpatch_array(r, size, kernel, stride, padding, dilation)
    b, kl = _lay_out(b, spec.inputs[1], spec.inputs[0]), p[-2:]
    sub = _drop(spec, kl)
    z, run = None, None
    for k in range(kh):
        for l in range(kw):
            arrs = [a[_at(spec.inputs[0], kl, k, l)], b[_at(spec.inputs[1], kl, k, l)]]
            run = run or plan_for(sub, arrs)
            r = run(arrs)
            if z is None:  # the padded image, in r's memory order so each add is local
                z = in_order_of(r, r.shape[:-2] + (size[0] + 2 * ph, size[1] + 2 * pw))
            _shifted(z, k, l, oh, ow, stride, dilation)[...] += r
    return z[..., ph:ph + size[0], pw:pw + size[1]] if (ph or pw) else z


patch_einsum_p = Primitive("patch_einsum", _patch_einsum_impl)
unpatch_einsum_p = Primitive("unpatch_einsum", _unpatch_einsum_impl)


def _lead(spec: Spec, n: int) -> tuple:
    """``n`` labels not in ``spec``: the leading axes of a cotangent or tangent basis."""
    top = max(spec.labels) + 1
    return tuple(range(top, top + n))


@patch_einsum_p.defvjp
def _patch_einsum_vjp(k, g, out, x, o, spec, kernel, stride, padding, patches=None,
                      dilation=(1, 1)):
    (p, ot), r, n = spec.inputs, spec.output, _lead(spec, g.ndim - out.ndim)
    if k == 0:
        return _unpatch(Spec((n + r, ot), n + p), g, o, x.shape[-2:], kernel, stride, padding,
                        dilation)
    return _patch(Spec((p, n + r), n + ot), x, g, kernel, stride, padding, patches, dilation)


@patch_einsum_p.defjvp
def _patch_einsum_jvp(k, t, out, x, o, spec, kernel, stride, padding, patches=None,
                      dilation=(1, 1)):
    (p, ot), r = spec.inputs, spec.output
    n = _lead(spec, t.ndim - (x, o)[k].ndim)
    if k == 0:
        return _patch(Spec((n + p, ot), n + r), t, o, kernel, stride, padding, None, dilation)
    return _patch(Spec((p, n + ot), n + r), x, t, kernel, stride, padding, patches, dilation)


@unpatch_einsum_p.defvjp
def _unpatch_einsum_vjp(k, g, out, a, b, spec, size, kernel, stride, padding, dilation=(1, 1)):
    (at, bt), p, n = spec.inputs, spec.output, _lead(spec, g.ndim - out.ndim)
    other, term = (b, bt) if k == 0 else (a, at)
    return _patch(Spec((n + p, term), n + spec.inputs[k]), g, other, kernel, stride, padding,
                  None, dilation)


@unpatch_einsum_p.defjvp
def _unpatch_einsum_jvp(k, t, out, a, b, spec, size, kernel, stride, padding, dilation=(1, 1)):
    (at, bt), p = spec.inputs, spec.output
    n = _lead(spec, t.ndim - (a, b)[k].ndim)
    s = Spec((n + at, bt), n + p) if k == 0 else Spec((at, n + bt), n + p)
    return _unpatch(s, t if k == 0 else a, b if k == 0 else t, size, kernel, stride, padding,
                    dilation)


class _ConvCotangents:
    """A convolution's cotangents, for the image (0) and the weight (1), each
    made when first asked for: the image's with the weight's in one pass over
    the cotangent's window copies where :func:`_unpatch_blocks` can, else each
    by its rule's product. (Asked for the weight's alone, as for a first layer
    whose image needs no gradient, only it is made.)"""

    def __init__(self, g, x, o, spec, kernel, stride, padding, dilation):
        self.g, self.x, self.o, self.spec = g, x, o, spec
        self.window = kernel, stride, padding, dilation
        self.got: dict = {}

    def __getitem__(self, k: int):
        if k not in self.got:
            (p, ot), r = self.spec.inputs, self.spec.output
            g, x, o, (kernel, stride, padding, dilation) = self.g, self.x, self.o, self.window
            if k == 1:
                self.got[1] = _patch_einsum_impl(x, g, Spec((p, r), ot), kernel, stride,
                                                 padding, None, dilation)
            else:
                size, back = x.shape[-2:], Spec((r, ot), p)
                both = _unpatch_blocks(g, o, back, size, kernel, stride, padding, dilation, x)
                self.got.update({0: both[0], 1: both[1]} if both is not None else {
                    0: _unpatch_einsum_impl(g, o, back, size, kernel, stride, padding, dilation)})
        return self.got[k]


@patch_einsum_p.deffused
def _patch_einsum_fused(g, out, x, o, spec, kernel, stride, padding, patches=None,
                        dilation=(1, 1)):
    # Convolutions that run by blocks (no Jacobian basis in g): see _ConvCotangents.
    plan = None if g.shape != out.shape else _block_plan(x, o, spec, kernel, stride, padding,
                                                          dilation)
    if plan is None or plan[0] != "conv" or backend_of(g) is not backend_of(x):
        return None
    return _ConvCotangents(g, x, o, spec, kernel, stride, padding, dilation)


def _batch_rule(patch_term):
    def rule(bdims, shapes, out_shape, spec, **params):
        labels = {spec.inputs[k][d] for k, d in enumerate(bdims) if d is not None}
        label = labels.pop()
        if labels or label not in spec.output or label in patch_term(spec)[-4:]:
            raise BatchMixingError(f"{spec}: the batch axis is paired, summed or windowed: "
                                   f"rows mix")
        return spec.output.index(label)
    return rule


patch_einsum_p.defbatch(_batch_rule(lambda spec: spec.inputs[0]))
unpatch_einsum_p.defbatch(_batch_rule(lambda spec: spec.output))


def _vmap_rule(p: Primitive):
    """vmap: an einsum against patches gains a fresh leading index, as einsum's rule:
    the patch term's last four labels stay last. A patch einsum on plain physical
    tensors goes through the convolution's front end, which keeps the patches it
    copies for the weight gradient (a copy made per example would be read once per
    example)."""
    def rule(bdims, a, b, spec, patches=None, **params):
        spec = batched(spec, tuple(k for k, d in enumerate(bdims) if d is not None), 1)
        if p is unpatch_einsum_p:
            return bind(p, a, b, spec=spec, **params)
        if type(a) is not Batched and type(b) is not Batched:  # no outer vmap's level left
            return _patch(spec, a, b, params["kernel"], params["stride"], params["padding"],
                          None, params["dilation"])
        return bind(p, a, b, spec=spec, patches=None, **params)
    return rule


def _patch(spec, x, o, kernel, stride, padding, patches=None, dilation=(1, 1)) -> Tensor:
    if patches is None and state.grad and (o.requires_grad or state.tracing):
        # Copied here rather than in the impl, so that the node keeps them: the
        # VJP or JVP for o (a conv's weight gradient) reads the same patches
        # instead of copying them again (bench CNN step about 1 ms faster at 2
        # threads). A transform tracing may differentiate any o: kept too.
        patches = _copied_whole(x.data, o.data, spec, kernel, stride, padding, dilation)
    return bind(patch_einsum_p, x, o, spec=spec, kernel=kernel, stride=stride, padding=padding,
                patches=patches, dilation=dilation)


def _unpatch(spec, a, b, size, kernel, stride, padding, dilation=(1, 1)) -> Tensor:
    return bind(unpatch_einsum_p, a, b, spec=spec, size=tuple(int(s) for s in size),
                kernel=kernel, stride=stride, padding=padding, dilation=dilation)


def _parse(subscripts: str, patch_at: int) -> Spec:
    ins, out = subscripts.replace(" ", "").split("->")
    terms = ins.split(",")
    spec = Spec(tuple(tuple(map(ord, t)) for t in terms), tuple(map(ord, out)))
    allt = spec.inputs + (spec.output,)
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in allt) or \
            any(sum(a in t for t in allt) < 2 for a in spec.labels):
        raise ValueError(f"{subscripts!r}: want two operands, no repeated index, and each "
                         f"index in two terms")
    if len(allt[patch_at]) < 4:
        raise ValueError(f"{subscripts!r}: the patch term needs (..., OH, OW, kh, kw) axes")
    return spec


def patch_einsum(subscripts: str, x, o, kernel_size, stride=1, padding=0,
                 dilation=1) -> Tensor:
    """``einsum(subscripts, patches(x, kernel_size, stride, padding, dilation=dilation), o)``,
    without materializing the patches.

    Args:
        subscripts: an explicit two-operand einsum; the first term is the patch
            tensor's, ``(..., OH, OW, kh, kw)``.
        x: the image, ``(..., H, W)``.
        o: the other operand.
        kernel_size, stride, padding, dilation: as for
            :func:`~einsumgrad.rules.patches.patches`.
    """
    x, o = as_tensor(x), as_tensor(o)
    kernel, dilation = as_pair(kernel_size), as_pair(dilation)
    spec, stride, padding = _parse(subscripts, 0), as_pair(stride), as_pair(padding)
    check_fit("patch_einsum", x.shape[-2:], kernel, padding, dilation)
    oh, ow = (out_size(n, k, s, q, d) for n, k, s, q, d in
              zip(x.shape[-2:], kernel, stride, padding, dilation))
    sizes = dict(zip(spec.inputs[0], x.shape[:-2] + (oh, ow) + kernel))
    for a, n in zip(spec.inputs[1], o.shape):
        if sizes.setdefault(a, n) != n:
            raise ValueError(f"patch_einsum {subscripts!r}: index {chr(a)!r} is {sizes[a]} in "
                             f"the patches {x.shape[:-2] + (oh, ow) + kernel} but {n} in {o.shape}")
    return _patch(spec, x, o, kernel, stride, padding, None, dilation)


def unpatch_einsum(subscripts: str, a, b, size, kernel_size, stride=1, padding=0,
                   dilation=1) -> Tensor:
    """``unpatch(einsum(subscripts, a, b), size, ...)``, without materializing the
    patch-shaped product; the output term is ``(..., OH, OW, kh, kw)``."""
    return _unpatch(_parse(subscripts, 2), as_tensor(a), as_tensor(b), size,
                    as_pair(kernel_size), as_pair(stride), as_pair(padding), as_pair(dilation))


patch_einsum_p.defvmap(_vmap_rule(patch_einsum_p))
unpatch_einsum_p.defvmap(_vmap_rule(unpatch_einsum_p))
