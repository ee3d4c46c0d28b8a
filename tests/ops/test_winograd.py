"""rule="winograd" (F(2x2, 3x3)): its forward equals lax's convolution and its hand backward and tangent rules equal
autodiff, jax.jvp and finite differences, for every zero padding and odd or even output sizes; in the fused blocks
and networks; and it refuses the convolutions it does not compute."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxcnn as jc
import jaxcnn.network as nw
from jaxcnn import autotune
from jaxcnn.ops import winograd
from jaxcnn.train import TrainConfig
from tests.helpers import assert_close, assert_modes_agree, normal
from tests.ops.test_conv import paddings, reference

VARIANTS = {
    "autodiff": {"grad": "autodiff", "store_phi": True},  # eq. (3) literally, differentiated by JAX
    "hand winograd": {"grad": "hand", "rule": "winograd"},
    "autodiff winograd": {"grad": "autodiff", "rule": "winograd"},  # JAX through Winograd's forward
}


@st.composite
def cases(draw, max_hw=9, max_c=3):
    padding = draw(paddings)
    # at least one output position: H + top + bottom >= 3 ("SAME" always has one)
    extra = 0 if isinstance(padding, str) else 2 * padding if isinstance(padding, int) else sum(padding[0])
    extra_w = 0 if isinstance(padding, str) else 2 * padding if isinstance(padding, int) else sum(padding[1])
    return dict(n=draw(st.integers(1, 3)), h=draw(st.integers(max(1, 3 - extra), max_hw)),
                w=draw(st.integers(max(1, 3 - extra_w), max_hw)), c_in=draw(st.integers(1, max_c)),
                c_out=draw(st.integers(1, max_c)), padding=padding, bias=draw(st.booleans()))


def make(case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = normal(rng, (case["n"], case["h"], case["w"], case["c_in"]), dtype)
    w = normal(rng, (3, 3, case["c_in"], case["c_out"]), dtype)
    b = normal(rng, (case["c_out"],), dtype) if case["bias"] else None
    return x, w, b


def check(case, dtype):
    x, w, b = make(case, dtype)
    args, names = ((x, w, b), ("x", "w", "b")) if b is not None else ((x, w), ("x", "w"))
    results = assert_modes_agree(lambda *a, **m: jc.conv2d(*a, padding=case["padding"], **m), args, names, dtype,
                                 f"conv2d winograd {case}", VARIANTS)
    expected = reference(x, w, b, 1, case["padding"], 1)
    assert_close(results["hand winograd"][0], expected, dtype, f"winograd forward vs lax {case}")


@settings(max_examples=5)  # each example compiles three gradients: the suite's time on a 2-core machine
@given(cases(), st.sampled_from([jnp.float64, jnp.float32]))
def test_winograd_equals_autodiff_and_lax(case, dtype):
    check(case, dtype)


def test_bfloat16_is_rounded_once_as_im2col_is():
    """In bfloat16 the transforms and products run in float32: S, dZ and dW are as close to the float64 truth as
    im2col's (V and U rounded to bfloat16 left them 3.0-3.6x farther)."""
    x, w, b = make(dict(n=2, h=8, w=7, c_in=16, c_out=8, bias=True), jnp.bfloat16)
    results = assert_modes_agree(lambda *a, **m: jc.conv2d(*a, padding=1, **m), (x, w, b), "xwb", jnp.bfloat16,
                                 "conv2d winograd bfloat16", VARIANTS)
    expected = reference(*(a.astype(jnp.float64) for a in (x, w, b)), 1, 1, 1)
    assert_close(results["hand winograd"][0], expected, jnp.bfloat16, "winograd bfloat16 forward vs float64")
    g = normal(np.random.default_rng(6), expected.shape, jnp.bfloat16)

    @partial(jax.jit, static_argnums=(0, 1))
    def outputs(rule, dtype):
        s, pull = jax.vjp(lambda x, w: jc.conv2d(x, w, padding=1, rule=rule), x.astype(dtype), w.astype(dtype))
        return (s, *pull(g.astype(dtype)))

    truth = outputs("im2col", jnp.float64)
    error = lambda rule: [np.linalg.norm(np.asarray(a, np.float64) - t) / np.linalg.norm(t)
                          for a, t in zip(outputs(rule, jnp.bfloat16), truth)]
    for name, ours, im2col in zip(("S", "dZ", "dW"), error("winograd"), error("im2col")):
        assert ours <= 1.1 * im2col, (name, ours, im2col)


