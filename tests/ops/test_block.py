"""conv_relu_pool: the fused rule (Lin eq. 24, 26-28) equals the chain, and saves less than it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_close, assert_modes_agree, normal

CASES = [
    dict(stride=1, padding=1, pool=2),
    dict(stride=(2, 1), padding="SAME", dilation=(1, 2), pool=(2, 3)),  # pooling drops a row/column
]


def chain(x, w, b, stride=1, padding=0, dilation=1, pool=2, grad="hand", rule="im2col", store_phi=None):
    s = jc.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, grad=grad, rule=rule,
                  store_phi=store_phi)
    return jc.max_pool2d(jc.relu(s, grad=grad), pool, grad=grad)


def inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return normal(rng, (2, 9, 8, 3), dtype), normal(rng, (3, 3, 3, 4), dtype), normal(rng, (4,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_fused_hand_equals_autodiff_and_hand_chain(case, dtype):
    variants = {
        "autodiff": {"grad": "autodiff"},
        "fused im2col, phi stored": {"grad": "hand", "rule": "im2col", "store_phi": True},
        "fused im2col, phi recomputed": {"grad": "hand", "rule": "im2col", "store_phi": False},
        "fused flip": {"grad": "hand", "rule": "flip"},
        "fused im2col, in blocks": {"grad": "hand", "rule": "im2col", "block": 1},
    }
    args = inputs(dtype)
    assert_modes_agree(lambda *a, **m: jc.conv_relu_pool(*a, **case, **m), args, ("x", "w", "b"), dtype,
                       f"conv_relu_pool {case}", variants)
    # ... and the separate ops (eq. 23: mask from S) give the same values and gradients as eq. (24).
    fused = assert_modes_agree(lambda *a, **m: jc.conv_relu_pool(*a, **case, **m), args, ("x", "w", "b"), dtype,
                               "fused vs chain", {"autodiff": {"grad": "hand"}})
    chained = assert_modes_agree(lambda *a, **m: chain(*a, **case, **m), args, ("x", "w", "b"), dtype,
                                 "chain", {"autodiff": {"grad": "hand"}})
    assert_close(fused["autodiff"][0], chained["autodiff"][0], dtype, "fused vs chain forward")
    for name, a, b in zip("xwb", fused["autodiff"][1], chained["autodiff"][1]):
        assert_close(a, b, dtype, f"fused (eq. 24) vs chain (eq. 23) d/d{name}")


def test_finite_differences_float64():
    x, w, b = inputs(jnp.float64, seed=1)
    check_grads(jax.jit(lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1)), (x, w, b), order=1, modes=["rev"])


def residual_bytes(f, *args) -> int:
    """Bytes of the residuals the backward pass keeps: the leaves of jax.vjp's pullback."""
    _, pullback = jax.vjp(f, *args)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(pullback))


def test_fused_block_saves_only_input_output_and_p_pool():
    """Lin: store Z^m and Z^{m+1}, never S. Residuals: x, w, b, Z^{m+1} and an int8 P_pool index (phi(pad(Z))
    too when asked to store it)."""
    rng = np.random.default_rng(2)
    x, w, b = normal(rng, (8, 16, 16, 4), jnp.float32), normal(rng, (3, 3, 4, 8), jnp.float32), \
        normal(rng, (8,), jnp.float32)
    s_bytes = 8 * 16 * 16 * 8 * 4  # S, the conv output, in float32
    fused = residual_bytes(lambda *a: jc.conv_relu_pool(*a, padding=1, store_phi=False), x, w, b)
    expected = x.nbytes + w.nbytes + b.nbytes + s_bytes // 4 + s_bytes // 4 // 4  # Z^{m+1} f32 + index int8
    assert fused == expected, f"fused residuals {fused} B, expected {expected} B"
    stored = residual_bytes(lambda *a: jc.conv_relu_pool(*a, padding=1, store_phi=True), x, w, b)
    assert stored == expected + 8 * 16 * 16 * 3 * 3 * 4 * 4, "store_phi adds phi(pad(Z)), [N, H, W, 3*3*C_in]"
    hand_chain = residual_bytes(lambda *a: chain(*a, padding=1, store_phi=False), x, w, b)
    autodiff_chain = residual_bytes(lambda *a: chain(*a, padding=1, grad="autodiff", store_phi=False), x, w, b)
    assert hand_chain - fused >= s_bytes // 2, "the hand chain keeps relu's full-size output; fused does not"
    # autodiff keeps at least one more S-sized float32 array (relu's input or output) and its mask
    assert autodiff_chain - fused >= s_bytes, f"fused {fused} B vs autodiff chain {autodiff_chain} B"


def test_pool_larger_than_conv_output_is_rejected():
    x, w, b = inputs(jnp.float32)
    with pytest.raises(ValueError, match=r"pool window spans 10 in height .* conv output has only 7"):
        jc.conv_relu_pool(x, w, b, pool=10)
