"""Experiment 7: is Newton's method less sensitive to its settings than SGD to its learning rate (simpleNN's claim)?

    python -m experiments.newton_sensitivity     # writes experiments/results/newton_sensitivity.{md,png}

The same network (digits-cnn), data (the bundled digits), objective (squared loss, C = 100) and seed for both:
SGD over a grid of learning rates, Newton (``--optimizer newton``) over a grid of its two settings, the
Gauss-Newton subsample fraction and lambda's start. Test accuracy of the best-validation params of each run; a run
that diverges (stopped on a NaN objective) counts as chance, 10%.
"""

from __future__ import annotations

import dataclasses
import time

from experiments._common import machine, parser, save_figure, table, write
from jaxcnn import data, network, train

LEARNING_RATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
GN_FRACTIONS = (0.02, 0.05, 0.2)
DAMPINGS = (0.01, 1.0, 100.0)


def run(cfg: train.TrainConfig, dataset) -> tuple[float, str, float]:
    """Test accuracy (a diverged run counts as chance, 10%), its text, and seconds."""
    start = time.perf_counter()
    try:
        result = train.fit(network.preset("digits-cnn"), train.prepare(dataset, cfg), cfg)
    except train.NonFiniteError:
        return 0.1, "diverged (NaN): 10.00%", time.perf_counter() - start
    return result.test["accuracy"], f"{result.test['accuracy']:.2%}", time.perf_counter() - start


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = data.load("digits")
    base = train.TrainConfig(loss="squared", C=100.0, batch_size=32, epochs=1 if args.quick else 30)
    rates = LEARNING_RATES[2:4] if args.quick else LEARNING_RATES
    newton = dataclasses.replace(base, optimizer="newton", batch_size=256, iterations=2 if args.quick else 20)
    grid = [(f, d) for f in (GN_FRACTIONS[1:2] if args.quick else GN_FRACTIONS)
            for d in (DAMPINGS[1:2] if args.quick else DAMPINGS)]
    sgd_rows, newton_rows = [], []
    for lr in rates:
        _, accuracy, seconds = run(dataclasses.replace(base, optimizer="sgd", lr=lr), dataset)
        sgd_rows.append([f"{lr:g}", accuracy, f"{seconds:.0f}"])
        print("sgd", sgd_rows[-1], flush=True)
    for fraction, damping in grid:
        _, accuracy, seconds = run(dataclasses.replace(newton, gn_fraction=fraction, damping=damping), dataset)
        newton_rows.append([f"{fraction:g}", f"{damping:g}", accuracy, f"{seconds:.0f}"])
        print("newton", newton_rows[-1], flush=True)

    def percent(text: str) -> float:
        return float(text.split()[-1].rstrip("%"))

    def spread(rows, column):
        values = [percent(r[column]) for r in rows]
        return min(values), max(values)

    (sgd_lo, sgd_hi), (nt_lo, nt_hi) = spread(sgd_rows, 1), spread(newton_rows, 2)
    fig, (ax_sgd, ax_nt) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    ax_sgd.plot([float(r[0]) for r in sgd_rows], [percent(r[1]) for r in sgd_rows], "o-")
    ax_sgd.set(xscale="log", xlabel="SGD learning rate", ylabel="test accuracy (%)",
               title=f"SGD, {base.epochs} epochs of batch 32")
    for fraction in sorted({r[0] for r in newton_rows}, key=float):
        rows = [r for r in newton_rows if r[0] == fraction]
        ax_nt.plot([float(r[1]) for r in rows], [percent(r[2]) for r in rows], "o-",
                   label=f"gn-fraction {fraction}")
    ax_nt.set(xscale="log", xlabel="initial lambda (--damping)", title=f"Newton, {newton.iterations} iterations")
    for ax in (ax_sgd, ax_nt):
        ax.grid(alpha=0.3)
    ax_nt.legend()
    fig.suptitle("digits-cnn on the digits, squared loss, C = 100: test accuracy over each method's settings")
    fig.tight_layout()
    save_figure(fig, args.out, "newton_sensitivity.png")
    report = "\n\n".join([
        "# Newton's method against SGD: sensitivity to their settings",
        f"Machine: {machine()}. Command: `python -m experiments.newton_sensitivity`"
        f"{' --quick' if args.quick else ''}. Same network, data, objective and seed for every run.",
        f"SGD ({base.epochs} epochs, batch 32), test accuracy from {sgd_lo:.2f}% to {sgd_hi:.2f}% over the learning "
        "rates:",
        table(["learning rate", "test accuracy", "seconds"], sgd_rows),
        f"Newton ({newton.iterations} iterations, segments of 256), test accuracy from {nt_lo:.2f}% to {nt_hi:.2f}% "
        "over its settings:",
        table(["gn-fraction", "initial lambda", "test accuracy", "seconds"], newton_rows),
        "![test accuracy over the settings](newton_sensitivity.png)",
    ])
    print(write(args.out, "newton_sensitivity.md", report + "\n"))


if __name__ == "__main__":
    main()
