"""Experiment 11: which gradient is more accurate in low precision, the notes' hand formulas or autodiff?

    python -m experiments.precision --data-dir ../shared/data   # writes experiments/results/precision.md

Every gradient is computed from inputs and params rounded once to the low-precision dtype, and compared with the
float64 gradient of the same rounded values, computed the same way (``jaxcnn.precision``, whose docstring defines
the errors). Sections: each op alone; every preset end to end, with the forward pass's part; simplenn-mnist layer
by layer (table and plot); controls (accumulation of the products of eq. 12 and 18 in float32 or in the dtype, and
the batch size; the fused blocks against their chains); and, given ``--data-dir`` holding mnist/, simplenn-mnist
trained 2 epochs on the real MNIST in float32 and bfloat16, hand and autodiff, from one seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments._common import machine, parser, save_figure, table, write
from jaxcnn import data, network, precision, train
from jaxcnn import ops as jc
from jaxcnn.cli import INPUT_SHAPES, dataset_of
from jaxcnn.ops import conv

DTYPES = ("bfloat16", "float16", "float32")
ROOT = Path(__file__).resolve().parent.parent
PAIRS = (("hand im2col", "autodiff im2col"), ("hand flip", "autodiff flip"))
MODES = (*precision.DEFAULT_MODES, "autodiff first-max")


def _normal(key, shapes):
    return [jax.random.normal(k, s) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]


# Each op: (function of its arrays, grad and rule, returning one array; input shapes; names of the inputs; whether
# it has conv rules). Sizes are small: the errors are per entry and do not need large arrays.
LABELS = jnp.arange(16) % 10
OPS = {
    "conv2d": (lambda x, w, b, grad, rule: jc.conv2d(x, w, b, padding=1, grad=grad, rule=rule),
               [(8, 10, 10, 8), (3, 3, 8, 16), (16,)], ("x", "w", "b"), True),
    "conv_relu_pool": (lambda x, w, b, grad, rule: jc.conv_relu_pool(x, w, b, padding=1, grad=grad, rule=rule),
                       [(8, 10, 10, 8), (3, 3, 8, 16), (16,)], ("x", "w", "b"), True),
    "conv_bn_relu": (lambda x, w, g, b, grad, rule: jc.conv_bn_relu(x, w, g + 1, b, padding=1, grad=grad,
                                                                    rule=rule)[0],
                     [(8, 10, 10, 8), (3, 3, 8, 16), (16,), (16,)], ("x", "w", "gamma", "beta"), True),
    "dense": (lambda x, w, b, grad, rule: jc.dense(x, w, b, grad=grad), [(16, 256), (256, 10), (10,)],
              ("x", "w", "b"), False),
    "max_pool2d": (lambda x, grad, rule: jc.max_pool2d(x, grad=grad), [(8, 10, 10, 16)], ("x",), False),
    "avg_pool2d": (lambda x, grad, rule: jc.avg_pool2d(x, grad=grad), [(8, 10, 10, 16)], ("x",), False),
    "global_avg_pool": (lambda x, grad, rule: jc.global_avg_pool(x, grad=grad), [(8, 10, 10, 16)], ("x",), False),
    "relu": (lambda x, grad, rule: jc.relu(x, grad=grad), [(16, 256)], ("x",), False),
    "leaky_relu": (lambda x, grad, rule: jc.leaky_relu(x, grad=grad), [(16, 256)], ("x",), False),
    "elu": (lambda x, grad, rule: jc.elu(x, grad=grad), [(16, 256)], ("x",), False),
    "gelu": (lambda x, grad, rule: jc.gelu(x, grad=grad), [(16, 256)], ("x",), False),
    "sigmoid": (lambda x, grad, rule: jc.sigmoid(x, grad=grad), [(16, 256)], ("x",), False),
    "tanh": (lambda x, grad, rule: jc.tanh(x, grad=grad), [(16, 256)], ("x",), False),
    "softmax": (lambda x, grad, rule: jc.softmax(x, grad=grad), [(16, 10)], ("x",), False),
    "batch_norm": (lambda x, g, b, grad, rule: jc.batch_norm(x, g + 1, b, grad=grad)[0],
                   [(8, 10, 10, 16), (16,), (16,)], ("x", "gamma", "beta"), False),
    "dropout": (lambda x, grad, rule: jc.dropout(x, 0.5, jax.random.key(7), grad=grad), [(16, 256)], ("x",), False),
    "residual_add": (lambda a, b, grad, rule: jc.residual_add(a, b, grad=grad), [(8, 10, 10, 16)] * 2,
                     ("body", "shortcut"), False),
    "softmax_cross_entropy": (lambda z, grad, rule: jc.softmax_cross_entropy(z, LABELS, grad=grad), [(16, 10)],
                              ("z",), False),
    "squared_error": (lambda z, grad, rule: jc.squared_error(z, jax.nn.one_hot(LABELS, 10, dtype=z.dtype),
                                                             grad=grad), [(16, 10)], ("z",), False),
}


def op_errors(name: str, dtypes, seed: int = 0) -> list[dict]:
    """One op's VJP, each mode in each dtype, from random inputs and a random cotangent rounded to the dtype,
    against the float64 VJP of the same mode from the same rounded values."""
    fn, shapes, names, has_rules = OPS[name]
    modes = [m for pair in PAIRS for m in pair] if has_rules else ["hand", "autodiff"]
    rows = []
    with jax.enable_x64(True):
        args = _normal(jax.random.key(seed), shapes)
        out_shape = jax.eval_shape(lambda *a: fn(*a, grad="autodiff", rule="im2col"), *args).shape
        ct = jax.random.normal(jax.random.key(seed + 1), out_shape)
        for dtype in dtypes:
            def pulls(args, ct):
                out = {}
                for mode in modes:
                    grad, rule = precision.MODES.get(mode, (mode, None))
                    for d in (args[0].dtype, jnp.dtype(jnp.float64)):
                        y, pull = jax.vjp(lambda *a, grad=grad, rule=rule: fn(*a, grad=grad, rule=rule),
                                          *[a.astype(d) for a in args])
                        out[mode, str(d)] = pull(ct.astype(d).astype(y.dtype))  # the losses: float32 at least
                return out

            low = [a.astype(dtype) for a in args]
            out = jax.jit(pulls)(low, ct.astype(dtype))
            for mode in modes:
                for arg, g, t in zip(names, out[mode, dtype], out[mode, "float64"]):
                    rows.append({"op": name, "dtype": dtype, "mode": mode, "gradient": arg,
                                 **dataclasses.asdict(precision.error(g, t))})
    return rows


def op_table(rows: list[dict], dtypes) -> str:
    """Norm error of each op's gradients, hand against autodiff (the conv ops: both rule pairs), per dtype."""
    index = {(r["op"], r["gradient"], r["dtype"], r["mode"]): r for r in rows}
    out = []
    for op, grad in dict.fromkeys((r["op"], r["gradient"]) for r in rows):
        pairs = PAIRS if OPS[op][3] else (("hand", "autodiff"),)
        for hand, auto in pairs:
            label = op if len(pairs) == 1 else f"{op} ({hand.split()[1]})"
            cells = []
            for d in dtypes:
                h, a = index[op, grad, d, hand], index[op, grad, d, auto]
                cells += [_pair_cell(h, a)]
            out.append([label, grad, *cells])
    return table(["op", "gradient", *[f"{d}: hand / autodiff" for d in dtypes]], out)


