"""Your own rule (jaxcnn.custom): the worked example in docs/custom-ops.md runs as written, and the contract's
errors name the op and what was expected."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from tests.helpers import assert_modes_agree

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom-ops.md"


def test_the_worked_example_runs_as_written():
    """All python blocks of docs/custom-ops.md, in order, in one fresh interpreter (default JAX settings: x64
    off), including its asserts: both ops check clean, the network checks clean, TOML gives the same network, and
    the planted wrong rule is named (layer and parameter) and nothing else is."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "genuine mismatches: 1: layer 1 (scale_shift()) [hand]" in result.stdout, result.stdout[-3000:]


def cube():
    return jc.custom_op("cube", lambda x: x**3, lambda arrays, y, delta: (3 * arrays[0] ** 2 * delta,))


def test_both_modes_under_jit_vmap_and_grad():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float64)
    op = cube()
    assert_modes_agree(lambda x, **m: op(x, **m), (x,), ("x",), jnp.float64, "cube",
                       {"autodiff": {"grad": "autodiff"}, "hand": {"grad": "hand"}})
    per_row = jax.vmap(jax.grad(lambda r: op(r).sum()))(x)
    np.testing.assert_allclose(per_row, 3 * x**2, rtol=1e-14)


def test_contract_errors_name_the_op():
    with pytest.raises(ValueError, match="name must be an identifier"):
        jc.custom_op("my op", lambda x: x, lambda a, y, d: (d,))
    with pytest.raises(ValueError, match=r"custom_op scale: params \('g',\) need init"):
        jc.custom_op("scale", lambda x, g: x * g, lambda a, y, d: (d, d), params=("g",))
    too_many = jc.custom_op("two", lambda x: 2 * x, lambda arrays, y, delta: (delta, delta))
    with pytest.raises(TypeError, match=r"two: backward must return a tuple of 1 cotangents \(x\), got 2"):
        jax.grad(lambda x: too_many(x).sum())(jnp.ones(3))
    bad_shape = jc.custom_op("flat", lambda x: 2 * x, lambda arrays, y, delta: (delta.sum(),))
    with pytest.raises(ValueError, match=r"flat: backward's cotangent for x has shape \(\), but x has shape \(3,\)"):
        jax.grad(lambda x: bad_shape(x).sum())(jnp.ones(3))
    with pytest.raises(TypeError, match="cube: x must have a floating-point dtype"):
        cube()(jnp.ones(3, jnp.int32))
    with pytest.raises(TypeError, match=r"cube: expected 1 arrays \(x\), got 2"):
        cube()(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="cube: grad must be"):
        cube()(jnp.ones(3), grad="exact")
    with pytest.raises(ValueError, match=r"unknown layer type 'cube'.*custom_ops=\{'cube': op\}"):
        jc.Sequential.from_config({"layers": [{"type": "cube"}]})


def test_a_zero_cotangent_may_be_none_and_settings_reach_both_functions():
    op = jc.custom_op("shift", lambda x, s, *, by: x + by * s, lambda arrays, y, delta, *, by: (delta, None),
                      params=("s",), init=lambda key, shape, dtype: {"s": jnp.zeros(shape[-1], dtype)})
    dx, ds = jax.grad(lambda x, s: op(x, s, by=2.0).sum(), argnums=(0, 1))(jnp.ones((2, 3)), jnp.ones(3))
    assert dx.tolist() == [[1.0] * 3] * 2 and ds.tolist() == [0.0] * 3  # the (wrong) None rule is taken as given
    net = jc.Sequential([jc.Flatten(), jc.Custom(op, (("by", 2.0),)), jc.Dense(2)])
    params = net.init(jax.random.key(0), (2, 2, 1))
    assert params["shift1"]["s"].shape == (4,)
    assert net.apply(params, jnp.ones((1, 2, 2, 1), jnp.float32)).shape == (1, 2)
    assert net.to_config()["layers"][1] == {"type": "shift", "by": 2.0}
