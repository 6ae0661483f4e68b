"""Programs (issue 19): trace once, read, run fast.

``make_program`` / ``jit`` against the functions themselves for every
transform and every seed script, on values other than the traced ones; the
branch check (TraceError naming the line), constants, pytrees, static
arguments, signatures, pickling, ``str`` and ``source()``.
"""
import pathlib
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest

import einsumgrad as eg
import einsumgrad.nn.functional as F
from einsumgrad.program import TraceError, jit, make_program
from einsumgrad.pytree import flatten

from backends import NAME, npy, xb

SEEDS = pathlib.Path(__file__).resolve().parent.parent / "examples" / "seeds"
TOL = dict(rtol=1e-12, atol=1e-12)


def leaves(out) -> list:
    return [npy(leaf) for leaf in flatten(out)[0]]


def assert_same(got, want, tol=TOL) -> None:
    a, b = leaves(got), leaves(want)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, **tol)


def jitted_equals(g, *args, more=2, seed=1):
    """jit(g) equals g on the traced arguments and on ``more`` others of the same
    shapes (one trace for all), and its program equals g after pickling."""
    rng = np.random.default_rng(seed)
    j = jit(g)
    assert_same(j(*args), g(*args))
    for _ in range(more):
        new = tuple(xb(npy(a) + 0.5 * rng.standard_normal(np.shape(npy(a)))) for a in args)
        assert_same(j(*new), g(*new))
    assert j.traces == 1
    p = pickle.loads(pickle.dumps(j.program(*args)))
    assert_same(p(*new), g(*new))
    return j


rng0 = np.random.default_rng(0)
X = rng0.standard_normal((5, 3))
W = rng0.standard_normal((3, 4))
V = rng0.standard_normal((5, 3))


def mixed(x, w):
    """Rules with array-level work beside the primitives: masks, clips, ties, CDFs."""
    h = eg.einsum("ij,jk->ik", x, w)
    return (eg.tanh(h) ** 2 + eg.gelu(h) + eg.softmax(h, axis=-1) + eg.clip(h, -0.5, 0.5)
            + eg.relu(h) * eg.sigmoid(h) + eg.abs(h) + eg.maximum(h, 0.1))


def scalar(x, w):
    h = eg.einsum("ij,jk->ik", x, w)
    return ((eg.log_softmax(h) * eg.softplus(h)).sum() + F.layer_norm(x, 3).sum()
            + eg.max(x * x, axis=1).sum() + eg.logsumexp(h).sum() + (x ** 3).mean())


TRANSFORMS = {
    "grad": (lambda x, w: eg.grad(scalar, argnums=(0, 1))(x, w), (X, W)),
    "value_and_grad": (lambda x, w: eg.value_and_grad(scalar)(x, w), (X, W)),
    "jacrev": (lambda x, w: eg.jacrev(mixed)(x, w), (X, W)),
    "jacfwd": (lambda x, w: eg.jacfwd(mixed, argnums=1)(x, w), (X, W)),
    "hessian": (lambda x, w: eg.hessian(scalar)(x, w), (X, W)),
    "hvp": (lambda x, v, w: eg.hvp(lambda a: scalar(a, w))(x, v), (X, V, W)),
    "vjp": (lambda x, w, g: eg.vjp(lambda a: mixed(a, w), x)[1](g),
            (X, W, rng0.standard_normal((5, 4)))),
    "jvp": (lambda x, w, t: eg.jvp(lambda a: mixed(a, w), (x,), (t,)), (X, W, V)),
    "batch_jacobian": (lambda x, w: eg.batch_jacobian(lambda a: mixed(a, w))(x), (X, W)),
    "batch_hessian": (lambda x, w: eg.batch_hessian(lambda a: eg.tanh(a @ w))(x), (X, W)),
    "directional": (lambda x, v, w: eg.directional(lambda a: mixed(a, w), 3)(x, v), (X, V, W)),
    "elementwise_grad": (lambda x: eg.elementwise_grad(lambda a: eg.sin(a) * eg.exp(a))(x),
                         (X,)),
    "plain": (mixed, (X, W)),
}
try:
    from einsumgrad.vmap import vmap
    TRANSFORMS["vmap"] = (lambda x, w: vmap(eg.grad(lambda r: scalar(r[None], w)))(x), (X, W))
