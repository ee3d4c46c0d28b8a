"""relu / sigmoid / tanh: hand equals autodiff, Ray's ReLU example, and the kink at ReLU(0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_modes_agree, normal

VARIANTS = {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}}
OPS = [jc.relu, jc.sigmoid, jc.tanh]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_hand_equals_autodiff(op, dtype):
    x = normal(np.random.default_rng(0), (3, 5, 4, 2), dtype) * 3
    assert_modes_agree(lambda x, **m: op(x, **m), (x,), ("x",), dtype, op.__name__, VARIANTS)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_finite_differences_float64(op):
    x = normal(np.random.default_rng(1), (4, 6), jnp.float64)
    check_grads(op, (x,), order=1, modes=["rev"])


def test_ray_relu_example():
    """Ray: x = [[-5, 4], [0, 2]] -> y = [[0, 4], [0, 2]], dx = [[0, dy3], [0, dy4]] (the 0 entry gets nothing)."""
    x = jnp.array([[-5.0, 4], [0, 2]])
    y, pullback = jax.vjp(jc.relu, x)
    np.testing.assert_array_equal(y, [[0, 4], [0, 2]])
    dy1, dy2, dy3, dy4 = 1.0, 2.0, 3.0, 4.0
    np.testing.assert_array_equal(pullback(jnp.array([[dy1, dy3], [dy2, dy4]]))[0], [[0, dy3], [0, dy4]])


def test_relu_kink_at_zero():
    """sigma'(0): Lin sets it to 0. Our forward where(S > 0, S, 0) makes autodiff agree; JAX's derivative of
    maximum(S, 0) at the tie S = 0 is 1/2, which a hand-written chain built on jnp.maximum would silently use."""
    hand = jax.grad(lambda s: jc.relu(s, grad="hand"))(0.0)
    autodiff = jax.grad(lambda s: jc.relu(s, grad="autodiff"))(0.0)
    assert (hand, autodiff) == (0.0, 0.0)
    assert jax.grad(lambda s: jnp.maximum(s, 0.0))(0.0) == 0.5


@pytest.mark.parametrize("op,slope", [(jc.sigmoid, lambda y: y * (1 - y)), (jc.tanh, lambda y: 1 - y * y)],
                         ids=["sigmoid", "tanh"])
def test_slope_from_stored_output(op, slope):
    x = normal(np.random.default_rng(2), (7,), jnp.float64)
    y, pullback = jax.vjp(op, x)
    np.testing.assert_allclose(pullback(jnp.ones_like(x))[0], slope(y), rtol=1e-14)


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_sigmoid_saturates_without_nan(grad):
    """Vanishing gradients (Sadeghzadeh): far from 0 the sigmoid's slope underflows to 0, never to NaN."""
    x = jnp.array([-1000.0, -90.0, 0.0, 90.0, 1000.0], jnp.float32)
    g = jax.grad(lambda x: jc.sigmoid(x, grad=grad).sum())(x)
    assert bool(jnp.all(jnp.isfinite(g))) and float(g[2]) == 0.25 and float(g[0]) == 0.0
