"""Networks: a ``Sequential`` list of layer specs, with shape checking, init, apply, TOML configs and presets.

    net = jc.Sequential([jc.Conv(32, 5, padding=2), jc.ReLU(), jc.MaxPool(2), jc.Flatten(), jc.Dense(10)])
    params = net.init(jax.random.key(0), (28, 28, 1))   # {"conv1": {"w", "b"}, "dense1": {"w", "b"}}
    logits = net.apply(params, x, grad="hand")           # x: [N, 28, 28, 1]

Layer specs are frozen dataclasses (hashable, comparable); params are a plain dict of dicts of arrays, keyed by
layer names ``conv1, conv2, ..., dense1, ...`` in order. ``grad`` and ``rule`` are chosen per network in
``apply`` and can be overridden per layer (``Conv(..., grad="autodiff")``). A TOML file describes a network as a
list of ``[[layers]]`` tables; presets are such files shipped with the package (simpleNN keeps one config per
architecture; so do we).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import ops
from jaxcnn.custom import CustomOp
from jaxcnn.ops import _args, winograd
from jaxcnn.ops._windows import Window
from jaxcnn.ops.block import pool_geometry as block_pool_geometry
from jaxcnn.ops.conv import geometry as conv_geometry
from jaxcnn.ops.conv import resolve as resolve_rule
from jaxcnn.ops.pool import geometry as pool_geometry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Shape = tuple[int, ...]

# "he_normal" is simpleNN's: N(0, 2 / fan_in), not truncated (jax.nn.initializers.he_normal truncates).
INITIALIZERS = {
    "he_normal": None,
    "he_uniform": jax.nn.initializers.he_uniform(),
    "glorot_normal": jax.nn.initializers.glorot_normal(),
    "glorot_uniform": jax.nn.initializers.glorot_uniform(),
    "lecun_normal": jax.nn.initializers.lecun_normal(),
    "lecun_uniform": jax.nn.initializers.lecun_uniform(),
}


CONFIG_KEYS = {"name", "description", "layers", "train"}  # the top level of a network config (TOML or dict)


def _check_mode(layer: str, grad, rule=None) -> None:
    if grad is not None:
        _args.choice(layer, "grad", grad, _args.GRAD_MODES)
    if rule is not None:
        _args.choice(layer, "rule", rule, _args.CONV_RULES)


MAX_FEATURES = 2**20  # a stated bound, checked before anything is allocated (a typo of 2**31 would not fit in memory)


def _check_features(layer: str, features) -> None:
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"{layer}: features must be a positive int, got {features!r}")
    if features > MAX_FEATURES:
        raise ValueError(f"{layer}: features = {features} exceeds the limit of {MAX_FEATURES} (2^20)")


def _check_init(layer: str, init) -> None:
    if init not in INITIALIZERS:
        raise ValueError(f"{layer}: init must be one of {', '.join(INITIALIZERS)}, got {init!r}")


def _reverse_mode(layer_grad: str | None, grad: str) -> str:
    """The gradient mode for ops that have a hand VJP but no hand tangent rule (batch norm, dropout, the residual
    join): "tangent" becomes "autodiff" (JAX's own forward mode of the same forward pass)."""
    grad = layer_grad or grad
    return "autodiff" if grad == "tangent" else grad


class Layer:
    """Base of the layer specs: no parameters, shape-preserving unless ``apply`` says otherwise."""

    type: ClassVar[str]
    prefix: ClassVar[str | None] = None  # params name prefix ("conv", "dense"); None: no parameters

    def param_shapes(self, in_shape: Shape) -> dict[str, Shape]:
        return {}

    def state_shapes(self, in_shape: Shape) -> dict[str, Shape]:
        """Arrays the layer carries beside its params (running statistics), none for most layers."""
        return {}

    @property
    def stateful(self) -> bool:
        return False

    @property
    def random(self) -> bool:
        """Whether the layer draws random numbers in training (dropout)."""
        return False

    def apply(self, params: dict, x: jax.Array, *, grad: str, rule: str) -> jax.Array:
        raise NotImplementedError

    def forward(self, params: dict, state: dict, x: jax.Array, *, grad: str, rule: str, train: bool,
                axis_name: str | None, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """``(output, new state)``; a layer without state or randomness is its ``apply``. ``rng``: one PRNG key
        per example (training with dropout)."""
        return self.apply(params, x, grad=grad, rule=rule), state


@dataclass(frozen=True)
class Conv(Layer):
    """Convolution ``jc.conv2d`` with ``features`` output channels and a ``kernel`` x ``kernel`` window."""

    features: int
    kernel: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    padding: Any = 0
    dilation: int | tuple[int, int] = 1
    bias: bool = True
    init: str = "he_normal"
    grad: str | None = None
    rule: str | None = None
    store_phi: bool | None = None
    block: int | str | None = None
    type: ClassVar[str] = "conv"
    prefix: ClassVar[str] = "conv"

    def __post_init__(self):
        _check_features(self.type, self.features)
        _check_init(self.type, self.init)
        _check_mode(self.type, self.grad)
        resolve_rule(self.type, self.rule, self.store_phi, self.block)
        if self.rule == "winograd":
            winograd.check(self.type, *self._pairs())

    def _pairs(self) -> tuple:
        return tuple(_args.positive_pair(self.type, name, getattr(self, name)) for name in
                     ("kernel", "stride", "dilation"))

    def winograd_applies(self) -> bool:
        """Whether ``rule="winograd"`` computes this layer: a 3x3 kernel, stride 1, no dilation."""
        return winograd.applies(*self._pairs())

    def param_shapes(self, in_shape):
        kh, kw = _args.positive_pair(self.type, "kernel", self.kernel)
        return {"w": (kh, kw, in_shape[-1], self.features), **({"b": (self.features,)} if self.bias else {})}

    def geometry(self, in_shape: Shape) -> Window:
        """The convolution's resolved geometry (stride, dilation, padding pairs) over an input (H, W, C)."""
        kernel = _args.positive_pair(self.type, "kernel", self.kernel)
        return conv_geometry(self.type, in_shape[:2], kernel, self.stride, self.padding, self.dilation)

    def apply(self, params, x, *, grad, rule):
        return ops.conv2d(x, params["w"], params.get("b"), stride=self.stride, padding=self.padding,
                          dilation=self.dilation, grad=self.grad or grad, rule=self.rule or rule,
                          store_phi=self.store_phi, block=self.block)


@dataclass(frozen=True)
class ConvReLUPool(Conv):
    """Lin's fused block ``jc.conv_relu_pool``: convolution, ReLU and ``pool`` x ``pool`` max pooling."""

    pool: int | tuple[int, int] = 2
    type: ClassVar[str] = "conv_relu_pool"

    def pool_geometry(self) -> Window:
        """The max-pooling window over the conv output: ``pool`` x ``pool``, stride ``pool``, no padding."""
        return block_pool_geometry(self.type, self.pool)

    def apply(self, params, x, *, grad, rule):
        return ops.conv_relu_pool(x, params["w"], params.get("b"), stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, pool=self.pool, grad=self.grad or grad,
                                  rule=self.rule or rule, store_phi=self.store_phi, block=self.block)


@dataclass(frozen=True)
class MaxPool(Layer):
    """``jc.max_pool2d``; the stride defaults to the window, as in the notes."""

    window: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    padding: Any = "VALID"
    grad: str | None = None
    type: ClassVar[str] = "max_pool"

    def __post_init__(self):
        _check_mode(self.type, self.grad)

    def geometry(self, in_shape: Shape) -> Window:
        """The pooling window's resolved geometry over an input (H, W, C)."""
        return pool_geometry(self.type, in_shape[:2], self.window, self.stride, self.padding)

    def apply(self, params, x, *, grad, rule):
        return ops.max_pool2d(x, self.window, self.stride, self.padding, grad=self.grad or grad)


@dataclass(frozen=True)
class AvgPool(MaxPool):
    """``jc.avg_pool2d``; the stride defaults to the window."""

    type: ClassVar[str] = "avg_pool"

    def apply(self, params, x, *, grad, rule):
        return ops.avg_pool2d(x, self.window, self.stride, self.padding, grad=self.grad or grad)


@dataclass(frozen=True)
class _Activation(Layer):
    """A parameter-free layer that is one op, ``op(x, **settings, grad=...)``; its tangent rule is
    ``ops.JVP[op]((x,), (dx,), **settings)``. The settings are the fields other than ``grad``, which is
    keyword-only so that a subclass's first setting comes first (``LeakyReLU(0.1)``)."""

    grad: str | None = field(default=None, kw_only=True)
    op: ClassVar[Any]

    def __post_init__(self):
        _check_mode(self.type, self.grad)
        if self.settings():  # the op checks its own settings (a slope, an alpha)
            jax.eval_shape(lambda x: type(self).op(x, **self.settings()), jax.ShapeDtypeStruct((1, 1, 1, 1),
                                                                                                jnp.float32))

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "grad"}

    def apply(self, params, x, *, grad, rule):
        return type(self).op(x, **self.settings(), grad=self.grad or grad)


@dataclass(frozen=True)
class ReLU(_Activation):
    type: ClassVar[str] = "relu"
    op: ClassVar[Any] = staticmethod(ops.relu)


@dataclass(frozen=True)
class Sigmoid(_Activation):
    type: ClassVar[str] = "sigmoid"
    op: ClassVar[Any] = staticmethod(ops.sigmoid)


@dataclass(frozen=True)
class Tanh(_Activation):
    type: ClassVar[str] = "tanh"
    op: ClassVar[Any] = staticmethod(ops.tanh)


@dataclass(frozen=True)
class LeakyReLU(_Activation):
    """``jc.leaky_relu``: S for S > 0, ``negative_slope`` S otherwise."""

    negative_slope: float = 0.01
    type: ClassVar[str] = "leaky_relu"
    op: ClassVar[Any] = staticmethod(ops.leaky_relu)


@dataclass(frozen=True)
class ELU(_Activation):
    """``jc.elu``: S for S > 0, ``alpha`` (e^S - 1) otherwise."""

    alpha: float = 1.0
    type: ClassVar[str] = "elu"
    op: ClassVar[Any] = staticmethod(ops.elu)


@dataclass(frozen=True)
class GELU(_Activation):
    """``jc.gelu``: S Phi(S), by the tanh approximation (``approximate``) or exactly."""

    approximate: bool = True
    type: ClassVar[str] = "gelu"
    op: ClassVar[Any] = staticmethod(ops.gelu)


@dataclass(frozen=True)
class Softmax(_Activation):
    """``jc.softmax`` over the last axis, as a layer (for a network that outputs probabilities; train on the
    logits before it with ``softmax_cross_entropy``)."""

    type: ClassVar[str] = "softmax"
    op: ClassVar[Any] = staticmethod(ops.softmax)


@dataclass(frozen=True)
class GlobalAvgPool(_Activation):
    """``jc.global_avg_pool``: [N, H, W, C] -> [N, C], each channel's mean; a classifier head without Flatten."""

    type: ClassVar[str] = "global_avg_pool"
    op: ClassVar[Any] = staticmethod(ops.global_avg_pool)


@dataclass(frozen=True)
class BatchNorm(Layer):
    """``jc.batch_norm`` over the channels (the last axis) with a learned scale ``gamma`` and shift ``beta``, and
    running averages of the batch statistics as state: in training (``train=True``) it normalises with the
    batch's mean and (biased) variance and updates running = momentum running + (1 - momentum) batch; in
    evaluation it normalises with the running averages. Inside the trainer's data-parallel step the statistics
    are synchronised over the devices (the same for any device count). ``grad="tangent"`` differentiates it by
    autodiff (it has no hand tangent rule)."""

    momentum: float = 0.9
    eps: float = 1e-5
    grad: str | None = None
    type: ClassVar[str] = "batch_norm"
    prefix: ClassVar[str] = "bn"

    def __post_init__(self):
        _check_mode(self.type, self.grad)
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or \
                not 0 <= self.momentum < 1:
            raise ValueError(f"batch_norm: momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"batch_norm: eps must be a number > 0, got {self.eps!r}")

    def param_shapes(self, in_shape):
        return {"gamma": (in_shape[-1],), "beta": (in_shape[-1],)}

    def state_shapes(self, in_shape):
        return {"mean": (in_shape[-1],), "var": (in_shape[-1],)}

    @property
    def stateful(self) -> bool:
        return True

    def init_params(self, key: jax.Array, in_shape: Shape, dtype) -> dict:
        return {"gamma": jnp.ones(in_shape[-1], dtype), "beta": jnp.zeros(in_shape[-1], dtype)}

    def init_state(self, in_shape: Shape) -> dict:
        return {"mean": jnp.zeros(in_shape[-1], jnp.float32), "var": jnp.ones(in_shape[-1], jnp.float32)}

    def updated(self, state: dict | None, mean: jax.Array, var: jax.Array) -> dict | None:
        """The running averages after a batch with statistics ``mean``, ``var``: running = momentum running +
        (1 - momentum) batch, no gradient flowing into the state (None without ``state``)."""
        if state is None:
            return None
        update = lambda running, batch: (self.momentum * running + (1 - self.momentum) * jax.lax.stop_gradient(batch)
                                         ).astype(running.dtype)
        return {"mean": update(state["mean"], mean), "var": update(state["var"], var)}

    def apply(self, params, x, *, grad, rule):  # training mode, batch statistics
        return self.forward(params, None, x, grad=grad, rule=rule, train=True, axis_name=None)[0]

    def forward(self, params, state, x, *, grad, rule, train, axis_name, rng=None):
        mode = _reverse_mode(self.grad, grad)
        if train:
            y, mean, var = ops.batch_norm(x, params["gamma"], params["beta"], eps=self.eps, axis_name=axis_name,
                                          grad=mode)
            return y, self.updated(state, mean, var)
        y = ops.batch_norm(x, params["gamma"], params["beta"], mean=state["mean"], var=state["var"], eps=self.eps,
                           grad=mode)[0]
        return y, state


@dataclass(frozen=True)
class ConvBNReLU(Conv):
    """``jc.conv_bn_relu``: convolution (no bias), batch norm, ReLU as one layer whose training backward keeps only
    its input and output (the fused block); params ``w``, ``gamma``, ``beta`` and state ``mean``, ``var`` under one
    name. In evaluation it is the chain with the running averages."""

    bias: bool = False
    momentum: float = 0.9
    eps: float = 1e-5
    type: ClassVar[str] = "conv_bn_relu"

    def __post_init__(self):
        super().__post_init__()
        if self.bias:
            raise ValueError("conv_bn_relu: bias must be False (batch norm subtracts it again; beta is the shift)")
        if self.store_phi:
            raise ValueError("conv_bn_relu: store_phi must be None or False: the fused block keeps only its input and "
                             "output for the backward and recomputes S; block= builds phi(pad(Z)) a few examples "
                             "at a time instead")
        BatchNorm(self.momentum, self.eps)  # checks them

    @property
    def batch_norm(self) -> BatchNorm:
        """Its batch norm, on the convolution's ``features`` channels."""
        return BatchNorm(self.momentum, self.eps, self.grad)

    def param_shapes(self, in_shape):
        return {**super().param_shapes(in_shape), **self.batch_norm.param_shapes((self.features,))}

    def state_shapes(self, in_shape):
        return self.batch_norm.state_shapes((self.features,))

    @property
    def stateful(self) -> bool:
        return True

    def init_params(self, key: jax.Array, in_shape: Shape, dtype) -> dict:
        conv = Conv(self.features, self.kernel, self.stride, self.padding, self.dilation, bias=False, init=self.init)
        w = Sequential([conv]).init(key, in_shape, dtype)["conv1"]["w"]
        return {"w": w, **self.batch_norm.init_params(key, (self.features,), dtype)}

    def init_state(self, in_shape: Shape) -> dict:
        return self.batch_norm.init_state((self.features,))

    def apply(self, params, x, *, grad, rule):  # training mode, batch statistics
        return self.forward(params, None, x, grad=grad, rule=rule, train=True, axis_name=None)[0]

    def forward(self, params, state, x, *, grad, rule, train, axis_name, rng=None):
        mode, geometry = _reverse_mode(self.grad, grad), dict(stride=self.stride, padding=self.padding,
                                                              dilation=self.dilation)
        if not train:
            s = ops.conv2d(x, params["w"], **geometry, grad=mode, rule=self.rule or rule, block=self.block)
            y = self.batch_norm.forward(params, state, s, grad=grad, rule=rule, train=False, axis_name=None)[0]
            return ops.relu(y, grad=mode), state
        y, mean, var = ops.conv_bn_relu(x, params["w"], params["gamma"], params["beta"], **geometry, eps=self.eps,
                                        axis_name=axis_name, grad=mode, rule=self.rule or rule, block=self.block)
        return y, self.batch_norm.updated(state, mean, var)


@dataclass(frozen=True)
class Dropout(Layer):
    """``jc.dropout`` in training (each example's mask from its own key, so a batch split over devices draws the
    same masks), the identity in evaluation (inverted dropout needs no rescaling there). ``apply``, the layer as a
    function of its input alone, is the evaluation's identity."""

    rate: float = 0.5
    grad: str | None = None
    type: ClassVar[str] = "dropout"

    def __post_init__(self):
        _check_mode(self.type, self.grad)
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate < 1:
            raise ValueError(f"dropout: rate must be in [0, 1), got {self.rate!r}")

    @property
    def random(self) -> bool:
        return True

    def apply(self, params, x, *, grad, rule):
        return x

    def forward(self, params, state, x, *, grad, rule, train, axis_name, rng=None):
        if not train or self.rate == 0:
            return x, state
        if rng is None:
            raise ValueError("dropout in training needs random keys: rng= (one jax.random.key, or one per example)")
        keys = jax.random.split(rng, x.shape[0]) if rng.ndim == 0 else rng
        if keys.shape != (x.shape[0],):
            raise ValueError(f"dropout: rng must be one key or one per example ({x.shape[0]}), got shape "
                             f"{keys.shape}")
        grad = _reverse_mode(self.grad, grad)
        drop = lambda xi, ki: ops.dropout(xi, self.rate, ki, grad=grad)
        return jax.vmap(drop)(x, keys), state


@dataclass(frozen=True)
class Residual(Layer):
    """A residual block: y = body(x) + shortcut(x), with ``layers`` the body (any layers, batch norm included)
    and the shortcut x itself when the body keeps x's shape, else a projection, a 1x1 convolution whose stride
    matches the body's downsampling (He et al.'s option B; ``projection=True`` forces one).

    Backward, from the computational graph (Sadeghzadeh): the join y = a + b passes Delta to both branches
    unchanged (``jc.ops.residual_add``'s hand rule), and at the fork, where x feeds both branches, the cotangents
    add: dx = J_body^T Delta + J_shortcut^T Delta, with J_shortcut^T Delta = Delta for the identity. Each layer of
    the body backpropagates by its own hand rule. Params: the body's by its layer names, and ``proj``.
    """

    layers: tuple[Layer, ...]
    projection: bool | None = None
    grad: str | None = None
    type: ClassVar[str] = "residual"
    prefix: ClassVar[str] = "res"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        Sequential(self.layers, name="residual body")  # checks the layer specs
        if self.projection not in (None, True, False):
            raise TypeError(f"residual: projection must be True, False or None (when shapes differ), got "
                            f"{self.projection!r}")
        _check_mode(self.type, self.grad)

    @property
    def body(self) -> Sequential:
        return Sequential(self.layers, name="residual body")

    @property
    def stateful(self) -> bool:
        return self.body.stateful

    @property
    def random(self) -> bool:
        return self.body.random

    def shortcut(self, in_shape: Shape) -> Conv | None:
        """The projection for inputs of ``in_shape``, or None (identity)."""
        out = self.body.shapes(in_shape)[-1]
        if len(out) != 3:
            raise ValueError(f"residual: the body must output an image [H, W, C] to add to its input, got "
                             f"{_fmt(out)}")
        if out == tuple(in_shape) and not self.projection:
            return None
        if self.projection is False:
            raise ValueError(f"residual: the body maps {_fmt(in_shape)} to {_fmt(out)}, so the shortcut needs a "
                             f"projection (projection=False forbids it)")
        stride = tuple(-(-i // o) for i, o in zip(in_shape[:2], out[:2]))
        if tuple((i - 1) // st + 1 for i, st in zip(in_shape[:2], stride)) != out[:2]:
            raise ValueError(f"residual: no 1x1 convolution with a stride maps {_fmt(in_shape[:2])} to "
                             f"{_fmt(out[:2])} (the body's height and width)")
        return Conv(out[-1], 1, stride=stride, bias=False)

    def param_shapes(self, in_shape):
        in_shape = tuple(in_shape)
        shapes = [in_shape, *self.body.shapes(in_shape)[:-1]]
        nested = {name: _param_shapes(layer, shape, i)
                  for i, (name, layer, shape) in enumerate(zip(self.body.names, self.layers, shapes)) if name}
        proj = self.shortcut(in_shape)
        return {**nested, **({"proj": proj.param_shapes(in_shape)} if proj else {})}

    def init_params(self, key: jax.Array, in_shape: Shape, dtype) -> dict:
        k_body, k_proj = jax.random.split(key)
        params = self.body.init(k_body, in_shape, dtype)
        proj = self.shortcut(tuple(in_shape))
        if proj is not None:
            params["proj"] = Sequential([proj]).init(k_proj, in_shape, dtype)["conv1"]
        return params

    def init_state(self, in_shape: Shape) -> dict:
        return self.body.init_state(in_shape)

    def apply(self, params, x, *, grad, rule):  # training mode (batch norm with batch statistics)
        return self.forward(params, None, x, grad=grad, rule=rule, train=True, axis_name=None)[0]

    def forward(self, params, state, x, *, grad, rule, train, axis_name, rng=None):
        grad = self.grad or grad
        outs, new_state = self.body.forward({k: v for k, v in params.items() if k != "proj"}, x, grad=grad,
                                            rule=rule, state=state, train=train, axis_name=axis_name, rng=rng)
        proj = self.shortcut(tuple(x.shape[1:]))
        skip = x if proj is None else proj.apply(params["proj"], x, grad=grad, rule=rule)
        return ops.residual_add(outs[-1], skip, grad=_reverse_mode(None, grad)), new_state


@dataclass(frozen=True)
class Flatten(Layer):
    """[N, H, W, C] -> [N, H*W*C] (row-major: channel fastest)."""

    type: ClassVar[str] = "flatten"

    def apply(self, params, x, *, grad, rule):
        return x.reshape(x.shape[0], -1)


@dataclass(frozen=True)
class Dense(Layer):
    """Fully connected ``jc.dense`` with ``features`` outputs; its input must be flat [N, n_in]."""

    features: int
    bias: bool = True
    init: str = "he_normal"
    grad: str | None = None
    type: ClassVar[str] = "dense"
    prefix: ClassVar[str] = "dense"

    def __post_init__(self):
        _check_features(self.type, self.features)
        _check_init(self.type, self.init)
        _check_mode(self.type, self.grad)

    def param_shapes(self, in_shape):
        return {"w": (in_shape[-1], self.features), **({"b": (self.features,)} if self.bias else {})}

    def apply(self, params, x, *, grad, rule):
        return ops.dense(x, params["w"], params.get("b"), grad=self.grad or grad)


@dataclass(frozen=True)
class Custom(Layer):
    """A user op built by ``jaxcnn.custom.custom_op`` as a layer: ``op(x, *params, grad=..., **settings)``.

    ``settings`` are the op's keyword settings as (name, value) pairs, e.g. ``Custom(op, (("slope", 0.1),))``.
    Parameters, if the op has any, are named ``<op name>1``, ``<op name>2``, ... in ``params`` and initialised by
    the op's ``init``. In TOML the layer is ``type = "<op name>"`` with its settings as keys, and the config is
    read with ``Sequential.from_config(config, custom_ops={"<op name>": op})``.
    """

    op: CustomOp
    settings: tuple = ()
    grad: str | None = None
    type: ClassVar[str] = "custom"

    def __post_init__(self):
        if not isinstance(self.op, CustomOp):
            raise TypeError(f"custom layer: op must be built by jaxcnn.custom.custom_op, got {self.op!r}")
        object.__setattr__(self, "settings", tuple(sorted(dict(self.settings).items())))
        _check_mode(self.op.name, self.grad)

    @property
    def prefix(self) -> str | None:  # type: ignore[override]
        return self.op.name if self.op.params else None

    def param_shapes(self, in_shape):
        if not self.op.params:
            return {}
        shapes = jax.eval_shape(lambda k: self.op.init(k, tuple(in_shape), jnp.float32), jax.random.key(0))
        return {k: shapes[k].shape for k in self.op.params}

    def init_params(self, key: jax.Array, in_shape: Shape, dtype) -> dict:
        params = self.op.init(key, tuple(in_shape), dtype)
        if not isinstance(params, dict) or set(params) != set(self.op.params):
            raise ValueError(f"{self.op.name}: init must return a dict with keys {', '.join(self.op.params)}, got "
                             f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
        return {k: jnp.asarray(params[k], dtype) for k in self.op.params}

    def apply(self, params, x, *, grad, rule):
        return self.op(x, *(params[k] for k in self.op.params), grad=self.grad or grad, **dict(self.settings))


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.type: cls for cls in (Conv, ConvReLUPool, ConvBNReLU, MaxPool, AvgPool, ReLU, Sigmoid, Tanh, LeakyReLU, ELU,
                              GELU, Softmax, GlobalAvgPool, BatchNorm, Dropout, Residual, Flatten, Dense)
}


@dataclass(frozen=True)
class Sequential:
    """A network as an ordered list of layer specs. Hashable, so it can be a static argument of ``jax.jit``."""

    layers: tuple[Layer, ...]
    name: str = field(default="network", compare=False)

    def __init__(self, layers: Sequence[Layer], name: str = "network"):
        layers = tuple(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i}: expected a layer spec such as jc.Conv(32, 3) or jc.ReLU(), "
                                f"got {type(layer).__name__} {layer!r}")
        if not layers:
            raise ValueError("a network needs at least one layer")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "name", name)

    @property
    def scopes(self) -> tuple[str, ...]:
        """Each layer's ``jax.named_scope`` in ``forward``, "<index>:<params name or type>" (``0:conv1``,
        ``1:relu``): the layer's operations carry it in XLA's op metadata, so that a profile (``jaxcnn bench
        --profile``, TensorBoard's trace viewer) can tell the layers apart; a residual block's layers are nested
        in its scope (``3:res1/0:conv1``)."""
        return tuple(f"{i}:{name or layer.type}" for i, (name, layer) in enumerate(zip(self.names, self.layers)))

    @property
    def names(self) -> tuple[str | None, ...]:
        """Each layer's key in ``params`` (``conv1``, ``dense1``, ...), or None for layers without parameters."""
        counts: dict[str, int] = {}
        names = []
        for layer in self.layers:
            if layer.prefix is None:
                names.append(None)
                continue
            counts[layer.prefix] = counts.get(layer.prefix, 0) + 1
            names.append(f"{layer.prefix}{counts[layer.prefix]}")
        return tuple(names)

    def shapes(self, input_shape: Shape) -> list[Shape]:
        """Output shape (without the batch axis) after every layer, checking that each layer fits its input.

        Raises ValueError naming the layer index, the layer and the shapes, before anything is compiled.
        """
        input_shape = _input_shape(input_shape)
        shapes, shape = [], input_shape
        for i, layer in enumerate(self.layers):
            params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                            _param_shapes(layer, shape, i), is_leaf=_is_shape)
            x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
            try:
                shape = jax.eval_shape(lambda p, x, layer=layer: layer.apply(p, x, grad="hand", rule=None),
                                       params, x).shape[1:]
            except (ValueError, TypeError) as err:
                raise ValueError(f"layer {i} ({describe(layer)}) does not fit its input of shape "
                                 f"{_fmt(shape)}: {err}") from None
            shapes.append(shape)
        return shapes

    def init(self, key: jax.Array, input_shape: Shape, dtype=jnp.float32) -> dict:
        """Parameters for inputs of shape ``input_shape`` = (H, W, C): weights by each layer's ``init``
        (default simpleNN's He normal, N(0, 2 / fan_in)), biases zero."""
        input_shape = _input_shape(input_shape)
        shapes = [input_shape, *self.shapes(input_shape)[:-1]]
        specs = [(name, layer, _param_shapes(layer, shape, i), shape)
                 for i, (name, layer, shape) in enumerate(zip(self.names, self.layers, shapes)) if name]
        return _init(specs, key, jnp.dtype(dtype))

    @property
    def stateful(self) -> bool:
        """Whether some layer carries state beside its params (batch norm's running averages)."""
        return any(layer.stateful for layer in self.layers)

    @property
    def random(self) -> bool:
        """Whether some layer draws random numbers in training (dropout): ``forward`` then needs ``rng``."""
        return any(layer.random for layer in self.layers)

    def init_state(self, input_shape: Shape) -> dict:
        """The state of a fresh network for inputs of shape ``input_shape``: each stateful layer's, by its params
        name (``{"bn1": {"mean": 0, "var": 1}, ...}``); ``{}`` for a network without state."""
        input_shape = _input_shape(input_shape)
        shapes = [input_shape, *self.shapes(input_shape)[:-1]]
        return {name: layer.init_state(shape) for name, layer, shape in zip(self.names, self.layers, shapes)
                if layer.stateful}

    def apply(self, params: dict, x: jax.Array, *, grad: str = "hand", rule: str | None = None,
              state: dict | None = None) -> jax.Array:
        """The network's output for a batch ``x`` [N, H, W, C], in evaluation mode (batch norm normalises with
        the running averages in ``state``, which a network with batch norm needs). ``grad`` and ``rule`` apply to
        every layer that does not set its own; ``rule=None`` leaves each conv layer the backend's default."""
        return self.outputs(params, x, grad=grad, rule=rule, state=state)[-1]

    def outputs(self, params: dict, x: jax.Array, *, grad: str = "hand", rule: str | None = None,
                state: dict | None = None, train: bool = False, axis_name: str | None = None,
                rng: jax.Array | None = None) -> list[jax.Array]:
        """Every layer's output, in order (the last is ``apply``'s result); see ``forward``."""
        return self.forward(params, x, grad=grad, rule=rule, state=state, train=train, axis_name=axis_name,
                            rng=rng)[0]

    def forward(self, params: dict, x: jax.Array, *, grad: str = "hand", rule: str | None = None,
                state: dict | None = None, train: bool = False, axis_name: str | None = None,
                rng: jax.Array | None = None) -> tuple[list[jax.Array], dict | None]:
        """``(every layer's output, new state)``. ``train=True``: batch norm normalises with the batch's
        statistics (shared over the devices of ``axis_name``) and, given ``state``, returns it with the running
        averages updated (None without); dropout draws its masks from ``rng`` (one key, or one per example; each
        layer folds in its index). ``train=False``: evaluation, with ``state``'s running averages, no dropout."""
        _check_mode(self.name, grad, rule)
        if not train and state is None and self.stateful:
            raise ValueError(f"{self.name} has batch norm: evaluating it needs its running averages, state= (from "
                             f"{self.name}.init_state(input_shape), training, or a saved model's .state)")
        outs, new_state = [], ({} if state is not None else None)
        for i, (name, layer, scope) in enumerate(zip(self.names, self.layers, self.scopes)):
            if name and (not isinstance(params, dict) or name not in params):
                have = sorted(params) if isinstance(params, dict) else type(params).__name__
                raise ValueError(f"layer {i} ({describe(layer)}): params has no entry {name!r} (it has {have}); "
                                 f"make params with {self.name}.init(key, input_shape)")
            has_state = layer.stateful
            if has_state and state is not None and name not in state:
                raise ValueError(f"layer {i} ({describe(layer)}): state has no entry {name!r} (it has "
                                 f"{sorted(state)}); make it with {self.name}.init_state(input_shape)")
            layer_rng = None
            if rng is not None and layer.random:
                layer_rng = jax.random.fold_in(rng, i) if rng.ndim == 0 else \
                    jax.vmap(jax.random.fold_in, (0, None))(rng, i)
            try:
                with jax.named_scope(scope):
                    x, layer_state = layer.forward(params[name] if name else {},
                                                   state[name] if has_state and state is not None else None, x,
                                                   grad=grad, rule=rule, train=train, axis_name=axis_name,
                                                   rng=layer_rng)
            except (ValueError, TypeError) as err:
                raise type(err)(f"layer {i} ({describe(layer)}): {err}") from None
            if has_state and new_state is not None:
                new_state[name] = layer_state
            outs.append(x)
        return outs, new_state

    def num_params(self, input_shape: Shape) -> int:
        shapes = [_input_shape(input_shape), *self.shapes(input_shape)[:-1]]
        return sum(int(np.prod(s)) for i, (layer, shape) in enumerate(zip(self.layers, shapes))
                   for s in _shape_leaves(_param_shapes(layer, shape, i)))

    def summary(self, input_shape: Shape) -> str:
        """A table of layers, output shapes and parameter counts."""
        input_shape = _input_shape(input_shape)
        out_shapes = self.shapes(input_shape)
        rows = [("#", "layer", "output", "params"), ("", "input", _fmt(input_shape), "")]
        total = 0
        for i, (layer, shape_in, shape_out) in enumerate(zip(self.layers, [input_shape, *out_shapes], out_shapes)):
            count = sum(int(np.prod(s)) for s in _shape_leaves(_param_shapes(layer, shape_in, i)))
            total += count
            rows.append((str(i), describe(layer), _fmt(shape_out), f"{count:,}" if count else ""))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join([*lines, f"total parameters: {total:,}"])

    def fuse(self) -> Sequential:
        """The same network with every Conv -> ReLU -> MaxPool(k) (non-overlapping, unpadded) replaced by Lin's
        fused ``ConvReLUPool`` block. Parameter names are unchanged, so the two share params and checkpoints."""
        layers, i = [], 0
        while i < len(self.layers):
            trio = self.layers[i:i + 3]
            if (len(trio) == 3 and type(trio[0]) is Conv and type(trio[1]) is ReLU and type(trio[2]) is MaxPool
                    and trio[2].stride in (None, trio[2].window) and _is_valid(trio[2].padding)
                    and trio[1].grad == trio[2].grad == trio[0].grad):
                fields = {f.name: getattr(trio[0], f.name) for f in dataclasses.fields(Conv)}
                layers.append(ConvReLUPool(**fields, pool=trio[2].window))
                i += 3
            else:
                layers.append(self.layers[i])
                i += 1
        return Sequential(layers, name=self.name)

    def with_convs(self, select: Callable[[Conv], bool] | None = None, **settings) -> Sequential:
        """The same network with ``settings`` (``rule``, ``store_phi``, ``block``) given to every conv layer that
        ``select`` accepts (all by default), fused blocks and the layers of residual bodies included (a residual
        block's projection is not a layer: it keeps the backend's default). A ``ConvBNReLU`` never stores
        phi(pad(Z)): asked to, it gets ``store_phi=False``. Parameter names are unchanged."""
        def given(layer: Layer) -> Layer:
            if isinstance(layer, Residual):
                return dataclasses.replace(layer, layers=tuple(given(inner) for inner in layer.layers))
            if not isinstance(layer, Conv) or (select is not None and not select(layer)):
                return layer
            if isinstance(layer, ConvBNReLU) and settings.get("store_phi"):
                return dataclasses.replace(layer, **{**settings, "store_phi": False})
            return dataclasses.replace(layer, **settings)

        return Sequential([given(layer) for layer in self.layers], name=self.name)

    def to_config(self) -> dict:
        """A plain dict (TOML/JSON) describing the network; ``Sequential.from_config`` reverses it."""
        layers = []
        for layer in self.layers:
            if isinstance(layer, Custom):
                grad = {"grad": layer.grad} if layer.grad else {}
                layers.append({"type": layer.op.name, **{k: _plain(v) for k, v in layer.settings}, **grad})
                continue
            entry = {"type": layer.type}
            for f in dataclasses.fields(layer):
                value = getattr(layer, f.name)
                if isinstance(layer, Residual) and f.name == "layers":
                    entry["layers"] = Sequential(value).to_config()["layers"]
                elif value != f.default:
                    entry[f.name] = _plain(value)
            layers.append(entry)
        return {"name": self.name, "layers": layers}

    @classmethod
    def from_config(cls, config: dict, source: str = "config", custom_ops: dict[str, CustomOp] | None = None
                    ) -> Sequential:
        """Build a network from a config dict such as ``load_toml`` returns; errors name the layer index.
        ``custom_ops`` maps the ``type`` of user layers to their ops (``jaxcnn.custom.custom_op``)."""
        custom_ops = dict(custom_ops or {})
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:  # a misspelled table ([trian]) would otherwise be ignored and the defaults used
            raise ValueError(f"{source}: unknown top-level key(s) or table(s) {', '.join(unknown)}; expected some "
                             f"of {', '.join(sorted(CONFIG_KEYS))}")
        if not isinstance(config.get("train", {}), dict):
            raise ValueError(f"{source}: train must be a table ([train]), got {type(config['train']).__name__}")
        layers = config.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"{source}: expected a non-empty list of [[layers]] tables")
        built = []
        for i, entry in enumerate(layers):
            where = f"{source}: layer {i}"
            if not isinstance(entry, dict) or "type" not in entry:
                raise ValueError(f"{where}: expected a table with a 'type' key, got {entry!r}")
            kind = entry["type"]
            if kind in custom_ops:
                settings = {k: _tuples(v) for k, v in entry.items() if k not in ("type", "grad")}
                try:
                    built.append(Custom(custom_ops[kind], tuple(settings.items()), entry.get("grad")))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{where} ({kind}): {err}") from None
                continue
            if kind not in LAYER_TYPES:
                known = [*LAYER_TYPES, *custom_ops]
                raise ValueError(f"{where}: unknown layer type {kind!r}; expected one of {', '.join(known)} (a layer "
                                 f"of your own: pass its op as from_config(..., custom_ops={{{kind!r}: op}}))")
            layer_cls = LAYER_TYPES[kind]
            allowed = {f.name for f in dataclasses.fields(layer_cls)}
            unknown = sorted(set(entry) - allowed - {"type"})
            if unknown:
                raise ValueError(f"{where} ({kind}): unknown field(s) {', '.join(unknown)}; "
                                 f"expected some of {', '.join(sorted(allowed))}")
            kwargs = {k: _tuples(v) for k, v in entry.items() if k != "type"}
            if layer_cls is Residual and "layers" in entry:
                kwargs["layers"] = cls.from_config({"layers": entry["layers"]}, source=f"{where} (residual)",
                                                   custom_ops=custom_ops).layers
            try:
                built.append(layer_cls(**kwargs))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where} ({kind}): {err}") from None
        return cls(built, name=str(config.get("name", "network")))


