"""Shared test tools: random inputs, one-jit VJPs of several gradient modes, and tolerance checks."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = (jnp.float64, jnp.float32, jnp.bfloat16)
# Relative to the largest reference entry: float64 and float32 as the issue asks. bfloat16 (8-bit significand)
# loosely: hand and autodiff round in different places, and where a gradient is small next to its cotangent
# (saturated tanh) either can be several percent from the exact value (autodiff's tanh rule 6%, ours 3%, against
# float64 on the same inputs). A wrong rule is off by O(1): a flipped kernel gives ~1.0.
TOLERANCE = {jnp.dtype(jnp.float64): 1e-10, jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-1}

# (op family, geometry class) -> examples drawn by tests/ops/test_geometry.py; printed by conftest at the end.
GEOMETRY_COUNTS: Counter = Counter()


def normal(rng: np.random.Generator, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), dtype)


def distinct(rng: np.random.Generator, shape, dtype) -> jax.Array:
    """Pairwise distinct values, exact in every dtype (for max pooling: no ties). At most 512 entries."""
    n = int(np.prod(shape))
    assert n <= 512, "distinct values are exact in bfloat16 only up to 512 entries"
    return jnp.asarray((rng.permutation(n) - n // 2).reshape(shape), dtype)


def vjps(f, args, variants: dict[str, dict], seed: int = 0) -> dict[str, tuple]:
    """For each named keyword set, (output, cotangents of args) of ``f(*args, **kw)`` against one random
    cotangent, all computed in a single jitted function (one compilation per call)."""
    out_shape = jax.eval_shape(lambda *a: f(*a, **next(iter(variants.values()))), *args)
    g = normal(np.random.default_rng(seed), out_shape.shape, out_shape.dtype)

    @jax.jit
    def run(args, g):
        results = {}
        for name, kw in variants.items():
            y, pullback = jax.vjp(lambda *a, kw=kw: f(*a, **kw), *args)
            results[name] = (y, pullback(g))
        return results

    return run(tuple(args), g)


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), np.finfo(np.float64).tiny)
    return float(np.abs(actual - expected).max(initial=0.0)) / scale


def assert_close(actual, expected, dtype, what: str) -> None:
    tol = TOLERANCE[jnp.dtype(dtype)]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: max|actual - expected| / max|expected| = {err:.3e} exceeds {tol:.0e} ({dtype})"


def assert_modes_agree(f, args, names, dtype, what: str, variants: dict[str, dict], reference: str = "autodiff"):
    """Every variant's output and cotangents equal the reference variant's, within the dtype's tolerance."""
    results = vjps(f, args, variants)
    y_ref, g_ref = results[reference]
    for name, (y, g) in results.items():
        if name == reference:
            continue
        assert_close(y, y_ref, dtype, f"{what} [{name}] output")
        for arg_name, a, b in zip(names, g, g_ref):
            assert_close(a, b, dtype, f"{what} [{name}] d/d{arg_name}")
    return results