except ImportError:  # vmap came later than programs
    pass


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_jit_equals_every_transform(name):
    g, args = TRANSFORMS[name]
    jitted_equals(g, *(xb(a) for a in args))


# -- the seed scripts ------------------------------------------------------------------------

# The seed scripts close over NumPy arrays: they run on the NumPy backend only.
on_numpy = pytest.mark.skipif(NAME != "numpy", reason="the seed scripts hold NumPy arrays")


def seed(prefix: str) -> dict:
    """A seed script's globals (its functions and data), main() not run."""
    sys.path.insert(0, str(SEEDS))
    try:
        (path,) = SEEDS.glob(f"{prefix}_*.py")
        return runpy.run_path(str(path))
    finally:
        sys.path.remove(str(SEEDS))
        sys.modules.pop("_timing", None)


@on_numpy
def test_seed000_directional_and_per_sample_derivatives():
    s = seed("seed000")
    f, x = s["calculation"], xb(s["x"])
    jitted_equals(lambda x: eg.directional(f, 2)(x, x), x)
    jitted_equals(lambda x: (eg.batch_jacobian(f)(x), eg.batch_hessian(f)(x)), x)


@on_numpy
def test_seed001_batched_jacobian():
    s = seed("seed001")
    x = xb(s["x"][:8])  # the model's closed-over weights are the program's constants
    jitted_equals(eg.batch_jacobian(s["model"]), x, more=1)
    jitted_equals(lambda x, u: eg.vjp(s["model"], x)[1](u), x,
                  xb(rng0.standard_normal((8, 10))), more=1)


@on_numpy
def test_seed002_pointwise_jacobians_and_the_mixing_error():
    s = seed("seed002")
    x = xb(s["x"][:2, :16])
    jitted_equals(eg.batch_jacobian(s["mlp"], batch_ndim=2), x, more=1)
    with pytest.raises(eg.BatchMixingError):
        jit(eg.batch_jacobian(lambda p: s["mlp"](p - p.mean(axis=0)), batch_ndim=2))(x)


@on_numpy
def test_seed003_einsum_jacobian_materialized():
    s = seed("seed003")
    for ptrn, xs, ws in s["CASES"][:2]:
        jac = eg.derive(ptrn).jacobian(0)
        jitted_equals(lambda a, b: jac.materialize(a, b), xb(rng0.standard_normal(xs)),
                      xb(rng0.standard_normal(ws)), more=1)


@on_numpy
def test_seed004_elementwise_partials():
    s = seed("seed004")
    jitted_equals(eg.elementwise_grad(s["f"], argnums=(0, 1)), xb(s["T"]), xb(s["K"]))


# -- branches, constants, signatures ---------------------------------------------------------

@pytest.mark.parametrize("body", [
    "if x.sum() > 0:\n        return x",
    "if bool(x[0, 0] < 1):\n        return x",
    "return x * float(x.sum())",
    "return x * x.max().item()",
    "return x[:int(x[0, 0] > 0) + 1]",
    "return eg.grad(lambda a: a.sum() * float(a.sum()))(x)",
])
def test_a_branch_on_a_traced_value_raises_naming_the_line(body):
    ns = {"eg": eg}
    exec(compile(f"def f(x):\n    {body}\n    return -x\n", "user_code.py", "exec"), ns)
    with pytest.raises(TraceError, match=r"user_code\.py:2") as e:
        make_program(ns["f"])(xb(X))
    assert isinstance(e.value, RuntimeError)
    assert eg.TraceError is TraceError if hasattr(eg, "TraceError") else True


def test_branches_on_static_values_and_shapes_are_fine():
    def f(x, n):
        y = x if x.shape[0] > 2 else -x
        for _ in range(n):
            y = eg.tanh(y)
        return y
    j = jit(f, static_argnums=1)
    for n in (1, 2):
        assert_same(j(xb(X), n), f(xb(X), n))
    assert j.traces == 2
    assert_same(j(xb(V), 1), f(xb(V), 1))
    assert j.traces == 2


def test_a_rule_branching_on_values_is_guarded_and_traced_again():
    # max's rule checks for ties and NaNs, prod's for zeros: guards, not errors
    g = lambda x: eg.grad(lambda a: eg.max(a, axis=1).sum() + eg.prod(a, axis=1).sum())(x)
    j = jit(g)
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert_same(j(xb(x)), g(xb(x)))
    tied = np.array([[2.0, 2.0, 0.0], [4.0, 5.0, 6.0]])  # a tie and a zero: other branches
    assert_same(j(xb(tied)), g(xb(tied)))
    assert j.traces == 2
    p = make_program(g)(xb(x))
    with pytest.raises(TraceError, match="trace it again"):
        p(xb(tied))


