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

The forward pass does not depend on v. Conjugate gradient multiplies by the same G many times, so, as simpleNN
does, ``forward`` can run it once and store it (``Forward``: the input and every conv / dense output, the cheap
layers between them recomputed); ``gauss_newton_product`` given a ``Forward`` then costs one tangent pass and one
backward pass, at the price of memory linear in |S|.
"""

from __future__ import annotations

from typing import NamedTuple

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


def _map(f, xs):
    """``lax.map`` over segments, a plain call when there is one (XLA's CPU backend runs some convolutions, the
    flip rule's dW among them, ~20x slower inside a loop: jax-ml/jax#12868)."""
    if jax.tree_util.tree_leaves(xs)[0].shape[0] == 1:
        return jax.tree_util.tree_map(lambda a: a[None], f(jax.tree_util.tree_map(lambda a: a[0], xs)))
    return lax.map(f, xs)


def layer_jvp(layer: nw.Layer, p: dict, x: jax.Array, dp: dict, dx: jax.Array | None, *, grad: str = "hand",
              rule: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer's output and its tangent for parameter tangents ``dp`` and input tangent ``dx`` (None: zero),
    by the layer's hand tangent rule (or ``jax.jvp`` of its autodiff forward, see the module docstring)."""
    if (getattr(layer, "grad", None) or grad) == "autodiff" or isinstance(layer, nw.Custom):
        def f(p, x):
            return layer.apply(p, x, grad="autodiff", rule=rule)

        dx = jnp.zeros_like(x) if dx is None else dx
        return jax.jvp(f, (p, x), ({k: dp[k] for k in p}, dx))
    if isinstance(layer, (nw.Flatten, nw.Dropout)):  # dropout: the identity of evaluation
        y = layer.apply(p, x, grad=grad, rule=rule)
        return y, jnp.zeros_like(y) if dx is None else dx.reshape(y.shape)
    if isinstance(layer, nw.Residual):  # d(body(x) + shortcut(x)) = J_body dx + J_shortcut dx, both by hand rules
        h, dh = _chain_jvp(layer.body, p, x, dp, dx, grad, rule)
        proj = layer.shortcut(tuple(x.shape[1:]))
        skip, dskip = (x, dx) if proj is None else layer_jvp(proj, p["proj"], x, dp["proj"], dx, grad=grad, rule=rule)
        return h + skip, dh if dskip is None else dh + dskip  # every layer's rule returns a tangent, never None
    names = ("w", "b") if "b" in p else ("w",)  # conv and dense parameters, in the ops' argument order
    if isinstance(layer, nw.Conv):
        primals, tangents = (x, *(p[k] for k in names)), (dx, *(dp.get(k) for k in names))
        settings = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                        rule=layer.rule or rule, store_phi=layer.store_phi, block=layer.block)
        if isinstance(layer, nw.ConvReLUPool):
            return ops.conv_relu_pool_jvp(primals, tangents, pool=layer.pool, **settings)
        return ops.conv2d_jvp(primals, tangents, **settings)
    if isinstance(layer, nw.Dense):
        return ops.dense_jvp((x, *(p[k] for k in names)), (dx, *(dp.get(k) for k in names)))
    if isinstance(layer, nw.MaxPool):  # AvgPool too
        rule_of = ops.avg_pool2d_jvp if isinstance(layer, nw.AvgPool) else ops.max_pool2d_jvp
        return rule_of((x,), (dx,), layer.window, layer.stride, layer.padding)
    return ops.JVP[type(layer).op]((x,), (dx,), **layer.settings())  # activations, global pooling, softmax


def check_stateless(net: nw.Sequential) -> None:
    """Second order here is for networks without state: with batch norm, one example's output depends on the
    rest of its batch, so J_i (and simpleNN's Gauss-Newton matrix, a sum over examples) is not defined."""
    if net.stateful:
        raise ValueError(f"{net.name} has batch norm: Jacobian products and the Gauss-Newton matrix (and the newton "
                         f"optimizer) need a network whose outputs are per example; use a first-order optimizer")


def check_direction(op: str, params: dict, v: dict) -> None:
    """``v`` is a direction in parameter space: a pytree of ``params``' structure with arrays of the same shapes
    (else ValueError naming the first entry that differs)."""
    entries = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    want, got = entries(params), entries(v)
    for path in [*want, *got]:
        where = jax.tree_util.keystr(path)
        if path not in got or path not in want:
            raise ValueError(f"{op}: v must have the structure of params (one array per parameter), but only "
                             f"{'params' if path in want else 'v'} has an entry {where}")
        if jnp.shape(got[path]) != jnp.shape(want[path]):
            raise ValueError(f"{op}: v{where} must have the shape of params{where} {tuple(jnp.shape(want[path]))}, "
                             f"got {tuple(jnp.shape(got[path]))}")


def jvp(net: nw.Sequential, params: dict, x: jax.Array, v: dict, *, grad: str = "hand",
        rule: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(z, J v)``: the network's output for a batch ``x`` and its tangent for a parameter direction ``v`` (a
    pytree like ``params``), the input held fixed. ``grad="hand"``: every layer's hand tangent rule, layer by
    layer (simpleNN's R-op); ``grad="autodiff"``: ``jax.jvp`` of the autodiff network."""
    check_stateless(net)
    check_direction("jvp", params, v)
    if grad == "autodiff":
        return jax.jvp(lambda p: net.apply(p, x, grad="autodiff", rule=rule), (params,), (v,))
    return _chain_jvp(net, params, x, v, None, grad, rule)


def _chain_jvp(net: nw.Sequential, params: dict, x: jax.Array, v: dict, dx: jax.Array | None, grad: str,
               rule: str | None) -> tuple[jax.Array, jax.Array]:
    """The layers of ``net`` one after the other, each by ``layer_jvp``, from input tangent ``dx``."""
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


class Forward(NamedTuple):
    """A subsample's forward pass, stored in segments for repeated Gauss-Newton products (``forward``)."""

    stored: tuple  # per layer: its output [segments, size, ...] if kept, else None (recomputed); then the input
    mask: jax.Array  # [segments, size]: True for a real example, False for the last segment's padding
    count: int  # |S|, the real examples


def _kept(layer: nw.Layer) -> bool:
    """Whether ``forward`` stores a layer's output: the costly ones (conv, dense, user layers); activations,
    pooling and flattening are recomputed from their input in each product."""
    return not isinstance(layer, (nw.MaxPool, nw._Activation, nw.Flatten))


def _segment_size(name: str, batch_size, count: int) -> int:
    if count == 0:
        raise ValueError(f"{name}: x has no examples (N=0); the Gauss-Newton matrix is a mean over them")
    size = count if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}: batch_size must be a positive int, got {batch_size!r}")
    return min(size, count)


def _outputs(net: nw.Sequential, params: dict, x: jax.Array, grad: str, rule: str | None) -> tuple:
    outs = net.outputs(params, x, grad=grad, rule=rule)
    return (*(o if _kept(layer) else None for o, layer in zip(outs, net.layers)), x)


def forward(net: nw.Sequential, params: dict, x: jax.Array, *, batch_size: int | None = None, grad: str = "hand",
            rule: str | None = None) -> Forward:
    """The forward pass over the subsample ``x`` in segments of ``batch_size`` (default: one), kept for
    ``gauss_newton_product`` (simpleNN stores it once per Newton iteration for all CG steps). Memory: the input
    and the output of every conv / dense layer, for all of ``x``."""
    check_stateless(net)
    size = _segment_size("forward", batch_size, x.shape[0])
    (xs,), mask = segments(size, x)
    return Forward(_map(lambda seg: _outputs(net, params, seg, grad, rule), xs), mask, x.shape[0])


def _check_forward(net: nw.Sequential, stored: Forward) -> None:
    """A stored forward pass must be this network's: one entry per layer and the input, outputs kept for exactly
    the layers ``forward`` keeps, each of the shape this network gives it (parameters cannot be told apart: the
    caller keeps them the same)."""
    *outputs, x = stored.stored
    if len(outputs) != len(net.layers):
        raise ValueError(f"gauss_newton_product: x is the stored forward pass of a network of {len(outputs)} layers, "
                         f"but {net.name} has {len(net.layers)}; run forward(net, params, x) with this network")
    shapes = net.shapes(tuple(x.shape[2:]))
    for i, (layer, out, shape) in enumerate(zip(net.layers, outputs, shapes)):
        if (out is None) == _kept(layer) or (out is not None and tuple(out.shape[2:]) != tuple(shape)):
            raise ValueError(f"gauss_newton_product: x is the stored forward pass of another network: layer {i} "
                             f"({nw.describe(layer)}) of {net.name} does not match what it stored; run "
                             f"forward(net, params, x) with this network")


def _segment_product(net: nw.Sequential, params: dict, stored: tuple, mask: jax.Array, v: dict, loss: str,
                     grad: str, rule: str | None) -> dict:
    """sum_i J_i^T B_i J_i v over one segment from its stored forward pass: each layer's input is the stored
    output before it, or recomputed from its own input (cheap layers); the layers' forward products are unused
    and compiled away, leaving the tangent rules (J v) and the hand VJPs (J^T u)."""
    inputs, h = [], stored[-1]
    for name, layer, out in zip(net.names, net.layers, stored[:-1]):
        inputs.append(h)
        h = layer.apply(params[name] if name else {}, h, grad=grad, rule=rule) if out is None else out
    dx = None
    for name, layer, x in zip(net.names, net.layers, inputs):
        _, dx = layer_jvp(layer, params[name] if name else {}, x, v[name] if name else {}, dx, grad=grad, rule=rule)
    u = GN[loss](h, dx) * mask[:, None].astype(h.dtype)
    total = {}
    for i in reversed(range(len(net.layers))):
        name, layer, x = net.names[i], net.layers[i], inputs[i]
        p = params[name] if name else {}

        def f(p, x, layer=layer):
            return layer.apply(p, x, grad=grad, rule=rule)

        if i == 0:  # the input's cotangent is not needed
            (dp,) = jax.vjp(lambda p, x=x: f(p, x), p)[1](u)
        else:
            dp, u = jax.vjp(f, p, x)[1](u)
        if name:
            total[name] = dp
    return total


def gauss_newton_product(net: nw.Sequential, params: dict, x: jax.Array | Forward, v: dict, *, loss: str = "squared",
                         C: float | None = None, damping: float | jax.Array = 0.0, batch_size: int | None = None,
                         grad: str = "hand", rule: str | None = None, axis_name: str | None = None) -> dict:
    """simpleNN's ``G v = (lambda + 1/C) v + (1/|S|) sum_{i in S} J_i^T B_i J_i v`` over the examples ``x`` (the
    subsample S), in segments of ``batch_size`` (default: all at once). ``C=None``: no regulariser (1/C = 0).
    ``damping`` is lambda, Levenberg-Marquardt's. Inside ``shard_map`` pass the mesh axis as ``axis_name``: each
    device then holds its share of S and the segment sums are added across devices (``psum``).

    ``x`` may instead be S's stored forward pass, ``forward(net, params, S, batch_size=...)`` at the same params
    (its segments are used; ``batch_size`` is ignored): each product then skips the forward pass.

    The labels are not needed: B depends on the outputs only, for both losses.
    """
    check_objective(loss, C)
    check_stateless(net)
    check_direction("gauss_newton_product", params, v)
    if isinstance(damping, (int, float)) and not damping >= 0:  # a traced damping (inside jit) is the caller's
        raise ValueError(f"gauss_newton_product: damping (Levenberg-Marquardt's lambda) must be a number >= 0, got "
                         f"{damping!r}")
    if isinstance(x, Forward):
        _check_forward(net, x)
        parts = _map(lambda seg: _segment_product(net, params, *seg, v, loss, grad, rule), (x.stored, x.mask))
        count, dtype = x.count, x.stored[-1].dtype
    else:
        size = _segment_size("gauss_newton_product", batch_size, x.shape[0])
        (xs,), mask = segments(size, x)
        parts = _map(lambda seg: _segment_product(net, params, _outputs(net, params, seg[0], grad, rule), seg[1], v,
                                                  loss, grad, rule), (xs, mask))
        count, dtype = x.shape[0], x.dtype
    total = jax.tree_util.tree_map(lambda a: a.sum(axis=0), parts)
    examples = jnp.asarray(count, dtype)
    if axis_name is not None:
        total, examples = lax.psum((total, examples), axis_name)
    reg = damping + (0.0 if C is None else 1.0 / C)
    return jax.tree_util.tree_map(lambda t, vi: (reg * vi + t / examples).astype(vi.dtype), total, v)
