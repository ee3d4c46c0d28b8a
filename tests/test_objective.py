"""Lin eq. (1)-(2): f = ||theta||^2 / (2C) + mean loss, and its gradient theta / C + the data gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import objective as obj

NET = jc.Sequential([jc.Conv(4, 3), jc.ReLU(), jc.Flatten(), jc.Dense(3)])


def setup():
    params = NET.init(jax.random.key(0), (5, 5, 2), dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5, 5, 2)))
    return params, x, jnp.array([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("loss", ["ce", "squared"])
def test_value_and_gradient_follow_lin_eq_1_2(loss):
    params, x, labels = setup()
    C = 0.25
    f, aux = obj.objective(params, NET, x, labels, loss=loss, C=C)
    data_term = obj.LOSSES[loss](NET.apply(params, x), labels)
    theta_sq = sum(float(jnp.sum(p ** 2)) for p in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(f, data_term + theta_sq / (2 * C), rtol=1e-13)
    np.testing.assert_allclose(aux["loss"], data_term, rtol=1e-13)
    grad_f = jax.jit(jax.grad(lambda p: obj.objective(p, NET, x, labels, loss=loss, C=C)[0]))(params)
    grad_data = jax.jit(jax.grad(lambda p: obj.LOSSES[loss](NET.apply(p, x), labels)))(params)
    for g, d, p in zip(*(jax.tree_util.tree_leaves(t) for t in (grad_f, grad_data, params))):
        np.testing.assert_allclose(g, p / C + d, rtol=1e-12, atol=1e-14)  # eq. (1), (2)


def test_no_regulariser_without_c_and_accuracy_count():
    params, x, labels = setup()
    f, aux = obj.objective(params, NET, x, labels)
    assert float(f) == float(aux["loss"])
    assert int(aux["correct"]) == int(jnp.sum(jnp.argmax(NET.apply(params, x), -1) == labels))


@pytest.mark.parametrize("loss", ["ce", "squared"])
def test_per_example_losses_average_to_the_batch_loss(loss):
    z, labels = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4))), jnp.array([0, 3, 1, 1, 2])
    per = obj.per_example_loss(z, labels, loss)
    assert per.shape == (5,)
    np.testing.assert_allclose(per.mean(), obj.LOSSES[loss](z, labels), rtol=1e-13)


def test_bad_arguments():
    params, x, labels = setup()
    with pytest.raises(ValueError, match="loss must be one of ce, squared"):
        obj.objective(params, NET, x, labels, loss="hinge")
    with pytest.raises(ValueError, match=r"C must be > 0"):
        obj.objective(params, NET, x, labels, C=0)


@pytest.mark.parametrize("loss", ["ce", "squared"])
def test_label_smoothing_trains_on_smoothed_targets_with_the_hand_gradient(loss):
    """epsilon = 0.1: the data term is the loss of q = 0.9 onehot + 0.1 / K; its gradient with respect to the logits
    is the hand rule's on q ((p - q) / N, or 2 (z - q) / N), and the network's hand gradient equals autodiff's and
    finite differences (float64)."""
    params, x, labels = setup()
    eps, K = 0.1, 3
    q = 0.9 * np.eye(K)[np.asarray(labels)] + eps / K
    f = lambda p, grad: obj.objective(p, NET, x, labels, loss=loss, C=2.0, grad=grad, label_smoothing=eps)[0]
    logits = NET.apply(params, x)
    p = np.asarray(jax.nn.softmax(logits))
    data = -np.mean(np.sum(q * np.log(p), axis=1)) if loss == "ce" else np.mean(np.sum((logits - q) ** 2, axis=1))
    reg = sum(float(jnp.sum(a ** 2)) for a in jax.tree_util.tree_leaves(params)) / 4.0
    np.testing.assert_allclose(float(f(params, "hand")), data + reg, rtol=1e-12)
    dz = jax.grad(lambda z: jc.softmax_cross_entropy(z, jnp.asarray(q)) if loss == "ce" else
                  jc.squared_error(z, jnp.asarray(q)))(logits)
    np.testing.assert_allclose(dz, (p - q) / 6 if loss == "ce" else 2 * (logits - q) / 6, rtol=1e-10, atol=1e-14)
    hand = jax.jit(jax.grad(lambda p: f(p, "hand")))(params)
    auto = jax.jit(jax.grad(lambda p: f(p, "autodiff")))(params)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(t)])
    np.testing.assert_allclose(flat(hand), flat(auto), rtol=1e-10, atol=1e-13)
    direction = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / a.size, params)
    h = 1e-6
    plus = jax.tree_util.tree_map(lambda a, d: a + h * d, params, direction)
    minus = jax.tree_util.tree_map(lambda a, d: a - h * d, params, direction)
    fd = (float(f(plus, "autodiff")) - float(f(minus, "autodiff"))) / (2 * h)
    assert abs(fd - float(jnp.vdot(flat(hand), flat(direction)))) < 1e-7 * max(1.0, abs(fd))
