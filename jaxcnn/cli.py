"""The ``jaxcnn`` command: train, evaluate, gradcheck, bench, presets, demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

from jaxcnn import data as datasets
from jaxcnn import network, train

DEFAULT_PRESET = {"digits": "digits-cnn", "mnist": "simplenn-mnist", "fashion-mnist": "simplenn-mnist",
                  "cifar10": "simplenn-cifar", "svhn": "simplenn-cifar"}
INPUT_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion-mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "svhn": (32, 32, 3)}
DEFAULTS = train.TrainConfig()


def dataset_of(config: dict) -> str:
    """The dataset a network config trains on (its [train] table), or the default."""
    return config.get("train", {}).get("dataset", DEFAULTS.dataset)


def input_shape(preset: str) -> tuple[int, int, int]:
    """(H, W, C) of the images a preset is made for."""
    return INPUT_SHAPES[dataset_of(network.preset_config(preset))]


def shape_arg(text: str) -> tuple[int, int, int]:
    """``HxWxC`` (or ``H,W,C``) as a shape of three positive ints."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected HxWxC of three positive ints, e.g. 28x28x1; got {text!r}")
    return shape  # type: ignore[return-value]


class Help(argparse.HelpFormatter):
    """Each option's default said once: appended where its help does not state it already, and never for flags
    (on when given) or options whose default is None (the help says what applies then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or any(action.default is v for v in (None, False, True)) or
                action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(package: str) -> str:
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    return f"jaxcnn {of('jaxcnn')} (jax {of('jax')}, jaxlib {of('jaxlib')}, optax {of('optax')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcnn",
        description="Convolutional networks in JAX with hand-derived backward passes, checked against jax.grad.",
    )
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = commands.add_parser(
        "train", help="train a network (default: a small CNN on the bundled 8x8 digits, offline)",
        description="Train a preset or a TOML-configured network with Lin's objective. Flags override the "
                    "preset's [train] recipe; `jaxcnn presets` lists the presets. Writes metrics.jsonl, "
                    "model.safetensors, summary.json and curves.png to --out.",
        formatter_class=Help, argument_default=None)
    which = t.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=list(network.presets()),
                       help="bundled network and recipe (default: the dataset's usual one, digits-cnn for digits)")
    which.add_argument("--config", metavar="FILE.toml", help="a network described in TOML ([[layers]] and [train])")
    t.add_argument("--dataset", choices=datasets.DATASETS, help=f"default: the recipe's, else {DEFAULTS.dataset}")
    t.add_argument("--data-dir", metavar="DIR", help=f"folder holding <dataset>/ files (default {DEFAULTS.data_dir})")
    t.add_argument("--download", action="store_true", default=None,
                   help="download missing dataset files (checked against their SHA-256)")
    t.add_argument("--epochs", type=int, metavar="N", help="passes over the training set (default: the recipe's)")
    t.add_argument("--batch-size", type=int, metavar="B",
                   help="examples per step, split over the devices (default: the recipe's)")
    t.add_argument("--optimizer", choices=train.OPTIMIZERS,
                   help="optax's sgd, momentum, adam or adamw, or simpleNN's Newton method (default: the recipe's)")
    t.add_argument("--lr", type=float, metavar="LR", help="learning rate (default: the recipe's)")
    t.add_argument("--momentum", type=float, help="for --optimizer momentum (default 0.9)")
    t.add_argument("--schedule", choices=train.SCHEDULES, help="learning-rate schedule (default constant)")
    t.add_argument("--warmup", type=int, metavar="STEPS",
                   help="linear learning-rate warmup from 0 over STEPS steps, then the schedule (default 0)")
    t.add_argument("--weight-decay", type=float, metavar="WD",
                   help="--optimizer adamw: decoupled weight decay (default optax's 1e-4)")
    t.add_argument("--label-smoothing", type=float, metavar="EPS",
                   help="train on the targets (1 - EPS) onehot + EPS / K; the reported losses stay the plain ones "
                        "(default 0)")
    t.add_argument("--augment", metavar="KINDS",
                   help="augment each training batch on the device: crop (random crop of the zero-padded image), "
                        "flip (left-right), crop,flip, or standard (crop, plus flip unless the dataset holds "
                        "digits); seeded by --seed and the step, so a resumed run draws the same (default: none)")
    t.add_argument("--crop-padding", type=int, metavar="P",
                   help="zeros around the image for --augment crop (default: an eighth of its side, 4 for 32x32)")
    t.add_argument("--clip-norm", type=float, metavar="NORM",
                   help="clip each step's gradient to this global norm (default: no clipping)")
    t.add_argument("--loss", choices=["ce", "squared"],
                   help="softmax cross-entropy or Lin's squared loss (default ce; squared with --optimizer newton)")
    t.add_argument("--iterations", type=int, metavar="N",
                   help="--optimizer newton: Newton iterations, each a full pass (default 100)")
    t.add_argument("--gn-fraction", type=float, metavar="F",
                   help="--optimizer newton: share of the training set in each Gauss-Newton subsample, in (0, 1] "
                        "(default 0.05)")
    t.add_argument("--cg-tol", type=float, metavar="T",
                   help="--optimizer newton: CG stops at ||r|| <= T ||g|| (default 0.1) ...")
    t.add_argument("--cg-max", type=int, metavar="N", help="... or after N CG iterations (default 250)")
    t.add_argument("--damping", type=float, metavar="LAMBDA",
                   help="--optimizer newton: Levenberg-Marquardt's lambda at the start (default 1)")
    t.add_argument("--C", type=float, help="regularisation: f = ||theta||^2 / (2C) + mean loss (default: off; "
                   "0.01 x training examples with --optimizer newton)")
    t.add_argument("--grad", choices=["hand", "autodiff", "tangent"],
                   help="gradient mode of every layer (default hand; tangent: JAX transposes the hand tangent rules)")
    t.add_argument("--precision", choices=list(train.PRECISIONS),
                   help="bf16: mixed precision, every layer's forward and hand backward in bfloat16 on float32 "
                        "master params, the loss, gradients and optimizer in float32 (default fp32)")
    t.add_argument("--rule", choices=["im2col", "flip", "auto"],
                   help="hand rule of the convolutions (default auto: the fastest for this network, timed on this "
                        "machine once and cached; a step under 1 GFLOP, too small for timing to pay, takes im2col on "
                        "CPU and flip on GPU/TPU)")
    t.add_argument("--rule-memory-mb", type=float, metavar="MB",
                   help="--rule auto: choose among the candidates whose compiled step needs at most MB MiB of "
                        "temporary memory, as cuDNN's workspace limit (the lightest if none does; default: no limit)")
    t.add_argument("--fuse", action="store_true", default=None,
                   help="use Lin's fused conv-ReLU-pool block where possible")
    t.add_argument("--seed", type=int,
                   help="seed of the initial weights, validation split and batch order (default 0)")
    t.add_argument("--val-fraction", type=float, metavar="F", help="share of training data held out (default 0.1)")
    t.add_argument("--out", metavar="DIR", help="results folder (default runs/<recipe>-<dataset>-<time>)")
    t.add_argument("--resume", action="store_true", default=None,
                   help="continue the unfinished run in --out from its newest intact checkpoint, with the recipe "
                        "it was started with; with --epochs N (--iterations N for newton) larger than before, also "
                        "a finished run, made N long")
    t.add_argument("--checkpoint-every", type=int, metavar="STEPS", default=0,
                   help="also save the training state every STEPS steps (it is always saved after each epoch)")
    t.add_argument("--keep-checkpoints", type=int, metavar="K", default=3, help="training states kept")
    t.add_argument("--on-nan", choices=["stop", "skip"], default="stop",
                   help="on a NaN or Inf objective or gradient: stop (keeping the last good checkpoint) or skip "
                        "the step and count it")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bars or progress lines (epoch lines are still printed)")
    t.add_argument("--log-steps", type=int, default=10, metavar="K",
                   help="write every K-th step's objective, learning rate and gradient norms (global and per "
                        "layer) to metrics.csv; 0: none")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write the --log-steps rows and every epoch's metrics as TensorBoard event files in "
                        "<out>/tensorboard/ (needs tensorboardX: pip install 'jaxcnn[tensorboard]')")
    t.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="without a terminal (a log file, a batch job), print a progress line this often within an "
                        "epoch: step, loss, speed, time left; 0: never")
    scale = t.add_argument_group("several devices and hosts (data parallel: each batch is split across devices)")
    scale.add_argument("--devices", type=int, metavar="N", help="devices to use on each host (default: all)")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, for a run over several processes (jax.distributed)")
    scale.add_argument("--num-processes", type=int, metavar="P", help="number of processes in the run")
    scale.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. P-1")

    e = commands.add_parser("evaluate", help="reload a trained model and report its test accuracy",
                            description="Evaluate a saved model (a run folder, its model.safetensors, or a training "
                                        "state in its checkpoints/) on the test set of its dataset, with the "
                                        "preprocessing it was trained with.")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run folder, its model.safetensors, or a training state from its checkpoints/")
    e.add_argument("--dataset", choices=datasets.DATASETS, help="default: the dataset it was trained on")
    e.add_argument("--data-dir", default=DEFAULTS.data_dir, metavar="DIR", help="folder holding <dataset>/ files")
    e.add_argument("--download", action="store_true", help="download missing dataset files")

    g = commands.add_parser(
        "gradcheck", help="compare hand, autodiff and finite-difference gradients of a network, layer by layer",
        description="Gradients of the loss of a preset (or TOML) network on a random batch, by each hand rule, by "
                    "autodiff and by float64 finite differences, per parameter and per layer output. "
                    "Disagreements at kinks (ReLU inputs at 0, tied max-pool windows) are reported as expected; "
                    "any other is a genuine mismatch, and the exit status is then 1.",
        formatter_class=Help)
    which = g.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=list(network.presets()), default=DEFAULT_PRESET[DEFAULTS.dataset],
                       help="bundled network to check")
    which.add_argument("--config", metavar="FILE.toml", help="a network described in TOML, instead of --preset")
    g.add_argument("--dtype", choices=["float64", "float32", "bfloat16"], default="float64",
                   help="precision of the hand and autodiff gradients (finite differences are float64)")
    g.add_argument("--rule", choices=["im2col", "flip", "winograd", "both", "all"], default="both",
                   help="hand conv rules to check: both = im2col and flip; all adds winograd (given to the 3x3, "
                        "stride-1 conv layers, the others keeping the backend's default)")
    g.add_argument("--batch", type=int, default=4, help="examples in the random batch")
    g.add_argument("--input-shape", type=shape_arg, metavar="HxWxC",
                   help="image shape, e.g. 28x28x1 (default: that of the dataset the network's config names, "
                        "digits 8x8x1 if none)")
    g.add_argument("--input", choices=["random", "zeros"], default="random",
                   help="zeros plants kinks: with zero biases every ReLU input is 0 and every pool window tied")
    g.add_argument("--loss", choices=["ce", "squared"], default="ce",
                   help="softmax cross-entropy or Lin's squared loss")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, batch and labels")
    g.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    g.add_argument("--precision", nargs="?", const="bfloat16,float16,float32", metavar="DTYPES",
                   help="instead of the agreement check, measure how accurate each gradient mode is in these "
                        "dtypes (comma-separated; bare --precision: bfloat16,float16,float32): each against the "
                        "float64 gradient of the same rounded inputs, end to end, layer by layer and in the forward "
                        "pass (jaxcnn.precision); --rule picks the conv rules, --dtype does not apply; a "
                        "measurement, not a verdict: the exit status is 0")

    bn = commands.add_parser(
        "bench", help="time one training step of a preset: hand rules vs autodiff vs XLA vs Flax (vs PyTorch)",
        description="One jitted training step of a preset, measured side by side in this process: each hand rule, "
                    "the fused block, autodiff through the same forward, autodiff through XLA's convolution, Flax "
                    "(if installed) and PyTorch (if importable). Compile time apart; median, min and max of "
                    "--steps steps timed round-robin; compiled memory; GFLOP/s against a matmul ceiling timed in "
                    "the same rounds.",
        formatter_class=Help)
    bn.add_argument("--preset", choices=list(network.presets()), default="simplenn-mnist", help="network to time")
    bn.add_argument("--batch-size", type=int, default=128, help="examples per step")
    bn.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    bn.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="precision of params, batch and computation")
    bn.add_argument("--no-torch", dest="torch", action="store_false", help="skip PyTorch even if importable")
    bn.add_argument("--tune", action="store_true",
                    help="instead of the step benchmark, time the candidate conv rules on the preset anew and "
                         "store the fastest in the cache that --rule auto reads")
    bn.add_argument("--profile", action="store_true",
                    help="also show where the step's time goes, by op and by layer (jax.profiler): rule='auto' "
                         "against xla autodiff")

    commands.add_parser("presets", help="list the bundled networks")

    d = commands.add_parser("demo", help="run a small conv net forward and backward with every gradient mode "
                                         "and print how far apart the gradients are")
    d.add_argument("--seed", type=int, default=0, help="PRNG seed for the weights and the batch")
    return parser


def safe_name(name: str) -> str:
    """A recipe's name as one folder name under runs/: letters, digits, '.', '-', '_' kept, anything else (a
    '/', '..', spaces) made '_', no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "run"


