"""How accurate is each gradient in low precision? Hand rules and autodiff against the float64 truth.

For a network and loss, ``check_precision`` rounds the inputs and params once to each low-precision dtype
(bfloat16, float16, float32) and computes the gradient from those rounded values twice: in the dtype, and in float64
(the *truth*: the same values upcast exactly, the same computation in float64). Each gradient mode is compared with
its own float64 twin; in float64 the modes agree to ~1e-14 (``Report.meta["float64_spread"]``), far below any
low-precision error, so the truth is the exact gradient for the purposes of the comparison, and a float64 "low"
precision reports errors of exactly 0.

The modes come in pairs sharing one forward pass, so that within a pair only the backward formula differs:

- ``hand im2col`` / ``autodiff im2col``: S = phi(pad(Z)) W on CPU (phi(pad(Z)) stored, Lin's "storing" variant;
  XLA's convolution elsewhere), then Lin's eq. (12), (14), (18) or autodiff of that forward;
- ``hand flip`` / ``autodiff flip``: S by XLA's convolution, then Ray's dK = I * dJ, dI = pad(dJ) * flip(K), or
  autodiff of that forward.

Three views separate where the error comes from:

- **end to end**: the loss's gradient with respect to each parameter, in the dtype, against the truth; with the
  part due to the forward pass alone (``forward_norm``): the float64 backward pass run through the dtype's
  activations (each layer's output replaced by its low-precision value, its Jacobian kept exact), against the truth;
- **each layer's VJP alone**: the layer's input and upstream Delta taken from the float64 truth and rounded to the
  dtype, the layer's VJP computed in the dtype and in float64 from those rounded values: the rounding error of the
  backward formula itself, with nothing inherited from other layers;
- **the forward pass**: each layer's output in the dtype against float64, from the same rounded inputs.

Errors of a gradient g against its truth t (both float64 on the host):

- ``median`` and ``max``: of the entrywise relative error |g_i - t_i| / |t_i| over the entries with
  |t_i| >= 1e-3 max|t| (smaller entries are dominated by the rounding of their larger neighbours and their
  relative error says nothing about the formula);
- ``norm``: ||g - t|| / ||t||, and ``cosine``: <g, t> / (||g|| ||t||);
- ``flushed``: the fraction of entries with t_i != 0 that came out exactly 0 (underflow, float16's failure).

The mixed-precision convention is the trainer's (``--precision bf16``): the layers compute in the dtype, the loss
ops in float32 at least. Batch norm runs in training mode and dropout is the identity (the layer's ``apply``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import gradcheck
from jaxcnn import network as nw
from jaxcnn.objective import LOSSES
from jaxcnn.ops import pool

DTYPES = ("bfloat16", "float16", "float32")
MODES = {"hand im2col": ("hand", "im2col"), "autodiff im2col": ("autodiff", "im2col"),
         "hand flip": ("hand", "flip"), "autodiff flip": ("autodiff", "flip"),
         # Winograd's F(2x2, 3x3) for the 3x3, stride-1 conv layers, the others keeping the backend's default
         "hand winograd": ("hand", "winograd"), "autodiff winograd": ("autodiff", "winograd"),
         "autodiff first-max": ("autodiff", "im2col")}  # autodiff, max pooling's gradient to the first maximum
DEFAULT_MODES = ("hand im2col", "autodiff im2col", "hand flip", "autodiff flip")
FLOOR = 1e-3  # entries below FLOOR * max|t| are left out of the entrywise relative error


@dataclass
class Error:
    """One gradient (or output) against its float64 truth; None where the truth is all zero."""

    median: float | None
    max: float | None
    norm: float | None
    cosine: float | None
    one_minus_cosine: float | None  # computed as ||g/|g| - t/|t|||^2 / 2, exact where 1 - cosine would cancel
    flushed: float | None


def error(g, t) -> Error:
    """Errors of ``g`` against the truth ``t`` (see the module docstring), computed in float64 on the host."""
    g, t = np.asarray(g, np.float64).ravel(), np.asarray(t, np.float64).ravel()
    scale = np.abs(t).max(initial=0.0)
    if scale == 0:
        return Error(None, None, None, None, None, None)
    big = np.abs(t) >= FLOOR * scale
    rel = np.abs(g[big] - t[big]) / np.abs(t[big])
    g_norm, t_norm = np.linalg.norm(g), np.linalg.norm(t)
    gap = float(np.sum(np.square(g / g_norm - t / t_norm)) / 2) if g_norm > 0 else 1.0
    return Error(float(np.median(rel)), float(rel.max()), float(np.linalg.norm(g - t) / t_norm), 1 - gap, gap,
                 float(np.mean(g[t != 0] == 0)))


@dataclass
class GradientRow:
    """The loss's gradient with respect to one parameter, by one mode in one dtype, against the truth;
    ``forward_norm``: the norm error of the float64 backward through the dtype's forward pass (the forward's part)."""

    dtype: str
    mode: str
    gradient: str
    error: Error
    forward_norm: float | None


@dataclass
class LayerRow:
    """One layer's VJP alone (input and Delta from the truth, rounded to the dtype) against its float64 VJP."""

    dtype: str
    mode: str
    layer: str
    index: int  # the layer's position; the loss comes after the last layer
    gradient: str  # "x" (the layer's input) or a parameter's name
    error: Error