def test_constants_made_inside_and_closed_over():
    w = W.copy()
    c = xb(np.arange(4.0))

    def f(x):
        k = eg.tensor(xb(np.ones((5, 4))))  # made inside f: a constant of the program
        return eg.einsum("ij,jk->ik", x, xb(w)) * c + k
    p = make_program(f)(xb(X))
    assert len(p.consts) >= 2 and len(p.inputs) == 1
    want = f(xb(X))
    w[:] = 0.0  # a change after the trace does not reach the program
    assert_same(p(xb(X)), want)


def test_pytrees_in_and_out_static_leaves_and_kwargs():
    def f(params, x, scale=1.0):
        h = eg.tanh(x @ params["w"]) * scale
        return {"h": h, "sum": h.sum(), "shape": h.shape}, [params["b"] + 1]
    params = {"w": xb(W), "b": xb(np.ones(4))}
    j = jit(f)
    got = j(params, xb(X), scale=2.0)
    want = f(params, xb(X), scale=2.0)
    assert got[0]["shape"] == want[0]["shape"] == (5, 4)
    assert_same(got[0]["h"], want[0]["h"])
    assert_same(got[1], want[1])
    assert isinstance(got[0]["h"], eg.Tensor)
    j(params, xb(X), scale=3.0)
    assert j.traces == 2  # a Python number is static: part of the signature
    p = j.program(params, xb(X), scale=2.0)
    assert len(p.inputs) == 3


def test_a_new_shape_or_dtype_traces_again_and_a_program_refuses_it():
    f = lambda x: eg.grad(lambda a: (eg.sin(a) ** 2).sum())(x)
    j = jit(f)
    j(xb(X))
    j(xb(V))
    assert j.traces == 1
    assert_same(j(xb(X[:2])), f(xb(X[:2])))
    assert_same(j(xb(X, np.float32)), f(xb(X, np.float32)), dict(rtol=1e-6))
    assert j.traces == 3
    p = make_program(f)(xb(X))
    with pytest.raises(TypeError, match="traced for"):
        p(xb(X[:2]))


def test_inside_a_transform_or_with_a_graph_jit_runs_f_itself():
    j = jit(lambda x: eg.sin(x) * x)
    g = eg.grad(lambda x: j(x).sum())(xb(X))
    assert_same(g, eg.cos(xb(X)) * xb(X) + eg.sin(xb(X)))
    x = eg.tensor(xb(X), requires_grad=True)
    j(x).sum().backward()
    assert_same(x.grad, g)
    assert j.traces == 0


def test_a_training_step_with_its_update_jits():
    """A step returning the loss and the parameters after SGD with momentum, the update
    written in engine ops: traced once, each step equal to the eager one."""
    rng = np.random.default_rng(3)
    x, y = xb(rng.standard_normal((32, 6))), xb(np.eye(3)[rng.integers(0, 3, 32)])

    def loss(params, x, y):
        (w1, b1), (w2, b2) = params
        h = eg.tanh(eg.einsum("bi,oi->bo", x, w1) + b1)
        return -(eg.log_softmax(eg.einsum("bi,oi->bo", h, w2) + b2) * y).sum() / 32.0

    def step(params, velocity, x, y, lr):
        value, grads = eg.value_and_grad(loss)(params, x, y)
        velocity = [[0.9 * v + g for v, g in zip(vs, gs)] for vs, gs in zip(velocity, grads)]
        params = [[p - lr * v for p, v in zip(ps, vs)] for ps, vs in zip(params, velocity)]
        return value, params, velocity
    params = [[xb(rng.standard_normal((8, 6)) * 0.3), xb(np.zeros(8))],
              [xb(rng.standard_normal((3, 8)) * 0.3), xb(np.zeros(3))]]
    velocity = [[xb(np.zeros(npy(p).shape)) for p in ps] for ps in params]
    fast = jit(step, static_argnums=(4,))
    state, eager, losses = (params, velocity), (params, velocity), []
    for _ in range(5):
        value, *state = fast(*state, x, y, 0.1)
        want, *eager = step(*eager, x, y, 0.1)
        assert_same((value, state), (want, eager))
        losses.append(float(npy(value)))
    assert fast.traces == 1 and losses[-1] < losses[0]


