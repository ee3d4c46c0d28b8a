"""Experiment 8: what does one Gauss-Newton product G v cost, against one gradient and against autodiff's?

    python -m experiments.gauss_newton_cost     # writes experiments/results/gauss_newton_cost.md

On simplenn-mnist (28x28x1, squared loss, float32), side by side in one process, timed round-robin after
compilation: one hand gradient of the objective on a batch; one G v on the same batch by the hand rules
(``jaxcnn.second_order``: tangent rules, then hand VJPs); and J^T B J v by ``jax.jvp`` then ``jax.vjp`` through
two networks: the XLA network a JAX user writes (``lax.conv_general_dilated``, ``lax.reduce_window``: the
baseline of BENCHMARKS.md), and this library's own forward pass (``grad="autodiff"``; on CPU its convolutions are
phi(pad(Z)) products, so JAX's transposes run the hand rules' very products). Then each as conjugate gradient uses
them, the forward pass at the current parameters done once (``second_order.forward``; ``jax.linearize``). Then
the compiled temporary memory of G v over a subsample of 512 examples, and of a whole Newton iteration on 6,000
examples, against the segment size (``batch_size``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from experiments._common import machine, parser, table, write
from jaxcnn import bench, network, newton, objective, second_order, train

HAND_GRADIENT = "hand gradient"
HAND, HAND_STORED = "G v, hand rules", "G v, hand rules, forward stored"
AUTODIFF, AUTODIFF_LINEARIZED = "G v, jvp + vjp, our forward (autodiff)", "G v, our forward, jax.linearize once"
XLA, XLA_LINEARIZED = "G v, jvp + vjp, XLA network", "G v, XLA network, jax.linearize once"


def temp_bytes(f, *args) -> int | None:
    """Compiled temporary bytes of ``f(*args)`` (None where the backend does not say)."""
    try:
        return int(jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except (NotImplementedError, AttributeError):
        return None


def iteration_memory(net, shape, examples: int, sizes, C: float) -> list[list]:
    """Rows [segment, objective + gradient MiB, CG (forward stored) MiB, CG (forward recomputed) MiB] of compiled
    temporary memory for a Newton iteration over ``examples`` random images, S_k = 5% of them (not zeros: XLA
    would fold the forward pass of a constant zero input at compile time)."""
    keys = jax.random.split(jax.random.key(3))
    x = jax.random.normal(keys[0], (examples, *shape), jnp.float32)
    y = jax.random.randint(keys[1], (examples,), 0, 10)
    params = net.init(jax.random.key(0), shape)
    theta = ravel_pytree(params)[0]
    x_sub = x[:max(1, -(-examples // 20))]
    rows = []
    for size in sizes:
        cfg = train.TrainConfig(batch_size=size, loss="squared")
        row = [size]
        for store in (True, False):
            value_grad, _, cg, _ = newton.make_functions(net, cfg, x, y, C, store=store)(params)
            if store:
                row.append(temp_bytes(value_grad, theta))
            row.append(temp_bytes(cg, theta, theta, jnp.float32(1.0), x_sub))
        rows.append([size, *("-" if b is None else f"{b / 2**20:.1f}" for b in row[1:])])
    return rows


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    # --quick: digits-cnn (two conv layers where simplenn-mnist has three): the same code, a third fewer ops to compile
    preset = "digits-cnn" if args.quick else "simplenn-mnist"
    shape, batch, C = ((8, 8, 1), 16, 1.0) if args.quick else ((28, 28, 1), 128, 600.0)
    net = network.preset(preset)
    params = net.init(jax.random.key(0), shape)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (batch, *shape), jnp.float32)
    labels = jax.random.randint(keys[1], (batch,), 0, 10)
    v = jax.tree_util.tree_map(lambda p: jax.random.normal(keys[2], p.shape, p.dtype), params)

    def gradient(params, x):
        return jax.grad(lambda p: objective.objective(p, net, x, labels, loss="squared", C=C)[0])(params)

    def gv_hand(params, x):
        return second_order.gauss_newton_product(net, params, x, v, loss="squared", C=C)

    def jvp_vjp(apply):
        """J^T B J v by jax.jvp then jax.vjp of ``apply(params, x)``, plus the regulariser."""
        def gv(params, x):
            f = lambda p: apply(p, x)
            z, jv = jax.jvp(f, (params,), (v,))
            _, pullback = jax.vjp(f, params)
            (jtbjv,) = pullback(second_order.GN["squared"](z, jv))
            return jax.tree_util.tree_map(lambda t, vi: vi / C + t / x.shape[0], jtbjv, v)
        return gv

    ours = lambda p, x: net.apply(p, x, grad="autodiff")
    xla = lambda p, x: bench.xla_apply(net, p, x)

    # As conjugate gradient uses them: the forward pass at the current parameters done once, outside the timing.
    stored = jax.jit(lambda params, x: second_order.forward(net, params, x))(params, x)

    def gv_hand_stored(params, stored):
        return second_order.gauss_newton_product(net, params, stored, v, loss="squared", C=C)

    def linearized(apply):
        """J^T B J v by the jvp of one ``jax.linearize`` and its ``jax.linear_transpose``: (f, its args). The
        linearization's residuals are passed as arguments, as conjugate gradient would hold them: closed over,
        they would be constants that XLA folds at compile time."""
        z, f_jvp = jax.linearize(jax.jit(lambda p: apply(p, x)), params)
        closed = jax.make_jaxpr(f_jvp)(v)

        def gv(z, v, residuals):
            def jv(v):
                return jax.core.eval_jaxpr(closed.jaxpr, residuals, *jax.tree_util.tree_leaves(v))[0]

            (jtbjv,) = jax.linear_transpose(jv, v)(second_order.GN["squared"](z, jv(v)))
            return jax.tree_util.tree_map(lambda t, vi: vi / C + t / x.shape[0], jtbjv, v)
        return jax.jit(gv), (z, v, closed.consts)

    functions = {HAND_GRADIENT: (jax.jit(gradient), (params, x)),
                 HAND: (jax.jit(gv_hand), (params, x)),
                 AUTODIFF: (jax.jit(jvp_vjp(ours)), (params, x)),
                 XLA: (jax.jit(jvp_vjp(xla)), (params, x)),
                 HAND_STORED: (jax.jit(gv_hand_stored), (params, stored)),
                 AUTODIFF_LINEARIZED: linearized(ours),
                 XLA_LINEARIZED: linearized(xla)}
    results = [ravel_pytree(f(*a))[0] for f, a in list(functions.values())[1:]]
    agree = max(float(jnp.max(jnp.abs(results[0] - r)) / jnp.max(jnp.abs(r))) for r in results[1:])
    seconds = bench.round_robin(functions, 3 if args.quick else 15)
    base = seconds[HAND_GRADIENT]
    rows = [[name, f"{s * 1e3:.1f}", f"{s / base:.2f}x"] for name, s in seconds.items()]

    subsample = jax.random.normal(keys[0], (64 if args.quick else 512, *shape), jnp.float32)
    memory = []
    for size in ((16,) if args.quick else (32, 64, 128, 256, 512)):
        f = lambda params, x, size=size: second_order.gauss_newton_product(net, params, x, v, loss="squared", C=C,
                                                                            batch_size=size)
        temp = temp_bytes(f, params, subsample)
        memory.append([size, "-" if temp is None else f"{temp / 2**20:.1f}"])

    examples, sizes = (64, (16,)) if args.quick else (6000, (32, 64, 128, 256))
    iteration = iteration_memory(net, shape, examples, sizes, C)

    ceiling = bench.matmul_ceiling(256 if args.quick else None)
    report = "\n\n".join([
        "# The cost of one Gauss-Newton product",
        f"Machine: {machine()}; measured float32 matmul ceiling {ceiling:.0f} GFLOP/s. Command: "
        f"`python -m experiments.gauss_newton_cost`{' --quick' if args.quick else ''}.",
        f"{preset}, input {'x'.join(map(str, shape))}, batch {batch}, float32, squared loss; median of "
        "round-robin calls after compilation. The six G v agree to "
        f"{agree:.1e} (max |difference| / max |value|).",
        table(["step", "ms", "vs hand gradient"], rows),
        f"G v by the hand rules takes {seconds[HAND] / base:.2f}x one hand gradient (goal <= 2.0x); "
        f"{seconds[HAND] / seconds[XLA]:.2f}x jvp + vjp through the XLA network, what a JAX user writes (goal <= "
        f"0.8x); {seconds[HAND] / seconds[AUTODIFF]:.2f}x jvp + vjp through this library's forward pass "
        "(`grad=\"autodiff\"`: the same phi(pad(Z)) products as the hand rules, which JAX's transposes of them "
        "reproduce). With the forward pass stored, as conjugate gradient (and simpleNN) uses it: "
        f"{seconds[HAND_STORED] / seconds[XLA_LINEARIZED]:.2f}x the XLA network linearized once, "
        f"{seconds[HAND_STORED] / seconds[AUTODIFF_LINEARIZED]:.2f}x this library's forward pass linearized once "
        "(`jax.linearize` keeps every residual, phi(pad(Z)) included; the stored forward pass keeps the layer "
        "outputs and rebuilds phi(pad(Z)) in each product).",
        f"Compiled temporary memory of G v over {subsample.shape[0]} examples, by segment size:",
        table(["segment (batch_size)", "temp MiB"], memory),
        f"Compiled temporary memory of one Newton iteration's two programs (`jaxcnn.newton.make_functions`) on "
        f"{examples} training examples, S_k = 5% of them ({max(1, -(-examples // 20))}), by segment size: the "
        "objective and gradient over the training set, and conjugate gradient on S_k with S_k's forward pass "
        "stored (simpleNN's way, the default up to `newton.STORE_LIMIT`) or recomputed in every product. The "
        "iteration's peak is the larger of the two programs:",
        table(["segment (batch_size)", "objective + gradient MiB", "CG, forward stored MiB",
               "CG, forward recomputed MiB"], iteration),
    ])
    print(report)
    write(args.out, "gauss_newton_cost.md", report + "\n")


if __name__ == "__main__":
    main()
