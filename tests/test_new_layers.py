"""The layers beyond the notes' chain (leaky ReLU, ELU, GELU, softmax, global average pooling) in networks: TOML,
hand = autodiff for the whole network, gradcheck with kinks told apart, the hand tangent rules, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import data, gradcheck, network, second_order, train
from tests.helpers import assert_close

TOML = """
name = "all-the-new-layers"
[[layers]]
type = "conv"
features = 6
padding = 1
[[layers]]
type = "leaky_relu"
negative_slope = 0.1
[[layers]]
type = "conv"
features = 8
padding = 1
[[layers]]
type = "elu"
alpha = 0.5
[[layers]]
type = "conv"
features = 8
[[layers]]
type = "gelu"
approximate = false
[[layers]]
type = "global_avg_pool"
[[layers]]
type = "dense"
features = 10
[train]
epochs = 4
"""


def net_and_batch(dtype=jnp.float64):
    net = jc.Sequential.from_config(network.load_toml(TOML, is_text=True))
    params = net.init(jax.random.key(0), (8, 8, 1), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), dtype)
    return net, params, x


def test_toml_round_trip_and_shapes():
    net, _, _ = net_and_batch()
    assert net.layers[1] == jc.LeakyReLU(0.1) and net.layers[3] == jc.ELU(0.5)
    assert net.layers[5] == jc.GELU(approximate=False) and net.layers[6] == jc.GlobalAvgPool()
    assert jc.Sequential.from_config(net.to_config()) == net
    assert net.shapes((8, 8, 1))[-2:] == [(8,), (10,)]  # no Flatten: the pooled channels feed the head
    assert net.shapes((20, 12, 1))[-1] == (10,)  # any image size
    with pytest.raises(ValueError, match="layer 0 \\(leaky_relu\\): leaky_relu: negative_slope must be"):
        jc.Sequential.from_config({"layers": [{"type": "leaky_relu", "negative_slope": -1}]})


def test_network_gradcheck_hand_equals_autodiff_and_finite_differences():
    net, params, x = net_and_batch()
    report = gradcheck.check_network(net, params, x, jnp.array([1, 2, 3]))
    assert report.mismatches == [], report.table()
    assert set(report.kinks) == {"layer 1 (LeakyReLU(negative_slope=0.1))", "layer 3 (ELU(alpha=0.5))"}
    # zero input and biases: every leaky ReLU input sits on its kink, finite differences straddle it, and the
    # report says so instead of crying wolf
    params = jax.tree_util.tree_map(lambda a: a if a.ndim > 1 else jnp.zeros_like(a), params)
    report = gradcheck.check_network(net, params, jnp.zeros_like(x), jnp.array([1, 2, 3]), layers=False)
    assert report.mismatches == [], report.table()
    assert report.kinks["layer 1 (LeakyReLU(negative_slope=0.1))"]["relu_zeros"] == 3 * 8 * 8 * 6


def test_network_tangent_rules_and_softmax_output():
    net, params, x = net_and_batch()
    probabilities = jc.Sequential([*net.layers, jc.Softmax()])
    v = jax.tree_util.tree_map(jnp.cos, params)

    @jax.jit
    def run(params, x, v):
        return (second_order.jvp(probabilities, params, x, v),
                second_order.jvp(probabilities, params, x, v, grad="autodiff"))

    (z, jv), (z_ad, jv_ad) = run(params, x, v)
    assert_close(z, z_ad, jnp.float64, "output")
    assert_close(jv, jv_ad, jnp.float64, "J v")
    assert jnp.allclose(z.sum(axis=-1), 1.0)


def test_hand_and_autodiff_train_a_network_of_them_alike():
    """An epoch on the digits by each gradient mode, float32, same seed: the same objective at every step (to
    float32 rounding), and it falls."""
    net, _, _ = net_and_batch()
    runs = {}
    for grad in ("hand", "autodiff"):
        cfg = train.TrainConfig(epochs=1, seed=1, lr=0.01, grad=grad)
        runs[grad] = train.fit(net, train.prepare(data.load("digits"), cfg), cfg)
    hand, auto = runs["hand"].step_losses, runs["autodiff"].step_losses
    assert np.max(np.abs(hand - auto) / np.abs(auto)) < 1e-3
    losses = runs["hand"].step_losses
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_dropout_layer_draws_per_example_masks_in_training_only():
    """Evaluation is the identity; in training each example's mask depends on its own key only, so a batch split
    in two (as over two devices) gets the same masks; training without keys is an error that says what to pass."""
    net = jc.Sequential([jc.Flatten(), jc.Dropout(0.5), jc.Dense(3)])
    params = net.init(jax.random.key(0), (2, 2, 1))
    x = jax.random.normal(jax.random.key(1), (6, 2, 2, 1), jnp.float32)
    keys = jax.random.split(jax.random.key(2), 6)
    np.testing.assert_array_equal(net.apply(params, x), jc.Sequential([jc.Flatten(), jc.Dense(3)]).apply(params, x))
    whole = net.outputs(params, x, train=True, rng=keys)[1]
    halves = [net.outputs(params, x[i:i + 3], train=True, rng=keys[i:i + 3])[1] for i in (0, 3)]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    assert 0 < float(jnp.mean(whole == 0)) < 1
    with pytest.raises(ValueError, match="dropout in training needs random keys: rng="):
        net.outputs(params, x, train=True)
    assert jc.Sequential.from_config(net.to_config()) == net and net.random