def _pair_cell(h: dict, a: dict) -> str:
    """'norm error hand / autodiff', the better one in bold when they differ by more than 10%."""
    hn, an = h["norm"], a["norm"]
    if hn is None or an is None:
        return "-"
    text = [f"{hn:.1e}", f"{an:.1e}"]
    if hn == 0 and an == 0:
        return "0 / 0"
    if max(hn, an) > 1.1 * min(hn, an):
        best = 0 if hn < an else 1
        text[best] = f"**{text[best]}**"
    return " / ".join(text)


HIGHEST = "float32 highest"  # float32 with matmul precision "highest" (no TF32 on GPUs), as a dtype label


def preset_reports(names, dtypes, batch: int, shrink: bool, highest: bool, modes=MODES) -> dict[str, precision.Report]:
    """``check_precision`` of each preset on a random batch; with ``highest`` also float32 with matmul precision
    "highest", its rows labelled ``HIGHEST``."""
    reports = {}
    for name in names:
        net, config = network.preset(name), network.preset_config(name)
        shape = INPUT_SHAPES[dataset_of(config)]
        if shrink:
            shape = (min(shape[0], 12), min(shape[1], 12), shape[2])
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        params = net.init(k1, shape)
        x = jax.random.normal(k2, (batch, *shape))
        labels = jax.random.randint(k3, (batch,), 0, net.shapes(shape)[-1][0])
        start = time.perf_counter()
        rep = reports[name] = precision.check_precision(net, params, x, labels, dtypes=dtypes, modes=modes)
        if highest:
            top = precision.check_precision(net, params, x, labels, dtypes=("float32",), modes=modes,
                                            matmul_precision="highest")
            for rows, more in ((rep.gradients, top.gradients), (rep.layers, top.layers), (rep.forward, top.forward)):
                rows += [dataclasses.replace(r, dtype=HIGHEST) for r in more]
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return reports