@pytest.mark.parametrize("padding", [1, ((0, 2), (1, 0))])
def test_finite_differences_float64(padding):
    x, w, b = make(dict(n=2, h=5, w=6, c_in=2, c_out=3, bias=True), jnp.float64, seed=1)
    check_grads(jax.jit(lambda x, w, b: jc.conv2d(x, w, b, padding=padding, rule="winograd")), (x, w, b), order=1,
                modes=["rev"])


def test_tangent_rule_equals_jvp():
    """conv2d_jvp's winograd branch, each tangent alone (None: zero) and all together, against jax.jvp."""
    x, w, b = make(dict(n=2, h=7, w=4, c_in=2, c_out=3, bias=True), jnp.float64)
    dx, dw, db = make(dict(n=2, h=7, w=4, c_in=2, c_out=3, bias=True), jnp.float64, seed=2)
    f = lambda x, w, b: jc.conv2d(x, w, b, padding="SAME", grad="autodiff", store_phi=True)
    for tangents in [(dx, None, None), (None, dw, None), (None, None, db), (dx, dw, db)]:
        zeros = tuple(jnp.zeros_like(p) if t is None else t for p, t in zip((x, w, b), tangents))
        s, ds = jax.jit(lambda t: jc.ops.conv2d_jvp((x, w, b), t, padding="SAME", rule="winograd"))(tangents)
        s_ref, ds_ref = jax.jit(lambda t: jax.jvp(f, (x, w, b), t))(zeros)
        assert_close(s, s_ref, jnp.float64, "conv2d_jvp winograd S")
        assert_close(ds, ds_ref, jnp.float64, f"conv2d_jvp winograd dS, tangents {[t is not None for t in tangents]}")
    # grad="tangent": forward mode through the rule, and reverse mode by JAX's transpose of it
    check_grads(jax.jit(lambda x, w, b: jc.conv2d(x, w, b, padding=1, rule="winograd", grad="tangent")), (x, w, b),
                order=1, modes=["fwd", "rev"])


def test_blocks_of_examples_compute_the_same_in_less_memory(monkeypatch):
    """block=: Winograd's tiles built a block of examples at a time (dW summed over the blocks): the same S,
    gradients and tangents as the whole batch, and the fused block's temporaries shrink with the tiles."""
    x, w, b = make(dict(n=6, h=7, w=6, c_in=2, c_out=3, bias=True), jnp.float64, seed=7)
    conv = lambda *a, **kw: jc.conv2d(*a, padding=1, rule="winograd", **kw)
    variants = {"whole batch": {}, "blocks of 3": {"block": 4}}  # 3: the largest divisor of 6 not above 4
    assert_modes_agree(conv, (x, w, b), "xwb", jnp.float64, "winograd in blocks", variants, reference="whole batch")
    s, ds = jax.jit(lambda x, w: jc.ops.conv2d_jvp((x, w, b), (x, w, None), padding=1, rule="winograd", block=2))(x, w)
    s_ref, ds_ref = jax.jit(lambda x, w: jax.jvp(lambda x, w: conv(x, w, b, grad="autodiff"), (x, w), (x, w)))(x, w)
    assert_close(s, s_ref, jnp.float64, "conv2d_jvp winograd in blocks, S")
    assert_close(ds, ds_ref, jnp.float64, "conv2d_jvp winograd in blocks, dS")

    window = jc.ops.conv.geometry("t", (7, 6), (3, 3), 1, 1, 1)
    per_example = 16 * 4 * 3 * (2 + 3) * 8  # 16 entries per tile, 4 x 3 tiles (S is 7 x 6), V and M, float64
    assert winograd.tile_bytes(window, x, w) == per_example
    monkeypatch.setattr(jc.ops.conv, "WINOGRAD_BLOCK_BYTES", 3 * per_example)
    assert jc.ops.conv.block_size("auto", x, w, window, "winograd") == 3

    rng = np.random.default_rng(9)
    x, w = normal(rng, (8, 16, 16, 8), jnp.float32), normal(rng, (3, 3, 8, 16), jnp.float32)

    def temp_bytes(block):
        loss = lambda x, w: jnp.sum(jc.conv_relu_pool(x, w, padding=1, rule="winograd", block=block) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().memory_analysis().temp_size_in_bytes

    temp = {block: temp_bytes(block) for block in (None, 1)}
    assert temp[1] < 0.5 * temp[None], temp


def test_transforms_invert_on_a_single_tile():
    """Lavin and Gray's identity on one 4x4 tile, one channel pair: A^T [(G g G^T) (.) (B^T d B)] A equals the
    direct 2x2 correlation of d with g (eq. 3 on that tile)."""
    rng = np.random.default_rng(3)
    d, g = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))
    bt, gm, at = (np.array(m, np.float64) for m in (winograd.B_T, winograd.G, winograd.A_T))
    y = at @ ((gm @ g @ gm.T) * (bt @ d @ bt.T)) @ at.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(y, direct, rtol=0, atol=1e-12)


