"""Shared by the experiment scripts: where results go, the machine they ran on, atomic writes, tables, the
training step's time."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import jax

from jaxcnn._io import atomic_path, atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default experiments/results)")
    p.add_argument("--quick", action="store_true", help="a small version, to check the script runs")
    return p


def machine() -> str:
    """One line describing this machine: CPU model, vector extensions and cores, the allocator, device, JAX."""
    from jaxcnn import _malloc, autotune

    model, isa = autotune.cpu()
    device = jax.devices()[0]
    return (f"{model} [{isa or 'no listed vector extensions'}], {os.cpu_count()} cores, {_malloc.allocator()}; JAX "
            f"{jax.__version__} on {device.platform} ({device.device_kind}); Python {platform.python_version()}")


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write(out: Path, name: str, text: str) -> Path:
    atomic_write(out / name, text)
    return out / name


def save_figure(fig, out: Path, name: str) -> Path:
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out / name


def step_seconds(net, configs: dict, shape, rounds: int) -> dict[str, float]:
    """Median seconds of one training step (``train.make_step``) per named ``TrainConfig`` (all of one batch
    size), timed round-robin on one random batch. The step donates its state, so each call gets a copy (the same
    small cost for every variant)."""
    import numpy as np

    from jaxcnn import bench, parallel, train

    batch = {c.batch_size for c in configs.values()}.pop()
    mesh = parallel.make_mesh(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    xb, yb = parallel.global_batch(mesh, np.arange(batch), x, y)
    copy = lambda tree: jax.tree_util.tree_map(lambda a: a.copy(), tree)
    functions = {}
    for name, cfg in configs.items():
        tx = train.make_optimizer(cfg, 100)
        params = net.init(jax.random.key(0), shape)
        state = parallel.replicate(mesh, (params, tx.init(params), net.init_state(shape), train._guard(net, params)))
        step = train.make_step(net, tx, cfg, mesh)
        functions[name] = (lambda s, x, y, step=step: step(*copy(s), x, y), (state, xb, yb))
    return bench.round_robin(functions, rounds)
