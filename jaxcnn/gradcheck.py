"""Hand-derived vs autodiff vs finite-difference gradients, layer by layer and end to end, with kinks told apart.

For a network and loss (``check_network``) or a single op (``check_op``) this computes gradients

- by each hand rule (``grad="hand"``, ``rule="im2col"`` and ``"flip"``; ``"winograd"`` when asked for, given to
  the 3x3, stride-1 conv layers, the others keeping the backend's default),
- by autodiff of the same forward (``grad="autodiff"``),
- by autodiff of the same forward with max pooling written as ``lax.reduce_window``, whose gradient picks the
  first maximum of a tied window, the notes' convention (the *convention-matched* reference),
- by central finite differences in float64, along random directions in each parameter.

``check_network`` answers two questions. **Which layer is wrong?** Each layer's VJP (and the loss's) is checked
alone: the layer's hand VJP and autodiff's VJP of the same layer, at the same input, pulled back from the same
upstream cotangent Delta (autodiff's). A wrong rule is named there and nowhere else, however far its error then
travels down the backward pass. **Is the whole gradient right?** The gradient of the loss with respect to every
parameter and the input, by each mode, against autodiff and finite differences; a difference there that a faulty
layer explains is marked ``propagated`` and names that layer.

A layer that differs from autodiff is either at a kink (a non-differentiable point: a ReLU input exactly 0, a
max-pool window with tied maxima, where each side picks its own convention) or wrong. The convention-matched
reference separates them: a hand rule that matches it is ``kink`` (expected, with the kinks counted per layer), one
that does not is ``MISMATCH``. Finite differences are classed the same way: a disagreement in a network with
(near-)kinks is ``kink``, elsewhere ``MISMATCH``.

The check always computes in float64 where it needs to (finite differences, ``dtype=float64``): it turns on JAX's
x64 mode for its own duration (``jax.enable_x64``), so that float64 is never silently truncated to float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn import network as nw
from jaxcnn import ops
from jaxcnn.objective import LOSSES
from jaxcnn.ops import _args, block, conv, pool, winograd
from jaxcnn.ops._windows import Window

# max|a - b| / max|b| above which hand and autodiff are said to differ, and the finite-difference error above
# which they differ from the float64 derivative (the hand gradient is computed in ``dtype``).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 0.25}  # bfloat16 noise reaches ~0.12 on the presets
FD_TOLERANCE = {"float64": 1e-7, "float32": 1e-4, "bfloat16": 0.1}
MODES = {"hand im2col": {"grad": "hand", "rule": "im2col"}, "hand flip": {"grad": "hand", "rule": "flip"},
         "hand winograd": {"grad": "hand", "rule": "winograd"}}


@dataclass
class Row:
    """One end-to-end gradient (a parameter or the input) by one mode, compared with autodiff; autodiff's own
    rows are compared with finite differences only (their comparison fields are None)."""

    name: str
    mode: str
    max_abs: float | None
    rel: float | None
    rel_cs231n: float | None
    cosine: float | None  # None where either gradient is all zero (no direction to compare)
    fd_error: float | None
    status: str  # "ok", "kink", "propagated" (explained by a faulty layer, named in note) or "MISMATCH"
    note: str = ""


@dataclass
class LayerRow:
    """One layer's VJP alone, by one hand mode, against autodiff's VJP of the same layer (same input, same Delta)."""

    layer: str
    index: int  # the layer's position in the network; the loss comes after the last layer
    mode: str
    gradient: str  # which of the layer's gradients (x, w, b) has the largest error
    error: float  # max|hand - reference| / max|reference| of that gradient; reference: autodiff, or at a kink the
    #              convention-matched reference (so this is the error that no kink explains)
    cosine: float | None
    kinks: dict[str, int]
    status: str  # "ok", "kink" or "MISMATCH"
    note: str = ""


@dataclass
class Report:
    rows: list[Row]
    kinks: dict[str, dict[str, int]]  # per layer: {"relu_zeros": n, "tied_windows": n, "near": n}
    dtype: str
    tolerance: float
    fd_tolerance: float
    meta: dict = field(default_factory=dict)
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Row | LayerRow]:
        """The genuine errors: faulty layers, and end-to-end gradients that no faulty layer explains."""
        return [r for r in (*self.layers, *self.rows) if r.status == "MISMATCH"]

    def to_json(self) -> str:
        return json.dumps({"dtype": self.dtype, "tolerance": self.tolerance, "fd_tolerance": self.fd_tolerance,
                           "meta": self.meta, "kinks": self.kinks, "layers": [asdict(r) for r in self.layers],
                           "rows": [asdict(r) for r in self.rows], "mismatches": len(self.mismatches)}, indent=2)

    def table(self) -> str:
        lines = []
        if self.layers:
            lines += ["Each layer's VJP alone (same input, same upstream Delta), hand vs autodiff:", _columns(
                ("layer", "mode", "worst", "error", "cosine", "kinks here", "status"),
                [(r.layer, r.mode, r.gradient, f"{r.error:.1e}", _num(r.cosine, ".9f"), _kinks(r.kinks) or "-",
                  r.status + (f" ({r.note})" if r.note else "")) for r in self.layers]), ""]
            lines.append("End to end, the loss's gradient with respect to each parameter and the input:")
        lines.append(_columns(
            ("gradient", "mode", "max|d|", "rel", "rel cs231n", "cosine", "fd err", "status"),
            [(r.name, r.mode, _num(r.max_abs, ".1e"), _num(r.rel, ".1e"), _num(r.rel_cs231n, ".1e"),
              _num(r.cosine, ".9f"), _num(r.fd_error, ".1e"), r.status + (f" ({r.note})" if r.note else ""))
             for r in self.rows]))
        kinks = "; ".join(f"{layer}: {_kinks(counts)}" for layer, counts in self.kinks.items() if _kinks(counts))
        lines.append(f"\n{self.dtype}: differ if rel > {self.tolerance:.0e} (vs autodiff) or fd err > "
                     f"{self.fd_tolerance:.0e} (vs float64 finite differences); autodiff rows: fd err only")
        lines.append(f"kinks found: {kinks or 'none'}")
        named = ", ".join(dict.fromkeys(f"{getattr(r, 'layer', None) or r.name} [{r.mode}]" for r in self.mismatches))
        lines.append(f"genuine mismatches: {len(self.mismatches)}" + (f": {named}" if named else ""))
        return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _kinks(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)


def _columns(head: tuple, rows: list[tuple]) -> str:
    rows = [head, *rows]
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_network(net: nw.Sequential, params: dict, x: jax.Array, labels: jax.Array, *, loss: str = "ce",
                  dtype=jnp.float64, rules=("im2col", "flip"), layers: bool = True, fd_directions: int = 2,
                  seed: int = 0) -> Report:
    """Check ``loss(net(x), labels)``: each layer's VJP alone (with ``layers``), and the gradient with respect to
    every parameter and the input, by each hand rule, autodiff, and finite differences. ``dtype`` is the precision
    of the hand and autodiff gradients; finite differences are always float64 (x64 is on during the check)."""
    with jax.enable_x64(True):
        dtype = jnp.dtype(dtype)
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        x, labels = jnp.asarray(x, dtype), jnp.asarray(labels)
        net.shapes(x.shape[1:])  # a network that does not fit its input is named before anything compiles

        def f(inputs, mode):
            z = _apply(net, inputs["params"], inputs["x"], mode)
            return LOSSES[loss](z, labels, grad=_grad_mode(mode))

        inputs = {"params": params, "x": x}
        names = {"params": _path_names(params), "x": "input x"}
        kinks = count_kinks(net, params, x)
        modes = {name: kw for name, kw in MODES.items() if kw["rule"] in rules}
        rows = _compare(f, inputs, names, modes, kinks, dtype, fd_directions, seed)
        layer_rows = _layer_rows(net, params, x, labels, loss, modes, kinks, dtype) if layers else []
        _attribute(rows, layer_rows, net)
        return Report(rows, kinks, str(dtype), TOLERANCE[str(dtype)], FD_TOLERANCE[str(dtype)],
                      {"network": net.name, "batch": int(x.shape[0]), "input_shape": list(x.shape[1:]),
                       "loss": loss}, layer_rows)


def check_op(op: Callable, args: tuple, names: tuple[str, ...], *, dtype=jnp.float64, fd_directions: int = 2,
             seed: int = 0, **kwargs) -> Report:
    """The same comparison for one op ``op(*args, **kwargs, grad=..., [rule=...])``, through the scalar
    sum(sin(op(...)) * r) with a fixed random r (so every output entry gets its own cotangent). ``op`` may be
    one of ours or one built with ``jaxcnn.custom.custom_op``."""
    with jax.enable_x64(True):
        dtype = jnp.dtype(dtype)
        args = [jnp.asarray(a, dtype) for a in args]
        out = jax.eval_shape(lambda *a: op(*a, **kwargs), *args)
        r = jax.random.normal(jax.random.key(seed + 1), out.shape, dtype)
        takes_rule = op in (ops.conv2d, ops.conv_relu_pool)
        winograd_applies = takes_rule and winograd.applies(
            args[1].shape[:2], *(_args.positive_pair("check_op", k, kwargs.get(k, 1)) for k in ("stride", "dilation")))

        def f(inputs, mode):
            a = inputs["args"]
            if mode == "first-max" and op is ops.max_pool2d:
                y = _first_max_pool(a[0], _pool_window(a[0], **kwargs))
            elif mode == "first-max" and op is ops.conv_relu_pool:
                y = _first_max_block(*a, **kwargs)
            else:
                kw = dict(MODES.get(mode, {"grad": _grad_mode(mode)}))
                if not takes_rule:
                    kw.pop("rule", None)
                y = op(*a, **kwargs, **kw)
            return jnp.sum(jnp.sin(y) * r)

        kinks = {}
        if op is ops.max_pool2d:
            kinks[op.__name__] = {"tied_windows": _ties(_pool_window(args[0], **kwargs), args[0])}
        elif op in (ops.relu, ops.leaky_relu, ops.elu):  # elu: a kink at 0 unless alpha = 1
            kinks[op.__name__] = _relu_kinks(args[0])
        elif op is ops.conv_relu_pool:
            kinks[op.__name__] = _block_kinks(*args, **kwargs)
        kinks = jax.tree_util.tree_map(int, kinks)
        modes = {k: v for k, v in MODES.items() if v["rule"] != "winograd" or winograd_applies} if takes_rule \
            else {"hand": {"grad": "hand"}}
        rows = _compare(f, {"args": args}, {"args": list(names)}, modes, kinks, dtype, fd_directions, seed)
        return Report(rows, kinks, str(dtype), TOLERANCE[str(dtype)], FD_TOLERANCE[str(dtype)],
                      {"op": getattr(op, "__name__", repr(op))})


def check_precision(net: nw.Sequential, params: dict, x, labels, **settings):
    """How accurate each gradient mode is in bfloat16, float16 and float32, against the float64 gradient of the
    same rounded inputs: ``jaxcnn.precision.check_precision`` (settings and report there)."""
    from jaxcnn import precision

    return precision.check_precision(net, params, x, labels, **settings)


def _path_names(tree: dict, prefix: str = "") -> dict:
    """Each leaf of nested params named by its path: "conv1/w", "res1/conv2/b"."""
    return {k: _path_names(v, f"{prefix}{k}/") if isinstance(v, dict) else f"{prefix}{k}" for k, v in tree.items()}


def _grad_mode(mode: str) -> str:
    return "autodiff" if mode in ("autodiff", "first-max") else "hand"


def _layer_rows(net: nw.Sequential, params: dict, x, labels, loss: str, modes: dict, kinks: dict,
                dtype) -> list[LayerRow]:
    """Each layer's hand VJP against autodiff's VJP of the same layer, at the layer's input in the autodiff
    forward pass, pulled back from autodiff's upstream cotangent: a wrong rule shows in its own row only."""
    layers = [(i, name, layer) for i, (name, layer) in enumerate(zip(net.names, net.layers))
              if hasattr(layer, "grad")]  # Flatten has no gradient mode: its hand and autodiff are one reshape

    def hand_modes(layer):
        if not isinstance(layer, nw.Conv):
            return ["hand"]
        return [m for m in modes if modes[m]["rule"] != "winograd" or layer.winograd_applies()]

    @jax.jit
    def pullbacks(params, x):
        def forward(taps):  # zeros added to each output: d loss / d tap_i is autodiff's Delta of layer i
            h, seen = x, [x]
            for name, layer, tap in zip(net.names, net.layers, taps):
                h = _apply_layer(layer, params[name] if name else {}, h, "autodiff") + tap
                seen.append(h)
            return LOSSES[loss](h, labels, grad="autodiff"), seen

        zeros = [jnp.zeros((x.shape[0], *s), x.dtype) for s in net.shapes(x.shape[1:])]
        deltas, seen = jax.grad(forward, has_aux=True)(zeros)
        out = {}
        for i, name, layer in layers:
            p = params[name] if name else {}
            references = ["autodiff", "first-max"] if _has_max_pool(layer) else ["autodiff"]
            for mode in (*hand_modes(layer), *references):
                _, pull = jax.vjp(lambda p, h, layer=layer, mode=mode: _apply_layer(layer, p, h, mode), p, seen[i])
                out[str(i), mode] = pull(deltas[i])
        for mode in ("hand", "autodiff"):
            out["loss", mode] = (jax.grad(lambda z, mode=mode: LOSSES[loss](z, labels, grad=mode))(seen[-1]),)
        return out

    grads = pullbacks(params, x)
    tol = TOLERANCE[str(dtype)]
    rows = []
    for i, name, layer in layers:
        label = f"layer {i} ({nw.describe(layer)})"
        leaf_names = [*sorted(params[name]), "x"] if name else ["x"]
        for mode in hand_modes(layer):
            rows.append(_layer_row(label, i, mode, leaf_names, grads[str(i), mode], grads[str(i), "autodiff"],
                                   grads.get((str(i), "first-max")), kinks.get(label, {}), tol))
    rows.append(_layer_row(f"loss ({loss})", len(net.layers), "hand", ["z"], grads["loss", "hand"],
                           grads["loss", "autodiff"], None, {}, tol))
    return rows


