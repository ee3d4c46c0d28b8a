"""The window maps behind conv and pooling: unpatches is exactly the adjoint (transpose) of patches(pad(.))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.ops._windows import Window, pad, patches, unpatches

GEOMETRIES = [  # (in_hw, size, stride, dilation, padding)
    ((5, 6), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    ((7, 5), (2, 3), (2, 1), (1, 2), ((0, 1), (2, 0))),
    ((6, 6), (3, 2), (3, 2), (2, 1), ((2, 2), (0, 1))),
    ((1, 4), (3, 1), (2, 1), (1, 1), ((2, 2), (0, 0))),  # kernel row 1 reads only padding: it adds nothing
    ((4, 4), (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0))),  # rows past the last window get nothing back
    ((1, 1), (1, 3), (1, 1), (1, 1), ((0, 0), (2, 0))),  # one pixel; offsets 0, 1 read only padding (issue 13)
    ((3, 1), (3, 3), (1, 1), (1, 1), ((2, 0), (2, 0))),  # ... and in both axes, as max pooling allows
]


@pytest.mark.parametrize("in_hw,size,stride,dilation,padding", GEOMETRIES)
def test_unpatches_is_the_transpose_of_patches_of_pad(in_hw, size, stride, dilation, padding):
    window = Window(size, stride, dilation, padding)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *in_hw, 3)), jnp.float64)
    forward, transpose = jax.vjp(lambda x: patches(pad(x, window), window), x)
    cols = jnp.asarray(rng.normal(size=forward.shape), jnp.float64)
    np.testing.assert_allclose(unpatches(cols, window, in_hw), transpose(cols)[0], rtol=0, atol=1e-12)
    # <P x, c> = <x, P^T c>: the adjoint identity itself, independent of JAX's transpose rules
    np.testing.assert_allclose(jnp.vdot(forward, cols), jnp.vdot(x, unpatches(cols, window, in_hw)), rtol=1e-12)


@pytest.mark.parametrize("channels", [1, 5])  # below NARROW: built in two steps on a CPU; at or above: in one
@pytest.mark.parametrize("in_hw,size,stride,dilation,padding", GEOMETRIES)
def test_patches_read_what_each_window_covers(in_hw, size, stride, dilation, padding, channels):
    """cols[n, o, p, i, j] = pad(Z)[n, o * stride + i * dilation, p * stride + j * dilation], entry by entry."""
    window = Window(size, stride, dilation, padding)
    xp = pad(jnp.asarray(np.random.default_rng(1).normal(size=(2, *in_hw, channels))), window)
    cols = np.asarray(patches(xp, window))
    (sh, sw), (dh, dw) = stride, dilation
    expected = np.empty_like(cols)
    for o, p, i, j in np.ndindex(cols.shape[1], cols.shape[2], *size):
        expected[:, o, p, i, j] = np.asarray(xp)[:, o * sh + i * dh, p * sw + j * dw]
    np.testing.assert_array_equal(cols, expected)
