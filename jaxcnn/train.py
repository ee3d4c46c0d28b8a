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
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxcnn import _malloc, parallel
from jaxcnn import augment as augmentation
from jaxcnn import data as datasets
from jaxcnn import objective as obj
from jaxcnn import tensorboard as tb
from jaxcnn._io import atomic_path, atomic_write, strict_json
from jaxcnn.checkpoint import list_states, newest_state, save_model, save_state
from jaxcnn.network import Conv, Residual, Sequential, describe
from jaxcnn.ops import _args
from jaxcnn.ops.conv import resolve as resolve_rule

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "newton")
SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = {"fp32": None, "bf16": jnp.bfloat16}  # the layers' compute dtype; params, loss and optimizer: float32


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
    warmup: int = 0  # steps of linear learning-rate warmup from 0, in front of the schedule
    weight_decay: float | None = None  # AdamW's decoupled decay (None: optax's 1e-4); adamw only
    clip_norm: float | None = None  # clip each step's gradient to this global norm (None: no clipping)
    label_smoothing: float = 0.0  # epsilon: train on (1 - epsilon) onehot + epsilon / K (objective.smoothed)
    augment: str = ""  # "crop", "flip", "crop,flip" or "standard" (jaxcnn.augment), in the step, on the device
    crop_padding: int | None = None  # zeros around the image for random crops (None: an eighth of its side)
    precision: str = "fp32"  # "bf16": mixed precision, the layers in bfloat16 (PRECISIONS, objective.objective)
    loss: str = "ce"
    C: float | None = None
    grad: str = "hand"
    rule: str | None = "auto"  # timed on this machine (jaxcnn.autotune); None: the backend's default (conv2d's)
    rule_memory_mb: float | None = None  # rule "auto": pass over candidates needing more temporary memory (MiB)
    seed: int = 0
    val_fraction: float = 0.1
    # optimizer = "newton" (simpleNN's Newton method, jaxcnn.newton): iterations instead of epochs
    iterations: int = 100
    gn_fraction: float = 0.05  # share of the training set in each Gauss-Newton subsample
    cg_tol: float = 0.1  # CG stops at ||r|| <= cg_tol ||g|| ...
    cg_max: int = 250  # ... or after cg_max iterations
    damping: float = 1.0  # Levenberg-Marquardt's lambda at the start

    @property
    def compute_dtype(self):
        """The dtype the layers compute in (None: the params', float32)."""
        return PRECISIONS[self.precision]

    @property
    def op_rule(self) -> str | None:
        """The ``rule`` the ops are called with: "auto" is settled per layer before training (``tuned``), and
        the layers it did not reach take the backend's default."""
        return None if self.rule == "auto" else self.rule

    def __post_init__(self):
        if self.dataset not in datasets.DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(datasets.DATASETS)}, got {self.dataset!r}")
        _args.choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _args.choice("train", "schedule", self.schedule, SCHEDULES)
        _args.choice("train", "grad", self.grad, _args.GRAD_MODES)
        _args.choice("train", "precision", self.precision, tuple(PRECISIONS))
        if self.rule == "winograd":
            raise ValueError("train: rule='winograd' computes only 3x3, stride-1 convolutions, so it is not a rule for "
                             "the whole network: name it on those layers (rule = \"winograd\" in the network's TOML), "
                             "or use rule='auto', which times it where it applies")
        if self.rule is not None:
            _args.choice("train", "rule", self.rule, (*_args.CONV_RULES, "auto"))
        if self.rule_memory_mb is not None:
            from jaxcnn.autotune import check_limit

            check_limit("train", "rule_memory_mb", self.rule_memory_mb)
            if self.rule != "auto":
                raise ValueError(f"train: rule_memory_mb limits the candidates of rule 'auto', not rule "
                                 f"{self.rule!r}, which needs what it needs")
        obj.check(self.loss, self.C)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train: {name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train: lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"train: momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"train: warmup must be an int >= 0 (steps), got {self.warmup!r}")
        for name in ("weight_decay", "clip_norm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0 or (name == "clip_norm" and value == 0)):
                raise ValueError(f"train: {name} must be a finite number {'> 0' if name == 'clip_norm' else '>= 0'}, "
                                 f"got {value!r}")
        if self.weight_decay is not None and self.optimizer != "adamw":
            raise ValueError(f"train: weight_decay is AdamW's decoupled decay (optimizer adamw), not "
                             f"{self.optimizer}'s; for an L2 term in the objective use C (Lin's ||theta||^2 / (2C))")
        if (isinstance(self.label_smoothing, bool) or not isinstance(self.label_smoothing, (int, float))
                or not 0 <= self.label_smoothing < 1):
            raise ValueError(f"train: label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.optimizer == "newton" and (self.warmup or self.clip_norm is not None or self.augment
                                           or self.label_smoothing or self.precision != "fp32"):
            raise ValueError("train: warmup, clip_norm, augment, label_smoothing and precision apply to the "
                             "first-order optimizers, not newton (its step comes from a line search on Lin's "
                             "objective, and CG needs float32 products)")
        if not isinstance(self.augment, str):
            raise ValueError(f"train: augment must be a string such as 'crop,flip', got {self.augment!r}")
        augmentation.parse(self.augment, self.dataset)
        if self.crop_padding is not None and (isinstance(self.crop_padding, bool) or
                                              not isinstance(self.crop_padding, int) or self.crop_padding < 1):
            raise ValueError(f"train: crop_padding must be a positive int, got {self.crop_padding!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"train: val_fraction must be in [0, 1), got {self.val_fraction!r}")
        for name in ("iterations", "cg_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train: {name} must be a positive int, got {value!r}")
        checks = {"gn_fraction": (lambda v: 0 < v <= 1, "in (0, 1] (the share of the training set in each "
                                  "Gauss-Newton subsample)"),
                  "cg_tol": (lambda v: 0 < v < 1, "in (0, 1) (CG stops at ||r|| <= cg_tol ||g||)"),
                  "damping": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0 (lambda)")}
        for name, (ok, expected) in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"train: {name} must be {expected}, got {value!r}")

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
    """The recipe's optax transformation: gradient clipping by global norm (``clip_norm``), then the optimizer
    with its learning rate (``learning_rate``)."""
    lr = learning_rate(cfg, steps_per_epoch)
    if cfg.optimizer == "adam":
        tx = optax.adam(lr)
    elif cfg.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=1e-4 if cfg.weight_decay is None else cfg.weight_decay)
    else:
        tx = optax.sgd(lr, momentum=cfg.momentum if cfg.optimizer == "momentum" else None)
    return tx if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)


def learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """The recipe's learning rate: a number (constant, no warmup) or an optax schedule of the step: ``warmup``
    steps rising linearly from 0 to ``lr``, then the schedule over the remaining steps."""
    total = cfg.epochs * steps_per_epoch
    if cfg.warmup >= total:
        raise ValueError(f"train: warmup ({cfg.warmup} steps) must be shorter than the run ({total} steps)")
    rest = total - cfg.warmup
    if cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, rest)
    elif cfg.schedule == "step":  # divide by 10 at 50% and 75% of training
        lr = optax.piecewise_constant_schedule(cfg.lr, {rest // 2: 0.1, (3 * rest) // 4: 0.1})
    else:
        lr = cfg.lr  # a number, not a schedule: the optimizer state of runs saved before warmup existed still fits
    if cfg.warmup:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup),
                                   lr if callable(lr) else optax.constant_schedule(lr)], [cfg.warmup])
    return lr


