"""Lin's training objective, eq. (1)-(2): f(theta) = ||theta||^2 / (2C) + (1/I) sum_i xi_i.

On a mini-batch, (1/I) sum_i xi_i is the batch mean of the loss; ``C=None`` drops the regulariser. theta is every
weight and bias, as in Lin (the regulariser's gradient is theta / C, eq. 1-2's first terms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.network import Sequential

LOSSES = {"ce": ops.softmax_cross_entropy, "squared": ops.squared_error}


def check(loss: str, C: float | None) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)} (softmax cross-entropy, Lin's squared loss), "
                         f"got {loss!r}")
    if C is not None and not C > 0:
        raise ValueError(f"C must be > 0 (the regulariser is ||theta||^2 / (2C)), got {C!r}")


def regulariser(params, C: float | None) -> jax.Array:
    """||theta||^2 / (2C), or 0 without C."""
    if C is None:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params)) / (2 * C)


def smoothed(labels: jax.Array, classes: int, epsilon: float) -> jax.Array:
    """Label smoothing's targets q = (1 - epsilon) onehot(y) + epsilon / K, rows [N, K]. The losses' hand
    gradients take target rows as they are: softmax cross-entropy's becomes (p - q) / N (Sadeghzadeh's p - y with
    y = q, since q sums to 1), the squared loss's 2 (z - q) / N."""
    return (1 - epsilon) * jax.nn.one_hot(labels, classes) + epsilon / classes


def cast(tree, dtype):
    """Every floating-point array of ``tree`` in ``dtype`` (None: unchanged). Its derivative casts the cotangent
    back, so gradients with respect to float32 master params come back in float32 (mixed precision)."""
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def objective(params, net: Sequential, x: jax.Array, labels: jax.Array, *, loss: str = "ce",
              C: float | None = None, grad: str = "hand", rule: str | None = None, label_smoothing: float = 0.0,
              compute_dtype=None, state: dict | None = None, axis_name: str | None = None,
              rng: jax.Array | None = None):
    """f(theta) on a batch (Lin eq. 1-2). Returns ``(f, aux)`` with ``aux = {"loss": the batch-mean data term,
    "correct": number of correctly classified examples, "finite": whether each layer's output is free of NaN and
    Inf}`` (for ``jax.value_and_grad(..., has_aux=True)``). ``label_smoothing`` epsilon > 0 trains on the targets
    of ``smoothed``. ``compute_dtype`` (e.g. bfloat16): the layers' forward and hand backward run in it on casts
    of ``params`` and ``x``, while the loss (the loss ops evaluate in float32), the regulariser and the gradients
    stay in the params' dtype (mixed precision). Batch norm runs in training mode (the batch's statistics, shared
    over the devices of ``axis_name``); given ``state``, ``aux["state"]`` holds it with the running averages
    updated. Dropout draws its masks from ``rng`` (see ``Sequential.forward``)."""
    check(loss, C)
    outputs, new_state = net.forward(cast(params, compute_dtype), cast(x, compute_dtype), grad=grad, rule=rule,
                                     state=state, train=True, axis_name=axis_name, rng=rng)
    logits = outputs[-1]
    targets = (smoothed(labels, logits.shape[-1], label_smoothing).astype(jnp.promote_types(logits.dtype, jnp.float32))
               if label_smoothing else labels)
    data_term = LOSSES[loss](logits, targets, grad=grad)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    finite = jnp.stack([jnp.all(jnp.isfinite(o)) for o in outputs])
    aux = {"loss": data_term, "correct": correct, "finite": finite}
    if state is not None:
        aux["state"] = new_state
    return data_term + regulariser(params, C), aux


def per_example_loss(logits: jax.Array, labels: jax.Array, loss: str = "ce") -> jax.Array:
    """xi_i for each example: the batch loss op applied to batches of one (for masked evaluation)."""
    return jax.vmap(lambda z, y: LOSSES[loss](z[None], y[None]))(logits, labels)
