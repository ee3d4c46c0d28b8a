"""Sliding-window geometry shared by convolution and pooling: P_pad, phi and their transposes.

Lin writes a convolution as ``S = W phi(pad(Z))`` with ``pad(Z) = mat(P_pad vec(Z))`` and ``phi(pad(Z)) =
mat(P_phi P_pad vec(Z))`` (Lin eq. 3), and pooling with the same window arithmetic. Here the 0/1 matrices are never
built: ``pad``/``crop`` apply P_pad and P_pad^T, ``patches``/``unpatches`` apply P_phi and P_phi^T, each as a few
slices or pads of an NHWC array.

Geometry (DD2424, "output volume dimension"; rows and columns that do not fit are dropped)::

    extent = dilation * (k - 1) + 1
    out    = floor((H + pad_top + pad_bottom - extent) / stride) + 1

Window offset ``(i, j)`` (0-based, row-major over the window) reads padded rows ``o * stride + i * dilation`` for
output rows ``o = 0 .. out - 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._args import Padding, Pair


class Window(NamedTuple):
    """Static geometry of a 2-D sliding window over the H, W axes of an NHWC array (hashable: a custom_vjp
    ``nondiff_argnums`` argument)."""

    size: Pair
    stride: Pair
    dilation: Pair
    padding: Padding

    @property
    def extent(self) -> Pair:
        """Rows and columns one (dilated) window covers."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.size, self.dilation))  # type: ignore[return-value]

    def padded_hw(self, in_hw: Pair) -> Pair:
        return tuple(n + lo + hi for n, (lo, hi) in zip(in_hw, self.padding))  # type: ignore[return-value]

    def out_hw(self, in_hw: Pair) -> Pair:
        """Output positions over an unpadded ``in_hw``."""
        return self.fit(self.padded_hw(in_hw))

    def fit(self, padded_hw: Pair) -> Pair:
        """Output positions over an already padded ``padded_hw``."""
        return tuple(output_size(n, k, s, (0, 0), d)  # type: ignore[return-value]
                     for n, k, s, d in zip(padded_hw, self.size, self.stride, self.dilation))

    def offsets(self) -> list[Pair]:
        """Window offsets (i, j) in row-major order: the order of phi's blocks and of HWIO kernel rows."""
        return [(i, j) for i in range(self.size[0]) for j in range(self.size[1])]


def output_size(n: int, k: int, stride: int = 1, padding: Pair = (0, 0), dilation: int = 1) -> int:
    """Output length of a window of size ``k`` sliding over ``n`` entries (DD2424: ``(w - f + 2P) / s + 1``,
    rounded down: entries that do not fit are dropped)."""
    return (n + padding[0] + padding[1] - dilation * (k - 1) - 1) // stride + 1


def pad(x: jax.Array, window: Window, value: float = 0.0) -> jax.Array:
    """P_pad: surround the H, W axes of ``x`` [N, H, W, C] with ``value`` (0 for convolution, -inf for max)."""
    (top, bottom), (left, right) = window.padding
    return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def crop(xp: jax.Array, window: Window, in_hw: Pair) -> jax.Array:
    """P_pad^T: the inverse placement of ``pad``, keeping the H x W interior of a padded array."""
    (top, _), (left, _) = window.padding
    return xp[:, top : top + in_hw[0], left : left + in_hw[1], :]


def patches(xp: jax.Array, window: Window) -> list[jax.Array]:
    """P_phi: for each window offset (row-major), the entries it reads at every output position.

    ``xp`` is an already padded [N, Hp, Wp, C] array; each returned block is [N, Ho, Wo, C]. Concatenated along C
    they form phi(pad(Z)) with one row per output position, in the order of a flattened HWIO kernel.
    """
    n, hp, wp, c = xp.shape
    ho, wo = window.fit((hp, wp))
    (sh, sw), (dh, dw) = window.stride, window.dilation
    return [
        lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                  (1, sh, sw, 1))
        for i, j in window.offsets()
    ]


def unpatches(blocks: list[jax.Array], window: Window, padded_hw: Pair) -> jax.Array:
    """P_phi^T: the adjoint of ``patches`` (col2im): add each block back where it was read from.

    Block (i, j) [N, Ho, Wo, C] is spread onto the padded grid with ``stride - 1`` zeros between entries and
    ``i * dilation`` zeros before; overlapping windows add up. A sum of pads: no scatter, no index arrays.
    """
    ho, wo = blocks[0].shape[1:3]
    (sh, sw), (dh, dw) = window.stride, window.dilation
    zero = jnp.zeros((), blocks[0].dtype)
    total = None
    for (i, j), block in zip(window.offsets(), blocks):
        rows = (i * dh, padded_hw[0] - i * dh - (ho - 1) * sh - 1, sh - 1)
        cols = (j * dw, padded_hw[1] - j * dw - (wo - 1) * sw - 1, sw - 1)
        placed = lax.pad(block, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
        total = placed if total is None else total + placed
    return total