@dataclass
class FitResult:
    params: dict  # best-validation params (host arrays)
    best_epoch: int
    history: list[dict]  # one record per epoch
    step_losses: np.ndarray  # the objective at every step, in order (NaN for a skipped step)
    test: dict = field(default_factory=dict)  # {"loss", "accuracy"} of the best params on the test set
    skipped: int = 0  # steps skipped for a non-finite objective or gradient (on_nan="skip")
    state: dict = field(default_factory=dict)  # the best epoch's state (batch norm's running averages; {} if none)


@dataclass
class Position:
    """Where the loop is and what it has gathered: with params, optimizer state and the best params, all a
    training-state checkpoint restores."""

    epoch: int = 1  # the current epoch (1-based)
    step: int = 0  # steps done in the current epoch
    values: list[float] = field(default_factory=list)  # the objective at each step of the current epoch
    correct: int = 0  # correctly classified training examples so far this epoch
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # earlier epochs, every step
    best_key: list | None = None
    best_epoch: int = 0
    skipped: int = 0


class NonFiniteError(FloatingPointError):
    """The objective or a gradient became NaN or Inf."""


def fit(net: Sequential, prep: Prepared, cfg: TrainConfig, *, on_epoch: Callable | None = None,
        progress: bool = False, checkpoint: Callable | None = None, checkpoint_every: int = 0,
        resume: tuple | None = None, on_nan: str = "stop", devices: int | None = None,
        heartbeat: Callable[[str], None] | None = None, every: float = 30.0,
        optimizer: optax.GradientTransformation | None = None, on_steps: Callable[[list[dict]], None] | None = None,
        log_steps: int = 0) -> FitResult:
    """Train ``net`` on ``prep`` by ``cfg``, data-parallel over ``devices`` local devices of every process
    (default all; see ``jaxcnn.parallel``).

    ``on_epoch(record, best_params, improved, best_state)`` is called after each epoch (``best_state``: the
    network's state at the best epoch, batch norm's running averages; {} without); ``checkpoint(state)`` after each
    epoch and every ``checkpoint_every`` steps with the training state (see ``_state``), which ``resume`` takes
    back to continue exactly where it was. A step whose objective or gradient is not finite is never applied:
    ``on_nan="stop"`` raises NonFiniteError at the next checkpoint or epoch end, naming the step and the first
    layer whose output went non-finite (no checkpoint is written after it); ``on_nan="skip"`` skips such steps
    and counts them. ``heartbeat``, if given, receives a progress line (step, loss, speed, time left in the
    epoch) every ``every`` seconds within an epoch, for logs without a terminal; the speed leaves the first step,
    which compiles, and the time spent evaluating and writing checkpoints out. ``optimizer``: an optax
    transformation of the caller's, used instead of the recipe's (``make_optimizer``; the recipe's lr, schedule,
    warmup, weight decay and clipping are then unused).
    ``on_steps(rows)``, with ``log_steps`` k > 0: every k-th step's objective, learning rate, global gradient norm
    and each layer's (``grad_norm/<layer>``) as rows of a table, handed over whenever results reach the host.
    """
    from tqdm import tqdm

    _args.choice("fit", "on_nan", on_nan, ("stop", "skip"))
    if cfg.rule == "auto":  # a no-op for layers tuned already (``run`` tunes first, to record and log the rules)
        net = tuned(net, prep, cfg, devices, log=lambda line: None, progress=progress)
    if cfg.optimizer == "newton":
        from jaxcnn import newton

        return newton.fit(net, prep, cfg, on_epoch=on_epoch, checkpoint=checkpoint, resume=resume, devices=devices)
    check_network(net, prep.input_shape, prep.classes)
    check_batch_size(cfg, len(prep.x_fit))
    n, batch = len(prep.x_fit), cfg.batch_size
    steps = n // batch  # the remainder of each epoch's permutation is skipped (a different one each epoch)
    mesh = parallel.make_mesh(devices)
    parallel.check_batch(batch, mesh)
    tx = make_optimizer(cfg, steps) if optimizer is None else optimizer
    params = net.init(jax.random.key(cfg.seed), prep.input_shape)
    opt_state, state = tx.init(params), net.init_state(prep.input_shape)
    pos, best_params, best_state = Position(), None, {}
    if resume is not None:
        params, opt_state, state, best_params, best_state, pos = _restore(resume, params, opt_state, state, prep)
    guard = _guard(net, params, count=(pos.epoch - 1) * steps + pos.step, skipped=pos.skipped)
    params, opt_state, state, guard = parallel.replicate(mesh, (params, opt_state, state, guard))
    step = make_step(net, tx, cfg, mesh, skip=on_nan == "skip")
    evaluate = make_evaluator(net, cfg, max(len(prep.x_val), len(prep.x_test)), mesh=mesh)
    lr = learning_rate(cfg, steps) if optimizer is None else None
    norm_names = ["grad_norm", *(f"grad_norm/{name}" for name in sorted(params))]
    logged: list[tuple[int, int, jax.Array, jax.Array]] = []  # (global step, epoch, objective, norms) on device

    def sync(values, corrects):
        """Bring the device-side step results to the host; stop on a non-finite step (on_nan="stop")."""
        if logged and on_steps is not None:
            host = parallel.to_host([(v, n) for _, _, v, n in logged])
            on_steps([{"step": g, "epoch": e, "objective": float(v),
                       "lr": "" if lr is None else float(lr(g - 1) if callable(lr) else lr),
                       **dict(zip(norm_names, map(float, n)))} for (g, e, _, _), (v, n) in zip(logged, host)])
            logged.clear()
        if values:
            pos.values.extend(np.asarray(parallel.to_host(jnp.stack(values)), np.float64).tolist())
            pos.correct += int(np.sum(parallel.to_host(jnp.stack(corrects))))
            values.clear()
            corrects.clear()
        g = parallel.to_host(guard)
        pos.skipped = int(g["skipped"])
        if on_nan == "stop" and g["bad"] >= 0:
            raise NonFiniteError(_nan_message(net, params, g, steps, cfg))

    def save():
        if checkpoint is not None:
            checkpoint(_state(pos, (params, opt_state, state), (best_params, best_state), prep, cfg, net, steps))

    clock = None  # (time, steps done) once the first step (compilation included) has finished
    done = beats = 0

    def resumed(clock, paused):  # the speed counts the steps' time only, not evaluation or checkpoints
        return None if clock is None else (clock[0] + time.perf_counter() - paused, clock[1])

    while pos.epoch <= cfg.epochs:
        epoch = pos.epoch
        start = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        values, corrects = [], []
        with tqdm(total=steps, initial=pos.step, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                  leave=False, unit="step", file=sys.stderr) as bar:
            while pos.step < steps:
                s = pos.step
                xb, yb = parallel.global_batch(mesh, order[s * batch:(s + 1) * batch], prep.x_fit, prep.y_fit)
                params, opt_state, state, guard, value, aux = step(params, opt_state, state, guard, xb, yb)
                values.append(value)
                corrects.append(aux["correct"])
                parallel.pace(mesh, values)
                pos.step += 1
                global_step = (epoch - 1) * steps + pos.step
                if log_steps and global_step % log_steps == 0:
                    logged.append((global_step, epoch, value, aux["grad_norms"]))
                bar.update()
                done += 1
                if progress and (s % 20 == 0 or s == steps - 1):
                    loss, correct = parallel.to_host((aux["loss"], aux["correct"]))
                    bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{int(correct) / batch:.1%}")
                if heartbeat is not None:
                    if clock is None:
                        jax.block_until_ready(value)
                        clock = (time.perf_counter(), done)
                    elif time.perf_counter() - clock[0] >= every * (1 + beats) and pos.step < steps:
                        loss = float(parallel.to_host(aux["loss"]))
                        rate = (done - clock[1]) / (time.perf_counter() - clock[0])
                        heartbeat(f"epoch {epoch}/{cfg.epochs}: step {pos.step}/{steps}, loss {loss:.4f}, "
                                  f"{rate:.1f} steps/s, epoch done in ~{(steps - pos.step) / rate:.0f}s")
                        beats += 1
                if checkpoint_every and pos.step < steps and global_step % checkpoint_every == 0:
                    paused = time.perf_counter()
                    sync(values, corrects)
                    save()
                    clock = resumed(clock, paused)
        paused = time.perf_counter()
        sync(values, corrects)
        epoch_values = np.asarray(pos.values)
        finite = np.isfinite(epoch_values)
        record = {"epoch": epoch, "train_objective": float(epoch_values[finite].mean()) if finite.any() else
                  float("nan"), "train_accuracy": pos.correct / (steps * batch), "skipped_steps": pos.skipped}
        if len(prep.x_val):
            val = evaluate(params, prep.x_val, prep.y_val, state)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            key = [val["accuracy"], -val["loss"]]
        else:
            key = [epoch]  # no validation split: the last epoch is the best
        record["seconds"] = time.perf_counter() - start
        improved = pos.best_key is None or key > pos.best_key
        if improved:
            pos.best_key, pos.best_epoch = key, epoch
            best_params, best_state = parallel.to_host((params, state))
        pos.history.append(record)
        pos.step_losses.extend(pos.values)
        pos.epoch, pos.step, pos.values, pos.correct = epoch + 1, 0, [], 0
        save()
        if on_epoch is not None:
            on_epoch(record, best_params, improved, best_state)
        clock = resumed(clock, paused)
    result = FitResult(best_params, pos.best_epoch, pos.history, np.asarray(pos.step_losses), skipped=pos.skipped,
                       state=best_state)
    result.test = evaluate(best_params, prep.x_test, prep.y_test, best_state)
    return result


