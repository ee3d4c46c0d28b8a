"""Losses xi(z; y) averaged over the batch, with hand-derived gradients (the first Delta of the backward pass).

    squared_error          xi = ||z - y||^2            dxi/dz = 2 (z - y)          (Lin, "Fully-connected Layers III")
    softmax_cross_entropy  xi = -sum_j y_j log p_j     dxi/dz = p sum_j y_j - y    (Sadeghzadeh: p - y for one-hot y)
                           p = softmax(z)

Both return the mean over the batch, (1/N) sum_i xi_i (the data term of Lin eq. 1), so their gradients carry 1/N.
``squared_error_gn`` and ``softmax_cross_entropy_gn`` multiply by one example's Hessian B = d^2 xi / dz^2, the middle
factor of the Gauss-Newton matrix J^T B J (simpleNN's Newton method).
Targets ``y`` may be integer class labels [N] (turned into one-hot rows) or float rows [N, K]. Half-precision
inputs are evaluated in float32 and the loss is returned in float32; gradients come back in the input dtypes.

Integer labels outside [0, K): a call with concrete labels raises ValueError. Under ``jit`` or ``vmap`` the labels
are traced and nothing can raise, so such a row's one-hot target is NaN: the loss and every gradient come out NaN
(never a silent 0), and ``jaxcnn train`` stops on it (``--on-nan``). Check labels before tracing to get the error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.ops import _args, _tangent


def squared_error(z: jax.Array, y: jax.Array, *, grad: str = "hand") -> jax.Array:
    """Mean over the batch of ||z - y||^2 (Lin's squared loss); hand gradient 2 (z - y) / N.

    Args:
      z: network outputs, [N, K].
      y: targets: int labels [N] (compared with one-hot rows) or floats [N, K].
      grad: "hand", "autodiff" or "tangent" (the hand gradient as the slope of a custom JVP, for forward mode).
    """
    z, y = _inputs("squared_error", ("z", z), ("y", y), grad)
    if grad == "tangent":
        return _tangent.call(squared_error_jvp, (z, y))
    return squared_error_forward(z, y) if grad == "autodiff" else _squared_error(z, y)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, grad: str = "hand") -> jax.Array:
    """Mean over the batch of -sum_j y_j log softmax(z)_j, with log softmax computed after subtracting each row's
    maximum (accurate at any logit scale); hand gradient (softmax(z) sum_j y_j - y) / N, i.e. (softmax(z) - y) / N
    for one-hot or probability rows (Sadeghzadeh).

    Args:
      logits: z, [N, K].
      labels: int labels [N] in [0, K) (out of range: ValueError, or NaN when traced; see the module docstring),
        or one-hot / probability rows [N, K].
      grad: "hand", "autodiff" or "tangent" (the hand gradient as the slope of a custom JVP, for forward mode).
    """
    z, y = _inputs("softmax_cross_entropy", ("logits", logits), ("labels", labels), grad)
    if grad == "tangent":
        return _tangent.call(softmax_cross_entropy_jvp, (z, y))
    return cross_entropy_forward(z, y) if grad == "autodiff" else _cross_entropy(z, y)


def squared_error_gn(z: jax.Array, u: jax.Array) -> jax.Array:
    """B u, row by row, for the Gauss-Newton matrix J^T B J: B = d^2 xi / dz^2 = 2I for one example's
    xi = ||z - y||^2 (Lin; simpleNN's ``BJv = 2*Jv``). ``z``, ``u``: [N, K]."""
    return 2 * jnp.asarray(u)


def softmax_cross_entropy_gn(z: jax.Array, u: jax.Array) -> jax.Array:
    """B u, row by row, for one example's xi = -sum_j y_j log p_j: B = d^2 xi / dz^2 = diag(p) - p p^T with
    p = softmax(z) (for one-hot or probability rows y; the Jacobian of p - y, Sadeghzadeh). ``z``, ``u``: [N, K]."""
    ct = _args.compute_dtype(z, u)
    p, u32 = softmax(jnp.asarray(z).astype(ct)), jnp.asarray(u).astype(ct)
    return (p * u32 - p * jnp.sum(p * u32, axis=-1, keepdims=True)).astype(jnp.result_type(u))


def _inputs(op: str, z_arg, y_arg, grad: str) -> tuple[jax.Array, jax.Array]:
    """Check the outputs [N, K] and targets; integer labels become one-hot rows (no gradient flows to them)."""
    (z_name, z), (y_name, y) = z_arg, y_arg
    _args.choice(op, "grad", grad, _args.GRAD_MODES)
    z = _args.array(op, z_name, z, rank=2, layout="[N, K]")
    if op == "softmax_cross_entropy":
        _args.nonempty(op, z_name, z, {0: "N", 1: "K"}, "the loss is a mean over the batch's N rows of a softmax "
                                                        "over K classes")
    else:
        _args.nonempty(op, z_name, z, {0: "N"}, "the loss is a mean over the batch's N rows")
    n, k = z.shape
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.integer):
        if y.shape != (n,):
            raise ValueError(f"{op}: integer {y_name} must have shape ({n},) to match {z_name} [N={n}, K={k}], "
                             f"got {tuple(y.shape)}")
        if not isinstance(y, jax.core.Tracer):  # concrete labels (even inside jit): check on host
            values = np.asarray(y)
            if values.size and (values.min() < 0 or values.max() >= k):
                raise ValueError(f"{op}: {y_name} must lie in [0, {k}) for K={k} classes, got values from "
                                 f"{values.min()} to {values.max()}")
            return z, jax.nn.one_hot(y, k, dtype=z.dtype)
        # Traced labels cannot raise: a row whose label is outside [0, K) becomes NaN, which poisons the loss and
        # every gradient (one_hot alone would give it an all-zero row: loss 0, gradient 0, silently).
        valid = (y >= 0) & (y < k)
        return z, jnp.where(valid[:, None], jax.nn.one_hot(y, k, dtype=z.dtype), jnp.nan)
    y = _args.array(op, y_name, y)
    if y.shape != z.shape:
        raise ValueError(f"{op}: float {y_name} must have the shape of {z_name} {tuple(z.shape)}, "
                         f"got {tuple(y.shape)}")
    return z, y


def squared_error_forward(z: jax.Array, y: jax.Array) -> jax.Array:
    ct = _args.compute_dtype(z, y)
    r = z.astype(ct) - y.astype(ct)
    return jnp.sum(r * r) / z.shape[0]


def log_softmax(z: jax.Array) -> jax.Array:
    """log p = (z - max z) - log sum_j exp(z_j - max z), row by row.

    The shift by the row's maximum is exact (in any dtype) and leaves p unchanged; without it, z - logsumexp(z)
    rounds logsumexp(z) at z's magnitude (in float32 at 1e6 to 1/16) and loses log p's digits. The maximum gets no
    gradient: log p does not depend on the shift.
    """
    shifted = z - lax.stop_gradient(z.max(axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def softmax(z: jax.Array) -> jax.Array:
    """p = exp(z - max z) / sum_j exp(z_j - max z), normalised by its own sum (exp(log p) is not, to rounding).
    The shift gets no gradient, as in ``log_softmax``."""
    e = jnp.exp(z - lax.stop_gradient(z.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy_forward(z: jax.Array, y: jax.Array) -> jax.Array:
    """-(1/N) sum_ij y_ij log p_ij, with 0 log 0 = 0: a class masked out by a logit of -inf (p = 0) that is not a
    target (y = 0) adds nothing, where the plain product 0 * -inf would make the loss NaN. (Differentiated by JAX,
    such an entry's gradient in y is then 0; the hand rule's is -log p / N = +inf, the derivative.)"""
    ct = _args.compute_dtype(z, y)
    y, log_p = y.astype(ct), log_softmax(z.astype(ct))
    return -jnp.sum(y * jnp.where((y == 0) & (log_p == -jnp.inf), 0, log_p)) / z.shape[0]


@jax.custom_vjp
def _squared_error(z, y):
    return squared_error_forward(z, y)


def _squared_error_fwd(z, y):
    return squared_error_forward(z, y), (z, y)


def _squared_error_bwd(res, g):
    z, y = res
    ct = _args.compute_dtype(z, y)
    dz = g * 2 * (z.astype(ct) - y.astype(ct)) / z.shape[0]
    return dz.astype(z.dtype), (-dz).astype(y.dtype)


_squared_error.defvjp(_squared_error_fwd, _squared_error_bwd)


@jax.custom_vjp
def _cross_entropy(z, y):
    return cross_entropy_forward(z, y)


def _cross_entropy_fwd(z, y):
    return cross_entropy_forward(z, y), (z, y)


def _cross_entropy_bwd(res, g):
    z, y = res
    ct = _args.compute_dtype(z, y)
    z32, y32 = z.astype(ct), y.astype(ct)
    scale = g / z.shape[0]
    dz = scale * (softmax(z32) * y32.sum(axis=-1, keepdims=True) - y32)
    dy = -scale * log_softmax(z32)
    return dz.astype(z.dtype), dy.astype(y.dtype)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _loss_jvp(name: str, forward, backward):
    def rule(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        (z, y), (dz, dy) = _args.jvp_pairs(name, primals, tangents, ("z", "y"))
        loss = forward(z, y)
        slopes = backward((z, y), jnp.ones((), loss.dtype))  # the hand gradient: d loss = <dloss/dz, dz> + ...
        terms = [jnp.vdot(s.astype(loss.dtype), t.astype(loss.dtype)) for s, t in zip(slopes, (dz, dy))
                 if t is not None]
        return loss, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(loss)

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = (f"The tangent rule of ``{name[:-4]}``: ``(loss, <dloss/dz, dz> + <dloss/dy, dy>)`` with the hand "
                    f"gradient as slopes; ``primals = (z, y)`` with y float rows (``grad='tangent'`` uses it).")
    return rule


squared_error_jvp = _loss_jvp("squared_error_jvp", squared_error_forward, _squared_error_bwd)
softmax_cross_entropy_jvp = _loss_jvp("softmax_cross_entropy_jvp", cross_entropy_forward, _cross_entropy_bwd)