def test_fused_block_with_winograd_equals_autodiff():
    dtype = jnp.float64
    rng = np.random.default_rng(4)
    args = normal(rng, (2, 9, 8, 3), dtype), normal(rng, (3, 3, 3, 4), dtype), normal(rng, (4,), dtype)
    variants = {"autodiff": {"grad": "autodiff", "rule": "im2col"}, "fused winograd": {"rule": "winograd"},
                "fused winograd in blocks": {"rule": "winograd", "block": 1},
                "autodiff winograd": {"grad": "autodiff", "rule": "winograd"}}
    assert_modes_agree(lambda *a, **m: jc.conv_relu_pool(*a, padding=1, **m), args, "xwb", dtype,
                       "conv_relu_pool winograd", variants)
    z, dz = jax.jit(lambda a: jc.ops.conv_relu_pool_jvp(a, (a[0], None, None), padding=1, rule="winograd"))(args)
    z_ref, dz_ref = jax.jit(lambda x: jax.jvp(lambda x: jc.conv_relu_pool(x, *args[1:], padding=1, grad="autodiff"),
                                              (x,), (x,)))(args[0])
    assert_close(z, z_ref, dtype, "conv_relu_pool_jvp winograd output")
    assert_close(dz, dz_ref, dtype, "conv_relu_pool_jvp winograd tangent")


