"""The same network in PyTorch, for the benchmark's outside baseline (``jaxcnn bench``'s ``pytorch`` rows).

``module(net, input_shape)`` builds a ``torch.nn.Module`` that computes what ``net`` computes in training mode
(batch norm with batch statistics; dropout left out, as in the JAX variants the benchmark times), on NCHW
tensors; given ``params`` (this library's pytree) it carries the same weights, so a test can check that the
mirror is the same function with the same gradients before its time is compared with ours. Kernels go HWIO ->
OIHW, dense weights (in, out) -> (out, in), and a dense layer after ``Flatten`` gets its rows reordered: ours
flattens (H, W, C), PyTorch flattens (C, H, W).

PyTorch is not a dependency: import this module only where ``torch`` is importable.
"""

from __future__ import annotations

import numpy as np
import torch

from jaxcnn import network as nw

ACTIVATIONS = {
    "relu": lambda layer: torch.nn.ReLU(),
    "sigmoid": lambda layer: torch.nn.Sigmoid(),
    "tanh": lambda layer: torch.nn.Tanh(),
    "leaky_relu": lambda layer: torch.nn.LeakyReLU(layer.negative_slope),
    "elu": lambda layer: torch.nn.ELU(layer.alpha),
    "gelu": lambda layer: torch.nn.GELU(approximate="tanh" if layer.approximate else "none"),
    "softmax": lambda layer: torch.nn.Softmax(dim=-1),
    "global_avg_pool": lambda layer: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
}


def supported(net: nw.Sequential) -> bool:
    """Whether every layer of ``net`` (residual bodies included) has a PyTorch mirror (custom layers have none)."""
    def ok(layer):
        if isinstance(layer, nw.Residual):
            return all(ok(inner) for inner in layer.layers)
        return isinstance(layer, (nw.Conv, nw.MaxPool, nw.BatchNorm, nw.Dense, nw.Flatten, nw.Dropout)) or \
            getattr(layer, "type", None) in ACTIVATIONS
    return all(ok(layer) for layer in net.layers)


class Residual(torch.nn.Module):
    """body(x) + shortcut(x): the shortcut the identity or a 1x1 convolution (``nw.Residual``)."""

    def __init__(self, body: torch.nn.Module, shortcut: torch.nn.Module | None):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


def module(net: nw.Sequential, input_shape, params=None) -> torch.nn.Module:
    """``net`` as a ``torch.nn.Module`` on the CPU taking [N, C, H, W] inputs (``input_shape`` is ours, (H, W, C)),
    with ``params`` copied in (in their dtype) when given, else PyTorch's own float32 initialisation."""
    if not supported(net):
        raise ValueError(f"torch mirror: {net.name} has a layer with no PyTorch mirror (custom layers)")
    return _sequential(net.layers, tuple(input_shape), params)


def _tensor(array, transpose=None) -> torch.nn.Parameter:
    a = np.asarray(array)
    return torch.nn.Parameter(torch.from_numpy(np.array(a if transpose is None else a.transpose(transpose))))


def _conv(layer: nw.Conv, shape, w=None, b=None) -> list[torch.nn.Module]:
    win = layer.geometry(shape)
    (top, bottom), (left, right) = win.padding
    pad = []
    if top != bottom or left != right:  # PyTorch pads both sides alike: pad explicitly first
        pad, top, left = [torch.nn.ZeroPad2d((left, right, top, bottom))], 0, 0
    conv = torch.nn.Conv2d(shape[-1], layer.features, win.size, win.stride, (top, left), win.dilation,
                           bias=b is not None if w is not None else layer.bias)
    if w is not None:
        conv.weight = _tensor(w, (3, 2, 0, 1))  # HWIO -> OIHW
        if b is not None:
            conv.bias = _tensor(b)
    return [*pad, conv]


def _batch_norm(layer, channels: int, image: bool, p=None) -> torch.nn.Module:
    kind = torch.nn.BatchNorm2d if image else torch.nn.BatchNorm1d
    bn = kind(channels, layer.eps, 1 - layer.momentum)  # ours: running = m running + (1 - m) batch
    if p is not None:
        bn.weight, bn.bias = _tensor(p["gamma"]), _tensor(p["beta"])
    return bn


def _sequential(layers, shape, params) -> torch.nn.Sequential:
    body = nw.Sequential(layers, name="mirror")
    shapes = [shape, *body.shapes(shape)]
    out, flat_from = [], None
    for name, layer, shape in zip(body.names, layers, shapes):
        p = params[name] if params is not None and name else None
        if isinstance(layer, nw.ConvBNReLU):
            out += [*_conv(layer, shape, p and p["w"]), _batch_norm(layer.batch_norm, layer.features, True, p),
                    torch.nn.ReLU()]
        elif isinstance(layer, nw.Conv):
            out += _conv(layer, shape, p and p["w"], p and p.get("b"))
            if isinstance(layer, nw.ConvReLUPool):
                out += [torch.nn.ReLU(), torch.nn.MaxPool2d(layer.pool_geometry().size)]
        elif isinstance(layer, nw.MaxPool):
            win = layer.geometry(shape)
            (top, _), (left, _) = win.padding
            kind = torch.nn.AvgPool2d if isinstance(layer, nw.AvgPool) else torch.nn.MaxPool2d
            out.append(kind(win.size, win.stride, (top, left)))
        elif isinstance(layer, nw.BatchNorm):
            out.append(_batch_norm(layer, shape[-1], len(shape) == 3, p))
        elif isinstance(layer, nw.Residual):
            proj = layer.shortcut(shape)
            shortcut = None if proj is None else torch.nn.Sequential(*_conv(proj, shape, p and p["proj"]["w"]))
            out.append(Residual(_sequential(layer.layers, shape, p), shortcut))
        elif isinstance(layer, nw.Flatten):
            out.append(torch.nn.Flatten())
            flat_from = shape
        elif isinstance(layer, nw.Dense):
            dense = torch.nn.Linear(shape[-1], layer.features, bias=layer.bias)
            if p is not None:
                w = np.asarray(p["w"])
                if flat_from is not None and len(flat_from) == 3:  # rows (h, w, c) -> (c, h, w)
                    w = w.reshape(*flat_from, -1).transpose(2, 0, 1, 3).reshape(w.shape)
                dense.weight = _tensor(w, (1, 0))
                if layer.bias:
                    dense.bias = _tensor(p["b"])
            out.append(dense)
            flat_from = None
        elif not isinstance(layer, nw.Dropout):  # dropout: left out, as in the JAX variants timed
            out.append(ACTIVATIONS[layer.type](layer))
    return torch.nn.Sequential(*out)
