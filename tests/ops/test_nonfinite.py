"""NaN is never hidden: a NaN input reaches the output of every op, in every gradient mode (as in jax.nn and
PyTorch: relu(NaN) = NaN), and Inf gives the same output in every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from tests.test_higher_order import OPS as HIGHER_ORDER_OPS

rng = np.random.default_rng(0)
OPS = {**HIGHER_ORDER_OPS, "max_pool2d general": lambda a, g: jc.max_pool2d(a, 3, 1, "SAME", grad=g)}


@pytest.mark.parametrize("name", list(OPS))
def test_nan_reaches_the_output_and_inf_is_treated_alike_in_every_mode(name):
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 1)))
    f = OPS[name]
    for value in (jnp.nan, jnp.inf, -jnp.inf):
        bad = x.at[1, 2, 1, 0].set(value)
        outs = {g: np.asarray(f(bad, g)) for g in ("hand", "autodiff", "tangent")}
        if np.isnan(value):
            assert all(np.isnan(o).any() for o in outs.values()), (name, value)
        np.testing.assert_allclose(outs["hand"], outs["autodiff"], rtol=1e-12, equal_nan=True, err_msg=name)
        np.testing.assert_allclose(outs["tangent"], outs["autodiff"], rtol=1e-12, equal_nan=True, err_msg=name)


def test_relu_passes_delta_through_a_nan_as_autodiff_does():
    s = jnp.array([-1.0, 0.0, jnp.nan, 2.0])
    grads = [jax.grad(lambda a, g=g: jnp.sum(jc.relu(a, grad=g) * jnp.arange(1.0, 5.0)))(s) for g in ("hand",
                                                                                                     "autodiff")]
    assert grads[0].tolist() == grads[1].tolist() == [0.0, 0.0, 3.0, 4.0]
    assert np.isnan(jc.relu(s)).tolist() == [False, False, True, False]