@dataclass
class ForwardRow:
    """One layer's output in the dtype against float64, from the same rounded inputs."""

    dtype: str
    forward: str  # "im2col" or "flip": which forward pass the conv layers take
    layer: str
    index: int
    error: Error
    ties: int | None = None  # max-pooling layers: windows whose (nonzero) maximum is tied in the dtype
    ties_float64: int | None = None  # ... and in float64 from the same rounded inputs


@dataclass
class Report:
    gradients: list[GradientRow]
    layers: list[LayerRow]
    forward: list[ForwardRow]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "gradients": [asdict(r) for r in self.gradients],
                           "layers": [asdict(r) for r in self.layers], "forward": [asdict(r) for r in self.forward]},
                          indent=2)

    def table(self) -> str:
        """The three views as plain-text tables, and the float64 check."""
        errors = ("median rel", "max rel", "norm rel", "1 - cosine", "flushed")
        columns = gradcheck._columns
        lines = ["The loss's gradient, each mode in each dtype against its float64 twin (same rounded inputs):",
                 columns(("dtype", "mode", "gradient", *errors, "forward's part"),
                         [(r.dtype, r.mode, r.gradient, *_cells(r.error), _num(r.forward_norm))
                          for r in self.gradients]),
                 "", "Each layer's VJP alone (its input and Delta from the truth, rounded to the dtype):",
                 columns(("dtype", "mode", "layer", "gradient", *errors),
                         [(r.dtype, r.mode, r.layer, r.gradient, *_cells(r.error)) for r in self.layers]),
                 "", "The forward pass, each layer's output against float64:",
                 columns(("dtype", "forward", "layer", *errors, "tied windows (float64)"),
                         [(r.dtype, r.forward, r.layer, *_cells(r.error),
                           "-" if r.ties is None else f"{r.ties} ({r.ties_float64})") for r in self.forward]),
                 "", f"truth: {self.meta['truth_dtype']}; the modes' float64 gradients agree to "
                     f"{self.meta['float64_spread']:.1e} (max |a - b| / max |b|)"]
        return "\n".join(lines)


def _cells(err: Error) -> tuple[str, ...]:
    return (_num(err.median), _num(err.max), _num(err.norm), _num(err.one_minus_cosine), _num(err.flushed, ".1%"))


def _num(value: float | None, spec: str = ".1e") -> str:
    return gradcheck._num(value, spec)


