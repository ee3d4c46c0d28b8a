"""Throughput of data-parallel training against the number of devices.

    python -m experiments.scaling                 # CPU: 8 devices forced on the host; a GPU machine: its GPUs

Times the jitted training step (hand rules) of a preset at a fixed global batch on 1, 2, 4, ... devices (a
mesh over the first n), and writes experiments/results/scaling.md. On a CPU the devices are forced with
--xla_force_host_platform_device_count and share the same cores.
"""

from __future__ import annotations

import os
import sys

# Run as a program: 8 host devices, set before jax starts. Imported (as the tests do), the process's
# environment is left alone: its subprocesses would inherit the 8 devices.
if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

import time

import jax
import numpy as np

import jaxcnn as jc
from experiments._common import machine, parser, table, write
from jaxcnn import parallel, train
from jaxcnn.cli import input_shape


def step_times(preset: str, batch: int, devices: int, steps: int) -> tuple[float, float]:
    """(compile seconds, median step seconds) of the training step on ``devices`` devices."""
    net = jc.preset(preset)
    shape = input_shape(preset)
    cfg = train.TrainConfig(batch_size=batch)
    mesh = parallel.make_mesh(devices)
    tx = train.make_optimizer(cfg, 100)
    params = net.init(jax.random.key(0), shape)
    state = parallel.replicate(mesh, (params, tx.init(params), net.init_state(shape), train._guard(net, params)))
    rng = np.random.default_rng(0)
    x = rng.random((batch, *shape), np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    xb, yb = parallel.global_batch(mesh, np.arange(batch), x, y)
    step = train.make_step(net, tx, cfg, mesh)
    start = time.perf_counter()
    state = step(*state, xb, yb)[:4]
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = step(*state, xb, yb)[:4]
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="simplenn-mnist")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    counts = [n for n in (1, 2, 4, 8, 16) if n <= jax.local_device_count()][: 2 if args.quick else None]
    steps = 3 if args.quick else 20
    rows, base = [], None
    for n in counts:
        compile_s, step_s = step_times(args.preset, args.batch, n, steps)
        base = base or step_s
        rows.append([n, args.batch // n, f"{step_s * 1e3:.1f}", f"{args.batch / step_s:,.0f}", f"{base / step_s:.2f}x",
                     f"{compile_s:.1f}"])
        print(rows[-1], flush=True)
    kind = jax.devices()[0].platform
    best = max(range(len(rows)), key=lambda i: float(rows[i][4][:-1]))
    note = (f"The devices are forced on one host CPU ({os.cpu_count()} cores) and share its cores, so any speed-up "
            f"(here {rows[best][4]} at {rows[best][0]} devices) comes from running the shares concurrently where one "
            "device's step leaves cores idle, not from more hardware; the collectives and smaller matrix products "
            "are its price." if kind == "cpu" else "")
    text = f"""# Data-parallel throughput vs device count

`python -m experiments.scaling --preset {args.preset} --batch {args.batch}` on {machine()};
{jax.local_device_count()} {kind} device(s) visible.

The jitted training step (hand rules, Adam, float32) of `{args.preset}` at a global batch of {args.batch}, split
over a mesh of the first n devices; median of {steps} steps after compilation.

{table(["devices", "per-device batch", "ms / step", "images / s", "speed-up", "compile s"], rows)}

{note}
"""
    print(write(args.out, "scaling.md", text))


if __name__ == "__main__":
    sys.exit(main())
