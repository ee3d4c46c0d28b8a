"""conv_bn_relu: the fused block equals the chain conv2d -> batch_norm -> relu (autodiff) for every output and
input, by both conv rules; finite differences; it keeps fewer bytes for its backward than the chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import assert_close, normal

rng = np.random.default_rng(0)
MODES = {"autodiff": {"grad": "autodiff"}, "im2col": {"rule": "im2col"}, "flip": {"rule": "flip"},
         "in blocks": {"block": 2}, "autodiff in blocks": {"grad": "autodiff", "block": 2}}


def inputs(dtype):
    return (normal(rng, (4, 7, 6, 3), dtype), normal(rng, (3, 3, 3, 5), dtype), normal(rng, (5,), dtype),
            normal(rng, (5,), dtype))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_hand_equals_the_autodiff_chain(dtype):
    args = inputs(dtype)

    @jax.jit
    def run(args):
        out = {}
        for name, kw in MODES.items():
            def loss(x, w, g, b, kw=kw):
                y, mean, var = jc.conv_bn_relu(x, w, g, b, stride=(2, 1), padding=1, **kw)
                return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(mean) * var), y
            (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
            out[name] = (y, grads)
        chain = jax.nn.relu(jc.batch_norm(jc.conv2d(args[0], args[1], stride=(2, 1), padding=1, grad="autodiff"),
                                          args[2], args[3], grad="autodiff")[0])
        return out, chain

    out, chain = run(args)
    assert_close(out["autodiff"][0], chain, dtype, "the forward is the chain's")
    for rule in ("im2col", "flip", "in blocks", "autodiff in blocks"):
        assert_close(out[rule][0], chain, dtype, f"{rule} output")
        for name, a, b in zip(("x", "w", "gamma", "beta"), out[rule][1], out["autodiff"][1]):
            assert_close(a, b, dtype, f"{rule} d/d{name}")


def test_finite_differences_float64():
    x, w, g, b = inputs(jnp.float64)
    check_grads(jax.jit(lambda x, w, g, b: jnp.sum(jnp.sin(jc.conv_bn_relu(x, w, g, b, padding=1)[0]))),
                (x, w, g, b), order=1, modes=["rev"])


def test_it_keeps_its_input_and_output_for_the_backward_not_x_hat():
    """The arrays saved between the forward and the backward (jax.vjp's residuals): the chain keeps Z^m, x_hat and
    the ReLU output; the fused block Z^m and its output only, so one conv-output-sized array less."""
    x, w, g, b = (a.astype(jnp.float32) for a in inputs(jnp.float64))

    def saved(f):
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(jax.vjp(f, x, w, g, b)[1]))

    chain = saved(lambda x, w, g, b: jc.relu(jc.batch_norm(jc.conv2d(x, w, padding=1, rule="flip"), g, b)[0]))
    fused = saved(lambda x, w, g, b: jc.conv_bn_relu(x, w, g, b, padding=1, rule="flip")[0])
    output = 4 * 7 * 6 * 5 * 4  # bytes of one conv-output-sized float32 array
    assert chain - fused >= output, (chain, fused, output)


def test_bad_input_is_named():
    x, w, g, b = inputs(jnp.float32)
    with pytest.raises(ValueError, match=r"conv_bn_relu: gamma and beta must have shape \(5,\)"):
        jc.conv_bn_relu(x, w, g[:2], b)
    with pytest.raises(ValueError, match="conv_bn_relu: channel mismatch"):
        jc.conv_bn_relu(x[..., :2], w, g, b)
    with pytest.raises(ValueError, match="conv_bn_relu: block applies to rule='im2col'"):
        jc.conv_bn_relu(x, w, g, b, rule="flip", block=2)
    with pytest.raises(ValueError, match="conv_bn_relu: block must be None, 'auto' or an int >= 1"):
        jc.conv_bn_relu(x, w, g, b, block=0)