def resolve(args: argparse.Namespace) -> tuple[network.Sequential, train.TrainConfig, str]:
    """The network, the recipe with the flags applied, and the recipe's name."""
    if args.config:
        config = network.load_toml(args.config)
        net = network.Sequential.from_config(config, source=args.config)
        name = str(config.get("name", Path(args.config).stem))
    else:
        name = args.preset or DEFAULT_PRESET[args.dataset or DEFAULTS.dataset]
        config = network.preset_config(name)
        net = network.preset(name)
    recipe = dict(config.get("train", {}))
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(train.TrainConfig)
             if getattr(args, f.name, None) is not None}
    values = {**recipe, **flags}
    if values.get("optimizer") == "newton" and "loss" not in values:
        values["loss"] = "squared"  # simpleNN's Newton method minimises the squared loss
    cfg = train.TrainConfig.from_dict(values, source=f"{args.config or 'preset ' + name} [train]")
    return (net.fuse() if args.fuse else net), cfg, name


def cmd_train(args) -> int:
    from jaxcnn import parallel

    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    progress = args.progress and sys.stderr.isatty()
    if args.log_every < 0 or args.log_steps < 0:
        raise ValueError(f"--log-every and --log-steps must be >= 0, got {args.log_every} and {args.log_steps}")
    log_every = args.log_every if args.progress and not progress else None  # bars on a terminal, lines elsewhere
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; expected a folder (a new one, or a run's to --resume)")
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        recipe_flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(train.TrainConfig)
                        if getattr(args, f.name, None) is not None and f.name not in ("epochs", "iterations")]
        recipe_flags += [flag for flag, value in (("--preset", args.preset), ("--config", args.config),
                                                  ("--fuse", args.fuse)) if value]
        if recipe_flags:
            raise ValueError(f"--resume continues a run with the recipe it was started with (only --epochs, or "
                             f"--iterations for newton, may make it longer); drop {', '.join(recipe_flags)}")
        if args.epochs is not None and args.iterations is not None:
            raise ValueError("--resume: pass --epochs (first-order optimizers) or --iterations (newton), not both")
        train.resume_run(args.out, progress=progress, devices=args.devices, log_every=log_every,
                         log_steps=args.log_steps, extend_to=args.epochs or args.iterations,
                         unit="epochs" if args.epochs is not None else "iterations", tensorboard=args.tensorboard)
        return 0
    for name in ("checkpoint_every", "keep_checkpoints"):
        if getattr(args, name) < (0 if name == "checkpoint_every" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'checkpoint_every' else '>= 1'}")
    net, cfg, name = resolve(args)
    out = args.out or f"runs/{safe_name(name)}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    train.run(net, cfg, out, recipe=name, progress=progress, checkpoint_every=args.checkpoint_every,
              on_nan=args.on_nan, keep=args.keep_checkpoints, devices=args.devices, log_every=log_every,
              log_steps=args.log_steps, tensorboard=args.tensorboard)
    return 0


