"""Fully connected layer, Lin eq. (19)-(21) ("Fully-connected Layers").

The notes write one example as a column, ``s = W z + b`` with W [n_out, n_in]. We keep a batch of rows, ``s = z w +
b`` with ``w = W^T`` [n_in, n_out] as in JAX and Flax, so with Delta = dxi/ds [N, n_out]::

    dW = Delta z^T      eq. (19)     ours: dw = z^T Delta           (summed over the batch)
    db = Delta          eq. (20)     ours: db = Delta^T 1
    dz = W^T Delta      eq. (21)     ours: dz = Delta w^T
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.ops import _args, _tangent


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, grad: str = "hand") -> jax.Array:
    """Fully connected layer ``s = x @ w + b`` with hand backward Lin eq. (19)-(21).

    Args:
      x: [N, n_in].
      w: [n_in, n_out].
      b: optional [n_out].
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode; docs/formulas.md).

    Returns:
      [N, n_out].
    """
    x = _args.array("dense", "x", x, rank=2, layout="[N, n_in]")
    w = _args.array("dense", "w", w, rank=2, layout="[n_in, n_out]")
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"dense: size mismatch: x has n_in={x.shape[1]} (x.shape[1]) but w expects "
                         f"n_in={w.shape[0]} (w.shape[0])")
    if b is not None:
        b = _args.array("dense", "b", b, rank=1, layout="[n_out]")
        if b.shape[0] != w.shape[1]:
            raise ValueError(f"dense: b must have shape ({w.shape[1]},) to match w's n_out, got {tuple(b.shape)}")
    _args.same_dtype("dense", x=x, w=w, b=b)
    _args.choice("dense", "grad", grad, _args.GRAD_MODES)
    if grad == "autodiff":
        return forward(x, w, b)
    if grad == "tangent":
        return _tangent.call(dense_jvp, (x, w, b))
    return _dense_hand(x, w, b)


def dense_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of ``dense``: s = W z + b is bilinear, so ds = W dz + dW z + db (``dx @ w + x @ dw +
    db`` in our rows), simpleNN's R-op of a fully connected layer."""
    (x, w, b), (dx, dw, db) = _args.jvp_pairs("dense_jvp", primals, tangents, ("x", "w", "b"))
    s = dense(x, w, b, grad="autodiff")  # checks the arguments
    dx, dw, db = _args.tangents_match("dense_jvp", ("x", "w", "b"), (x, w, b), (dx, dw, db))
    terms = [t for t in (None if dx is None else jnp.matmul(dx, w), None if dw is None else jnp.matmul(x, dw),
                         None if db is None else jnp.broadcast_to(db, s.shape)) if t is not None]
    return s, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(s)


def forward(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    s = jnp.matmul(x, w)
    return s if b is None else s + b


@jax.custom_vjp
def _dense_hand(x, w, b):
    return forward(x, w, b)


def _dense_hand_fwd(x, w, b):
    return forward(x, w, b), (x, w, b)


def _dense_hand_bwd(res, delta):
    x, w, b = res
    dx = jnp.matmul(delta, w.T)  # eq. (21)
    dw = jnp.matmul(x.T, delta)  # eq. (19)
    db = None if b is None else delta.sum(axis=0)  # eq. (20)
    return dx, dw, db


_dense_hand.defvjp(_dense_hand_fwd, _dense_hand_bwd)
