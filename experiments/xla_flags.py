"""Experiment 12: do XLA's CPU compiler flags speed up the hand rules' training step?

    python -m experiments.xla_flags   # writes experiments/results/xla_flags.md

XLA_FLAGS is read once per process, so each setting runs in a fresh process timing the trainer's step (the im2col
and flip rules, round-robin after compilation, median of 15 steps). The settings take turns, round after round, so
that the machine's drift falls on all of them alike; the report gives each setting's median and range over the
rounds and its median against the default's. A setting whose range overlaps the default's is no gain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from experiments._common import parser, step_seconds, table, write
from jaxcnn import autotune, bench

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "default": "",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "XNNPACK graph fusion (greedy)": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "oneDNN for dots": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "oneDNN for dots and elementwise": ("--xla_cpu_use_onednn=true "
                                        "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
    "XNNPACK off": "--xla_cpu_use_xnnpack=false",
    "concurrency-optimized scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "prefer 512-bit vectors": "--xla_cpu_prefer_vector_width=512",
}


def child(preset: str, batch: int, steps: int) -> dict[str, float]:
    """Milliseconds of one training step per conv rule, in this process (its XLA_FLAGS)."""
    from jaxcnn import network, train
    from jaxcnn.cli import input_shape

    configs = {rule: train.TrainConfig(batch_size=batch, rule=rule) for rule in ("im2col", "flip")}
    seconds = step_seconds(network.preset(preset), configs, input_shape(preset), steps)
    return {rule: s * 1e3 for rule, s in seconds.items()}


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    preset, batch, steps = ("digits-cnn", 16, 3) if args.quick else ("simplenn-mnist", 128, 15)
    settings = dict(list(SETTINGS.items())[:2]) if args.quick else SETTINGS
    rounds = 1 if args.quick else args.rounds
    times = {name: [] for name in settings}
    for r in range(rounds):
        for name, flags in settings.items():
            env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
                   "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
            done = subprocess.run([sys.executable, "-m", "experiments.xla_flags", "--child", preset, str(batch),
                                   str(steps)], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{name} ({flags}) failed:\n{done.stderr[-2000:]}")
            times[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds}, {name}: {times[name][-1]}", flush=True)
    ceiling = bench.matmul_ceiling(256 if args.quick else None)  # after the children: the machine as they found it
    rows = []
    base = {rule: float(np.median([t[rule] for t in times["default"]])) for rule in ("im2col", "flip")}
    for name, flags in settings.items():
        cells = []
        for rule in ("im2col", "flip"):
            ms = [t[rule] for t in times[name]]
            cells += [f"{np.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})", f"{np.median(ms) / base[rule]:.2f}x"]
        rows.append([name, f"`{flags}`" if flags else "-", *cells])
    write(args.out, "xla_flags.md", "\n\n".join([
        "# XLA CPU flags and the hand rules' training step",
        f"Machine: {autotune.machine_key()}; measured float32 matmul ceiling {ceiling:.0f} GFLOP/s. "
        f"Command: `python -m experiments.xla_flags{' --quick' if args.quick else ''}`. "
        f"{preset}, batch {batch}, float32; each setting in its own process, {rounds} round(s) taking turns; per "
        f"round the median of {steps} steps. Milliseconds: median over the rounds (range), and against the default.",
        table(["setting", "XLA_FLAGS", "im2col ms", "vs default", "flip ms", "vs default"], rows)]) + "\n")


if __name__ == "__main__":
    main()
