"""conv2d: both hand rules equal autodiff, the forward equals lax, equivalences, and the notes' examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_close, assert_modes_agree, normal

# Both forward passes (phi(pad(Z)) @ w2, and XLA's convolution) under both gradient modes, and the im2col rule
# block by block.
VARIANTS = {
    "autodiff": {"grad": "autodiff", "store_phi": True},
    "autodiff, xla forward": {"grad": "autodiff", "store_phi": False},
    "hand im2col, phi stored": {"grad": "hand", "rule": "im2col", "store_phi": True},
    "hand im2col, phi recomputed": {"grad": "hand", "rule": "im2col", "store_phi": False},
    "hand flip": {"grad": "hand", "rule": "flip"},
    "hand im2col, in blocks": {"grad": "hand", "rule": "im2col", "block": 1},  # one example at a time
}

paddings = st.one_of(
    st.just("VALID"), st.just("SAME"), st.integers(0, 2),
    st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3))),
)


def lax_pads(padding):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return padding


@st.composite
def conv_cases(draw, max_hw=9, max_c=3):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(paddings)
    lo = lax_pads(padding)
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    pads = ((0, 0), (0, 0)) if isinstance(lo, str) else lo
    # Keep only cases where the dilated kernel fits the padded input ("SAME" always fits).
    h = max(h, dilation[0] * (kh - 1) + 1 - sum(pads[0]))
    w = max(w, dilation[1] * (kw - 1) + 1 - sum(pads[1]))
    return dict(n=draw(st.integers(1, 3)), h=h, w=w, c_in=draw(st.integers(1, max_c)),
                c_out=draw(st.integers(1, max_c)), kernel=(kh, kw), stride=stride, dilation=dilation,
                padding=padding, bias=draw(st.booleans()))


def make(case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = normal(rng, (case["n"], case["h"], case["w"], case["c_in"]), dtype)
    w = normal(rng, (*case["kernel"], case["c_in"], case["c_out"]), dtype)
    b = normal(rng, (case["c_out"],), dtype) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    return x, w, b, kw


def reference(x, w, b, stride, padding, dilation):
    """lax's convolution: an implementation independent of ours, including its own 'SAME' arithmetic."""
    s = lax.conv_general_dilated(x, w, jc.ops._args.positive_pair("", "", stride), lax_pads(padding),
                                 rhs_dilation=jc.ops._args.positive_pair("", "", dilation),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return s if b is None else s + b


def check_rules(case, dtype):
    x, w, b, kw = make(case, dtype)
    args, names = ((x, w, b), ("x", "w", "b")) if b is not None else ((x, w), ("x", "w"))
    results = assert_modes_agree(lambda *a, **m: jc.conv2d(*a, **kw, **m), args, names, dtype, f"conv2d {case}",
                                 VARIANTS)
    assert_close(results["autodiff"][0], reference(x, w, b, **kw), dtype, f"conv2d forward vs lax {case}")


@given(conv_cases())
def test_hand_rules_equal_autodiff_float64(case):
    check_rules(case, jnp.float64)


@given(conv_cases())
def test_hand_rules_equal_autodiff_float32(case):
    check_rules(case, jnp.float32)


@given(conv_cases(max_hw=6, max_c=2))
def test_hand_rules_equal_autodiff_bfloat16(case):
    check_rules(case, jnp.bfloat16)


@pytest.mark.parametrize("rule", ["im2col", "flip"])
@pytest.mark.parametrize("case", [
    dict(stride=1, padding=0, dilation=1),
    dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2)),
    dict(stride=2, padding="SAME", dilation=1),
])
def test_finite_differences_float64(rule, case):
    rng = np.random.default_rng(1)
    x, w, b = normal(rng, (2, 6, 5, 2), jnp.float64), normal(rng, (3, 2, 2, 3), jnp.float64), \
        normal(rng, (3,), jnp.float64)
    check_grads(jax.jit(lambda x, w, b: jc.conv2d(x, w, b, **case, rule=rule)), (x, w, b), order=1, modes=["rev"])


# MatConvNet-style equivalences (vl_nnconv's tests): each relates two calls of the forward and of the gradient.

