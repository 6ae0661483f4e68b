"""Element-wise primitives: arithmetic with NumPy broadcasting, and the activations.

Each primitive sits beside its rules. A unary op's VJP and JVP both multiply
by its derivative, written with engine ops (``_unary``), so it differentiates
again. Broadcasting between inputs is the rules' own business, as HIPS
autograd's ``unbroadcast_f``: :func:`broadcasting` wraps a binary op's rules
so a cotangent is summed back to its input's shape and a tangent lined up
with the output's axes.
"""
from __future__ import annotations

import math

from ..backends import backend_of, common_backend
from ..tensor import BatchMixingError, Primitive, Tensor, as_tensor
from .einsum import broadcast_to, lift, sum_to, sum_to_array
from .shape import Batched, bind, bottom, elementwise_apply, pair, rank_up, same_op, stand_in

# -- broadcasting: inside the rules ------------------------------------------------------

def elementwise_batch(bdims, shapes, out_shape, **_):
    """Batch rule of an element-wise op: inputs line up from the right, as NumPy's."""
    axes = {len(out_shape) - len(s) + b for b, s in zip(bdims, shapes) if b is not None}
    if len(axes) > 1:
        raise BatchMixingError("an element-wise op lines up the batch axis of one input "
                               "with another axis of the other: rows mix")
    return axes.pop()


def broadcasting(p: Primitive) -> Primitive:
    """Give ``p``'s VJP and JVP NumPy broadcasting between its inputs: each
    cotangent summed back to its input's shape, each tangent lined up with the
    output's axes (and broadcast to its shape). Call it after defining both."""
    vjp, jvp = p.vjp, p.jvp

    def vjp_broadcast(k, g, out, *xs, **params):
        nb = g.ndim - out.ndim
        gk = vjp(k, g, out, *xs, **params)
        # Compare past the nb batch axes: a trailing match alone misses the
        # leading axes a broadcast input (a bias) gained.
        return gk if gk.shape[nb:] == xs[k].shape else sum_to(gk, xs[k].shape, nb)

    def jvp_broadcast(k, t, out, *xs, **params):
        nb = t.ndim - xs[k].ndim
        c = jvp(k, t if xs[k].ndim >= out.ndim else lift(t, xs[k].ndim, out.ndim), out, *xs,
                **params)
        return c if c.shape[nb:] == out.shape else broadcast_to(c, c.shape[:nb] + out.shape)

    p.vjp, p.jvp = vjp_broadcast, jvp_broadcast
    return p


def _binary(name, impl, vjp, jvp=None):
    """A broadcasting binary primitive; ``jvp=None``: linear in each input (mul)."""
    p = Primitive(name, impl)
    p.defvjp(vjp)
    if jvp is None:
        p.deflinear()
    else:
        p.defjvp(jvp)
    p.defbatch(elementwise_batch)
    p.defvmap(same_op(p, align=True))
    return broadcasting(p)


# Through the backend's functions, not operators: the NumPy backend runs the
# large same-layout cases on MKL's threads (einsumgrad.backends.mkl).
_through = lambda k, g, out, x, y: g  # d(x + y): the cotangent (or tangent) as it is
add_p = _binary("add", lambda x, y: common_backend((x, y)).add(x, y), _through, _through)
sub_p = _binary("sub", lambda x, y: common_backend((x, y)).subtract(x, y),
                lambda k, g, out, x, y: g if k == 0 else -g,
                lambda k, t, out, x, y: t if k == 0 else -t)
mul_p = _binary("mul", lambda x, y: common_backend((x, y)).multiply(x, y),
                lambda k, g, out, x, y: g * (y if k == 0 else x))
div_p = _binary("div", lambda x, y: x / y,
                lambda k, g, out, x, y: g / y if k == 0 else -g * out / y,
                lambda k, t, out, x, y: t / y if k == 0 else -t * out / y)


def _pow_d(k, out, x, y):
    # As torch: x**0 is 1 for every x (0, inf, NaN too), so its derivative is 0;
    # 0**y is 0 for y > 0, so d/dy is 0 there. Each case takes the base 1 there,
    # whose terms are finite (not a where over 0 * inf = NaN), so every order
    # stays finite; where no entry is such a case the base is x itself.
    xp = backend_of(x.data)
    if k == 0:  # d/dx x**y = y x**(y-1)
        one = y.data == 0
        return y * (where(one, 1.0, x) if xp.any(one) else x) ** (y - 1)
    # d/dy x**y = x**y log x: NaN for a negative base (x**y is not differentiable in y)
    one = (x.data == 0) & (y.data >= 0)
    return out * log(where(one, 1.0, x) if xp.any(one) else x)


