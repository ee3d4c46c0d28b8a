"""batch_norm: hand equals autodiff for every output and input in every dtype, finite differences, the compact
form against NumPy, synchronised statistics over a mapped axis equal the unsplit batch's, bad input named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from tests.helpers import DTYPES, assert_close, normal

rng = np.random.default_rng(0)


def inputs(dtype, shape=(4, 3, 5, 6)):
    c = shape[-1]
    x = normal(rng, shape, dtype) * 2 + 1
    gamma, beta = normal(rng, (c,), dtype), normal(rng, (c,), dtype)
    mean, var = normal(rng, (c,), dtype), jnp.asarray(rng.uniform(0.5, 2.0, c), dtype)
    return x, gamma, beta, mean, var


def outputs_and_vjps(args, train: bool):
    """Each mode's outputs and the cotangents of its inputs for one random cotangent of every output."""
    x = args[0]
    c = x.shape[-1]
    cot = (normal(rng, x.shape, x.dtype), *(normal(rng, (c,), jnp.promote_types(x.dtype, jnp.float32))
                                            for _ in range(2)))

    @jax.jit
    def run(args, cot):
        results = {}
        for grad in ("hand", "autodiff"):
            if train:
                f = lambda x, g, b, grad=grad: jc.batch_norm(x, g, b, grad=grad)
            else:
                f = lambda x, g, b, m, v, grad=grad: jc.batch_norm(x, g, b, mean=m, var=v, grad=grad)
            out, pullback = jax.vjp(f, *args)
            results[grad] = (out, pullback(cot))
        return results

    return run(args, cot)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_equals_autodiff(dtype, train):
    x, gamma, beta, mean, var = inputs(dtype)
    args = (x, gamma, beta) if train else (x, gamma, beta, mean, var)
    results = outputs_and_vjps(args, train)
    (out_h, g_h), (out_a, g_a) = results["hand"], results["autodiff"]
    for name, a, b in zip(("y", "mean", "var"), out_h, out_a):
        assert_close(a, b, dtype, f"batch_norm {name}")
    for name, a, b in zip(("x", "gamma", "beta", "mean", "var"), g_h, g_a):
        assert a.dtype == b.dtype, name
        assert_close(a, b, dtype, f"batch_norm d/d{name}")


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 3, 4)])
def test_finite_differences_float64(shape):
    x, gamma, beta, mean, var = inputs(jnp.float64, shape)

    def train(x, g, b):
        y, mu, v = jc.batch_norm(x, g, b)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(mu)) + jnp.sum(v**2)

    check_grads(jax.jit(train), (x, gamma, beta), order=1, modes=["rev"])
    check_grads(jax.jit(lambda x, g, b, m, v: jnp.sum(jnp.sin(jc.batch_norm(x, g, b, mean=m, var=v)[0]))),
                (x, gamma, beta, mean, var), order=1, modes=["rev"])


