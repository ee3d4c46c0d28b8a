"""Bad arguments raise ValueError / TypeError naming the op, the argument and what was expected, on abstract
shapes (``jax.eval_shape``: before anything is traced into a computation or compiled)."""

import jax
import jax.numpy as jnp
import pytest

import jaxcnn as jc

X = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
W = jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)
B = jax.ShapeDtypeStruct((4,), jnp.float32)


def fails(error, match, f, *args):
    with pytest.raises(error, match=match):
        jax.eval_shape(f, *args)


CONV_CASES = {
    "x rank": (ValueError, r"conv2d: x must have rank 4 \[N, H, W, C_in\], got shape \(8, 8, 3\)",
               dict(x=jax.ShapeDtypeStruct((8, 8, 3), jnp.float32))),
    "w rank": (ValueError, r"conv2d: w must have rank 4 \[kh, kw, C_in, C_out\]",
               dict(w=jax.ShapeDtypeStruct((3, 3, 3), jnp.float32))),
    "channel mismatch": (ValueError, r"channel mismatch: x has C_in=3 .* w expects C_in=5",
                         dict(w=jax.ShapeDtypeStruct((3, 3, 5, 4), jnp.float32))),
    "bias shape": (ValueError, r"conv2d: b must have shape \(4,\)", dict(b=jax.ShapeDtypeStruct((3,), jnp.float32))),
    "integer x": (TypeError, r"conv2d: x must have a floating-point dtype .* got int32",
                  dict(x=jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.int32))),
    "dtype mix": (TypeError, r"conv2d: arguments must share one dtype, got x: float32, w: float64",
                  dict(w=jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float64))),
    "kernel too large": (ValueError, r"conv2d: the kernel spans 9 in height .* input has only 8",
                         dict(w=jax.ShapeDtypeStruct((9, 3, 3, 4), jnp.float32))),
    "dilated kernel too large": (ValueError, r"the kernel spans 9 in width \(dilation included\) but the input "
                                 r"has only 8", dict(dilation=(1, 4))),
    "zero stride": (ValueError, r"conv2d: stride must be >= 1 in each dimension, got 0", dict(stride=0)),
    "negative dilation": (ValueError, r"conv2d: dilation must be >= 1", dict(dilation=(1, -2))),
    "float stride": (TypeError, r"conv2d: stride must be an int, got float 1.5", dict(stride=1.5)),
    "stride triple": (ValueError, r"conv2d: stride must be an int or a pair", dict(stride=(1, 2, 3))),
    "padding string": (ValueError, r"conv2d: padding must be 'VALID', 'SAME'.*got 'FULL'", dict(padding="FULL")),
    "negative padding": (ValueError, r"conv2d: padding must be >= 0", dict(padding=((1, -1), (0, 0)))),
    "grad": (ValueError, r"conv2d: grad must be one of 'hand', 'autodiff' or 'tangent', got 'manual'",
             dict(grad="manual")),
    "rule": (ValueError, r"conv2d: rule must be one of 'im2col', 'flip' or 'winograd', got 'fft'", dict(rule="fft")),
    "store_phi type": (TypeError, r"conv2d: store_phi must be True, False or None, got 'yes'", dict(store_phi="yes")),
    "store_phi with flip": (ValueError, r"conv2d: store_phi applies to rule='im2col'",
                            dict(store_phi=True, rule="flip")),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d(case):
    error, match, change = CONV_CASES[case]
    arrays = {"x": X, "w": W, "b": B}
    arrays.update({k: v for k, v in change.items() if k in arrays})
    options = {k: v for k, v in change.items() if k not in arrays}
    fails(error, match, lambda x, w, b: jc.conv2d(x, w, b, **options), arrays["x"], arrays["w"], arrays["b"])


def test_conv_relu_pool_checks_conv_and_pool():
    fails(ValueError, r"conv_relu_pool: channel mismatch", lambda x, w: jc.conv_relu_pool(x, w),
          X, jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32))
    fails(ValueError, r"conv_relu_pool: pool must be >= 1", lambda x, w: jc.conv_relu_pool(x, w, pool=0), X, W)
    fails(ValueError, r"conv_relu_pool: rule must be", lambda x, w: jc.conv_relu_pool(x, w, rule="x"), X, W)


POOL_CASES = {
    "x rank": (ValueError, r"x must have rank 4 \[N, H, W, C\]", dict(x=jax.ShapeDtypeStruct((8, 8), jnp.float32))),
    "window zero": (ValueError, r"window must be >= 1", dict(window=0)),
    "stride zero": (ValueError, r"stride must be >= 1", dict(stride=(0, 1))),
    "window too large": (ValueError, r"the window spans 9 in height .* input has only 8", dict(window=9)),
    "padding >= window": (ValueError, r"padding \(2, 0\) in height must be smaller than the window \(2\)",
                          dict(padding=((2, 0), (0, 0)))),
    "padding string": (ValueError, r"padding must be 'VALID', 'SAME'", dict(padding="same-ish")),
    "grad": (ValueError, r"grad must be one of 'hand', 'autodiff' or 'tangent'", dict(grad="exact")),
    "integer x": (TypeError, r"x must have a floating-point dtype",
                  dict(x=jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.int8))),
}