pow_p = _binary("pow", lambda x, y: x ** y,
                lambda k, g, out, x, y: g * _pow_d(k, out, x, y),
                lambda k, t, out, x, y: t * _pow_d(k, out, x, y))

# where(cond, x, y) with a constant boolean cond.
where_p = Primitive("where", lambda x, y, cond: backend_of(x).where(cond, x, y))
where_p.defvjp(lambda k, g, out, x, y, cond:
               where(cond, g, 0.0) if k == 0 else where(cond, 0.0, g))
where_p.defjvp(lambda k, t, out, x, y, cond:
               where(cond, t, 0.0) if k == 0 else where(cond, 0.0, t))
where_p.defbatch(elementwise_batch)
broadcasting(where_p)


@where_p.defvmap
def _where_vmap(bdims, x, y, cond):
    # cond is one example's (a constant): it broadcasts from the right, as an
    # unbatched input does, so the mapped inputs line up with it too.
    rank = max(x.ndim - (bdims[0] is not None), y.ndim - (bdims[1] is not None),
               getattr(cond, "ndim", 0))
    xs = [rank_up(t, rank) if b is not None else t for t, b in zip((x, y), bdims)]
    return bind(where_p, *xs, cond=cond)


def where(cond, x, y) -> Tensor:
    """``x`` where ``cond`` (a constant mask) holds, else ``y``."""
    if type(cond) is Batched:  # a mask per example (a comparison inside vmap)
        return elementwise_apply(where, cond, x, y)
    cond = cond.data if isinstance(cond, Tensor) else cond
    x, y = pair(x, y)
    return bind(where_p, x, y, cond=cond)


# exp(-x^2) and exp(-x^2 / 2) are 0 beyond |x| = 40 in every float dtype (exp(-800) is
# below float64's smallest subnormal), and so is any power of x times them. Rules
# evaluate such products at x clipped to +-40: 0 there, where at +-inf (or once x^2
# overflows) they would be inf * 0 = NaN. The clip is a where with a constant mask, so
# its derivative is 0 beyond, as the product's is; a NaN stays NaN.
_TAIL = 40.0


def _tame(x: Tensor) -> Tensor:
    """``x`` clipped to ``[-40, 40]``, as an engine op (see ``_TAIL``)."""
    xp = backend_of(x.data)
    return where(xp.abs(x.data) > _TAIL, xp.copysign(_TAIL, x.data), x)


def _unary(name, impl, deriv, plain=None, kernel=None):
    """An element-wise primitive whose VJP and JVP both multiply by ``deriv(x, out)``.

    ``plain(xp, x, out)``: the same derivative on backend arrays (a fresh array),
    the VJP of a backward that records nothing, without a Tensor per step.
    ``kernel``: the name of a backend kernel ``(g, out) -> VJP or None`` tried first.
    """
    p = Primitive(name, impl)
    p.defvjp(lambda k, g, out, x: g * deriv(x, out))
    p.defjvp(lambda k, t, out, x: t * deriv(x, out))
    if plain is not None:
        def fused(g, out, x):
            xp = backend_of(g)
            fn = getattr(xp, kernel) if kernel else None
            r = fn(g, out) if fn is not None else None
            return [r if r is not None else xp.multiply(g, plain(xp, x, out))]
        p.deffused(fused)
    p.defbatch(elementwise_batch)
    p.defvmap(same_op(p))
    return lambda x: bind(p, x if type(x) is Tensor else as_tensor(x)), p


def _const(x: Tensor, array) -> Tensor:
    return Tensor(array.astype(x.dtype, copy=False))


neg_p = Primitive("neg", lambda x: -x)
neg_p.defvjp(lambda k, g, out, x: -g)
neg_p.deflinear()
neg_p.defbatch(elementwise_batch)
neg_p.defvmap(same_op(neg_p))
neg = lambda x: bind(neg_p, as_tensor(x))  # noqa: E731
exp, exp_p = _unary("exp", lambda x: backend_of(x).exp(x), lambda x, out: out,
                    lambda xp, x, out: out)
