"""max_pool2d / avg_pool2d: hand equals autodiff away from ties, P_pool routing of the notes, ties made explicit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_close, assert_modes_agree, distinct, normal

VARIANTS = {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}}


@st.composite
def pool_cases(draw):
    window = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.one_of(
        st.just("VALID"), st.just("SAME"),
        st.tuples(st.tuples(st.integers(0, window[0] - 1), st.integers(0, window[0] - 1)),
                  st.tuples(st.integers(0, window[1] - 1), st.integers(0, window[1] - 1)))))
    h, w = draw(st.integers(window[0], 8)), draw(st.integers(window[1], 8))
    return dict(shape=(draw(st.integers(1, 2)), h, w, draw(st.integers(1, 3))), window=window, stride=stride,
                padding=padding)


def reference(x, kind, window, stride, padding):
    """lax.reduce_window, with lax's own 'SAME' arithmetic."""
    stride = window if stride is None else stride
    pads = padding if isinstance(padding, str) else ((0, 0), *padding, (0, 0))
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *stride, 1), pads)
    total = lax.reduce_window(x, 0.0, lax.add, (1, *window, 1), (1, *stride, 1), pads)
    return total / (window[0] * window[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["max", "avg"])
@given(case=pool_cases())
def test_hand_equals_autodiff(kind, dtype, case):
    op = jc.max_pool2d if kind == "max" else jc.avg_pool2d
    x = distinct(np.random.default_rng(0), case["shape"], dtype)  # distinct values: no tied windows
    kw = dict(window=case["window"], stride=case["stride"], padding=case["padding"])
    results = assert_modes_agree(lambda x, **m: op(x, **kw, **m), (x,), ("x",), dtype, f"{kind} pool {case}",
                                 VARIANTS)
    assert_close(results["hand"][0], reference(x, kind, **kw), dtype, f"{kind} pool forward vs lax {case}")


@pytest.mark.parametrize("op", [jc.max_pool2d, jc.avg_pool2d])
def test_finite_differences_float64(op):
    x = distinct(np.random.default_rng(1), (2, 7, 6, 2), jnp.float64) / 10  # spacing 0.1 >> eps: no kinks hit
    check_grads(jax.jit(lambda x: op(x, 3, 2, "SAME")), (x,), order=1, modes=["rev"])


def column_major_vec(a):
    """The notes' vec: stack the columns of a matrix."""
    return np.asarray(a).T.reshape(-1)


def test_lin_4x4_example_and_p_pool_routing():
    """Lin, "Notes on Practical Implementations VI-VII": image B -> [[5, 9], [4, 6]], and v^T P_pool puts
    v1..v4 at the positions of 5, 4, 9, 6 in vec(image): 6, 8, 14, 15 (1-based, column-major)."""
    image = jnp.array([[3.0, 2, 3, 6], [4, 5, 4, 9], [2, 1, 2, 6], [3, 4, 3, 2]])
    pooled, pullback = jax.vjp(lambda a: jc.max_pool2d(a[None, :, :, None], 2)[0, :, :, 0], image)
    np.testing.assert_array_equal(pooled, [[5, 9], [4, 6]])
    np.testing.assert_array_equal(column_major_vec(pooled), [5, 4, 9, 6])  # P_pool vec(image)
    v = np.array([10.0, 20, 30, 40])
    (routed,) = pullback(v.reshape(2, 2, order="F"))  # mat(v): column-major, as vec(Z^{m+1}) = [5, 4, 9, 6]
    expected = np.zeros(16)
    expected[[6 - 1, 8 - 1, 14 - 1, 15 - 1]] = v
    np.testing.assert_array_equal(column_major_vec(routed), expected)


def test_dd2424_max_pool_example_and_a_maxpool():
    """DD2424: [[1,1,2,4],[5,6,7,8],[3,2,1,0],[1,2,3,4]] -> [[6,8],[3,4]]; with DD2424's row-major vec, A_MaxPool
    has its ones in columns 6, 8, 9 and 16."""
    H = jnp.array([[1.0, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])
    f = lambda h: jc.max_pool2d(h[None, :, :, None], 2, 2).reshape(-1)
    np.testing.assert_array_equal(f(H), [6, 8, 3, 4])
    A = jax.jacrev(f)(H).reshape(4, 16)  # rows: dvec(H~)/dvec(H), row-major vec
    expected = np.zeros((4, 16))
    expected[[0, 1, 2, 3], [6 - 1, 8 - 1, 9 - 1, 16 - 1]] = 1
    np.testing.assert_array_equal(A, expected)


def test_ray_max_pool_routing_example():
    """Ray: 2x2 stride-2 pooling sends dy = [[dy1, dy3], [dy2, dy4]] to
    dx = [[0, 0, dy3, 0], [0, dy1, 0, 0], [dy2, 0, 0, 0], [0, 0, 0, dy4]]. The note's input picture is not in
    the text; any x whose window maxima sit at those places gives the routing."""
    x = jnp.array([[1.0, 2, 9, 3], [4, 8, 5, 6], [7, 1, 2, 0], [3, 5, 4, 9]])
    dy1, dy2, dy3, dy4 = 1.5, -2.0, 3.25, 0.5
    _, pullback = jax.vjp(lambda a: jc.max_pool2d(a[None, :, :, None], 2)[0, :, :, 0], x)
    (dx,) = pullback(jnp.array([[dy1, dy3], [dy2, dy4]]))
    np.testing.assert_array_equal(dx, [[0, 0, dy3, 0], [0, dy1, 0, 0], [dy2, 0, 0, 0], [0, 0, 0, dy4]])


def test_ties_hand_routes_to_first_maximum_autodiff_splits():
    """At a tied window the max is not differentiable. Hand (Ray: "only a single index is chosen") sends all of
    Delta to the first maximum in row-major window order; autodiff of the max shares it equally. lax's
    reduce_window gradient (what Flax uses) also picks the first. Away from ties all three agree."""
    x = jnp.array([[5.0, 1, 2, 7], [5, 5, 3, 0]])[None, :, :, None]  # left window: a three-way tie at 5
    delta = jnp.array([[[[6.0], [2.0]]]])
    grads = {}
    for name, f in {
        "hand": lambda a: jc.max_pool2d(a, 2, grad="hand"),
        "autodiff": lambda a: jc.max_pool2d(a, 2, grad="autodiff"),
        "lax": lambda a: lax.reduce_window(a, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
    }.items():
        _, pullback = jax.vjp(f, x)
        grads[name] = np.asarray(pullback(delta)[0])[0, :, :, 0]
    np.testing.assert_array_equal(grads["hand"], [[6, 0, 0, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(grads["autodiff"], [[2, 0, 0, 2], [2, 2, 0, 0]])
    np.testing.assert_array_equal(grads["lax"], grads["hand"])
    # The untied right window is routed identically by all of them.
    np.testing.assert_array_equal(grads["autodiff"][:, 2:], grads["hand"][:, 2:])


def test_overlapping_windows_accumulate():
    """3x3 windows at stride 2 overlap: an entry that is the maximum of two windows receives both Deltas."""
    x = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(10.0)  # the shared centre row/column of all four windows
    x = x + jnp.arange(25.0).reshape(1, 5, 5, 1) * 1e-3  # break the ties among the zeros
    _, pullback = jax.vjp(lambda a: jc.max_pool2d(a, 3, 2), x)
    (dx,) = pullback(jnp.array([1.0, 2, 3, 4]).reshape(1, 2, 2, 1))
    assert dx[0, 2, 2, 0] == 10.0 and float(jnp.abs(dx).sum()) == 10.0


def test_stride_defaults_to_window():
    x = jnp.zeros((1, 8, 6, 1))
    assert jc.max_pool2d(x, 2).shape == (1, 4, 3, 1)
    assert jc.max_pool2d(x, 2, stride=1).shape == (1, 7, 5, 1)
    assert jc.avg_pool2d(x, (4, 3)).shape == (1, 2, 2, 1)


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_avg_pool_equals_conv_with_constant_filter(grad):
    """A_AvgPool is a depthwise convolution with a constant 1/K filter (padding counted as zeros)."""
    rng = np.random.default_rng(2)
    x = normal(rng, (2, 7, 6, 3), jnp.float64)
    c = x.shape[-1]
    w = jnp.einsum("ij,cd->ijcd", jnp.full((3, 2), 1 / 6), jnp.eye(c))  # [3, 2, C, C], diagonal in channels
    f_pool = lambda x: jc.avg_pool2d(x, (3, 2), (2, 1), "SAME", grad=grad)
    f_conv = lambda x: jc.conv2d(x, w, stride=(2, 1), padding="SAME", grad=grad)
    np.testing.assert_allclose(f_pool(x), f_conv(x), rtol=1e-12, atol=1e-15)
    g = normal(rng, f_pool(x).shape, jnp.float64)
    np.testing.assert_allclose(jax.vjp(f_pool, x)[1](g)[0], jax.vjp(f_conv, x)[1](g)[0], rtol=1e-12, atol=1e-15)


def test_window_count_above_int8_uses_wider_index():
    """P_pool indices are int8 up to 127 window entries; larger windows still route correctly."""
    x = distinct(np.random.default_rng(3), (1, 12, 12, 1), jnp.float32)
    results = assert_modes_agree(lambda x, **m: jc.max_pool2d(x, 12, **m), (x,), ("x",), jnp.float32,
                                 "max pool 12x12 window", VARIANTS)
    assert results["hand"][0].shape == (1, 1, 1, 1)


def test_nan_in_a_window_is_routed_alike_by_both_hand_paths():
    """Issue 13: the tiled fast path (stride = window, no padding) dropped Delta at a window holding NaN while the
    general path routed it to the NaN. Both now route it to the window's first NaN, as argmax and PyTorch do;
    autodiff gives NaN to every entry of such a window. The same 2x2 windows reach the general path through a
    bottom/right padding row that no window reads."""
    x = distinct(np.random.default_rng(4), (1, 4, 4, 1), jnp.float32)
    x = x.at[0, 0, 1, 0].set(jnp.nan).at[0, 1, 0, 0].set(jnp.nan).at[0, 3, 3, 0].set(jnp.nan)
    delta = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32).reshape(1, 2, 2, 1)
    grads = {}
    for name, padding in (("tiled", "VALID"), ("general", ((0, 1), (0, 1)))):
        z, pullback = jax.vjp(lambda a, padding=padding: jc.max_pool2d(a, 2, padding=padding), x)
        assert z.shape == (1, 2, 2, 1) and np.isnan(z[0, 0, 0, 0]) and np.isnan(z[0, 1, 1, 0])
        grads[name] = np.asarray(pullback(delta)[0])[0, :, :, 0]
    np.testing.assert_array_equal(grads["tiled"], grads["general"])
    assert grads["tiled"][0, 1] == 1.0 and grads["tiled"][1, 0] == 0.0  # the first NaN in row-major order
    assert grads["tiled"][3, 3] == 4.0
    _, pullback = jax.vjp(lambda a: jc.max_pool2d(a, 2, grad="autodiff"), x)
    assert np.isnan(np.asarray(pullback(delta)[0])[0, :2, :2, 0]).all()
