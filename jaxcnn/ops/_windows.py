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


def patches(xp: jax.Array, window: Window) -> jax.Array:
    """P_phi: the entries each window reads, [N, Ho, Wo, kh, kw, C], from an already padded [N, Hp, Wp, C].

    Reshaped to [N, Ho, Wo, kh*kw*C] it is phi(pad(Z)), one row per output position, in the order of a
    flattened HWIO kernel. Built in two passes, kernel rows then kernel columns (kh + kw strided slices rather
    than kh*kw): about twice as fast on CPU for few channels, as fast otherwise.
    """
    ho, wo = window.fit(xp.shape[1:3])
    (sh, sw), (dh, dw) = window.stride, window.dilation
    rows = jnp.stack([lax.slice_in_dim(xp, i * dh, i * dh + (ho - 1) * sh + 1, sh, axis=1)
                      for i in range(window.size[0])], axis=3)  # [N, Ho, Wp, kh, C]
    return jnp.stack([lax.slice_in_dim(rows, j * dw, j * dw + (wo - 1) * sw + 1, sw, axis=2)
                      for j in range(window.size[1])], axis=4)  # [N, Ho, Wo, kh, kw, C]


def unpatches(cols: jax.Array, window: Window, padded_hw: Pair) -> jax.Array:
    """P_phi^T: the adjoint of ``patches`` (col2im): add every entry back where it was read from.

    ``cols`` is [N, Ho, Wo, kh, kw, C]. Each kernel column j is spread along the width with ``stride - 1`` zeros
    between entries and ``j * dilation`` before them, and the columns summed; then the same along the height for
    the kernel rows. Overlapping windows add up. Sums of pads: no scatter, no index arrays.
    """
    ho, wo = cols.shape[1:3]
    (sh, sw), (dh, dw) = window.stride, window.dilation
    zero = jnp.zeros((), cols.dtype)

    def spread(block, axis, offset, size, extent, step):
        config = [(0, 0, 0)] * block.ndim
        config[axis] = (offset, size - offset - (extent - 1) * step - 1, step - 1)
        return lax.pad(block, zero, config)

    rows = sum(spread(cols[:, :, :, :, j], 2, j * dw, padded_hw[1], wo, sw)
               for j in range(window.size[1]))  # [N, Ho, Wp, kh, C]
    return sum(spread(rows[:, :, :, i], 1, i * dh, padded_hw[0], ho, sh)
               for i in range(window.size[0]))  # [N, Hp, Wp, C]
