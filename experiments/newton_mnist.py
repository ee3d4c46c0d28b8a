"""Experiment 9: does simpleNN's Newton method reach >= 99% test accuracy on MNIST within 100 iterations?

    jaxcnn train --preset simplenn-mnist --dataset mnist --data-dir ../shared/data --optimizer newton \
        --batch-size 256 --out runs/newton-mnist            # hours on a CPU; stop and --resume at will
    python -m experiments.newton_mnist --run runs/newton-mnist --data-dir ../shared/data

Reads the run's ``metrics.jsonl`` (one line per Newton iteration, finished or not) and evaluates its saved model
(the iteration with the best validation accuracy so far) on the test set; writes ``newton_mnist.md`` (the command,
the machine, the test accuracy, every iteration's objective, CG iterations, lambda, step, accuracies and seconds)
and ``newton_mnist.png`` (objective and accuracies per iteration). ``--quick`` first makes a 3-iteration run on
the bundled digits and reports that.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from experiments._common import machine, parser, table, write
from jaxcnn import cli, train
from jaxcnn import data as datasets
from jaxcnn.checkpoint import load_model

COMMAND = ("jaxcnn train --preset simplenn-mnist --dataset mnist --data-dir ../shared/data --optimizer newton "
           "--batch-size 256 --out RUN")


def test_accuracy(run: Path, data_dir: str) -> tuple[dict, int, int]:
    """The saved model's test accuracy and loss, the iteration it is from, and the run's number of iterations."""
    model = load_model(run / "model.safetensors")
    cfg = train.TrainConfig(**model.meta["train"])
    dataset = datasets.load(cfg.dataset, data_dir)
    evaluate = train.make_evaluator(model.network, cfg, len(dataset.x_test))
    return evaluate(model.params, dataset.x_test - model.mean, dataset.y_test), model.meta["epoch"], cfg.iterations


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="the Newton run's --out folder")
    p.add_argument("--data-dir", default="data", help="where the run's dataset is (default data)")
    p.add_argument("--note", default="", help="how the run was made (cores, interruptions), put in the report")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if args.quick:
            run = Path(tmp) / "run"
            cli.main(["train", "--optimizer", "newton", "--C", "100", "--batch-size", "256", "--iterations", "3",
                      "--out", str(run), "--no-progress"])
        elif run is None:
            p.error("--run DIR is required (the folder of a `jaxcnn train --optimizer newton` run)")
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        test, best, total = test_accuracy(run, args.data_dir)
        plot(history, args.out / "newton_mnist.png")
    seconds = np.asarray([r["seconds"] for r in history])
    rows = [[r["iteration"], f"{r['train_objective']:.5g}", r["cg_iterations"], f"{r['lambda']:.3g}",
             f"{r['step_size']:g}", f"{r['train_accuracy']:.2%}", f"{r.get('val_accuracy', float('nan')):.2%}",
             f"{r['seconds']:.0f}"] for r in history]
    report = "\n\n".join([
        "# Newton's method on MNIST (simpleNN's optimizer, simplenn-mnist)",
        f"Machine: {machine()}. Run: `{COMMAND}`, then `python -m experiments.newton_mnist --run RUN --data-dir "
        f"../shared/data`{' --quick (here: 3 iterations on the digits)' if args.quick else ''}.",
        f"{len(history)} of {total} iterations done; seconds per iteration: median {np.median(seconds):.0f}, "
        f"range {seconds.min():.0f}-{seconds.max():.0f}. Test accuracy of the best validation iteration so far "
        f"(iteration {best}): **{test['accuracy']:.2%}** (loss {test['loss']:.4f}).",
        *([args.note] if args.note else []),
        "![objective and accuracy per iteration](newton_mnist.png)",
        table(["iteration", "objective f", "CG", "lambda", "step", "train acc", "val acc", "seconds"], rows),
    ])
    print(report)
    write(args.out, "newton_mnist.md", report + "\n")


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments._common import save_figure

    k = [r["iteration"] for r in history]
    fig, (ax_f, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_f.plot(k, [r["train_objective"] for r in history], marker=".")
    ax_f.set(xlabel="Newton iteration", ylabel="objective f (eq. 1)", yscale="log")
    ax_acc.plot(k, [r["train_accuracy"] for r in history], marker=".", label="train")
    if "val_accuracy" in history[0]:
        ax_acc.plot(k, [r["val_accuracy"] for r in history], marker=".", label="validation")
    ax_acc.axhline(0.99, color="grey", linestyle="--", linewidth=0.8, label="99%")
    ax_acc.set(xlabel="Newton iteration", ylabel="accuracy", ylim=(max(0.8, min(
        r["train_accuracy"] for r in history) - 0.01), 1.0))
    for ax in (ax_f, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle("simpleNN's Newton method, simplenn-mnist")
    fig.tight_layout()
    save_figure(fig, path.parent, path.name)


if __name__ == "__main__":
    main()
