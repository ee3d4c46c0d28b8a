"""One training step, measured side by side in one process: hand rules, autodiff, XLA's convolution, Flax, PyTorch.

Every variant takes the same step: Lin's objective (softmax cross-entropy) on the same random batch, its gradient,
and an Adam update, jitted (JAX) or run eagerly (PyTorch). For each: compile time, step time (median, min, max of
``steps`` after a warm-up), XLA's compiled memory (temporaries, arguments, outputs), FLOPs counted by hand from
the notes (the three products of each conv layer and of each dense layer: what any implementation must compute),
the achieved GFLOP/s and its share of a matmul ceiling timed in the same rounds, and the time relative to XLA's
own convolution differentiated by autodiff (the baseline every JAX user starts from).

Variants: ``hand im2col`` (with the backend's default ``store_phi``), the same with the other setting of Lin's
space-for-time switch and with phi(pad(Z)) built in blocks (``block="auto"``), ``hand flip``, ``hand fused`` (Lin's
conv-ReLU-pool block with the backend's default rule; and in blocks), ``hand winograd`` (F(2x2, 3x3) for the 3x3,
stride-1 layers; and fused), ``autodiff`` (JAX through our forward), ``xla
autodiff`` (``lax.conv_general_dilated`` + ``lax.reduce_window``), ``flax`` (linen, if installed: ``pip install
jaxcnn[bench]``), ``pytorch`` and ``pytorch channels_last`` (if torch is importable; on the GPU when JAX runs on
one).

Also: ``profile`` (a step's per-op time from ``jax.profiler``, grouped by the JAX operation each op comes from
or by layer),
``pool_times`` (max pooling's gradient alone, hand vs XLA) and ``block_memory`` (the fused block's compiled
temporary memory against XLA's autodiff chain).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxcnn import network as nw
from jaxcnn import objective as obj
from jaxcnn.ops import conv


@dataclass
class Measurement:
    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    compile_s: float | None = None
    temp_mb: float | None = None
    argument_mb: float | None = None
    output_mb: float | None = None
    note: str = ""


def count_flops(net: nw.Sequential, input_shape, batch: int) -> int:
    """FLOPs of one training step's matrix products, counted as in Lin's complexity section: for each conv layer
    W phi(pad(Z)), Delta phi^T and W^T Delta (2 I d_next h h d a_conv b_conv each), for each dense layer the same
    three products. The first layer's W^T Delta (the input gradient) is not needed and not counted. A residual
    block counts its body's layers and its projection."""
    return _count(net, tuple(input_shape), batch, first=True)[0]


def _count(net: nw.Sequential, input_shape, batch: int, first: bool) -> tuple[int, bool]:
    shapes = [tuple(input_shape), *net.shapes(input_shape)]
    total = 0
    for layer, shape_in, shape_out in zip(net.layers, shapes, shapes[1:]):
        if isinstance(layer, nw.Residual):
            proj = layer.shortcut(shape_in)
            body, first_after = _count(layer.body, shape_in, batch, first)
            total += body + (_count(nw.Sequential([proj]), shape_in, batch, first)[0] if proj else 0)
            first = first_after
            continue
        if isinstance(layer, nw.Conv):
            win = layer.geometry(shape_in)
            ho, wo = win.out_hw(shape_in[:2])
            macs = batch * layer.features * win.size[0] * win.size[1] * shape_in[-1] * ho * wo
        elif isinstance(layer, nw.Dense):
            macs = batch * shape_in[-1] * shape_out[-1]
        else:
            continue
        total += 2 * macs * (2 if first else 3)
        first = False
    return total, first


def round_robin(functions: dict[str, tuple[Callable, tuple]], rounds: int, statistic=np.median,
                each_round: Callable[[], object] | None = None) -> dict[str, float]:
    """Median (or another ``statistic`` of the array of times) seconds of each ``name: (f, args)``, every one called
    once to warm up (compile), then all called in turn ``rounds`` times, so that the machine's drift affects them
    alike; ``each_round`` (a progress bar's update) is called after each round."""
    for f, args in functions.values():
        jax.block_until_ready(f(*args))
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, (f, args) in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            seconds[name].append(time.perf_counter() - start)
        if each_round is not None:
            each_round()
    return {name: statistic(np.asarray(s)) for name, s in seconds.items()}


