r"""Fused convolution + ReLU + max pooling block: Lin's "summary of operations" as one custom VJP.

Forward (Lin eq. 3): S = W phi(pad(Z^m)) + b 1^T, Z^{m+1} = mat(P_pool vec(relu(S))).

A chain of separate ops must keep S (or relu's mask) at full conv-output size for the ReLU backward. Lin's
eq. (24) avoids it: a window's maximum is > 0 exactly when ReLU passed it, so the mask can be read from the
*pooled* output instead::

    dxi/dvec(S)^T = (dxi/dvec(Z^{m+1})^T (.) vec(I[Z^{m+1}])^T) P_pool     eq. (24), (26)
    dxi/dW        = Delta phi(pad(Z^m))^T                                 eq. (27)
    dxi/dvec(Z^m)^T = vec(W^T Delta)^T P_phi P_pad                        eq. (28)

So the block saves only its input Z^m, its output Z^{m+1} (which the next layer saves anyway) and P_pool as one
int8 index per output entry (and phi(pad(Z^m)) when ``store_phi``, as conv2d). Lin's last step,
Delta (.) I[Z^m], is the previous block's eq. (26) mask.
eq. (23) and eq. (24) agree: where the pooled value is 0 the window held no positive S, and every window entry
that P_pool did not select gets no gradient either way.
"""

from __future__ import annotations

from functools import partial

import jax

from jaxcnn.ops import _args, _tangent, conv, norm, winograd
from jaxcnn.ops._windows import Window
from jaxcnn.ops.activation import passed, relu_forward
from jaxcnn.ops.pool import max_forward, max_with_index, pick, route, route_by_offset


def conv_relu_pool(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple = 0,
    dilation: int | tuple[int, int] = 1,
    pool: int | tuple[int, int] = 2,
    grad: str = "hand",
    rule: str | None = None,
    store_phi: bool | None = None,
    block: int | str | None = None,
) -> jax.Array:
    """``max_pool2d(relu(conv2d(x, w, b)), pool)`` as one op whose hand backward is Lin eq. (24), (26)-(28).

    Args:
      x, w, b, stride, padding, dilation, rule, store_phi, block: as ``conv2d``.
      pool: max-pooling window, int or (ph, pw); its stride is the window (non-overlapping, as in Lin).
      grad: "hand" (fused rule, saves only Z^m, Z^{m+1} and P_pool), "autodiff" (JAX through the same chain) or
        "tangent" (eq. 24 applied to tangents as a custom JVP, for forward mode: jax.jvp; docs/formulas.md).

    Returns:
      Z^{m+1}, [N, Ho // ph, Wo // pw, C_out] where Ho, Wo are conv2d's output size.
    """
    op = "conv_relu_pool"
    x, w, b, window = conv.check(op, x, w, b, stride, padding, dilation)
    pool_window = pool_geometry(op, pool)
    conv.fits(op, "pool window", pool_window, window.out_hw(x.shape[1:3]), into="conv output")
    _args.choice(op, "grad", grad, _args.GRAD_MODES)
    rule, store_phi, block = conv.settle(op, x, w, window, rule, store_phi, block)
    if grad == "autodiff":
        return forward(window, pool_window, store_phi, x, w, b, block, rule)
    if grad == "tangent":
        return _tangent.call(conv_relu_pool_jvp, (x, w, b), stride=stride, padding=padding, dilation=dilation,
                             pool=pool, rule=rule, store_phi=store_phi, block=block)
    return _block_hand(rule, window, pool_window, store_phi, block, x, w, b)


