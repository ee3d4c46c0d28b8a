r"""Batch normalization (Ioffe and Szegedy), its backward pass derived from the computational graph.

For one channel, over its m entries in the batch (N for [N, C]; N H W for [N, H, W, C]; and over every device of
``axis_name``, synchronised batch norm), the forward graph is (Sadeghzadeh's computational graphs: one node a line)

    mu = (1/m) sum_i x_i                    v = (1/m) sum_i (x_i - mu)^2        sigma = sqrt(v + eps)
    x_hat_i = (x_i - mu) / sigma            y_i = gamma x_hat_i + beta

and the backward pass walks it in reverse with Delta_i = dxi/dy_i:

    dbeta = sum_i Delta_i                   dgamma = sum_i Delta_i x_hat_i          g_i := gamma Delta_i
    dsigma = -(1/sigma) sum_i g_i x_hat_i   (x_hat_i depends on sigma through 1/sigma)
    dv = dsigma / (2 sigma)                 (sigma = sqrt(v + eps))
    dmu = -(1/sigma) sum_i g_i               (the term through v vanishes: sum_i (x_i - mu) = 0)
    dx_i = g_i / sigma + dv 2 (x_i - mu) / m + dmu / m

Substituting dv and dmu, with x_i - mu = sigma x_hat_i, gives the classic compact form

    dx = (1/m) (gamma / sigma) (m Delta - sum_i Delta_i - x_hat sum_i Delta_i x_hat_i)

one pass over Delta for its two sums, and a second elementwise one. It needs x_hat and sigma from the forward
pass, which the hand rule stores (not x). The op also returns the batch's mu and v (for the running averages);
cotangents reaching them add (1/m) dmu_out + (2/m) sigma x_hat dv_out to dx, so the rule is exact for every output.

In evaluation mode the statistics are given (the running averages) and y = gamma (x - mean) / sigma + beta is an
affine map per channel: dx = gamma Delta / sigma, dgamma and dbeta as above, and the given mean and var get
-sum_i g_i / sigma and -(1/2) sum_i g_i x_hat_i / sigma^2.

Statistics and sums are computed in float32 at least (``bfloat16`` inputs keep their float32 sums), y and dx are
returned in x's dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops import _args


def batch_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, mean: jax.Array | None = None,
               var: jax.Array | None = None, eps: float = 1e-5, axis_name: str | None = None,
               grad: str = "hand") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalization over every axis but the last (channels); hand backward in the compact form derived in
    the module docstring.

    Args:
      x: [N, C] or [N, H, W, C].
      gamma, beta: [C], the scale and shift.
      mean, var: [C] each, or both None. None: training mode, normalising with the batch's statistics (biased
        variance, as in the forward graph); given: evaluation mode, normalising with them (running averages).
      eps: added to the variance, > 0.
      axis_name: a mapped axis (``shard_map``, ``pmap``) whose devices share the statistics (synchronised batch
        norm: the same result for any split of the batch); None: this device's batch alone.
      grad: "hand" or "autodiff" (JAX differentiating the same forward).

    Returns:
      ``(y, mean, var)``: y in x's dtype and shape; the statistics used, [C] in float32 at least (the batch's in
      training mode, for the running averages; the given ones otherwise).
    """
    x = _args.array("batch_norm", "x", x)
    if x.ndim not in (2, 4):
        raise ValueError(f"batch_norm: x must have rank 2 [N, C] or 4 [N, H, W, C], got shape {tuple(x.shape)}")
    c = x.shape[-1]
    for name, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        if value is not None:
            value = _args.array("batch_norm", name, value, rank=1, layout="[C]")
            if value.shape != (c,):
                raise ValueError(f"batch_norm: {name} must have shape ({c},), one entry per channel of x, got "
                                 f"{tuple(value.shape)}")
    if (mean is None) != (var is None):
        raise ValueError("batch_norm: pass both mean and var (evaluation mode) or neither (training mode)")
    if mean is None:
        axes = dict(enumerate(("N", "H", "W")[:x.ndim - 1]))
        _args.nonempty("batch_norm", "x", x, axes, f"training mode takes each channel's mean and variance over "
                                                   f"{', '.join(axes.values())}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"batch_norm: eps must be a number > 0, got {eps!r}")
    _args.choice("batch_norm", "grad", grad, ("hand", "autodiff"))
    gamma, beta = jnp.asarray(gamma), jnp.asarray(beta)
    eps = float(eps)
    if mean is None:
        return (_train_forward(x, gamma, beta, eps, axis_name) if grad == "autodiff" else
                _train_hand(x, gamma, beta, eps, axis_name))
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    y = _eval_forward(x, gamma, beta, mean, var, eps) if grad == "autodiff" else \
        _eval_hand(x, gamma, beta, mean, var, eps)
    ct = _args.compute_dtype(x)
    return y, mean.astype(ct), var.astype(ct)


def _mean(a: jax.Array, axis_name: str | None) -> jax.Array:
    """Per channel, over every axis but the last, and over the devices of ``axis_name``."""
    axes = tuple(range(a.ndim - 1))
    if axis_name is None:
        return jnp.mean(a, axis=axes)
    return lax.pmean(jnp.mean(a, axis=axes), axis_name)  # every device holds an equal share of the batch


def _train_forward(x, gamma, beta, eps, axis_name):
    """(y, mu, v): the one forward pass of both modes (the hand rule's, which also keeps x_hat and sigma)."""
    return _train_fwd(x, gamma, beta, eps, axis_name)[0]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _train_hand(x, gamma, beta, eps, axis_name):
    return _train_forward(x, gamma, beta, eps, axis_name)


def _train_fwd(x, gamma, beta, eps, axis_name):
    ct = _args.compute_dtype(x)
    xc = x.astype(ct)
    mu = _mean(xc, axis_name)
    v = _mean(jnp.square(xc - mu), axis_name)
    sigma = jnp.sqrt(v + eps)
    x_hat = (xc - mu) / sigma
    y = (gamma.astype(ct) * x_hat + beta.astype(ct)).astype(x.dtype)
    return (y, mu, v), (x_hat, sigma, gamma, beta)


def _train_bwd(eps, axis_name, saved, cotangents):
    x_hat, sigma, gamma, beta = saved
    delta, dmu_out, dv_out = cotangents
    ct, x_dtype = x_hat.dtype, delta.dtype  # y, and so its cotangent, has x's dtype
    delta = delta.astype(ct)
    axes = tuple(range(delta.ndim - 1))
    g = gamma.astype(ct) * delta
    # the compact form: (1/sigma) (g - mean(g) - x_hat mean(g x_hat)), means over the m entries of each channel
    dx = (g - _mean(g, axis_name) - x_hat * _mean(g * x_hat, axis_name)) / sigma
    m = x_hat.size // x_hat.shape[-1]
    if axis_name is not None:  # every device's mu and v are the same: their cotangents add up over the devices
        m, dmu_out, dv_out = m * lax.psum(1, axis_name), lax.psum(dmu_out, axis_name), lax.psum(dv_out, axis_name)
    dx = dx + (dmu_out + 2 * sigma * x_hat * dv_out) / m  # the batch statistics as outputs
    dgamma, dbeta = jnp.sum(delta * x_hat, axis=axes), jnp.sum(delta, axis=axes)
    # gamma and beta are replicated over axis_name: their cotangents are this device's share, as for any param
    return dx.astype(x_dtype), dgamma.astype(gamma.dtype), dbeta.astype(beta.dtype)


_train_hand.defvjp(_train_fwd, _train_bwd)


def _eval_forward(x, gamma, beta, mean, var, eps):
    return _eval_fwd(x, gamma, beta, mean, var, eps)[0]


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _eval_hand(x, gamma, beta, mean, var, eps):
    return _eval_forward(x, gamma, beta, mean, var, eps)


def _eval_fwd(x, gamma, beta, mean, var, eps):
    ct = _args.compute_dtype(x)
    sigma = jnp.sqrt(var.astype(ct) + eps)
    x_hat = (x.astype(ct) - mean.astype(ct)) / sigma
    y = (gamma.astype(ct) * x_hat + beta.astype(ct)).astype(x.dtype)
    return y, (x_hat, sigma, gamma, beta, mean, var)


def _eval_bwd(eps, saved, delta):
    x_hat, sigma, gamma, beta, mean, var = saved
    ct, x_dtype = x_hat.dtype, delta.dtype
    delta = delta.astype(ct)
    axes = tuple(range(delta.ndim - 1))
    g = gamma.astype(ct) * delta
    dmean = -jnp.sum(g, axis=axes) / sigma
    dvar = -0.5 * jnp.sum(g * x_hat, axis=axes) / jnp.square(sigma)
    return ((g / sigma).astype(x_dtype), jnp.sum(delta * x_hat, axis=axes).astype(gamma.dtype),
            jnp.sum(delta, axis=axes).astype(beta.dtype), dmean.astype(mean.dtype), dvar.astype(var.dtype))


_eval_hand.defvjp(_eval_fwd, _eval_bwd)


def _keep_mask(key: jax.Array, rate: float, shape, dtype) -> jax.Array:
    """1 / (1 - rate) where an entry is kept (probability 1 - rate), else 0: inverted dropout's scaled mask."""
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.zeros((), dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dropout_hand(x, key, rate):
    return x * _keep_mask(key, rate, x.shape, x.dtype)


def _dropout_fwd(x, key, rate):
    return x * _keep_mask(key, rate, x.shape, x.dtype), key  # the key, not the mask: it is drawn again


def _dropout_bwd(rate, key, delta):
    return delta * _keep_mask(key, rate, delta.shape, delta.dtype), None


_dropout_hand.defvjp(_dropout_fwd, _dropout_bwd)


def dropout(x: jax.Array, rate: float, key: jax.Array, *, grad: str = "hand") -> jax.Array:
    """Inverted dropout: y = x (.) m / (1 - rate), m_i ~ Bernoulli(1 - rate) drawn from ``key``, so that E[y] = x
    and evaluation needs no rescaling (it is the identity there). y is linear in x with the diagonal Jacobian
    diag(m) / (1 - rate), so the hand backward is the same mask: dx = Delta (.) m / (1 - rate). It stores the key,
    not the mask, and draws the mask again (Lin's spirit: keep what the backward needs, as small as it can be).

    Args:
      x: any shape, floating point.
      rate: the probability of dropping an entry, in [0, 1).
      key: a JAX PRNG key (``jax.random.key``); the same key gives the same mask.
      grad: "hand" or "autodiff".
    """
    x = _args.array("dropout", "x", x)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate!r}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
        raise TypeError(f"dropout: key must be one PRNG key from jax.random.key, got "
                        f"{getattr(key, 'dtype', type(key).__name__)} {getattr(key, 'shape', '')}")
    _args.choice("dropout", "grad", grad, ("hand", "autodiff"))
    if rate == 0:
        return x
    return x * _keep_mask(key, float(rate), x.shape, x.dtype) if grad == "autodiff" else \
        _dropout_hand(x, key, float(rate))