def test_fused_block_with_winograd_routes_ties_to_the_first_maximum():
    """dM from the pooled Delta (``pool.route_by_offset``) routes a tied window's Delta to its first maximum, as
    ``pool.route`` does for im2col: with integer inputs both rules compute S exactly, so they tie alike."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-1, 2, size=(2, 8, 6, 2)), jnp.float64)
    w = jnp.asarray(rng.integers(-1, 2, size=(3, 3, 2, 3)), jnp.float64)
    t = jc.conv2d(x, w, padding=1, rule="im2col").reshape(2, 4, 2, 3, 2, 3)
    peak = t.max(axis=(2, 4), keepdims=True)
    assert int((((t == peak).sum(axis=(2, 4)) > 1) & (peak[:, :, 0, :, 0] > 0)).sum()) >= 5  # tied, ReLU passed
    g = jnp.asarray(rng.normal(size=(2, 4, 3, 3)))
    grads = {(rule, block): jax.jit(jax.grad(lambda x, w, rule=rule, block=block: jnp.sum(
        jc.conv_relu_pool(x, w, padding=1, rule=rule, block=block) * g), (0, 1)))(x, w)
        for rule, block in (("im2col", None), ("winograd", None), ("winograd", 1))}
    for key, (dx, dw) in grads.items():
        assert_close(dx, grads["im2col", None][0], jnp.float64, f"dZ {key}")
        assert_close(dw, grads["im2col", None][1], jnp.float64, f"dW {key}")


def test_conv_bn_relu_with_winograd_equals_autodiff():
    rng = np.random.default_rng(5)
    args = (normal(rng, (4, 6, 5, 3), jnp.float64), normal(rng, (3, 3, 3, 4), jnp.float64),
            normal(rng, (4,), jnp.float64), normal(rng, (4,), jnp.float64))

    def loss(x, w, g, b, **kw):
        y, mean, var = jc.conv_bn_relu(x, w, g, b, padding=1, **kw)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(mean) * var)

    grads = jax.jit(lambda a: {name: jax.grad(loss, argnums=(0, 1, 2, 3))(*a, **kw) for name, kw in {
        "autodiff": {"grad": "autodiff", "rule": "im2col"}, "hand": {"rule": "winograd"}}.items()})(args)
    for name, a, b in zip(("x", "w", "gamma", "beta"), grads["hand"], grads["autodiff"]):
        assert_close(a, b, jnp.float64, f"conv_bn_relu winograd d/d{name}")


def test_network_with_winograd_layers_equals_autodiff():
    """A network whose 3x3 layers take rule="winograd" (autotune.uniform: the 5x5 and strided layers keep the
    default), its gradient against autodiff through the same network."""
    net = nw.Sequential([nw.Conv(4, kernel=3, padding=1), nw.ReLU(), nw.Conv(4, kernel=5, stride=2),
                         nw.ReLU(), nw.Conv(3, kernel=3), nw.Flatten(), nw.Dense(2)])
    wino = autotune.uniform(net, "winograd", False)
    rules = [layer.rule for layer in wino.layers if isinstance(layer, nw.Conv)]
    assert rules == ["winograd", jc.ops.conv.resolve("", None, None)[0], "winograd"]
    rng = np.random.default_rng(6)
    x = normal(rng, (2, 11, 11, 2), jnp.float64)
    params = wino.init(jax.random.key(0), x.shape[1:], jnp.float64)
    loss = lambda p, net, grad: jnp.sum(jnp.tanh(net.apply(p, x, grad=grad)))
    hand, auto = jax.jit(lambda p: (jax.grad(loss)(p, wino, "hand"), jax.grad(loss)(p, net, "autodiff")))(params)
    for a, b in zip(jax.tree_util.tree_leaves(hand), jax.tree_util.tree_leaves(auto)):
        assert_close(a, b, jnp.float64, "network with winograd layers")


def test_it_refuses_what_it_does_not_compute():
    x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2))
    for kw in [dict(stride=2), dict(dilation=(1, 2))]:
        with pytest.raises(ValueError, match=r"conv2d: rule='winograd' \(F\(2x2, 3x3\)\) computes 3x3 kernels with "
                                             r"stride 1 and no dilation"):
            jc.conv2d(x, w, rule="winograd", **kw)
    with pytest.raises(ValueError, match=r"conv2d: rule='winograd' .* got kernel \(5, 5\)"):
        jc.conv2d(x, jnp.ones((5, 5, 2, 2)), rule="winograd")
    with pytest.raises(ValueError, match="conv_relu_pool: rule='winograd'"):
        jc.conv_relu_pool(x, w, jnp.ones(2), stride=2, rule="winograd")
    with pytest.raises(ValueError, match=r"store_phi applies to rule='im2col' \(rule='winograd' does not use"):
        jc.conv2d(x, w, rule="winograd", store_phi=True)
    with pytest.raises(ValueError, match=r"conv2d: the padded input would have shape \(1, 60002, 60002, 1\)"):
        jc.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)), padding=3 * 10**4, rule="winograd")  # not allocated
    with pytest.raises(ValueError, match=r"conv: rule='winograd' .* got kernel \(5, 5\), stride \(1, 1\)"):
        nw.Conv(2, kernel=5, rule="winograd")
    with pytest.raises(ValueError, match=r"train: rule='winograd' computes only 3x3, stride-1 convolutions.*name it "
                                         r"on those layers"):
        TrainConfig(rule="winograd")