log, log_p = _unary("log", lambda x: backend_of(x).log(x), lambda x, out: 1.0 / x,
                    lambda xp, x, out: xp.true_divide(1.0, x))
sin, sin_p = _unary("sin", lambda x: backend_of(x).sin(x), lambda x, out: cos(x))
cos, cos_p = _unary("cos", lambda x: backend_of(x).cos(x), lambda x, out: -sin(x))
tanh, tanh_p = _unary("tanh", lambda x: backend_of(x).tanh(x), lambda x, out: 1.0 - out * out,
                      lambda xp, x, out: xp.subtract(1.0, xp.multiply(out, out)))
# sqrt(-0.0) is -0.0: 0.5 / (out + 0.0) makes its derivative +inf, as at +0.0 (the
# limit from inside the domain), where 0.5 / out would give -inf.
sqrt, sqrt_p = _unary("sqrt", lambda x: backend_of(x).sqrt(x), lambda x, out: 0.5 / (out + 0.0),
                      lambda xp, x, out: xp.true_divide(0.5, xp.add(out, 0.0)))


def _erf_d(x, out):
    t = _tame(x)  # 2/sqrt(pi) exp(-x^2), 0 beyond |x| = 40 at every order (see _TAIL)
    return (2.0 / math.sqrt(math.pi)) * exp(-(t * t))


erf, erf_p = _unary("erf", lambda x: backend_of(x).erf(x), _erf_d)


def _sigmoid(x):
    xp = backend_of(x)
    # Stable on both tails: exp of a non-positive number only.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


sigmoid, sigmoid_p = _unary("sigmoid", _sigmoid, lambda x, out: out * (1.0 - out),
                            lambda xp, x, out: xp.multiply(out, xp.subtract(1.0, out)))
softplus, softplus_p = _unary("softplus", lambda x: backend_of(x).logaddexp(0, x).astype(
    x.dtype, copy=False), lambda x, out: sigmoid(x))
def _relu_plain(xp, x, out):
    # 1 where x > 0, 0 where x <= 0, NaN where x is NaN (a NaN has no derivative,
    # and a 0 would hide it): the sign of relu(x) >= 0, in x's dtype (float * bool
    # runs 1.5x slower on a broadcast g); one ufunc, which a program fuses with
    # the product that reads it (program.fuse).
    return xp.sign(out)


relu, relu_p = _unary("relu", lambda x: backend_of(x).maximum(x, 0),
                      lambda x, out: Tensor(_relu_plain(backend_of(out.data), x.data, out.data)),
                      _relu_plain, kernel="relu_vjp")  # one pass where the backend has it
abs, abs_p = _unary("abs", lambda x: backend_of(x).abs(x),
                    lambda x, out: _const(x, backend_of(x.data).sign(x.data)))


def square(x) -> Tensor:
    x = as_tensor(x)
    return x * x


_SQRT_HALF, _INV_SQRT_2PI = math.sqrt(0.5), 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf_impl(x):
    # The normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, in place, or the
    # backend's fused kernel where it has one for this dtype.
    xp = backend_of(x)
    r = xp.normal_cdf(x) if xp.normal_cdf is not None else None
    if r is None:
        r = xp.erf(x * _SQRT_HALF)
        r += 1.0
        r *= 0.5
    return r


def _normal_pdf_impl(x):
    # exp(-x^2 / 2) / sqrt(2 pi) in place on one buffer: four passes, one array.
    xp = backend_of(x)
    r = xp.asarray(xp.multiply(x, -0.5))  # an array (0-d too) of x's float dtype
    xp.multiply(r, x, out=r)
    xp.exp(r, out=r)
    xp.multiply(r, _INV_SQRT_2PI, out=r)
    return r


# phi(x), the normal density, with its derivative -x phi(x).
normal_pdf, normal_pdf_p = _unary("normal_pdf", _normal_pdf_impl,
                                  lambda x, out: -(_tame(x) * out))


