"""The fused block's backward glue as one Pallas kernel: does it beat what XLA makes of it on a GPU?

Lin's block (``jc.conv_relu_pool``) needs, between the next layer's Delta and its two products (dW and dZ^m), the
ReLU mask read from the pooled output, the routing back through P_pool and the bias gradient::

    Delta_S = (Delta (.) I[Z^{m+1}]) P_pool            eq. (24), (26)
    db      = Delta_S 1                                 eq. (14)

The library writes them as XLA ops (``pool.route``, ``conv._bias_gradient``), which XLA fuses as it sees fit. The
performance issue asks for them as one hand-written kernel "where XLA's fusions stop". ``masked_route`` is that
kernel in Pallas (Triton on a GPU): each program reads a block of the pooled Delta, Z^{m+1} and P_pool's int8
offsets once, writes the ph x pw window entries of Delta_S, and sums its masked Delta into a partial db (each pooled
entry lands in exactly one window position, so db sums the pooled entries: no second pass over Delta_S).

By bytes alone it can save little: XLA's form reads Delta_S once more for db, 16 bytes per pooled float32 entry;
simplenn-cifar's three blocks hold 7.3 M pooled entries at batch 512, so 117 MB, about 35 us at an H100's 3.35
TB/s, 1.5% of the 2.41 ms step measured there. More only where XLA's fusions of the glue run far from their
roofline, which the report's "glue roofline" column (``glue_bytes`` at the measured bandwidth) shows.

    python -m experiments.pallas_block    # writes experiments/results/pallas_block-<backend>.md

On a GPU it checks the kernel against the library on simplenn-cifar's three fused blocks, then times, at batch 128
and 512 in float32 and bfloat16, (1) the glue alone: XLA's ops against the kernel, and (2) the block's whole
backward pass with the flip rule (the GPUs' default): the library's against the same with the kernel. On a CPU,
where Pallas has no compiler, it runs the kernel in Pallas's interpreter against the library on small shapes and
lowers it for CUDA (Triton's IR, built without a GPU): correctness and a kernel that lowers, no timings.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from experiments._common import machine, parser, table, write
from jaxcnn import bench, network
from jaxcnn.ops import block, conv
from jaxcnn.ops.activation import passed
from jaxcnn.ops.pool import max_with_index, route

PRESET, INPUT = "simplenn-cifar", (32, 32, 3)
BLOCK_ELEMENTS = 2048  # pooled entries a program reads of each input (Delta, Z^{m+1}, P_pool): 16 per thread of 4 warps


def results_name() -> str:
    return f"pallas_block-{jax.default_backend()}.md"


def _power_of_two_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing ``n``, at most ``cap``: Triton's blocks have power-of-two sizes."""
    d = 1
    while n % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return d


def _kernel(delta_ref, z_ref, index_ref, full_ref, db_ref, *, ph: int, pw: int):
    masked = jnp.where(z_ref[...] > 0, delta_ref[...], 0)  # Delta (.) I[Z^{m+1}], eq. (24)
    index = index_ref[...].astype(jnp.int32)
    for a in range(ph):  # P_pool: the window entry a, b gets the Delta of the windows whose first maximum it held
        for b in range(pw):
            full_ref[:, a, :, b, :] = jnp.where(index == a * pw + b, masked, 0)
    db_ref[...] = jnp.sum(jnp.sum(masked.astype(db_ref.dtype), axis=0), axis=0, keepdims=True)


