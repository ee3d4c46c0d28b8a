"""Experiment 10: mixed precision (--precision bf16) against float32: the training step's speed, and MNIST accuracy.

    python -m experiments.mixed_precision --data-dir ../shared/data   # writes experiments/results/mixed_precision.md

Times one jitted training step of simplenn-mnist (the trainer's own ``make_step``: hand and autodiff gradients,
each in float32 and in bf16 mixed precision), side by side in one process, round-robin after compilation. Then,
given ``--data-dir`` holding mnist/, trains the preset's recipe on the real MNIST for 2 epochs in each precision
from the same seed, with hand gradients, and reports test accuracy, time per epoch and the per-step objective.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments import _common
from experiments._common import machine, parser, save_figure, table, write
from jaxcnn import bench, data, network, train

PRECISIONS = ("fp32", "bf16")


def step_seconds(net, cfg: train.TrainConfig, shape, rounds: int, grads=("hand", "autodiff")) -> dict[str, float]:
    """Median seconds of one training step per "grad, precision", timed round-robin."""
    configs = {f"{grad}, {precision}": dataclasses.replace(cfg, grad=grad, precision=precision)
               for grad in grads for precision in PRECISIONS}
    return _common.step_seconds(net, configs, shape, rounds)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (no training run without it)")
    args = p.parse_args(argv)
    shape = (12, 12, 1) if args.quick else (28, 28, 1)
    net = network.preset("simplenn-mnist")
    cfg = train.TrainConfig(dataset="mnist", batch_size=16 if args.quick else 128)
    seconds = step_seconds(net, cfg, shape, 3 if args.quick else 20, ("hand",) if args.quick else ("hand", "autodiff"))
    rows = [[name, f"{s * 1e3:.1f}", f"{s / seconds[name.split(',')[0] + ', fp32']:.2f}x"]
            for name, s in seconds.items()]
    ceiling = bench.matmul_ceiling(256 if args.quick else None)
    sections = [
        "# Mixed precision (`--precision bf16`) against float32",
        f"Machine: {machine()}; measured float32 matmul ceiling {ceiling:.0f} GFLOP/s. Command: "
        f"`python -m experiments.mixed_precision{' --quick' if args.quick else ''}"
        f"{' --data-dir ' + args.data_dir if args.data_dir else ''}`.",
        f"## One training step, simplenn-mnist, batch {cfg.batch_size} ({'x'.join(map(str, shape))} images)\n\n"
        "The trainer's step (objective, gradient, Adam update), median of round-robin timings after compilation. "
        "bf16: the layers' forward and backward in bfloat16; params, loss, gradients and Adam in float32.\n\n"
        + table(["step", "ms", "vs fp32"], rows)]
    if args.data_dir:
        sections.append(training(net, cfg, args))
    write(args.out, "mixed_precision.md", "\n\n".join(sections) + "\n")


def training(net, cfg: train.TrainConfig, args) -> str:
    """The preset's recipe (2 epochs, hand gradients) on the real MNIST in each precision from the same seed: a
    table, and the per-step objective of both in one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = data.load("mnist", args.data_dir)
    if args.quick:
        dataset = dataclasses.replace(dataset, x_train=dataset.x_train[:640], y_train=dataset.y_train[:640],
                                      x_test=dataset.x_test[:256], y_test=dataset.y_test[:256])
    epochs = 1 if args.quick else 2
    rows, fig = [], plt.figure(figsize=(8, 4))
    for precision in PRECISIONS:
        c = dataclasses.replace(cfg, epochs=epochs, precision=precision)
        start = time.perf_counter()
        result = train.fit(net, train.prepare(dataset, c), c)
        seconds = time.perf_counter() - start
        last = result.history[-1]
        rows.append([precision, f"{result.test['accuracy']:.2%}", f"{result.test['loss']:.4f}",
                     f"{last['val_accuracy']:.2%}", f"{last['train_objective']:.4f}",
                     " / ".join(f"{r['seconds']:.1f}" for r in result.history), f"{seconds:.0f}"])
        plt.plot(np.arange(1, len(result.step_losses) + 1), result.step_losses, label=precision, alpha=0.7,
                 linewidth=0.7)
    plt.gca().set(xlabel="step", ylabel="objective", yscale="log",
                  title=f"simplenn-mnist on MNIST, {epochs} epochs, hand gradients")
    plt.legend()
    plt.grid(alpha=0.3)
    save_figure(fig, args.out, "mixed_precision.png")
    plt.close(fig)
    return (f"## Training: simplenn-mnist on the real MNIST, {epochs} epoch(s), batch {cfg.batch_size}, Adam, seed "
            f"{cfg.seed}\n\n" + table(["precision", "test accuracy", "test loss", "last val accuracy",
                                        "last epoch's train objective", "seconds per epoch", "seconds in all"],
                                       rows) + "\n\n![per-step objective](mixed_precision.png)")


if __name__ == "__main__":
    main()
