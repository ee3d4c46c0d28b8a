"""Jitted training: Lin's objective minimised with optax, evaluation, best-validation params, run outputs.

``fit`` is the loop: one jitted step (value_and_grad of the objective + optax update) per mini-batch, each epoch
a fresh permutation of the training split, evaluation on the held-out validation split, and the params of the
best validation epoch kept. ``run`` adds what a command-line run leaves in ``--out``: ``metrics.jsonl`` (one line
per epoch), ``model.safetensors`` (best params, preprocessing, network), ``summary.json`` and ``curves.png``.

Randomness is explicit: the initial params come from ``jax.random.key(seed)``; the validation split and each
epoch's order from NumPy generators seeded with (seed, epoch). The same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import data as datasets
from jaxcnn import objective as obj
from jaxcnn._io import atomic_path, atomic_write
from jaxcnn.checkpoint import save_model
from jaxcnn.network import Sequential
from jaxcnn.ops import _args

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. Presets carry one in their ``[train]`` table; command-line flags override it."""

    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    schedule: str = "constant"
    loss: str = "ce"
    C: float | None = None
    grad: str = "hand"
    rule: str = "im2col"
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.dataset not in datasets.DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(datasets.DATASETS)}, got {self.dataset!r}")
        _args.choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _args.choice("train", "schedule", self.schedule, SCHEDULES)
        _args.choice("train", "grad", self.grad, _args.GRAD_MODES)
        _args.choice("train", "rule", self.rule, _args.CONV_RULES)
        obj.check(self.loss, self.C)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train: {name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train: lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"train: momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"train: val_fraction must be in [0, 1), got {self.val_fraction!r}")

    @classmethod
    def from_dict(cls, values: dict, source: str = "[train]") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(sorted(known))}")
        return cls(**values)


@dataclass(frozen=True)
class Prepared:
    """A dataset split for training and preprocessed as simpleNN does: the training mean image subtracted."""

    name: str
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_fit.shape[1:])  # type: ignore[return-value]


def prepare(dataset: datasets.Dataset, cfg: TrainConfig) -> Prepared:
    """Hold out ``cfg.val_fraction`` of the training set and subtract the mean image of the rest (simpleNN)."""
    x_fit, y_fit, x_val, y_val = datasets.split(dataset.x_train, dataset.y_train, cfg.val_fraction, cfg.seed)
    mean = datasets.mean_image(x_fit)
    return Prepared(dataset.name, x_fit - mean, y_fit, x_val - mean, y_val, dataset.x_test - mean, dataset.y_test,
                    mean, dataset.classes)


def check_network(net: Sequential, input_shape, classes: int) -> None:
    """The network must accept ``input_shape`` and output one score per class (raised before any compilation)."""
    out = net.shapes(input_shape)[-1]
    if out != (classes,):
        raise ValueError(f"the network outputs shape {'x'.join(map(str, out))} but the dataset has {classes} "
                         f"classes: end the network with Dense({classes})")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, total)
    elif cfg.schedule == "step":  # divide by 10 at 50% and 75% of training
        lr = optax.piecewise_constant_schedule(cfg.lr, {total // 2: 0.1, (3 * total) // 4: 0.1})
    else:
        lr = cfg.lr
    if cfg.optimizer == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=cfg.momentum if cfg.optimizer == "momentum" else None)


@dataclass
class FitResult:
    params: dict  # best-validation params (host arrays)
    best_epoch: int
    history: list[dict]  # one record per epoch
    step_losses: np.ndarray  # the objective at every step, in order
    test: dict = field(default_factory=dict)  # {"loss", "accuracy"} of the best params on the test set


def fit(net: Sequential, prep: Prepared, cfg: TrainConfig, *, on_epoch: Callable | None = None,
        progress: bool = False) -> FitResult:
    """Train ``net`` on ``prep`` by ``cfg``; ``on_epoch(record, params, improved)`` is called after each epoch."""
    from tqdm import tqdm

    check_network(net, prep.input_shape, prep.classes)
    n, batch = len(prep.x_fit), cfg.batch_size
    if batch > n:
        raise ValueError(f"train: batch_size {batch} exceeds the {n} training examples")
    steps = n // batch  # the remainder of each epoch's permutation is skipped (a different one each epoch)
    tx = make_optimizer(cfg, steps)
    params = net.init(jax.random.key(cfg.seed), prep.input_shape)
    opt_state = tx.init(params)
    step = make_step(net, tx, cfg)
    evaluate = make_evaluator(net, cfg, max(len(prep.x_val), len(prep.x_test)))
    x_fit, y_fit = jnp.asarray(prep.x_fit), jnp.asarray(prep.y_fit)

    history, step_losses, best, best_key = [], [], None, None
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        values, corrects = [], []
        with tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False,
                  unit="step", file=sys.stderr) as bar:
            for s in range(steps):
                idx = jnp.asarray(order[s * batch:(s + 1) * batch])
                params, opt_state, value, aux = step(params, opt_state, x_fit, y_fit, idx)
                values.append(value)
                corrects.append(aux["correct"])
                bar.update()
                if progress and (s % 20 == 0 or s == steps - 1):
                    bar.set_postfix(loss=f"{float(aux['loss']):.4f}", acc=f"{int(aux['correct']) / batch:.1%}")
        values = np.asarray(jax.device_get(jnp.stack(values)), np.float64)
        step_losses.append(values)
        record = {"epoch": epoch, "train_objective": float(values.mean()),
                  "train_accuracy": float(np.sum(jax.device_get(jnp.stack(corrects)))) / (steps * batch)}
        if not math.isfinite(record["train_objective"]):
            raise FloatingPointError(f"the objective became {record['train_objective']} in epoch {epoch}; lower "
                                     f"--lr (now {cfg.lr}) or set --C to regularise")
        if len(prep.x_val):
            val = evaluate(params, prep.x_val, prep.y_val)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            key = (val["accuracy"], -val["loss"])
        else:
            key = (epoch,)  # no validation split: the last epoch is the best
        record["seconds"] = time.perf_counter() - start
        improved = best_key is None or key > best_key
        if improved:
            best_key, best = key, (epoch, jax.device_get(params))
        history.append(record)
        if on_epoch is not None:
            on_epoch(record, best[1], improved)
    best_epoch, best_params = best
    result = FitResult(best_params, best_epoch, history, np.concatenate(step_losses))
    result.test = evaluate(best_params, prep.x_test, prep.y_test)
    return result