def _has_max_pool(layer: nw.Layer) -> bool:
    return isinstance(layer, nw.ConvReLUPool) or type(layer) is nw.MaxPool


def _layer_row(label: str, index: int, mode: str, leaf_names: list[str], hand, autodiff, first_max, kinks: dict,
               tol: float) -> LayerRow:
    """The verdict on one layer's VJP: the worst of its gradients, against autodiff or, where only a kink
    separates them, against the convention-matched reference."""
    leaves = jax.tree_util.tree_leaves
    hand, reference, status, note = leaves(hand), leaves(autodiff), "ok", ""
    if max(_stats(a, b)["rel"] for a, b in zip(hand, reference)) > tol:
        if first_max is not None and all(_stats(a, b)["rel"] <= tol for a, b in zip(hand, leaves(first_max))):
            reference, status, note = leaves(first_max), "kink", "matches the first-maximum convention"
        else:
            status, note = "MISMATCH", "its own VJP differs from autodiff's"
    stats = [_stats(a, b) for a, b in zip(hand, reference)]
    worst = max(range(len(stats)), key=lambda k: stats[k]["rel"])
    return LayerRow(label, index, mode, leaf_names[worst], stats[worst]["rel"], stats[worst]["cosine"], kinks, status,
                    note)


def _attribute(rows: list[Row], layer_rows: list[LayerRow], net: nw.Sequential) -> None:
    """An end-to-end gradient that differs because a layer at or after its own is faulty is ``propagated``: the
    layer's row carries the blame."""
    index = {name: i for i, name in enumerate(net.names) if name}
    faulty = [r for r in layer_rows if r.status == "MISMATCH"]
    for row in rows:
        if row.status != "MISMATCH":
            continue
        owner = index.get(row.name.split("/")[0], 0)  # the input x: layer 0
        causes = [r.layer for r in faulty if r.index >= owner and r.mode in (row.mode, "hand")]
        if causes:
            row.status, row.note = "propagated", "from " + ", ".join(dict.fromkeys(causes))