def check_batch_size(cfg: TrainConfig, examples: int) -> None:
    """A first-order step takes ``batch_size`` of the training examples (Newton's method takes segments of any
    size): checked before anything is timed or compiled."""
    if cfg.optimizer != "newton" and cfg.batch_size > examples:
        raise ValueError(f"train: batch_size {cfg.batch_size} exceeds the {examples} training examples")


def tuned(net: Sequential, prep: Prepared, cfg: TrainConfig, devices: int | None, log: Callable[[str], None],
          progress: bool = False) -> Sequential:
    """``net`` with the rule fastest on this machine for its conv layers that name none (``jaxcnn.autotune``),
    timed at the batch each device computes (Newton's segments hold at most the training set), among those within
    ``cfg.rule_memory_mb``; ``progress``: bars while timing."""
    from jaxcnn import autotune

    if jax.process_count() > 1:
        return autotune.backend_default(net, log, "several processes: each would time on its own and might choose "
                                                  "another; --rule names one")
    per_device = max(1, min(cfg.batch_size, len(prep.x_fit)) // parallel.make_mesh(devices).size)
    return autotune.tune(net, prep.input_shape, per_device, cfg.compute_dtype or jnp.float32, log=log,
                         min_flops=autotune.MIN_FLOPS, progress=progress, max_temp_mb=cfg.rule_memory_mb)[0]


def conv_rules(net: Sequential, default: str, prefix: str = "") -> dict[str, str]:
    """Each conv layer's rule, by name (``res2/conv1`` inside residual blocks), ``default`` for those naming none."""
    rules = {}
    for name, layer in zip(net.names, net.layers):
        if isinstance(layer, Residual):
            rules.update(conv_rules(layer.body, default, f"{prefix}{name}/"))
        elif isinstance(layer, Conv):
            rule = layer.rule or default
            blocks = "" if layer.block is None else f" ({'' if rule == 'winograd' else 'phi '}in blocks: {layer.block})"
            rules[prefix + name] = rule + (" (phi stored)" if layer.store_phi else "") + blocks
    return rules


def make_step(net: Sequential, tx: optax.GradientTransformation, cfg: TrainConfig, mesh, skip: bool = False):
    """The jitted, data-parallel training step on a batch split over ``mesh``: ``step(params, opt_state, state,
    guard, x, y) -> (params, opt_state, state, guard, f, aux)``, all replicated. ``state``: batch norm's running
    averages, updated from statistics synchronised over the devices ({} for a network without).

    ``guard`` counts steps and remembers the first non-finite one ("bad": its global index, -1 if none; "finite":
    which layer outputs were finite; "grad_finite": which gradients). A non-finite step is not applied; unless
    ``skip``, no step after it is applied either, so the params stay those of the last good step.
    """

    kinds = augmentation.parse(cfg.augment, cfg.dataset)

    def local(params, opt_state, state, guard, x, y):
        # each example's random draws keyed by the seed, the global step and its place in the global batch
        index = lax.axis_index(parallel.AXIS) * x.shape[0] + jnp.arange(x.shape[0])
        if kinds:
            key = jax.random.fold_in(jax.random.key(cfg.seed + 0x5EED), guard["count"])
            padding = cfg.crop_padding or augmentation.default_padding(x.shape[1:3])
            x = augmentation.augment(x, key, index, kinds, padding)
        rng = None
        if net.random:  # dropout
            key = jax.random.fold_in(jax.random.key(cfg.seed + 0xD80), guard["count"])
            rng = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
        (value, aux), grads = jax.value_and_grad(obj.objective, has_aux=True)(
            params, net, x, y, loss=cfg.loss, C=cfg.C, grad=cfg.grad, rule=cfg.op_rule,
            label_smoothing=cfg.label_smoothing, compute_dtype=cfg.compute_dtype, state=state,
            axis_name=parallel.AXIS, rng=rng)
        new_state = aux.pop("state")  # the same on every device: the statistics are synchronised
        # The mean over devices of the shard means is the whole batch's objective and gradient.
        value, grads, aux = parallel.combine(mesh, value, grads, aux)
        layer_norms = [optax.tree.norm(grads[name]) for name in sorted(grads)]  # for metrics.csv
        aux["grad_norms"] = jnp.stack([optax.tree.norm(grads), *layer_norms])
        grad_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
        ok = jnp.isfinite(value) & jnp.all(grad_finite)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        first_bad = ~ok & (guard["bad"] < 0)
        apply = ok if skip else ok & (guard["bad"] < 0)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(apply, a, b), new, old)
        guard = {
            "count": guard["count"] + 1,
            "bad": jnp.where(first_bad, guard["count"], guard["bad"]),
            "skipped": guard["skipped"] + (~ok).astype(jnp.int32),
            "finite": jnp.where(first_bad, aux["finite"], guard["finite"]),
            "grad_finite": jnp.where(first_bad, grad_finite, guard["grad_finite"]),
        }
        return keep(new_params, params), keep(new_opt_state, opt_state), keep(new_state, state), guard, value, aux

    batch = P(parallel.AXIS)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(), batch, batch), out_specs=P(),
                            check_vma=False)  # see jaxcnn.parallel: gradients are averaged explicitly
    return jax.jit(sharded, donate_argnums=(0, 1, 2, 3))


