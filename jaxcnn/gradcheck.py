"""Hand-derived vs autodiff vs finite-difference gradients, per layer and parameter, with kinks told apart.

For a network and loss (``check_network``) or a single op (``check_op``) this computes the gradient

- by each hand rule (``grad="hand"``, ``rule="im2col"`` and ``"flip"``),
- by autodiff of the same forward (``grad="autodiff"``),
- by autodiff of the same forward with max pooling written as ``lax.reduce_window``, whose gradient picks the
  first maximum of a tied window, the notes' convention (the *convention-matched* reference),
- by central finite differences in float64, along random directions in each parameter,

and reports, per parameter and per layer activation: the largest absolute difference, the relative error
max|a - b| / max|b| (the criterion, with a tolerance per dtype), cs231n's relative error max|a - b| / max(1e-8,
|a| + |b|), the cosine similarity, and the finite-difference error |fd - g.v| / (|g| |v|).

Where hand and autodiff disagree, the cause is either a kink (a non-differentiable point: a ReLU input exactly 0,
a max-pool window with tied maxima, where each side picks its own convention) or a genuine error in a rule. The
convention-matched reference separates them: a hand rule that matches it is ``kink`` (expected, and reported with
the number of kinks found per layer); one that does not is ``MISMATCH``. Finite differences are classed the same
way: a disagreement at a network with (near-)kinks is ``kink``, elsewhere ``MISMATCH``.
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
from jaxcnn.ops import block, conv, pool
from jaxcnn.ops._windows import Window

# max|a - b| / max|b| above which hand and autodiff are said to differ, and the finite-difference error above
# which they differ from the float64 derivative (the hand gradient is computed in ``dtype``).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 0.25}  # bfloat16 noise reaches ~0.12 on the presets
FD_TOLERANCE = {"float64": 1e-7, "float32": 1e-4, "bfloat16": 0.1}
MODES = {"hand im2col": {"grad": "hand", "rule": "im2col"}, "hand flip": {"grad": "hand", "rule": "flip"}}


@dataclass
class Row:
    """One gradient (a parameter, the input, or a layer's output) by one mode, compared with autodiff."""

    name: str
    mode: str
    max_abs: float
    rel: float
    rel_cs231n: float
    cosine: float
    fd_error: float | None
    status: str  # "ok", "kink" (expected disagreement at a non-differentiable point) or "MISMATCH"
    note: str = ""


@dataclass
class Report:
    rows: list[Row]
    kinks: dict[str, dict[str, int]]  # per layer: {"relu_zeros": n, "tied_windows": n, "near": n}
    dtype: str
    tolerance: float
    fd_tolerance: float
    meta: dict = field(default_factory=dict)

    @property
    def mismatches(self) -> list[Row]:
        return [r for r in self.rows if r.status == "MISMATCH"]

    def to_json(self) -> str:
        return json.dumps({"dtype": self.dtype, "tolerance": self.tolerance, "fd_tolerance": self.fd_tolerance,
                           "meta": self.meta, "kinks": self.kinks, "rows": [asdict(r) for r in self.rows],
                           "mismatches": len(self.mismatches)}, indent=2)

    def table(self) -> str:
        head = ("gradient", "mode", "max|d|", "rel", "rel cs231n", "cosine", "fd err", "status")
        rows = [head] + [(r.name, r.mode, f"{r.max_abs:.1e}", f"{r.rel:.1e}", f"{r.rel_cs231n:.1e}",
                          f"{r.cosine:.9f}", "-" if r.fd_error is None else f"{r.fd_error:.1e}",
                          r.status + (f" ({r.note})" if r.note else "")) for r in self.rows]
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        kinks = ", ".join(f"{layer}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)
                          for layer, counts in self.kinks.items() if any(counts.values()))
        lines.append(f"\n{self.dtype}: differ if rel > {self.tolerance:.0e} (vs autodiff) or fd err > "
                     f"{self.fd_tolerance:.0e} (vs float64 finite differences)")
        lines.append(f"kinks found: {kinks or 'none'}")
        lines.append(f"genuine mismatches: {len(self.mismatches)}")
        return "\n".join(lines)


def check_network(net: nw.Sequential, params: dict, x: jax.Array, labels: jax.Array, *, loss: str = "ce",
                  dtype=jnp.float64, rules=("im2col", "flip"), activations: bool = True, fd_directions: int = 2,
                  seed: int = 0) -> Report:
    """Compare the gradients of ``loss(net(x), labels)`` with respect to every parameter, the input ``x`` and (with
    ``activations``) every layer's output, by each hand rule, autodiff, and finite differences. ``dtype`` is the
    precision of the hand and autodiff gradients; finite differences are always float64."""
    dtype = jnp.dtype(dtype)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    x = jnp.asarray(x, dtype)
    shapes = net.shapes(x.shape[1:])
    # Zeros added to each layer's output: d f / d tap_i is the gradient with respect to that output.
    taps = [jnp.zeros((x.shape[0], *s), dtype) if activations else None for s in shapes]
    inputs = {"params": params, "x": x, "taps": taps}

    def f(inputs, mode):
        z = _apply(net, inputs["params"], inputs["x"], inputs["taps"], mode)
        return LOSSES[loss](z, labels, grad="autodiff" if mode in ("autodiff", "first-max") else "hand")

    names = {"params": {layer: {k: f"{layer}/{k}" for k in group} for layer, group in params.items()},
             "x": "input x",
             "taps": [f"layer {i} output ({nw.describe(layer)})" if activations else None
                      for i, layer in enumerate(net.layers)]}
    kinks = count_kinks(net, params, x)
    modes = {name: kw for name, kw in MODES.items() if kw["rule"] in rules}
    return _compare(f, inputs, names, modes, kinks, dtype, fd_directions, seed,
                    meta={"network": net.name, "batch": int(x.shape[0]), "loss": loss})


def check_op(op: Callable, args: tuple, names: tuple[str, ...], *, dtype=jnp.float64, fd_directions: int = 2,
             seed: int = 0, **kwargs) -> Report:
    """The same comparison for one op ``op(*args, **kwargs, grad=..., [rule=...])``, through the scalar
    sum(sin(op(...)) * r) with a fixed random r (so every output entry gets its own cotangent)."""
    dtype = jnp.dtype(dtype)
    args = [jnp.asarray(a, dtype) for a in args]
    out = jax.eval_shape(lambda *a: op(*a, **kwargs), *args)
    r = jax.random.normal(jax.random.key(seed + 1), out.shape, dtype)
    takes_rule = op in (ops.conv2d, ops.conv_relu_pool)

    def f(inputs, mode):
        a = inputs["args"]
        if mode == "first-max" and op is ops.max_pool2d:
            y = _first_max_pool(a[0], _pool_window(a[0], **kwargs))
        elif mode == "first-max" and op is ops.conv_relu_pool:
            y = _first_max_block(*a, **kwargs)
        else:
            kw = {"grad": "autodiff"} if mode in ("autodiff", "first-max") else dict(MODES.get(mode, {"grad": "hand"}))
            if not takes_rule:
                kw.pop("rule", None)
            y = op(*a, **kwargs, **kw)
        return jnp.sum(jnp.sin(y) * r)

    kinks = {}
    if op is ops.max_pool2d:
        kinks[op.__name__] = {"tied_windows": _ties(_pool_window(args[0], **kwargs), args[0])}
    elif op is ops.relu:
        kinks[op.__name__] = _relu_kinks(args[0])
    elif op is ops.conv_relu_pool:
        kinks[op.__name__] = _block_kinks(*args, **kwargs)
    kinks = jax.tree_util.tree_map(int, kinks)
    modes = MODES if takes_rule else {"hand": {"grad": "hand"}}
    return _compare(f, {"args": args}, {"args": list(names)}, modes, kinks, dtype, fd_directions, seed,
                    meta={"op": op.__name__})


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
        elif isinstance(layer, nw.ReLU):
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


def _apply(net: nw.Sequential, params: dict, x: jax.Array, taps: list, mode: str) -> jax.Array:
    """The network with ``taps[i]`` added to layer i's output, in a mode of ``MODES``, "autodiff" or
    "first-max" (autodiff with the notes' tie convention for max pooling)."""
    kw = {"grad": "autodiff", "rule": "im2col"} if mode in ("autodiff", "first-max") else MODES[mode]
    for name, layer, tap in zip(net.names, net.layers, taps):
        p = params[name] if name else {}
        if mode == "first-max" and isinstance(layer, nw.ConvReLUPool):
            x = _first_max_block(x, p["w"], p.get("b"), **_block_geometry(layer))
        elif mode == "first-max" and type(layer) is nw.MaxPool:
            x = _first_max_pool(x, layer.geometry(x.shape[1:]))
        else:
            x = layer.apply(p, x, **kw)
        if tap is not None:
            x = x + tap
    return x


def _compare(f, inputs, names, modes, kinks, dtype, fd_directions, seed, meta) -> Report:
    dtype_name = str(jnp.dtype(dtype))
    tol, fd_tol = TOLERANCE[dtype_name], FD_TOLERANCE[dtype_name]
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
            stats = _stats(a, ref)
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
    return Report(rows, kinks, dtype_name, tol, fd_tol, meta)


def _stats(a, b) -> dict[str, float]:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    diff = np.abs(a - b)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return {"max_abs": float(diff.max(initial=0)),
            "rel": float(diff.max(initial=0) / max(np.abs(b).max(initial=0), np.finfo(np.float64).tiny)),
            "rel_cs231n": float((diff / np.maximum(1e-8, np.abs(a) + np.abs(b))).max(initial=0)),
            "cosine": float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))}


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
