r"""Second order on the hand rules: the network's J v (R-op), J^T u, and simpleNN's Gauss-Newton product.

For a network z = F(theta; x) and Lin's objective f(theta) = ||theta||^2 / (2C) + (1/l) sum_i xi(z_i) (eq. 1-2),
simpleNN's Newton method needs products with the Gauss-Newton matrix over a subsample S of the training set::

    G v = (lambda + 1/C) v + (1/|S|) sum_{i in S} J_i^T B_i J_i v          J_i = dz_i / dtheta,  B_i = d^2 xi / dz_i^2

Every factor is a hand rule of the notes:

- ``J v``: forward through every layer's tangent rule (``jaxcnn.ops.JVP``: dS = W phi(pad(dZ)) + dW phi(pad(Z)) +
  db 1^T for a convolution, P_pool vec(dZ) for max pooling, I[S > 0] (.) dS for ReLU, ...), simpleNN's ``Jv.m``;
- ``B u``: ``squared_error_gn`` (2I) or ``softmax_cross_entropy_gn`` (diag(p) - p p^T);
- ``J^T u``: the hand VJPs (the same custom VJPs ``jax.grad`` runs), simpleNN's ``JTv.m``.

No ``jax.jvp`` runs on a hand op (JAX cannot, see docs/formulas.md, "Higher order"). A layer that asks for
``grad="autodiff"``, and a user layer (``jc.Custom``, which has no tangent rule of its own), are differentiated by
``jax.jvp`` of its autodiff forward instead.

The subsample is processed in segments of ``batch_size`` examples, one after another (``lax.map``), so the memory
is that of one segment however large S is; S need not be a multiple of the segment (the last is padded with
examples of weight 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn import network as nw
from jaxcnn import ops
from jaxcnn.objective import check as check_objective

GN = {"ce": ops.softmax_cross_entropy_gn, "squared": ops.squared_error_gn}  # B u per loss


def segments(size: int, *arrays: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Arrays of equal length N as [ceil(N / size), size, ...], the last segment padded with zeros, and the mask
    [segments, size] of the real (unpadded) examples."""
    count = arrays[0].shape[0]
    total = -(-count // size) * size
    padded = tuple(jnp.concatenate([a, jnp.zeros((total - count, *a.shape[1:]), a.dtype)]).reshape(
        total // size, size, *a.shape[1:]) for a in arrays)
    return padded, (jnp.arange(total) < count).reshape(total // size, size)


def layer_jvp(layer: nw.Layer, p: dict, x: jax.Array, dp: dict, dx: jax.Array | None, *, grad: str = "hand",
              rule: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer's output and its tangent for parameter tangents ``dp`` and input tangent ``dx`` (None: zero),
    by the layer's hand tangent rule (or ``jax.jvp`` of its autodiff forward, see the module docstring)."""
    if (getattr(layer, "grad", None) or grad) == "autodiff" or isinstance(layer, nw.Custom):
        def f(p, x):
            return layer.apply(p, x, grad="autodiff", rule=rule)

        dx = jnp.zeros_like(x) if dx is None else dx
        return jax.jvp(f, (p, x), ({k: dp[k] for k in p}, dx))
    if isinstance(layer, nw.Flatten):
        y = layer.apply(p, x, grad=grad, rule=rule)
        return y, jnp.zeros_like(y) if dx is None else dx.reshape(y.shape)
    names = ("w", "b") if "b" in p else ("w",)  # conv and dense parameters, in the ops' argument order
    if isinstance(layer, nw.Conv):
        primals, tangents = (x, *(p[k] for k in names)), (dx, *(dp.get(k) for k in names))
        settings = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                        rule=layer.rule or rule, store_phi=layer.store_phi)
        if isinstance(layer, nw.ConvReLUPool):
            return ops.conv_relu_pool_jvp(primals, tangents, pool=layer.pool, **settings)
        return ops.conv2d_jvp(primals, tangents, **settings)
    if isinstance(layer, nw.Dense):
        return ops.dense_jvp((x, *(p[k] for k in names)), (dx, *(dp.get(k) for k in names)))
    if isinstance(layer, nw.MaxPool):  # AvgPool too
        rule_of = ops.avg_pool2d_jvp if isinstance(layer, nw.AvgPool) else ops.max_pool2d_jvp
        return rule_of((x,), (dx,), layer.window, layer.stride, layer.padding)
    return ops.JVP[type(layer).op]((x,), (dx,))  # activations


def jvp(net: nw.Sequential, params: dict, x: jax.Array, v: dict, *, grad: str = "hand",
        rule: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(z, J v)``: the network's output for a batch ``x`` and its tangent for a parameter direction ``v`` (a
    pytree like ``params``), the input held fixed. ``grad="hand"``: every layer's hand tangent rule, layer by
    layer (simpleNN's R-op); ``grad="autodiff"``: ``jax.jvp`` of the autodiff network."""
    if grad == "autodiff":
        return jax.jvp(lambda p: net.apply(p, x, grad="autodiff", rule=rule), (params,), (v,))
    dx = None
    for name, layer in zip(net.names, net.layers):
        p, dp = (params[name], v[name]) if name else ({}, {})
        x, dx = layer_jvp(layer, p, x, dp, dx, grad=grad, rule=rule)
    return x, dx


def vjp(net: nw.Sequential, params: dict, x: jax.Array, u: jax.Array, *, grad: str = "hand",
        rule: str | None = None) -> dict:
    """``J^T u``: the parameter cotangent of an output cotangent ``u`` [N, K], by the hand VJPs (``grad="hand"``)
    or autodiff."""
    z, pullback = jax.vjp(lambda p: net.apply(p, x, grad=grad, rule=rule), params)
    return pullback(jnp.asarray(u, z.dtype))[0]


def gauss_newton_product(net: nw.Sequential, params: dict, x: jax.Array, v: dict, *, loss: str = "squared",
                         C: float | None = None, damping: float | jax.Array = 0.0, batch_size: int | None = None,
                         grad: str = "hand", rule: str | None = None, axis_name: str | None = None) -> dict:
    """simpleNN's ``G v = (lambda + 1/C) v + (1/|S|) sum_{i in S} J_i^T B_i J_i v`` over the examples ``x`` (the
    subsample S), in segments of ``batch_size`` (default: all at once). ``C=None``: no regulariser (1/C = 0).
    ``damping`` is lambda, Levenberg-Marquardt's. Inside ``shard_map`` pass the mesh axis as ``axis_name``: each
    device then holds its share of S and the segment sums are added across devices (``psum``).

    The labels are not needed: B depends on the outputs only, for both losses.
    """
    check_objective(loss, C)
    count = x.shape[0]
    size = count if batch_size is None else min(batch_size, count)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"gauss_newton_product: batch_size must be a positive int, got {batch_size!r}")
    (xs,), mask = segments(size, x)

    def segment(args):
        x_seg, m_seg = args
        z, jv = jvp(net, params, x_seg, v, grad=grad, rule=rule)
        return vjp(net, params, x_seg, GN[loss](z, jv) * m_seg[:, None], grad=grad, rule=rule)

    parts = lax.map(segment, (xs, mask))
    total = jax.tree_util.tree_map(lambda a: a.sum(axis=0), parts)
    examples = jnp.asarray(count, x.dtype)
    if axis_name is not None:
        total, examples = lax.psum((total, examples), axis_name)
    reg = damping + (0.0 if C is None else 1.0 / C)
    return jax.tree_util.tree_map(lambda t, vi: (reg * vi + t / examples).astype(vi.dtype), total, v)
