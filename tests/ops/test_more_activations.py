"""leaky_relu, elu, gelu (both forms), softmax as a layer and global average pooling: hand equals autodiff in
every dtype, finite differences in float64, the derivatives written in the docstrings, kinks, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import expit
from scipy.stats import norm

import jaxcnn as jc
from tests.helpers import DTYPES, assert_modes_agree, normal

VARIANTS = {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}, "tangent": {"grad": "tangent"}}
OPS = {
    "leaky_relu": lambda x, **m: jc.leaky_relu(x, 0.2, **m),
    "elu": lambda x, **m: jc.elu(x, 0.7, **m),
    "gelu tanh": lambda x, **m: jc.gelu(x, **m),
    "gelu erf": lambda x, **m: jc.gelu(x, approximate=False, **m),
    "softmax": lambda x, **m: jc.softmax(x, **m),
    "global_avg_pool": lambda x, **m: jc.global_avg_pool(x, **m),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPS))
def test_hand_equals_autodiff(name, dtype):
    x = normal(np.random.default_rng(0), (3, 5, 4, 2), dtype) * 3
    assert_modes_agree(OPS[name], (x,), ("x",), dtype, name, VARIANTS)


@pytest.mark.parametrize("name", list(OPS))
def test_finite_differences_float64(name):
    x = normal(np.random.default_rng(1), (2, 3, 4, 3), jnp.float64)
    check_grads(jax.jit(lambda x: OPS[name](x)), (x,), order=1, modes=["rev"])


def test_the_derivatives_are_those_of_the_docstrings():
    """sigma'(S) in closed form (SciPy's normal CDF and density for GELU) against each hand rule, float64."""
    s = jnp.linspace(-6.0, 6.0, 241, dtype=jnp.float64)
    slope = lambda f: jax.vmap(jax.grad(f))(s)
    np.testing.assert_allclose(slope(lambda v: jc.leaky_relu(v, 0.2)), np.where(s > 0, 1, 0.2), rtol=0)
    np.testing.assert_allclose(slope(lambda v: jc.elu(v, 0.7)), np.where(s > 0, 1, 0.7 * np.exp(s)), rtol=1e-15)
    np.testing.assert_allclose(slope(lambda v: jc.gelu(v, approximate=False)),
                               norm.cdf(s) + s * norm.pdf(s), rtol=1e-13, atol=1e-15)  # atol: the zero near S = -0.75
    u, du = np.sqrt(2 / np.pi) * (s + 0.044715 * s**3), np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * s**2)
    # (1 + tanh u) / 2 and (1 - tanh^2 u) / 2 as logistic functions, exact where 1 + tanh u cancels
    np.testing.assert_allclose(slope(jc.gelu), expit(2 * u) + 2 * s * expit(2 * u) * expit(-2 * u) * du,
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(jc.gelu(s), s * expit(2 * u), rtol=1e-14)
    np.testing.assert_allclose(jc.gelu(s, approximate=False), s * norm.cdf(s), rtol=1e-14)
    np.testing.assert_allclose(jc.gelu(s), jax.nn.gelu(s, approximate=True), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jc.gelu(s, approximate=False), jax.nn.gelu(s, approximate=False), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_kinks_take_the_left_derivative_in_both_modes_and_nothing_overflows(grad):
    """At S = 0 leaky ReLU and ELU give a and alpha (the S <= 0 branch), as ReLU gives 0; ELU's discarded branch
    e^S at S = 1000 would be Inf, and its derivative Inf * 0 = NaN, were it not clamped."""
    assert float(jax.grad(lambda s: jc.leaky_relu(s, 0.2, grad=grad))(0.0)) == pytest.approx(0.2)
    assert float(jax.grad(lambda s: jc.elu(s, 0.7, grad=grad))(0.0)) == pytest.approx(0.7)
    big = jnp.array([1000.0, -1000.0], jnp.float32)
    assert jax.grad(lambda s: jc.elu(s, grad=grad).sum())(big).tolist() == [1.0, 0.0]
    y, pullback = jax.vjp(jc.leaky_relu, jnp.array([jnp.nan, -1.0]))
    assert np.isnan(y[0]) and pullback(jnp.ones(2))[0].tolist() == [1.0, 0.01]  # NaN passes Delta on


def test_elu_from_its_input_is_accurate_where_the_output_form_cancels():
    """In bfloat16 at S = -5: alpha e^S from S is within bfloat16's rounding; y + alpha from the output is not."""
    s = jnp.array([-5.0], jnp.bfloat16)
    hand = float(jax.grad(lambda v: jc.elu(v).sum())(s)[0])
    exact = float(np.exp(-5.0))
    assert abs(hand - exact) / exact < 2**-7
    y = jc.elu(s)
    assert abs(float(y[0] + 1) - exact) / exact > 0.05


def test_softmax_backward_is_the_jacobian_vector_form():
    """J = diag(y) - y y^T (Sadeghzadeh); the hand VJP y (.) (Delta - <Delta, y>) equals J^T Delta, row by row."""
    z = normal(np.random.default_rng(3), (4, 6), jnp.float64)
    delta = normal(np.random.default_rng(4), (4, 6), jnp.float64)
    y, pullback = jax.vjp(jc.softmax, z)
    expected = np.stack([(np.diag(r) - np.outer(r, r)).T @ d for r, d in zip(np.asarray(y), np.asarray(delta))])
    np.testing.assert_allclose(pullback(delta)[0], expected, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-15)
    assert np.all(np.isfinite(jc.softmax(jnp.array([[1e4, 0.0, -1e4]]))))  # the shift by the maximum


def test_global_average_pooling_spreads_delta_evenly():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float64).reshape(2, 3, 4, 5)
    z, pullback = jax.vjp(jc.global_avg_pool, x)
    np.testing.assert_allclose(z, np.asarray(x).mean(axis=(1, 2)))
    delta = jnp.arange(10.0, dtype=jnp.float64).reshape(2, 5)
    np.testing.assert_allclose(pullback(delta)[0], np.broadcast_to(np.asarray(delta)[:, None, None] / 12, x.shape),
                               rtol=1e-15)
    np.testing.assert_allclose(jc.global_avg_pool(x), jc.avg_pool2d(x, (3, 4))[:, 0, 0])


@pytest.mark.parametrize("call, error, match", [
    (lambda x: jc.leaky_relu(x, -0.1), ValueError, "leaky_relu: negative_slope must be a finite number >= 0"),
    (lambda x: jc.elu(x, 0.0), ValueError, "elu: alpha must be a finite number > 0, got 0.0"),
    (lambda x: jc.gelu(x, approximate="yes"), TypeError, "gelu: approximate must be True or False"),
    (lambda x: jc.global_avg_pool(x[0]), ValueError, r"global_avg_pool: x must have rank 4 \[N, H, W, C\]"),
    (lambda x: jc.softmax(x[0, 0, 0, 0]), ValueError, "softmax: x must have at least one axis"),
])
def test_bad_settings_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(jnp.ones((1, 2, 2, 1)))
