"""The performance issue's goals, checked on this machine: is the default step (``rule="auto"``) as fast as the
issue asks, against the best hand variant, PyTorch and the matmul ceiling (CPU), or against XLA autodiff, Flax,
``torch.compile`` and the step's roofline (GPU), and is the fused block's memory within 0.6x of XLA's chain?

    python -m experiments.targets    # writes experiments/results/targets-<backend>.md

On a CPU: simplenn-mnist and simplenn-cifar at batch 128, float32, with every variant of ``jaxcnn bench`` (the
goal names the best of them; about 12 minutes on a 2-core CPU). On a GPU: simplenn-cifar at batch 128 and 512, in
float32 and bfloat16, the default step and the baselines the GPU goals name, nothing else: one short call on a
lent GPU. Every ratio is of medians timed round-robin in one process (``jaxcnn.bench.run``); the goals table
gives the ratio of the minima beside each. The report ends with the default step's profile against XLA autodiff's
(simplenn-cifar in float32; on a GPU at batch 512), by op and by layer: on a GPU, the share of the block's mask,
routing and bias gradient that a fused kernel (the issue's Pallas item: ``experiments.pallas_block``) could take
off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments._common import machine, parser, table, write
from jaxcnn import bench, network
from jaxcnn.cli import input_shape

AUTO = "hand auto: "  # the prefix of the default step's row in bench.run's measurements
TORCH, TORCH_COMPILED = "pytorch channels_last", "pytorch channels_last, compiled"
# block_memory's rows that rule="auto" can pick (the fused block by each candidate of jaxcnn.autotune), and the
# heavy ones among them: those it picks only where they are more than 5% faster than every lighter one
CANDIDATES = ("fused, flip", "fused, im2col, phi stored", "fused, im2col, phi in blocks", "fused, winograd",
              "fused, winograd in blocks")
HEAVY = ("fused, im2col, phi stored", "fused, winograd")


def results_name() -> str:
    return f"targets-{jax.default_backend()}.md"


def cases(quick: bool, backend: str) -> list[tuple[str, int, str, int]]:
    """(preset, batch, dtype, steps) the goals of ``backend`` name."""
    if quick:
        return [("digits-cnn", 8, "float32", 2)]
    if backend == "cpu":
        return [("simplenn-mnist", 128, "float32", 20), ("simplenn-cifar", 128, "float32", 10)]
    return [("simplenn-cifar", batch, dtype, 20) for batch in (128, 512) for dtype in ("float32", "bfloat16")]


def goals(results: list[dict], memory: list[tuple[str, float]], backend: str) -> list[list[str]]:
    """The goals table's rows, [goal, case, measured, target, met], from ``bench.run`` results and
    ``bench.block_memory``'s rows; "met" is "yes", "no", or "-" where a baseline is missing."""
    rows = []
    for result in results:
        case = f"{result['preset']} b{result['batch']} {result['dtype']}"
        by_name = {m.name: m for m in result["measurements"]}
        auto = next(m for m in result["measurements"] if m.name.startswith(AUTO))

        def against(goal: str, other: str, target: float, ours=auto, label="", case=case, by_name=by_name):
            if other not in by_name:
                rows.append([goal, case, f"no {other} row", f"<= {target:.2f}x", "-"])
                return
            ratio, by_min = ours.median_ms / by_name[other].median_ms, ours.min_ms / by_name[other].min_ms
            rows.append([goal, case, f"{ratio:.2f}x ({by_min:.2f}x by minima){label}", f"<= {target:.2f}x",
                         "yes" if ratio <= target else "no"])

        if backend == "cpu":
            hand = [m for m in result["measurements"] if m.name.startswith("hand ")]
            best = min(hand, key=lambda m: m.median_ms)
            against("the default within 5% of the best hand variant", best.name, 1.05,
                    label=f"; best: {best.name}")
            against("the best hand variant <= 1.0x PyTorch channels_last", TORCH, 1.0, ours=best,
                    label=f"; best: {best.name}")
            if result["preset"] == "simplenn-cifar":
                share = result["flops"] / (auto.median_ms / 1e3) / 1e9 / result["ceiling"]
                rows.append(["the default >= 50% of the matmul ceiling", case,
                             f"{share:.0%} of {result['ceiling']:.0f} GFLOP/s", ">= 50%",
                             "yes" if share >= 0.5 else "no"])
        else:
            against("the default <= 0.8x XLA autodiff", "xla autodiff", 0.8)
            against("the default <= 0.8x Flax", "flax", 0.8)
            against("the default <= 0.7x torch.compile channels_last", TORCH_COMPILED, 0.7)
            if result["batch"] == 512:
                roof = bench.roofline_ms(result["flops"], result["bytes"], result["ceiling"], result["bandwidth"])
                rows.append(["the default within 3x of the step's roofline", case,
                             f"{auto.median_ms / roof:.1f}x of {roof:.2f} ms", "<= 3x",
                             "yes" if auto.median_ms <= 3 * roof else "no"])
    xla = dict(memory)["xla autodiff chain"]
    for name, mb in memory:
        if name in CANDIDATES:
            heavy = " (heavy: picked only where > 5% faster than every lighter one, never under a " \
                "--rule-memory-mb below its step's temporaries)" if name in HEAVY else ""
            rows.append(["the fused block's temp memory <= 0.6x XLA's chain", name + heavy,
                         f"{mb / xla:.2f}x ({mb:.1f} / {xla:.1f} MB)", "<= 0.60x", "yes" if mb <= 0.6 * xla else "no"])
    return rows


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    backend = jax.default_backend()
    print(machine(), flush=True)
    results, sections = [], []
    for preset, batch, dtype, steps in cases(args.quick, backend):
        net = network.preset(preset)
        # on a GPU the goals name the default step and the baselines alone: XLA autodiff joins them
        variants = None if backend == "cpu" else {"xla autodiff": bench.jax_variants(net)["xla autodiff"]}
        result = bench.run(preset, input_shape(preset), batch, steps=steps, dtype=jnp.dtype(dtype),
                           torch=not args.quick, progress=lambda line: print(line, flush=True), variants=variants,
                           baselines=True, **(dict(matmul_n=512, bandwidth_mb=16) if args.quick else {}))
        results.append(result)
        sections.append(f"### {preset}, batch {batch}, {dtype}\n\n{bench.yardsticks_line(result)}; median of "
                        f"{steps} steps per variant, timed round-robin.\n\n{bench.table(result)}\n")
        print(sections[-1], flush=True)
    memory = bench.block_memory(batch=16 if args.quick else 128)
    rows = goals(results, memory, backend)
    # where the default step's time goes, against XLA autodiff's: on a GPU, how much a kernel fusing the block's
    # mask, routing and bias gradient (the Pallas item: experiments.pallas_block) could take off
    preset, batch = next((p, b) for p, b, d, _ in reversed(cases(args.quick, backend)) if d == "float32")
    by_op, by_layer = bench.profile_auto(preset, input_shape(preset), batch)
    met = sum(row[-1] == "yes" for row in rows)
    text = f"""# The performance issue's goals on this machine

Measured by `python -m experiments.targets` on {machine()}.
{met} of {len(rows)} goals met ("-": a baseline that could not run here).

{table(["goal", "case", "measured", "target", "met"], rows)}

The fused block's memory: the gradient of one conv 3x3 + ReLU + 2x2 max-pool layer (simplenn-mnist's second,
14x14x32 -> 64), each rule `rule="auto"` can pick, against XLA's autodiff chain (`bench.block_memory`).

{chr(10).join(sections)}
### Where the step's time goes: {preset}, batch {batch}, float32

XLA's op times per step (`jax.profiler`, 5 steps; `jaxcnn bench --profile`), by the JAX operation each op comes
from and by layer. Ops that run concurrently overlap.

{by_op}

{by_layer}
"""
    print(table(["goal", "case", "measured", "target", "met"], rows), flush=True)
    print(f"wrote {write(args.out, results_name(), text)}")


if __name__ == "__main__":
    from jaxcnn import _malloc

    _malloc.reexec_under_tcmalloc()  # as `jaxcnn bench` does: the allocator every CPU figure assumes
    main()