def count_kinks(net: nw.Sequential, params: dict, x: jax.Array) -> dict[str, dict[str, int]]:
    """Per layer: ReLU inputs exactly 0, max-pool windows whose maximum is tied, and near-kinks (ReLU inputs
    within 1e-6 of 0 relative to the layer's scale) that finite differences may step across."""
    counts = jax.jit(lambda params, x: _count_kinks(net, params, x))(params, x)
    return jax.tree_util.tree_map(int, counts)


def _count_kinks(net: nw.Sequential, params: dict, x: jax.Array) -> dict:
    kinks = {}
    for i, (name, layer) in enumerate(zip(net.names, net.layers)):
        p = params[name] if name else {}
        key = f"layer {i} ({nw.describe(layer)})"
        if isinstance(layer, nw.ConvReLUPool):
            kinks[key] = _block_kinks(x, p["w"], p.get("b"), **_block_geometry(layer))
        elif isinstance(layer, (nw.ReLU, nw.LeakyReLU, nw.ELU)):  # a kink at S = 0 (ELU's unless alpha = 1)
            kinks[key] = _relu_kinks(x)
        elif type(layer) is nw.MaxPool:
            kinks[key] = {"tied_windows": _ties(layer.geometry(x.shape[1:]), x)}
        x = layer.apply(p, x, grad="autodiff", rule="im2col")
    return kinks