@pytest.mark.parametrize("op", [jc.max_pool2d, jc.avg_pool2d], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pooling(op, case):
    error, match, change = POOL_CASES[case]
    x = change.get("x", X)
    options = {k: v for k, v in change.items() if k != "x"}
    fails(error, f"{op.__name__}: {match}", lambda x: op(x, **options), x)


@pytest.mark.parametrize("op", [jc.relu, jc.sigmoid, jc.tanh, jc.leaky_relu, jc.elu, jc.gelu, jc.softmax],
                         ids=lambda f: f.__name__)
def test_activations(op):
    fails(TypeError, rf"{op.__name__}: x must have a floating-point dtype", op,
          jax.ShapeDtypeStruct((3,), jnp.int32))
    fails(ValueError, rf"{op.__name__}: grad must be one of 'hand', 'autodiff' or 'tangent'",
          lambda x: op(x, grad="fd"), B)


def test_dense():
    x, w = jax.ShapeDtypeStruct((5, 7), jnp.float32), jax.ShapeDtypeStruct((7, 2), jnp.float32)
    fails(ValueError, r"dense: x must have rank 2 \[N, n_in\]", jc.dense, X, w)
    fails(ValueError, r"dense: size mismatch: x has n_in=7 .* w expects n_in=6", jc.dense, x,
          jax.ShapeDtypeStruct((6, 2), jnp.float32))
    fails(ValueError, r"dense: b must have shape \(2,\)", jc.dense, x, w, jax.ShapeDtypeStruct((7,), jnp.float32))
    fails(TypeError, r"dense: arguments must share one dtype", jc.dense, x, jax.ShapeDtypeStruct((7, 2), jnp.float64))


@pytest.mark.parametrize("op", [jc.squared_error, jc.softmax_cross_entropy], ids=lambda f: f.__name__)
def test_losses(op):
    z = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    name = "z" if op is jc.squared_error else "logits"
    labels = "y" if op is jc.squared_error else "labels"
    fails(ValueError, rf"{op.__name__}: {name} must have rank 2 \[N, K\]", op, X, jnp.zeros(2, jnp.int32))
    fails(ValueError, rf"{op.__name__}: integer {labels} must have shape \(4,\)", op, z,
          jax.ShapeDtypeStruct((3,), jnp.int32))
    fails(ValueError, rf"{op.__name__}: float {labels} must have the shape of {name} \(4, 3\)", op, z,
          jax.ShapeDtypeStruct((4, 2), jnp.float32))
    with pytest.raises(ValueError, match=rf"{op.__name__}: {labels} must lie in \[0, 3\) .* from 0 to 3"):
        op(jnp.zeros((4, 3)), jnp.array([0, 1, 2, 3]))  # concrete labels are range-checked
    with pytest.raises(ValueError, match=r"grad must be one of 'hand', 'autodiff' or 'tangent'"):
        op(jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0]), grad="both")


def shape(*dims):
    return jax.ShapeDtypeStruct(dims, jnp.float32)


@pytest.mark.parametrize("call,args,match", [
    (jc.squared_error, (shape(0, 3), shape(0, 3)), r"squared_error: z has shape \(0, 3\), with N=0; the loss is a "
                                                   r"mean over the batch's N rows, so it must be >= 1"),
    (jc.softmax_cross_entropy, (shape(0, 3), jax.ShapeDtypeStruct((0,), jnp.int32)), r"logits has shape \(0, 3\), "
                                                                                     r"with N=0"),
    (jc.softmax_cross_entropy, (shape(2, 0), shape(2, 0)), r"logits has shape \(2, 0\), with K=0; .* softmax over K "
                                                           r"classes"),
    (jc.softmax, (shape(2, 0),), r"softmax: x has shape \(2, 0\), with K=0"),
    (jc.global_avg_pool, (shape(2, 0, 0, 3),), r"global_avg_pool: x has shape \(2, 0, 0, 3\), with H=0 and W=0; each "
                                               r"channel is averaged over the image, so each must be >= 1"),
    (lambda x: jc.batch_norm(x, jnp.ones(3), jnp.zeros(3)), (shape(0, 4, 4, 3),),
     r"batch_norm: x has shape \(0, 4, 4, 3\), with N=0; training mode takes each channel's mean and variance over "
     r"N, H, W"),
    (lambda x: jc.batch_norm(x, jnp.ones(3), jnp.zeros(3)), (shape(0, 3),), r"with N=0; .* variance over N, so"),
])
def test_an_axis_the_op_averages_over_must_not_be_empty(call, args, match):
    """Over an empty axis a mean is NaN: the op says which axis instead."""
    fails(ValueError, match, call, *args)


def test_batch_norm_in_evaluation_mode_takes_an_empty_batch():
    """With given statistics nothing is averaged over the batch: an empty batch is an empty result."""
    y, _, _ = jc.batch_norm(jnp.ones((0, 2, 2, 3)), jnp.ones(3), jnp.zeros(3), mean=jnp.zeros(3), var=jnp.ones(3))
    assert y.shape == (0, 2, 2, 3)


def test_errors_come_before_compilation_under_jit():
    """Under jit the same error is raised while tracing: nothing is compiled for a bad call."""
    with pytest.raises(ValueError, match="conv2d: channel mismatch"):
        jax.jit(jc.conv2d).lower(X, jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32))