def cmd_evaluate(args) -> int:
    from jaxcnn.checkpoint import load_model

    model = load_model(args.checkpoint, states=True)
    missing = [key for key in ("train", "dataset", "recipe", "epoch") if key not in model.meta]
    if missing:
        raise ValueError(f"{args.checkpoint}: the model's metadata lacks {', '.join(missing)}: it was not written "
                         f"by `jaxcnn train`")
    cfg = train.TrainConfig(**{**model.meta["train"], "dataset": args.dataset or model.meta["dataset"]})
    dataset = datasets.load(cfg.dataset, args.data_dir, download=args.download)
    trained_on = tuple(model.meta.get("input_shape", dataset.input_shape))
    if trained_on != tuple(dataset.input_shape):
        raise ValueError(f"{args.checkpoint}: the model was trained on {model.meta['dataset']} images of "
                         f"{'x'.join(map(str, trained_on))}, but {cfg.dataset}'s are "
                         f"{'x'.join(map(str, dataset.input_shape))}; evaluate it on {model.meta['dataset']}")
    train.check_network(model.network, dataset.input_shape, dataset.classes)
    evaluate = train.make_evaluator(model.network, cfg, len(dataset.x_test))
    result = evaluate(model.params, dataset.x_test - model.mean, dataset.y_test, model.state)
    if "global_step" in model.meta:  # a training state
        step, per_epoch = model.meta["global_step"], model.meta.get("steps_per_epoch")
        when = f"training state after step {step}" + (f", {step / per_epoch:.2f} epochs" if per_epoch else "")
    else:
        when = f"epoch {model.meta['epoch']}"
    print(f"{model.meta['recipe']} ({when}) on the {cfg.dataset} test set: "
          f"accuracy {result['accuracy']:.2%} ({result['accuracy']:.6f}), loss {result['loss']:.6f}")
    recorded = model.meta.get("test")
    if recorded and cfg.dataset == model.meta["dataset"]:
        same = abs(recorded["accuracy"] - result["accuracy"]) < 1e-12
        print(f"recorded at the end of training: accuracy {recorded['accuracy']:.6f}, loss {recorded['loss']:.6f}"
              f" ({'reproduced' if same else 'DIFFERENT'})")
    return 0