def check_precision(net: nw.Sequential, params: dict, x, labels, *, loss: str = "ce", dtypes=DTYPES,
                    modes=DEFAULT_MODES, layers: bool = True, matmul_precision: str | None = None) -> Report:
    """Each mode's gradient of ``loss(net(x), labels)`` in each of ``dtypes`` against the float64 gradient of the
    same rounded inputs (module docstring). ``modes``: names from ``MODES``; "autodiff first-max" is autodiff
    with max pooling written as ``lax.reduce_window``, whose gradient goes to the first maximum of a tied window
    as the hand rule's does (autodiff of our forward splits it evenly). ``layers``: also each layer's VJP alone
    and each layer's output. ``matmul_precision``: JAX's ``default_matmul_precision`` for the computation
    ("highest" keeps float32 products in float32 on GPUs, whose default may round their operands to TF32; no
    effect on CPU). x64 is on during the check, so the truth is float64 whatever the global setting."""
    modes = tuple(modes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"check_precision: modes must be among {', '.join(map(repr, MODES))}, got {mode!r}")
    if not modes:
        raise ValueError("check_precision: modes is empty; name at least one of " + ", ".join(map(repr, MODES)))
    if loss not in LOSSES:
        raise ValueError(f"check_precision: loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    with jax.enable_x64(True), jax.default_matmul_precision(matmul_precision):
        dtypes = [jnp.dtype(d) for d in dtypes]
        for d in dtypes:
            if not jnp.issubdtype(d, jnp.floating):
                raise ValueError(f"check_precision: dtypes must be floating-point, got {d}")
        x, labels = jnp.asarray(x), jnp.asarray(labels)
        net.shapes(x.shape[1:])
        names = jax.tree_util.tree_leaves(gradcheck._path_names(params))
        report = Report([], [], [], {"network": net.name, "batch": int(x.shape[0]), "input_shape": list(x.shape[1:]),
                                     "loss": loss, "modes": modes, "dtypes": [str(d) for d in dtypes],
                                     "floor": FLOOR, "backend": jax.default_backend(),
                                     "matmul_precision": matmul_precision or "default"})
        spreads, compute = [], _compute(net, loss, modes, layers)
        for dtype in dtypes:
            inputs = _cast({"params": params, "x": x}, dtype)  # the rounded values both sides start from
            out = compute(inputs, labels)
            report.meta["truth_dtype"] = str(jax.tree_util.tree_leaves(out[modes[0]]["truth"])[0].dtype)
            truths = [jax.tree_util.tree_leaves(out[m]["truth"]["params"]) for m in modes]
            spreads += [_spread(a, b) for other in truths[1:] for a, b in zip(truths[0], other)]
            for mode in modes:
                o = out[mode]
                low, truth, fwd = (jax.tree_util.tree_leaves(o[k]["params"]) for k in ("low", "truth", "forward"))
                for name, g, t, f in zip(names, low, truth, fwd):
                    report.gradients.append(GradientRow(str(dtype), mode, name, error(g, t), error(f, t).norm))
                if layers:
                    report.layers += _layer_rows(net, str(dtype), mode, o["layers"])
                    if mode == next(m for m in modes if MODES[m][1] == MODES[mode][1]):  # one set per forward
                        report.forward += [
                            ForwardRow(str(dtype), MODES[mode][1], _label(net, i), i, error(a, b),
                                       *(None if t is None else int(t) for t in o["ties"][i]))
                            for i, (a, b) in enumerate(zip(o["outputs"], o["truth_outputs"][1:]))]
        report.meta["float64_spread"] = max(spreads, default=0.0)
        return report


def _spread(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0) / max(np.abs(b).max(initial=0), np.finfo(np.float64).tiny))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(dtype), tree)


def _label(net: nw.Sequential, index: int) -> str:
    if index == len(net.layers):
        return "loss"
    return f"layer {index} ({nw.describe(net.layers[index])})"


def _layer_rows(net: nw.Sequential, dtype: str, mode: str, pulled: dict) -> list[LayerRow]:
    rows = []
    for i, ((low_p, low_x), (truth_p, truth_x)) in pulled.items():
        leaves = jax.tree_util.tree_leaves
        pairs = zip(leaves(gradcheck._path_names(low_p)), leaves(low_p), leaves(truth_p))
        for name, a, b in [*pairs, ("x" if i < len(net.layers) else "z", low_x, truth_x)]:
            rows.append(LayerRow(dtype, mode, _label(net, i), i, name, error(a, b)))
    return rows