def _gelu_d_impl(x, cdf):
    # GELU'(x) = Phi(x) + x phi(x), x phi(x) at x clipped to +-40 (see _TAIL): 1 at
    # +inf and 0 at -inf, not NaN. Two new arrays, the rest in place.
    xp = backend_of(x)
    xc = xp.clip(x, -_TAIL, _TAIL)
    r = _normal_pdf_impl(xc)
    xp.multiply(r, xc, out=r)
    xp.add(r, cdf, out=r)
    return r


def _gelu_dd(x):
    # GELU''(x) = phi(x) (2 - x^2), in engine ops: every order stays differentiable;
    # at x clipped to +-40, so 0 beyond (see _TAIL), not 0 * -inf.
    t = _tame(x)
    return normal_pdf(t) * (2.0 - t * t)


gelu_d_p = Primitive("gelu_d", _gelu_d_impl)
gelu_d_p.defvjp(lambda k, g, out, x, cdf: g * _gelu_dd(x))
gelu_d_p.defjvp(lambda k, t, out, x, cdf: t * _gelu_dd(x))
gelu_d_p.defbatch(elementwise_batch)
gelu_d_p.defvmap(same_op(gelu_d_p))  # cdf, computed on the physical x, passes through


def _gelu_impl(x, cdf):
    # x Phi(x) with x floored at -40, where Phi(x) is 0: GELU(-inf) is 0, its limit,
    # not -inf * 0 (a NaN stays NaN). One pass where the backend has the kernel.
    xp = backend_of(x)
    r = xp.gelu(x, cdf) if xp.gelu is not None else None
    if r is None:
        r = xp.asarray(xp.maximum(x, -_TAIL))
        xp.multiply(r, cdf, out=r)
    return r


def _gelu_fused(g, out, x, cdf):
    # The VJP on arrays, for a backward that records nothing: the backend's two
    # passes around an exp where it has them, else g times the rule's derivative.
    xp = backend_of(g)
    r = xp.gelu_vjp(g, x, cdf) if xp.gelu_vjp is not None else None
    return [r if r is not None else xp.multiply(g, _gelu_d_impl(x, cdf))]


# GELU(x) = x Phi(x). Phi(x) is computed once, forward, and kept on the node
# as a constant: the derivative Phi + x phi reads it instead of another erf.
gelu_p = Primitive("gelu", _gelu_impl)
gelu_p.defvjp(lambda k, g, out, x, cdf: g * bind(gelu_d_p, x, cdf=cdf))
gelu_p.defjvp(lambda k, t, out, x, cdf: t * bind(gelu_d_p, x, cdf=cdf))
gelu_p.deffused(_gelu_fused)
gelu_p.defbatch(elementwise_batch)
gelu_p.defvmap(same_op(gelu_p))  # cdf, computed on the physical x, passes through


def gelu(x, approximate: str = "none") -> Tensor:
    """GELU as ``torch.nn.functional.gelu``: exact erf form, or ``approximate='tanh'``."""
    x = as_tensor(x)
    if type(x) is Batched:  # element-wise: on the examples' physical tensor
        if approximate == "tanh":
            return Batched(gelu(x.phys, approximate), x.level)
        return bind(gelu_p, x, cdf=_normal_cdf_impl(bottom(x).data))
    if approximate == "tanh":
        # tanh(c (x + 0.044715 x^3)) is +-1 exactly beyond |x| = 40: there GELU is
        # relu(x); inside it is taken at x clipped to +-40, so no derivative of any
        # order, forward or reverse, meets inf * 0 (see _TAIL).
        c, t = math.sqrt(2.0 / math.pi), _tame(x)
        inner = 0.5 * t * (1.0 + tanh(c * (t + 0.044715 * t * t * t)))
        return where(backend_of(x.data).abs(x.data) > _TAIL, relu(x), inner)
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return bind(gelu_p, x, cdf=_normal_cdf_impl(x.data))


def _binop(p):
    def op(x, y):
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):  # pair's work, where any
            x, y = pair(x, y)
        return bind(p, x, y)
    return op


add, sub, mul, div, power = (_binop(p) for p in (add_p, sub_p, mul_p, div_p, pow_p))


def _sum_fused(g, out, x, y):
    # The VJP of x + y on arrays, for a backward that records nothing: the cotangent,
    # summed back where an input was broadcast (a bias), without a Tensor or a bind.
    if g.shape != out.shape:  # a Jacobian's basis: the rules
        return None
    return [g if v.shape == g.shape else sum_to_array(g, v.shape) for v in (x, y)]


