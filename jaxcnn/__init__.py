"""jaxcnn: convolutional networks in JAX whose every backward pass is derived by hand from the lecture notes.

Each op takes ``grad="hand"`` (default: a ``jax.custom_vjp`` reproducing the notes' formula),
``grad="autodiff"`` (JAX differentiating the very same forward pass) or ``grad="tangent"`` (a ``jax.custom_jvp``
whose rule is the hand tangent rule: forward mode on the notes' formulas). docs/formulas.md maps ops to equations.
"""

from jaxcnn.custom import custom_op
from jaxcnn.network import (
    AvgPool,
    Conv,
    ConvReLUPool,
    Custom,
    Dense,
    Flatten,
    MaxPool,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    preset,
)
from jaxcnn.ops import (
    avg_pool2d,
    conv2d,
    conv_relu_pool,
    dense,
    max_pool2d,
    output_size,
    relu,
    sigmoid,
    softmax_cross_entropy,
    squared_error,
    tanh,
)

__version__ = "0.1.0"

__all__ = [
    "AvgPool",
    "Conv",
    "ConvReLUPool",
    "Custom",
    "Dense",
    "Flatten",
    "MaxPool",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "avg_pool2d",
    "conv2d",
    "conv_relu_pool",
    "custom_op",
    "dense",
    "max_pool2d",
    "output_size",
    "preset",
    "relu",
    "sigmoid",
    "softmax_cross_entropy",
    "squared_error",
    "tanh",
]