def _block_geometry(layer: nw.ConvReLUPool) -> dict:
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "pool": layer.pool}


def _block_pre_pool(x, w, b, stride=1, padding=0, dilation=1, pool=2):
    """S of a conv_relu_pool block and its pooling window."""
    window = conv.geometry("conv_relu_pool", x.shape[1:3], w.shape[:2], stride, padding, dilation)
    return conv.forward(window, False, x, w, b)[0], block.pool_geometry("conv_relu_pool", pool)


def _block_kinks(x, w, b=None, **geometry) -> dict[str, int]:
    s, win = _block_pre_pool(x, w, b, **geometry)
    return {**_relu_kinks(s), "tied_windows": _ties(win, jnp.where(s > 0, s, 0))}


def _first_max_block(x, w, b=None, **geometry) -> jax.Array:
    s, win = _block_pre_pool(x, w, b, **geometry)
    return _first_max_pool(jnp.where(s > 0, s, 0), win)


def _pool_window(x, window=2, stride=None, padding="VALID") -> Window:
    return pool.geometry("max_pool2d", x.shape[1:3], window, stride, padding)


def _relu_kinks(s: jax.Array) -> dict[str, jax.Array]:
    scale = jnp.max(jnp.abs(s))
    return {"relu_zeros": jnp.sum(s == 0), "near": jnp.sum((s != 0) & (jnp.abs(s) < 1e-6 * scale))}