def _geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def preset_summary(reports: dict[str, precision.Report], dtypes) -> tuple[str, dict]:
    """Per preset and dtype: the median over parameters of each mode's norm error, how the hand rule compares with
    autodiff of the same forward (geometric mean of the ratio over parameters, and how often it is the smaller),
    and the forward pass's part."""
    rows, ratios = [], {(d, k): [] for d in dtypes for k in ("pairs", "first-max", "forward")}
    for name, rep in reports.items():
        for d in dtypes:
            by = {(r.mode, r.gradient): r for r in rep.gradients if r.dtype == d}
            params = list(dict.fromkeys(g for _, g in by))

            def ratio(hand, auto, key, d=d, by=by, params=params):
                pairs = [(by[hand, p].error.norm, by[auto, p].error.norm) for p in params]
                pairs = [(x, y) for x, y in pairs if x and y]
                ratios[d, key] += [x / y for x, y in pairs]
                return f"{_geomean([x / y for x, y in pairs]):.2f}x, {sum(x < y for x, y in pairs)}/{len(pairs)}"

            cells = []
            for hand, auto in PAIRS:
                if (hand, params[0]) not in by:  # a rule left out (--quick)
                    cells += ["-"] * 3
                    continue
                cells += [f"{np.median([by[m, p].error.norm for p in params]):.1e}" for m in (hand, auto)]
                cells.append(ratio(hand, auto, "pairs"))
            cells.append(ratio("hand im2col", "autodiff first-max", "first-max"))
            fwd = [by[m, p].forward_norm / by[m, p].error.norm for m in ("hand im2col",) for p in params
                   if by[m, p].error.norm]
            cells.append(f"{np.median(fwd):.0%}")
            ratios[d, "forward"].append(float(np.median(fwd)))
            rows.append([name, d, *cells])
    head = ["preset", "dtype", "hand im2col", "autodiff im2col", "hand/autodiff (im2col): geo-mean, hand smaller",
            "hand flip", "autodiff flip", "hand/autodiff (flip)", "hand im2col / autodiff first-max",
            "forward's part (median)"]
    summary = {key: (_geomean(r), float(np.mean([x < 1 for x in r])), len(r)) for key, r in ratios.items() if r}
    summary.update({(d, "forward"): ratios[d, "forward"] for d in dtypes})  # per preset: the forward's share
    return table(head, rows), summary


