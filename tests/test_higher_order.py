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
    h_hand, h_auto = jax.jit(jax.hessian(f_hand))(theta), jax.jit(jax.hessian(f_auto))(theta)
    assert h_hand.shape == (29, 29)
    np.testing.assert_allclose(h_hand, h_auto, rtol=1e-10, atol=1e-12 * float(jnp.abs(h_auto).max()))
    np.testing.assert_allclose(jax.jacfwd(jax.grad(f_hand))(theta), h_auto, rtol=1e-10, atol=1e-13)
    v = jnp.asarray(np.random.default_rng(2).normal(size=theta.shape))
    _, hv = jax.jvp(jax.grad(f_hand), (theta,), (v,))
    np.testing.assert_allclose(hv, h_auto @ v, rtol=1e-9, atol=1e-13)


def test_reverse_over_reverse_runs_on_hand_rules():
    """Statement 3: grad of grad (and jacrev) use the hand VJPs at the first order and differentiate their code at
    the second: d^2/dx^2 sigmoid = s (1 - s) (1 - 2 s)."""
    x = jnp.linspace(-3.0, 3.0, 7)
    second = jax.vmap(jax.grad(jax.grad(lambda a: jc.sigmoid(a))))(x)
    s = jax.nn.sigmoid(x)
    np.testing.assert_allclose(second, s * (1 - s) * (1 - 2 * s), rtol=1e-12)
    np.testing.assert_allclose(jax.jacrev(lambda a: jc.tanh(a))(x), jnp.diag(1 - jnp.tanh(x) ** 2), rtol=1e-12)
