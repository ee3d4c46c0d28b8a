"""Experiment 3: Lin's complexity section, measured: where does a conv layer's time go?

    python -m experiments.conv_complexity     # writes experiments/results/conv_complexity.{md,png}

Times each stage of one conv + ReLU + 2x2 max-pool layer (forward and hand backward, im2col rule) on its own,
jitted, and sets it against the notes' operation count (Lin, "Computational Complexity"). Checks the claim
"matrix-matrix products are the bottleneck", and what storing phi(pad(Z)) instead of recomputing it trades.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments._common import machine, parser, save_figure, table, write
from jaxcnn.bench import matmul_ceiling, median_seconds
from jaxcnn.ops import conv, pool
from jaxcnn.ops._windows import Window, unpatches
from jaxcnn.ops.activation import relu_forward

# (name, batch I, input a x b x d, kernel h, output channels d_next, padding): layers of simplenn-mnist and -cifar.
LAYERS = [
    ("simplenn-mnist conv1", 128, (28, 28, 1), 5, 32, 2),
    ("simplenn-mnist conv2", 128, (14, 14, 32), 3, 64, 1),
    ("simplenn-cifar conv2", 128, (32, 32, 32), 3, 32, 1),
]


def bench(fn, *args, repeats: int = 15) -> float:
    """Median seconds of a jitted call (compilation and one warm-up excluded)."""
    return median_seconds(jax.jit(fn), *args, repeats=repeats)


def stages(batch, shape, h, d_next, padding, repeats):
    """[(stage, kind, predicted count, seconds)] for one layer (counts follow Lin's O(.) terms exactly), and the
    bytes of phi(pad(Z))."""
    a, b, d = shape
    window = Window((h, h), (1, 1), (1, 1), ((padding, padding), (padding, padding)))
    pool_win = Window((2, 2), (2, 2), (1, 1), ((0, 0), (0, 0)))
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(batch, a, b, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, h, d, d_next)), jnp.float32)
    w2 = w.reshape(-1, d_next)
    ac, bc = window.out_hw((a, b))
    patch = h * h * d
    phi = conv.phi(window, z)
    s = phi @ w2
    act = relu_forward(s)
    z_next, index = pool.max_with_index(pool_win, act)
    delta_next = jnp.asarray(rng.normal(size=z_next.shape), jnp.float32)
    delta = jnp.asarray(rng.normal(size=s.shape), jnp.float32)
    dphi = delta @ w2.T
    conv_out, matmul = batch * ac * bc * d_next, 2 * batch * d_next * patch * ac * bc
    return phi.nbytes, [
        ("phi(pad(Z))", "copy", batch * patch * ac * bc, bench(lambda z: conv.phi(window, z), z, repeats=repeats)),
        ("W phi(pad(Z))", "matmul", matmul, bench(lambda p, w: p @ w, phi, w2, repeats=repeats)),
        ("ReLU", "elementwise", conv_out, bench(relu_forward, s, repeats=repeats)),
        ("max pool + P_pool", "compare", conv_out, bench(lambda x: pool.max_with_index(pool_win, x), act,
                                                          repeats=repeats)),
        ("Delta P_pool, (.) I[Z]", "elementwise", conv_out,
         bench(lambda i, dn, zn: pool.route(pool_win, i, dn * (zn > 0), (ac, bc)), index, delta_next, z_next,
               repeats=repeats)),
        ("dW = Delta phi^T", "matmul", matmul,
         bench(lambda p, dl: p.reshape(-1, patch).T @ dl.reshape(-1, d_next), phi, delta, repeats=repeats)),
        ("W^T Delta", "matmul", matmul, bench(lambda dl, w: dl @ w.T, delta, w2, repeats=repeats)),
        ("vec(.) P_phi P_pad (col2im)", "add", batch * patch * ac * bc,
         bench(lambda dp: unpatches(dp.reshape(*dp.shape[:3], h, h, d), window, (a, b)), dphi,
               repeats=repeats)),
    ]


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [(name, 8, *rest) for name, _, *rest in LAYERS[1:2]] if args.quick else LAYERS
    repeats = 3 if args.quick else 15
    ceiling_n = 512 if args.quick else 2048
    ceiling = matmul_ceiling(ceiling_n)
    sections, summary = [], []
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 4.5), squeeze=False)
    for (name, batch, shape, h, d_next, padding), ax in zip(layers, axes[0]):
        phi_bytes, rows = stages(batch, shape, h, d_next, padding, repeats)
        total = sum(t for *_, t in rows)
        matmul_share = sum(t for _, kind, _, t in rows if kind == "matmul") / total
        table_rows = [[stage, kind, f"{count / 1e6:.1f} M", f"{t * 1e3:.2f}", f"{t / total:.0%}",
                       f"{count / t / 1e9:.1f}" + (f" ({count / t / 1e9 / ceiling:.0%} of ceiling)"
                                                   if kind == "matmul" else "")]
                      for stage, kind, count, t in rows]
        phi_time = rows[0][3]
        z_bytes = batch * np.prod(shape) * 4
        geometry = f"batch {batch}, Z {'x'.join(map(str, shape))}, {h}x{h} kernel, {d_next} filters, pad {padding}"
        sections.append(f"""## {name}: {geometry}

{table(["stage", "kind", "operations", "ms", "share", "Gop/s"], table_rows)}

Matrix-matrix products: {matmul_share:.0%} of the layer's time{' (the bottleneck)' if matmul_share > 0.5 else
                                                             ' (not the bottleneck here)'}. phi(pad(Z)) is
{phi_bytes / 2**20:.1f} MiB against {z_bytes / 2**20:.2f} MiB for Z ({phi_bytes / z_bytes:.0f}x): storing it
instead of recomputing it in the backward pass would save {phi_time * 1e3:.2f} ms of {total * 1e3:.2f} ms
({phi_time / total:.0%}) per step for that memory.
""")
        summary.append([name, f"{total * 1e3:.1f}", f"{matmul_share:.0%}", f"{phi_time / total:.0%}",
                        f"{phi_bytes / z_bytes:.0f}x"])
        ax.barh([r[0] for r in rows][::-1], [r[3] * 1e3 for r in rows][::-1],
                color=["tab:red" if r[1] == "matmul" else "tab:blue" for r in rows][::-1])
        ax.set(title=f"{name} (batch {batch})", xlabel="ms (matmuls in red)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, args.out, "conv_complexity.png")
    text = f"""# Where a conv layer's time goes (Lin, "Computational Complexity")

`python -m experiments.conv_complexity` on {machine()}; float32, each stage jitted alone, median of {repeats}
runs. Matmul ceiling measured on this machine: {ceiling:.0f} GFLOP/s (a {ceiling_n} x {ceiling_n} float32
product).

Lin counts, per batch of I images, h h d a_conv b_conv operations for phi(pad(Z)) and for its transpose
(col2im), I d_next h h d a_conv b_conv multiply-adds for each of the three matrix products (W phi, Delta phi^T,
W^T Delta: 2x that in FLOPs here), and I d_next a_conv b_conv for ReLU and pooling. "Operations" below are those
counts; Gop/s divides them by the measured time.

{table(["layer", "ms (all stages)", "matmul share", "phi share", "phi / Z memory"], summary)}

![stages](conv_complexity.png)

{chr(10).join(sections)}
The notes predict that the three products dominate (their count is d_next times larger than phi's). Where the
layer has few input channels (conv1: d = 1, patches of 25 entries) the products are small and the copies that
build and fold phi(pad(Z)) cost as much or more; with 32 input channels the products take the larger share.
"""
    print(write(args.out, "conv_complexity.md", text))


if __name__ == "__main__":
    main()
