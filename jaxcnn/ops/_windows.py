"""Sliding-window geometry shared by convolution and pooling: P_pad, phi and their transposes.

Lin writes a convolution as ``S = W phi(pad(Z))`` with ``pad(Z) = mat(P_pad vec(Z))`` and ``phi(pad(Z)) =
mat(P_phi P_pad vec(Z))`` (Lin eq. 3), and pooling with the same window arithmetic. Here the 0/1 matrices are never
built: ``pad`` applies P_pad, ``patches`` P_phi and ``unpatches`` their transposes P_pad^T P_phi^T, each as a few
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

NARROW = 4  # patches() builds phi(pad(Z)) in two steps below this many channels (on a CPU)


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


def patches(xp: jax.Array, window: Window) -> jax.Array:
    """P_phi: the entries each window reads, [N, Ho, Wo, kh, kw, C], from an already padded [N, Hp, Wp, C].

    Reshaped to [N, Ho, Wo, kh*kw*C] it is phi(pad(Z)), one row per output position, in the order of a
    flattened HWIO kernel: one strided slice per window offset, concatenated along the channels in one pass.
    With fewer than ``NARROW`` channels on a CPU it is built in two: the kw column offsets first ([N, Hp, Wo,
    kw*C]), then the kh row offsets of that (XLA's CPU concatenation of kh*kw slices a channel or three wide is
    slow: simplenn-mnist's 25 one-channel taps took 5x as long in one pass; BENCHMARKS.md).
    """
    n, hp, _, c = xp.shape
    ho, wo = window.fit(xp.shape[1:3])
    (sh, sw), (dh, dw) = window.stride, window.dilation
    (kh, kw) = window.size
    if c < NARROW and kh > 1 and kw > 1 and jax.default_backend() == "cpu":
        rows = jnp.concatenate([lax.slice(xp, (0, 0, j * dw, 0), (n, hp, j * dw + (wo - 1) * sw + 1, c), (1, 1, sw, 1))
                                for j in range(kw)], axis=3)
        blocks = [lax.slice(rows, (0, i * dh, 0, 0), (n, i * dh + (ho - 1) * sh + 1, wo, kw * c), (1, sh, 1, 1))
                  for i in range(kh)]
    else:
        blocks = [lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1,
                                                         c), (1, sh, sw, 1)) for i, j in window.offsets()]
    return jnp.concatenate(blocks, axis=3).reshape(n, ho, wo, kh, kw, c)


def unpatches(cols: jax.Array, window: Window, in_hw: Pair) -> jax.Array:
    """P_pad^T P_phi^T: the adjoint of ``patches(pad(.))`` (col2im): add every entry back where it was read from,
    keeping only the unpadded ``in_hw`` interior.

    ``cols`` is [N, Ho, Wo, kh, kw, C]. Window offset (i, j) read padded row ``o * stride + i * dilation``, i.e.
    input row ``o * stride + i * dilation - top``: its block, less the rows and columns that read padding, is
    placed there by one pad (``stride - 1`` zeros between entries) and the kh*kw blocks are summed; overlapping
    windows add up. No scatter, no index arrays, no padded intermediate.
    """
    zero = jnp.zeros((), cols.dtype)
    total = jnp.zeros((cols.shape[0], *in_hw, cols.shape[5]), cols.dtype)
    for i, j in window.offsets():
        block, config = cols[:, :, :, i, j], [(0, 0, 0)] * 4
        for axis, offset in ((1, i * window.dilation[0]), (2, j * window.dilation[1])):
            first, last = _reads_input(offset, block.shape[axis], in_hw[axis - 1], window, axis - 1)
            if first > last:  # this offset reads only padding along this axis: it adds nothing
                break
            n, s = in_hw[axis - 1], window.stride[axis - 1]
            block = lax.slice_in_dim(block, first, last + 1, axis=axis)
            start = first * s + offset - window.padding[axis - 1][0]
            config[axis] = (start, n - start - (last - first) * s - 1, s - 1)
        else:
            total = total + lax.pad(block, zero, config)
    return total


def _reads_input(offset: int, out: int, n: int, window: Window, axis: int) -> Pair:
    """The first and last of ``out`` output positions whose window offset ``offset`` (dilation included) reads an
    input row in [0, n) rather than padding, along ``axis``; first > last when every one reads padding.

    Position o reads padded row ``o * stride + offset``, i.e. input row ``o * stride + offset - top``.
    """
    top, s = window.padding[axis][0], window.stride[axis]
    first = max(0, -((offset - top) // s))
    last = min(out - 1, (n - 1 + top - offset) // s)
    return first, last