def median_seconds(f: Callable, *args, repeats: int = 10) -> float:
    """Median seconds of ``f(*args)`` after one warm-up call (which compiles a jitted ``f``)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def count_bytes(net: nw.Sequential, input_shape, batch: int, dtype=jnp.float32) -> int:
    """Bytes one training step moves to and from memory, estimated as ``count_flops`` counts products: each
    layer's output (inside residual blocks too) written and read in the forward pass, read again in the backward
    pass, and its cotangent written and read (5 passes); the input read twice (the forward pass and the first
    layer's dW); the params read twice, their gradient written, and Adam reading params, gradient and both
    moments and writing three (10 passes). XLA's fusions can skip some activation passes (an elementwise layer
    fused into its neighbour), im2col's phi(pad(Z)) adds its own: a yardstick for the roofline, not a bound."""
    input_shape = tuple(input_shape)
    size = jnp.dtype(dtype).itemsize
    activations = _activation_elements(net, input_shape)
    return size * (batch * (5 * activations + 2 * math.prod(input_shape)) + 10 * net.num_params(input_shape))


def _activation_elements(net: nw.Sequential, input_shape) -> int:
    total = 0
    for layer, shape_in, shape_out in zip(net.layers, [input_shape, *net.shapes(input_shape)], net.shapes(input_shape)):
        if isinstance(layer, nw.Residual):
            total += _activation_elements(layer.body, shape_in)  # the body's outputs; its last is the join's input
        total += math.prod(shape_out)
    return total


def memory_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """GB/s of a jitted ``x + 1`` over a float32 array of ``megabytes`` on the default device, each byte read once
    and written once (``bandwidth_probe``): the roof for the step's memory traffic (``count_bytes``)."""
    probe, nbytes = bandwidth_probe(megabytes)
    return nbytes / median_seconds(probe, repeats=repeats) / 1e9


def bandwidth_probe(megabytes: int = 256) -> tuple[Callable[[], None], int]:
    """(probe, bytes it moves): each call runs a jitted ``x + 1`` over a float32 array of ``megabytes``, in place
    (the input donated: a fresh output would time the first touch of new pages, 7x slower on the 2-core VM, which
    a training step, reusing its buffers, does not pay)."""
    increment = jax.jit(lambda x: x + 1, donate_argnums=0)
    state = [jax.block_until_ready(increment(jnp.zeros(megabytes * 2**20 // 4, jnp.float32)))]

    def probe() -> None:
        state[0] = jax.block_until_ready(increment(state[0]))

    return probe, 2 * state[0].nbytes


def roofline_ms(flops: int, nbytes: int, ceiling: float, bandwidth: float) -> float:
    """The step's time were it bound only by the matmul ceiling (GFLOP/s) or the memory bandwidth (GB/s)."""
    return 1e3 * max(flops / (ceiling * 1e9), nbytes / (bandwidth * 1e9))


def matmul_ceiling(n: int | None = None, dtype=jnp.float32) -> float:
    """GFLOP/s of an n x n matrix product of random numbers on the default device (``matmul_probe``): the roof
    for the conv products."""
    probe, flops = matmul_probe(n, dtype)
    return flops / median_seconds(probe) / 1e9


def matmul_probe(n: int | None = None, dtype=jnp.float32) -> tuple[Callable[[], None], int]:
    """(probe, its FLOPs): each call runs a jitted n x n matrix product of random numbers. n defaults to 2048 on
    a CPU and 8192 on an accelerator (large enough to fill it). On GPUs XLA's default precision lets float32
    products use TF32 tensor cores: that is the rate measured, and the one the steps get."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    product = jax.jit(lambda a: a @ a)
    return (lambda: jax.block_until_ready(product(a))), 2 * n**3


def pool_times(batch: int = 128, shapes=((28, 28, 32), (14, 14, 64), (7, 7, 64))) -> list[tuple]:
    """(shape, ms XLA, ms hand, ms autodiff) of the gradient of 2x2 max pooling alone, at each input shape
    (simplenn-mnist's three by default): ``lax.reduce_window`` differentiated by JAX, ``max_pool2d`` by the hand
    rule (Delta^T P_pool), and JAX differentiating ``max_pool2d``'s forward."""
    import jaxcnn as jc

    variants = {
        "xla": lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        "hand": lambda x: jc.max_pool2d(x, 2),
        "autodiff": lambda x: jc.max_pool2d(x, 2, grad="autodiff"),
    }
    rows = []
    for shape in shapes:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *shape)), jnp.float32)
        rows.append((shape, *(1e3 * median_seconds(jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2))), x, repeats=20)
                              for f in variants.values())))
    return rows


def xla_apply(net: nw.Sequential, params: dict, x: jax.Array) -> jax.Array:
    """The network written with XLA's own primitives (``lax.conv_general_dilated``, ``lax.reduce_window``,
    ``jax.nn``), as a JAX user would without this library: the autodiff baseline. Each layer runs in the scope
    ``Sequential.forward`` gives it, so that profiles by layer compare like with like."""
    for name, layer, scope in zip(net.names, net.layers, net.scopes):
        with jax.named_scope(scope):
            x = _xla_layer(layer, params[name] if name else {}, x)
    return x