def make_step(net: Sequential, tx: optax.GradientTransformation, cfg: TrainConfig):
    """The jitted training step on the batch ``x_all[idx]``: returns (params, opt_state, f, aux)."""

    def step(params, opt_state, x_all, y_all, idx):
        (value, aux), grads = jax.value_and_grad(obj.objective, has_aux=True)(
            params, net, x_all[idx], y_all[idx], loss=cfg.loss, C=cfg.C, grad=cfg.grad, rule=cfg.rule)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, aux

    return jax.jit(step, donate_argnums=(0, 1))


def make_evaluator(net: Sequential, cfg: TrainConfig, largest: int, max_batch: int = 1000):
    """``evaluate(params, x, y) -> {"loss", "accuracy"}`` over a whole split, in fixed-size padded batches (one
    compilation for every split)."""
    size = max(1, min(max_batch, largest))

    @jax.jit
    def batch_stats(params, x, y, mask):
        logits = net.apply(params, x, grad=cfg.grad, rule=cfg.rule)
        losses = obj.per_example_loss(logits, y, cfg.loss)
        return jnp.sum(losses * mask), jnp.sum((jnp.argmax(logits, axis=-1) == y) * mask)

    def evaluate(params, x: np.ndarray, y: np.ndarray) -> dict:
        totals = []
        for start in range(0, len(x), size):
            xb, yb = x[start:start + size], y[start:start + size]
            pad = size - len(xb)
            mask = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
            totals.append(batch_stats(params, xb, yb, mask))
        loss, correct = np.sum(np.asarray(jax.device_get(totals), np.float64), axis=0)
        return {"loss": float(loss) / len(x), "accuracy": float(correct) / len(x)}

    return evaluate


def run(net: Sequential, cfg: TrainConfig, out: str | Path, *, recipe: str, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Load the data, train, and write metrics.jsonl, model.safetensors, summary.json and curves.png to ``out``.

    ``out`` must not hold a finished run already (nothing a user saved is overwritten).
    """
    out = Path(out)
    for name in ("summary.json", "model.safetensors"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists: {out} already holds a run; choose another --out")
    begin = time.perf_counter()
    dataset = datasets.load(cfg.dataset, cfg.data_dir, download=cfg.download, progress=progress)
    prep = prepare(dataset, cfg)
    check_network(net, prep.input_shape, prep.classes)
    log(f"{recipe} on {prep.name}: {len(prep.x_fit)} training, {len(prep.x_val)} validation, "
        f"{len(prep.x_test)} test images {'x'.join(map(str, prep.input_shape))}; "
        f"{net.num_params(prep.input_shape):,} parameters; grad={cfg.grad}, rule={cfg.rule}; "
        f"{jax.devices()[0].platform} ({jax.device_count()} device(s))")
    meta = {"recipe": recipe, "dataset": prep.name, "classes": prep.classes,
            "input_shape": list(prep.input_shape), "train": dataclasses.asdict(cfg)}
    history: list[dict] = []

    def on_epoch(record, best_params, improved):
        history.append(record)
        atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if improved:
            save_model(out / "model.safetensors", net, best_params, prep.mean, {**meta, "epoch": record["epoch"]})
        val = (f"  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2%}"
               if "val_loss" in record else "")
        log(f"epoch {record['epoch']:>3}/{cfg.epochs}  train f {record['train_objective']:.4f} "
            f"acc {record['train_accuracy']:.2%}{val}  {record['seconds']:.1f}s{'  *' if improved else ''}")

    result = fit(net, prep, cfg, on_epoch=on_epoch, progress=progress)
    seconds = time.perf_counter() - begin
    summary = {"test_accuracy": result.test["accuracy"], "test_loss": result.test["loss"], "epochs": cfg.epochs,
               "best_epoch": result.best_epoch, "seconds": seconds, "grad": cfg.grad, "rule": cfg.rule,
               "recipe": recipe, "dataset": prep.name, "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "train": dataclasses.asdict(cfg), "network": net.to_config()}
    save_model(out / "model.safetensors", net, result.params, prep.mean,
               {**meta, "epoch": result.best_epoch, "test": result.test})
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_curves(history, out / "curves.png", title=f"{recipe} on {prep.name}, grad={cfg.grad}")
    log(f"test accuracy {result.test['accuracy']:.2%}, loss {result.test['loss']:.4f} (best validation epoch "
        f"{result.best_epoch}); {seconds:.0f}s in all; results in {out}/")
    return summary


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch (training and validation) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_objective"] for r in history], label="train objective f")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    if history and "val_loss" in history[0]:
        ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation loss")
        ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
