"""Sequential networks: shapes and their errors, init, apply, per-layer modes, fusion, configs and presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import network
from tests.helpers import assert_close

NET = jc.Sequential([jc.Conv(8, 3, padding=1), jc.ReLU(), jc.MaxPool(2), jc.Conv(16, 3), jc.Tanh(),
                     jc.AvgPool(2), jc.Flatten(), jc.Dense(12), jc.Sigmoid(), jc.Dense(10)])


def test_shapes_names_and_init():
    assert NET.shapes((10, 10, 3)) == [(10, 10, 8), (10, 10, 8), (5, 5, 8), (3, 3, 16), (3, 3, 16), (1, 1, 16),
                                       (16,), (12,), (12,), (10,)]
    assert NET.names == ("conv1", None, None, "conv2", None, None, None, "dense1", None, "dense2")
    params = NET.init(jax.random.key(0), (10, 10, 3))
    shapes = jax.tree_util.tree_map(jnp.shape, params)
    assert shapes == {"conv1": {"w": (3, 3, 3, 8), "b": (8,)}, "conv2": {"w": (3, 3, 8, 16), "b": (16,)},
                      "dense1": {"w": (16, 12), "b": (12,)}, "dense2": {"w": (12, 10), "b": (10,)}}
    assert NET.num_params((10, 10, 3)) == sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert all(float(jnp.abs(p["b"]).max()) == 0 for p in params.values())


def test_he_normal_init_is_simplenn_and_deterministic():
    net = jc.Sequential([jc.Conv(64, 5), jc.Flatten(), jc.Dense(512)])
    params = net.init(jax.random.key(3), (9, 9, 32))
    for name, fan_in in [("conv1", 5 * 5 * 32), ("dense1", 5 * 5 * 64)]:
        w = np.asarray(params[name]["w"])
        assert abs(w.std() / np.sqrt(2 / fan_in) - 1) < 0.02, f"{name}: std {w.std()} vs sqrt(2/{fan_in})"
        assert abs(w.mean()) < 0.01 * w.std() * 10
    again = net.init(jax.random.key(3), (9, 9, 32))
    other = net.init(jax.random.key(4), (9, 9, 32))
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(params), leaves(again)))
    assert not np.array_equal(params["conv1"]["w"], other["conv1"]["w"])


def test_other_initialisers_and_dtype():
    net = jc.Sequential([jc.Flatten(), jc.Dense(300, init="glorot_uniform", bias=False)])
    params = net.init(jax.random.key(0), (20, 10, 1), dtype=jnp.float64)
    w = params["dense1"]["w"]
    limit = np.sqrt(6 / (200 + 300))
    assert w.dtype == jnp.float64 and "b" not in params["dense1"]
    assert float(jnp.abs(w).max()) <= limit and float(jnp.abs(w).max()) > 0.9 * limit


def test_apply_is_the_composition_of_the_ops():
    params = NET.init(jax.random.key(1), (10, 10, 3))
    x = jax.random.normal(jax.random.key(2), (2, 10, 10, 3), jnp.float32)
    p = params
    z = jc.max_pool2d(jc.relu(jc.conv2d(x, p["conv1"]["w"], p["conv1"]["b"], padding=1)), 2)
    z = jc.avg_pool2d(jc.tanh(jc.conv2d(z, p["conv2"]["w"], p["conv2"]["b"])), 2)
    z = jc.dense(jc.sigmoid(jc.dense(z.reshape(2, -1), p["dense1"]["w"], p["dense1"]["b"])), p["dense2"]["w"],
                 p["dense2"]["b"])
    np.testing.assert_array_equal(NET.apply(params, x), z)


def count_custom_vjps(f, *args) -> int:
    return str(jax.make_jaxpr(f)(*args)).count("custom_vjp_call")


def test_per_layer_grad_override():
    params = NET.init(jax.random.key(1), (10, 10, 3))
    x = jnp.ones((2, 10, 10, 3), jnp.float32)
    hand = count_custom_vjps(lambda p: NET.apply(p, x, grad="hand"), params)
    assert hand == len(NET.layers) - 1  # every op but Flatten is a custom VJP
    assert count_custom_vjps(lambda p: NET.apply(p, x, grad="autodiff"), params) == 0
    mixed = jc.Sequential([jc.Conv(8, 3, padding=1, grad="autodiff"), *NET.layers[1:]])
    assert count_custom_vjps(lambda p: mixed.apply(p, x, grad="hand"), params) == hand - 1
    grad = lambda net: jax.jit(jax.grad(lambda p: net.apply(p, x).sum()))(params)["conv1"]["w"]
    np.testing.assert_allclose(grad(mixed), grad(NET), rtol=1e-5)


def test_fuse_keeps_names_values_and_gradients():
    net = jc.preset("simplenn-mnist")
    fused = net.fuse()
    assert [type(layer).__name__ for layer in fused.layers] == ["ConvReLUPool"] * 3 + ["Flatten", "Dense"]
    assert fused.names == ("conv1", "conv2", "conv3", None, "dense1")
    params = net.init(jax.random.key(0), (28, 28, 1))
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1), jnp.float32)
    loss = lambda n: jax.jit(jax.value_and_grad(lambda p: jnp.sum(n.apply(p, x) ** 2)))(params)
    (v1, g1), (v2, g2) = loss(net), loss(fused)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert_close(b, a, jnp.float32, "fused vs unfused gradient")
    # Overlapping or padded pools are not Lin's block, and are left alone.
    keep = jc.Sequential([jc.Conv(4, 3), jc.ReLU(), jc.MaxPool(3, 2), jc.Flatten(), jc.Dense(2)])
    assert keep.fuse() == keep


def test_shape_errors_name_the_layer_and_shapes():
    net = jc.Sequential([jc.Conv(8, 3), jc.MaxPool(4), jc.MaxPool(4), jc.Flatten(), jc.Dense(10)])
    with pytest.raises(ValueError, match=r"layer 2 \(MaxPool\(window=4\)\) does not fit its input of shape "
                                         r"1x1x8: max_pool2d: the window spans 4 in height"):
        net.shapes((8, 8, 1))
    with pytest.raises(ValueError, match=r"layer 1 \(Dense\(10\)\) expects a flat vector \(add a Flatten layer "
                                         r"first\), got input of shape 8x8x1"):
        jc.Sequential([jc.ReLU(), jc.Dense(10)]).init(jax.random.key(0), (8, 8, 1))
    with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
        net.shapes((1, 8, 8, 1))


def test_apply_errors_name_the_layer():
    params = NET.init(jax.random.key(0), (10, 10, 3))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv\(8, padding=1\)\): conv2d: channel mismatch"):
        NET.apply(params, jnp.ones((1, 10, 10, 4)))


def test_layer_spec_errors():
    with pytest.raises(ValueError, match="conv: features must be a positive int, got 0"):
        jc.Conv(0)
    with pytest.raises(ValueError, match="dense: init must be one of he_normal"):
        jc.Dense(3, init="zeros")
    with pytest.raises(ValueError, match="relu: grad must be one of 'hand', 'autodiff' or 'tangent'"):
        jc.ReLU(grad="numeric")
    with pytest.raises(ValueError, match="conv: store_phi applies to rule='im2col'"):
        jc.Conv(4, rule="flip", store_phi=True)
    with pytest.raises(TypeError, match="conv_relu_pool: store_phi must be True, False or None, got 1"):
        jc.ConvReLUPool(4, store_phi=1)
    with pytest.raises(TypeError, match="layer 1: expected a layer spec"):
        jc.Sequential([jc.ReLU(), "dense"])


def test_config_round_trip_and_toml():
    again = jc.Sequential.from_config(NET.to_config())
    assert again == NET
    text = """
        name = "tiny"
        [[layers]]
        type = "conv"
        features = 4
        kernel = [3, 2]
        padding = [[1, 0], [0, 1]]
        [[layers]]
        type = "flatten"
        [[layers]]
        type = "dense"
        features = 2
    """
    net = jc.Sequential.from_config(network.load_toml(text, is_text=True))
    assert net.layers[0] == jc.Conv(4, (3, 2), padding=((1, 0), (0, 1)))
    assert net.name == "tiny" and net.shapes((5, 5, 1))[-1] == (2,)


@pytest.mark.parametrize("layers,match", [
    ([{"type": "convolution", "features": 3}], r"layer 0: unknown layer type 'convolution'; expected one of conv,"),
    ([{"type": "relu"}, {"type": "conv", "features": 3, "kernal": 3}], r"layer 1 \(conv\): unknown field\(s\) kernal"),
    ([{"type": "dense"}], r"layer 0 \(dense\): .*missing 1 required positional argument: 'features'"),
    ([{"type": "max_pool", "grad": "exact"}], r"layer 0 \(max_pool\): max_pool: grad must be"),
    ([{"features": 3}], r"layer 0: expected a table with a 'type' key"),
    ([], r"expected a non-empty list of \[\[layers\]\] tables"),
])
def test_config_errors_name_the_layer(layers, match):
    with pytest.raises(ValueError, match=match):
        jc.Sequential.from_config({"layers": layers}, source="my.toml")


def test_invalid_toml_is_reported():
    with pytest.raises(ValueError, match="not valid TOML"):
        network.load_toml("[[layers]\ntype=", is_text=True)


def test_presets():
    names = network.presets()
    assert set(names) >= {"simplenn-mnist", "simplenn-cifar", "lenet5", "vgg-small", "digits-cnn"}
    mnist = jc.preset("simplenn-mnist")
    assert mnist.shapes((28, 28, 1))[-3:] == [(3, 3, 64), (576,), (10,)]
    assert [layer.features for layer in mnist.layers if hasattr(layer, "features")] == [32, 64, 64, 10]
    cifar = jc.preset("simplenn-cifar")
    assert [layer.kernel for layer in cifar.layers if isinstance(layer, jc.Conv)] == [5, 3, 3, 3, 3, 3]
    assert [layer.features for layer in cifar.layers if isinstance(layer, jc.Conv)] == [32, 32, 64, 64, 64, 128]
    assert cifar.shapes((32, 32, 3))[-1] == (10,)
    assert jc.preset("lenet5").shapes((32, 32, 3))[-1] == (10,)
    assert jc.preset("vgg-small").shapes((32, 32, 3))[-1] == (10,)
    for name in ("resnet-small", "cifar-bn"):  # global pooling heads: any image size, batch norm state
        net = jc.preset(name)
        assert net.stateful and all(net.shapes(shape)[-1] == (10,) for shape in ((32, 32, 3), (28, 28, 1), (8, 8, 1)))
    assert [type(layer).__name__ for layer in jc.preset("resnet-small").layers].count("Residual") == 3
    with pytest.raises(ValueError, match="unknown preset 'resnet'; available: cifar-bn, digits-cnn"):
        jc.preset("resnet")


def test_with_convs_reaches_fused_and_residual_conv_layers():
    """Settings reach every conv layer, fused ones and those of residual bodies included (the bench's "phi in
    blocks" rows once changed the top level only); ``select`` filters; a ConvBNReLU is never told to store phi."""
    net = jc.Sequential([jc.Conv(4, 3, padding=1), jc.ReLU(), jc.MaxPool(2),
                         jc.Residual([jc.ConvBNReLU(4, 3, padding=1), jc.Conv(4, 3, padding=1, rule="flip")]),
                         jc.Flatten(), jc.Dense(3)]).fuse()

    def convs(layers):
        for layer in layers:
            yield from convs(layer.layers) if isinstance(layer, jc.Residual) else \
                [layer] if isinstance(layer, jc.Conv) else []

    open_ = lambda layer: layer.rule is None  # the last names its rule: a block would contradict it
    blocked = net.with_convs(open_, block="auto")
    assert [(type(c).__name__, c.block) for c in convs(blocked.layers)] == \
        [("ConvReLUPool", "auto"), ("ConvBNReLU", "auto"), ("Conv", None)]
    with pytest.raises(ValueError, match="conv: block applies to rule='im2col'"):
        net.with_convs(block="auto")
    stored = net.with_convs(open_, rule="im2col", store_phi=True)
    assert [(c.rule, c.store_phi) for c in convs(stored.layers)] == [("im2col", True), ("im2col", False),
                                                                     ("flip", None)]
    assert blocked.names == net.names and jc.Sequential.from_config(blocked.to_config()) == blocked
