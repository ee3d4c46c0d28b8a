"""What each order of differentiation does on grad="hand" ops (docs/formulas.md, "Higher order"): one test per
statement there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxcnn as jc

rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(2, 4, 4, 1)))
W = jnp.asarray(rng.normal(size=(3, 3, 1, 2)))
B = jnp.asarray(rng.normal(size=(2,)))
OPS = {  # every op as a function of one float64 array, grad mode as keyword
    "conv2d im2col": lambda a, grad: jc.conv2d(a, W, B, padding=1, grad=grad, rule="im2col"),
    "conv2d flip": lambda a, grad: jc.conv2d(a, W, B, padding=1, grad=grad, rule="flip"),
    "conv_relu_pool": lambda a, grad: jc.conv_relu_pool(a, W, B, padding=1, grad=grad),
    "max_pool2d": lambda a, grad: jc.max_pool2d(a, 2, grad=grad),
    "avg_pool2d": lambda a, grad: jc.avg_pool2d(a, 2, grad=grad),
    "relu": lambda a, grad: jc.relu(a, grad=grad),
    "sigmoid": lambda a, grad: jc.sigmoid(a, grad=grad),
    "tanh": lambda a, grad: jc.tanh(a, grad=grad),
    "dense": lambda a, grad: jc.dense(a.reshape(2, 16), jnp.ones((16, 3)), grad=grad),
    "softmax_cross_entropy": lambda a, grad: jc.softmax_cross_entropy(a.reshape(2, 16), jnp.array([1, 5]), grad=grad),
    "squared_error": lambda a, grad: jc.squared_error(a.reshape(2, 16), jnp.array([1, 5]), grad=grad),
}


@pytest.mark.parametrize("name", list(OPS))
def test_forward_mode_raises_on_hand_ops_and_runs_on_autodiff(name):
    """Statement 1: jax.jvp (and so linearize and jacfwd) of a hand op raises JAX's custom_vjp error;
    grad="autodiff" is plain JAX and runs."""
    f = OPS[name]
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda a: f(a, "hand"), (X,), (jnp.ones_like(X),))
    jax.jvp(lambda a: f(a, "autodiff"), (X,), (jnp.ones_like(X),))


def tiny_loss(grad):
    net = jc.Sequential([jc.Conv(2, 3), jc.Sigmoid(), jc.MaxPool(2), jc.Flatten(), jc.Dense(3)])
    params = net.init(jax.random.key(0), (4, 4, 1), dtype=jnp.float64)
    flat, unravel = ravel_pytree(params)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 1)))
    return (lambda theta: jc.softmax_cross_entropy(net.apply(unravel(theta), x, grad=grad), jnp.array([0, 2]),
                                                   grad=grad)), flat


def test_second_order_through_hand_rules_equals_autodiff():
    """Statement 2: jax.hessian, jacfwd(grad) and jvp(grad) run on hand ops (JAX differentiates the hand backward
    code) and, away from kinks, equal autodiff's second derivatives (float64, a tiny network: 29 parameters)."""
    f_hand, theta = tiny_loss("hand")
    f_auto, _ = tiny_loss("autodiff")
    v = jnp.asarray(np.random.default_rng(2).normal(size=theta.shape))

    @jax.jit  # one program: eager jacfwd / jvp would compile every primitive on its own
    def run(theta, v):
        return (jax.hessian(f_hand)(theta), jax.hessian(f_auto)(theta), jax.jacfwd(jax.grad(f_hand))(theta),
                jax.jvp(jax.grad(f_hand), (theta,), (v,))[1])

    h_hand, h_auto, jacfwd_grad, hv = run(theta, v)
    assert h_hand.shape == (29, 29)
    np.testing.assert_allclose(h_hand, h_auto, rtol=1e-10, atol=1e-12 * float(jnp.abs(h_auto).max()))
    np.testing.assert_allclose(jacfwd_grad, h_auto, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(hv, h_auto @ v, rtol=1e-9, atol=1e-13)


def test_reverse_over_reverse_runs_on_hand_rules():
    """Statement 3: grad of grad (and jacrev) use the hand VJPs at the first order and differentiate their code at
    the second: d^2/dx^2 sigmoid = s (1 - s) (1 - 2 s)."""
    x = jnp.linspace(-3.0, 3.0, 7)
    second = jax.vmap(jax.grad(jax.grad(lambda a: jc.sigmoid(a))))(x)
    s = jax.nn.sigmoid(x)
    np.testing.assert_allclose(second, s * (1 - s) * (1 - 2 * s), rtol=1e-12)
    np.testing.assert_allclose(jax.jacrev(lambda a: jc.tanh(a))(x), jnp.diag(1 - jnp.tanh(x) ** 2), rtol=1e-12)


def test_tangent_mode_runs_the_hand_tangent_rules_in_forward_mode_on_every_op():
    """Statement 4: grad="tangent" is a custom JVP whose rule is the hand tangent rule: jax.jvp, jax.linearize and
    jax.jacfwd run (and equal jaxcnn.ops.JVP's result); reverse mode transposes the rule and equals the hand VJP;
    vmap of jvp runs. Float64, every op."""
    settings = {"conv2d im2col": (jc.conv2d, dict(padding=1, rule="im2col")),
                "conv2d flip": (jc.conv2d, dict(padding=1, rule="flip")),
                "conv_relu_pool": (jc.conv_relu_pool, dict(padding=1)), "max_pool2d": (jc.max_pool2d, dict(window=2)),
                "avg_pool2d": (jc.avg_pool2d, dict(window=2))}
    t = jnp.asarray(rng.normal(size=X.shape))

    @jax.jit
    def run(x, t):
        out = {}
        for name, f in OPS.items():
            y, jv = jax.jvp(lambda a, f=f: f(a, "tangent"), (x,), (t,))
            y_lin, f_lin = jax.linearize(lambda a, f=f: f(a, "tangent"), x)
            u = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
            (hand,) = jax.vjp(lambda a, f=f: f(a, "hand"), x)[1](u)
            (transposed,) = jax.vjp(lambda a, f=f: f(a, "tangent"), x)[1](u)
            batched = jax.vmap(lambda a, d, f=f: jax.jvp(lambda b: f(b, "tangent"), (a,), (d,))[1])(
                jnp.stack([x, 2 * x]), jnp.stack([t, t]))
            out[name] = (y, jv, y_lin, f_lin(t), hand, transposed, batched)
        return out

    for name, (y, jv, y_lin, jv_lin, hand, transposed, batched) in run(X, t).items():
        np.testing.assert_allclose(y_lin, y, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(jv_lin, jv, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(transposed, hand, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(batched[0], jv, rtol=1e-12, atol=1e-14, err_msg=name)
        if name in settings:  # jv is the rule's own output (the windowed ops; the others are checked alike)
            op, kw = settings[name]
            primals = (X, W, B) if op in (jc.conv2d, jc.conv_relu_pool) else (X,)
            rule_jv = jc.ops.JVP[op](primals, (t,) + (None,) * (len(primals) - 1), **kw)[1]
            np.testing.assert_allclose(jv, rule_jv, rtol=1e-12, atol=1e-14, err_msg=name)


def test_tangent_mode_at_a_tie_is_the_rule_not_autodiff():
    """At a tied max-pool window jax.jvp in tangent mode reads the first maximum (the hand rule); autodiff averages
    the tied entries. Its reverse mode, the rule's transpose, routes Delta to the first maximum as the hand VJP."""
    x = jnp.array([[5.0, 1, 2, 7], [5, 5, 3, 0]])[None, :, :, None]
    dx = jnp.array([[1.0, 2, 3, 4], [5, 6, 7, 8]])[None, :, :, None]
    assert jax.jvp(lambda a: jc.max_pool2d(a, 2, grad="tangent"), (x,), (dx,))[1].ravel().tolist() == [1.0, 4.0]
    grads = {g: jax.grad(lambda a, g=g: jc.max_pool2d(a, 2, grad=g).sum())(x).ravel().tolist()
             for g in ("hand", "tangent")}
    assert grads["tangent"] == grads["hand"] == [1, 0, 0, 1, 0, 0, 0, 0]


def test_tangent_mode_networks_give_forward_mode_and_hessians():
    """A network in tangent mode: jax.jvp equals second_order.jvp (the hand R-op), jax.hessian equals autodiff's
    (29 parameters, float64), jax.grad equals the hand gradient; a user layer (no tangent rule) is differentiated
    by JAX."""
    from jaxcnn import second_order

    f_tangent, theta = tiny_loss("tangent")
    f_auto, _ = tiny_loss("autodiff")
    f_hand, _ = tiny_loss("hand")
    net = jc.preset("digits-cnn")
    params = net.init(jax.random.key(0), (8, 8, 1), dtype=jnp.float64)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)))
    v = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) / p.size, params)

    @jax.jit
    def run(theta, params, x, v):
        return (jax.grad(f_tangent)(theta), jax.grad(f_hand)(theta), jax.hessian(f_tangent)(theta),
                jax.hessian(f_auto)(theta), jax.jvp(lambda p: net.apply(p, x, grad="tangent"), (params,), (v,))[1],
                second_order.jvp(net, params, x, v)[1])

    g_tangent, g_hand, h_tangent, h_auto, jv, jv_hand = run(theta, params, x, v)
    np.testing.assert_allclose(g_tangent, g_hand, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(h_tangent, h_auto, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jv, jv_hand, rtol=1e-12, atol=1e-14)
    scale = jc.custom_op("scale", lambda x: 3 * x, lambda arrays, y, delta: (3 * delta,))
    user = jc.Sequential([jc.Custom(scale), jc.Flatten(), jc.Dense(2)])
    p = user.init(jax.random.key(0), (2, 2, 1), dtype=jnp.float64)
    jax.jvp(lambda a: user.apply(p, a, grad="tangent"), (X[:, :2, :2],), (X[:, :2, :2],))