def _compute(net: nw.Sequential, loss: str, modes: tuple[str, ...], layers: bool):
    """One jitted function of the rounded inputs computing, for every mode: the gradient in their dtype ("low"),
    in float64 ("truth"), the float64 backward through the dtype's forward ("forward"), and with ``layers`` each
    layer's VJP alone in both precisions and each layer's output in both."""
    f64 = jnp.float64

    def run(inputs, labels):
        dtype = jax.tree_util.tree_leaves(inputs)[0].dtype
        exact = _cast(inputs, f64)
        out = {}
        for mode in modes:
            def value(inp, taps=None, lows=None, mode=mode):
                h, seen = inp["x"], [inp["x"]]
                for i, (name, layer) in enumerate(zip(net.names, net.layers)):
                    h = _apply(layer, inp["params"][name] if name else {}, h, mode)
                    if lows is not None:  # the dtype's value, float64's derivative
                        h = h + jax.lax.stop_gradient(lows[i].astype(h.dtype) - h)
                    if taps is not None:  # d value / d tap_i: the truth's Delta of layer i
                        h = h + taps[i]
                    seen.append(h)
                return LOSSES[loss](h, labels, grad=MODES[mode][0]), seen

            (_, outputs), low = jax.value_and_grad(value, has_aux=True)(inputs)
            taps = [jnp.zeros_like(o, f64) for o in outputs[1:]]
            (truth, deltas), truth_outputs = jax.grad(
                lambda inp, taps: value(inp, taps), argnums=(0, 1), has_aux=True)(exact, taps)
            forward = jax.grad(lambda inp, lows: value(inp, lows=lows)[0])(exact, outputs[1:])
            out[mode] = {"low": low, "truth": truth, "forward": forward}
            if layers:
                out[mode]["outputs"] = outputs[1:]
                out[mode]["truth_outputs"] = truth_outputs
                out[mode]["ties"] = [(_ties(layer, inputs["params"].get(name, {}), outputs[i]),
                                      _ties(layer, exact["params"].get(name, {}), truth_outputs[i]))
                                     for i, (name, layer) in enumerate(zip(net.names, net.layers))]
                out[mode]["layers"] = _pullbacks(net, loss, mode, inputs["params"], labels, truth_outputs,
                                                 deltas, dtype)
        return out

    return jax.jit(run)


def _apply(layer: nw.Layer, p: dict, h: jax.Array, mode: str) -> jax.Array:
    if mode == "autodiff first-max":
        return gradcheck._apply_layer(layer, p, h, "first-max")
    grad, rule = MODES[mode]
    if rule == "winograd":
        layer, rule = gradcheck.with_winograd(layer), None
    return layer.apply(p, h, grad=grad, rule=rule)


def _pullbacks(net, loss, mode, params, labels, truth_outputs, deltas, dtype) -> dict:
    """For each layer with a gradient mode (Flatten, a reshape, has none) and the loss: (VJP in ``dtype``, VJP in
    float64) from the truth's input and Delta rounded to ``dtype``; each VJP is (d params, d input)."""
    pulled = {}
    for i, (name, layer) in enumerate(zip(net.names, net.layers)):
        if not hasattr(layer, "grad"):
            continue
        p = params[name] if name else {}
        h, delta = truth_outputs[i].astype(dtype), deltas[i].astype(dtype)
        pair = []
        for d in (dtype, jnp.float64):
            _, pull = jax.vjp(lambda p, h, layer=layer: _apply(layer, p, h, mode), _cast(p, d), h.astype(d))
            pair.append(pull(delta.astype(d)))
        pulled[i] = tuple(pair)
    z, grad = truth_outputs[-1].astype(dtype), MODES[mode][0]
    pulled[len(net.layers)] = tuple(({}, jax.grad(lambda z: LOSSES[loss](z, labels, grad=grad))(z.astype(d)))
                                    for d in (dtype, jnp.float64))
    return pulled


def _ties(layer: nw.Layer, p: dict, h: jax.Array) -> jax.Array | None:
    """Windows of a max-pooling layer (or block) whose maximum is nonzero and occurs more than once, for its input
    ``h``: where the hand rule's first maximum and autodiff's equal split part ways (zero maxima are ReLU's zeros,
    whose gradient the mask drops either way)."""
    if type(layer) is nw.MaxPool:
        win, v = layer.geometry(h.shape[1:]), h
    elif isinstance(layer, nw.ConvReLUPool):
        s, win = gradcheck._block_pre_pool(h, p["w"], p.get("b"), **gradcheck._block_geometry(layer))
        v = jnp.maximum(s, 0)
    else:
        return None
    w = pool._windows(win, v, -jnp.inf)
    top = w.max(axis=(3, 4), keepdims=True)
    return jnp.sum((jnp.sum(w == top, axis=(3, 4)) > 1) & (top[:, :, :, 0, 0] > 0))
