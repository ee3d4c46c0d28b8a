"""Your own op with a hand-derived backward pass, built to the contract every jaxcnn op follows.

The contract (``conv2d``, ``relu``, ``dense``, ... all keep it):

1. **One forward function**, shared by both gradient modes, so that a difference between them is a difference in
   the backward formula and nothing else.
2. ``grad="hand"`` wraps that forward in a ``jax.custom_vjp`` whose backward is *your* formula; ``grad="autodiff"``
   lets JAX differentiate the very same forward.
3. Arrays are positional and all differentiated (the input first, then any parameters); settings that are not
   arrays (a stride, a slope) are keyword arguments and must be hashable. Both modes work under ``jit``, ``vmap``
   and ``grad``.

``custom_op`` builds such an op from a forward and a backward function; ``jc.Custom(op)`` puts it in a
``Sequential`` (and ``Sequential.from_config(config, custom_ops={...})`` in a TOML network); ``jaxcnn.gradcheck``
verifies it like any other op. docs/custom-ops.md is a worked example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from jaxcnn.ops import _args


@dataclass(frozen=True, eq=False)
class CustomOp:
    """An op built by ``custom_op``: call it as ``op(x, *params, grad="hand", **settings)``."""

    name: str
    forward: Callable
    backward: Callable
    params: tuple[str, ...] = ()
    init: Callable | None = None

    def __post_init__(self):
        object.__setattr__(self, "_hand", _hand_rule(self))

    def __call__(self, *arrays, grad: str = "hand", **settings):
        arrays = tuple(_args.array(self.name, name, a) for name, a in zip(self._names(len(arrays)), arrays))
        _args.choice(self.name, "grad", grad, _args.GRAD_MODES)
        if len(arrays) != 1 + len(self.params):
            expected = ", ".join(("x", *self.params))
            raise TypeError(f"{self.name}: expected {1 + len(self.params)} arrays ({expected}), got {len(arrays)}")
        _args.same_dtype(self.name, **dict(zip(self._names(len(arrays)), arrays)))
        try:
            static = tuple(sorted(settings.items()))
            hash(static)
        except TypeError as err:
            raise TypeError(f"{self.name}: settings must be hashable (ints, floats, strings, tuples), got "
                            f"{settings!r}") from err
        if grad in ("autodiff", "tangent"):  # no tangent rule of its own: JAX differentiates the forward
            return self.forward(*arrays, **settings)
        return self._hand(static, *arrays)

    def _names(self, count: int) -> tuple[str, ...]:
        return ("x", *self.params, *(f"array {i}" for i in range(1 + len(self.params), count)))

    def __repr__(self) -> str:
        return f"custom_op({self.name!r})"


def custom_op(name: str, forward: Callable, backward: Callable, *, params: tuple[str, ...] = (),
              init: Callable | None = None) -> CustomOp:
    """An op with ``grad="hand" | "autodiff"`` from a forward function and a hand-derived backward function
    (``grad="tangent"``, having no tangent rule, is autodiff).

    Args:
      name: the op's name: used in error messages, as the layer's parameter prefix and as its TOML ``type``.
      forward: ``forward(x, *params, **settings) -> y``, plain JAX code (both modes run it).
      backward: ``backward(arrays, y, delta, **settings) -> (dx, *dparams)``: the cotangent of every array
        (same shapes and dtypes; ``None`` for zero) from ``arrays = (x, *params)``, the output ``y`` and
        ``delta = dxi/dy``. This is the formula under test; it may use ``y`` (as relu, sigmoid and tanh do) or
        recompute what it needs from ``arrays``.
      params: names of the parameter arrays that follow ``x``, in order (as keys of the layer's params).
      init: ``init(key, in_shape, dtype) -> {name: array}`` for the parameters, ``in_shape`` without the batch
        axis; required when ``params`` is not empty (the op is then a layer with parameters).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"custom_op: name must be an identifier such as 'swish', got {name!r}")
    for what, fn in (("forward", forward), ("backward", backward)):
        if not callable(fn):
            raise TypeError(f"custom_op {name}: {what} must be a function, got {type(fn).__name__}")
    params = tuple(params)
    if params and not callable(init):
        raise ValueError(f"custom_op {name}: params {params} need init(key, in_shape, dtype) -> dict")
    return CustomOp(name, forward, backward, params, init)


def _hand_rule(op: CustomOp) -> Callable:
    """The custom VJP: residuals are the arrays and the output; the user's backward gives the cotangents."""

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def hand(static, *arrays):
        return op.forward(*arrays, **dict(static))

    def hand_fwd(static, *arrays):
        y = op.forward(*arrays, **dict(static))
        return y, (arrays, y)

    def hand_bwd(static, residuals, delta):
        arrays, y = residuals
        cotangents = op.backward(arrays, y, delta, **dict(static))
        if not isinstance(cotangents, (tuple, list)) or len(cotangents) != len(arrays):
            count = len(cotangents) if isinstance(cotangents, (tuple, list)) else type(cotangents).__name__
            raise TypeError(f"{op.name}: backward must return a tuple of {len(arrays)} cotangents "
                            f"({', '.join(op._names(len(arrays)))}), got {count}")
        out = []
        for name, a, ct in zip(op._names(len(arrays)), arrays, cotangents):
            if ct is None:
                ct = jnp.zeros_like(a)
            if jnp.shape(ct) != a.shape:
                raise ValueError(f"{op.name}: backward's cotangent for {name} has shape {tuple(jnp.shape(ct))}, "
                                 f"but {name} has shape {a.shape}")
            out.append(jnp.asarray(ct, a.dtype))
        return tuple(out)

    hand.defvjp(hand_fwd, hand_bwd)
    return hand