def layer_table(rep: precision.Report, dtypes) -> str:
    """Each layer's VJP alone: norm error of its weight gradient (or input gradient, for layers without params),
    hand and autodiff, both forwards."""
    index = {(r.dtype, r.mode, r.index, r.gradient): r for r in rep.layers}
    rows = []
    for i, label in dict.fromkeys((r.index, r.layer) for r in rep.layers):
        grads = list(dict.fromkeys(r.gradient for r in rep.layers if r.index == i))
        for g in grads:
            cells = []
            for d in dtypes:
                cells += [" / ".join(_num(index[d, m, i, g].error.norm) if (d, m, i, g) in index else "-"
                                     for m in (*PAIRS[0], *PAIRS[1]))]
            rows.append([label, g, *cells])
    return table(["layer", "gradient", *[f"{d}: hand im2col / autodiff / hand flip / autodiff" for d in dtypes]], rows)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def layer_plot(rep: precision.Report, dtypes, out):
    """Each layer's VJP alone, norm error per layer: a row per gradient (dW, db, dx; dz for the loss), a column per
    dtype, a line per mode. Exact zeros (ReLU, max pooling: pure routing) are not drawn on the log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {"dW": ("w",), "db": ("b",), "dx (dz for the loss)": ("x", "z")}
    fig, axes = plt.subplots(len(kinds), len(dtypes), figsize=(5 * len(dtypes), 9), squeeze=False, sharex=True)
    labels = dict((r.index, r.layer.split(" (")[-1].rstrip(")").split("(")[0] or "loss") for r in rep.layers)
    for row, (kind, grads) in zip(axes, kinds.items()):
        for ax, d in zip(row, dtypes):
            for mode, style in zip(precision.DEFAULT_MODES, ("o-", "s--", "^-", "v:")):
                pts = {r.index: r.error.norm for r in rep.layers
                       if r.dtype == d and r.mode == mode and r.gradient in grads and r.error.norm}
                xs = sorted(pts)
                ax.plot(xs, [pts[i] for i in xs], style, label=mode, alpha=0.8, markersize=4)
            ax.set(yscale="log", title=f"{d}: {kind}", ylabel="norm error")
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xticks(sorted(labels), [labels[i] for i in sorted(labels)], rotation=60, fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rep.meta['network']}: each layer's VJP alone against float64 (exact zeros not drawn)")
    fig.tight_layout()
    save_figure(fig, out, "precision.png")
    plt.close(fig)


def accumulation(dtypes, batches, seed: int = 0) -> tuple[str, str, dict]:
    """Controls for eq. (12) dW = Delta phi(pad(Z))^T and eq. (18) W^T Delta at simplenn-mnist's second conv layer
    (3x3, 32 -> 64 channels, 14x14): the products as the hand rule computes them (XLA's dot in the dtype), with
    float32 accumulation (``preferred_element_type``, one rounding at the end), with accumulation in the dtype (a
    running sum rounded to the dtype after every term), the flip rule and autodiff; dW over batch sizes. Returns
    the dW and dZ tables and the norm errors by (batch or "dZ", dtype, variant)."""
    dw_rows, dx_rows, data = [], [], {}
    with jax.enable_x64(True):
        for n in batches:
            x, w, delta = _normal(jax.random.key(seed + n), [(n, 14, 14, 32), (3, 3, 32, 64), (n, 14, 14, 64)])
            for dtype in dtypes:
                args = [a.astype(dtype) for a in (x, w, delta)]
                variants = jax.jit(_product_variants)(*args)
                truth = jax.jit(_product_variants)(*[a.astype(jnp.float64) for a in args])["im2col"]
                errs = {k: (precision.error(v[0], truth[0]).norm, precision.error(v[1], truth[1]).norm)
                        for k, v in variants.items()}
                data.update({(n, dtype, k): errs[k][0] for k in VARIANTS})
                data.update({("dZ", dtype, k): errs[k][1] for k in VARIANTS})
                dw_rows.append([n, n * 14 * 14, dtype, *[_num(errs[k][0]) for k in VARIANTS]])
                if n == batches[0]:
                    dx_rows.append([dtype, *[_num(errs[k][1]) for k in VARIANTS]])
    head = ["hand im2col", "products rounded to the dtype", "float32 accumulation", "accumulation in the dtype",
            "flip", "autodiff"]
    assert len(head) == len(VARIANTS)
    return (table(["batch", "terms summed (N Ho Wo)", "dtype", *head], dw_rows), table(["dtype", *head], dx_rows),
            data)


# The columns of ``accumulation``, in order (a jitted function's dict comes back with its keys sorted).
VARIANTS = ("im2col", "rounded", "f32", "dtype", "flip", "autodiff")


def _product_variants(x, w, delta):
    """(dW, dZ) of one conv layer by each variant of ``accumulation``."""
    win = conv.geometry("conv2d", x.shape[1:3], w.shape[:2], 1, 1, 1)
    rows = delta.reshape(-1, delta.shape[3])
    p = conv.phi(win, x).reshape(rows.shape[0], -1)
    w2 = w.reshape(-1, w.shape[3])
    dtype = x.dtype
    unpatch = lambda dphi: conv.unpatches(dphi.reshape(*delta.shape[:3], *w.shape[:3]), win, x.shape[1:3])
    out = {"im2col": conv.backward("im2col", win, x, w, delta)[:2][::-1]}
    out["rounded"] = (jnp.matmul(p.T, rows).reshape(w.shape), unpatch(jnp.matmul(rows, w2.T)))
    out["f32"] = (jnp.matmul(p.T, rows, preferred_element_type=jnp.float32).astype(dtype).reshape(w.shape),
                  unpatch(jnp.matmul(rows, w2.T, preferred_element_type=jnp.float32)).astype(dtype))

    def running(a, b):  # sum_k a[k]^T b[k], the running sum rounded to the dtype after every term
        step = lambda acc, ab: ((acc + jnp.outer(ab[0], ab[1]).astype(dtype)).astype(dtype), None)
        return lax.scan(step, jnp.zeros((a.shape[1], b.shape[1]), dtype), (a, b))[0]

    dphi = lax.map(lambda r: running(r[:, None], w2.T), rows)  # each row: sum over C_out of Delta_o W_o
    out["dtype"] = (running(p, rows).reshape(w.shape), unpatch(dphi[:, 0, :]))
    out["flip"] = conv.backward("flip", win, x, w, delta)[:2][::-1]
    _, pull = jax.vjp(lambda x, w: jc.conv2d(x, w, padding=1, grad="autodiff", rule="im2col"), x, w)
    out["autodiff"] = pull(delta)[::-1]
    return out


def fused_vs_chain(dtypes, blocks=("conv_relu_pool", "conv_bn_relu"), seed: int = 0) -> tuple[str, dict]:
    """The fused blocks' hand VJPs against the chains of the single ops (hand and autodiff), each against the
    float64 VJP of the same computation: the table, and the norm errors [dx, dW, ...] by (block, dtype, variant)."""
    chains = {
        "conv_relu_pool": {
            "fused (hand)": lambda x, w, g, b: jc.conv_relu_pool(x, w, b, padding=1, rule="im2col"),
            "chain (hand)": lambda x, w, g, b: jc.max_pool2d(jc.relu(jc.conv2d(x, w, b, padding=1, rule="im2col"))),
            "chain (autodiff)": lambda x, w, g, b: jc.max_pool2d(jc.relu(jc.conv2d(
                x, w, b, padding=1, rule="im2col", grad="autodiff"), grad="autodiff"), grad="autodiff")},
        "conv_bn_relu": {
            "fused (hand)": lambda x, w, g, b: jc.conv_bn_relu(x, w, g + 1, b, padding=1, rule="im2col")[0],
            "chain (hand)": lambda x, w, g, b: jc.relu(jc.batch_norm(jc.conv2d(x, w, padding=1, rule="im2col"),
                                                                     g + 1, b)[0]),
            "chain (autodiff)": lambda x, w, g, b: jc.relu(jc.batch_norm(jc.conv2d(
                x, w, padding=1, rule="im2col", grad="autodiff"), g + 1, b, grad="autodiff")[0], grad="autodiff")},
    }
    rows, data = [], {}
    with jax.enable_x64(True):
        args = _normal(jax.random.key(seed), [(8, 12, 12, 8), (3, 3, 8, 16), (16,), (16,)])
        for block in blocks:
            variants = chains[block]
            ct = jax.random.normal(jax.random.key(seed + 1), jax.eval_shape(variants["fused (hand)"], *args).shape)
            for dtype in dtypes:
                def pulls(args, ct, variants=variants):
                    out = {}
                    for name, f in variants.items():
                        for d in (args[0].dtype, jnp.dtype(jnp.float64)):
                            out[name, str(d)] = jax.vjp(f, *[a.astype(d) for a in args])[1](ct.astype(d))
                    return out

                out = jax.jit(pulls)([a.astype(dtype) for a in args], ct.astype(dtype))
                for name in variants:
                    errs = [precision.error(g, t) for g, t in zip(out[name, dtype], out[name, "float64"])]
                    data[block, dtype, name] = [e.norm for e in errs]
                    names = ("x", "w", "gamma" if block == "conv_bn_relu" else "-", "beta" if block == "conv_bn_relu"
                             else "b")
                    rows.append([block, dtype, name, *[_num(e.norm) for n, e in zip(names, errs) if n != "-"]
                                 + ([] if block == "conv_bn_relu" else ["-"])])
    return table(["block", "dtype", "computation", "dx", "dW", "dgamma (conv_bn_relu) / db", "dbeta"], rows), data


def fused_vs_chain_exact_rounding(dtypes) -> str:
    """``fused_vs_chain`` in a fresh process with XLA's ``--xla_allow_excess_precision=false``: every bfloat16 or
    float16 intermediate is rounded to its dtype, also inside a fusion (by default XLA may keep a fused
    intermediate, such as a product's float32 result, unrounded)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    code = f"from experiments.precision import fused_vs_chain; print(fused_vs_chain({tuple(dtypes)!r})[0])"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"the run without excess precision failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def training(args) -> tuple[str, dict]:
    """simplenn-mnist, 2 epochs on the real MNIST, float32 and bfloat16, hand and autodiff, one seed: the section,
    and the test accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net = network.preset("simplenn-mnist")
    dataset = data.load("mnist", args.data_dir)
    if args.quick:
        dataset = dataclasses.replace(dataset, x_train=dataset.x_train[:640], y_train=dataset.y_train[:640],
                                      x_test=dataset.x_test[:256], y_test=dataset.y_test[:256])
    epochs = 1 if args.quick else 2
    cfg = train.TrainConfig(dataset="mnist", batch_size=128, epochs=epochs)
    rows, curves, accuracy = [], {}, {}
    for prec in ("fp32", "bf16"):
        for grad in ("hand", "autodiff"):
            c = dataclasses.replace(cfg, precision=prec, grad=grad)
            result = train.fit(net, train.prepare(dataset, c), c)
            last = result.history[-1]
            curves[f"{prec}, {grad}"] = result.step_losses
            accuracy[f"{prec} {grad}"] = result.test["accuracy"]
            rows.append([prec, grad, f"{result.test['accuracy']:.2%}", f"{result.test['loss']:.4f}",
                         f"{last['train_objective']:.4f}"])
            print(f"  trained {prec} {grad}: {result.test['accuracy']:.2%}", flush=True)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    window = 25
    for name, losses in curves.items():
        losses = np.asarray(losses)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax[0].plot(np.arange(window, len(losses) + 1), smooth, label=name, linewidth=0.9)
    base = {g: np.asarray(curves[f"fp32, {g}"]) for g in ("hand", "autodiff")}
    for g in ("hand", "autodiff"):
        ax[1].plot(np.asarray(curves[f"bf16, {g}"]) - base[g], label=f"bf16 - fp32, {g}", linewidth=0.6, alpha=0.8)
    ax[0].set(xlabel="step", ylabel=f"objective ({window}-step mean)", yscale="log", title="simplenn-mnist on MNIST")
    ax[1].set(xlabel="step", ylabel="objective difference", title="bf16 run minus fp32 run, same gradient mode")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, args.out, "precision_training.png")
    plt.close(fig)
    return (f"## Training: simplenn-mnist on the real MNIST, {epochs} epoch(s), batch 128, Adam 1e-3, seed "
            f"{cfg.seed}\n\nbf16 is the trainer's `--precision bf16` (layers in bfloat16, float32 master params and "
            "loss). Speed: experiments/results/mixed_precision.md.\n\n"
            + table(["precision", "gradient", "test accuracy", "test loss", "last epoch's objective"], rows)
            + "\n\n![training curves](precision_training.png)", accuracy)


def conclusion(dtypes, ops: list[dict], summary: dict, reports: dict, focus: precision.Report, acc: dict,
               fused: dict, exact: bool, trained: dict | None) -> str:
    """The plain-language answer, every number taken from the measurements above."""
    low = [d for d in dtypes if not d.startswith("float32")]
    norm = {(r["op"], r["gradient"], r["dtype"], r["mode"]): r["norm"] for r in ops}

    def ratio(op, grad, d, worse, better):
        a, b = norm.get((op, grad, d, worse)), norm.get((op, grad, d, better))
        return f"{a / b:.1f}x" if a and b else "-"

    lines = ["## In short\n\nComputed from the tables above.\n"]
    for d in dtypes:
        r, share, n = summary[d, "pairs"]
        tied, tied_share, _ = summary[d, "first-max"]
        lines.append(f"- **{d}, end to end**: the hand rules' parameter gradients are {r:.2f}x as far from the truth "
                     f"as autodiff's through the same forward (geometric mean over {n} parameter gradients of "
                     f"{len(reports)} presets), the closer one in {share:.0%}; against autodiff with the hand "
                     f"rule's tie convention, {tied:.2f}x (closer in {tied_share:.0%}). The forward pass's rounding "
                     f"accounts for a median {np.median(summary[d, 'forward']):.0%} of the error.")
    ties = {d: [sum(getattr(r, k) for r in focus.forward if r.ties is not None and r.dtype == d
                    and r.forward == "im2col") for k in ("ties", "ties_float64")] for d in low}
    if low:
        lines.append(
            "- **Why end to end differs so little**: in low precision the error is inherited from the forward pass, "
            "not made by the backward formula. Where the dtype's activations cross a kink that float64's do not "
            "(a ReLU input changing sign, a max-pool window changing its maximum, or a tie that rounding creates: "
            + "; ".join(f"{d} {ties[d][0]} tied windows in {focus.meta['network']}'s pools at batch "
                        f"{focus.meta['batch']}, float64 {ties[d][1]}" for d in low)
            + "), a whole entry of Delta goes elsewhere. At a tie that rounding created, autodiff of our forward "
            "splits Delta and so misroutes half of it every time, while the first maximum (the hand rule, Ray's "
            "single index) misroutes all of it when the true maximum is another entry. Against first-maximum "
            "autodiff the hand rule's ratio is "
            + ", ".join(f"{d} {summary[d, 'first-max'][0]:.2f}x instead of {summary[d, 'pairs'][0]:.2f}x"
                        for d in low)
            + (": in the norm the split is the smaller error." if all(
                summary[d, "first-max"][0] < summary[d, "pairs"][0] for d in low) else "."))
        d = low[0]
        lines.append(
            f"- **Where the formulas themselves differ** ({d}, each op alone): the bias gradient. Eq. (14) "
            f"computed as one product (im2col) or a sum accumulated in float32 (flip) is "
            f"{ratio('conv2d', 'b', d, 'autodiff im2col', 'hand im2col')} closer than autodiff's for conv2d and "
            f"{ratio('dense', 'b', d, 'autodiff', 'hand')} for dense: autodiff transposes the bias broadcast into a "
            f"reduction that accumulates in the dtype. In the fused conv-ReLU-pool block the gap is "
            f"{ratio('conv_relu_pool', 'b', d, 'autodiff im2col', 'hand im2col')}. Weight gradients agree to the "
            "last digit: eq. (12) and (19) are the very products autodiff emits.")
        dz = {k: acc.get(("dZ", d, k)) for k in ("im2col", "rounded", "flip")}
        if all(dz.values()):
            lines.append(
                f"- **Eq. (18) in the dtype**: rounding W^T Delta before col2im adds its kh kw overlapping entries "
                f"in {d} and made the im2col rule's dZ {dz['rounded'] / dz['im2col']:.1f}x farther from the truth "
                f"than it is now (norm error {dz['rounded']:.1e} before, {dz['im2col']:.1e} now, flip "
                f"{dz['flip']:.1e}). This study changed the rule to sum in float32 and round once; autodiff of the "
                "same forward still rounds first. On the 2-core CPU the bf16 training step got faster too "
                "(experiments/results/mixed_precision.md).")
        batches = sorted(k[0] for k in acc if k[0] != "dZ" and k[1] == d and k[2] == "im2col")
        lo, hi = batches[0], batches[-1]
        lines.append(
            f"- **Eq. (12) and the batch size**: dW sums N Ho Wo terms. Accumulated in {d}, its error grows from "
            f"{acc[lo, d, 'dtype']:.1e} (batch {lo}) to {acc[hi, d, 'dtype']:.1e} (batch {hi}); XLA's CPU dot "
            f"accumulates in float32 and rounds once ({acc[lo, d, 'im2col']:.1e} and {acc[hi, d, 'im2col']:.1e}), "
            "so on this machine the long reduction costs nothing. Hardware that accumulates in the dtype would make "
            "it the largest error of the step.")
        key = ("conv_bn_relu", d, "fused (hand)"), ("conv_bn_relu", d, "chain (hand)")
        if all(k in fused for k in key):
            f, c = fused[key[0]][0], fused[key[1]][0]
            lines.append(
                f"- **The fused conv-BN-ReLU block** is {c / f:.0f}x closer than the chain in {d} (dx: {f:.1e} "
                f"against {c:.1e})" + (", but not by its formula: XLA keeps the convolution's float32 result "
                                       "unrounded inside the block's fusion; with `--xla_allow_excess_precision=false` "
                                       "the two are equal (table above)." if exact else "."))
    if "float32" in dtypes:
        lines.append(
            f"- **float32**: every gradient is within a few units of the last place (norm errors 1e-8 to 1e-6). "
            "The hand im2col bias gradient, a product, is "
            f"{ratio('conv2d', 'b', 'float32', 'hand im2col', 'hand flip')} farther than a sum's (XLA's float32 "
            "reduction is more accurate than its float32 dot), and XLA's convolution for dW loses a little as the "
            "batch grows (flip column), the dot does not.")
    if trained:
        accs = ", ".join(f"{k} {v:.2%}" for k, v in trained.items())
        lines.append(f"- **Training** (simplenn-mnist, 2 epochs on MNIST, one seed): {accs}. None of these "
                     "differences in the gradient's last digits shows in test accuracy.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (no training run without it)")
    p.add_argument("--highest", action="store_true",
                   help="also float32 with matmul precision 'highest' (always on a GPU, whose float32 default may "
                        "use TF32 products)")
    args = p.parse_args(argv)
    quick = args.quick
    dtypes = ("bfloat16",) if quick else DTYPES
    start = time.perf_counter()
    print("each op alone", flush=True)
    op_rows = [r for name in (("dense", "relu") if quick else OPS) for r in
               op_errors(name, dtypes)]
    print("presets", flush=True)
    focus = "digits-cnn" if quick else "simplenn-mnist"  # layer by layer
    gpu = jax.default_backend() == "gpu"
    highest = args.highest or gpu
    reports = preset_reports([focus] if quick else list(network.presets()), dtypes, 4 if quick else 8, quick,
                             highest, ("hand im2col", "autodiff im2col", "autodiff first-max") if quick else MODES)
    all_dtypes = (*dtypes, HIGHEST) if highest else dtypes
    summary_table, summary = preset_summary(reports, all_dtypes)
    mnist = reports[focus]
    layer_plot(mnist, all_dtypes, args.out)
    print("controls", flush=True)
    dw_table, dx_table, acc = accumulation(dtypes, (1,) if quick else (1, 4, 16, 64))
    fused, fused_data = fused_vs_chain(dtypes, ("conv_relu_pool",) if quick else ("conv_relu_pool", "conv_bn_relu"))
    exact = None if quick else fused_vs_chain_exact_rounding(dtypes)
    sections = [
        "# Which gradient is more accurate in low precision: the notes' formulas or autodiff?",
        f"Machine: {machine()}. Command: `python -m experiments.precision{' --quick' if quick else ''}"
        f"{' --data-dir ' + args.data_dir if args.data_dir else ''}` ({time.perf_counter() - start:.0f} s before "
        "training).",
        "Method (`jaxcnn.precision`, also `jaxcnn gradcheck --precision`): inputs and params are rounded once to the "
        "dtype; the gradient is computed from those rounded values in the dtype and, the same way, in float64 (the "
        "truth). Modes come in pairs sharing one forward pass (hand im2col and autodiff of the phi(pad(Z)) W "
        "forward; hand flip and autodiff of XLA's convolution), so that within a pair only the backward formula "
        "differs. **norm error** = ||g - t|| / ||t||; median and max relative error are over entries with |t_i| >= "
        "1e-3 max|t| (in the JSON and `jaxcnn gradcheck --precision`). In float64 all modes agree to "
        f"{max(r.meta['float64_spread'] for r in reports.values()):.0e}. "
        + (f"`{HIGHEST}`: float32 with matmul precision `highest` (no TF32 products on GPUs; the same as float32 "
           "on a CPU). " if highest else "")
        + ("" if gpu else "float32 with TF32 products exists on GPUs only; no GPU was available for this run."),
        "## Each op alone\n\nThe op's VJP from random N(0, 1) inputs and cotangent rounded to the dtype, against "
        "the float64 VJP of the same rounded values. Norm error, hand / autodiff; the smaller in bold where they "
        "differ by more than 10%.\n\n" + op_table(op_rows, dtypes),
        f"## Every preset, end to end\n\nThe loss's gradient with respect to every parameter, random batch of "
        f"{mnist.meta['batch']}{' (12x12 inputs)' if quick else ' at the dataset image size'}. Per mode, the median "
        "over parameters of the norm error; the hand/autodiff column is the geometric mean over parameters of the "
        "ratio of norm errors (below 1: hand closer) and in how many the hand rule is closer. Forward's part: the "
        "float64 backward through the dtype's activations, against the truth, as a share of the total "
        "(median over parameters, hand im2col). Every parameter's row: "
        "[precision_presets.md](precision_presets.md).\n\n" + summary_table,
        f"## {focus}, layer by layer\n\nEach layer's VJP alone: the layer's input and Delta from the float64 "
        "truth, rounded to the dtype. Norm error of dW (of dx for layers without parameters; dz for the loss). "
        "Ties: the number of max-pool windows whose nonzero maximum is tied in the dtype's forward pass, against "
        "float64's: " + "; ".join(f"{d}: " + ", ".join(f"{r.layer.split(' (')[0]} {r.ties} ({r.ties_float64})"
                                                       for r in mnist.forward if r.ties is not None
                                                       and r.forward == "im2col" and r.dtype == d)
                                  for d in dtypes)
        + ".\n\n" + layer_table(mnist, all_dtypes) + "\n\n![error per layer](precision.png)",
        "## Controls\n\n### Accumulation of eq. (12) and the batch size\n\ndW = Delta phi(pad(Z))^T of one conv "
        "layer (3x3, 32 -> 64 channels, 14x14, random N(0, 1) input and Delta), norm error. Hand im2col: the rule "
        "as it is (eq. 12 as XLA's dot in the dtype; eq. 18 and col2im summed in float32, rounded once); products "
        "rounded to the dtype: every product's result rounded to the dtype before any further sum (eq. 18's W^T "
        "Delta before col2im: the hand rule before this study); float32 accumulation: "
        "`preferred_element_type=float32`, rounded once at the end; in the dtype: a running sum rounded after "
        "every one of the N Ho Wo terms "
        "(what a dot without a wider accumulator does).\n\n" + dw_table
        + "\n\n### Eq. (18), dZ = P_pad^T P_phi^T vec(W^T Delta) (sums of C_out = 64, then of kh kw = 9 terms)\n\n"
        + dx_table,
        "### The fused blocks against their chains\n\nNorm error of each gradient, each computation against its "
        "own float64 twin (input 8x12x12x8, 3x3 conv to 16 channels).\n\n" + fused
        + ("" if exact is None else "\n\nThe same in a process with `XLA_FLAGS=--xla_allow_excess_precision=false`, "
           "where XLA rounds every low-precision intermediate to its dtype, also inside a fusion (by default it may "
           "keep a fused intermediate, such as a product's float32 result, unrounded):\n\n" + exact),
    ]
    trained = None
    if args.data_dir:
        print("training", flush=True)
        text, trained = training(args)
        sections.append(text)
    sections.append(conclusion(all_dtypes, op_rows, summary, reports, mnist, acc, fused_data, exact is not None,
                               trained))
    write(args.out, "precision.md", "\n\n".join(sections) + "\n")
    details = ["# Every preset's parameter gradients in low precision (experiments/precision.py)", f"Machine: "
               f"{machine()}."]
    details += [f"## {name}\n\n```\n{rep.table().split(chr(10) + chr(10))[0]}\n```" for name, rep in reports.items()]
    write(args.out, "precision_presets.md", "\n\n".join(details) + "\n")


if __name__ == "__main__":
    main()