def _is_valid(padding) -> bool:
    return (isinstance(padding, str) and padding.upper() == "VALID") or padding == 0


MAX_LAYER_PARAMS = 2**31 - 1  # entries of one parameter array: past it, sizes overflow XLA's 32-bit indexing


def _param_shapes(layer: Layer, in_shape: Shape, index: int) -> dict[str, Shape]:
    if isinstance(layer, (Conv, Dense)) and len(in_shape) != (3 if isinstance(layer, Conv) else 1):
        expected = "an image [H, W, C]" if isinstance(layer, Conv) else "a flat vector (add a Flatten layer first)"
        raise ValueError(f"layer {index} ({describe(layer)}) expects {expected}, got input of shape "
                         f"{_fmt(in_shape)}")
    try:
        shapes = layer.param_shapes(in_shape)
    except ValueError as err:  # a residual block whose shortcut cannot match its body, say
        raise ValueError(f"layer {index} ({describe(layer)}): {err}") from None
    for name, shape in _shape_items(shapes):
        if math.prod(shape) > MAX_LAYER_PARAMS:
            raise ValueError(f"layer {index} ({describe(layer)}): its {name} would have shape {_fmt(shape)}, more "
                             f"than {MAX_LAYER_PARAMS} entries; use smaller sizes")
    return shapes