add_p.deffused(_sum_fused)


def add_bias_array(y, b):
    # y is a product a layer has just made, read by nothing else (an einsum's
    # rules need its inputs, never its output): add b in place while y is
    # still in cache, as a GEMM with a bias term would. A view that cannot
    # take the sum (stride 0, read-only, another dtype or shape) gets a new array.
    # With MKL the backend's add runs it as one rank-1 update on MKL's threads.
    xp = backend_of(y)
    fits = b.ndim <= y.ndim and all(n in (1, m) for n, m in zip(b.shape[::-1], y.shape[::-1]))
    if (fits and 0 not in y.strides and getattr(y.flags, "writeable", True)
            and xp.result_type(y, b) == y.dtype):
        return xp.add(y, b, out=y)
    return y + b


add_bias_p = _binary("add_bias", add_bias_array, _through, _through)
add_bias_p.deffused(_sum_fused)


def add_bias(y: Tensor, b) -> Tensor:
    """``y + b`` for a ``y`` a layer just computed and hands on to nobody else."""
    return bind(add_bias_p, y, as_tensor(b, like=stand_in(y)))


# -- maximum, minimum, clip, //, % ------------------------------------------------------

def _extremum_rule(pick):
    """maximum's (``pick`` 1) or minimum's (-1) VJP/JVP weight for input ``k``, as
    torch: 1 where that input is picked, 1/2 each on a tie, 0 where the other is
    (both 1 where a NaN makes neither comparison hold)."""
    def rule(k, g, out, x, y):
        xp = backend_of(x.data)
        a, b = (x.data, y.data) if k == 0 else (y.data, x.data)
        lost = (a < b) if pick > 0 else (a > b)
        w = xp.where(a == b, 0.5, xp.where(lost, 0.0, 1.0))
        return g * _const(out, w)
    return rule


maximum_p = _binary("maximum", lambda x, y: common_backend((x, y)).maximum(x, y),
                    _extremum_rule(1), _extremum_rule(1))
minimum_p = _binary("minimum", lambda x, y: common_backend((x, y)).minimum(x, y),
                    _extremum_rule(-1), _extremum_rule(-1))


def _floor_quotient(x: Tensor, y: Tensor) -> Tensor:
    return Tensor(common_backend((x.data, y.data)).floor_divide(x.data, y.data))


# x % y = x - floor(x / y) y: d/dx 1, d/dy -floor(x / y) (a constant), as torch.
remainder_p = _binary("remainder", lambda x, y: common_backend((x, y)).remainder(x, y),
                      lambda k, g, out, x, y: g if k == 0 else -(g * _floor_quotient(x, y)),
                      lambda k, t, out, x, y: t if k == 0 else -(t * _floor_quotient(x, y)))

maximum, minimum, remainder = (_binop(p) for p in (maximum_p, minimum_p, remainder_p))


def floor_divide(x, y) -> Tensor:
    """``x // y``: piecewise constant, so it leaves the tape (no gradient), as torch."""
    x, y = pair(x, y)
    return elementwise_apply(_floor_quotient, x, y)


def clip(x, a_min=None, a_max=None) -> Tensor:
    """``x`` limited to ``[a_min, a_max]`` (either may be None), as NumPy's ``clip``.

    The gradient goes to ``x`` inside the bounds (both included) and to a bound
    (a Tensor may require grad) where it is taken, as torch's ``clamp``; a NaN
    stays NaN with no gradient.
    """
    x = as_tensor(x)
    if a_min is None and a_max is None:
        raise ValueError("clip: give a_min, a_max or both")
    if any(type(t) is Batched for t in (x, a_min, a_max)):  # masks on the physical tensors
        return elementwise_apply(clip, x, a_min, a_max)
    xp = backend_of(x.data)
    nan = xp.isnan(x.data)
    r = where(nan, _const(x, xp.asarray(math.nan)), x) if nan.any() else x
    if a_max is not None:
        hi = as_tensor(a_max, like=x)
        r = where(x.data > hi.data, hi, r)
    if a_min is not None:
        lo = as_tensor(a_min, like=x)
        r = where(x.data < lo.data, lo, r)
    return r