def _guard(net: Sequential, params: dict, count: int = 0, skipped: int = 0) -> dict:
    return {"count": jnp.asarray(count, jnp.int32), "bad": jnp.asarray(-1, jnp.int32),
            "skipped": jnp.asarray(skipped, jnp.int32), "finite": jnp.ones(len(net.layers), bool),
            "grad_finite": jnp.ones(len(jax.tree_util.tree_leaves(params)), bool)}


def _nan_message(net: Sequential, params: dict, guard: dict, steps: int, cfg: TrainConfig) -> str:
    bad = int(guard["bad"])
    epoch, within = bad // steps + 1, bad % steps + 1
    layers = [i for i, ok in enumerate(guard["finite"]) if not ok]
    paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    grads = [p for p, ok in zip(paths, guard["grad_finite"]) if not ok]
    where = (f"layer {layers[0]} ({describe(net.layers[layers[0]])}) was the first to output NaN or Inf"
             if layers else "every layer's output was finite, the loss or backward pass was not (an overflow, "
             "or a label outside [0, K))")
    return (f"non-finite objective or gradient at step {bad + 1} (epoch {epoch}, step {within} of {steps}): "
            f"{where}; non-finite gradients: {', '.join(grads) or 'none'}. Training stopped; the last checkpoint "
            f"written before it is kept. Lower --lr (now {cfg.lr}), set --C, or pass --on-nan skip")