def _xla_layer(layer: nw.Layer, p: dict, x: jax.Array) -> jax.Array:
    if isinstance(layer, nw.Conv):
        win = layer.geometry(x.shape[1:])
        x = lax.conv_general_dilated(x, p["w"], win.stride, win.padding, rhs_dilation=win.dilation,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = x + p["b"] if "b" in p else x
        if isinstance(layer, nw.ConvReLUPool):
            k = layer.pool_geometry().size
            x = lax.reduce_window(jax.nn.relu(x), -jnp.inf, lax.max, (1, *k, 1), (1, *k, 1), "VALID")
        if isinstance(layer, nw.ConvBNReLU):
            bn = nw.BatchNorm(layer.momentum, layer.eps)
            x = jax.nn.relu(_xla_layer(bn, p, x))
    elif isinstance(layer, nw.MaxPool):  # and AvgPool
        win = layer.geometry(x.shape[1:])
        pads = ((0, 0), *win.padding, (0, 0))
        if isinstance(layer, nw.AvgPool):
            x = lax.reduce_window(x, 0.0, lax.add, (1, *win.size, 1), (1, *win.stride, 1), pads)
            x = x / (win.size[0] * win.size[1])
        else:
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, *win.size, 1), (1, *win.stride, 1), pads)
    elif isinstance(layer, nw.Dense):
        x = x @ p["w"] + p["b"] if "b" in p else x @ p["w"]
    elif isinstance(layer, nw.Flatten):
        x = x.reshape(x.shape[0], -1)
    elif isinstance(layer, nw.BatchNorm):  # training mode: the batch's statistics
        axes = tuple(range(x.ndim - 1))
        mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
        x = p["gamma"] * (x - mean) * lax.rsqrt(var + layer.eps) + p["beta"]
    elif isinstance(layer, nw.Residual):
        proj = layer.shortcut(tuple(x.shape[1:]))
        skip = x if proj is None else _xla_layer(proj, p["proj"], x)
        x = xla_apply(layer.body, p, x) + skip
    elif isinstance(layer, nw.Dropout):
        pass  # the identity of evaluation: benchmarks time networks without it
    else:
        x = XLA_ELEMENTWISE[layer.type](x, **layer.settings())
    return x


XLA_ELEMENTWISE = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh,
                   "leaky_relu": jax.nn.leaky_relu, "elu": jax.nn.elu, "gelu": jax.nn.gelu,
                   "softmax": jax.nn.softmax, "global_avg_pool": lambda x: jnp.mean(x, axis=(1, 2))}


def jax_variants(net: nw.Sequential) -> dict[str, Callable]:
    """name -> loss(params, x, y) for the JAX variants that share our params."""
    def ours(n, grad, rule):
        return lambda p, x, y: obj.objective(p, n, x, y, grad=grad, rule=rule)[0]

    fused = net.fuse()
    store = conv.resolve("bench", "im2col", None)[1]  # conv2d's default for the im2col rule on this backend
    variants = {
        "hand im2col": ours(net, "hand", "im2col"),
        f"hand im2col, phi {'recomputed' if store else 'stored'}": ours(net.with_convs(store_phi=not store), "hand",
                                                                        "im2col"),
        "hand im2col, phi in blocks": ours(net.with_convs(block="auto"), "hand", "im2col"),
        "hand flip": ours(net, "hand", "flip"),
        "hand fused": ours(fused, "hand", None) if fused != net else None,
        "hand fused, phi in blocks": ours(fused.with_convs(block="auto"), "hand", "im2col") if fused != net else None,
        "hand winograd": ours(winograd(net), "hand", None) if winograd(net) != net else None,
        "hand fused, winograd": ours(winograd(fused), "hand", None) if fused != net and winograd(net) != net else None,
        "autodiff": ours(net, "autodiff", "im2col"),
        "xla autodiff": lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(xla_apply(net, p, x),
                                                                                        y).mean(),
    }
    return {k: v for k, v in variants.items() if v is not None}


def auto_variant(net: nw.Sequential, input_shape, batch: int, dtype=jnp.float32,
                 log: Callable[[str], None] | None = None) -> tuple[str, Callable]:
    """The step of ``rule="auto"``: its name, "hand auto: <the rules chosen>", and its loss(params, x, y), with
    the rules timed now or read from the cache (``autotune.tune``; ``log`` gets its lines)."""
    from jaxcnn import autotune

    tuned, choice = autotune.tune(net, input_shape, batch, dtype, log=log or (lambda line: None))
    chosen = autotune.label(choice["rule"], choice["store_phi"], choice["block"], choice["fused"])
    return f"hand auto: {chosen}", lambda p, x, y: obj.objective(p, tuned, x, y)[0]