def _ties(win: Window, x: jax.Array) -> jax.Array:
    """Windows in which the maximum occurs more than once."""
    w = pool._windows(win, x, -jnp.inf)
    return jnp.sum(jnp.sum(w == w.max(axis=(3, 4), keepdims=True), axis=(3, 4)) > 1)


def _first_max_pool(x: jax.Array, win: Window) -> jax.Array:
    """Max pooling whose autodiff gradient goes to the first maximum of a tied window (lax's select-and-scatter,
    as Flax's max_pool): the notes' convention, used as the convention-matched reference."""
    (top, bottom), (left, right) = win.padding
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *win.size, 1), (1, *win.stride, 1),
                             ((0, 0), (top, bottom), (left, right), (0, 0)))


def _apply(net: nw.Sequential, params: dict, x: jax.Array, mode: str) -> jax.Array:
    """The network in a mode of ``MODES``, "autodiff" or "first-max" (autodiff with the notes' tie convention)."""
    for name, layer in zip(net.names, net.layers):
        x = _apply_layer(layer, params[name] if name else {}, x, mode)
    return x


def _apply_layer(layer: nw.Layer, p: dict, x: jax.Array, mode: str) -> jax.Array:
    if mode == "first-max" and isinstance(layer, nw.ConvReLUPool):
        return _first_max_block(x, p["w"], p.get("b"), **_block_geometry(layer))
    if mode == "first-max" and type(layer) is nw.MaxPool:
        return _first_max_pool(x, layer.geometry(x.shape[1:]))
    kw = {"grad": "autodiff", "rule": "im2col"} if _grad_mode(mode) == "autodiff" else MODES.get(
        mode, {"grad": "hand", "rule": None})
    if kw["rule"] == "winograd":
        layer, kw = with_winograd(layer), {**kw, "rule": None}
    return layer.apply(p, x, **kw)


