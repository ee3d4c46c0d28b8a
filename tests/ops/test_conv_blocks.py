"""The im2col rule block by block (``block=``): the same function, gradients and tangents as the whole batch at
once, in a fraction of the memory; its arguments checked."""

from functools import partial

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn import network as nw
from jaxcnn.ops import conv
from tests.helpers import assert_close, normal

GEOMETRY = dict(stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2))


def inputs(dtype, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return normal(rng, (n, 9, 8, 3), dtype), normal(rng, (3, 3, 3, 4), dtype), normal(rng, (4,), dtype)


def test_finite_differences_float64():
    x, w, b = inputs(jnp.float64)
    check_grads(jax.jit(lambda x, w, b: jc.conv2d(x, w, b, block=2, **GEOMETRY)), (x, w, b), order=1, modes=["rev"])
    check_grads(jax.jit(lambda x, w, b: jc.conv_relu_pool(x, w, b, block=3, padding=1)), (x, w, b), order=1,
                modes=["rev"])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_tangent_rule_in_blocks_equals_autodiffs_jvp(dtype):
    x, w, b = inputs(dtype, seed=1)
    dx, dw, db = inputs(dtype, seed=2)
    autodiff_jvp = jax.jit(lambda t: jax.jvp(lambda *a: jc.conv2d(*a, grad="autodiff", **GEOMETRY), (x, w, b), t))
    ref = autodiff_jvp((dx, dw, db))
    for tangents in ((dx, dw, db), (None, dw, None), (dx, None, db)):
        s, ds = jax.jit(lambda t: conv.conv2d_jvp((x, w, b), t, block=3, **GEOMETRY))(tangents)
        want = autodiff_jvp(tuple(jnp.zeros_like(p) if t is None else t for p, t in zip((x, w, b), tangents)))[1]
        assert_close(s, ref[0], dtype, "S in blocks")
        assert_close(ds, want, dtype, f"dS in blocks, tangents {[t is not None for t in tangents]}")
    y, dy = jax.jit(lambda: jax.jvp(lambda *a: jc.conv_relu_pool(*a, padding=1, grad="tangent", block=2), (x, w, b),
                                    (dx, dw, db)))()
    y_ref, dy_ref = jax.jit(lambda: jax.jvp(lambda *a: jc.conv_relu_pool(*a, padding=1, grad="autodiff"), (x, w, b),
                                            (dx, dw, db)))()
    assert_close(y, y_ref, dtype, "fused block in blocks")
    assert_close(dy, dy_ref, dtype, "fused block's tangent in blocks")


def temp_bytes(f, *args) -> int:
    return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blocks_keep_one_block_of_phi_at_a_time():
    """The point of blocks: the gradient's temporaries shrink with phi(pad(Z)), [N, H, W, 9 C_in] = 2.4 MB here,
    to one block's 0.3 MB, where the whole batch at once holds phi(pad(Z)) and W^T Delta of the same size."""
    x, w, b = inputs(jnp.float32, n=16)
    x = jnp.tile(x, (1, 4, 4, 8))[:, :32, :32]  # 16 x 32 x 32 x 24
    w = jnp.tile(w, (1, 1, 8, 8))  # 3 x 3 x 24 x 32
    b = jnp.tile(b, 8)

    def loss(x, w, b, block):
        return jnp.sum(jnp.tanh(jc.conv_relu_pool(x, w, b, padding=1, rule="im2col", store_phi=False, block=block)))

    whole, blocks = (temp_bytes(partial(loss, block=block), x, w, b) for block in (None, 2))
    assert blocks < 0.5 * whole, f"temporaries: {blocks} B in blocks of 2, {whole} B for the batch of 16"


def equations(jaxpr):
    """Every equation of a jaxpr, inside loops, calls and custom rules too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from equations(inner)


def shapes_computed(jaxpr) -> set:
    """The shapes of every array a jaxpr computes."""
    return {tuple(v.aval.shape) for eqn in equations(jaxpr) for v in eqn.outvars if hasattr(v.aval, "shape")}


@pytest.mark.parametrize("rule", ["im2col", "winograd"])
def test_the_fused_block_in_blocks_never_builds_s_for_the_whole_batch(rule):
    """Conv, ReLU and pooling run a block at a time in the forward pass; with im2col the backward's mask and P_pool
    routing (eq. 26) too, so no array of S's shape [N, Ho, Wo, C_out] exists in the gradient. (Winograd's Delta is
    routed for the whole batch: per block, XLA fused the routing into its 16 transforms of Delta, 1.07-1.19x
    slower.)"""
    x, w, b = inputs(jnp.float32, n=8)
    x, w, b = jnp.tile(x, (1, 1, 1, 2))[:, :8, :8], jnp.tile(w, (1, 1, 2, 2)), jnp.tile(b, 2)  # 8x8x6 -> 8
    s_shape = (8, 8, 8, 8)
    gradient = jax.grad(lambda x, w, b, block: jnp.sum(jc.conv_relu_pool(x, w, b, padding=1, rule=rule,
                                                                          block=block) ** 2), argnums=(0, 1, 2))
    assert s_shape in shapes_computed(jax.make_jaxpr(partial(gradient, block=None))(x, w, b).jaxpr)
    forward = jax.make_jaxpr(lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, rule=rule, block=2))(x, w, b)
    assert s_shape not in shapes_computed(forward.jaxpr)
    in_blocks = shapes_computed(jax.make_jaxpr(partial(gradient, block=2))(x, w, b).jaxpr)
    assert (s_shape in in_blocks) == (rule == "winograd")


def test_blocks_are_the_largest_divisor_of_the_batch_within_the_limit(monkeypatch):
    x, w, _ = inputs(jnp.float32, n=12)
    window = conv.geometry("t", x.shape[1:3], w.shape[:2], 1, 1, 1)
    per_example = 9 * 8 * 27 * 4  # Ho Wo x kh kw C_in, float32
    for budget, want in ((5 * per_example, 4), (per_example, 1), (per_example - 1, 1), (12 * per_example, None)):
        monkeypatch.setattr(conv, "BLOCK_BYTES", budget)
        assert conv.block_size("auto", x, w, window) == want, budget
    for block, want in ((5, 4), (1, 1), (6, 6), (11, 6), (12, None), (100, None), (None, None)):
        assert conv.block_size(block, x, w, window) == want, block


def test_bad_blocks_are_refused_with_the_argument_named():
    x, w, b = inputs(jnp.float32)
    for block in (0, -1, 2.0, True, "half"):
        with pytest.raises(ValueError, match="conv2d: block must be None, 'auto' or an int >= 1"):
            jc.conv2d(x, w, b, block=block)
    with pytest.raises(ValueError, match="block applies to rule='im2col' with store_phi=False"):
        jc.conv2d(x, w, b, rule="flip", block=2)
    with pytest.raises(ValueError, match="block applies to rule='im2col' with store_phi=False"):
        jc.conv_relu_pool(x, w, b, padding=1, store_phi=True, block=2)
    with pytest.raises(ValueError, match="conv: block must be None, 'auto' or an int >= 1"):
        nw.Conv(8, block=0)
    with pytest.raises(ValueError, match="conv: block applies to rule='im2col'"):
        nw.Conv(8, rule="flip", block="auto")


def test_a_network_with_blocks_round_trips_and_computes_the_same():
    net = nw.Sequential([nw.Conv(4, padding=1, block=2), nw.ReLU(), nw.MaxPool(2), nw.Flatten(), nw.Dense(3)])
    again = nw.Sequential.from_config(net.to_config())
    assert again == net and again.fuse().layers[0].block == 2
    x, _, _ = inputs(jnp.float64)
    params = net.init(jax.random.key(0), x.shape[1:], jnp.float64)
    plain = nw.Sequential([nw.Conv(4, padding=1), *net.layers[1:]])
    grads = jax.jit(lambda p: [jax.grad(lambda p, n=n: jnp.sum(n.apply(p, x) ** 2))(p) for n in (net.fuse(), plain)])
    for a, b in zip(*map(jax.tree_util.tree_leaves, grads(params))):
        assert_close(a, b, jnp.float64, "network in blocks vs whole batch")


def strided_reads(jaxpr, shape) -> int:
    """How many strided slices of an array of ``shape`` a jaxpr takes."""
    return sum(eqn.primitive.name == "slice" and max(eqn.params["strides"] or (1,)) > 1
               and tuple(eqn.invars[0].aval.shape) == shape for eqn in equations(jaxpr))


@pytest.mark.parametrize("block", [None, 2])
def test_the_fused_winograd_block_builds_dm_from_the_pooled_delta(block):
    """Under 2x2 pooling Winograd's 2x2 output blocks are the pooling windows, so dM = A dY A^T is built from the
    pooled Delta and P_pool's index (``pool.route_by_offset``), not from four strided reads of the routed Delta
    [N, Ho, Wo, C_out] (the steps took 0.83-0.94x the time). Without pooling, dM reads Delta itself."""
    x, w, b = inputs(jnp.float32, n=8)
    x, w, b = x[:, :8, :8], w[..., :4], b[:4]  # S: 8x8x4 per example
    s_shape = (8 if block is None else block, 8, 8, 4)
    gradient = jax.grad(lambda x, w, b, op: jnp.sum(op(x, w, b, padding=1, rule="winograd", block=block) ** 2),
                        argnums=(0, 1, 2))
    fused = jax.make_jaxpr(partial(gradient, op=jc.conv_relu_pool))(x, w, b).jaxpr
    unfused = jax.make_jaxpr(partial(gradient, op=jc.conv2d))(x, w, b).jaxpr
    assert strided_reads(unfused, s_shape) == 4
    assert strided_reads(fused, s_shape) == 0


def test_a_whole_batch_dy_with_blocks_is_refused():
    """``conv.backward``'s ``dy`` (Winograd's dY for the whole batch) cannot be split into blocks there: with
    ``block`` it is refused, not silently ignored (the fused block passes ``blocked_backward`` a ``dy_of``)."""
    x, w, _ = inputs(jnp.float32, n=4)
    x, w = x[:, :8, :8], w[..., :4]
    window = conv.geometry("test", x.shape[1:3], w.shape[:2], 1, 1, 1)
    delta = jnp.ones((4, 8, 8, 4))
    dy = [[delta[:, p::2, q::2] for q in range(2)] for p in range(2)]
    with pytest.raises(ValueError, match="dy is for the whole batch"):
        conv.backward("winograd", window, x, w, delta, block=2, dy=dy)
    assert_close(conv.backward("winograd", window, x, w, delta, dy=dy)[1],
                 conv.backward("winograd", window, x, w, delta)[1], jnp.float32, "dW from dy")