def test_in_place_updates_and_setitem_inside():
    def f(x):
        y = x * 2.0
        y[0] = 0.0
        y += 1.0
        return y
    jitted_equals(f, xb(X))


# -- reading: str and source() ----------------------------------------------------------------

def test_str_is_one_line_per_equation_with_specs_shapes_and_dtypes():
    f = lambda x, w: eg.grad(lambda a: eg.tanh(eg.einsum("ij,jk->ik", a, w)).sum())(x)
    p = make_program(f)(xb(X), xb(W))
    text = str(p).splitlines()
    assert text[0] == "program <lambda>(x: float64[5, 3], w: float64[3, 4])"
    assert text[-1].startswith("  return ")
    one_element = sum(c.ndim == 0 for c in p.consts.values())  # written in place
    assert len(text) == 2 + len(p.consts) - one_element + len(p.eqs)
    assert any("= einsum 'ij,jk->ik' (x, w)" in line for line in text)
    assert any("float64[5, 4] = tanh (" in line for line in text)
    assert any(": float64[5, 3] = einsum 'ik,jk->ij'" in line for line in text)


def test_str_names_inputs_by_parameter_and_values_in_order():
    def loss(params, batch, scale):
        h = eg.tanh(eg.einsum("ij,jk->ik", batch["x"], params[0]) + params[1])
        return (h * scale).sum()
    p = make_program(eg.grad(loss), static_argnums=2)(
        [xb(W), xb(np.zeros(4))], {"x": xb(X)}, 2.0)
    text = str(p)
    assert text.splitlines()[0] == ("program grad(loss)(params[0]: float64[3, 4], "
                                    "params[1]: float64[4], batch['x']: float64[5, 3])")
    assert "einsum 'ij,jk->ik' (batch['x'], params[0])" in text
    numbered = [line.split(":")[0].strip() for line in text.splitlines()[1:-1]]
    consts = [n for n in numbered if n.startswith("c")]
    assert consts == [f"c{i}" for i in range(1, len(consts) + 1)]
    assert numbered[len(consts):] == [f"v{i}" for i in range(1, len(numbered) - len(consts) + 1)]
    # a transform of a transform, and arguments that do not line up with f's parameters
    p2 = make_program(eg.grad(eg.grad(lambda a: eg.sin(a).sum())))(np.float64(0.5))
    assert str(p2).startswith("program grad(grad(<lambda>))(a: float64[])")
    p3 = make_program(eg.directional(lambda v: eg.tanh(v), 2))(xb(X), xb(X))
    assert str(p3).startswith("program directional(<lambda>)(x0: float64[5, 3], x1: ")


def conv_net(x, w, b, v):
    h = F.conv2d(x, w, b, stride=1, padding=1)
    h = F.max_pool2d(eg.relu(h), 2)
    h = F.layer_norm(h, h.shape[-2:])
    return (h.reshape(h.shape[0], -1) @ v).sum()


def more(x):
    from einsumgrad.rules import patches, unpatch
    y = eg.copy(x) * 1.0
    y[0, 1] = eg.cos(x[1, 0])  # assign
    z = eg.erf(y) + eg.minimum(y, 0.2) + (y % 0.7) + y.astype(np.float32).astype(np.float64)
    z = F.layer_norm(z, 3, eg.tensor(np.arange(3.0)), eg.tensor(np.ones(3)))
    img = eg.reshape(eg.concatenate([z, z], axis=1), (1, 2, 6))
    q = unpatch(patches(img, 2), (2, 6), 2)
    x0 = eg.where(np.array([[True, False, True], [False, True, True]]), x, 0.0)
    return (q.sum() * eg.prod(x0, axis=1)).sum() + eg.sin(z).sum()


CONV = (rng0.standard_normal((2, 3, 6, 6)), rng0.standard_normal((4, 3, 3, 3)),
        rng0.standard_normal(4), rng0.standard_normal((36, 2)))