def with_winograd(layer: nw.Layer) -> nw.Layer:
    """``layer`` with ``rule="winograd"`` for the conv layers it holds (residual bodies included) that name no rule
    and that F(2x2, 3x3) computes (3x3, stride 1); the others keep theirs, or the backend's default."""
    return nw.Sequential([layer]).with_convs(lambda c: c.rule is None and c.winograd_applies(),
                                             rule="winograd").layers[0]


def _compare(f, inputs, names, modes, kinks, dtype, fd_directions, seed) -> list[Row]:
    """End-to-end rows: each hand mode against autodiff (and the first-maximum reference at kinks), every mode
    against float64 finite differences."""
    tol, fd_tol = TOLERANCE[str(dtype)], FD_TOLERANCE[str(dtype)]
    all_modes = (*modes, "autodiff", "first-max")
    grad_of = jax.jit(lambda i: {m: jax.grad(lambda i, m=m: f(i, m))(i) for m in all_modes})(inputs)
    flat = {m: jax.tree_util.tree_leaves(g) for m, g in grad_of.items()}
    labels = jax.tree_util.tree_leaves(names)
    fd = _finite_differences(f, inputs, fd_directions, seed)
    any_kinks = any(v for counts in kinks.values() for v in counts.values())
    rows = []
    for mode in (*modes, "autodiff"):
        for i, label in enumerate(labels):
            a, ref, conv_ref = flat[mode][i], flat["autodiff"][i], flat["first-max"][i]
            stats = dict.fromkeys(("max_abs", "rel", "rel_cs231n", "cosine")) if mode == "autodiff" else _stats(a, ref)
            fd_err = _fd_error(a, fd[i])
            status, note = "ok", ""
            if mode != "autodiff" and stats["rel"] > tol:
                if _stats(a, conv_ref)["rel"] <= tol:
                    status, note = "kink", "matches autodiff with the first-maximum convention"
                else:
                    status, note = "MISMATCH", "differs from autodiff"
            if fd_err is not None and fd_err > fd_tol and status != "MISMATCH":
                if any_kinks:
                    status, note = "kink", "; ".join(filter(None, (note, "finite differences cross a kink")))
                else:
                    status, note = "MISMATCH", "differs from finite differences"
            rows.append(Row(label, mode, fd_error=fd_err, status=status, note=note, **stats))
    return rows


def _stats(a, b) -> dict[str, float]:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    diff = np.abs(a - b)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return {"max_abs": float(diff.max(initial=0)),
            "rel": float(diff.max(initial=0) / max(np.abs(b).max(initial=0), np.finfo(np.float64).tiny)),
            "rel_cs231n": float((diff / np.maximum(1e-8, np.abs(a) + np.abs(b))).max(initial=0)),
            "cosine": float(a @ b / norm) if norm > 0 else None}


def _finite_differences(f, inputs, directions: int, seed: int) -> list[list[tuple]]:
    """For every leaf: [(v, directional derivative along v)] by central differences in float64 (v random, unit
    RMS, supported on that leaf only)."""
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    leaves = [np.asarray(leaf, np.float64) for leaf in leaves]  # perturbed on the host: no per-shape compiles
    value = jax.jit(lambda leaves: f(jax.tree_util.tree_unflatten(treedef, leaves), "autodiff"))
    rng = np.random.default_rng(seed)
    out = []
    for i, leaf in enumerate(leaves):
        pairs = []
        eps = 1e-6 * (float(np.sqrt(np.mean(np.square(leaf)))) or 1.0)
        for _ in range(directions):
            v = rng.normal(size=leaf.shape)
            plus = [leaf + eps * v if j == i else other for j, other in enumerate(leaves)]
            minus = [leaf - eps * v if j == i else other for j, other in enumerate(leaves)]
            pairs.append((v, (float(value(plus)) - float(value(minus))) / (2 * eps)))
        out.append(pairs)
    return out


def _fd_error(g, pairs) -> float | None:
    """max over directions of |fd - g.v| / (|g| |v|): the error relative to the largest possible g.v."""
    g = np.asarray(g, np.float64).ravel()
    if not pairs or not g.size:
        return None
    errors = []
    for v, fd in pairs:
        v = np.asarray(v).ravel()
        scale = np.linalg.norm(g) * np.linalg.norm(v)
        errors.append(abs(fd - g @ v) / scale if scale > 0 else abs(fd))
    return float(max(errors))
