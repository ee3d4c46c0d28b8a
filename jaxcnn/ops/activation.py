r"""Elementwise activations sigma with hand-derived backward rules, Delta (.) sigma'(S) (Lin, general form of eq. 16).

Each hand rule keeps only the activation's *output* y = sigma(S), never S, and writes sigma' in terms of y:

    relu     sigma'(S) = I[S > 0] = I[y > 0]        (Lin: sigma'(0) = 0; Ray "BP for a ReLU layer")
    sigmoid  sigma'(S) = (1 - y) y                   (Sadeghzadeh: PyTorch's Sigmoid_updateGradInput)
    tanh     sigma'(S) = 1 - y^2

ReLU's forward is written ``where(S <= 0, 0, S)``, which JAX differentiates branchwise, so autodiff also gives 0
at S = 0. Written as ``maximum(S, 0)`` it would give 1/2 there: JAX shares the derivative of a max between tied
arguments (see tests/ops/test_activation.py). NaN is never hidden: relu(NaN) = NaN (as ``jax.nn.relu`` and
PyTorch), and the mask I[y > 0] is read as "not y <= 0", so a NaN output passes Delta on (``passed``).

The activations researchers add after the notes follow the same pattern, each derivative derived in its docstring:

    leaky_relu  sigma'(S) = 1 if y > 0 else a        from the output (a >= 0 keeps the sign of S in y)
    elu         sigma'(S) = 1 if S > 0 else a e^S    from the input: y + a equals a e^S, but loses its digits
                                                     to cancellation where e^S << 1
    gelu        sigma'(S) = Phi(S) + S phi(S)        from the input (S Phi(S) is not invertible); the tanh
                                                     approximation's derivative is derived in ``gelu``
    softmax     J^T Delta = y (.) (Delta - <Delta, y>)   from the output, row by row (Sadeghzadeh)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops import _args, _tangent, loss


def relu_forward(s: jax.Array) -> jax.Array:
    return jnp.where(s <= 0, jnp.zeros((), s.dtype), s)


def passed(y: jax.Array) -> jax.Array:
    """ReLU's mask I[S > 0] read from its output y (Lin eq. 16, 24, 26), as a 0/1 array of y's dtype: 1 where y > 0
    and where y is NaN, whose gradient must stay visible (not masked to 0)."""
    return jnp.logical_not(y <= 0).astype(y.dtype)


class _Elementwise:
    """An activation's hand VJP, autodiff twin and hand tangent rule, built from its forward ``forward(S, c)`` and
    its derivative ``slope(saved, c)``, where ``saved`` is the output y (``saves="output"``, the notes' choice) or
    the input S (``saves="input"``) and ``c`` is the op's one setting (a slope, an alpha; None for none)."""

    def __init__(self, name: str, forward: Callable, slope: Callable, saves: str = "output"):
        self.name, self.forward, self.slope, self.saves = name, forward, slope, saves

        @partial(jax.custom_vjp, nondiff_argnums=(1,))
        def hand(s, c):
            return forward(s, c)

        def hand_fwd(s, c):
            y = forward(s, c)
            return y, (y if saves == "output" else s)

        def hand_bwd(c, saved, delta):
            return (delta * slope(saved, c),)

        hand.defvjp(hand_fwd, hand_bwd)
        self.hand = hand

    def __call__(self, x, c, grad: str) -> jax.Array:
        x = _args.array(self.name, "x", x)
        _args.choice(self.name, "grad", grad, _args.GRAD_MODES)
        if grad == "tangent":
            return _tangent.call(lambda primals, tangents: self.jvp(primals, tangents, c), (x,))
        return self.forward(x, c) if grad == "autodiff" else self.hand(x, c)

    def jvp(self, primals: tuple, tangents: tuple, c) -> tuple[jax.Array, jax.Array]:
        """``(y, sigma'(S) (.) dS)``, sigma' from what the VJP saves, so the two are adjoint."""
        op = f"{self.name}_jvp"
        (x,), (dx,) = _args.jvp_pairs(op, primals, tangents, ("x",))
        x = _args.array(op, "x", x)
        (dx,) = _args.tangents_match(op, ("x",), (x,), (dx,))
        y = self.forward(x, c)
        return y, jnp.zeros_like(y) if dx is None else self.slope(y if self.saves == "output" else x, c) * dx


def _elementwise(name: str, forward: Callable, slope_from_output: Callable, doc: str):
    """The public op ``name(x, *, grad)`` and its tangent rule ``name_jvp`` of a setting-free activation whose
    sigma' is written in terms of y = sigma(S)."""
    rule = _Elementwise(name, lambda s, c: forward(s), lambda y, c: slope_from_output(y))

    def op(x: jax.Array, *, grad: str = "hand") -> jax.Array:
        return rule(x, None, grad)

    def op_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
        return rule.jvp(primals, tangents, None)

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


def _setting(op: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < 0 or (positive and value == 0):
        raise ValueError(f"{op}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


_leaky_relu = _Elementwise(
    "leaky_relu", lambda s, a: jnp.where(s <= 0, (a * s).astype(s.dtype), s),
    lambda y, a: jnp.where(y <= 0, jnp.asarray(a, y.dtype), jnp.ones((), y.dtype)))


def leaky_relu(x: jax.Array, negative_slope: float = 0.01, *, grad: str = "hand") -> jax.Array:
    """Leaky ReLU sigma(S) = S for S > 0, a S otherwise (a = ``negative_slope``); hand backward
    Delta (.) sigma'(S) with sigma'(S) = 1 where y > 0 and a where y <= 0, read from the stored output y: for
    a >= 0, y > 0 exactly where S > 0 (the ReLU of Lin eq. 16 is a = 0). At S = 0 both sides give a, the left
    derivative, as ReLU's 0 (autodiff follows the S <= 0 branch). A NaN output passes Delta on.

    Args:
      x: any shape, floating point.
      negative_slope: a >= 0.
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """
    return _leaky_relu(x, _setting("leaky_relu", "negative_slope", negative_slope), grad)


def leaky_relu_jvp(primals: tuple, tangents: tuple, negative_slope: float = 0.01) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of ``leaky_relu``: ``(y, sigma'(S) (.) dS)``, sigma' read from y as in its VJP."""
    return _leaky_relu.jvp(primals, tangents, _setting("leaky_relu_jvp", "negative_slope", negative_slope))


def _negative_part(s: jax.Array) -> jax.Array:
    """S where S <= 0, else 0: e^S of it never overflows in the branch ``where`` discards (whose derivative would
    otherwise be Inf * 0 = NaN), and at S = 0 its derivative is 1 (``minimum(S, 0)``'s would be 1/2)."""
    return jnp.where(s > 0, jnp.zeros((), s.dtype), s)


_elu = _Elementwise(
    "elu", lambda s, a: jnp.where(s > 0, s, (a * jnp.expm1(_negative_part(s))).astype(s.dtype)),
    lambda s, a: jnp.where(s > 0, jnp.ones((), s.dtype), (a * jnp.exp(_negative_part(s))).astype(s.dtype)),
    saves="input")


def elu(x: jax.Array, alpha: float = 1.0, *, grad: str = "hand") -> jax.Array:
    """ELU sigma(S) = S for S > 0, alpha (e^S - 1) otherwise; hand backward Delta (.) sigma'(S) with
    sigma'(S) = 1 for S > 0 and alpha e^S otherwise (the derivative of alpha (e^S - 1)), from the stored input.
    (sigma' also equals y + alpha there, from the output, but for S << 0 that is a difference of two numbers near
    alpha and keeps few of e^S's digits: in bfloat16 at S = -5, 16% off.) At S = 0 both sides give alpha, the
    left derivative (1 for the usual alpha = 1: ELU is then continuously differentiable).

    Args:
      x: any shape, floating point.
      alpha: > 0.
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """
    return _elu(x, _setting("elu", "alpha", alpha, positive=True), grad)


def elu_jvp(primals: tuple, tangents: tuple, alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of ``elu``: ``(y, sigma'(S) (.) dS)`` with sigma' from S, as in its VJP."""
    return _elu.jvp(primals, tangents, _setting("elu_jvp", "alpha", alpha, positive=True))


SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
GELU_CUBIC = 0.044715  # the tanh approximation's coefficient (Hendrycks and Gimpel)


def _gelu_cdf(s: jax.Array, approximate: bool) -> tuple[jax.Array, jax.Array]:
    """Phi(S) and its tanh approximation's sigmoid(2u) = (1 + tanh u) / 2, with u' (1 for the exact form), in
    forms without cancellation where S << 0: Phi(S) = erfc(-S / sqrt 2) / 2, not (1 + erf(S / sqrt 2)) / 2, and
    sigmoid(2u), not (1 + tanh u) / 2 (both of those lose every digit once 1 + (-1 + tiny) rounds)."""
    if approximate:
        u = SQRT_2_OVER_PI * (s + GELU_CUBIC * s**3)
        return lax.logistic(2 * u), SQRT_2_OVER_PI * (1 + 3 * GELU_CUBIC * s**2)
    return 0.5 * lax.erfc(-s / math.sqrt(2)), jnp.ones((), s.dtype)


def _gelu_forward(s: jax.Array, approximate: bool) -> jax.Array:
    return s * _gelu_cdf(s, approximate)[0]


def _gelu_slope(s: jax.Array, approximate: bool) -> jax.Array:
    cdf, du = _gelu_cdf(s, approximate)
    if approximate:  # (1 - t^2) / 2 = 2 sigmoid(2u) sigmoid(-2u)
        return cdf + 2 * s * cdf * lax.logistic(-2 * SQRT_2_OVER_PI * (s + GELU_CUBIC * s**3)) * du
    return cdf + s * jnp.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)


_gelu = _Elementwise("gelu", _gelu_forward, _gelu_slope, saves="input")


def gelu(x: jax.Array, approximate: bool = True, *, grad: str = "hand") -> jax.Array:
    """GELU sigma(S) = S Phi(S), Phi the standard normal CDF; hand backward Delta (.) sigma'(S) from the stored
    input (S Phi(S) is not invertible, so y cannot stand in for S).

    Exact (``approximate=False``): Phi(S) = (1 + erf(S / sqrt 2)) / 2, and by the product rule
    sigma'(S) = Phi(S) + S phi(S), phi(S) = e^{-S^2/2} / sqrt(2 pi).
    Tanh approximation (``approximate=True``, as ``jax.nn.gelu``'s default): sigma(S) = S (1 + t) / 2 with
    t = tanh(u), u = sqrt(2/pi) (S + 0.044715 S^3); so sigma'(S) = (1 + t) / 2 + S (1 - t^2) u' / 2 with
    u' = sqrt(2/pi) (1 + 3 * 0.044715 S^2). Both are evaluated in forms that keep their digits for S << 0
    (``_gelu_cdf``): (1 + t) / 2 = sigmoid(2u) and (1 - t^2) / 2 = 2 sigmoid(2u) sigmoid(-2u); where jax.nn.gelu
    computes 1 + tanh(u), its relative error grows to 1 near S = -6.

    Args:
      x: any shape, floating point.
      approximate: the tanh approximation (True) or the erf form (False).
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """
    return _gelu(x, _flag("gelu", approximate), grad)


def gelu_jvp(primals: tuple, tangents: tuple, approximate: bool = True) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of ``gelu``: ``(y, sigma'(S) (.) dS)`` with sigma' from S, as in its VJP."""
    return _gelu.jvp(primals, tangents, _flag("gelu_jvp", approximate))


def _flag(op: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: approximate must be True or False, got {value!r}")
    return value


@jax.custom_vjp
def _softmax_hand(z):
    return loss.softmax(z)


def _softmax_fwd(z):
    y = loss.softmax(z)
    return y, y


def _softmax_bwd(y, delta):
    return (y * (delta - jnp.sum(delta * y, axis=-1, keepdims=True)),)


_softmax_hand.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x: jax.Array, *, grad: str = "hand") -> jax.Array:
    """Softmax over the last axis as a layer, y_j = e^{z_j} / sum_k e^{z_k} (computed after subtracting the row's
    maximum, which cancels). Its Jacobian is dy/dz = diag(y) - y y^T (Sadeghzadeh's softmax node), symmetric, so
    the hand backward is the Jacobian-vector form J^T Delta = y (.) Delta - y <y, Delta> = y (.) (Delta -
    <Delta, y>), from the stored output, never forming the K x K matrix. (For training, ``softmax_cross_entropy``
    on the logits is the stable form: its gradient p - y does not divide by small probabilities.)

    Args:
      x: [..., K], floating point.
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """
    x = _args.array("softmax", "x", x)
    _args.choice("softmax", "grad", grad, _args.GRAD_MODES)
    if x.ndim == 0:
        raise ValueError("softmax: x must have at least one axis (the classes), got a scalar")
    _args.nonempty("softmax", "x", x, {-1: "K"}, "softmax normalises over the last axis, the K classes")
    if grad == "tangent":
        return _tangent.call(softmax_jvp, (x,))
    return loss.softmax(x) if grad == "autodiff" else _softmax_hand(x)


def softmax_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of ``softmax``: ``(y, J dz)`` with J dz = y (.) (dz - <y, dz>) (J is symmetric, so
    this is the VJP's formula with Delta = dz)."""
    (x,), (dx,) = _args.jvp_pairs("softmax_jvp", primals, tangents, ("x",))
    x = _args.array("softmax_jvp", "x", x)
    (dx,) = _args.tangents_match("softmax_jvp", ("x",), (x,), (dx,))
    y = loss.softmax(x)
    return y, jnp.zeros_like(y) if dx is None else _softmax_bwd(y, dx)[0]


@jax.custom_vjp
def _residual_add_hand(a, b):
    return a + b


_residual_add_hand.defvjp(lambda a, b: (a + b, None), lambda _, delta: (delta, delta))


def residual_add(body: jax.Array, shortcut: jax.Array, *, grad: str = "hand") -> jax.Array:
    """The join of a residual block, y = body + shortcut; hand backward: Delta to both branches unchanged (the
    sum node of a computational graph, Sadeghzadeh), so the shortcut's cotangent is added to the body's at the
    block's input (``jc.Residual``).

    Args:
      body, shortcut: the same shape and dtype.
      grad: "hand" or "autodiff".
    """
    body, shortcut = _args.array("residual_add", "body", body), _args.array("residual_add", "shortcut", shortcut)
    if body.shape != shortcut.shape:
        raise ValueError(f"residual_add: body {tuple(body.shape)} and shortcut {tuple(shortcut.shape)} must have "
                         f"the same shape")
    _args.same_dtype("residual_add", body=body, shortcut=shortcut)
    _args.choice("residual_add", "grad", grad, ("hand", "autodiff"))
    return body + shortcut if grad == "autodiff" else _residual_add_hand(body, shortcut)