def masked_route(delta: jax.Array, z_next: jax.Array, index: jax.Array, pool: tuple[int, int], out_hw, *,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(Delta_S, db) of eq. (24), (26), (14) in one Pallas kernel: ``pool.route(win, index, delta * passed(z_next),
    out_hw)`` and its sum over N, H, W (in at least float32, rounded once to Delta's dtype).

    Args:
      delta, z_next: [N, Hp, Wp, C], the cotangent and the value of the block's pooled output.
      index: [N, Hp, Wp, C] int8, each window's first maximum as a row-major offset (``pool.max_with_index``).
      pool: the non-overlapping window (ph, pw); ph * pw and C powers of two (Triton's block sizes).
      out_hw: the conv output's (Ho, Wo); rows and columns past the last window get zeros.
      interpret: run in Pallas's interpreter (any backend; for checking on a CPU).
    """
    n, hp, wp, c = delta.shape
    ph, pw = pool
    for what, size in (("pool window ph * pw", ph * pw), ("channels C", c)):
        if size & (size - 1):
            raise ValueError(f"masked_route: {what} must be a power of two (Triton's blocks), got {size}")
    rows = n * hp  # [N, Hp, Wp, C] as [N Hp, Wp, C]; Delta_S [N, Hp ph, Wp pw, C] as [N Hp, ph, Wp, pw, C]
    cols = _power_of_two_divisor(wp, max(1, BLOCK_ELEMENTS // c))
    block_rows = _power_of_two_divisor(rows, max(1, BLOCK_ELEMENTS // (c * cols)))
    grid = (rows // block_rows, wp // cols)
    pooled = pl.BlockSpec((block_rows, cols, c), lambda i, j: (i, j, 0))
    full, db = pl.pallas_call(
        partial(_kernel, ph=ph, pw=pw),
        grid=grid,
        in_specs=[pooled, pooled, pooled],
        out_specs=[pl.BlockSpec((block_rows, ph, cols, pw, c), lambda i, j: (i, 0, j, 0, 0)),
                   pl.BlockSpec((None, None, 1, c), lambda i, j: (i, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, ph, wp, pw, c), delta.dtype),
                   jax.ShapeDtypeStruct((*grid, 1, c), jnp.promote_types(delta.dtype, jnp.float32))],
        interpret=interpret,
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=4),
    )(*(a.reshape(rows, wp, c) for a in (delta, z_next, index)))
    full = full.reshape(n, hp * ph, wp * pw, c)
    full = jnp.pad(full, ((0, 0), (0, out_hw[0] - hp * ph), (0, out_hw[1] - wp * pw), (0, 0)))
    return full, db.sum((0, 1, 2)).astype(delta.dtype)


def conv_relu_pool(x, w, b, *, padding, pool=2, interpret=False):
    """``jc.conv_relu_pool(x, w, b, padding=padding, pool=pool, rule="flip")`` whose backward takes Delta_S and db
    from ``masked_route`` (the library's: ``route`` and ``conv._bias_gradient``); stride and dilation 1."""
    x, w, b, window = conv.check("conv_relu_pool", x, w, b, 1, padding, 1)
    return _with_kernel(window, block.pool_geometry("conv_relu_pool", pool), interpret, x, w, b)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _with_kernel(window, pool_window, interpret, x, w, b):
    return block.forward(window, pool_window, False, x, w, b, rule="flip")


def _with_kernel_fwd(window, pool_window, interpret, x, w, b):
    (z_next, index), _ = block._pooled(max_with_index, window, pool_window, False, x, w, b, None, "flip")
    return z_next, (x, w, z_next, index)


def _with_kernel_bwd(window, pool_window, interpret, res, delta):
    x, w, z_next, index = res
    full, db = masked_route(delta, z_next, index, pool_window.size, window.out_hw(x.shape[1:3]),
                            interpret=interpret)
    dx, dw = conv._flip_backward(window, x, w, full)  # eq. (12), (18) by the flip rule
    return dx, dw, db


_with_kernel.defvjp(_with_kernel_fwd, _with_kernel_bwd)


def library_glue(delta, z_next, index, pool, out_hw):
    """The library's eq. (24), (26), (14): ``route`` of the masked Delta, and db as ``conv.backward`` takes it."""
    full = route(block.pool_geometry("glue", pool), index, delta * passed(z_next), out_hw)
    return full, conv._bias_gradient(full)


def blocks(quick: bool) -> list[tuple[tuple, int, int]]:
    """(input shape, features, kernel) of each fused block of simplenn-cifar (3x3, padding 1, 2x2 pooling), or one
    small one."""
    if quick:
        return [((6, 6, 3), 8, 3)]
    net = network.preset(PRESET).fuse()
    shapes = [INPUT, *net.shapes(INPUT)]
    return [(shapes[i], layer.features, layer.kernel) for i, layer in enumerate(net.layers)
            if layer.type == "conv_relu_pool"]


def case(shape, features, kernel, batch, dtype, key):
    """Random x, w, b and the block's pooled output, its P_pool offsets and a cotangent, with ties: x and w in
    halves (and b 0), so that windows hold equal maxima."""
    kx, kw, kd = jax.random.split(key, 3)
    x = (jnp.round(2 * jax.random.normal(kx, (batch, *shape))) / 2).astype(dtype)
    w = (jnp.round(2 * jax.random.normal(kw, (kernel, kernel, shape[2], features))) / 2).astype(dtype)
    b = jnp.zeros(features, dtype)
    x_, w_, b_, window = conv.check("case", x, w, b, 1, kernel // 2, 1)
    (z_next, index), _ = block._pooled(max_with_index, window, block.pool_geometry("case", 2), False, x_, w_, b_,
                                       None, "flip")
    delta = jax.random.normal(kd, z_next.shape).astype(dtype)
    return (x, w, b), (delta, z_next, index, (2, 2), window.out_hw(shape[:2]))


def compared(kernel: int, interpret: bool) -> tuple[tuple, tuple]:
    """(library, kernel): the jitted glue of each, and the block (x, w, b -> Z^{m+1}) whose backward uses it."""
    glue = (jax.jit(library_glue, static_argnums=(3, 4)),
            jax.jit(partial(masked_route, interpret=interpret), static_argnums=(3, 4)))
    blocks = (partial(block.conv_relu_pool, padding=kernel // 2, rule="flip"),
              partial(conv_relu_pool, padding=kernel // 2, interpret=interpret))
    return glue, blocks


def agreement(shape, features, kernel, batch, dtype, interpret) -> tuple[float, float]:
    """The largest relative gap max|kernel - library| / max|library| between kernel and library, over (Delta_S, db)
    and over the block's (dx, dw, db)."""
    (x, w, b), glue = case(shape, features, kernel, batch, dtype, jax.random.key(1))
    glue_fns, blocks = compared(kernel, interpret)
    theirs, ours = (f(*glue) for f in glue_fns)
    delta = glue[0]
    theirs_grads, our_grads = (jax.jit(lambda x, w, b, f=f: jax.vjp(f, x, w, b)[1](delta))(x, w, b) for f in blocks)

    def gap(ours, theirs):
        wide = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
        return max(float(jnp.max(jnp.abs(wide(u) - wide(v))) / jnp.max(jnp.abs(wide(v))))
                   for u, v in zip(ours, theirs))

    return gap(ours, theirs), gap(our_grads, theirs_grads)


def lowers_for_cuda() -> str:
    """Whether the kernel lowers to Triton's IR for a CUDA GPU (built here, without one): "yes", or the error."""
    _, glue = case((8, 8, 3), 32, 3, 4, jnp.float32, jax.random.key(0))
    try:
        text = jax.jit(masked_route, static_argnums=(3, 4)).trace(*glue).lower(
            lowering_platforms=("cuda",)).as_text()
    except Exception as err:  # reported, not fatal: the question this report answers
        return f"no: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return "yes" if "xla.gpu.triton" in text else "no: no Triton call in the lowered module"


def timings(shape, features, kernel, batch, dtype, rounds, interpret=False) -> dict[str, float]:
    """Median ms of the glue (library, kernel) and of the block's backward pass (library, with the kernel);
    ``interpret``: the kernel in Pallas's interpreter (a check that this runs, not a speed)."""
    (x, w, b), glue = case(shape, features, kernel, batch, dtype, jax.random.key(2))
    delta = glue[0]

    def backward(f):
        _, pullback = jax.vjp(f, x, w, b)  # the forward pass's residuals outside the timed function
        return jax.jit(pullback), (delta,)

    (xla_glue, kernel_glue), (xla_block, kernel_block) = compared(kernel, interpret)
    functions = {"glue, XLA": (xla_glue, glue), "glue, kernel": (kernel_glue, glue),
                 "backward, XLA": backward(xla_block), "backward, kernel": backward(kernel_block)}
    return {k: 1e3 * v for k, v in bench.round_robin(functions, rounds).items()}


def glue_bytes(shape, features, batch, dtype, pool=(2, 2)) -> int:
    """Bytes the glue must move at least: the pooled Delta and Z^{m+1} and P_pool's int8 offsets read once,
    Delta_S written once. XLA's form reads Delta_S once more for db (``conv._bias_gradient``); the kernel does not."""
    pooled = batch * (shape[0] // pool[0]) * (shape[1] // pool[1]) * features
    size = jnp.dtype(dtype).itemsize
    return pooled * (2 * size + 1 + pool[0] * pool[1] * size)


def timings_table(quick: bool, batches, dtypes, interpret: bool = False) -> str:
    """Per block, batch and dtype: the four median times, the glue's roofline (``glue_bytes`` at this device's
    ``bench.memory_bandwidth``), and the kernel's ratios to XLA."""
    bandwidth = bench.memory_bandwidth(16 if quick else 256)
    rows = []
    for shape, features, kernel in blocks(quick):
        for batch in batches:
            for dtype in dtypes:
                ms = timings(shape, features, kernel, batch, dtype, 3 if quick else 50, interpret)
                roof = 1e3 * glue_bytes(shape, features, batch, dtype) / (bandwidth * 1e9)
                rows.append([f"{shape[0]}x{shape[1]}x{shape[2]} -> {features}", batch, jnp.dtype(dtype).name,
                             *(f"{ms[k]:.4f}" for k in ms), f"{roof:.4f}",
                             f"{ms['glue, kernel'] / ms['glue, XLA']:.2f}x",
                             f"{ms['backward, kernel'] / ms['backward, XLA']:.2f}x"])
    return f"Memory bandwidth measured: {bandwidth:.0f} GB/s.\n\n" + table(
        ["block", "batch", "dtype", "glue, XLA", "glue, kernel", "backward, XLA", "backward, kernel",
         "glue roofline", "glue kernel / XLA", "backward kernel / XLA"], rows)


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu
    lines = [f"# The fused block's backward glue as a Pallas kernel ({jax.default_backend()})", "",
             f"Machine: {machine()}", "",
             "Delta_S = (Delta (.) I[Z^{m+1}]) P_pool and db = Delta_S 1 (Lin eq. 24, 26, 14) by one Pallas "
             "kernel (`experiments.pallas_block.masked_route`) against the library's XLA ops (`pool.route`, "
             "`conv._bias_gradient`); windows with ties (x and w in halves).", "",
             f"Lowers to Triton for a CUDA GPU: {lowers_for_cuda()}", ""]
    dtypes = (jnp.float32,) if args.quick else (jnp.float32, jnp.bfloat16)
    batches = (2,) if args.quick else ((128, 512) if on_gpu else (4,))
    try:
        rows = [[f"{shape[0]}x{shape[1]}x{shape[2]} -> {features}", batch, jnp.dtype(dtype).name,
                 *(f"{g:.2g}" for g in agreement(shape, features, kernel, batch, dtype, interpret))]
                for shape, features, kernel in blocks(args.quick) for batch in batches[:1] for dtype in dtypes]
    except Exception as err:  # a kernel Triton cannot compile on this GPU: the report says so (on a CPU: a bug)
        if not on_gpu:
            raise
        rows, on_gpu = [], False
        lines += [f"The kernel failed on this GPU: {type(err).__name__}: {str(err)[:2000]}", ""]
    if rows:
        lines += [f"Agreement ({'on the GPU' if on_gpu else 'in Pallas interpret mode'}), the largest "
                  f"max|kernel - library| / max|library| (db's sum goes in another order):", "",
                  table(["block", "batch", "dtype", "Delta_S, db", "dx, dw, db"], rows), ""]
    if on_gpu:
        lines += ["Median ms, round-robin in one process:", "", timings_table(args.quick, batches, dtypes), ""]
    elif rows:
        lines += ["No timings: Pallas compiles for GPUs and TPUs; on a CPU it only interprets.", ""]
    print(write(args.out, results_name(), "\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
