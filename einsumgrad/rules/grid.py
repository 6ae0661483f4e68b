"""A stride-1 convolution's input gradient as one matrix product per window offset.

The kernel :mod:`.convolution` takes for ``unpatch_einsum`` at stride 1 with
enough channels where it does not run by blocks (off the host, or blocks turned
off): a convolution's input gradient, the cotangent of every window
added back onto the image. Laid out flat with its zero border, ``(rows..., Hp,
Wp, channels...)``, the image meets window offset ``(k, l)`` at a shift of
``k*Wp + l`` whole rows, the same for every window. So each offset is one
matrix product of row ranges, accumulated in place (a GEMM with beta 1): no
patch-shaped product (``kh*kw`` times the image) and no strided adds. The
price: products over the whole grid, border included, so the grid must not be
much larger than the windows. The forward and the weight gradient are faster
as one product over the copied patches (the forward's copy kept for the weight
gradient), so they do not come here.
"""
from __future__ import annotations

import math

from ..backends import backend_of


# Stride-1 windows with at least this many entries in each offset's product (a
# conv's output channels) run on the padded grid; fewer make too thin a product.
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


def _on_grid(a, term: tuple, groups: tuple, hw: tuple, grid_hw: tuple, xp):
    """Zeros of shape ``(rows..., Hp, Wp, last...)`` with ``a`` (labels ``term``,
    its spatial axes ``hw``) copied into the top-left corner, each window's
    entry at the window's first grid position: ``groups`` is ``(rows, last)``."""
    rows, last = groups
    size = dict(zip(term, a.shape))
    grid = xp.zeros(tuple(size[n] for n in rows) + grid_hw + tuple(size[n] for n in last),
                    dtype=a.dtype)
    spot = (slice(None),) * len(rows) + (slice(0, size[hw[0]]), slice(0, size[hw[1]]))
    grid[spot] = xp.transpose(a, [term.index(n) for n in rows + hw + last])
    return grid


def _scatter_on_grid(src, w, kernel, grid_hw, xp, dilation=(1, 1)):
    """``out[window + shift] += src[window] @ w[k, l]`` for every offset ``(k, l)``:
    ``kh*kw`` products accumulated in place over the flattened padded grid.

    Window ``(i, j)`` (its top-left corner on the grid) meets offset ``(k, l)``
    at grid entry ``(i + k dh, j + l dw)`` (``d`` the dilation): ``k dh Wp + l dw``
    rows further on once the grid is flat, one shift for every window. ``src`` is
    ``(rows..., Hp, Wp, inner...)`` with the windows' entries at their corners and
    zeros elsewhere: a shift from a row of no window (which may cross into the
    next image's rows) adds nothing.
    """
    (kh, kw), wp = kernel, grid_hw[1]
    a = xp.reshape(src, (-1, w.shape[-2]))
    out = xp.zeros((a.shape[0], w.shape[-1]), dtype=src.dtype)
    n = a.shape[0]
    for k in range(kh):
        for l in range(kw):
            s = k * dilation[0] * wp + l * dilation[1]
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


def unpatch_on_grid(a, b, spec, size, kernel, padding, groups, dilation=(1, 1)):
    """``unpatch_einsum`` of stride 1 as products per window offset on the padded grid."""
    xp = backend_of(a)
    (at, bt), p = spec.inputs, spec.output
    rows, inner, cols = groups  # inner: the image's labels in b (a conv's input channels)
    lead, hw = p[:-4], p[-4:-2]
    grid_hw = tuple(n + 2 * q for n, q in zip(size, padding))
    src = _on_grid(a, at, (rows, cols), hw, grid_hw, xp)
    w = _weights_by_offset(b, bt, p[-2:], cols, inner, xp)
    z = _scatter_on_grid(src, w, kernel, grid_hw, xp, dilation)
    sizes = dict(zip(at, a.shape)) | dict(zip(bt, b.shape))
    z = xp.reshape(z, tuple(sizes[n] for n in rows) + grid_hw + tuple(sizes[n] for n in inner))
    (ph, pw), (h, w_) = padding, size
    z = z[(slice(None),) * len(rows) + (slice(ph, ph + h), slice(pw, pw + w_))]
    have = rows + hw + inner
    return xp.transpose(z, [have.index(n) for n in lead + hw])