def test_forward_and_the_compact_form_against_numpy():
    """y = gamma (x - mu) / sqrt(v + eps) + beta with the biased variance; dx = (1/m) (gamma / sigma)
    (m Delta - sum Delta - x_hat sum(Delta x_hat)), sums per channel over the m = N H W entries."""
    x, gamma, beta, _, _ = inputs(jnp.float64)
    delta = normal(rng, x.shape, jnp.float64)
    (y, mu, v), pullback = jax.vjp(lambda x, g, b: jc.batch_norm(x, g, b, eps=1e-3), x, gamma, beta)
    dx, dgamma, dbeta = pullback((delta, jnp.zeros_like(mu), jnp.zeros_like(v)))
    xn, dn, g, b = (np.asarray(a) for a in (x, delta, gamma, beta))
    m = xn.size // xn.shape[-1]
    mu_np, v_np = xn.mean(axis=(0, 1, 2)), xn.var(axis=(0, 1, 2))
    sigma = np.sqrt(v_np + 1e-3)
    x_hat = (xn - mu_np) / sigma
    np.testing.assert_allclose(y, g * x_hat + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mu, mu_np, rtol=1e-13)
    np.testing.assert_allclose(v, v_np, rtol=1e-13)
    compact = (g / sigma) * (m * dn - dn.sum(axis=(0, 1, 2)) - x_hat * (dn * x_hat).sum(axis=(0, 1, 2))) / m
    np.testing.assert_allclose(dx, compact, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dgamma, (dn * x_hat).sum(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(dbeta, dn.sum(axis=(0, 1, 2)), rtol=1e-12)


@pytest.mark.parametrize("grad", ["hand", "autodiff"])
def test_synchronised_statistics_over_a_mapped_axis_equal_the_whole_batch(grad):
    """4 'devices' (a vmapped axis named "d", as the trainer's shard_map) each with 3 examples, each taking the
    gradient of its share of the loss: the statistics, and every gradient summed over the devices, equal batch
    norm of the 12 examples at once (the backward's cross-device sums carry the other devices' cotangents)."""
    x, gamma, beta, _, _ = inputs(jnp.float64, (12, 2, 2, 3))

    def whole(x, g, b):
        y, mu, v = jc.batch_norm(x, g, b, grad=grad)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mu * v)

    def device(xd, g, b):  # its examples' terms, and a quarter of the shared statistics' term
        y, mu, v = jc.batch_norm(xd, g, b, axis_name="d", grad=grad)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mu * v) / 4, mu

    @jax.jit
    def split(x, g, b):
        (_, mu), grads = jax.vmap(jax.value_and_grad(device, argnums=(0, 1, 2), has_aux=True),
                                  in_axes=(0, None, None), axis_name="d")(x.reshape(4, 3, *x.shape[1:]), g, b)
        return mu, (grads[0].reshape(x.shape), grads[1].sum(axis=0), grads[2].sum(axis=0))

    mu, g_split = split(x, gamma, beta)
    np.testing.assert_allclose(mu, jnp.broadcast_to(x.mean(axis=(0, 1, 2)), mu.shape), rtol=1e-13)
    g_whole = jax.grad(whole, argnums=(0, 1, 2))(x, gamma, beta)
    for name, a, b in zip(("x", "gamma", "beta"), g_split, g_whole):
        assert_close(a, b, jnp.float64, f"d/d{name}")


@pytest.mark.parametrize("call, error, match", [
    (lambda x, c: jc.batch_norm(x[0], c, c), ValueError, r"x must have rank 2 \[N, C\] or 4"),
    (lambda x, c: jc.batch_norm(x, c[:2], c), ValueError, r"gamma must have shape \(3,\), one entry per channel"),
    (lambda x, c: jc.batch_norm(x, c, c, mean=c), ValueError, "pass both mean and var"),
    (lambda x, c: jc.batch_norm(x, c, c, eps=0), ValueError, "eps must be a number > 0"),
    (lambda x, c: jc.batch_norm(x, c, c, grad="tangent"), ValueError, "grad must be 'hand' or 'autodiff'"),
    (lambda x, c: jc.batch_norm(x.astype(jnp.int32), c, c), TypeError, "x must have a floating-point dtype"),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=f"batch_norm: {match}"):
        call(jnp.ones((2, 2, 2, 3)), jnp.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_hand_equals_autodiff_and_keeps_the_expectation(dtype):
    x = normal(rng, (64, 5, 5, 4), dtype)
    key = jax.random.key(3)
    results = {}
    for grad in ("hand", "autodiff"):
        y, pullback = jax.vjp(lambda x, grad=grad: jc.dropout(x, 0.25, key, grad=grad), x)
        results[grad] = (y, pullback(jnp.ones_like(y))[0])
    for a, b in zip(results["hand"], results["autodiff"]):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    scale = np.asarray(results["hand"][1], np.float64)  # dy/dx: the scaled mask m / (1 - rate)
    np.testing.assert_array_equal(np.unique(scale), np.array([0, 4 / 3], dtype).astype(np.float64))
    assert abs(np.mean(scale == 0) - 0.25) < 0.02
    assert abs(float(np.mean(scale)) - 1.0) < 0.03  # E[y] = x


def test_dropout_keys_masks_and_errors():
    x = jnp.ones((8, 10))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(jc.dropout(x, 0.5, k1), jc.dropout(x, 0.5, k1))  # the same key, the same mask
    assert not np.array_equal(jc.dropout(x, 0.5, k1), jc.dropout(x, 0.5, k2))
    np.testing.assert_array_equal(jc.dropout(x, 0.0, k1), x)
    with pytest.raises(ValueError, match=r"dropout: rate must be in \[0, 1\), got 1.0"):
        jc.dropout(x, 1.0, k1)
    with pytest.raises(TypeError, match=r"dropout: key must be one PRNG key from jax\.random\.key"):
        jc.dropout(x, 0.5, jax.random.split(k1, 2))
