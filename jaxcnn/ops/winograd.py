r"""Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
2016): a third hand rule for 3x3 convolutions with stride 1 and no dilation, ``rule="winograd"``.

Lin eq. (3) computes each 2x2 block of S from a 4x4 tile d of pad(Z) with 4 * 9 products per channel pair. Winograd
computes it with 16, through three fixed linear maps (per channel, on each tile; ``(.)`` elementwise)::

    S_tile = A^T [ (G g G^T) (.) (B^T d B) ] A            g: the 3x3 kernel of one (C_in, C_out) pair

and the sum over C_in, taken in the transformed domain, turns the 16 products per tile into 16 matrix products,
one per transformed position xi (the tiles are rows, as phi(pad(Z))'s output positions are)::

    V_xi = (B^T d B)_xi   [T, C_in]     U_xi = (G g G^T)_xi   [C_in, C_out]     M_xi = V_xi U_xi   [T, C_out]
    S    = A^T M A, each tile's 2x2 block put in place (the last row or column cropped when Ho or Wo is odd)

Tiles overlap by two rows and columns (stride 2): V is 4x Z's size, where phi(pad(Z)) is 9x, and the products
take 16 / 36 of eq. (3)'s multiplications. Every map is linear, so the backward pass is their transposes, read
off the forward pass as eq. (12) is from eq. (3); with Delta = dxi/dS padded to whole 2x2 blocks::

    dM_xi = (A dY A^T)_xi              dY: Delta's 2x2 block of each tile
    dU_xi = V_xi^T dM_xi               (eq. 12's counterpart, summed over the tiles)
    dW    = G^T dU G                   per (C_in, C_out) pair
    db    = Delta 1                    eq. (14)

In Lin's fused block with 2x2 max pooling (``block.py``) the pooling windows are these 2x2 blocks, and each holds
one nonzero of Delta, at its first maximum (eq. 26): dY is then read from the pooled Delta and P_pool's index
(``gradients``'s ``dy``), a quarter of Delta's size, instead of four strided reads of Delta, which is built for
dZ alone (the fused steps in blocks took 0.83-0.94x the time in ten of eleven runs; BENCHMARKS.md).

The input gradient could follow the same way (dV_xi = dM_xi U_xi^T, then B dV B^T added back at each tile: a
col2im of overlapping 4x4 tiles), but that overlap-add cost more than the products it follows (on simplenn-cifar
the step was 1.5x slower than im2col's; BENCHMARKS.md). At stride 1 it is itself a 3x3 correlation, Ray's
dI = pad(dJ) * flip(K) (the flip rule, ``conv.py``)::

    dZ = P_pad^T [pad_2(Delta) (*) rot180(K)] = pad_{2-p}(Delta) (*) rot180(K)     C_in and C_out swapped

(P_pad^T drops the p rows of padding on each side; a negative pad_{2-p} drops rows of Delta), so it is computed
by this module's forward pass too: B^T d B of Delta's tiles, 16 products, A^T M A, no overlap. The tangent rule
is the bilinear differential dS = A^T [V(dZ) U + V U(dW)] A + db 1^T. V is recomputed in the backward pass, as
phi(pad(Z)) is with ``store_phi=False`` (keeping it measured no faster). ``block=`` (``conv.py``) runs both
passes a block of examples at a time, dW summed over the blocks: the fused block's gradient then needs 0.30-0.36x
the temporary memory of XLA's chain instead of 0.81-0.84x, and the fused steps took 0.81-0.95x the whole batch's time on
a 2-core AMD EPYC (BENCHMARKS.md, "The fused block a block of examples at a time").
Rounding differs from the direct sum: in float32 S agrees with eq. (3) to a few units in the last place of its
largest entries (the transforms' weights are 1 and 1/2). In bfloat16 and float16 the transforms and products
run in float32 and S, dZ and dW are rounded once, as eq. (3)'s products accumulate: V and U rounded to bfloat16
left them 3.0-3.6x farther from the float64 truth than im2col's (BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.ops._args import compute_dtype
from jaxcnn.ops._windows import Window, pad

B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))
TILE, OUT = 4, 2  # a tile of pad(Z) and the block of S it gives


def applies(size, stride, dilation) -> bool:
    """Whether F(2x2, 3x3) computes a convolution (pairs): a 3x3 kernel, stride 1, no dilation (any zero padding)."""
    return tuple(size) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)


def check(op: str, size, stride, dilation) -> None:
    """``rule="winograd"`` asked for a convolution (pairs) it does not compute: a ValueError naming ``op``."""
    if not applies(size, stride, dilation):
        raise ValueError(f"{op}: rule='winograd' (F(2x2, 3x3)) computes 3x3 kernels with stride 1 and no dilation, "
                         f"got kernel {tuple(size)}, stride {tuple(stride)}, dilation {tuple(dilation)}; use "
                         f"rule='im2col' or 'flip' for this convolution")


def _combine(matrix, arrays):
    """``matrix @ arrays`` for a small constant matrix and a list of arrays, skipping zero weights."""
    rows = []
    for row in matrix:
        terms = [a if c == 1 else -a if c == -1 else c * a for c, a in zip(row, arrays) if c != 0]
        rows.append(sum(terms[1:], terms[0]))
    return rows


def _transform(matrix, grid, transpose=False):
    """``matrix grid matrix^T`` (``matrix^T grid matrix`` when ``transpose``) for a grid of arrays (a list of
    rows): the two-sided transforms B^T d B, G g G^T, A^T M A and their adjoints."""
    m = [list(col) for col in zip(*matrix)] if transpose else matrix
    rows = [_combine(m, row) for row in grid]  # along the grid's second index: rows[i][b]
    cols = [_combine(m, [row[b] for row in rows]) for b in range(len(m))]  # then its first: cols[b][a]
    return [list(row) for row in zip(*cols)]


def _tiles(window: Window, in_hw) -> tuple[Window, tuple[int, int], tuple[int, int]]:
    """The 4x4, stride-2 window of tiles over pad(Z) (its bottom and right padding extended by a row or column of
    zeros where Ho or Wo is odd), S's size (Ho, Wo) and the number of tiles along each axis."""
    out_hw = window.out_hw(in_hw)
    tiles = tuple(-(-o // OUT) for o in out_hw)
    padding = tuple((lo, OUT * t + TILE - OUT - n - lo) for (lo, _), n, t in zip(window.padding, in_hw, tiles))
    return Window((TILE, TILE), (OUT, OUT), (1, 1), padding), out_hw, tiles


def tile_bytes(window: Window, x: jax.Array, w: jax.Array) -> int:
    """Bytes per example of the transformed tiles V and M = V U (16 per tile, in the dtype they are computed in):
    what ``block="auto"`` sizes Winograd's blocks by, as phi(pad(Z)) sizes im2col's."""
    _, _, (th, tw) = _tiles(window, x.shape[1:3])
    return TILE * TILE * th * tw * (x.shape[3] + w.shape[3]) * jnp.dtype(compute_dtype(x)).itemsize


def transform_input(window: Window, x: jax.Array):
    """V = B^T d B for every tile d of pad(Z): a 4x4 grid (lists) of [N, th, tw, C_in], one per transformed
    position; the tile entries are strided slices of pad(Z)."""
    tiles_window, _, (th, tw) = _tiles(window, x.shape[1:3])
    xp = pad(x, tiles_window)
    d = [[xp[:, i:i + OUT * th:OUT, j:j + OUT * tw:OUT] for j in range(TILE)] for i in range(TILE)]
    return _transform(B_T, d)


def transform_kernel(w: jax.Array):
    """U = G g G^T for every (C_in, C_out) pair of the 3x3 kernel: a 4x4 grid of [C_in, C_out]."""
    return _transform(G, [[w[i, j] for j in range(3)] for i in range(3)])


def transform_output(m, out_hw) -> jax.Array:
    """S = A^T M A from the grid M of [N, th, tw, C_out]: each tile's 2x2 block put in place, [N, Ho, Wo, C_out]."""
    y = _transform(A_T, m)  # y[p][q]: row p, column q of every block
    n, th, tw, c = y[0][0].shape
    s = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [N, th, 2, tw, 2, C]
    return s.reshape(n, OUT * th, OUT * tw, c)[:, :out_hw[0], :out_hw[1]]


def _products(v, u):
    """M = V U at each transformed position: 16 products [N, th, tw, C_in] x [C_in, C_out]. Sixteen separate
    products, not one batched over a stacked [16, T, C_in]: stacking V cost as much as computing it
    (BENCHMARKS.md)."""
    return [[jnp.matmul(v_ab, u_ab) for v_ab, u_ab in zip(v_a, u_a)] for v_a, u_a in zip(v, u)]


def _add(grids):
    """The entrywise sum of grids of arrays."""
    return [[sum(entries[1:], entries[0]) for entries in zip(*rows)] for rows in zip(*grids)]


def _wide(*arrays):
    """The arrays in the dtype the transforms and products run in (``compute_dtype``: float32 for bfloat16 and
    float16; module docstring), None kept."""
    c = compute_dtype(*(a for a in arrays if a is not None))
    return [None if a is None else a.astype(c) for a in arrays]


def forward(window: Window, x: jax.Array, w: jax.Array) -> jax.Array:
    """S without bias: S = A^T [(G g G^T) (.) (B^T d B)] A, summed over C_in."""
    xc, wc = _wide(x, w)
    m = _products(transform_input(window, xc), transform_kernel(wc))
    return transform_output(m, window.out_hw(x.shape[1:3])).astype(x.dtype)


def tangent(window: Window, x: jax.Array, w: jax.Array, dx, dw) -> jax.Array:
    """dS = A^T [V(dZ) U + V U(dW)] A, without db; a None tangent is zero (not both)."""
    xc, wc, dx, dw = _wide(x, w, dx, dw)
    terms = []
    if dx is not None:
        terms.append(_products(transform_input(window, dx), transform_kernel(wc)))
    if dw is not None:
        terms.append(_products(transform_input(window, xc), transform_kernel(dw)))
    return transform_output(_add(terms), window.out_hw(x.shape[1:3])).astype(x.dtype)


def gradients(window: Window, x: jax.Array, w: jax.Array, delta: jax.Array, dy=None):
    """(dZ, dW) from Delta = dxi/dS by the transposes of the forward pass's maps (module docstring); dZ by
    Winograd's forward pass over pad(Delta) with the flipped kernel. dW is left in the dtype the products ran in
    (float32 for bfloat16 and float16), for the caller to sum over blocks of examples before rounding it once;
    db = Delta 1 (eq. 14) is the caller's too (``conv.backward``, as for the other rules).

    ``dy``, where the caller has it without reading Delta: the 2x2 grid of Delta's entries by position in each
    tile's block, dY[p][q] = Delta[:, p::2, q::2], [N, th, tw, C_out] or a row or column short (zeros). The fused
    block's 2x2 max pooling routes each window's Delta to one of them (``pool.route_by_offset``), so dM is then
    built from the pooled Delta, a quarter of Delta's size, instead of four strided reads of Delta."""
    _, out_hw, (th, tw) = _tiles(window, x.shape[1:3])
    c_in, c_out = x.shape[3], w.shape[3]
    xc, deltac = _wide(x, delta)
    if dy is None:
        full = jnp.pad(deltac, ((0, 0), (0, OUT * th - out_hw[0]), (0, OUT * tw - out_hw[1]), (0, 0)))
        dy = [[full[:, p::OUT, q::OUT] for q in range(OUT)] for p in range(OUT)]
    else:
        dy = [[jnp.pad(d.astype(deltac.dtype), ((0, 0), (0, th - d.shape[1]), (0, tw - d.shape[2]), (0, 0)))
               for d in row] for row in dy]
    dm = _transform(A_T, dy, transpose=True)
    v = transform_input(window, xc)
    du = [[jnp.matmul(v_ab.reshape(-1, c_in).T, dm_ab.reshape(-1, c_out)) for v_ab, dm_ab in zip(v_a, dm_a)]
          for v_a, dm_a in zip(v, dm)]  # V^T dM, summed over the tiles
    dw = _transform(G, du, transpose=True)  # G^T dU G
    dw = jnp.stack([jnp.stack(row) for row in dw])  # [3, 3, C_in, C_out]
    # P_pad^T [pad_2(Delta) (*) rot180(W)] = pad_{2-p}(Delta) (*) rot180(W), C_in and C_out swapped
    flipped = Window((3, 3), (1, 1), (1, 1), tuple((2 - lo, 2 - hi) for lo, hi in window.padding))
    dx = forward(flipped, delta, jnp.swapaxes(w[::-1, ::-1], 2, 3))
    return dx.astype(x.dtype), dw