def _state(pos: Position, current: tuple, best: tuple, prep: Prepared, cfg: TrainConfig, net: Sequential,
           steps: int) -> tuple[int, dict, dict]:
    """A training state as (global step, arrays, meta) for ``checkpoint.save_state``: ``current`` is (params,
    optimizer state, network state), ``best`` (params, network state) of the best epoch so far."""
    global_step = (pos.epoch - 1) * steps + pos.step
    params, opt_state, state = parallel.to_host(current)
    opt_leaves = jax.tree_util.tree_leaves(opt_state)
    arrays = {"params": params, "opt": {str(i): leaf for i, leaf in enumerate(opt_leaves)},
              "best": best[0] or {}, "preprocess": {"mean": prep.mean}}
    if state:  # batch norm's running averages, now and at the best epoch
        arrays.update(state=state, best_state=best[1] or {})
    meta = {"position": dataclasses.asdict(pos), "train": dataclasses.asdict(cfg), "network": net.to_config(),
            "dataset": prep.name, "steps_per_epoch": steps}
    return global_step, arrays, meta


def _restore(resume: tuple, params, opt_state, state, prep: Prepared):
    """Params, optimizer state, network state, best params, best state and position from a training state
    (arrays, meta)."""
    arrays, meta = resume
    if not np.array_equal(arrays["preprocess"]["mean"], prep.mean):
        raise ValueError("the training data differ from those this run started with (another mean image): "
                         "resume with the same dataset and --data-dir")
    template = jax.tree_util.tree_leaves(opt_state)
    saved = arrays.get("opt", {})
    if len(saved) != len(template):
        raise ValueError(f"the saved optimizer state has {len(saved)} arrays, this recipe's has {len(template)}")
    opt_leaves = [jnp.asarray(saved[str(i)], t.dtype) for i, t in enumerate(template)]
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(opt_state), opt_leaves)
    like = lambda template, saved: jax.tree_util.tree_map(lambda t, a: jnp.asarray(a, t.dtype), template, saved)
    params = like(params, arrays["params"])
    if state:
        state = like(state, arrays["state"])
    best = arrays.get("best") or None
    best_state = arrays.get("best_state") or {}
    return params, opt_state, state, best, best_state, Position(**meta["position"])