@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_strided_equals_stride1_subsampled(grad):
    rng = np.random.default_rng(2)
    x, w = normal(rng, (2, 9, 8, 3), jnp.float64), normal(rng, (3, 2, 3, 4), jnp.float64)
    dense_out = jc.conv2d(x, w, padding=1, grad=grad)
    strided = jc.conv2d(x, w, padding=1, stride=(2, 3), grad=grad)
    np.testing.assert_allclose(strided, dense_out[:, ::2, ::3], rtol=1e-12)
    # Gradients too: the strided conv is the stride-1 conv followed by subsampling.
    loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
    g_strided = loss(lambda x, w: jc.conv2d(x, w, padding=1, stride=(2, 3), grad=grad))
    g_sub = loss(lambda x, w: jc.conv2d(x, w, padding=1, grad=grad)[:, ::2, ::3])
    for a, b_ in zip(g_strided, g_sub):
        np.testing.assert_allclose(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["im2col", "flip"])
def test_padded_equals_explicit_pad_then_valid(rule):
    rng = np.random.default_rng(3)
    x, w = normal(rng, (2, 5, 6, 2), jnp.float64), normal(rng, (3, 3, 2, 2), jnp.float64)
    pads = ((2, 0), (1, 3))
    f_pad = lambda x, w: jc.conv2d(x, w, padding=pads, rule=rule)
    f_explicit = lambda x, w: jc.conv2d(jnp.pad(x, ((0, 0), *pads, (0, 0))), w, padding="VALID", rule=rule)
    np.testing.assert_allclose(f_pad(x, w), f_explicit(x, w), rtol=1e-12)
    loss = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) ** 3), argnums=(0, 1))(x, w)
    for a, b_ in zip(loss(f_pad), loss(f_explicit)):
        np.testing.assert_allclose(a, b_, rtol=1e-10, atol=1e-12)


def test_dilated_equals_kernel_with_inserted_zeros():
    rng = np.random.default_rng(4)
    x, w = normal(rng, (1, 9, 9, 2), jnp.float64), normal(rng, (2, 3, 2, 2), jnp.float64)
    spread = jnp.zeros((4, 7, 2, 2), jnp.float64).at[::3, ::3].set(w)  # dilation (3, 3) written out
    np.testing.assert_allclose(jc.conv2d(x, w, dilation=3), jc.conv2d(x, spread), rtol=1e-12)


# Worked examples of the notes.

def test_dd2424_output_sizes():
    # 7x7 input, 3x3 filter: stride 1 -> 5, stride 2 -> 3, stride 3 does not fit: last row/column dropped -> 2.
    for stride, size in [(1, 5), (2, 3), (3, 2)]:
        out = jax.eval_shape(lambda x, w, s=stride: jc.conv2d(x, w, stride=s),
                             jnp.zeros((1, 7, 7, 1)), jnp.zeros((3, 3, 1, 1)))
        assert out.shape == (1, size, size, 1), f"7x7 conv 3x3 stride {stride}"
        assert jc.output_size(7, 3, stride) == size
    # Pad 1 keeps 7x7 (zero-padding P = (f - 1) / 2).
    assert jc.conv2d(jnp.zeros((1, 7, 7, 1)), jnp.zeros((3, 3, 1, 1)), padding=1).shape == (1, 7, 7, 1)


def test_dd2424_32x32x3_ten_5x5_filters_pad_2():
    x, w, b = jnp.zeros((1, 32, 32, 3)), jnp.zeros((5, 5, 3, 10)), jnp.zeros((10,))
    assert jc.conv2d(x, w, b, padding=2).shape == (1, 32, 32, 10)
    assert w.size + b.size == 760  # 5*5*3 + 1 = 76 parameters per filter, 10 filters