def conv_relu_pool_jvp(primals: tuple, tangents: tuple, *, stride=1, padding=0, dilation=1, pool=2,
                       rule: str | None = None, store_phi: bool | None = None, block: int | str | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of the fused block, Lin eq. (24) applied to tangents::

        dS          = W phi(pad(dZ^m)) + dW phi(pad(Z^m)) + db 1^T      (conv2d_jvp)
        dZ^{m+1}    = I[Z^{m+1}] (.) mat(P_pool vec(dS))

    The ReLU mask is read from the pooled output, as in the VJP: the first maximum of a window passed the ReLU
    exactly when the window's output is > 0. Settings as ``conv_relu_pool``.
    """
    op = "conv_relu_pool_jvp"
    (x, w, b), (dx, dw, db) = _args.jvp_pairs(op, primals, tangents, ("x", "w", "b"))
    x, w, b, window = conv.check(op, x, w, b, stride, padding, dilation)
    pool_window = pool_geometry(op, pool)
    conv.fits(op, "pool window", pool_window, window.out_hw(x.shape[1:3]), into="conv output")
    rule, store_phi, block = conv.settle(op, x, w, window, rule, store_phi, block)
    dx, dw, db = _args.tangents_match(op, ("x", "w", "b"), (x, w, b), (dx, dw, db))
    s, ds = conv.tangent(rule, window, store_phi, x, w, b, dx, dw, db, block)
    z_next, index = max_with_index(pool_window, relu_forward(s))
    return z_next, passed(z_next) * pick(pool_window, index, ds)  # eq. (24): I[Z^{m+1}] (.) P_pool vec(dS)


def pool_geometry(op: str, pool) -> Window:
    """The block's max-pooling window: ``pool`` x ``pool`` with stride ``pool`` and no padding (Lin's
    non-overlapping pooling)."""
    size = _args.positive_pair(op, "pool", pool)
    return Window(size, size, (1, 1), ((0, 0), (0, 0)))


def forward(window: Window, pool_window: Window, store_phi: bool, x, w, b, block: int | None = None,
            rule: str | None = None) -> jax.Array:
    """The one forward pass, shared by both gradient modes: conv, then ReLU, then max pooling."""
    return _pooled(max_forward, window, pool_window, store_phi, x, w, b, block, rule)[0]


def _pooled(pool, window: Window, pool_window: Window, store_phi: bool, x, w, b, block, rule):
    """(``pool(pool_window, relu(S))``, phi(pad(Z)) if stored) with S by ``conv.forward``; with ``block`` conv,
    ReLU and pooling a block of examples at a time, so that S is never built for the whole batch."""
    if block is not None:
        def one_block(x):
            s = conv.literal(window, x, w, rule)
            return pool(pool_window, relu_forward(s if b is None else s + b))
        return conv.by_blocks(block, one_block, x), None
    s, phi = conv.forward(window, store_phi, x, w, b, None, rule)
    return pool(pool_window, relu_forward(s)), phi


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _block_hand(rule, window, pool_window, store_phi, block, x, w, b):
    return forward(window, pool_window, store_phi, x, w, b, block, rule)


def _block_hand_fwd(rule, window, pool_window, store_phi, block, x, w, b):
    (z_next, index), phi = _pooled(max_with_index, window, pool_window, store_phi, x, w, b, block, rule)
    return z_next, (x, w, b, z_next, index, phi)


def _block_hand_bwd(rule, window, pool_window, store_phi, block, res, delta):
    x, w, b, z_next, index, phi = res
    out_hw = window.out_hw(x.shape[1:3])

    def delta_of(delta, z_next, index):  # eq. (26): Delta (.) I[Z^{m+1}], then ... P_pool
        return route(pool_window, index, delta * passed(z_next), out_hw)

    # eq. (27), (28), (14) a block of examples at a time, with eq. (26) in each block for im2col. Winograd's Delta is
    # routed for the whole batch: per block XLA fused the mask and routing into each of its 16 transforms of Delta,
    # recomputing them (MNIST's step 1.07-1.19x slower; keeping the next block's Delta in the loop's carry, so that
    # it is built once, gained nothing). 2x2 windows are Winograd's output blocks: its dM is then built from the
    # pooled Delta (``dy``), and Delta is read by dZ alone (steps in blocks 0.83-0.94x the time of dM from Delta)
    if block is not None and rule == "im2col":
        dx, dw, db = conv.blocked_backward(rule, window, x, w, block, delta, z_next, index, delta_of=delta_of)
    elif rule == "winograd" and pool_window.size == (winograd.OUT, winograd.OUT):
        masked = delta * passed(z_next)
        full = route(pool_window, index, masked, out_hw)
        dy_of = partial(route_by_offset, pool_window)
        if block is None:
            dx, dw, db = conv.backward(rule, window, x, w, full, dy=dy_of(index, masked))
        else:
            dx, dw, db = conv.blocked_backward(rule, window, x, w, block, full, index, masked, dy_of=dy_of)
    else:
        dx, dw, db = conv.backward(rule, window, x, w, delta_of(delta, z_next, index), stored_phi=phi, block=block)
    return dx, dw, None if b is None else db


_block_hand.defvjp(_block_hand_fwd, _block_hand_bwd)


def conv_bn_relu(x: jax.Array, w: jax.Array, gamma: jax.Array, beta: jax.Array, *, stride=1, padding=0, dilation=1,
                 eps: float = 1e-5, axis_name: str | None = None, grad: str = "hand", rule: str | None = None,
                 block: int | str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``relu(batch_norm(conv2d(x, w), gamma, beta))`` in training mode as one op, in the spirit of Lin's block:
    its hand backward keeps only the block's input Z^m and output y (and per-channel statistics), where the chain
    keeps Z^m, x_hat (conv-output size, for batch norm) and y (for the ReLU):

        Delta_hat = Delta (.) I[y > 0]                          the ReLU mask, read from the output (Lin eq. 24)
        S = W phi(pad(Z^m)), x_hat = (S - mu) / sigma           recomputed from Z^m: one convolution
        dS = (1/sigma) (g - mean(g) - x_hat mean(g x_hat)),  g = gamma Delta_hat    batch norm's compact form
        dW, dZ^m from dS                                        eq. (12), (18) or the flip rule, as conv2d

    It trades one convolution in the backward for a conv-output-sized array less in memory. The conv has no bias
    (batch norm subtracts it again). Returns ``(y, mean, var)`` as ``batch_norm`` (the batch's statistics, for the
    running averages). Arguments as ``conv2d`` and ``batch_norm``; ``grad``: "hand" or "autodiff" (the chain);
    ``block``: both convolutions (S, and S recomputed) and eq. (12), (18) with phi(pad(Z)) (or Winograd's tiles)
    built ``block`` examples at a time, as ``conv2d``'s. phi(pad(Z)) is never stored: the block keeps only its
    input and output.
    """
    op = "conv_bn_relu"
    x, w, _, window = conv.check(op, x, w, None, stride, padding, dilation)
    c = w.shape[-1]
    gamma = _args.array(op, "gamma", gamma, rank=1, layout="[C_out]")
    beta = _args.array(op, "beta", beta, rank=1, layout="[C_out]")
    if gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError(f"{op}: gamma and beta must have shape ({c},), one entry per output channel, got "
                         f"{tuple(gamma.shape)} and {tuple(beta.shape)}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"{op}: eps must be a number > 0, got {eps!r}")
    _args.choice(op, "grad", grad, ("hand", "autodiff"))
    rule, _, block = conv.settle(op, x, w, window, rule, False, block)
    if grad == "autodiff":
        return _bn_relu_forward(conv.forward(window, False, x, w, None, block, rule)[0], gamma, beta, float(eps),
                                axis_name)
    return _conv_bn_relu_hand(rule, window, float(eps), axis_name, block, x, w, gamma, beta)


def _bn_relu_forward(s, gamma, beta, eps, axis_name):
    y, mean, var = norm.batch_norm(s, gamma, beta, eps=eps, axis_name=axis_name, grad="autodiff")
    return relu_forward(y), mean, var


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _conv_bn_relu_hand(rule, window, eps, axis_name, block, x, w, gamma, beta):
    return _bn_relu_forward(conv.forward(window, False, x, w, None, block, rule)[0], gamma, beta, eps, axis_name)


def _conv_bn_relu_fwd(rule, window, eps, axis_name, block, x, w, gamma, beta):
    y, mean, var = _bn_relu_forward(conv.forward(window, False, x, w, None, block, rule)[0], gamma, beta, eps,
                                    axis_name)
    return (y, mean, var), (x, w, gamma, beta, y)


def _conv_bn_relu_bwd(rule, window, eps, axis_name, block, res, cotangents):
    x, w, gamma, beta, y = res
    delta, dmean, dvar = cotangents
    # recomputed: S (and so x_hat) is not stored. The barrier keeps XLA from merging this convolution with the
    # forward pass's (common subexpressions), which would keep S alive from the forward pass after all.
    s = conv.forward(window, False, *jax.lax.optimization_barrier((x, w)), None, block, rule)[0]
    delta = delta * passed(y)  # the ReLU mask from the output
    _, pullback = jax.vjp(lambda s, g, b: norm.batch_norm(s, g, b, eps=eps, axis_name=axis_name), s, gamma, beta)
    ds, dgamma, dbeta = pullback((delta, dmean, dvar))  # batch norm's hand rule (the compact form)
    dx, dw, _ = conv.backward(rule, window, x, w, ds, block=block)
    return dx, dw, dgamma, dbeta


_conv_bn_relu_hand.defvjp(_conv_bn_relu_fwd, _conv_bn_relu_bwd)
