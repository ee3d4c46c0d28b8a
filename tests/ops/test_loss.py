"""Losses: hand gradients 2(z - y)/N and (softmax - y)/N equal autodiff; stability; label handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_modes_agree, normal

VARIANTS = {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}}
LOSSES = [jc.squared_error, jc.softmax_cross_entropy]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_hand_equals_autodiff(loss, dtype):
    rng = np.random.default_rng(0)
    z = normal(rng, (6, 4), dtype) * 3
    y = jax.nn.softmax(normal(rng, (6, 4), jnp.float64)).astype(dtype)  # probability rows
    assert_modes_agree(lambda z, y, **m: loss(z, y, **m), (z, y), ("z", "y"), dtype, loss.__name__, VARIANTS)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_finite_differences_float64(loss):
    rng = np.random.default_rng(1)
    z, y = normal(rng, (5, 3), jnp.float64), jax.nn.softmax(normal(rng, (5, 3), jnp.float64))
    check_grads(loss, (z, y), order=1, modes=["rev"])


def test_gradients_are_the_notes_formulas():
    rng = np.random.default_rng(2)
    z, labels = normal(rng, (4, 3), jnp.float64), jnp.array([0, 2, 1, 2])
    y = jax.nn.one_hot(labels, 3, dtype=jnp.float64)
    np.testing.assert_allclose(jax.grad(jc.squared_error)(z, y), 2 * (z - y) / 4, rtol=1e-14)  # Lin
    np.testing.assert_allclose(jax.grad(jc.softmax_cross_entropy)(z, labels),
                               (jax.nn.softmax(z) - y) / 4, rtol=1e-14)  # Sadeghzadeh: dL/dz = y_hat - y


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_integer_labels_equal_one_hot_rows(loss):
    z, labels = normal(np.random.default_rng(3), (5, 4), jnp.float64), jnp.array([3, 0, 1, 1, 2])
    one_hot = jax.nn.one_hot(labels, 4, dtype=jnp.float64)
    np.testing.assert_allclose(loss(z, labels), loss(z, one_hot), rtol=1e-14)
    np.testing.assert_allclose(jax.grad(loss)(z, labels), jax.grad(loss)(z, one_hot), rtol=1e-14)


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_cross_entropy_is_stable_for_huge_logits(grad):
    """exp(1e4) overflows float32; the logsumexp form does not: loss (0 + 2e4) / 2 and exact gradients."""
    z = jnp.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], jnp.float32)
    value, g = jax.value_and_grad(lambda z: jc.softmax_cross_entropy(z, jnp.array([0, 0]), grad=grad))(z)
    assert float(value) == 1e4
    np.testing.assert_array_equal(g, [[0, 0, 0], [-0.5, 0.5, 0]])  # (softmax - y) / N, softmax exactly one-hot


def test_bfloat16_inputs_give_float32_loss_and_bfloat16_gradients():
    z = jnp.ones((2, 3), jnp.bfloat16)
    assert jc.softmax_cross_entropy(z, jnp.array([0, 1])).dtype == jnp.float32
    assert jax.grad(jc.softmax_cross_entropy)(z, jnp.array([0, 1])).dtype == jnp.bfloat16


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_concrete_labels_closed_over_inside_jit(loss):
    """Labels captured by a jitted function are concrete: they are range-checked on the host, not traced."""
    z, labels, bad = jnp.zeros((3, 4)), jnp.array([0, 3, 1]), jnp.array([0, 4, 1])
    np.testing.assert_allclose(jax.jit(lambda z: loss(z, labels))(z), loss(z, labels), rtol=1e-12)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        jax.jit(lambda z: loss(z, bad))(z)