def test_alexnet_first_layers():
    x = jax.ShapeDtypeStruct((1, 227, 227, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((11, 11, 3, 96), jnp.float32)
    conv = jax.eval_shape(lambda x, w: jc.conv2d(x, w, stride=4), x, w)
    assert conv.shape == (1, 55, 55, 96)  # (227 - 11) / 4 + 1 = 55
    pooled = jax.eval_shape(lambda s: jc.max_pool2d(s, 3, 2), conv)
    assert pooled.shape == (1, 27, 27, 96)  # (55 - 3) / 2 + 1 = 27, overlapping pooling
    assert 11 * 11 * 3 * 96 == 34848  # "# of parameters: 35k"


def test_ray_flip_example_and_input_gradient():
    """Ray: flip(K) of [[1,3,5],[2,4,6]] is [[6,4,2],[5,3,1]] and dI = pad(dJ) * flip(K) (correlation)."""
    K = np.array([[1.0, 3, 5], [2, 4, 6]])
    flipK = K[::-1, ::-1]
    np.testing.assert_array_equal(flipK, [[6, 4, 2], [5, 3, 1]])
    rng = np.random.default_rng(5)
    I = rng.normal(size=(5, 6))
    dJ = rng.normal(size=(5 - 2 + 1, 6 - 3 + 1))
    padded = np.pad(dJ, ((1, 1), (2, 2)))  # h - 1 = 1 rows and w - 1 = 2 columns of zeros on each side
    dI = np.array([[np.sum(padded[p:p + 2, q:q + 3] * flipK) for q in range(6)] for p in range(5)])
    dK = np.array([[np.sum(I[p:p + 4, q:q + 4] * dJ) for q in range(3)] for p in range(2)])  # dK = I * dJ
    for rule in ["im2col", "flip"]:
        _, pullback = jax.vjp(lambda i, k, r=rule: jc.conv2d(i, k, rule=r), I[None, :, :, None],
                              K[:, :, None, None])
        got_dI, got_dK = pullback(dJ[None, :, :, None])
        np.testing.assert_allclose(got_dI[0, :, :, 0], dI, rtol=1e-12, err_msg=f"dI, rule={rule}")
        np.testing.assert_allclose(got_dK[:, :, 0, 0], dK, rtol=1e-12, err_msg=f"dK, rule={rule}")


def test_dd2424_backprop_through_convolution_entries():
    """DD2424, 6x6 input and 3x3 filter: v = g M_F^filter, written out entry by entry (g, v numbered row-major)."""
    rng = np.random.default_rng(6)
    F = rng.normal(size=(3, 3))
    g = rng.normal(size=16)
    f = lambda i, j: F[i - 1, j - 1]  # 1-based, as printed
    expected = {
        1: g[0] * f(1, 1),
        2: g[0] * f(1, 2) + g[1] * f(1, 1),
        3: g[0] * f(1, 3) + g[1] * f(1, 2) + g[2] * f(1, 1),
        4: g[1] * f(1, 3) + g[2] * f(1, 2) + g[3] * f(1, 1),
        5: g[2] * f(1, 3) + g[3] * f(1, 2),
        6: g[3] * f(1, 3),
        7: g[0] * f(2, 1) + g[4] * f(1, 1),
        8: g[0] * f(2, 2) + g[1] * f(2, 1) + g[4] * f(1, 2) + g[5] * f(1, 1),
        12: g[3] * f(2, 3) + g[7] * f(1, 3),
        13: g[0] * f(3, 1) + g[4] * f(2, 1) + g[8] * f(1, 1),
        15: (g[0] * f(3, 3) + g[1] * f(3, 2) + g[2] * f(3, 1) + g[4] * f(2, 3) + g[5] * f(2, 2) + g[6] * f(2, 1)
             + g[8] * f(1, 3) + g[9] * f(1, 2) + g[10] * f(1, 1)),
    }
    for rule in ["im2col", "flip"]:
        _, pullback = jax.vjp(lambda x, r=rule: jc.conv2d(x, F[:, :, None, None], rule=r), jnp.zeros((1, 6, 6, 1)))
        (v,) = pullback(g.reshape(1, 4, 4, 1))
        v = np.asarray(v).reshape(-1)  # row-major, v_1 .. v_36
        for k, value in expected.items():
            np.testing.assert_allclose(v[k - 1], value, rtol=1e-12, err_msg=f"v_{k}, rule={rule}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gradient_is_delta_summed(dtype):
    """Lin eq. (14): db = Delta 1, summed over the batch and every output position."""
    rng = np.random.default_rng(7)
    x, w, b = normal(rng, (2, 5, 5, 2), dtype), normal(rng, (3, 3, 2, 3), dtype), normal(rng, (3,), dtype)
    delta = normal(rng, (2, 3, 3, 3), dtype)
    _, pullback = jax.vjp(lambda b: jc.conv2d(x, w, b), b)
    wide = jnp.promote_types(dtype, jnp.float32)
    assert_close(pullback(delta)[0], delta.astype(wide).sum((0, 1, 2)), dtype, "db")
