"""The layers of the notes as pure JAX functions, each with ``grad="hand"`` (a custom VJP written from the notes)
and ``grad="autodiff"`` (JAX differentiating the same forward pass)."""

from jaxcnn.ops._windows import output_size
from jaxcnn.ops.activation import relu, sigmoid, tanh
from jaxcnn.ops.block import conv_relu_pool
from jaxcnn.ops.conv import conv2d
from jaxcnn.ops.dense import dense
from jaxcnn.ops.loss import softmax_cross_entropy, squared_error
from jaxcnn.ops.pool import avg_pool2d, max_pool2d

__all__ = [
    "avg_pool2d",
    "conv2d",
    "conv_relu_pool",
    "dense",
    "max_pool2d",
    "output_size",
    "relu",
    "sigmoid",
    "softmax_cross_entropy",
    "squared_error",
    "tanh",
]
