"""Residual blocks: y = body(x) + shortcut(x) with an identity or a projection shortcut; hand = autodiff and finite
differences (gradcheck), hand tangent rules, TOML, clear errors; residual_add's hand rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import gradcheck, network, second_order
from tests.helpers import DTYPES, assert_close, assert_modes_agree, normal

IDENTITY = jc.Residual([jc.Conv(4, 3, padding=1), jc.ReLU(), jc.Conv(4, 3, padding=1)])
DOWN = jc.Residual([jc.Conv(8, 3, stride=2, padding=1), jc.ReLU(), jc.Conv(8, 3, padding=1)])
NET = jc.Sequential([jc.Conv(4, 3, padding=1), jc.ReLU(), IDENTITY, jc.ReLU(), DOWN, jc.ReLU(), jc.GlobalAvgPool(),
                     jc.Dense(3)])


def test_identity_and_projection_shortcuts():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4), jnp.float64)
    params = jc.Sequential([IDENTITY]).init(jax.random.key(1), (7, 7, 4), jnp.float64)["res1"]
    body = jc.Sequential(IDENTITY.layers).apply({k: params[k] for k in ("conv1", "conv2")}, x)
    np.testing.assert_allclose(IDENTITY.apply(params, x, grad="hand", rule=None), body + x, rtol=1e-14)
    assert "proj" not in params
    down = jc.Sequential([DOWN]).init(jax.random.key(2), (7, 7, 4), jnp.float64)["res1"]
    assert down["proj"]["w"].shape == (1, 1, 4, 8) and "b" not in down["proj"]  # 7x7x4 -> 4x4x8
    y = DOWN.apply(down, x, grad="hand", rule=None)
    skip = jc.conv2d(x, down["proj"]["w"], stride=2)
    body = jc.Sequential(DOWN.layers).apply({k: down[k] for k in ("conv1", "conv2")}, x)
    np.testing.assert_allclose(y, body + skip, rtol=1e-14)
    assert NET.shapes((7, 7, 1))[-4:] == [(4, 4, 8), (4, 4, 8), (8,), (3,)]


def test_gradcheck_and_tangent_rules_through_residual_blocks():
    params = NET.init(jax.random.key(0), (7, 7, 1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 7, 7, 1), jnp.float64)
    report = gradcheck.check_network(NET, params, x, jnp.array([0, 1, 2]), layers=False)
    assert report.mismatches == [], report.table()
    assert {r.name for r in report.rows} >= {"res1/conv1/w", "res2/proj/w"}, report.table()
    v = jax.tree_util.tree_map(jnp.cos, params)

    @jax.jit
    def run(params, x, v):
        return second_order.jvp(NET, params, x, v), second_order.jvp(NET, params, x, v, grad="autodiff")

    (z, jv), (z_ad, jv_ad) = run(params, x, v)
    assert_close(z, z_ad, jnp.float64, "output")
    assert_close(jv, jv_ad, jnp.float64, "J v through the blocks")


def test_toml_round_trip_with_nested_layers_and_errors():
    text = """
    [[layers]]
    type = "conv"
    features = 4
    [[layers]]
    type = "residual"
    projection = true
    [[layers.layers]]
    type = "conv"
    features = 4
    padding = 1
    [[layers.layers]]
    type = "batch_norm"
    [[layers]]
    type = "global_avg_pool"
    [[layers]]
    type = "dense"
    features = 2
    """
    net = jc.Sequential.from_config(network.load_toml(text, is_text=True))
    assert net.layers[1] == jc.Residual([jc.Conv(4, 3, padding=1), jc.BatchNorm()], projection=True)
    assert jc.Sequential.from_config(net.to_config()) == net
    assert net.stateful and set(net.init_state((6, 6, 1))) == {"res1"}
    assert network.describe(net.layers[1]) == "Residual([Conv(4, padding=1), BatchNorm()], projection=True)"
    with pytest.raises(ValueError, match=r"layer 1 \(residual\): layer 0 \(conv\): unknown field\(s\) kernal"):
        jc.Sequential.from_config({"layers": [{"type": "conv", "features": 2},
                                              {"type": "residual", "layers": [{"type": "conv", "features": 2,
                                                                               "kernal": 3}]}]})
    bad = jc.Sequential([jc.Residual([jc.Conv(8, 3, padding=1)], projection=False)])
    with pytest.raises(ValueError, match=r"layer 0 \(Residual\(\[Conv\(8, padding=1\)\], projection=False\)\): "
                                         r"residual: the body maps 6x6x4 to 6x6x8, so the shortcut needs a projection"):
        bad.init(jax.random.key(0), (6, 6, 4))
    unpadded = jc.Sequential([jc.Conv(3, 1), jc.Residual([jc.Conv(3, 3)])])
    with pytest.raises(ValueError, match=r"layer 1 \(Residual\(\[Conv\(3\)\]\)\): residual: no 1x1 convolution with a "
                                         r"stride maps 8x8 to 6x6"):
        unpadded.shapes((8, 8, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_passes_delta_to_both_branches(dtype):
    a, b = normal(np.random.default_rng(0), (2, 3), dtype), normal(np.random.default_rng(1), (2, 3), dtype)
    assert_modes_agree(lambda a, b, **m: jc.ops.residual_add(a, b, **m), (a, b), ("body", "shortcut"), dtype,
                       "residual_add", {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}})
    with pytest.raises(ValueError, match=r"residual_add: body \(2, 3\) and shortcut \(3,\) must have the same"):
        jc.ops.residual_add(a, b[0])
