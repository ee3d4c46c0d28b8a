"""The ConvBNReLU layer is the chain Conv(bias=False) -> BatchNorm -> ReLU in training and in evaluation, with
the same running averages; TOML; the XLA baseline computes it too."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import bench

FUSED = jc.Sequential([jc.ConvBNReLU(6, 3, stride=2, padding=1, momentum=0.8), jc.GlobalAvgPool(), jc.Dense(3)])
CHAIN = jc.Sequential([jc.Conv(6, 3, stride=2, padding=1, bias=False), jc.BatchNorm(momentum=0.8), jc.ReLU(),
                       jc.GlobalAvgPool(), jc.Dense(3)])


@pytest.mark.parametrize("block", [None, 2])
def test_the_layer_is_the_chain_in_both_modes(block):
    fused = jc.Sequential([dataclasses.replace(FUSED.layers[0], block=block), *FUSED.layers[1:]])
    params = fused.init(jax.random.key(0), (7, 7, 2), dtype=jnp.float64)
    chain = {"conv1": {"w": params["conv1"]["w"]}, "bn1": {k: params["conv1"][k] for k in ("gamma", "beta")},
             "dense1": params["dense1"]}
    x = jax.random.normal(jax.random.key(1), (5, 7, 7, 2), jnp.float64)
    state_f, state_c = FUSED.init_state((7, 7, 2)), CHAIN.init_state((7, 7, 2))

    def loss(net, p, s):
        outs, new = net.forward(p, x, state=s, train=True)
        return jnp.sum(jnp.sin(outs[-1])), new

    (lf, new_f), gf = jax.value_and_grad(lambda p: loss(fused, p, state_f), has_aux=True)(params)
    blocked = jax.make_jaxpr(jax.grad(lambda p: loss(fused, p, state_f)[0]))(params)
    assert (" scan[" in str(blocked)) == (block is not None)  # both passes go block by block, not ignored
    (lc, new_c), gc = jax.value_and_grad(lambda p: loss(CHAIN, p, state_c), has_aux=True)(chain)
    assert abs(float(lf - lc)) < 1e-12
    np.testing.assert_allclose(gf["conv1"]["w"], gc["conv1"]["w"], rtol=1e-10)
    np.testing.assert_allclose(gf["conv1"]["gamma"], gc["bn1"]["gamma"], rtol=1e-10)
    for k in ("mean", "var"):
        np.testing.assert_allclose(new_f["conv1"][k], new_c["bn1"][k], rtol=1e-6)
    np.testing.assert_allclose(fused.apply(params, x, state=new_f), CHAIN.apply(chain, x, state=new_c), rtol=1e-6)
    np.testing.assert_allclose(bench.xla_apply(fused, params, x), fused.outputs(params, x, train=True)[-1],
                               rtol=1e-11)


def test_toml_and_errors():
    assert jc.Sequential.from_config(FUSED.to_config()) == FUSED
    with pytest.raises(ValueError, match="conv_bn_relu: bias must be False"):
        jc.ConvBNReLU(4, bias=True)
    with pytest.raises(ValueError, match="conv_bn_relu: store_phi must be None or False"):
        jc.ConvBNReLU(4, store_phi=True)
    blocked = jc.Sequential([jc.ConvBNReLU(4, block="auto")])
    assert jc.Sequential.from_config(blocked.to_config()) == blocked
    from jaxcnn import autotune  # the "phi stored" candidate gives it its rule only: it never stores phi(pad(Z))
    assert autotune.uniform(blocked, "im2col", True).layers[0].store_phi is None  # it names a block: not open
    assert autotune.uniform(FUSED, "im2col", True).layers[0].store_phi is False
    with pytest.raises(ValueError, match=r"batch_norm: momentum must be in \[0, 1\)"):
        jc.ConvBNReLU(4, momentum=1.0)