def _init(specs, key: jax.Array, dtype) -> dict:
    """Weights for ``specs`` = [(name, layer, {param: shape}, input shape)]. All He-normal weights come from one
    normal draw (on CPU every PRNG call costs a compilation of seconds); other initialisers, and user layers' own
    ``init``, get a key each."""
    he = [(name, shapes["w"]) for name, layer, shapes, _ in specs if getattr(layer, "init", None) == "he_normal"]
    sizes = [int(np.prod(s)) for _, s in he]
    k_he, *keys = jax.random.split(key, len(specs) + 1)
    draws = jax.jit(lambda k: jax.random.normal(k, (sum(sizes),), dtype))(k_he) if sizes else None
    offsets = dict(zip([n for n, _ in he], np.cumsum([0, *sizes])))
    params = {}
    for (name, layer, shapes, in_shape), k in zip(specs, keys):
        if hasattr(layer, "init_params"):  # user layers, batch norm
            params[name] = layer.init_params(k, in_shape, dtype)
            continue
        w_shape = shapes["w"]
        if layer.init == "he_normal":
            start = int(offsets[name])
            w = draws[start:start + int(np.prod(w_shape))].reshape(w_shape)
            w = w * jnp.sqrt(2.0 / np.prod(w_shape[:-1])).astype(dtype)
        else:
            w = INITIALIZERS[layer.init](k, w_shape, dtype)
        params[name] = {"w": w, **({"b": jnp.zeros(shapes["b"], dtype)} if "b" in shapes else {})}
    return params


