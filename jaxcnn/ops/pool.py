"""Max and average pooling with hand-derived backward rules.

Max pooling (Lin eq. 3, 16, 23; Ray "BP for a max pooling layer"; DD2424 A_MaxPool)::

    Z^{m+1} = mat(P_pool vec(sigma(S)))            P_pool: one 1 per row, at the window's maximum
    dxi/dvec(sigma(S))^T = dxi/dvec(Z^{m+1})^T P_pool

P_pool is "not a constant 0/1 matrix" (Lin): the forward pass picks it. We keep it as one index per output
entry, the offset of the window's *first* maximum in row-major window order (Ray: "in case of a tie, only a single
index is chosen"), stored as int8. The backward pass is Delta^T P_pool: each Delta entry goes to that one position,
and positions covered by several (overlapping) windows add up.

Autodiff differentiates the same forward, a max over the window's entries, and at a tie shares the cotangent
equally among the tied entries. Hand and autodiff therefore differ exactly at tied windows, and nowhere else among
finite inputs. A window holding NaN has a NaN maximum; the hand rule then routes Delta to the window's first NaN (a
NaN counts as the maximum, as in ``argmax`` and PyTorch), while autodiff gives NaN to every entry of that window
(its tie-sharing divides by a count of 0 matches). The output is NaN either way.

Average pooling is the linear map A_AvgPool = (1/K) sum of the window's entries (K = window area, padding counted
as zeros: it equals a depthwise convolution with a constant 1/K filter); its backward spreads Delta / K evenly.

The stride defaults to the window (non-overlapping regions), as in the notes and PyTorch; stax, Flax and Equinox
default to 1.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxcnn.ops import _args, _tangent
from jaxcnn.ops._windows import Window, pad, patches, unpatches
from jaxcnn.ops.conv import fits


def max_pool2d(x: jax.Array, window=2, stride=None, padding="VALID", *, grad: str = "hand") -> jax.Array:
    """Max pooling ``Z = mat(P_pool vec(x))`` (Lin eq. 3) with backward ``Delta^T P_pool`` (Lin eq. 16, 23).

    Args:
      x: [N, H, W, C].
      window: int or (wh, ww), >= 1.
      stride: int or (sh, sw); defaults to ``window`` (non-overlapping, as in the notes).
      padding: "VALID", "SAME", an int, (ph, pw) or ((top, bottom), (left, right)); padded entries are -inf and
        never selected. Each side's padding must be smaller than the window so every window sees real entries.
      grad: "hand" (route Delta to the first maximum, Ray), "autodiff" (JAX: ties share Delta equally) or
        "tangent" (the hand tangent rule as a custom JVP, for forward mode: jax.jvp; docs/formulas.md).

    Returns:
      [N, Ho, Wo, C], Ho = floor((H + top + bottom - wh) / sh) + 1 (DD2424: (w - r)/s + 1).
    """
    x, win = check("max_pool2d", x, window, stride, padding)
    _args.choice("max_pool2d", "grad", grad, _args.GRAD_MODES)
    if grad == "autodiff":
        return max_forward(win, x)
    if grad == "tangent":
        return _tangent.call(max_pool2d_jvp, (x,), window=window, stride=stride, padding=padding)
    return _max_hand(win, x.shape[1:3], x)


def avg_pool2d(x: jax.Array, window=2, stride=None, padding="VALID", *, grad: str = "hand") -> jax.Array:
    """Average pooling ``Z = A_AvgPool vec(x)`` (DD2424): the mean of each window, padding counted as zeros.

    Arguments as ``max_pool2d``. The hand backward is A_AvgPool^T: each Delta entry spread as Delta / K over its
    window (K = window area).
    """
    x, win = check("avg_pool2d", x, window, stride, padding)
    _args.choice("avg_pool2d", "grad", grad, _args.GRAD_MODES)
    if grad == "autodiff":
        return avg_forward(win, x)
    if grad == "tangent":
        return _tangent.call(avg_pool2d_jvp, (x,), window=window, stride=stride, padding=padding)
    return _avg_hand(win, x.shape[1:3], x)


def check(op: str, x, window, stride, padding) -> tuple[jax.Array, Window]:
    x = _args.array(op, "x", x, rank=4, layout="[N, H, W, C]")
    return x, geometry(op, x.shape[1:3], window, stride, padding)


def geometry(op: str, in_hw, window, stride, padding) -> Window:
    """The geometry of a pooling window over an ``in_hw`` input, checked and resolved (stride defaults to the
    window; padding as pairs)."""
    in_hw = tuple(in_hw)
    size = _args.positive_pair(op, "window", window)
    stride = size if stride is None else _args.positive_pair(op, "stride", stride)
    win = Window(size, stride, (1, 1), _args.padding(op, padding, in_hw, size, stride))
    for axis, (lo, hi), k in zip(("height", "width"), win.padding, size):
        if max(lo, hi) >= k:
            raise ValueError(f"{op}: padding {(lo, hi)} in {axis} must be smaller than the window ({k}) on each "
                             f"side, or some windows would hold only padding")
    fits(op, "window", win, in_hw)
    return win


def _windows(win: Window, x: jax.Array, fill: float) -> jax.Array:
    """The entries of every window, [N, Ho, Wo, kh, kw, C], with padding ``fill``."""
    return patches(pad(x, win, fill), win)


# Windows that tile the input (stride = window, no padding: the notes' pooling and every preset's) are a reshape
# of it, [N, Ho, kh, Wo, kw, C]: the max, its first position and the routing back are then single elementwise
# passes instead of K shifted copies and K padded sums. Rows and columns past the last window are dropped.

def _tiles(win: Window) -> bool:
    return win.stride == win.size and win.padding == ((0, 0), (0, 0))


def _tiled(win: Window, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    (kh, kw), ho, wo = win.size, h // win.size[0], w // win.size[1]
    return x[:, : ho * kh, : wo * kw].reshape(n, ho, kh, wo, kw, c)


def _untile(t: jax.Array, in_hw) -> jax.Array:
    """Inverse of ``_tiled`` (its adjoint): back to [N, H, W, C], zeros where no window reaches."""
    n, ho, kh, wo, kw, c = t.shape
    dropped = ((0, 0), (0, in_hw[0] - ho * kh), (0, in_hw[1] - wo * kw), (0, 0))
    return jnp.pad(t.reshape(n, ho * kh, wo * kw, c), dropped)


def _offsets(win: Window, dtype) -> jax.Array:
    """Each tile entry's row-major offset i * kw + j, shaped to broadcast against ``_tiled``."""
    kh, kw = win.size
    return (jnp.arange(kh)[:, None] * kw + jnp.arange(kw)).astype(dtype).reshape(1, 1, kh, 1, kw, 1)


