"""dense: hand equals autodiff and reproduces Lin eq. (19)-(21)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_modes_agree, normal

VARIANTS = {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_hand_equals_autodiff(dtype, bias):
    rng = np.random.default_rng(0)
    x, w = normal(rng, (5, 7), dtype), normal(rng, (7, 3), dtype)
    args, names = ((x, w, normal(rng, (3,), dtype)), ("x", "w", "b")) if bias else ((x, w), ("x", "w"))
    assert_modes_agree(lambda *a, **m: jc.dense(*a, **m), args, names, dtype, "dense", VARIANTS)


def test_finite_differences_float64():
    rng = np.random.default_rng(1)
    args = normal(rng, (4, 6), jnp.float64), normal(rng, (6, 3), jnp.float64), normal(rng, (3,), jnp.float64)
    check_grads(jc.dense, args, order=1, modes=["rev"])


def test_lin_equations_19_to_21_per_example():
    """For one example (notes' column convention s = W z + b, W = w^T): dW = Delta z^T, db = Delta,
    dz = W^T Delta; the batch gradient is their sum over examples."""
    rng = np.random.default_rng(2)
    x, w, b = normal(rng, (3, 4), jnp.float64), normal(rng, (4, 2), jnp.float64), normal(rng, (2,), jnp.float64)
    delta = normal(rng, (3, 2), jnp.float64)
    _, pullback = jax.vjp(jc.dense, x, w, b)
    dx, dw, db = pullback(delta)
    W = w.T
    for i in range(3):
        np.testing.assert_allclose(dx[i], W.T @ delta[i], rtol=1e-14)  # eq. (21)
    np.testing.assert_allclose(dw.T, sum(np.outer(delta[i], x[i]) for i in range(3)), rtol=1e-14)  # eq. (19)
    np.testing.assert_allclose(db, delta.sum(0), rtol=1e-14)  # eq. (20)
