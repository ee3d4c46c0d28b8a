"""A small conv net, forward and backward with every gradient mode, and how far apart the gradients are."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn as jc

MODES = {
    "hand, rule=im2col": {"grad": "hand", "rule": "im2col"},
    "hand, rule=flip": {"grad": "hand", "rule": "flip"},
}
ARCHITECTURE = ("conv_relu_pool 3x3x8 pad 1 -> conv 3x3x16 stride 2 -> relu -> max pool 3x3/2 SAME "
                "-> dense 10 -> softmax cross-entropy")


SHAPES = {"conv1": (3, 3, 3, 8), "conv2": (3, 3, 8, 16), "dense": (64, 10)}


@partial(jax.jit, static_argnums=1)
def init(key: jax.Array, dtype) -> dict:
    """He-normal weights (simpleNN's default), zero biases. One draw for all weights: on CPU each PRNG call
    costs a compilation of seconds."""
    sizes = [int(np.prod(s)) for s in SHAPES.values()]
    draws = jnp.split(jax.random.normal(key, (sum(sizes),), dtype), np.cumsum(sizes)[:-1])
    return {
        name: {"w": d.reshape(shape) * jnp.sqrt(2.0 / np.prod(shape[:-1])).astype(dtype),
               "b": jnp.zeros(shape[-1], dtype)}
        for (name, shape), d in zip(SHAPES.items(), draws)
    }


def loss(params: dict, x: jax.Array, labels: jax.Array, grad: str, rule: str | None = None) -> jax.Array:
    z = jc.conv_relu_pool(x, params["conv1"]["w"], params["conv1"]["b"], padding=1, grad=grad, rule=rule)
    z = jc.conv2d(z, params["conv2"]["w"], params["conv2"]["b"], stride=2, grad=grad, rule=rule)
    z = jc.max_pool2d(jc.relu(z, grad=grad), 3, 2, "SAME", grad=grad)
    z = jc.dense(z.reshape(z.shape[0], -1), params["dense"]["w"], params["dense"]["b"], grad=grad)
    return jc.softmax_cross_entropy(z, labels, grad=grad)


def compare(dtype, seed: int = 0, batch: int = 16) -> tuple[dict, dict]:
    """Loss and gradients by every mode; returns ({mode: loss}, {mode: {param: relative error vs autodiff}})."""
    # The same weights in every dtype: drawn once in float64, then rounded (drawn in each dtype, they would differ).
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), init(jax.random.key(seed), jnp.float64))
    rng = np.random.default_rng(seed)
    x, labels = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), dtype), jnp.asarray(rng.integers(0, 10, batch))
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnames=("grad", "rule"))
    ref_loss, ref = value_and_grad(params, x, labels, grad="autodiff")
    losses, errors = {"autodiff": float(ref_loss)}, {}
    for name, kw in MODES.items():
        value, grads = value_and_grad(params, x, labels, **kw)
        losses[name] = float(value)
        errors[name] = {
            "/".join(str(k.key) for k in path): _rel_err(g, r)
            for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref))
        }
    return losses, errors


def _rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float64).tiny))


def main(seed: int = 0) -> int:
    jax.config.update("jax_enable_x64", True)
    print(f"jaxcnn {jc.__version__} demo on {jax.devices()[0].platform}: {ARCHITECTURE}")
    print(f"He-normal weights from jax.random.key({seed}), a random batch of 16 images 16x16x3 and labels")
    print("Gradients by the hand rules vs jax.grad of the same forward, max|hand - autodiff| / max|autodiff|:\n")
    results = {str(np.dtype(d)): compare(d, seed) for d in (jnp.float64, jnp.float32)}
    dtypes = list(results)
    header = f"{'parameter':12s}" + "".join(f"{d + ' ' + m:>30s}" for d in dtypes for m in MODES)
    print(header)
    params = list(next(iter(results.values()))[1]["hand, rule=im2col"])
    for p in params:
        print(f"{p:12s}" + "".join(f"{results[d][1][m][p]:30.1e}" for d in dtypes for m in MODES))
    print()
    for d in dtypes:
        losses = results[d][0]
        print(f"loss {d}: " + ", ".join(f"{m} {v:.10f}" for m, v in losses.items()))
    worst = {d: max(max(e.values()) for e in results[d][1].values()) for d in dtypes}
    print(f"\nlargest relative difference: float64 {worst['float64']:.1e}, float32 {worst['float32']:.1e}")
    return 0
