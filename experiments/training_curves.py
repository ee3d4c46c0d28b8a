"""Experiment 2: training with hand-derived and with autodiff gradients from the same seed, curves overlaid.

    python -m experiments.training_curves     # writes experiments/results/training_curves.{md,png}

Trains the digits preset (and simplenn-mnist on MNIST when data/mnist/ holds it) twice, identical in everything
but ``grad``, and compares the per-step objective, the per-epoch curves and the final test accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from experiments._common import machine, parser, save_figure, table, write
from jaxcnn import data, network, train


def compare(preset: str, dataset: data.Dataset, cfg: train.TrainConfig) -> dict:
    runs = {}
    for grad in ("hand", "autodiff"):
        c = dataclasses.replace(cfg, grad=grad)
        runs[grad] = train.fit(network.preset(preset), train.prepare(dataset, c), c)
    return runs


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = [("digits-cnn", data.load("digits"), train.TrainConfig(epochs=1 if args.quick else 30))]
    if not args.quick and (Path("data") / "mnist").exists():
        experiments.append(("simplenn-mnist", data.load("mnist"), train.TrainConfig(dataset="mnist", epochs=2,
                                                                                      batch_size=128)))
    sections, fig_rows = [], len(experiments)
    fig, axes = plt.subplots(fig_rows, 3, figsize=(15, 4 * fig_rows), squeeze=False)
    for (preset, dataset, cfg), (ax_step, ax_rel, ax_epoch) in zip(experiments, axes):
        runs = compare(preset, dataset, cfg)
        hand, auto = runs["hand"], runs["autodiff"]
        rel = np.abs(hand.step_losses - auto.step_losses) / np.abs(auto.step_losses)
        steps_per_epoch = len(hand.step_losses) // cfg.epochs
        for name, run, style in (("hand", hand, "-"), ("autodiff", auto, "--")):
            ax_step.plot(run.step_losses, style, label=f"{name}", alpha=0.8)
            ax_epoch.plot([r["epoch"] for r in run.history], [r["val_accuracy"] for r in run.history], style,
                          label=f"{name} validation accuracy")
        ax_step.set(title=f"{preset} on {dataset.name}: objective per step", xlabel="step", yscale="log")
        nonzero = rel > 0
        ax_rel.plot(np.flatnonzero(nonzero), rel[nonzero], ".", ms=2, color="gray")
        ax_rel.set(title="|hand - autodiff| / |autodiff| per step (0 not shown)", xlabel="step", yscale="log")
        ax_epoch.set(title="validation accuracy per epoch", xlabel="epoch")
        ax_rel.grid(alpha=0.3)
        for ax in (ax_step, ax_epoch):
            ax.grid(alpha=0.3)
            ax.legend()
        epochs = [[h["epoch"], f"{h['train_objective']:.6f}", f"{a['train_objective']:.6f}",
                   f"{abs(h['train_objective'] - a['train_objective']) / a['train_objective']:.1e}",
                   f"{h['val_accuracy']:.2%}", f"{a['val_accuracy']:.2%}", f"{h['seconds']:.2f}", f"{a['seconds']:.2f}"]
                  for h, a in zip(hand.history, auto.history)]
        sections.append(f"""## {preset} on {dataset.name}

{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr}, seed {cfg.seed}, float32.
Largest relative difference of the per-step objective: first epoch {rel[:steps_per_epoch].max():.1e}, whole run
{rel.max():.1e}. Test accuracy: hand {hand.test['accuracy']:.2%}, autodiff {auto.test['accuracy']:.2%}
(best validation epochs {hand.best_epoch} and {auto.best_epoch}).

{table(["epoch", "train f (hand)", "train f (autodiff)", "rel diff", "val acc (hand)", "val acc (autodiff)",
        "s/epoch (hand)", "s/epoch (autodiff)"], epochs)}
""")
    fig.tight_layout()
    save_figure(fig, args.out, "training_curves.png")
    mnist_note = "" if len(experiments) > 1 else (
        "\nMNIST was not available here (no `data/mnist/`; `jaxcnn train --dataset mnist --download` fetches it); "
        "with it, this script adds simplenn-mnist for 2 epochs.\n")
    text = f"""# Hand vs autodiff training from the same seed

`python -m experiments.training_curves` on {machine()}.

Both runs share everything but the gradient mode: the same forward pass, initial weights, batches and optimizer.
In float32 the two gradients differ only by rounding (about 1e-7 relative), so the curves coincide at first and
drift apart only as rounding differences are amplified by training; the first-epoch column is the comparison the
tests make (`tests/test_train.py`, within 1e-4).
{mnist_note}
![curves](training_curves.png)

{chr(10).join(sections)}"""
    print(write(args.out, "training_curves.md", text))


if __name__ == "__main__":
    main()
