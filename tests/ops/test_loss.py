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


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("grad", ["hand", "autodiff", "tangent"])
def test_classes_masked_by_minus_inf_logits_drop_out_of_the_loss(grad, dtype):
    """A logit of -inf masks its class out (p = 0): with 0 log 0 = 0 the loss and its gradient are those of the
    classes left, softmax over them minus y, not NaN (0 * -inf), for integer labels and one-hot rows alike."""
    rng = np.random.default_rng(4)
    z = rng.standard_normal((6, 5)) * 3
    labels = np.array([0, 4, 2, 1, 3, 0])
    masked = rng.random((6, 5)) < 0.4
    masked[np.arange(6), labels] = False
    masked[0] = [False, True, True, True, True]  # one class left: loss 0, gradient 0
    kept = np.where(masked, -np.inf, z)
    p = np.exp(kept - kept.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    one_hot = np.eye(5)[labels]
    expected_loss = -np.mean(np.log(p[np.arange(6), labels]))
    expected_grad = (p - one_hot) / 6  # exactly 0 on the masked classes
    for y in (jnp.asarray(labels), jnp.asarray(one_hot, dtype)):
        loss, g = jax.value_and_grad(jc.softmax_cross_entropy)(jnp.asarray(kept, dtype), y, grad=grad)
        tol = 1e-12 if dtype == jnp.float64 else 1e-5
        np.testing.assert_allclose(loss, expected_loss, rtol=tol)
        np.testing.assert_allclose(g, expected_grad, rtol=tol, atol=tol)
        assert not np.any(g[masked])


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


def reference_cross_entropy(z, labels):
    """Loss and gradient in float64 NumPy, from the float32 logits as given (the truth they are compared with)."""
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    y = np.eye(z.shape[1])[labels]
    return -(y * log_p).sum() / len(z), (np.exp(log_p) - y) / len(z)


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_cross_entropy_keeps_float32_accuracy_at_large_and_mixed_scales(grad):
    """Issue 13: z - logsumexp(z) rounded logsumexp at z's magnitude: [1e6, 1e6, 0] gave loss 0.6875 (log 2 =
    0.6931) and gradient [-0.497, 0.503, 0]. Now loss and gradient are float32-accurate at any scale."""
    rng = np.random.default_rng(4)
    cases = {"audit": (np.array([[1e6, 1e6, 0]]), [0]),
             "1e4": (np.array([[1e4, 1e4 - 0.5, -3.0]]), [1]),
             "mixed": (rng.normal(size=(8, 5)) * 10.0 ** rng.uniform(-3, 7, size=(8, 1)), rng.integers(0, 5, 8))}
    for name, (z, labels) in cases.items():
        z32, labels = jnp.asarray(z, jnp.float32), jnp.asarray(labels)
        value, g = jax.value_and_grad(lambda z, labels=labels: jc.softmax_cross_entropy(z, labels, grad=grad))(z32)
        loss64, g64 = reference_cross_entropy(z32, labels)
        assert abs(float(value) - loss64) <= 1e-6 * max(1.0, abs(loss64)), (name, float(value), loss64)
        np.testing.assert_allclose(g, g64, rtol=0, atol=1e-7, err_msg=name)
    loss, g = jax.value_and_grad(lambda z: jc.softmax_cross_entropy(z, jnp.array([0]), grad=grad))(
        jnp.array([[1e6, 1e6, 0]], jnp.float32))
    assert float(loss) == np.float32(np.log(2)) and g.tolist() == [[-0.5, 0.5, 0.0]]


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_traced_out_of_range_labels_poison_the_loss_and_gradient(loss, grad):
    """Issue 13: under jit or vmap a label -1 or K gave loss 0 and gradient 0 (an all-zero one-hot row). Traced
    labels cannot raise, so such a row is NaN: the loss and that row's gradient are NaN; valid rows are unchanged."""
    z = normal(np.random.default_rng(5), (3, 4), jnp.float32)
    value_and_grad = jax.jit(jax.value_and_grad(lambda z, y: loss(z, y, grad=grad)))
    good = value_and_grad(z, jnp.array([0, 3, 1]))
    np.testing.assert_allclose(good[0], loss(z, jnp.array([0, 3, 1])), rtol=1e-6)
    assert np.isfinite(good[1]).all()
    for bad in (-1, 4):
        value, g = value_and_grad(z, jnp.array([0, bad, 1]))
        assert np.isnan(value), (bad, value)
        g = np.asarray(g)
        assert np.isnan(g[1]).all() and np.isfinite(g[[0, 2]]).all(), (bad, g)
    per_set = jax.vmap(lambda y: loss(z, y, grad=grad))(jnp.array([[0, 3, 1], [0, 10, 1]]))
    assert np.isfinite(per_set[0]) and np.isnan(per_set[1])
