"""Experiment 12: do XLA's compiler flags speed up the hand rules' training step, on a CPU or a GPU?

    python -m experiments.xla_flags   # writes experiments/results/xla_flags.md (xla_flags-gpu.md on a GPU)

XLA_FLAGS is read once per process, so each setting runs in a fresh process timing the trainer's step (the im2col
and flip rules, round-robin after compilation, median of 15 steps). The settings take turns, round after round, so
that the machine's drift falls on all of them alike; the report gives each setting's median and range over the
rounds and its median against the default's. A setting whose range overlaps the default's is no gain.

The settings are the backend's (the default setting's process tells which): on a CPU, XLA's CPU code generation
and libraries; on a GPU, what the performance issue names for the small-batch overhead (command buffers, i.e. CUDA
graphs, for every kind of op or none; the latency-hiding scheduler; Triton's GEMMs; autotuning). A setting this
XLA does not accept is reported as failed, with XLA's reason, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from experiments._common import parser, step_seconds, table, write
from jaxcnn import autotune, bench

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "cpu": {
        "default": "",
        "fast math": "--xla_cpu_enable_fast_math=true",
        "XNNPACK graph fusion (greedy)": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        "oneDNN for dots": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
        "oneDNN for dots and elementwise": ("--xla_cpu_use_onednn=true "
                                            "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
        "XNNPACK off": "--xla_cpu_use_xnnpack=false",
        "concurrency-optimized scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
        "prefer 512-bit vectors": "--xla_cpu_prefer_vector_width=512",
    },
    "gpu": {
        "default": "",
        "command buffers off": "--xla_gpu_enable_command_buffer=",
        "command buffers for every kind of op, from one op": (
            "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
            "--xla_gpu_graph_min_graph_size=1"),
        "latency-hiding scheduler": "--xla_gpu_enable_latency_hiding_scheduler=true",
        "Triton GEMMs off": "--xla_gpu_enable_triton_gemm=false",
        "no autotuning": "--xla_gpu_autotune_level=0",
    },
}
RULES = ("im2col", "flip")


def child(preset: str, batch: int, steps: int) -> dict:
    """Milliseconds of one training step per conv rule, in this process (its XLA_FLAGS), and the backend."""
    from jaxcnn import network, train
    from jaxcnn.cli import input_shape

    configs = {rule: train.TrainConfig(batch_size=batch, rule=rule) for rule in RULES}
    seconds = step_seconds(network.preset(preset), configs, input_shape(preset), steps)
    return {"backend": jax.default_backend(), **{rule: s * 1e3 for rule, s in seconds.items()}}


def run_child(flags: str, preset: str, batch: int, steps: int) -> dict | str:
    """``child``'s result in a fresh process with ``flags`` added to XLA_FLAGS, or why it failed (XLA's last
    line: an unknown flag or value, say)."""
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-m", "experiments.xla_flags", "--child", preset, str(batch), str(steps)],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        return (lines[-1] if lines else f"exit status {done.returncode}")[:300]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    preset, batch, steps = ("digits-cnn", 16, 3) if args.quick else ("simplenn-mnist", 128, 15)
    rounds = 1 if args.quick else args.rounds
    first = run_child("", preset, batch, steps)  # the default setting, and which backend the children get
    if isinstance(first, str):
        raise RuntimeError(f"the training step failed without any flag: {first}")
    if first["backend"] not in SETTINGS:
        raise RuntimeError(f"no XLA settings to try on the {first['backend']} backend (only on {', '.join(SETTINGS)})")
    settings = SETTINGS[first["backend"]]
    settings = dict(list(settings.items())[:1]) if args.quick else settings  # the default alone
    times: dict[str, list] = {name: [] for name in settings}
    failed: dict[str, str] = {}
    for r in range(rounds):
        for name, flags in settings.items():
            if name in failed:
                continue
            result = first if (r, name) == (0, "default") else run_child(flags, preset, batch, steps)
            if isinstance(result, str):
                failed[name] = result
                print(f"round {r + 1}/{rounds}, {name}: failed: {result}", flush=True)
                continue
            times[name].append(result)
            print(f"round {r + 1}/{rounds}, {name}: {result}", flush=True)
    ceiling = bench.matmul_ceiling(256 if args.quick else None)  # after the children: the machine as they found it
    rows = []
    base = {rule: float(np.median([t[rule] for t in times["default"]])) for rule in RULES}
    for name, flags in settings.items():
        if name in failed:
            cells = [f"failed: {failed[name]}", *["-"] * (2 * len(RULES) - 1)]
        else:
            cells = []
            for rule in RULES:
                ms = [t[rule] for t in times[name]]
                cells += [f"{np.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})", f"{np.median(ms) / base[rule]:.2f}x"]
        rows.append([name, f"`{flags}`" if flags else "-", *cells])
    report = "xla_flags.md" if first["backend"] == "cpu" else f"xla_flags-{first['backend']}.md"
    write(args.out, report, "\n\n".join([
        f"# XLA {first['backend'].upper()} flags and the hand rules' training step",
        f"Machine: {autotune.machine_key()}; measured float32 matmul ceiling {ceiling:.0f} GFLOP/s. "
        f"Command: `python -m experiments.xla_flags{' --quick' if args.quick else ''}`. "
        f"{preset}, batch {batch}, float32; each setting in its own process, {rounds} round(s) taking turns; per "
        f"round the median of {steps} steps. Milliseconds: median over the rounds (range), and against the default.",
        table(["setting", "XLA_FLAGS", *[h for rule in RULES for h in (f"{rule} ms", "vs default")]], rows)]) + "\n")


if __name__ == "__main__":
    main()
