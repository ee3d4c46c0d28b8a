"""The layers of the notes as pure JAX functions, each with ``grad="hand"`` (a custom VJP written from the notes),
``grad="autodiff"`` (JAX differentiating the same forward pass) and ``grad="tangent"`` (a custom JVP: the hand
tangent rule, which forward mode runs and reverse mode transposes)."""

from jaxcnn.ops._windows import output_size
from jaxcnn.ops.activation import (
    elu,
    elu_jvp,
    gelu,
    gelu_jvp,
    leaky_relu,
    leaky_relu_jvp,
    relu,
    relu_jvp,
    residual_add,
    sigmoid,
    sigmoid_jvp,
    softmax,
    softmax_jvp,
    tanh,
    tanh_jvp,
)
from jaxcnn.ops.block import conv_bn_relu, conv_relu_pool, conv_relu_pool_jvp
from jaxcnn.ops.conv import conv2d, conv2d_jvp
from jaxcnn.ops.dense import dense, dense_jvp
from jaxcnn.ops.loss import (
    softmax_cross_entropy,
    softmax_cross_entropy_gn,
    softmax_cross_entropy_jvp,
    squared_error,
    squared_error_gn,
    squared_error_jvp,
)
from jaxcnn.ops.norm import batch_norm, dropout
from jaxcnn.ops.pool import (
    avg_pool2d,
    avg_pool2d_jvp,
    global_avg_pool,
    global_avg_pool_jvp,
    max_pool2d,
    max_pool2d_jvp,
)

# Each op's hand tangent rule (R-op): ``JVP[op](primals, tangents, **settings) -> (out, tangent_out)``.
JVP = {conv2d: conv2d_jvp, conv_relu_pool: conv_relu_pool_jvp, max_pool2d: max_pool2d_jvp,
       avg_pool2d: avg_pool2d_jvp, global_avg_pool: global_avg_pool_jvp, relu: relu_jvp, sigmoid: sigmoid_jvp,
       tanh: tanh_jvp, leaky_relu: leaky_relu_jvp, elu: elu_jvp, gelu: gelu_jvp, softmax: softmax_jvp, dense: dense_jvp,
       squared_error: squared_error_jvp, softmax_cross_entropy: softmax_cross_entropy_jvp}

__all__ = [
    "JVP",
    "avg_pool2d",
    "avg_pool2d_jvp",
    "batch_norm",
    "conv2d",
    "conv2d_jvp",
    "conv_bn_relu",
    "conv_relu_pool",
    "conv_relu_pool_jvp",
    "dense",
    "dense_jvp",
    "dropout",
    "elu",
    "elu_jvp",
    "gelu",
    "gelu_jvp",
    "global_avg_pool",
    "global_avg_pool_jvp",
    "leaky_relu",
    "leaky_relu_jvp",
    "max_pool2d",
    "max_pool2d_jvp",
    "output_size",
    "relu",
    "relu_jvp",
    "residual_add",
    "sigmoid",
    "sigmoid_jvp",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_gn",
    "softmax_cross_entropy_jvp",
    "softmax_jvp",
    "squared_error",
    "squared_error_gn",
    "squared_error_jvp",
    "tanh",
    "tanh_jvp",
]
