"""Argument checking shared by every op.

Everything here runs in plain Python on static shapes and dtypes, so a bad argument is reported when the op is
called (under ``jit``: while tracing, before anything is compiled), with the op's name, the argument's name and
what was expected.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp

GRAD_MODES = ("hand", "autodiff", "tangent")
CONV_RULES = ("im2col", "flip", "winograd")

Pair = tuple[int, int]
Padding = tuple[Pair, Pair]


def array(op: str, name: str, value, *, rank: int | None = None, layout: str = "") -> jax.Array:
    """``value`` as a floating-point JAX array, checking its rank (``layout`` names the axes in the message)."""
    if value is None:
        raise TypeError(f"{op}: {name} is required, got None")
    try:
        value = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(f"{op}: {name} must be an array, got {type(value).__name__}") from err
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"{op}: {name} must have a floating-point dtype (float32, float64, bfloat16, float16), got "
            f"{value.dtype}; cast it first, e.g. {name}.astype(jnp.float32)"
        )
    if rank is not None and value.ndim != rank:
        shape_hint = f" {layout}" if layout else ""
        raise ValueError(f"{op}: {name} must have rank {rank}{shape_hint}, got shape {tuple(value.shape)}")
    return value


def nonempty(op: str, name: str, value: jax.Array, axes: dict[int, str], why: str) -> None:
    """Each axis of ``axes`` ({axis: its name in the message}) of ``value`` has size >= 1: the op averages or
    normalises over them (``why``), and over nothing it would return NaN instead of an error."""
    empty = [f"{label}=0" for axis, label in axes.items() if value.shape[axis] == 0]
    if empty:
        raise ValueError(f"{op}: {name} has shape {tuple(value.shape)}, with {' and '.join(empty)}; {why}, so "
                         f"{'each' if len(empty) > 1 else 'it'} must be >= 1")


def same_dtype(op: str, **arrays: jax.Array | None) -> None:
    """All given arrays share one dtype (a custom VJP must return cotangents of exactly the primal dtypes)."""
    given = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(given.values())) > 1:
        listing = ", ".join(f"{name}: {dtype}" for name, dtype in given.items())
        raise TypeError(f"{op}: arguments must share one dtype, got {listing}; cast them to one dtype first")


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype an op keeps its sums and statistics in: float32 for bfloat16, float16 and float32 inputs,
    float64 for float64 (rounded to the inputs' dtype once, at the end)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def choice(op: str, name: str, value, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        names = [repr(o) for o in options]
        allowed = " or ".join(names) if len(names) < 3 else f"one of {', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"{op}: {name} must be {allowed}, got {value!r}")
    return value


def _int(op: str, name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError as err:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}") from err


def positive_pair(op: str, name: str, value) -> Pair:
    """An int ``k`` or a pair ``(kh, kw)`` of ints >= 1, as a pair."""
    pair = _pair(op, name, value)
    if min(pair) < 1:
        raise ValueError(f"{op}: {name} must be >= 1 in each dimension, got {value!r}")
    return pair


def _pair(op: str, name: str, value) -> Pair:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair (height, width), got {value!r}")
        return (_int(op, name, value[0]), _int(op, name, value[1]))
    v = _int(op, name, value)
    return (v, v)


def padding(op: str, value, in_hw: Pair, extent: Pair, stride: Pair) -> Padding:
    """Resolve a padding spec to ``((top, bottom), (left, right))``.

    Accepted: ``"VALID"`` (no padding), ``"SAME"`` (output size ceil(H / stride), the extra row or column going to
    the bottom/right as in TensorFlow and lax), an int ``p`` (p on every side), a pair ``(ph, pw)`` (symmetric per
    dimension), or explicit pairs ``((top, bottom), (left, right))``. All amounts must be >= 0.
    """
    if isinstance(value, str):
        mode = value.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            return tuple(_same(n, e, s) for n, e, s in zip(in_hw, extent, stride))  # type: ignore[return-value]
        raise ValueError(f"{op}: padding must be 'VALID', 'SAME', an int or ((top, bottom), (left, right)), "
                         f"got {value!r}")
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, Sequence) for v in value):
        pads = tuple(_pair(op, "padding", v) for v in value)
    else:
        ph, pw = _pair(op, "padding", value)
        pads = ((ph, ph), (pw, pw))
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{op}: padding must be >= 0 on every side, got {value!r}")
    return pads  # type: ignore[return-value]


def _same(n: int, extent: int, stride: int) -> Pair:
    out = -(-n // stride)
    total = max((out - 1) * stride + extent - n, 0)
    return (total // 2, total - total // 2)


def jvp_pairs(op: str, primals, tangents, names: tuple[str, ...]) -> tuple[tuple, tuple]:
    """``primals`` and ``tangents`` of a ``*_jvp`` rule as two tuples of ``len(names)`` (trailing optional
    arguments, such as a bias, filled with None)."""
    for what, value in (("primals", primals), ("tangents", tangents)):
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{op}: {what} must be a tuple ({', '.join(names)}), got {type(value).__name__}")
    if len(primals) != len(tangents) or not 1 <= len(primals) <= len(names):
        raise ValueError(f"{op}: expected primals and tangents of equal length, at most {len(names)} "
                         f"({', '.join(names)}); got {len(primals)} and {len(tangents)}")
    pad = (None,) * (len(names) - len(primals))
    return tuple(primals) + pad, tuple(tangents) + pad


def tangents_match(op: str, names, primals, tangents) -> tuple:
    """Each tangent is None (zero) or has its primal's shape (it is cast to the primal's dtype); a tangent without
    a primal is an error."""
    for name, p, t in zip(names, primals, tangents):
        if t is not None and p is None:
            raise ValueError(f"{op}: a tangent for {name} was given, but {name} is None")
        if t is not None and jnp.shape(t) != p.shape:
            raise ValueError(f"{op}: the tangent of {name} must have {name}'s shape {tuple(p.shape)}, got "
                             f"{tuple(jnp.shape(t))}")
    return tuple(None if t is None else jnp.asarray(t, p.dtype) for p, t in zip(primals, tangents))