def make_evaluator(net: Sequential, cfg: TrainConfig, largest: int, max_batch: int = 1000, mesh=None):
    """``evaluate(params, x, y, state=None) -> {"loss", "accuracy"}`` over a whole split, in fixed-size padded
    batches (one compilation for every split), each batch split over ``mesh`` (default: all local devices), in
    evaluation mode (batch norm with ``state``'s running averages)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    size = -(-max(1, min(max_batch, largest)) // mesh.size) * mesh.size

    def local(params, state, x, y, mask):
        logits = net.apply(obj.cast(params, cfg.compute_dtype), obj.cast(x, cfg.compute_dtype), grad=cfg.grad,
                           rule=cfg.op_rule, state=state if net.stateful else None)
        losses = obj.per_example_loss(logits, y, cfg.loss)  # float32 at least (the loss ops)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == y) * mask)
        total = lax.psum(jnp.stack([jnp.sum(losses * mask), correct.astype(losses.dtype)]), parallel.AXIS)
        return total[0], total[1]  # one collective per program (see parallel.combine)

    batch = P(parallel.AXIS)
    batch_stats = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), batch, batch, batch), out_specs=P(),
                                        check_vma=False))

    def evaluate(params, x: np.ndarray, y: np.ndarray, state: dict | None = None) -> dict:
        params, state = parallel.replicate(mesh, (params, state or {}))
        totals = []
        for start in range(0, len(x), size):
            xb, yb = x[start:start + size], y[start:start + size]
            pad = size - len(xb)
            mask = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
            totals.append(batch_stats(params, state, *parallel.global_batch(mesh, np.arange(size), xb, yb, mask)))
            parallel.pace(mesh, totals)
        loss, correct = np.sum(np.asarray(parallel.to_host(totals), np.float64), axis=0)
        return {"loss": float(loss) / len(x), "accuracy": float(correct) / len(x)}

    return evaluate


def run(net: Sequential, cfg: TrainConfig, out: str | Path, *, recipe: str, progress: bool = True,
        log: Callable[[str], None] = print, checkpoint_every: int = 0, on_nan: str = "stop", keep: int = 3,
        resume_from: tuple | None = None, devices: int | None = None, log_every: float | None = None,
        log_steps: int = 0, tensorboard: bool = False) -> dict:
    """Load the data, train, and write to ``out``: metrics.jsonl, model.safetensors (best params), training states
    in checkpoints/ (every epoch and every ``checkpoint_every`` steps, the newest ``keep``), then summary.json
    and curves.png. With several processes, all train and process 0 alone logs and writes.

    ``out`` must not hold another run (nothing a user saved is overwritten); ``resume_run`` continues one.
    ``run.json`` names the run (recipe, dataset, network, training config) from its start, and says
    ``"complete": true`` once every file is written: that is the last write. ``log_every`` seconds: also log a
    progress line that often within an epoch (``fit``'s ``heartbeat``), for logs without a terminal.
    ``log_steps`` k > 0: ``metrics.csv`` gets every k-th step's objective, learning rate and gradient norms.
    ``tensorboard``: the same step rows and every epoch's metrics also as TensorBoard event files in
    ``out/tensorboard/`` (``jaxcnn.tensorboard``; needs tensorboardX).
    """
    out = Path(out)
    main = parallel.is_main()
    if not main:
        log, progress = (lambda message: None), False
    started = any((out / name).exists() for name in (MANIFEST, "summary.json", "model.safetensors")) or \
        list_states(out / "checkpoints")
    if resume_from is None and started:
        raise FileExistsError(f"{out} already holds a run; choose another --out, or pass --resume to continue "
                              f"an unfinished one")
    if tensorboard:
        tb.require()
    if main:
        remove_stale_temporaries(out)
    begin = time.perf_counter()
    mesh = parallel.make_mesh(devices)
    parallel.check_batch(cfg.batch_size, mesh)
    dataset = datasets.load(cfg.dataset, cfg.data_dir, download=cfg.download, progress=progress)
    prep = prepare(dataset, cfg)
    check_network(net, prep.input_shape, prep.classes)
    check_batch_size(cfg, len(prep.x_fit))
    if cfg.rule == "auto":  # before run.json is written: it records the rules chosen, and --resume reuses them
        net = tuned(net, prep, cfg, devices, log, progress=progress)
    # for the record: what layers without a rule of their own use
    rule = "auto" if cfg.rule == "auto" else resolve_rule("train", cfg.rule, None)[0]
    log(f"{recipe} on {prep.name}: {len(prep.x_fit)} training, {len(prep.x_val)} validation, "
        f"{len(prep.x_test)} test images {'x'.join(map(str, prep.input_shape))}; "
        f"{net.num_params(prep.input_shape):,} parameters; grad={cfg.grad}, rule={rule}, precision={cfg.precision}; "
        f"{mesh.size} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); malloc: "
        f"{_malloc.allocator()}")
    if cfg.optimizer == "newton":
        from jaxcnn.newton import objective_c, store_plan

        log(f"newton: {cfg.iterations} iterations, loss {cfg.loss}, C = {objective_c(cfg, len(prep.x_fit)):g}"
            f"{'' if cfg.C is not None else ' (0.01 l, simpleNN)'}, Gauss-Newton subsample "
            f"{math.ceil(cfg.gn_fraction * len(prep.x_fit))} examples, CG to {cfg.cg_tol:g} ||g|| or "
            f"{cfg.cg_max} iterations, lambda from {cfg.damping:g}; "
            f"{store_plan(net, cfg, prep.input_shape, len(prep.x_fit))[1]}")
    meta = {"recipe": recipe, "dataset": prep.name, "classes": prep.classes,
            "input_shape": list(prep.input_shape), "train": dataclasses.asdict(cfg)}
    if main and not (out / MANIFEST).exists():
        atomic_write(out / MANIFEST, strict_json({**identity(recipe, prep.name, net.to_config(), cfg),
                                                  "complete": False}, indent=2) + "\n")
    history: list[dict] = list(resume_from[1]["position"]["history"]) if resume_from else []

    steps_per_epoch = len(prep.x_fit) // cfg.batch_size
    idle: list[int] = []  # epochs whose every step was skipped (--on-nan skip): nothing trained in them

    epoch_end = (lambda epoch: epoch) if cfg.optimizer == "newton" else (lambda epoch: epoch * steps_per_epoch)
    board = None
    if tensorboard and main:
        board = tb.Board(out / "tensorboard", resume_from and resume_from[1]["global_step"])
        if resume_from and history and epoch_end(history[-1]["epoch"]) == resume_from[1]["global_step"]:
            board.epoch(history[-1], epoch_end(history[-1]["epoch"]))  # a kill may have come before it was logged

    def on_epoch(record, best_params, improved, best_state):
        before = history[-1].get("skipped_steps", 0) if history else 0
        history.append(record)
        if "skipped_steps" in record and record["skipped_steps"] - before >= steps_per_epoch:
            idle.append(record["epoch"])
        if not main:
            return
        if board is not None:
            board.epoch(record, epoch_end(record["epoch"]))
        atomic_write(out / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in history))
        if improved:
            save_model(out / "model.safetensors", net, best_params, prep.mean, {**meta, "epoch": record["epoch"]},
                       state=best_state)
        val = (f"  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2%}"
               if "val_loss" in record else "")
        if "cg_iterations" in record:  # a Newton iteration
            log(f"iter {record['iteration']:>3}/{cfg.iterations}  f {record['train_objective']:.5g}  "
                f"|g| {record['gradient_norm']:.2e}  CG {record['cg_iterations']:>3}  lambda {record['lambda']:.3g}  "
                f"step {record['step_size']:.3g}  train acc {record['train_accuracy']:.2%}{val}  "
                f"{record['seconds']:.1f}s{'  *' if improved else ''}")
            return
        skipped = f"  ({record['skipped_steps']} steps skipped)" if record["skipped_steps"] else ""
        log(f"epoch {record['epoch']:>3}/{cfg.epochs}  train f {record['train_objective']:.4f} "
            f"acc {record['train_accuracy']:.2%}{val}  {record['seconds']:.1f}s{'  *' if improved else ''}{skipped}")
        if idle and idle[-1] == record["epoch"]:
            log(f"WARNING: every one of epoch {record['epoch']}'s {steps_per_epoch} steps was skipped (non-finite "
                f"objective or gradient): nothing trained in it")

    step_rows = _resumed_rows(out / "metrics.csv", resume_from)

    def on_steps(rows):
        step_rows.extend(rows)
        if main:
            atomic_write(out / "metrics.csv", _csv(step_rows))
        if board is not None:
            board.steps(rows)

    def checkpoint(state):
        if not main:
            return
        global_step, arrays, state_meta = state
        save_state(out / "checkpoints", global_step, arrays,
                   {**state_meta, "recipe": recipe, "checkpoint_every": checkpoint_every, "on_nan": on_nan,
                    "keep": keep}, keep=keep)

    try:
        result = fit(net, prep, cfg, on_epoch=on_epoch, progress=progress, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, on_nan=on_nan,
                     resume=resume_from and (resume_from[0], resume_from[1]), devices=devices,
                     heartbeat=log if log_every else None, every=log_every or 0.0, on_steps=on_steps,
                     log_steps=log_steps if cfg.optimizer != "newton" else 0)
    finally:
        if board is not None:
            board.close()
    seconds = time.perf_counter() - begin
    summary = {"test_accuracy": result.test["accuracy"], "test_loss": result.test["loss"], "epochs": cfg.epochs,
               "best_epoch": result.best_epoch, "seconds": seconds, "grad": cfg.grad, "rule": rule,
               "recipe": recipe, "dataset": prep.name, "skipped_steps": result.skipped, "resumed": bool(resume_from),
               "device": jax.devices()[0].device_kind, "devices": mesh.size, "processes": jax.process_count(),
               "jax": jax.__version__, "versions": versions(), "allocator": _malloc.allocator(),
               "train": dataclasses.asdict(cfg),
               "network": net.to_config(),
               "conv_rules": conv_rules(net, resolve_rule("train", cfg.op_rule, None)[0])}
    if main:
        save_model(out / "model.safetensors", net, result.params, prep.mean,
                   {**meta, "epoch": result.best_epoch, "test": result.test}, state=result.state)
        atomic_write(out / "summary.json", strict_json(summary, indent=2) + "\n")
        complete(out, history, result.step_losses)
    unit = "iteration" if cfg.optimizer == "newton" else "epoch"
    log(f"test accuracy {result.test['accuracy']:.2%}, loss {result.test['loss']:.4f} (best validation {unit} "
        f"{result.best_epoch}); {seconds:.0f}s{' since resuming' if resume_from else ' in all'}; results in {out}/")
    if not math.isfinite(result.test["loss"]):
        raise NonFiniteError(f"the run finished, but the best model's test loss is {result.test['loss']} (its "
                             f"outputs overflow); {out / 'summary.json'} records it as null under non_finite")
    if idle:
        raise NonFiniteError(f"the run finished, but every step of epoch(s) {', '.join(map(str, idle))} was skipped "
                             f"(--on-nan skip: non-finite objective or gradient), so nothing trained in them; "
                             f"see skipped_steps in {out / 'metrics.jsonl'}")
    return summary


def _csv(rows: list[dict]) -> str:
    """Rows of equal keys as CSV text (header first)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _resumed_rows(path: Path, resume_from: tuple | None) -> list[dict]:
    """The rows of ``metrics.csv`` a resumed run keeps: those of the steps up to its training state's."""
    import csv

    if resume_from is None or not path.is_file():
        return []
    done = resume_from[1]["global_step"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [row for row in rows if row.get("step", "").isdigit() and int(row["step"]) <= done]


def versions() -> dict[str, str]:
    """The versions of the packages a run's numbers depend on (for summary.json)."""
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
            "numpy": np.__version__}


MANIFEST = "run.json"
STATE_KEYS = ("train", "network", "dataset", "recipe", "position", "steps_per_epoch", "checkpoint_every", "on_nan",
              "keep")  # what resume_run reads from a training state


def identity(recipe: str, dataset: str, network: dict, cfg) -> dict:
    """What makes a run the run it is: a training state must match all of it to be resumed from."""
    train_config = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    return {"recipe": recipe, "dataset": dataset, "network": network, "train": train_config}


def complete(out: Path, history: list[dict], step_losses=None) -> None:
    """Write what a finished run lacks after its summary (the curves), then mark it complete, last."""
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    summary = json.loads((out / "summary.json").read_text())
    if not history and (out / "metrics.jsonl").is_file():
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plot_curves(history, out / "curves.png", title=f"{summary['recipe']} on {summary['dataset']}, "
                f"grad={summary['grad']}", best=summary.get("best_epoch"), step_losses=step_losses)
    manifest = {**identity(summary["recipe"], summary["dataset"], summary["network"], summary["train"]),
                **manifest, "complete": True}
    atomic_write(out / MANIFEST, strict_json(manifest, indent=2) + "\n")


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of writes that a kill cut short (``.<name>.*.tmp``, see jaxcnn._io)."""
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for stale in folder.glob(".*.tmp"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)


def length_key(train_config: dict) -> str:
    """The field of a training config that says how long the run is: epochs, or iterations for newton."""
    return "iterations" if train_config.get("optimizer") == "newton" else "epochs"


def resume_run(out: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
               devices: int | None = None, log_every: float | None = None, log_steps: int = 0,
               extend_to: int | None = None, unit: str | None = None, tensorboard: bool = False) -> dict:
    """Continue the run in ``out`` from its newest intact training state, with the recipe, network and options
    it was started with. A damaged newest state is reported and the one before it used.

    ``extend_to`` N: make the run N epochs long (N iterations with the newton optimizer; ``unit``, if given, says
    which the caller means), more than it was started with, whether it finished or stopped. A finished run's
    summary.json is kept as ``summary-epoch-<M>.json`` (M: the length it had) and run.json lists the extension.
    With a constant learning rate the extended run is the run that N epochs from the start would have been; a cosine
    or step schedule is stretched to the new length, so the learning rate from the next step on differs from the old
    schedule's.
    """
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if extend_to is not None:
        if manifest is None:  # a run from before run.json existed
            raise ValueError(f"{out}: no {MANIFEST}, so the run's length cannot be changed; resume it as it was")
        manifest = _extend(out, manifest, extend_to, unit, log)
    if (out / "summary.json").is_file():
        if manifest is None or not manifest.get("complete"):  # killed between summary.json and the last write
            remove_stale_temporaries(out)
            complete(out, [])
            log(f"{out}: training had finished; wrote what the run lacked (curves.png) and marked it complete")
        else:
            length = length_key(manifest["train"])
            log(f"{out} holds a finished run ({MANIFEST} says complete): nothing to resume; to train it longer, "
                f"pass --{length} larger than {manifest['train'][length]}")
        return json.loads((out / "summary.json").read_text())

    def same_run(train_config: dict) -> dict:  # an extended run's states before the extension have the old length
        return {k: v for k, v in train_config.items() if k != length_key(train_config)}

    def belongs(meta: dict) -> str | None:
        missing = [key for key in STATE_KEYS if key not in meta]
        if missing:
            return f"its metadata lacks {', '.join(missing)} (not a state written by `jaxcnn train`)"
        if manifest is None:
            return None
        theirs = identity(meta.get("recipe"), meta.get("dataset"), meta.get("network"), same_run(meta.get("train")))
        ours = {**manifest, "train": same_run(manifest.get("train", {}))}
        differ = [key for key in theirs if theirs[key] != ours.get(key)]
        return f"its {' and '.join(differ)} differ from {MANIFEST}'s: it is not of this run" if differ else None

    found = newest_state(out / "checkpoints", report=log, reject=belongs)
    if found is None:
        raise FileNotFoundError(f"{out / 'checkpoints'}: no training state of this run to resume from (a run "
                                f"writes one at the end of every epoch, and every --checkpoint-every steps)")
    arrays, meta, path = found
    length = length_key(meta["train"])
    cfg = TrainConfig(**{**meta["train"], length: (manifest or meta)["train"][length]})
    net = Sequential.from_config(meta["network"], source=str(path))
    position = meta["position"]
    if cfg.optimizer == "newton":
        log(f"resuming {out} from {path.name}: Newton iteration {position['epoch']} of {cfg.iterations} next")
    else:
        log(f"resuming {out} from {path.name}: epoch {position['epoch']}, {position['step']} of "
            f"{meta['steps_per_epoch']} steps done")
    return run(net, cfg, out, recipe=meta["recipe"], progress=progress, log=log,
               checkpoint_every=meta["checkpoint_every"], on_nan=meta["on_nan"], keep=meta["keep"],
               resume_from=(arrays, meta), devices=devices, log_every=log_every, log_steps=log_steps,
               tensorboard=tensorboard)


def _extend(out: Path, manifest: dict, extend_to: int, unit: str | None, log: Callable[[str], None]) -> dict:
    """Record in run.json that the run in ``out`` is now ``extend_to`` epochs (or iterations) long; a finished
    run's summary.json is renamed first (so that a kill in between leaves a run to resume, not a finished one)."""
    length = length_key(manifest["train"])
    before = manifest["train"][length]
    if unit not in (None, length):
        raise ValueError(f"--{unit}: {out} is a run of the {manifest['train']['optimizer']} optimizer, whose length "
                         f"is in {length}: pass --{length}")
    if isinstance(extend_to, bool) or not isinstance(extend_to, int) or extend_to < before:
        raise ValueError(f"--{length} {extend_to}: {out} is a run of {before} {length}; --resume can make it longer "
                         f"(--{length} > {before}), not shorter")
    if extend_to == before:
        return manifest
    if (out / "summary.json").is_file():
        if not manifest.get("complete"):
            complete(out, [])  # finish what the run lacked before changing it
        kept = out / f"summary-{'iteration' if length == 'iterations' else 'epoch'}-{before}.json"
        os.replace(out / "summary.json", kept)
        log(f"extending the finished run in {out} from {before} to {extend_to} {length} (its summary kept as "
            f"{kept.name})")
    else:
        log(f"extending the run in {out} from {before} to {extend_to} {length}")
    if manifest["train"].get("schedule", "constant") != "constant":
        log(f"note: the {manifest['train']['schedule']} learning-rate schedule now spans {extend_to} {length}: "
            f"from the next step on the learning rate follows it, not the schedule the run started with")
    manifest = {**manifest, "train": {**manifest["train"], length: extend_to}, "complete": False,
                "extended": [*manifest.get("extended", []), {"from": before, "to": extend_to}]}
    atomic_write(out / MANIFEST, strict_json(manifest, indent=2) + "\n")
    return manifest


def plot_curves(history: list[dict], path: Path, title: str, best: int | None = None,
                step_losses=None) -> None:
    """Loss and accuracy per epoch (training and validation; a marker on every point, the best epoch ringed),
    and, given ``step_losses``, the objective of every step, as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = np.asarray([] if step_losses is None else step_losses, np.float64)
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3 if steps.size else 2, figsize=(15 if steps.size else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot(epochs, [r["train_objective"] for r in history], "o-", label="train objective f")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    if history and "val_loss" in history[0]:
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation loss")
        ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "s-", label="validation")
        chosen = [r for r in history if r["epoch"] == best]
        if chosen:
            ax_acc.plot([best], [chosen[0]["val_accuracy"]], "o", markersize=14, markerfacecolor="none",
                        markeredgecolor="black", label=f"best (epoch {best}, kept)")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # a one-epoch run shows its points mid-plot
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if steps.size:
        finite = np.isfinite(steps)
        axes[2].plot(np.flatnonzero(finite) + 1, steps[finite], linewidth=0.7, label="objective f per step")
        axes[2].set(xlabel="step", ylabel="objective", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
