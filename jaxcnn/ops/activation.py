r"""Elementwise activations sigma with hand-derived backward rules, Delta (.) sigma'(S) (Lin, general form of eq. 16).

Each hand rule keeps only the activation's *output* y = sigma(S), never S, and writes sigma' in terms of y:

    relu     sigma'(S) = I[S > 0] = I[y > 0]        (Lin: sigma'(0) = 0; Ray "BP for a ReLU layer")
    sigmoid  sigma'(S) = (1 - y) y                   (Sadeghzadeh: PyTorch's Sigmoid_updateGradInput)
    tanh     sigma'(S) = 1 - y^2

ReLU's forward is written ``where(S <= 0, 0, S)``, which JAX differentiates branchwise, so autodiff also gives 0
at S = 0. Written as ``maximum(S, 0)`` it would give 1/2 there: JAX shares the derivative of a max between tied
arguments (see tests/ops/test_activation.py). NaN is never hidden: relu(NaN) = NaN (as ``jax.nn.relu`` and
PyTorch), and the mask I[y > 0] is read as "not y <= 0", so a NaN output passes Delta on (``passed``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops import _args, _tangent


def relu_forward(s: jax.Array) -> jax.Array:
    return jnp.where(s <= 0, jnp.zeros((), s.dtype), s)


def passed(y: jax.Array) -> jax.Array:
    """ReLU's mask I[S > 0] read from its output y (Lin eq. 16, 24, 26), as a 0/1 array of y's dtype: 1 where y > 0
    and where y is NaN, whose gradient must stay visible (not masked to 0)."""
    return jnp.logical_not(y <= 0).astype(y.dtype)


def _elementwise(name: str, forward: Callable, slope_from_output: Callable, doc: str):
    """Build the public op ``name(x, *, grad)`` and its tangent rule ``name_jvp`` from its forward and sigma'
    written in terms of y = sigma(S)."""

    @jax.custom_vjp
    def hand(s):
        return forward(s)

    def hand_fwd(s):
        y = forward(s)
        return y, y

    def hand_bwd(y, delta):
        return (delta * slope_from_output(y),)

    hand.defvjp(hand_fwd, hand_bwd)

    def op(x: jax.Array, *, grad: str = "hand") -> jax.Array:
        x = _args.array(name, "x", x)
        _args.choice(name, "grad", grad, _args.GRAD_MODES)
        if grad == "tangent":
            return _tangent.call(op_jvp, (x,))
        return forward(x) if grad == "autodiff" else hand(x)

    def op_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        (x,), (dx,) = _args.jvp_pairs(f"{name}_jvp", primals, tangents, ("x",))
        x = _args.array(f"{name}_jvp", "x", x)
        (dx,) = _args.tangents_match(f"{name}_jvp", ("x",), (x,), (dx,))
        y = forward(x)
        return y, jnp.zeros_like(y) if dx is None else slope_from_output(y) * dx

    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    op_jvp.__name__ = op_jvp.__qualname__ = f"{name}_jvp"
    op_jvp.__doc__ = (f"The hand tangent rule of ``{name}``: ``(y, sigma'(S) (.) dS)`` with sigma' read from the "
                      f"output y as in its VJP (see the module docstring), so the two are adjoint.")
    return op, op_jvp


relu, relu_jvp = _elementwise(
    "relu", relu_forward, passed,
    """ReLU sigma(S) = max(S, 0); hand backward Delta (.) I[y > 0] (Lin eq. 16 and 22, sigma'(0) = 0).

    Args:
      x: any shape, floating point.
      grad: "hand", "autodiff" (both give 0 at S = 0, see the module docstring) or "tangent" (forward mode).
    """,
)

sigmoid, sigmoid_jvp = _elementwise(
    "sigmoid", lax.logistic, lambda y: (1 - y) * y,
    """Logistic sigmoid 1 / (1 + e^{-S}); hand backward Delta (.) (1 - y) y from the stored output y
    (Sadeghzadeh, "PyTorch sigmoid layer").

    Args:
      x: any shape, floating point.
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """,
)

tanh, tanh_jvp = _elementwise(
    "tanh", jnp.tanh, lambda y: (1 - y) * (1 + y),  # = 1 - y^2; 1 - y is exact near |y| = 1 (bfloat16)
    """Hyperbolic tangent; hand backward Delta (.) (1 - y^2) from the stored output y.

    Args:
      x: any shape, floating point.
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """,
)
