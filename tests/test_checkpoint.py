"""Model files: round trip, and truncation or corruption detected, never half-loaded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import _io
from jaxcnn.checkpoint import CheckpointError, load_model, save_model

NET = jc.Sequential([jc.Conv(4, 3, padding=1), jc.ReLU(), jc.MaxPool(2), jc.Flatten(), jc.Dense(10)], name="tiny")


@pytest.fixture
def saved(tmp_path):
    params = NET.init(jax.random.key(0), (6, 6, 1))
    mean = np.full((6, 6, 1), 0.25, np.float32)
    path = tmp_path / "model.safetensors"
    save_model(path, NET, params, mean, {"dataset": "digits", "epoch": 3})
    return path, params, mean


def test_round_trip(saved, tmp_path):
    _, params, mean = saved
    model = load_model(tmp_path)  # a run folder means its model.safetensors
    assert model.network == NET and model.network.name == "tiny"
    assert model.meta == {"dataset": "digits", "epoch": 3}
    np.testing.assert_array_equal(model.mean, mean)
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    x = jnp.ones((2, 6, 6, 1), jnp.float32)
    np.testing.assert_array_equal(model.network.apply(model.params, x), NET.apply(params, x))


def test_corruption_is_detected(saved):
    path = saved[0]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="do not match their recorded SHA-256"):
        load_model(path)


def test_truncation_and_absence_are_reported(saved, tmp_path):
    path = saved[0]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=r"unreadable .* truncated"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "elsewhere")


def test_failed_write_keeps_the_old_file(saved):
    path = saved[0]
    before = path.read_bytes()
    with pytest.raises(RuntimeError), _io.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]
