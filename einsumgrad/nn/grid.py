"""Stride-1 convolutions as one matrix product per window offset, on the padded grid.

The kernels :mod:`.patch_einsum` takes at stride 1 with enough channels: a
convolution (``patch_einsum``) and its input gradient (``unpatch_einsum``). Laid out flat with its zero border, ``(rows..., Hp, Wp,
channels...)``, the image (or the cotangent) meets window offset ``(k, l)``
at a shift of ``k*Wp + l`` whole rows, the same for every window. So each
offset is one matrix product of row ranges (accumulated in place, a GEMM with
beta 1, where the offsets share an output): no patch copy (im2col, ``kh*kw``
times the image) and no strided adds. The price: products over the whole
grid, border included, so the grid must not be much larger than the windows.
On the bench CNN's second conv (2 threads) the input gradient takes 2.5 ms
here against 3.9 through the patches, and the forward about as long either
way. The weight gradient, nine thin products over the whole grid here, runs
faster as one product over the copied patches (2.4 against 4.0 ms), so it
does not come here.
"""
from __future__ import annotations

import math

from ..backend import backend_of


# Stride-1 windows with at least this many entries in each offset's product
# (a conv's input channels forward, its output channels for the input
# gradient) run on the padded grid; fewer make too thin a product.
MIN_INNER = 8


def grid_groups(patch: tuple, windowed: tuple, plain: tuple):
    """The labels ``(rows, inner, cols)`` of one matrix product per window offset,
    or None where the einsum is not that shape.

    ``patch`` is the patch term ``(..., OH, OW, kh, kw)``, ``windowed`` the operand
    with the window labels (a conv's weight), ``plain`` the term with ``(OH, OW)``
    (the conv's output, or its cotangent). The patch term's other labels are
    rows (shared with ``plain``) or inner (shared with ``windowed``); the rest
    of ``windowed`` and ``plain`` is a third group, cols. No label repeats.
    """
    hw, kl, lead = patch[-4:-2], patch[-2:], patch[:-4]
    if any(len(set(t)) != len(t) for t in (patch, windowed, plain)):
        return None
    rows = tuple(a for a in lead if a in plain and a not in windowed)
    inner = tuple(a for a in lead if a in windowed and a not in plain)
    cols = tuple(a for a in windowed if a in plain and a not in patch)
    if (len(rows) + len(inner) != len(lead) or set(windowed) != set(inner + cols + kl)
            or set(plain) != set(rows + cols + hw)):
        return None
    return rows, inner, cols


def _on_grid(a, term: tuple, groups: tuple, hw: tuple, grid_hw: tuple, at: tuple, xp):
    """Zeros of shape ``(rows..., Hp, Wp, last...)`` with ``a`` (labels ``term``,
    its spatial axes ``hw``) copied in at offset ``at``: ``groups`` is ``(rows, last)``."""
    rows, last = groups
    size = dict(zip(term, a.shape))
    grid = xp.zeros(tuple(size[n] for n in rows) + grid_hw + tuple(size[n] for n in last),
                    dtype=a.dtype)
    h, w = size[hw[0]], size[hw[1]]
    spot = (slice(None),) * len(rows) + (slice(at[0], at[0] + h), slice(at[1], at[1] + w))
    grid[spot] = xp.transpose(a, [term.index(n) for n in rows + hw + last])
    return grid


def _by_offset_on_grid(src, w, kernel, grid_hw, gather: bool, xp):
    """``kh*kw`` accumulating products over the flattened padded grid.

    Window ``(i, j)`` (its top-left corner on the grid) meets offset ``(k, l)``
    at grid entry ``(i + k, j + l)``: ``k*Wp + l`` rows further on once the grid
    is flat, one shift for every window. So each offset is a plain matrix
    product of row ranges, accumulated in place: no patch copy (im2col) and
    no strided adds. ``gather``: out[window] += src[window + shift] @ w[k, l]
    (a convolution); else out[window + shift] += src[window] @ w[k, l] (its
    input gradient). ``src`` is ``(rows..., Hp, Wp, inner...)``. Only windows
    that fit on the grid are real; a shift from any other may cross into the
    next image's rows, so the caller crops those windows' outputs (gather) or
    gives them zero rows in ``src`` (scatter).
    """
    (kh, kw), wp = kernel, grid_hw[1]
    a = xp.reshape(src, (-1, w.shape[-2]))
    out = xp.zeros((a.shape[0], w.shape[-1]), dtype=src.dtype)
    n = a.shape[0]
    for k in range(kh):
        for l in range(kw):
            s = k * wp + l
            if gather:
                xp.matmul_add(a[s:], w[k, l], out[:n - s])
            else:
                xp.matmul_add(a[:n - s], w[k, l], out[s:])
    return out


