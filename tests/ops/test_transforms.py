"""Every op and gradient mode under jit, vmap (per-example gradients equal a Python loop) and grad of a scalar."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from tests.helpers import normal

rng = np.random.default_rng(0)
B = 3  # examples; each is a batch of one for the op
X4 = normal(rng, (B, 1, 6, 5, 2), jnp.float64)
CONV_W = {"w": normal(rng, (3, 2, 2, 3), jnp.float64), "b": normal(rng, (3,), jnp.float64)}
DENSE_W = {"w": normal(rng, (4, 3), jnp.float64), "b": normal(rng, (3,), jnp.float64)}
X2 = normal(rng, (B, 1, 4), jnp.float64)
LABELS = jnp.array([[2], [0], [1]])
TARGETS = normal(rng, (B, 1, 4), jnp.float64)

# name -> (params, examples, f(params, example, grad)); each returns an array or scalar.
CASES = {
    "conv2d im2col": (CONV_W, X4, lambda p, x, g: jc.conv2d(x, p["w"], p["b"], stride=2, padding=1, grad=g)),
    "conv2d flip": (CONV_W, X4, lambda p, x, g: jc.conv2d(x, p["w"], p["b"], dilation=2, padding="SAME",
                                                          grad=g, rule="flip")),
    "conv_relu_pool": (CONV_W, X4, lambda p, x, g: jc.conv_relu_pool(x, p["w"], p["b"], padding=1, grad=g)),
    "max_pool2d": ({}, X4, lambda p, x, g: jc.max_pool2d(x, 3, 2, "SAME", grad=g)),
    "avg_pool2d": ({}, X4, lambda p, x, g: jc.avg_pool2d(x, 2, grad=g)),
    "relu": ({}, X4, lambda p, x, g: jc.relu(x, grad=g)),
    "sigmoid": ({}, X4, lambda p, x, g: jc.sigmoid(x, grad=g)),
    "tanh": ({}, X4, lambda p, x, g: jc.tanh(x, grad=g)),
    "leaky_relu": ({}, X4, lambda p, x, g: jc.leaky_relu(x, 0.1, grad=g)),
    "elu": ({}, X4, lambda p, x, g: jc.elu(x, grad=g)),
    "gelu": ({}, X4, lambda p, x, g: jc.gelu(x, approximate=False, grad=g)),
    "softmax": ({}, X2, lambda p, x, g: jc.softmax(x, grad=g)),
    "global_avg_pool": ({}, X4, lambda p, x, g: jc.global_avg_pool(x, grad=g)),
    "dense": (DENSE_W, X2, lambda p, x, g: jc.dense(x, p["w"], p["b"], grad=g)),
    "squared_error": ({}, (X2, TARGETS), lambda p, e, g: jc.squared_error(*e, grad=g)),
    "softmax_cross_entropy": ({}, (X2, LABELS), lambda p, e, g: jc.softmax_cross_entropy(*e, grad=g)),
}


def scalar_loss(f, grad):
    return lambda params, example: jnp.sum(jnp.sin(f(params, example, grad)))


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
@pytest.mark.parametrize("name", list(CASES))
def test_jit_vmap_grad(name, grad):
    params, examples, f = CASES[name]
    loss = scalar_loss(f, grad)
    # grad with respect to the parameters and the (first) input of one example.
    grad_fn = jax.grad(lambda p, x, rest: loss(p, (x, *rest) if rest else x), argnums=(0, 1))

    def split(example):
        return (example[0], example[1:]) if isinstance(example, tuple) else (example, ())

    per_example = jax.jit(jax.vmap(lambda e: grad_fn(params, *split(e))))(examples)
    jitted = jax.jit(lambda e: grad_fn(params, *split(e)))
    for i in range(B):  # a Python loop over single examples
        example = jax.tree_util.tree_map(lambda a, i=i: a[i], examples)
        looped = jitted(example)
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a, i=i: a[i], per_example), looped,
                                    rtol=1e-12, atol=1e-14)
        if i == 0:  # eager (no jit) gives the same
            chex.assert_trees_all_close(grad_fn(params, *split(example)), looped, rtol=1e-12, atol=1e-14)


def test_jit_traces_once_per_shape():
    """Static arguments are hashable, so repeated calls reuse the compiled step."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, x):
        return jax.grad(lambda w: jnp.sum(jc.conv_relu_pool(x, w, None, padding=1)))(w)

    for _ in range(3):
        step(CONV_W["w"], X4[0])
