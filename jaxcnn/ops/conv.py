r"""2-D convolution (cross-correlation, as in every CNN library) with three hand-derived backward rules: im2col
(Lin), flip (Ray, DD2424) and, for 3x3 kernels with stride 1, Winograd's F(2x2, 3x3) (``jaxcnn.ops.winograd``).

Forward, Lin eq. (3), in NHWC/HWIO::

    S = W phi(pad(Z)) + b 1^T        phi(pad(Z)): [N, Ho, Wo, kh*kw*C_in]   W: w.reshape(kh*kw*C_in, C_out)

Our rows are output positions, so ``S = phi(pad(Z)) @ w2 + b``: the notes' W^m is ``w2.T`` and their columns are
our rows (their patch entries are ordered column-major, ours (kernel row, kernel column, channel) row-major).
The forward pass computes this S either literally, as phi(pad(Z)) @ w2 keeping phi(pad(Z)) for eq. (12)
(``store_phi``: Lin, "Storing phi(pad(Z))", "more suitable for CPU environments"), or with XLA's convolution
(``lax.conv_general_dilated``), after which the im2col rule builds phi(pad(Z)) again, as in Lin's summary of
operations. The default is the faster per backend: storing on CPU (measured in BENCHMARKS.md), XLA's
convolution (cuDNN on GPUs) elsewhere. Both gradient modes share the forward pass chosen; tests/test_matrices.py
checks S against W phi(pad(Z)) + b 1^T built from the notes' matrices.

Backward, ``rule="im2col"`` (Lin, with Delta = dxi/dS)::

    dW = Delta phi(pad(Z))^T                 eq. (12)      ours: phi^T @ Delta            [kh*kw*C_in, C_out]
    db = Delta 1                             eq. (14)      ours: ones @ Delta, a product like eq. (12)
    dZ = vec(W^T Delta)^T P_phi P_pad        eq. (18)      ours: unpatches(Delta @ w2^T)

Storing phi(pad(Z)) trades space, kh*kw times Z's size, for its second expansion. ``block=B`` takes the other
side of Lin's trade (phi(pad(Z)) "is a huge matrix") without XLA's convolution: eq. (3), (12) and (18) are sums
over the instances i, so both passes build phi(pad(Z^i)) for B examples at a time and consume it at once::

    S^i  = phi(pad(Z^i)) @ w2                    per block (eq. 3)
    dW   = sum over blocks of phi(pad(Z^i))^T Delta^i     (eq. 12, accumulated)
    dZ^i = unpatches(Delta^i @ w2^T)             per block (eq. 18)

so at most one block's phi(pad(Z)) (``BLOCK_BYTES``, cache-sized, for ``block="auto"``) exists at any time.
``rule="winograd"`` takes ``block`` the same way: its tiles V and M of one block at a time, dW summed over blocks.

Backward, ``rule="flip"`` (Ray; DD2424 "write back-prop eqn through convolution as a convolution"). Ray derives it
for stride 1 and no dilation; the general case, one channel pair, 0-based, Zp = pad(Z), stride s, dilation d::

    S[o]   = sum_i Zp[o s + i d] K[i]
    dK[i]  = sum_o Zp[o s + i d] Delta[o]
           = (Zp  (*)_{stride d}  dil_s(Delta))[i]                       Ray: dK = I * dJ
    dZp[p] = sum_{o, i : o s + i d = p} Delta[o] K[i]
           = (pad_{(k-1)d}(dil_s(Delta))  (*)  dil_d(rot180(K)))[p]      Ray: dI = pad(dJ) * flip(K)

where (*) is correlation, dil_s inserts s - 1 zeros between entries and pad_q adds q zeros on both sides. Check of
the second line: output p of the full correlation sums Delta[o] K[i] over o s = p - i d, i.e. exactly the pairs
that read Zp[p]. With channels, dK sums over the batch (N and C_in swap roles: the batch is contracted) and dZ sums
over C_out (the kernel's in/out axes swap: DD2424's sum_i G_i * F_{2i}^rot180). Finally dZ = P_pad^T dZp: only the
rows of Zp inside Z survive; rows dropped by the stride (not fitting) get zero gradient. Both correlations are
``lax.conv_general_dilated`` calls: ``rhs_dilation`` / ``lhs_dilation`` insert the zeros, ``window_strides`` is
the stride d, and padding (possibly negative, i.e. cropping) does pad_{(k-1)d} and P_pad^T in one go.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops import _args, _tangent, winograd
from jaxcnn.ops._windows import Window, pad, patches, unpatches


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple = 0,
    dilation: int | tuple[int, int] = 1,
    grad: str = "hand",
    rule: str | None = None,
    store_phi: bool | None = None,
    block: int | str | None = None,
) -> jax.Array:
    """2-D convolution ``S = W phi(pad(Z)) + b 1^T`` (Lin eq. 3) with a hand-derived or autodiff gradient.

    Args:
      x: input Z, [N, H, W, C_in].
      w: kernel, [kh, kw, C_in, C_out] (HWIO).
      b: optional bias, [C_out].
      stride: int or (sh, sw), >= 1.
      padding: "VALID", "SAME", an int, (ph, pw) or ((top, bottom), (left, right)); zeros are added.
      dilation: int or (dh, dw), >= 1: kernel taps are ``dilation`` apart.
      grad: "hand" (custom VJP following the notes), "autodiff" (JAX differentiates the same forward) or
        "tangent" (the hand tangent rule as a custom JVP, for forward mode: jax.jvp; docs/formulas.md).
      rule: hand rule: "im2col" (Lin eq. 12, 14, 18), "flip" (Ray / DD2424, generalised to stride and
        dilation) or "winograd" (F(2x2, 3x3), Lavin and Gray: 3x3 kernels, stride 1, no dilation; its forward
        pass too, with 16 products per 2x2 output block where eq. 3 takes 36; ``jaxcnn.ops.winograd``).
        Default (None): the faster on this backend, as measured in BENCHMARKS.md: "im2col" on CPU (or wherever
        ``store_phi=True``), "flip" on GPUs and TPUs. With ``grad="autodiff"`` it selects only the
        forward pass that autodiff differentiates ("winograd": Winograd's) and ``store_phi``'s default.
      store_phi: compute S as phi(pad(Z)) @ w2 and, with the im2col rule, keep phi(pad(Z)) for dW (Lin's
        space-for-time trade); False: XLA's convolution. Default (None): True on CPU with the im2col rule,
        else False. Applies to both gradient modes, which share the forward pass.
      block: im2col rule, phi(pad(Z)) not stored: build phi(pad(Z)) for at most this many examples at a time,
        in the forward and the backward pass (blocks of equal size: the largest divisor of N not above it), or
        "auto": as many as fit in ``BLOCK_BYTES``. Memory for phi(pad(Z)) drops by N / block. With
        ``rule="winograd"``: its transformed tiles likewise ("auto": ``WINOGRAD_BLOCK_BYTES``). None: the whole
        batch at once.

    Returns:
      S, [N, Ho, Wo, C_out] with Ho = floor((H + top + bottom - dh*(kh-1) - 1) / sh) + 1 and likewise Wo.
    """
    x, w, b, window = check("conv2d", x, w, b, stride, padding, dilation)
    _args.choice("conv2d", "grad", grad, _args.GRAD_MODES)
    rule, store_phi, block = settle("conv2d", x, w, window, rule, store_phi, block)
    if grad == "autodiff":
        return forward(window, store_phi, x, w, b, block, rule)[0]
    if grad == "tangent":
        return _tangent.call(conv2d_jvp, (x, w, b), stride=stride, padding=padding, dilation=dilation, rule=rule,
                             store_phi=store_phi, block=block)
    return _conv_hand(rule, window, store_phi, block, x, w, b)


def resolve(op: str, rule: str | None, store_phi: bool | None, block=None) -> tuple[str, bool]:
    """The hand rule and Lin's store_phi switch, checked, their defaults resolved per backend (the faster of each
    in BENCHMARKS.md): im2col with phi(pad(Z)) stored on CPU; the flip rule on accelerators, whose convolutions
    (cuDNN on GPUs) beat phi(pad(Z)) products there. Asking to store phi(pad(Z)) implies the im2col rule, and so
    does a ``block`` (checked here too; it also applies to Winograd's), which also implies not storing it."""
    if store_phi is not None and not isinstance(store_phi, bool):
        raise TypeError(f"{op}: store_phi must be True, False or None, got {store_phi!r}")
    if block is not None:
        if not (block == "auto" or (type(block) is int and block >= 1)):
            raise ValueError(f"{op}: block must be None, 'auto' or an int >= 1 (at most that many examples per block "
                             f"of phi(pad(Z))), got {block!r}")
        rule, store_phi = rule or "im2col", False if store_phi is None else store_phi
    if rule is None:
        rule = "im2col" if store_phi or jax.default_backend() == "cpu" else "flip"
    _args.choice(op, "rule", rule, _args.CONV_RULES)
    if block is not None and (rule not in ("im2col", "winograd") or store_phi):
        raise ValueError(f"{op}: block applies to rule='im2col' with store_phi=False or to rule='winograd' "
                         f"(phi(pad(Z)) or Winograd's tiles built block by block, never stored), got rule={rule!r}, "
                         f"store_phi={store_phi!r}")
    if store_phi is None:
        return rule, rule == "im2col" and jax.default_backend() == "cpu"
    if store_phi and rule != "im2col":
        raise ValueError(f"{op}: store_phi applies to rule='im2col' (rule={rule!r} does not use phi(pad(Z)))")
    return rule, store_phi


def settle(op: str, x: jax.Array, w: jax.Array, window: Window, rule, store_phi, block) -> tuple[str, bool, int | None]:
    """An op's rule, store_phi and block: checked and resolved (``resolve``), the block sized for this batch
    (``block_size``), and the arrays they imply checked against ``MAX_ENTRIES`` (``check_size``)."""
    rule, store_phi = resolve(op, rule, store_phi, block)
    if rule == "winograd":
        winograd.check(op, window.size, window.stride, window.dilation)
    block = block_size(block, x, w, window, rule)
    check_size(op, x, w, window, rule, store_phi, block)
    return rule, store_phi, block


BLOCK_BYTES = 4 * 2**20  # block="auto": phi(pad(Z)) of one block at most this size (fits a CPU's L2 + L3 share)
# block="auto" with rule="winograd": a block's transformed tiles V and M at most this size. Smaller blocks make
# Winograd's 16 products too thin (simplenn-mnist's step 1.1x slower in blocks of 8 than of 32; BENCHMARKS.md)
WINOGRAD_BLOCK_BYTES = 16 * 2**20


def block_size(block, x: jax.Array, w: jax.Array, window: Window, rule: str = "im2col") -> int | None:
    """``block`` (checked by ``resolve``) for a batch ``x``: examples per block of phi(pad(Z)), or None for the
    whole batch at once. The blocks are of equal size: the largest divisor of N not above ``block``, or for "auto"
    not above the examples whose phi(pad(Z)) fits in ``BLOCK_BYTES`` (``rule="winograd"``: whose transformed tiles
    fit in ``WINOGRAD_BLOCK_BYTES``; at least 1). A block of the whole batch is None: the unblocked computation."""
    if block is None:
        return None
    if block == "auto" and rule == "winograd":
        block = max(1, WINOGRAD_BLOCK_BYTES // winograd.tile_bytes(window, x, w))
    elif block == "auto":
        per_example = math.prod(window.out_hw(x.shape[1:3])) * math.prod(w.shape[:3]) * x.dtype.itemsize
        block = max(1, BLOCK_BYTES // per_example)
    n = x.shape[0]
    block = max(d for d in range(1, min(block, n) + 1) if n % d == 0)  # blocks of equal size
    return None if block == n else block


def check(op: str, x, w, b, stride, padding, dilation) -> tuple[jax.Array, jax.Array, jax.Array | None, Window]:
    """Validate conv arguments and resolve them into arrays and a static ``Window``."""
    x = _args.array(op, "x", x, rank=4, layout="[N, H, W, C_in]")
    w = _args.array(op, "w", w, rank=4, layout="[kh, kw, C_in, C_out] (HWIO)")
    if b is not None:
        b = _args.array(op, "b", b, rank=1, layout="[C_out]")
        if b.shape[0] != w.shape[3]:
            raise ValueError(f"{op}: b must have shape ({w.shape[3]},) to match w's C_out, got {tuple(b.shape)}")
    if w.shape[2] != x.shape[3]:
        raise ValueError(f"{op}: channel mismatch: x has C_in={x.shape[3]} (x.shape[3]) but w expects "
                         f"C_in={w.shape[2]} (w.shape[2]); x is NHWC and w is HWIO")
    _args.same_dtype(op, x=x, w=w, b=b)
    if min(w.shape[:2]) < 1:
        raise ValueError(f"{op}: w must have a kernel of at least 1x1, got shape {tuple(w.shape)}")
    if x.shape[0] < 1 or min(x.shape[1:]) < 1 or w.shape[3] < 1:
        raise ValueError(f"{op}: empty arrays: x has shape {tuple(x.shape)} [N, H, W, C_in] and w {tuple(w.shape)} "
                         f"[kh, kw, C_in, C_out]; every size must be >= 1")
    return x, w, b, geometry(op, x.shape[1:3], w.shape[:2], stride, padding, dilation)


def geometry(op: str, in_hw, kernel_hw, stride, padding, dilation) -> Window:
    """The geometry of a convolution of a ``kernel_hw`` kernel over an ``in_hw`` input, checked and resolved
    (padding as pairs, "SAME" included)."""
    stride = _args.positive_pair(op, "stride", stride)
    dilation = _args.positive_pair(op, "dilation", dilation)
    win = Window(tuple(kernel_hw), stride, dilation, ((0, 0), (0, 0)))
    win = win._replace(padding=_args.padding(op, padding, tuple(in_hw), win.extent, stride))
    fits(op, "kernel", win, in_hw)
    return win


MAX_ENTRIES = 2**31 - 1  # a stated bound on any array an op builds, checked before anything is allocated


def check_size(op: str, x: jax.Array, w: jax.Array, window: Window, rule: str, store_phi: bool,
               block: int | None = None) -> None:
    """The padded input, the output and (im2col rule) phi(pad(Z)) (of one block, when blocked) must each have at
    most ``MAX_ENTRIES`` entries: a typo such as padding=10**4 would otherwise allocate tens of GB (or overflow
    32-bit indexing). Winograd's arrays are each smaller than the padded input."""
    n, c_in, c_out = x.shape[0], x.shape[3], w.shape[3]
    (ho, wo), (hp, wp) = window.out_hw(x.shape[1:3]), window.padded_hw(x.shape[1:3])
    arrays = {"padded input": (n, hp, wp, c_in), "output": (n, ho, wo, c_out)}
    if rule == "im2col" or store_phi:
        arrays["phi(pad(Z))"] = (block or n, ho, wo, w.shape[0] * w.shape[1] * c_in)
    for what, shape in arrays.items():
        if math.prod(shape) > MAX_ENTRIES:
            raise ValueError(f"{op}: the {what} would have shape {shape}, {math.prod(shape):,} entries, more than "
                             f"the limit of 2^31 - 1; use less padding, a smaller batch or smaller sizes")


def fits(op: str, what: str, window: Window, in_hw, into: str = "input") -> None:
    """The (dilated) window must fit inside the padded input, else there is no output position."""
    for axis, n, e in zip(("height", "width"), window.padded_hw(in_hw), window.extent):
        if e > n:
            raise ValueError(f"{op}: the {what} spans {e} in {axis} (dilation included) but the {into} has only "
                             f"{n} (padding included); use a smaller {what}, a larger {into} or more padding")


def phi(window: Window, x: jax.Array) -> jax.Array:
    """phi(pad(Z)) (Lin eq. 3): [N, Ho, Wo, kh*kw*C_in], one row per output position, HWIO order."""
    cols = patches(pad(x, window), window)
    return cols.reshape(*cols.shape[:3], -1)


def forward(window: Window, store_phi: bool, x: jax.Array, w: jax.Array, b: jax.Array | None,
            block: int | None = None, rule: str | None = None):
    """The one forward pass of conv2d, shared by both gradient modes: (S, phi(pad(Z))) with S = W phi(pad(Z)) +
    b 1^T computed literally when ``store_phi`` (phi(pad(Z)) is then kept for eq. 12), else (S, None) with S by
    XLA's convolution, literally ``block`` examples at a time, or by Winograd's F(2x2, 3x3) (``rule="winograd"``)."""
    if block is not None:
        p = None
        s = by_blocks(block, lambda x: literal(window, x, w, rule), x)
    elif rule == "winograd":
        p = None
        s = winograd.forward(window, x, w)
    elif store_phi:
        p = phi(window, x)
        s = jnp.matmul(p, w.reshape(-1, w.shape[3]))
    else:
        p = None
        s = correlate(window, x, w)
    return (s if b is None else s + b), p


def literal(window: Window, x: jax.Array, w: jax.Array, rule: str) -> jax.Array:
    """S without bias for a block of examples, computed literally: eq. (3) from its phi(pad(Z)), or Winograd's
    F(2x2, 3x3) (``rule="winograd"``)."""
    if rule == "winograd":
        return winograd.forward(window, x, w)
    return jnp.matmul(phi(window, x), w.reshape(-1, w.shape[3]))


def by_blocks(block: int, f, *arrays):
    """``f`` applied to ``block`` examples of ``arrays`` at a time (one after the other: ``lax.map``), its outputs
    put back together along the batch axis."""
    n = arrays[0].shape[0]
    out = lax.map(lambda a: f(*a), tuple(a.reshape(n // block, block, *a.shape[1:]) for a in arrays))
    return jax.tree_util.tree_map(lambda o: o.reshape(n, *o.shape[2:]), out)


def correlate(window: Window, x: jax.Array, w: jax.Array) -> jax.Array:
    """W phi(pad(Z)) as XLA's convolution (cuDNN on GPUs), without bias."""
    return lax.conv_general_dilated(x, w, window.stride, window.padding, rhs_dilation=window.dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv2d_jvp(primals: tuple, tangents: tuple, *, stride=1, padding=0, dilation=1, rule: str | None = None,
               store_phi: bool | None = None, block: int | str | None = None) -> tuple[jax.Array, jax.Array]:
    """The hand tangent rule (R-op) of ``conv2d``: ``(S, dS)`` for primals ``(x, w[, b])`` and tangents of the same
    structure (``None`` for a zero tangent), as ``jax.jvp`` returns them.

    Lin eq. (3) is bilinear in (Z, W), so its differential is::

        dS = W phi(pad(dZ)) + dW phi(pad(Z)) + db 1^T

    ``rule="im2col"`` computes both products on phi(pad(.)) (reusing phi(pad(Z)) when the forward stored it);
    ``rule="flip"`` as the correlations W (*) dZ and dW (*) Z, the forward's own convolution (Ray's form);
    ``rule="winograd"`` as A^T [V(dZ) U + V U(dW)] A (``jaxcnn.ops.winograd``); with ``block``, both products
    block by block. Settings as ``conv2d``.
    """
    (x, w, b), (dx, dw, db) = _args.jvp_pairs("conv2d_jvp", primals, tangents, ("x", "w", "b"))
    x, w, b, window = check("conv2d_jvp", x, w, b, stride, padding, dilation)
    rule, store_phi, block = settle("conv2d_jvp", x, w, window, rule, store_phi, block)
    dx, dw, db = _args.tangents_match("conv2d_jvp", ("x", "w", "b"), (x, w, b), (dx, dw, db))
    return tangent(rule, window, store_phi, x, w, b, dx, dw, db, block)


def tangent(rule: str, window: Window, store_phi: bool, x, w, b, dx, dw, db, block: int | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """(S, dS) by the chosen rule (see ``conv2d_jvp``); a None tangent is zero and costs nothing."""
    if block is not None:  # S and dS of each block by the im2col rule, sharing the block's phi(pad(Z))
        of_block = lambda x, dx=None: tangent(rule, window, True, x, w, None, dx, dw, None)
        s, ds = by_blocks(block, of_block, *((x,) if dx is None else (x, dx)))
        s = s if b is None else s + b
        return s, ds if db is None else ds + db
    s, p = forward(window, store_phi, x, w, b, rule=rule)
    terms = []
    if rule == "winograd":
        if dx is not None or dw is not None:
            terms.append(winograd.tangent(window, x, w, dx, dw))  # A^T [V(dZ) U + V U(dW)] A
    elif rule == "im2col":
        if dx is not None:
            terms.append(jnp.matmul(phi(window, dx), w.reshape(-1, w.shape[3])))  # W phi(pad(dZ))
        if dw is not None:
            p = phi(window, x) if p is None else p
            terms.append(jnp.matmul(p, dw.reshape(-1, dw.shape[3])))  # dW phi(pad(Z))
    else:
        terms += [correlate(window, dx, w)] if dx is not None else []
        terms += [correlate(window, x, dw)] if dw is not None else []
    if db is not None:
        terms.append(jnp.broadcast_to(db, s.shape))  # db 1^T
    return s, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(s)


def backward(rule: str, window: Window, x: jax.Array, w: jax.Array, delta: jax.Array, stored_phi=None,
             block: int | None = None, dy=None):
    """(dZ, dW, db) from Delta = dxi/dS [N, Ho, Wo, C_out] by the chosen rule (see the module docstring); ``dy``:
    Winograd's, ``winograd.gradients``, for the whole batch (in blocks: ``blocked_backward``'s ``dy_of``)."""
    if block is not None:
        if dy is not None:
            raise ValueError("conv.backward: dy is for the whole batch; with block, give blocked_backward dy_of")
        return blocked_backward(rule, window, x, w, block, delta)
    if rule == "winograd":
        dx, dw = winograd.gradients(window, x, w, delta, dy)
        return dx, dw.astype(w.dtype), _bias_gradient(delta)
    if rule == "im2col":
        return _im2col_backward(window, x, w, delta, stored_phi)
    return (*_flip_backward(window, x, w, delta), delta.sum(axis=(0, 1, 2)))  # db: eq. (14), Delta 1


def _im2col_backward(window: Window, x, w, delta, stored_phi=None):
    rows = delta.reshape(-1, delta.shape[3])  # one row per output position
    p = phi(window, x) if stored_phi is None else stored_phi
    dw = jnp.matmul(p.reshape(rows.shape[0], -1).T, rows).reshape(w.shape)  # eq. (12)
    return _input_gradient(window, x, w, delta), dw, _bias_gradient(delta)


def _bias_gradient(delta, dtype=None):
    """db = Delta 1, eq. (14), as the product it is (in ``dtype``, else Delta's): every reader of Delta is then a
    product, and XLA computes Delta once (a sum over rows would make it fuse Delta's producer, col2im and routing,
    into two readers and compute it twice)."""
    rows = delta.reshape(-1, delta.shape[3])
    return jnp.matmul(jnp.ones(rows.shape[0], rows.dtype), rows, preferred_element_type=dtype)


def _input_gradient(window: Window, x, w, delta):
    """dZ = vec(W^T Delta)^T P_phi P_pad, eq. (18): W^T Delta and its sum over overlapping windows, P_phi^T, stay in
    float32 for narrower dtypes and are rounded once (rounding W^T Delta first made dZ 2.5x less accurate in
    bfloat16 than the flip rule's: experiments/results/precision.md)."""
    rows = delta.reshape(-1, delta.shape[3])
    dphi = jnp.matmul(rows, w.reshape(-1, w.shape[3]).T, preferred_element_type=_args.compute_dtype(rows))
    cols = dphi.reshape(*delta.shape[:3], *w.shape[:3])  # [N, Ho, Wo, kh, kw, C_in]
    return unpatches(cols, window, x.shape[1:3]).astype(x.dtype)  # P_pad^T P_phi^T


def blocked_backward(rule: str, window: Window, x, w, block: int, delta, *more, delta_of=None, dy_of=None):
    """(dZ, dW, db) by the im2col or Winograd rule ``block`` examples at a time: dW and db summed over the blocks
    (in float32 for narrower dtypes, as XLA's products keep it; eq. 12 for im2col, eq. 14), dZ per block (eq. 18
    and col2im for im2col). With ``delta_of``, a block's Delta is ``delta_of`` of its blocks of ``delta`` and
    ``more`` (the fused block's mask and P_pool routing, eq. 26): Delta is then never built for the whole batch.
    With ``dy_of`` (Winograd), a block's ``dy`` (``winograd.gradients``) is ``dy_of`` of its blocks of ``more``."""
    n, acc = x.shape[0], _args.compute_dtype(delta)

    def one_block(sums, blocks):
        (dw, db), (x, delta, *rest) = sums, blocks
        delta = delta if delta_of is None else delta_of(delta, *rest)
        db = db + _bias_gradient(delta, acc)
        if rule == "winograd":
            dx, dw_block = winograd.gradients(window, x, w, delta, None if dy_of is None else dy_of(*rest))
            return (dw + dw_block.reshape(dw.shape), db), dx
        rows = delta.reshape(-1, delta.shape[3])
        p = phi(window, x)
        dw = dw + jnp.matmul(p.reshape(rows.shape[0], -1).T, rows, preferred_element_type=acc)  # eq. (12)
        return (dw, db), _input_gradient(window, x, w, delta)

    split = lambda a: a.reshape(n // block, block, *a.shape[1:])
    zeros = (jnp.zeros((math.prod(w.shape[:3]), w.shape[3]), acc), jnp.zeros(w.shape[3], acc))
    (dw, db), dx = lax.scan(one_block, zeros, tuple(map(split, (x, delta, *more))))
    return dx.reshape(x.shape), dw.reshape(w.shape).astype(w.dtype), db.astype(delta.dtype)


def _flip_backward(window: Window, x, w, delta):
    in_hw, out_hw = x.shape[1:3], delta.shape[1:3]
    # Rows of pad(Z) past the last window are never read: crop them (negative high padding) so that the
    # correlation Zp (*) dil_s(Delta) has exactly kh x kw outputs.
    used = [(o - 1) * s + e for o, s, e in zip(out_hw, window.stride, window.extent)]
    dw_pad = [(lo, u - lo - n) for (lo, _), n, u in zip(window.padding, in_hw, used)]
    dw = lax.conv_general_dilated(
        x, delta, window_strides=window.dilation, padding=dw_pad, rhs_dilation=window.stride,
        dimension_numbers=("CHWN", "IHWO", "HWNC"),  # contract over N: C_in plays the batch
    )
    # Full correlation with rot180(K), then P_pad^T: low pad (k-1)d - top, high pad chosen so that H rows remain.
    dx_pad = [(e - 1 - lo, n + lo - (o - 1) * s - 1)
              for (lo, _), n, o, s, e in zip(window.padding, in_hw, out_hw, window.stride, window.extent)]
    dx = lax.conv_general_dilated(
        delta, w[::-1, ::-1], window_strides=(1, 1), padding=dx_pad, lhs_dilation=window.stride,
        rhs_dilation=window.dilation, dimension_numbers=("NHWC", "HWOI", "NHWC"),  # kernel in/out swapped
    )
    return dx, dw


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _conv_hand(rule, window, store_phi, block, x, w, b):
    return forward(window, store_phi, x, w, b, block, rule)[0]


def _conv_hand_fwd(rule, window, store_phi, block, x, w, b):
    s, p = forward(window, store_phi, x, w, b, block, rule)
    return s, (x, w, b, p)


def _conv_hand_bwd(rule, window, store_phi, block, res, delta):
    x, w, b, p = res
    dx, dw, db = backward(rule, window, x, w, delta, stored_phi=p, block=block)
    return dx, dw, None if b is None else db


_conv_hand.defvjp(_conv_hand_fwd, _conv_hand_bwd)