def cmd_gradcheck(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxcnn import gradcheck
    from jaxcnn._io import atomic_write

    jax.config.update("jax_enable_x64", True)  # finite differences (and --dtype float64) need it
    dtypes = _precision_dtypes(args)
    if args.config:
        config = network.load_toml(args.config)
        net = network.Sequential.from_config(config, source=args.config)
    else:
        config, net = network.preset_config(args.preset), network.preset(args.preset)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.input_shape:
        shape, origin = args.input_shape, "--input-shape"
    else:
        shape, origin = INPUT_SHAPES[dataset_of(config)], f"the input of dataset {dataset_of(config)}"
    net.shapes(shape)  # a network that does not fit the shape is named, layer and shapes, before anything runs
    key_params, key_x, key_y = jax.random.split(jax.random.key(args.seed), 3)
    params = net.init(key_params, shape, dtype=jnp.float64)
    x = (jax.random.normal(key_x, (args.batch, *shape), jnp.float64) if args.input == "random"
         else jnp.zeros((args.batch, *shape), jnp.float64))
    labels = jax.random.randint(key_y, (args.batch,), 0, net.shapes(shape)[-1][0])
    rules = {"both": ("im2col", "flip"), "all": ("im2col", "flip", "winograd")}.get(args.rule, (args.rule,))
    if dtypes:
        return _gradcheck_precision(args, net, params, x, labels, dtypes, rules, shape, origin)
    print(f"gradcheck {net.name}: input {args.batch} x {'x'.join(map(str, shape))} ({origin}), values: {args.input} "
          f"(--input), gradients in {args.dtype} (finite differences in float64), loss {args.loss}, seed {args.seed}"
          "\n")
    report = gradcheck.check_network(net, params, x, labels, loss=args.loss, dtype=args.dtype, rules=rules,
                                     seed=args.seed)
    print(report.table())
    if args.json:
        atomic_write(args.json, report.to_json())
    return 1 if report.mismatches else 0


def _precision_dtypes(args) -> list[str]:
    """The dtypes of ``gradcheck --precision``, checked; [] without the flag."""
    if args.precision is None:
        return []
    dtypes = [d.strip() for d in args.precision.split(",") if d.strip()]
    allowed = ("bfloat16", "float16", "float32", "float64")
    if not dtypes or any(d not in allowed for d in dtypes):
        raise ValueError(f"--precision takes a comma-separated list of {', '.join(allowed)}, got {args.precision!r}")
    if args.dtype != "float64":
        raise ValueError("--dtype does not apply with --precision (name the dtypes there: --precision bfloat16)")
    return dtypes


def _gradcheck_precision(args, net, params, x, labels, dtypes, rules, shape, origin) -> int:
    from jaxcnn import precision
    from jaxcnn._io import atomic_write

    modes = [m for m, (_, rule) in precision.MODES.items() if rule in rules and m != "autodiff first-max"]
    print(f"gradcheck --precision {net.name}: input {args.batch} x {'x'.join(map(str, shape))} ({origin}), values: "
          f"{args.input}, loss {args.loss}, seed {args.seed}; each mode in {', '.join(dtypes)} against the float64 "
          "gradient of the same rounded inputs\n", flush=True)
    report = precision.check_precision(net, params, x, labels, loss=args.loss, dtypes=dtypes, modes=modes)
    print(report.table())
    if args.json:
        atomic_write(args.json, report.to_json())
    return 0


def cmd_bench(args) -> int:
    import jax.numpy as jnp

    from jaxcnn import bench
    from jaxcnn.parallel import make_mesh

    if args.batch_size < 1 or args.steps < 1:
        raise ValueError("--batch-size and --steps must be >= 1")
    shape = input_shape(args.preset)
    if args.tune:
        from jaxcnn import autotune

        print(f"jaxcnn bench --tune: {args.preset} ({'x'.join(map(str, shape))}), batch {args.batch_size}, "
              f"{args.dtype}, on {autotune.machine_key()}")
        autotune.tune(network.preset(args.preset), shape, args.batch_size, jnp.dtype(args.dtype), remeasure=True,
                      progress=True)
        print(f"stored in {autotune.cache_file()}")
        return 0
    print(f"jaxcnn bench: {args.preset} ({'x'.join(map(str, shape))}), batch {args.batch_size}, {args.dtype}, "
          f"{args.steps} steps per variant, on {make_mesh(1).devices.flat[0].device_kind}")
    result = bench.run(args.preset, shape, args.batch_size, steps=args.steps, dtype=jnp.dtype(args.dtype),
                       torch=args.torch, progress=lambda line: print(f"  {line}", flush=True))
    print(f"\n{bench.yardsticks_line(result)}\n")
    print(bench.table(result))
    from importlib.util import find_spec

    if find_spec("flax") is None:
        print("\nno flax row: Flax is not installed (`pip install flax`, or `make bench`, adds the Flax baseline)")
    if args.torch and find_spec("torch") is None:
        print("no pytorch rows: PyTorch is not installed (`pip install torch` adds them; --no-torch hides this)")
    if args.profile:
        by_op, by_layer = bench.profile_auto(args.preset, shape, args.batch_size)
        print("\nXLA's op times per step (jax.profiler, float32), the step of rule='auto' against XLA autodiff, "
              "grouped by the JAX operation they come from:\n")
        print(by_op)
        print("\n... and by layer: each row a layer with parameters and the parameter-free layers after it (ReLU, "
              "pooling), so that a fused block and the layers it replaces share a row; ops that run concurrently "
              "overlap, so the sums can exceed the step:\n")
        print(by_layer)
    return 0


def cmd_presets(args) -> int:
    for name, description in network.presets().items():
        dataset = dataset_of(network.preset_config(name))
        count = network.preset(name).num_params(INPUT_SHAPES[dataset])
        print(f"{name:16s} {count:>9,} params on {dataset:13s} {description}")
    return 0


def deterministic_gpu_kernels() -> None:
    """Ask XLA for deterministic GPU kernels (reductions without atomics, deterministic convolution algorithms),
    so that on a GPU, as on the CPU, a seed gives the same run and a resumed run the same bits as an uninterrupted
    one. Takes effect only before JAX starts its backend; a setting of the flag already in XLA_FLAGS wins (opt out
    with ``XLA_FLAGS=--xla_gpu_deterministic_ops=false``). CPUs are deterministic anyway."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def main(argv: list[str] | None = None) -> int:
    """The ``jaxcnn`` command; run as a program (``argv`` None) it first re-executes itself under tcmalloc where
    that is installed (``jaxcnn._malloc``: 1.2-1.7x faster CPU steps)."""
    if argv is None:
        from jaxcnn import _malloc

        _malloc.reexec_under_tcmalloc()
    args = build_parser().parse_args(argv)
    if args.command in ("train", "evaluate"):
        deterministic_gpu_kernels()
    if args.command == "demo":
        from jaxcnn import demo

        return demo.main(seed=args.seed)
    command = {"train": cmd_train, "evaluate": cmd_evaluate, "gradcheck": cmd_gradcheck, "bench": cmd_bench,
               "presets": cmd_presets}[args.command]
    try:
        return command(args)
    except train.NonFiniteError as err:
        print(f"jaxcnn {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError, FloatingPointError, ImportError) as err:
        print(f"jaxcnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcnn {args.command}: interrupted; files written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