def _weights_by_offset(o, term: tuple, kl: tuple, first: tuple, second: tuple, xp):
    """``o`` as ``(kh, kw, prod(first), prod(second))``, contiguous."""
    order = [term.index(n) for n in kl + first + second]
    w = xp.ascontiguousarray(xp.transpose(o, order))
    size = dict(zip(term, o.shape))
    return xp.reshape(w, w.shape[:2] + (math.prod(size[n] for n in first),
                                        math.prod(size[n] for n in second)))


def grid_pays(xp, contracted: tuple, sizes: dict, stride, grid_hw, out_hw, dtypes) -> bool:
    """Whether the products on the grid beat copying the patches: a backend that
    accumulates products in place (through temporaries the grid lost: CNN step
    42 against 39 ms on plain NumPy), stride 1, one dtype, a product over enough
    entries, and a grid not much larger than the windows (each offset's product
    runs over every grid entry)."""
    return (xp.matmul_adds_in_place and stride == (1, 1) and len(set(dtypes)) == 1
            and math.prod(sizes[n] for n in contracted) >= MIN_INNER
            and math.prod(grid_hw) <= 2 * math.prod(out_hw))


def conv_on_grid(x, o, spec, kernel, padding, groups):
    """``patch_einsum`` of stride 1 as products per window offset on the padded grid."""
    xp = backend_of(x)
    p, ot, out_term = spec.inputs[0], spec.inputs[1], spec.output
    rows, inner, cols = groups
    lead, hw = p[:-4], p[-4:-2]
    (kh, kw), (ph, pw) = kernel, padding
    grid_hw = (x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw)
    src = _on_grid(x, lead + hw, (rows, inner), hw, grid_hw, (ph, pw), xp)
    w = _weights_by_offset(o, ot, p[-2:], inner, cols, xp)
    out = _by_offset_on_grid(src, w, kernel, grid_hw, True, xp)
    size = dict(zip(lead, x.shape[:-2])) | dict(zip(ot, o.shape))
    out = xp.reshape(out, tuple(size[n] for n in rows) + grid_hw + tuple(size[n] for n in cols))
    # Cropped to the windows and compacted: later ops and products read a
    # dense array faster than the grid's gapped rows (bias, pool, weight gradient).
    out = xp.ascontiguousarray(out[(slice(None),) * len(rows) + (
        slice(0, grid_hw[0] - kh + 1), slice(0, grid_hw[1] - kw + 1))])
    have = rows + hw + cols
    return xp.transpose(out, [have.index(n) for n in out_term])


def unpatch_on_grid(a, b, spec, size, kernel, padding, groups):
    """``unpatch_einsum`` of stride 1 as products per window offset on the padded grid."""
    xp = backend_of(a)
    (at, bt), p = spec.inputs, spec.output
    rows, inner, cols = groups  # inner: the image's labels in b (a conv's input channels)
    lead, hw = p[:-4], p[-4:-2]
    grid_hw = tuple(n + 2 * q for n, q in zip(size, padding))
    src = _on_grid(a, at, (rows, cols), hw, grid_hw, (0, 0), xp)
    w = _weights_by_offset(b, bt, p[-2:], cols, inner, xp)
    z = _by_offset_on_grid(src, w, kernel, grid_hw, False, xp)
    sizes = dict(zip(at, a.shape)) | dict(zip(bt, b.shape))
    z = xp.reshape(z, tuple(sizes[n] for n in rows) + grid_hw + tuple(sizes[n] for n in inner))
    (ph, pw), (h, w_) = padding, size
    z = z[(slice(None),) * len(rows) + (slice(ph, ph + h), slice(pw, pw + w_))]
    have = rows + hw + inner
    return xp.transpose(z, [have.index(n) for n in lead + hw])

