"""``grad="tangent"``: an op whose derivative JAX takes from its hand tangent rule (a ``jax.custom_jvp``).

JAX 0.10 cannot give one function both a custom JVP and a custom VJP, and ``grad="hand"`` is a ``custom_vjp``, so
forward mode (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) cannot run on it (docs/formulas.md, "Higher order").
In this mode the op is instead a ``custom_jvp`` whose rule is the op's hand tangent rule (``jaxcnn.ops.JVP``):
forward mode runs the notes' tangent formulas, and reverse mode is JAX's transpose of them, which is the hand VJP's
formula up to rounding (the two are checked adjoint to 1e-12) but not its code. Every transformation composes:
``jit``, ``vmap``, ``shard_map``, any order of differentiation.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
from jax.custom_derivatives import SymbolicZero


def call(tangent_rule: Callable, primals: tuple, /, **settings):
    """``tangent_rule(primals, tangents, **settings) -> (out, tangent)``'s output, differentiated by that rule.
    A zero tangent reaches the rule as None, so it costs nothing (the input of a network's first layer)."""

    @jax.custom_jvp
    def op(*primals):
        return tangent_rule(primals, (None,) * len(primals), **settings)[0]

    @partial(op.defjvp, symbolic_zeros=True)
    def op_jvp(primals, tangents):
        return tangent_rule(primals, tuple(None if isinstance(t, SymbolicZero) else t for t in tangents), **settings)

    return op(*primals)