def winograd(net: nw.Sequential) -> nw.Sequential:
    """``net`` with ``rule="winograd"`` for its 3x3, stride-1 conv layers; the others keep the backend's default."""
    return net.with_convs(lambda layer: layer.winograd_applies(), rule="winograd")


class JaxStep:
    """A compiled, jitted Adam step of ``loss`` (compile time and memory measured apart); each call runs one."""

    def __init__(self, loss: Callable, params, x, y):
        tx = optax.adam(1e-3)

        def step(params, opt_state, x, y):
            value, grads = jax.value_and_grad(loss)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        params = jax.tree_util.tree_map(jnp.copy, params)  # donated below: the caller's params stay intact
        opt_state = tx.init(params)
        start = time.perf_counter()
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
        self.compile_s = time.perf_counter() - start
        self.memory = memory(self.compiled)
        self.state, self.batch = (params, opt_state), (x, y)

    def __call__(self) -> None:
        params, opt_state, value = self.compiled(*self.state, *self.batch)
        value.block_until_ready()
        self.state = (params, opt_state)


def op_times(step: JaxStep, steps: int = 5) -> dict[str, list[float]]:
    """XLA's op times of a compiled step from ``jax.profiler``: HLO instruction -> its runs' durations, ms per
    step (an instruction in a loop body runs once per iteration)."""
    step()
    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir)
        for _ in range(steps):
            step()
        jax.profiler.stop_trace()
        traces = sorted(Path(log_dir).rglob("*.trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no trace under {log_dir}")
        with gzip.open(traces[-1]) as f:
            events = json.load(f)["traceEvents"]
    times: dict[str, list[float]] = {}
    for event in events:
        # CPU events carry the HLO instruction's name; GPU kernel events name it in their arguments.
        if event.get("ph") == "X":
            name = event.get("args", {}).get("hlo_op", event.get("name"))
            times.setdefault(name, []).append(event["dur"] / 1e3 / steps)
    return times


def profile(step: JaxStep, steps: int = 5, by: str = "op") -> list[tuple[str, float, int]]:
    """Where a compiled step's time goes: XLA's per-op times (``op_times``) grouped by where each op comes from,
    read from its HLO metadata. ``by="op"``: "forward" or "backward" and the JAX primitive (dot_general for the
    products, slice and concatenate for phi(pad(Z)), select_n for masks and routing); ``by="layer"``: the
    network layer (``Sequential.scopes``: ``0:conv1``, ``3:res1/0:conv1``; ``loss`` outside the layers) and
    "forward" or "backward", or ``update`` for the optimizer's. Returns (group, ms per step, ops per step),
    largest first. Ops that XLA runs concurrently overlap, so the sum can exceed the step."""
    return _grouped(op_times(step, steps), _op_origins(step.compiled.as_text(), by), steps)


def _grouped(times: dict[str, list[float]], origin: dict[str, str], steps: int) -> list[tuple[str, float, int]]:
    groups: dict[str, list[float]] = {}
    for name, durations in times.items():
        if name in origin:
            groups.setdefault(origin[name], []).extend(durations)
    rows = [(group, sum(durations), round(len(durations) / steps)) for group, durations in groups.items()]
    return sorted(rows, key=lambda row: -row[1])


def profile_tables(preset: str, input_shape, batch: int, names=("hand im2col", "xla autodiff"), top: int = 10,
                   seed: int = 0, variants: dict[str, Callable] | None = None) -> tuple[str, str]:
    """Markdown tables of ``profile`` for the named variants of ``preset`` (``jax_variants``, or the given
    ``variants``: name -> loss) side by side (float32), each variant traced once: by op, the ``top`` groups of
    each with their ms per step and share of the summed op time; by layer (``_layer_table``), in the network's
    order, each layer's forward and backward."""
    net = nw.preset(preset)
    params, x, y = _inputs(net, input_shape, batch, jnp.float32, seed)
    variants = variants or jax_variants(net)
    by_op, by_layer, steps = {}, {}, 5
    for name in names:
        step = JaxStep(variants[name], params, x, y)
        times, hlo = op_times(step, steps), step.compiled.as_text()
        by_op[name], by_layer[name] = (_grouped(times, _op_origins(hlo, by), steps) for by in ("op", "layer"))
    if not all(by_op.values()):
        none = f"(the profiler recorded no XLA op events on {jax.default_backend()})"
        return none, none
    return _op_table(by_op, top), _layer_table(by_layer)


def profile_auto(preset: str, input_shape, batch: int, top: int = 10) -> tuple[str, str]:
    """``profile_tables`` of the step ``rule="auto"`` chose (``auto_variant``: from the cache, or timed now)
    against XLA autodiff's: what ``jaxcnn bench --profile`` prints."""
    net = nw.preset(preset)
    auto, loss = auto_variant(net, input_shape, batch)
    variants = {auto: loss, "xla autodiff": jax_variants(net)["xla autodiff"]}
    return profile_tables(preset, input_shape, batch, names=tuple(variants), top=top, variants=variants)


def _op_table(profiles: dict[str, list], top: int) -> str:
    columns = []
    for rows in profiles.values():
        total = sum(ms for _, ms, _ in rows)
        columns.append([f"{group} | {ms:.1f} ({ms / total:.0%})" for group, ms, _ in rows[:top]]
                       + [f"all ops | {total:.1f}"])
    depth = max(map(len, columns))
    lines = ["| " + " | ".join(f"{name}: op | ms" for name in profiles) + " |", "|---|---" * len(profiles) + "|"]
    for i in range(depth):
        lines.append("| " + " | ".join(c[i] if i < len(c) else " | " for c in columns) + " |")
    return "\n".join(lines)


def _layer_table(profiles: dict[str, list]) -> str:
    """One row per layer with parameters, together with the parameter-free layers after it (its ReLU, its
    pooling), so that a fused block and the separate layers it replaces share a row (``_layer_rows``); then the
    loss, the ops XLA added and the optimizer's update, these three in the forward column. A forward and a
    backward column per variant, in ms per step."""
    cells: dict[str, dict[tuple[str, str], float]] = {}
    order: dict[str, tuple] = {}
    for variant, rows in profiles.items():
        scopes = {group.rpartition(" ")[0] for group, _, _ in rows}
        rows_of = _layer_rows(scope for scope in scopes if re.match(r"\d+:", scope))
        for group, ms, _ in rows:
            where, _, part = group.rpartition(" ")
            if group == "update":
                label, key, part = "update (optimizer)", (2,), "forward"
            elif group.startswith("xla "):
                label, key, part = "ops XLA added (no origin)", (2,), "forward"
            else:
                label, key = rows_of.get(where, (where, (1,)))  # not a layer: the loss
            order.setdefault(label, key)
            cell = cells.setdefault(label, {})
            cell[variant, part] = cell.get((variant, part), 0.0) + ms
    header = "| layer | " + " | ".join(f"{v}: forward ms | backward ms" for v in profiles) + " |"
    lines = [header, "|---|" + "---|---|" * len(profiles)]
    for label in sorted(cells, key=lambda label: (order[label], label)):
        values = [cells[label].get((v, part)) for v in profiles for part in ("forward", "backward")]
        lines.append(f"| {label} | " + " | ".join("" if ms is None else f"{ms:.1f}" for ms in values) + " |")
    totals = [sum(ms for _, ms, _ in rows) for rows in profiles.values()]
    lines.append("| all ops | " + " | ".join(f"{total:.1f} |" for total in totals) + " |")
    return "\n".join(lines)


def _layer_rows(scopes) -> dict[str, tuple[str, tuple]]:
    """Scope path (``4:relu``, ``3:res1/1:relu``) -> (its row's label, the row's order key). A layer with
    parameters is its own row, named by its params path (``conv2``, ``res1/conv1``: params names end in their
    count, types never do); a parameter-free layer joins the nearest one before it in the same network, of the
    scopes given (one variant's)."""
    paths = {scope: [(int(i), name) for i, name in (c.split(":", 1) for c in scope.split("/"))] for scope in scopes}
    owners: dict[tuple, list[tuple[int, str]]] = {}  # parent path -> its layers with parameters
    for path in paths.values():
        for depth, (i, name) in enumerate(path):
            if name[-1].isdigit():
                owners.setdefault(tuple(path[:depth]), []).append((i, name))
    rows = {}
    for scope, path in paths.items():
        labels, key = [], []
        for depth, (i, name) in enumerate(path):
            before = [owner for owner in owners.get(tuple(path[:depth]), []) if owner[0] <= i]
            i, name = max(before) if before and not name[-1].isdigit() else (i, name)
            labels.append(name)
            key.append(i)
        rows[scope] = "/".join(labels), (0, *key)
    return rows


def _inputs(net: nw.Sequential, input_shape, batch: int, dtype, seed: int):
    """(params, x, y) for a step of ``net``: initial parameters, a random batch and random labels."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, *input_shape)), dtype)
    y = jnp.asarray(rng.integers(0, net.shapes(input_shape)[-1][-1], batch), jnp.int32)
    return net.init(jax.random.key(seed), input_shape, dtype=dtype), x, y


def _op_origins(hlo: str, by: str = "op") -> dict[str, str]:
    """HLO instruction name -> where it comes from, read from its op_name metadata (``jvp(...)``: the forward
    pass, ``transpose(jvp(...))``: the backward pass, neither: the optimizer's update), or from that of the first
    instruction inside the computation it calls (XLA's fusions and wrappers often carry none themselves):
    "forward|backward|update primitive" (``by="op"``), or "layer forward|backward" or "update" (``by="layer"``,
    the layer from ``Sequential.scopes``). Parameters, and the copies XLA makes of them, are skipped: their
    op_name is the argument's name (``params['conv1']['w']``), not an operation."""
    def label(op_name: str) -> str:
        part = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update"
        if by == "op":
            return f"{part} {op_name.rsplit('/', 1)[-1]}"
        if part == "update":
            return part
        scope = re.search(r"jvp\((\d+:[\w.-]+)\)\)*((?:/\d+:[\w.-]+)*)", op_name)  # nested: res1/conv1
        return f"{scope.group(1) + scope.group(2) if scope else 'loss'} {part}"

    def unlabelled(name: str) -> str:  # an op XLA added (a layout copy, an iota): its name without the number
        return "xla " + re.sub(r"[.]\d+$", "", name)

    inner, calls, origin = {}, {}, {}
    computation = None
    for line in hlo.splitlines():
        if header := re.match(r"(?:ENTRY )?%([\w.-]+) \(", line):
            computation = header.group(1)
        elif instruction := re.match(r"\s*(?:ROOT )?%([\w.-]+) = ", line):
            name, op_name = instruction.group(1), re.search(r'op_name="(jit\([^"]*)"', line)
            if " parameter(" in line:
                continue
            if op_name:
                origin[name] = label(op_name.group(1))
                inner.setdefault(computation, origin[name])
            elif called := re.search(r"calls=%([\w.-]+)", line):
                calls[name] = called.group(1)
            else:
                origin[name] = unlabelled(name)
    for name, computation in calls.items():
        origin[name] = inner.get(computation) or unlabelled(name)
    return origin


def memory(compiled) -> dict:
    """A compiled executable's temporary, argument and output memory in MiB ({} where the backend reports none)."""
    try:
        m = compiled.memory_analysis()
        return {"temp_mb": m.temp_size_in_bytes / 2**20, "argument_mb": m.argument_size_in_bytes / 2**20,
                "output_mb": m.output_size_in_bytes / 2**20}
    except (NotImplementedError, AttributeError):  # not every backend reports it
        return {}


def _stats(times: list[float]) -> tuple[float, float, float]:
    t = np.asarray(times) * 1e3
    return float(np.median(t)), float(t.min()), float(t.max())


def flax_model(net: nw.Sequential):
    """The same network in Flax linen (None without flax)."""
    try:
        import flax.linen as fnn
    except ImportError:
        return None

    class Model(fnn.Module):
        layers: tuple = net.layers

        @fnn.compact
        def __call__(self, x):
            for layer in self.layers:
                if isinstance(layer, nw.BatchNorm):  # training mode (apply with mutable=["batch_stats"])
                    x = fnn.BatchNorm(use_running_average=False, momentum=layer.momentum, epsilon=layer.eps)(x)
                    continue
                if isinstance(layer, nw.Residual):
                    proj = layer.shortcut(tuple(x.shape[1:]))
                    skip = x if proj is None else fnn.Conv(proj.features, (1, 1), proj.stride, use_bias=False)(x)
                    x = Model(layer.layers)(x) + skip
                    continue
                if isinstance(layer, nw.Conv):
                    win = layer.geometry(x.shape[1:])
                    x = fnn.Conv(layer.features, win.size, win.stride, list(win.padding),
                                 kernel_dilation=win.dilation, use_bias=layer.bias)(x)
                    if isinstance(layer, nw.ConvReLUPool):
                        k = layer.pool_geometry().size
                        x = fnn.max_pool(fnn.relu(x), k, k)
                    if isinstance(layer, nw.ConvBNReLU):
                        x = fnn.relu(fnn.BatchNorm(use_running_average=False, momentum=layer.momentum,
                                                   epsilon=layer.eps)(x))
                elif isinstance(layer, nw.MaxPool):
                    win = layer.geometry(x.shape[1:])
                    f = fnn.avg_pool if isinstance(layer, nw.AvgPool) else fnn.max_pool
                    x = f(x, win.size, win.stride, list(win.padding))
                elif isinstance(layer, nw.Dense):
                    x = fnn.Dense(layer.features, use_bias=layer.bias)(x)
                elif isinstance(layer, nw.Flatten):
                    x = x.reshape(x.shape[0], -1)
                elif not isinstance(layer, nw.Dropout):
                    x = XLA_ELEMENTWISE[layer.type](x, **layer.settings())
            return x

    return Model()


def flax_loss(model, stateful: bool) -> Callable:
    """loss(variables, x, y) of a Flax linen model; with batch norm, in training mode (its batch_stats mutable,
    their update discarded: the timing is the same)."""
    def logits(variables, x):
        return model.apply(variables, x, mutable=["batch_stats"])[0] if stateful else model.apply(variables, x)

    return lambda v, x, y: optax.softmax_cross_entropy_with_integer_labels(logits(v, x), y).mean()


def torch_step(net: nw.Sequential, input_shape, batch: int, channels_last: bool, dtype=jnp.float32,
               compiled: bool = False) -> Callable | None:
    """The same step in PyTorch (None without torch), eager or with the model under ``torch.compile``
    (``compiled``: Inductor, compiled at the first call); NCHW, or NHWC memory ("channels_last"); on CUDA when
    JAX runs on a GPU (and torch sees one), else on the CPU. Each call waits for the device to finish."""
    try:
        import torch

        from jaxcnn import torch_mirror
    except ImportError:
        return None
    if not torch_mirror.supported(net):
        return None
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    if not cuda and jax.default_backend() != "cpu":
        return None  # no like-for-like reference on this accelerator
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    shapes = net.shapes(input_shape)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 products, as XLA's default precision on GPUs
    device, torch_dtype = ("cuda" if cuda else "cpu"), getattr(torch, jnp.dtype(dtype).name)
    model = torch_mirror.module(net, input_shape).to(device, torch_dtype)
    x = torch.randn(batch, input_shape[2], *input_shape[:2], device=device, dtype=torch_dtype)
    y = torch.randint(0, shapes[-1][-1], (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    step.note = f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if cuda else
                                                   f"{torch.get_num_threads()} threads") + \
        (", torch.compile" if compiled else ", eager")
    return step


def run(preset: str, input_shape, batch: int, steps: int = 20, dtype=jnp.float32, seed: int = 0,
        torch: bool = True, progress: Callable[[str], None] | None = None, variants: dict | None = None,
        matmul_n: int | None = None, bandwidth_mb: int = 256, baselines: bool | None = None) -> dict:
    """Measure every available variant of ``preset`` (or the given ``variants``: name -> loss(params, x, y)), with
    ``baselines`` (default: when no ``variants`` are given) the step ``rule="auto"`` chose and the other libraries'
    steps too: Flax's, and PyTorch's where ``torch``.

    All variants are compiled and warmed up first, then timed round-robin, one step of each per round, so that
    the machine's drifting speed affects them alike; returns {"measurements", "flops", "ceiling", "bandwidth",
    ...}. The yardsticks, the matmul ceiling (GFLOP/s of ``matmul_probe(matmul_n)``) and the memory bandwidth (GB/s
    of ``bandwidth_probe(bandwidth_mb)``), are timed in the same rounds: measured once before them, on a shared
    2-core VM, the ceiling read 97 GFLOP/s in one run and 185 in the next, and the steps' share of it 112% and
    70% (BENCHMARKS.md)."""
    net = nw.preset(preset)
    params, x, y = _inputs(net, input_shape, batch, dtype, seed)
    runners: dict[str, Callable] = {}
    baselines = variants is None if baselines is None else baselines
    variants = jax_variants(net) if variants is None else dict(variants)
    if baselines:
        name, loss = auto_variant(net, input_shape, batch, dtype, progress)
        variants[name] = loss
    for name, loss in variants.items():
        runners[name] = JaxStep(loss, params, x, y)
    model = flax_model(net) if baselines else None
    if model is not None:
        import flax

        loss = flax_loss(model, net.stateful)
        # Linen keeps float32 parameters and promotes a bfloat16 batch to them: cast them, so that Flax computes
        # in the step's dtype like every other variant.
        flax_params = jax.tree_util.tree_map(lambda a: a.astype(dtype), model.init(jax.random.key(seed), x))
        runners["flax"] = JaxStep(loss, flax_params, x, y)
        runners["flax"].note = f"flax {flax.__version__} linen"
    environment = dict(os.environ)  # torch.compile leaves variables of its own behind: restored below
    if baselines and torch and (dtype == jnp.float32 or jax.default_backend() != "cpu"):
        for channels_last, compiled in ((False, False), (True, False), (True, True)):
            step = torch_step(net, input_shape, batch, channels_last, dtype, compiled)
            if step is not None:
                name = "pytorch" + (" channels_last" if channels_last else "") + (", compiled" if compiled else "")
                runners[name] = step
    for name, runner in list(runners.items()):
        try:
            runner()  # warm-up (and torch.compile's compilation)
        except Exception as err:  # torch.compile needs a C++ compiler and may fail; the rest stands
            if not name.endswith("compiled"):
                raise
            del runners[name]
            if progress:
                progress(f"{preset} b{batch}: no {name} row: torch.compile failed ({type(err).__name__}: {err})")
    yardsticks = {"ceiling": matmul_probe(matmul_n, dtype), "bandwidth": bandwidth_probe(bandwidth_mb)}
    timed = {**runners, **{(name,): probe for name, (probe, _) in yardsticks.items()}}  # tuples: never a variant
    for probe, _ in yardsticks.values():
        probe()  # warm-up (compilation)
    times: dict = {name: [] for name in timed}
    for _ in range(steps):
        for name, runner in timed.items():
            start = time.perf_counter()
            runner()
            times[name].append(time.perf_counter() - start)
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)
    results = []
    for name, runner in runners.items():
        extra = {"compile_s": runner.compile_s, **runner.memory} if isinstance(runner, JaxStep) else {}
        results.append(Measurement(name, *_stats(times[name]), note=getattr(runner, "note", ""), **extra))
        if progress:
            progress(f"{preset} b{batch}: {name} {results[-1].median_ms:.1f} ms")
    ceiling, bandwidth = (work / float(np.median(times[(name,)])) / 1e9 for name, (_, work) in yardsticks.items())
    return {"preset": preset, "batch": batch, "dtype": str(jnp.dtype(dtype)), "measurements": results,
            "flops": count_flops(net, input_shape, batch), "bytes": count_bytes(net, input_shape, batch, dtype),
            "steps": steps, "ceiling": ceiling, "bandwidth": bandwidth}


def yardsticks_line(result: dict) -> str:
    """One ``run``'s work and yardsticks in a sentence: FLOPs and bytes per step, the matmul ceiling and memory
    bandwidth timed in its rounds, and the roofline time they give."""
    roof = roofline_ms(result["flops"], result["bytes"], result["ceiling"], result["bandwidth"])
    return (f"{result['flops'] / 1e9:.2f} GFLOP and about {result['bytes'] / 1e9:.2f} GB moved per step (counted by "
            f"hand); matmul ceiling {result['ceiling']:.0f} GFLOP/s and memory bandwidth {result['bandwidth']:.0f} "
            f"GB/s (medians, timed in the same rounds as the steps): roofline {roof:.1f} ms per step")


def table(result: dict) -> str:
    """A Markdown table of one ``run``: times, ratios to the XLA autodiff baseline, GFLOP/s and their share of the
    run's matmul ceiling, times the roofline time (``roofline_ms``, with the run's bandwidth), memory."""
    base = next((m.median_ms for m in result["measurements"] if m.name == "xla autodiff"), None)
    gflop, ceiling = result["flops"] / 1e9, result["ceiling"]
    roof = roofline_ms(result["flops"], result["bytes"], ceiling, result["bandwidth"])
    rows = ["| variant | ms (median) | min-max | vs xla autodiff | GFLOP/s | % of ceiling | x roofline | compile s | "
            "temp MB | args MB | out MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["measurements"]:
        rate = gflop / (m.median_ms / 1e3)
        fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
        rows.append(f"| {m.name} | {m.median_ms:.1f} | {m.min_ms:.1f}-{m.max_ms:.1f} | "
                    f"{fmt(base and m.median_ms / base, '{:.2f}x')} | {rate:.1f} | {rate / ceiling:.0%} | "
                    f"{m.median_ms / roof:.1f}x | {fmt(m.compile_s)} | {fmt(m.temp_mb)} | "
                    f"{fmt(m.argument_mb)} | {fmt(m.output_mb)} |")
    return "\n".join(rows)


def block_memory(batch: int = 128, shape=(14, 14, 32), features: int = 64) -> list[tuple[str, float]]:
    """Compiled temporary memory (MB) of the gradient of one conv + ReLU + 2x2 max-pool layer (simplenn-mnist's
    second by default): Lin's fused block by each rule against XLA's autodiff chain."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], features)), jnp.float32) * 0.1
    b = jnp.zeros(features, jnp.float32)
    import jaxcnn as jc

    def xla_chain(x, w, b):
        s = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return lax.reduce_window(jax.nn.relu(s + b), -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    variants = {
        "fused, flip": lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, rule="flip"),
        "fused, im2col": lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, rule="im2col", store_phi=False),
        "fused, im2col, phi stored": lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, store_phi=True),
        "fused, im2col, phi in blocks": lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, block="auto"),
        "fused, winograd": lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, rule="winograd"),
        "fused, winograd in blocks": lambda x, w, b: jc.conv_relu_pool(x, w, b, padding=1, rule="winograd",
                                                                        block="auto"),
        "xla autodiff chain": xla_chain,
    }
    out = []
    for name, f in variants.items():
        compiled = jax.jit(jax.grad(lambda w, b, x, f=f: jnp.sum(f(x, w, b) ** 2), argnums=(0, 1))).lower(
            w, b, x).compile()
        out.append((name, memory(compiled).get("temp_mb", float("nan"))))
    return out