def _spread(v: jax.Array) -> jax.Array:
    """[N, Ho, Wo, C] -> [N, Ho, 1, Wo, 1, C], to broadcast against ``_tiled``."""
    return v[:, :, None, :, None, :]


def max_forward(win: Window, x: jax.Array) -> jax.Array:
    """The one forward pass of max pooling: the max over each window."""
    if _tiles(win):
        return _tiled(win, x).max(axis=(2, 4))
    return _windows(win, x, -jnp.inf).max(axis=(3, 4))


def max_with_index(win: Window, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Forward pass and P_pool: the max of each window and the offset (int8 or int32) of its first maximum."""
    k = len(win.offsets())
    index_dtype = jnp.int8 if k <= 127 else jnp.int32
    if _tiles(win):
        t = _tiled(win, x)
        z = t.max(axis=(2, 4))
        # the first maximum; a NaN counts as the maximum, as in argmax (so both paths route to the first NaN)
        first = (t == _spread(z)) | jnp.isnan(t)
        return z, jnp.where(first, _offsets(win, index_dtype), k).min(axis=(2, 4))
    w = _windows(win, x, -jnp.inf)
    flat = w.reshape(*w.shape[:3], k, w.shape[5])  # window entries in row-major order
    return flat.max(axis=3), jnp.argmax(flat, axis=3).astype(index_dtype)  # argmax: the first maximum


def route(win: Window, index: jax.Array, delta: jax.Array, in_hw) -> jax.Array:
    """Delta^T P_pool (Lin eq. 16, 23): put each Delta entry where its window's first maximum was."""
    zero = jnp.zeros((), delta.dtype)
    if _tiles(win):
        return _untile(jnp.where(_offsets(win, index.dtype) == _spread(index), _spread(delta), zero), in_hw)
    offsets = _offsets(win, index.dtype).reshape(1, 1, 1, *win.size, 1)
    cols = jnp.where(offsets == index[:, :, :, None, None, :], delta[:, :, :, None, None, :], zero)
    return unpatches(cols, win, in_hw)


def route_by_offset(win: Window, index: jax.Array, delta: jax.Array) -> list[list[jax.Array]]:
    """``route`` for windows that tile the input, split by position in the window: entry [i][j] of the kh x kw grid,
    [N, Ho, Wo, C], is ``route``'s result read from row i and column j with stride (kh, kw), that is each window's
    Delta where its first maximum was at (i, j), else 0 (built without the routed array itself)."""
    zero = jnp.zeros((), delta.dtype)
    kh, kw = win.size
    return [[jnp.where(index == i * kw + j, delta, zero) for j in range(kw)] for i in range(kh)]


def pick(win: Window, index: jax.Array, dx: jax.Array) -> jax.Array:
    """P_pool vec(dZ): the entry of ``dx`` at each window's stored first maximum (the transpose of ``route``)."""
    if _tiles(win):
        chosen = _offsets(win, index.dtype) == _spread(index)
        return jnp.where(chosen, _tiled(win, dx), jnp.zeros((), dx.dtype)).sum(axis=(2, 4))
    w = _windows(win, dx, 0.0)
    flat = w.reshape(*w.shape[:3], len(win.offsets()), w.shape[5])
    return jnp.take_along_axis(flat, index[:, :, :, None, :].astype(jnp.int32), axis=3)[:, :, :, 0]


def max_pool2d_jvp(primals: tuple, tangents: tuple, window=2, stride=None, padding="VALID"):
    """The hand tangent rule of ``max_pool2d``: ``(Z^{m+1}, P_pool vec(dZ))``, the tangent read at each window's
    first maximum, the P_pool of the forward pass (Lin eq. 3 differentiated: P_pool is constant where the max is
    differentiable). At a tied window it takes the first maximum's tangent, as the hand VJP routes Delta there, so
    the two stay adjoint; autodiff's tangent averages the tied entries' instead. Settings as ``max_pool2d``."""
    (x,), (dx,) = _args.jvp_pairs("max_pool2d_jvp", primals, tangents, ("x",))
    x, win = check("max_pool2d_jvp", x, window, stride, padding)
    (dx,) = _args.tangents_match("max_pool2d_jvp", ("x",), (x,), (dx,))
    z, index = max_with_index(win, x)
    return z, jnp.zeros_like(z) if dx is None else pick(win, index, dx)


def avg_pool2d_jvp(primals: tuple, tangents: tuple, window=2, stride=None, padding="VALID"):
    """The hand tangent rule of ``avg_pool2d``: A_AvgPool is linear, so dZ^{m+1} = A_AvgPool vec(dZ)."""
    (x,), (dx,) = _args.jvp_pairs("avg_pool2d_jvp", primals, tangents, ("x",))
    x, win = check("avg_pool2d_jvp", x, window, stride, padding)
    (dx,) = _args.tangents_match("avg_pool2d_jvp", ("x",), (x,), (dx,))
    z = avg_forward(win, x)
    return z, jnp.zeros_like(z) if dx is None else avg_forward(win, dx)


def avg_forward(win: Window, x: jax.Array) -> jax.Array:
    """The one forward pass of average pooling: the sum of each window over K."""
    if _tiles(win):
        return _tiled(win, x).sum(axis=(2, 4)) / len(win.offsets())
    return _windows(win, x, 0.0).sum(axis=(3, 4)) / len(win.offsets())


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _max_hand(win, in_hw, x):
    return max_forward(win, x)


def _max_hand_fwd(win, in_hw, x):
    z, index = max_with_index(win, x)
    return z, index


def _max_hand_bwd(win, in_hw, index, delta):
    return (route(win, index, delta, in_hw),)


_max_hand.defvjp(_max_hand_fwd, _max_hand_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _avg_hand(win, in_hw, x):
    return avg_forward(win, x)


def _avg_hand_fwd(win, in_hw, x):
    return avg_forward(win, x), None


def _avg_hand_bwd(win, in_hw, _, delta):
    share = delta / len(win.offsets())  # A_AvgPool^T: Delta / K to every entry of the window
    n, ho, wo, c = delta.shape
    kh, kw = win.size
    if _tiles(win):
        return (_untile(jnp.broadcast_to(_spread(share), (n, ho, kh, wo, kw, c)), in_hw),)
    cols = jnp.broadcast_to(share[:, :, :, None, None, :], (n, ho, wo, kh, kw, c))
    return (unpatches(cols, win, in_hw),)


_avg_hand.defvjp(_avg_hand_fwd, _avg_hand_bwd)


def _global_avg_forward(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_avg_hand(x, hw):
    return _global_avg_forward(x)


def _global_avg_fwd(x, hw):
    return _global_avg_forward(x), None


def _global_avg_bwd(hw, _, delta):
    (h, w), (n, c) = hw, delta.shape
    return (jnp.broadcast_to((delta / (h * w))[:, None, None, :], (n, h, w, c)),)


_global_avg_hand.defvjp(_global_avg_fwd, _global_avg_bwd)


def global_avg_pool(x: jax.Array, *, grad: str = "hand") -> jax.Array:
    """Global average pooling [N, H, W, C] -> [N, C]: each channel's mean over the whole image, so a classifier
    head needs no Flatten (and takes any image size). It is ``avg_pool2d`` with one H x W window: z_c =
    (1 / HW) sum_{ij} x_ijc, so dz_c / dx_ijc = 1 / HW and the hand backward spreads each Delta_c evenly,
    Delta_c / HW, over its channel (A_AvgPool^T of DD2424 with K = HW). It stores nothing but the input's shape.

    Args:
      x: [N, H, W, C], floating point.
      grad: "hand", "autodiff" or "tangent" (the hand tangent rule, for forward mode).
    """
    x = _image("global_avg_pool", x)
    _args.choice("global_avg_pool", "grad", grad, _args.GRAD_MODES)
    if grad == "tangent":
        return _tangent.call(global_avg_pool_jvp, (x,))
    return _global_avg_forward(x) if grad == "autodiff" else _global_avg_hand(x, x.shape[1:3])


def _image(op: str, x) -> jax.Array:
    """``x`` checked as global average pooling's input: [N, H, W, C], floating point, with pixels to average."""
    x = _args.array(op, "x", x, rank=4, layout="[N, H, W, C]")
    _args.nonempty(op, "x", x, {1: "H", 2: "W"}, "each channel is averaged over the image")
    return x


def global_avg_pool_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule of ``global_avg_pool``: ``(z, mean of dx over H and W)`` (the op is linear)."""
    (x,), (dx,) = _args.jvp_pairs("global_avg_pool_jvp", primals, tangents, ("x",))
    x = _image("global_avg_pool_jvp", x)
    (dx,) = _args.tangents_match("global_avg_pool_jvp", ("x",), (x,), (dx,))
    z = _global_avg_forward(x)
    return z, jnp.zeros_like(z) if dx is None else _global_avg_forward(dx)
