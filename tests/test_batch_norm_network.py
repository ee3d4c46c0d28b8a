"""Batch norm (and dropout) in networks: training and evaluation modes and the running averages against NumPy,
hand = autodiff (gradcheck), state through training, checkpoints, --resume (bit-identical), evaluate; second
order refuses it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import checkpoint, cli, gradcheck, network, second_order, train
from tests.test_reliability import assert_same_run, crash_after

TOML = """
name = "bn-digits"
[[layers]]
type = "conv"
features = 8
padding = 1
bias = false
[[layers]]
type = "batch_norm"
[[layers]]
type = "relu"
[[layers]]
type = "max_pool"
[[layers]]
type = "dropout"
rate = 0.1
[[layers]]
type = "flatten"
[[layers]]
type = "dense"
features = 10
[train]
epochs = 2
"""
NET = jc.Sequential.from_config(network.load_toml(TOML, is_text=True))


def test_training_and_evaluation_modes_and_running_averages_against_numpy():
    net = jc.Sequential([jc.BatchNorm(momentum=0.8, eps=1e-3)])
    params = {"bn1": {"gamma": jnp.array([1.5, -0.5], jnp.float64), "beta": jnp.array([0.1, 0.2], jnp.float64)}}
    state = net.init_state((3, 3, 2))
    rng = np.random.default_rng(0)
    running_mean, running_var = np.zeros(2), np.ones(2)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=(4, 3, 3, 2))
        y, state = net.forward(params, jnp.asarray(x), state=state, train=True)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        expected = np.array([1.5, -0.5]) * (x - mean) / np.sqrt(var + 1e-3) + np.array([0.1, 0.2])
        np.testing.assert_allclose(y[-1], expected, rtol=1e-12, atol=1e-12)
        running_mean, running_var = 0.8 * running_mean + 0.2 * mean, 0.8 * running_var + 0.2 * var
        np.testing.assert_allclose(state["bn1"]["mean"], running_mean, rtol=1e-6)  # the state is float32
        np.testing.assert_allclose(state["bn1"]["var"], running_var, rtol=1e-6)
    x = rng.normal(size=(2, 3, 3, 2))
    evaluated = net.apply(params, jnp.asarray(x), state=state)
    expected = np.array([1.5, -0.5]) * (x - running_mean) / np.sqrt(running_var + 1e-3) + np.array([0.1, 0.2])
    np.testing.assert_allclose(evaluated, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="has batch norm: evaluating it needs its running averages, state="):
        net.apply(params, jnp.asarray(x))


def test_gradcheck_of_a_network_with_batch_norm():
    params = NET.init(jax.random.key(0), (8, 8, 1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1), jnp.float64)
    report = gradcheck.check_network(NET, params, x, jnp.array([1, 2, 3, 4]))
    assert report.mismatches == [], report.table()
    assert any(r.name == "bn1/gamma" for r in report.rows), report.table()


def test_a_resumed_run_with_batch_norm_is_bit_identical_and_evaluate_reproduces_it(tmp_path, monkeypatch, capsys):
    cfg = train.TrainConfig(epochs=2, lr=0.01)  # batch norm takes a larger rate
    options = dict(recipe="bn-digits", progress=False, log=lambda s: None, checkpoint_every=10)
    train.run(NET, cfg, tmp_path / "a", **options)
    crash_after(3, monkeypatch)  # mid-epoch 1: states at steps 10, 20, 30
    with pytest.raises(KeyboardInterrupt):
        train.run(NET, cfg, tmp_path / "b", **options)
    monkeypatch.undo()
    train.resume_run(tmp_path / "b", progress=False, log=lambda s: None)
    assert_same_run(tmp_path / "a", tmp_path / "b")  # params, optimizer state, running averages, best ones;
    # dropout's masks keyed by the seed, step and example: the resumed run draws the same
    model = checkpoint.load_model(tmp_path / "b")
    assert set(model.state) == {"bn1"} and float(jnp.abs(model.state["bn1"]["mean"]).max()) > 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.9, summary
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "b")]) == 0
    assert f"{summary['test_accuracy']:.2%}" in capsys.readouterr().out


def test_a_saved_model_without_its_running_averages_is_refused(tmp_path):
    params = NET.init(jax.random.key(0), (8, 8, 1))
    checkpoint.save_model(tmp_path / "m.safetensors", NET, params, np.zeros((8, 8, 1), np.float32),
                          {"input_shape": [8, 8, 1]})
    with pytest.raises(checkpoint.CheckpointError, match="missing state/bn1/mean, state/bn1/var"):
        checkpoint.load_model(tmp_path / "m.safetensors")


def test_second_order_and_newton_refuse_batch_norm(tmp_path, capsys):
    params = NET.init(jax.random.key(0), (8, 8, 1))
    with pytest.raises(ValueError, match="has batch norm: Jacobian products and the Gauss-Newton matrix"):
        second_order.jvp(NET, params, jnp.ones((2, 8, 8, 1)), params)
    config = tmp_path / "bn.toml"
    config.write_text(TOML)
    assert cli.main(["train", "--config", str(config), "--optimizer", "newton", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    assert "has batch norm" in capsys.readouterr().err