def _is_shape(value) -> bool:
    return isinstance(value, tuple)


def _shape_items(shapes: dict, prefix: str = "") -> list[tuple[str, Shape]]:
    """(path, shape) of a possibly nested dict of shapes (a residual block's are nested by its layers)."""
    items = []
    for key, value in shapes.items():
        items += [(f"{prefix}{key}", value)] if _is_shape(value) else _shape_items(value, f"{prefix}{key}/")
    return items


def _shape_leaves(shapes: dict) -> list[Shape]:
    return [shape for _, shape in _shape_items(shapes)]


def _input_shape(shape) -> Shape:
    shape = tuple(shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be (H, W, C) of positive ints, without the batch axis; got {shape}")
    return tuple(int(s) for s in shape)


def _fmt(shape: Shape) -> str:
    return "x".join(str(s) for s in shape)


def _plain(value):
    return list(map(_plain, value)) if isinstance(value, tuple) else value


def _tuples(value):
    return tuple(map(_tuples, value)) if isinstance(value, list) else value


def describe(layer: Layer) -> str:
    """Short text for a layer, e.g. ``Conv(32, kernel=5, padding=2)``; a user layer by its op's name."""
    if isinstance(layer, Custom):
        grad = [f"grad={layer.grad!r}"] if layer.grad else []
        return f"{layer.op.name}({', '.join([*(f'{k}={v!r}' for k, v in layer.settings), *grad])})"
    if isinstance(layer, Residual):
        extra = [f"{k}={getattr(layer, k)!r}" for k in ("projection", "grad") if getattr(layer, k) is not None]
        return f"Residual([{', '.join(describe(inner) for inner in layer.layers)}]{''.join(', ' + e for e in extra)})"
    parts = []
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if f.default is dataclasses.MISSING:
            parts.append(repr(value))
        elif value != f.default:
            parts.append(f"{f.name}={value!r}")
    return f"{type(layer).__name__}({', '.join(parts)})"


def load_toml(path_or_text: str, *, is_text: bool = False) -> dict:
    """Read a TOML config (a file path, or TOML text with ``is_text=True``) into a dict."""
    try:
        if is_text:
            return tomllib.loads(path_or_text)
        with open(path_or_text, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{'config' if is_text else path_or_text}: not valid TOML: {err}") from None


def presets() -> dict[str, str]:
    """Names of the bundled presets and their one-line descriptions."""
    out = {}
    for entry in sorted(importlib.resources.files("jaxcnn.presets").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            config = load_toml(entry.read_text(), is_text=True)
            out[entry.name[:-5]] = config.get("description", "")
    return out


def preset_config(name: str) -> dict:
    """The full config dict of a preset: ``name``, ``description``, ``layers`` and its ``train`` recipe."""
    known = presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(known)}")
    text = importlib.resources.files("jaxcnn.presets").joinpath(f"{name}.toml").read_text()
    return load_toml(text, is_text=True)


def preset(name: str) -> Sequential:
    """A bundled network, e.g. ``preset("simplenn-mnist")``; ``presets()`` lists them."""
    return Sequential.from_config(preset_config(name), source=f"preset {name}")