SOURCES = {
    "grad": TRANSFORMS["grad"],
    "jacrev": TRANSFORMS["jacrev"],
    "hessian": TRANSFORMS["hessian"],
    "batch_jacobian": TRANSFORMS["batch_jacobian"],
    "directional": TRANSFORMS["directional"],
    "conv_grad": (eg.grad(conv_net, argnums=(0, 1, 2, 3)), CONV),
    "indexing": (lambda x: eg.jacrev(lambda a: eg.cumsum(a[1:, ::-1], axis=0)[[0, 2], 1:]
                                     * eg.concatenate([a, a], axis=0)[:2, :2])(x), (X,)),
    "reductions": (eg.grad(lambda x, w, b: (eg.prod(x, axis=1) * eg.var(x, axis=0).sum()).sum()
                           + F.batch_norm(x, None, None, w, b, training=True).sum() ** 2,
                           argnums=(0, 1, 2)), (X, W[:, 0] + 2.0, W[:, 1])),
    "more": (eg.jacfwd(more), (X[:2],)),
    "shapes": (lambda x, w: eg.jvp(lambda a: (eg.pad(eg.stack([a, 2 * a]), 1) ** 2).sum(0),
                                   (x,), (w,)), (X, V)),
    "attention": (eg.grad(lambda q, k, v: (F.scaled_dot_product_attention(q, k, v) ** 2).sum(),
                          argnums=(0, 1, 2)),
                  tuple(rng0.standard_normal(s)
                        for s in ((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 2)))),
}


@pytest.mark.skipif(NAME != "numpy", reason="source() runs on NumPy arrays")
def test_source_runs_without_einsumgrad_and_gives_the_same_numbers(tmp_path):
    run, want = [], {}
    for name, (g, args) in SOURCES.items():
        src = make_program(g)(*args).source()
        assert "einsumgrad" not in "".join(line for line in src.splitlines()
                                           if "import" in line)
        (tmp_path / f"{name}.py").write_text(src)
        np.savez(tmp_path / f"{name}_in.npz", *args)
        want[name] = leaves(g(*args))
        run.append(name)
    script = f"""
import sys, importlib.util, pathlib
import numpy as np
sys.modules['einsumgrad'] = None  # not importable: the source must not need it
for name in {run!r}:
    spec = importlib.util.spec_from_file_location(name, pathlib.Path({str(tmp_path)!r}) / (name + '.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    public = [k for k, v in vars(mod).items() if callable(v) and not k.startswith('_')
              and getattr(v, '__module__', None) == name]
    assert len(public) == 1, public
    ins = np.load(pathlib.Path({str(tmp_path)!r}) / (name + '_in.npz'))
    out = getattr(mod, public[0])(*[ins[f'arr_{{i}}'] for i in range(len(ins.files))])
    flat = []
    def walk(o):
        if isinstance(o, dict):
            [walk(o[k]) for k in sorted(o)]
        elif isinstance(o, (list, tuple)):
            [walk(v) for v in o]
        else:
            flat.append(np.asarray(o))
    walk(out)
    np.savez(pathlib.Path({str(tmp_path)!r}) / (name + '_out.npz'), *flat)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for name in run:
        got = np.load(tmp_path / f"{name}_out.npz")
        assert len(got.files) == len(want[name])
        for i, w in enumerate(want[name]):
            np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-10, atol=1e-12,
                                       err_msg=name)


def test_every_primitive_has_an_emitter_and_a_new_one_is_named():
    from einsumgrad.program.core import _collect, _primitives
    from einsumgrad.program.emit import EMITTERS
    from einsumgrad.tensor import Primitive, bind
    _collect()
    assert set(_primitives) <= set(EMITTERS), set(_primitives) - set(EMITTERS)
    cube = Primitive("cube_for_test", lambda x: x * x * x)
    p = make_program(lambda x: bind(cube, x))(xb(X))
    assert_same(p(xb(V)), eg.tensor(xb(V)) ** 3)
    with pytest.raises(NotImplementedError, match="'cube_for_test'"):
        p.source()


def test_a_broadcast_constant_pickles_and_prints_at_its_data_size():
    x = xb(rng0.standard_normal((400, 3)))
    f = eg.batch_jacobian(lambda a: eg.tanh(eg.einsum("bi,io->bo", a, xb(W))))
    p = make_program(f)(x)
    assert any(0 in c.strides for c in p.consts.values())  # the basis, broadcast
    assert len(pickle.dumps(p)) < 20_000
    assert_same(pickle.loads(pickle.dumps(p))(x), f(x))
    if NAME == "numpy":
        assert len(p.source()) < 20_000
