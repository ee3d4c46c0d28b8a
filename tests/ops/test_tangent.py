"""Hand tangent rules (R-op, Jv): equal to jax.jvp of each op's autodiff twin, and adjoint to the hand VJP.

For every op f with hand tangent rule Jv and hand VJP J^T u (its ``grad="hand"`` custom VJP):

    Jv   == jax.jvp(f(grad="autodiff"))          float64 1e-10, float32 1e-5 (relative to the largest entry)
    <u, Jv> == <J^T u, v>                         float64 1e-12 (the two hand rules are transposes)

on random inputs, and on the geometry classes of test_geometry.py for the windowed ops. At kinks (tied max-pool
windows) the hand tangent takes the first maximum's entry, as the hand VJP routes there: it differs from autodiff
and stays adjoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcnn as jc
from jaxcnn import ops
from tests.helpers import assert_close, distinct, normal
from tests.ops.test_geometry import CLASSES, draw_axes

rng = np.random.default_rng(0)


def cases(dtype):
    """(name, op, primals, settings) for every op, inputs with no ties and no ReLU input at 0."""
    x = normal(rng, (2, 6, 5, 3), dtype)
    w, b = normal(rng, (3, 2, 3, 4), dtype), normal(rng, (4,), dtype)
    flat = normal(rng, (3, 7), dtype)
    conv = dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2))
    return [
        ("conv2d im2col", ops.conv2d, (x, w, b), {**conv, "rule": "im2col", "store_phi": False}),
        ("conv2d im2col stored", ops.conv2d, (x, w, b), {**conv, "rule": "im2col", "store_phi": True}),
        ("conv2d flip", ops.conv2d, (x, w, b), {**conv, "rule": "flip"}),
        ("conv2d no bias", ops.conv2d, (x, w), {"padding": "SAME"}),
        ("conv_relu_pool", ops.conv_relu_pool, (x, w, b), {"padding": 1, "pool": 2, "rule": "im2col"}),
        ("conv_relu_pool flip", ops.conv_relu_pool, (x, w, b), {"padding": 1, "pool": 2, "rule": "flip"}),
        ("max_pool2d tiled", ops.max_pool2d, (distinct(rng, (2, 6, 5, 3), dtype),), {"window": 2}),
        ("max_pool2d general", ops.max_pool2d, (distinct(rng, (2, 6, 5, 3), dtype),),
         {"window": 3, "stride": 2, "padding": "SAME"}),
        ("avg_pool2d", ops.avg_pool2d, (x,), {"window": (3, 2), "stride": 1, "padding": 1}),
        ("relu", ops.relu, (x,), {}),
        ("sigmoid", ops.sigmoid, (x,), {}),
        ("tanh", ops.tanh, (x,), {}),
        ("leaky_relu", ops.leaky_relu, (x,), {"negative_slope": 0.2}),
        ("elu", ops.elu, (x,), {"alpha": 0.7}),
        ("gelu tanh", ops.gelu, (x,), {"approximate": True}),
        ("gelu erf", ops.gelu, (x,), {"approximate": False}),
        ("softmax", ops.softmax, (flat,), {}),
        ("global_avg_pool", ops.global_avg_pool, (x,), {}),
        ("dense", ops.dense, (flat, normal(rng, (7, 4), dtype), normal(rng, (4,), dtype)), {}),
        ("squared_error", ops.squared_error, (flat, normal(rng, (3, 7), dtype)), {}),
        ("softmax_cross_entropy", ops.softmax_cross_entropy, (flat, jax.nn.softmax(normal(rng, (3, 7), dtype))), {}),
    ]


def check(op, primals, kwargs, dtype, what):
    """Jv against jax.jvp of the autodiff twin; in float64 also <u, Jv> = <J^T u, v>."""
    tangents = tuple(normal(rng, p.shape, dtype) for p in primals)
    hand_settings = {k: v for k, v in kwargs.items() if k not in ("rule", "store_phi")}
    rule_settings = {k: v for k, v in kwargs.items() if k in ("rule", "store_phi")}

    @jax.jit
    def run(primals, tangents):
        y, jv = ops.JVP[op](primals, tangents, **kwargs)
        y_ad, jv_ad = jax.jvp(lambda *a: op(*a, **hand_settings, **rule_settings, grad="autodiff"), primals,
                              tangents)
        u = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))  # a fixed, dense cotangent
        _, pullback = jax.vjp(lambda *a: op(*a, **hand_settings, **rule_settings, grad="hand"), *primals)
        jtu = pullback(u)
        return y, jv, y_ad, jv_ad, jnp.vdot(u, jv), sum(jnp.vdot(g, t) for g, t in zip(jtu, tangents))

    y, jv, y_ad, jv_ad, u_jv, jtu_v = run(primals, tangents)
    assert_close(y, y_ad, dtype, f"{what} output")
    assert_close(jv, jv_ad, dtype, f"{what} Jv vs jax.jvp of autodiff")
    if dtype == jnp.float64:
        assert abs(float(u_jv - jtu_v)) <= 1e-12 * max(1.0, abs(float(u_jv))), (what, float(u_jv), float(jtu_v))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_every_tangent_rule_equals_jvp_of_autodiff_and_is_adjoint_to_the_hand_vjp(dtype):
    found = set()
    for name, op, primals, kwargs in cases(dtype):
        check(op, primals, kwargs, dtype, f"{name} {dtype.__name__}")
        found.add(op)
    assert found == set(ops.JVP)


def test_zero_tangents_may_be_none():
    x, w, b = normal(rng, (1, 4, 4, 2), jnp.float64), normal(rng, (3, 3, 2, 3), jnp.float64), jnp.ones(3)
    _, ds = jc.ops.conv2d_jvp((x, w, b), (None, jnp.ones_like(w), None), padding=1)
    _, ds_ad = jax.jvp(lambda w: jc.conv2d(x, w, b, padding=1, grad="autodiff"), (w,), (jnp.ones_like(w),))
    assert_close(ds, ds_ad, jnp.float64, "conv2d Jv with dx = db = 0")
    assert jnp.all(jc.ops.relu_jvp((x,), (None,))[1] == 0)
    with pytest.raises(ValueError, match=r"conv2d_jvp: the tangent of w must have w's shape \(3, 3, 2, 3\)"):
        jc.ops.conv2d_jvp((x, w, b), (None, jnp.ones(3), None))
    with pytest.raises(ValueError, match="conv2d_jvp: expected primals and tangents of equal length"):
        jc.ops.conv2d_jvp((x, w, b), (None, None))


def test_at_a_tied_window_the_tangent_takes_the_first_maximum_and_stays_adjoint():
    """Kinks behave as the VJPs do: the hand tangent reads the first maximum (P_pool), autodiff averages the tied
    entries; <u, Jv> = <J^T u, v> holds exactly for the hand pair. At S = 0 both give ReLU a zero tangent."""
    x = jnp.array([[5.0, 1, 2, 7], [5, 5, 3, 0]])[None, :, :, None]
    dx = jnp.array([[1.0, 2, 3, 4], [5, 6, 7, 8]])[None, :, :, None]
    _, hand = jc.ops.max_pool2d_jvp((x,), (dx,), 2)
    _, auto = jax.jvp(lambda a: jc.max_pool2d(a, 2, grad="autodiff"), (x,), (dx,))
    assert hand.ravel().tolist() == [1.0, 4.0] and auto.ravel().tolist() == [(1 + 5 + 6) / 3, 4.0]
    u = jnp.array([[[[3.0], [-2.0]]]])
    (jtu,) = jax.vjp(lambda a: jc.max_pool2d(a, 2), x)[1](u)
    assert float(jnp.vdot(u, hand)) == float(jnp.vdot(jtu, dx))
    s = jnp.array([-1.0, 0.0, 2.0])
    assert jc.ops.relu_jvp((s,), (jnp.ones(3),))[1].tolist() == [0, 0, 1]
    assert jax.jvp(lambda a: jc.relu(a, grad="autodiff"), (s,), (jnp.ones(3),))[1].tolist() == [0, 0, 1]


@pytest.mark.parametrize("geometry_class", CLASSES)
@settings(max_examples=3)
@given(data=st.data())
def test_windowed_tangents_on_every_geometry_class(geometry_class, data):
    """conv2d (both rules), conv_relu_pool and max/avg pooling on the geometry classes of test_geometry.py."""
    (h, kh, sh, dh, top, bottom), (w_, kw, sw, dw, left, right) = draw_axes(data, "conv", geometry_class)
    geometry = dict(stride=(sh, sw), dilation=(dh, dw), padding=((top, bottom), (left, right)))
    x, w, b = normal(rng, (2, h, w_, 2), jnp.float64), normal(rng, (kh, kw, 2, 3), jnp.float64), jnp.ones(3)
    for rule in ("im2col", "flip"):
        check(ops.conv2d, (x, w, b), {**geometry, "rule": rule}, jnp.float64, f"conv2d {rule} {geometry}")
    out_hw = jax.eval_shape(lambda x: jc.conv2d(x, w, **geometry), x).shape[1:3]
    if min(out_hw) >= 2:
        check(ops.conv_relu_pool, (x, w, b), {**geometry, "pool": 2}, jnp.float64, f"block {geometry}")
    (h, kh, sh, _, top, bottom), (w_, kw, sw, _, left, right) = draw_axes(data, "pool", geometry_class)
    pooling = dict(window=(kh, kw), stride=(sh, sw), padding=((top, bottom), (left, right)))
    x = distinct(rng, (1, h, w_, 2), jnp.float64)
    for op in (ops.max_pool2d, ops.avg_pool2d):
        check(op, (x,), pooling, jnp.float64, f"{op.__name__} {pooling}")


@pytest.mark.parametrize("loss,gn", [(jc.squared_error, jc.ops.squared_error_gn),
                                     (jc.softmax_cross_entropy, jc.ops.softmax_cross_entropy_gn)])
def test_gauss_newton_b_is_each_examples_hessian(loss, gn):
    """B u = d^2 xi_i / dz_i^2 u_i for every example: 2I (squared), diag(p) - p p^T (cross-entropy)."""
    z, u = normal(rng, (4, 5), jnp.float64) * 3, normal(rng, (4, 5), jnp.float64)
    labels = jnp.array([0, 4, 2, 2])
    xi = lambda z_i, y_i: loss(z_i[None], y_i[None], grad="autodiff")
    expected = jax.vmap(lambda z_i, y_i, u_i: jax.jvp(jax.grad(lambda a: xi(a, y_i)), (z_i,), (u_i,))[1])(z, labels, u)
    np.testing.assert_allclose(gn(z, u), expected, rtol=1e-12, atol=1e-15)
