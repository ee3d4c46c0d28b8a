"""The benchmark of BENCHMARKS.md: one training step, hand rules vs autodiff vs XLA vs Flax vs PyTorch.

    python -m experiments.benchmark    # rewrites this backend's marked section of BENCHMARKS.md and its results file

Runs ``jaxcnn.bench`` for simplenn-mnist and simplenn-cifar at batch 128 in float32 (and, on an accelerator,
batch 512, bfloat16 and vgg-small), plus the compiled memory of one fused block against XLA's autodiff chain.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments._common import machine, parser, write
from jaxcnn import bench, network
from jaxcnn._io import atomic_write
from jaxcnn.cli import input_shape

ROOT = Path(__file__).resolve().parents[1]


def _tag() -> str:
    """"benchmark" on a CPU, "benchmark-gpu" (etc.) on an accelerator: each backend has its own results file and
    section of BENCHMARKS.md, so that a GPU run leaves the CPU results in place."""
    backend = jax.default_backend()
    return "benchmark" if backend == "cpu" else f"benchmark-{backend}"


def results_name() -> str:
    """The results file under --out."""
    return f"{_tag()}.md"


def markers() -> tuple[str, str]:
    """The marks around this backend's section of BENCHMARKS.md."""
    return f"<!-- {_tag()}:start -->", f"<!-- {_tag()}:end -->"


def cases(quick: bool) -> list[tuple[str, int, str]]:
    if quick:
        return [("digits-cnn", 8, "float32")]
    runs = [("simplenn-mnist", 128, "float32"), ("simplenn-cifar", 128, "float32")]
    if jax.default_backend() != "cpu":
        runs += [(p, b, d) for p in ("simplenn-mnist", "simplenn-cifar", "vgg-small") for b in (128, 512)
                 for d in ("float32", "bfloat16") if (p, b, d) not in runs]
    return runs


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md",
                   help="file whose marked section is rewritten (skipped with --quick)")
    args = p.parse_args(argv)
    steps = 2 if args.quick else args.steps
    print(machine(), flush=True)
    sections = []
    for preset, batch, dtype in cases(args.quick):
        # --quick checks this script's report: two variants (tests/test_bench.py times all of them)
        variants = {name: loss for name, loss in bench.jax_variants(network.preset(preset)).items()
                    if name in ("hand im2col", "xla autodiff")} if args.quick else None
        result = bench.run(preset, input_shape(preset), batch, steps=steps, dtype=jnp.dtype(dtype),
                           torch=not args.quick, progress=lambda line: print(line, flush=True), variants=variants,
                           **(dict(matmul_n=512, bandwidth_mb=16) if args.quick else {}))
        sections.append(f"### {preset}, batch {batch}, {dtype}\n\n{bench.yardsticks_line(result)}; median of "
                        f"{steps} steps per variant, timed round-robin.\n\n{bench.table(result)}\n")
        print(sections[-1], flush=True)
    first = cases(args.quick)[0]
    # The hand variant BENCHMARKS.md's analysis reads: the step rule="auto" chose (--quick: hand im2col, untuned)
    profile = bench.profile_tables if args.quick else bench.profile_auto
    profiled, by_layer = profile(first[0], input_shape(first[0]), first[1])
    pool_batch = 8 if args.quick else 128
    pools = bench.pool_times(batch=pool_batch)
    pool_rows = "\n".join(f"| {'x'.join(map(str, shape))} | {xla:.2f} | {hand:.2f} | {auto:.2f} | {xla / hand:.1f}x |"
                          for shape, xla, hand, auto in pools)
    total = [sum(row[i] for row in pools) for i in (1, 2, 3)]
    memory = bench.block_memory(batch=16 if args.quick else 128)
    xla = dict(memory)["xla autodiff chain"]
    memory_rows = "\n".join(f"| {name} | {mb:.1f} | {mb / xla:.2f}x |" for name, mb in memory)
    text = f"""Measured by `python -m experiments.benchmark` on {machine()}.
Each table's matmul ceiling (an n x n product of random numbers) and memory bandwidth (an in-place `x + 1`) are
timed in the same rounds as its steps.

{chr(10).join(sections)}
### Where the step's time goes

{first[0]}, batch {first[1]}: XLA's op times per step from `jax.profiler` (5 steps), grouped by the JAX operation
each op comes from (`forward`/`backward` and the primitive; `xla ...`: ops XLA added that carry no JAX origin, on
the CPU the argmax decomposition of `reduce_window` max's gradient). Ops that run concurrently overlap, so "all ops"
can exceed the step time. `jaxcnn bench --profile` prints the same, and by layer:

{profiled}

{by_layer}

### Max pooling alone

The gradient of 2x2 max pooling (forward and backward, jitted, median of 20) at simplenn-mnist's three pooling
inputs, batch {pool_batch}, in ms: XLA's `reduce_window` differentiated by JAX (`select_and_scatter`, which XLA's CPU
backend decomposes into an argmax over iota arrays), `max_pool2d`'s hand rule (Delta^T P_pool over tiles), and JAX
differentiating `max_pool2d`'s forward.

| input | xla autodiff | hand | autodiff of ours | xla / hand |
|---|---|---|---|---|
{pool_rows}
| all three | {total[0]:.2f} | {total[1]:.2f} | {total[2]:.2f} | {total[0] / total[1]:.1f}x |

### One fused block's compiled memory

The gradient of one conv 3x3 + ReLU + 2x2 max-pool layer (simplenn-mnist's second: batch 128, 14x14x32 -> 64),
`jit(grad(...)).lower(...).compile().memory_analysis().temp_size_in_bytes`:

| variant | temp MB | vs XLA's autodiff chain |
|---|---|---|
{memory_rows}
"""
    write(args.out, results_name(), f"# Benchmark\n\n{text}")
    if not args.quick:
        page = args.benchmarks_md.read_text()
        start, end = markers()
        if start not in page or end not in page:
            raise SystemExit(f"{args.benchmarks_md} has no {start} ... {end} section to rewrite")
        page = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda m: f"{start}\n{text}\n{end}", page,
                      flags=re.S)
        atomic_write(args.benchmarks_md, page)
        print(f"rewrote the benchmark section of {args.benchmarks_md}")


if __name__ == "__main__":
    from jaxcnn import _malloc

    _malloc.reexec_under_tcmalloc()  # as `jaxcnn bench` does: the allocator every CPU figure assumes
    main()
