"""Training: hand and autodiff give the same loss curve, runs are deterministic, bad recipes are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import data, objective, train

DIGITS = data.load("digits")


@pytest.fixture(scope="module")
def one_epoch():
    """One epoch of the digits preset in float32, by each gradient mode, and the hand run again."""
    runs = {}
    for name, grad in [("hand", "hand"), ("autodiff", "autodiff"), ("hand again", "hand")]:
        cfg = train.TrainConfig(epochs=1, grad=grad, seed=7)
        runs[name] = train.fit(jc.preset("digits-cnn"), train.prepare(DIGITS, cfg), cfg)
    return runs


def test_hand_and_autodiff_training_give_the_same_loss_curve(one_epoch):
    hand, auto = one_epoch["hand"], one_epoch["autodiff"]
    assert len(hand.step_losses) == len(auto.step_losses) == 1212 // 32
    rel = np.abs(hand.step_losses - auto.step_losses) / np.abs(auto.step_losses)
    assert rel.max() < 1e-4, f"per-step objective differs by up to {rel.max():.2e}"
    for h, a in zip(hand.history, auto.history):
        assert abs(h["train_objective"] - a["train_objective"]) <= 1e-4 * abs(a["train_objective"])
        assert abs(h["val_loss"] - a["val_loss"]) <= 1e-4 * abs(a["val_loss"])
    assert hand.step_losses[-1] < 0.5 * hand.step_losses[0], "the objective should fall within one epoch"


def test_same_seed_same_run(one_epoch):
    np.testing.assert_array_equal(one_epoch["hand"].step_losses, one_epoch["hand again"].step_losses)
    first, again = one_epoch["hand"].params, one_epoch["hand again"].params
    for layer in first:
        for name in first[layer]:
            np.testing.assert_array_equal(first[layer][name], again[layer][name], err_msg=f"{layer}/{name}")


def test_prepare_holds_out_validation_and_subtracts_the_training_mean():
    cfg = train.TrainConfig(val_fraction=0.2, seed=3)
    prep = train.prepare(DIGITS, cfg)
    assert len(prep.x_val) == round(0.2 * len(DIGITS.x_train)) and len(prep.x_fit) + len(prep.x_val) == 1347
    np.testing.assert_allclose(prep.x_fit.mean(axis=0), 0, atol=1e-6)  # the mean image of the fitting split
    np.testing.assert_allclose(prep.x_test + prep.mean, DIGITS.x_test, atol=1e-6)


def test_evaluator_pads_batches_without_changing_results():
    net = jc.preset("digits-cnn")
    params = net.init(jax.random.key(0), (8, 8, 1))
    cfg = train.TrainConfig()
    x, y = DIGITS.x_test[:23], DIGITS.y_test[:23]
    result = train.make_evaluator(net, cfg, 23, max_batch=10)(params, x, y)  # batches of 10: 10, 10, 3 + 7 padding
    logits = jax.jit(net.apply)(params, jnp.asarray(x))
    expected_loss = float(objective.per_example_loss(logits, jnp.asarray(y)).mean())
    assert round(result["accuracy"] * 23) == int(np.sum(np.argmax(np.asarray(logits), -1) == y))
    assert abs(result["loss"] - expected_loss) < 1e-5 * expected_loss


@pytest.mark.parametrize("change,match", [
    (dict(optimizer="rmsprop"), "optimizer must be one of 'sgd', 'momentum', 'adam', 'adamw' or 'newton', got "
                                "'rmsprop'"),
    (dict(warmup=-1), "warmup must be an int >= 0"),
    (dict(clip_norm=0.0), "clip_norm must be a finite number > 0"),
    (dict(optimizer="adamw", weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
    (dict(weight_decay=0.1), "weight_decay is AdamW's decoupled decay .* not adam's; for an L2 term"),
    (dict(optimizer="newton", warmup=10), "warmup, clip_norm, augment, label_smoothing and precision apply to "
                                          "the first-order"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
    (dict(dataset="imagenet"), "dataset must be one of digits, mnist"),
    (dict(epochs=0), "epochs must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(loss="hinge"), "loss must be one of ce, squared"),
    (dict(C=-2.0), "C must be > 0"),
    (dict(val_fraction=1.5), r"val_fraction must be in \[0, 1\)"),
])
def test_bad_recipes_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**change)


def test_unknown_recipe_keys_are_named():
    with pytest.raises(ValueError, match=r"my.toml \[train\]: unknown key\(s\) learning_rate"):
        train.TrainConfig.from_dict({"learning_rate": 0.1}, source="my.toml [train]")


def test_network_must_match_the_classes():
    net = jc.Sequential([jc.Flatten(), jc.Dense(7)])
    with pytest.raises(ValueError, match=r"outputs shape 7 but the dataset has 10 classes: end the network with "
                                         r"Dense\(10\)"):
        train.check_network(net, (8, 8, 1), 10)


def test_divergence_stops_with_a_message():
    cfg = train.TrainConfig(epochs=1, optimizer="sgd", lr=1e12, loss="squared")
    net = jc.Sequential([jc.Flatten(), jc.Dense(10)])
    with pytest.raises(train.NonFiniteError, match=r"at step \d+ \(epoch 1, step \d+ of 37\): every layer's "
                                                   r"output was finite, the loss or backward pass was not"):
        train.fit(net, train.prepare(DIGITS, cfg), cfg)  # huge finite logits: the squared loss overflows


def test_config_is_a_frozen_record():
    cfg = train.TrainConfig()
    assert dataclasses.replace(cfg, epochs=3).epochs == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 2


def test_curves_have_a_per_step_panel_and_show_a_single_epoch(tmp_path):
    """curves.png: with the per-step objectives a third panel (the image 1.5x wider); a one-epoch history plots
    its points (a line through one point would show nothing) and rings the best epoch."""
    import struct

    from jaxcnn import train as training

    history = [{"epoch": 1, "train_objective": 1.2, "train_accuracy": 0.6, "val_loss": 0.9, "val_accuracy": 0.8}]
    widths = {}
    for panels, steps in ((2, None), (3, np.linspace(2.0, 1.0, 37))):
        path = tmp_path / f"{panels}.png"
        training.plot_curves(history, path, "t", best=1, step_losses=steps)
        widths[panels] = struct.unpack(">I", path.read_bytes()[16:20])[0]  # PNG IHDR width
    assert widths[3] == widths[2] * 3 // 2, widths


def test_warmup_clipping_and_decoupled_weight_decay_are_optax_transforms():
    """--warmup: the step size rises linearly from 0 over its steps, then follows the schedule (cosine here, over
    the remaining steps); --clip-norm: a huge gradient moves SGD by lr * clip_norm; adamw with a zero gradient
    only decays: theta (1 - lr wd) per step."""
    import optax

    params = {"w": jnp.full((4,), 2.0)}
    tx = train.make_optimizer(train.TrainConfig(optimizer="sgd", lr=0.1, warmup=4, schedule="cosine", epochs=2), 10)
    state, sizes = tx.init(params), []
    for _ in range(10):
        updates, state = tx.update({"w": jnp.ones(4)}, state, params)
        sizes.append(float(-updates["w"][0]))
    np.testing.assert_allclose(sizes[:5], [0.0, 0.025, 0.05, 0.075, 0.1], atol=1e-7)
    np.testing.assert_allclose(sizes[5:], [0.1 * 0.5 * (1 + np.cos(np.pi * k / 16)) for k in range(1, 6)], rtol=1e-6)

    tx = train.make_optimizer(train.TrainConfig(optimizer="sgd", lr=0.1, clip_norm=0.5), 10)
    updates, _ = tx.update({"w": jnp.full((4,), 1e6)}, tx.init(params), params)
    assert abs(float(optax.tree.norm(updates)) - 0.1 * 0.5) < 1e-6

    tx = train.make_optimizer(train.TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.01), 10)
    updates, _ = tx.update({"w": jnp.zeros(4)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.01 * 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"warmup \(20 steps\) must be shorter than the run \(20 steps\)"):
        train.make_optimizer(train.TrainConfig(warmup=20, epochs=2), 10)


def test_fit_takes_a_users_arrays_and_optax_transform():
    """train.fit on a data.Dataset of one's own arrays, with one's own optax transformation: a zero learning rate
    leaves the initial params, which a recipe's optimizer would not; bad arrays are named before anything runs."""
    import optax

    from jaxcnn import data

    rng = np.random.default_rng(0)
    x = rng.random((60, 6, 6, 1), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int32)
    mine = data.Dataset("mine", x[:50], y[:50], x[50:], y[50:], classes=2)
    cfg = train.TrainConfig(epochs=1, batch_size=10, val_fraction=0.2)
    net = jc.Sequential([jc.Conv(2, 3), jc.Flatten(), jc.Dense(2)])
    result = train.fit(net, train.prepare(mine, cfg), cfg, optimizer=optax.sgd(0.0))
    initial = net.init(jax.random.key(cfg.seed), (6, 6, 1))
    for layer in initial:
        for name in initial[layer]:
            np.testing.assert_array_equal(result.params[layer][name], initial[layer][name])
    with pytest.raises(ValueError, match=r"mine: y_train: labels must lie in 0..1, got 0..2"):
        data.Dataset("mine", x, np.where(y > 0, 2, 0).astype(np.int32), x, y, classes=2)
    with pytest.raises(ValueError, match=r"mine: y_test must be 60 integer labels .* got float64"):
        data.Dataset("mine", x, y, x, y.astype(np.float64), classes=2)
    with pytest.raises(ValueError, match="mine: x_train must be images"):
        data.Dataset("mine", x[..., 0], y, x, y, classes=2)


def test_metrics_csv_holds_every_kth_step_and_survives_a_resume(tmp_path, monkeypatch):
    """log_steps=5: metrics.csv has steps 5, 10, ... with the objective, the learning rate of that step (warmup
    then constant here) and gradient norms whose squares add up to the global one's; a run cut short and resumed
    writes the same file, bit for bit."""
    import csv

    from tests.test_reliability import crash_after

    cfg = train.TrainConfig(epochs=2, warmup=10)
    options = dict(recipe="digits-cnn", progress=False, log=lambda s: None, checkpoint_every=10, log_steps=5)
    train.run(jc.preset("digits-cnn"), cfg, tmp_path / "a", **options)
    rows = list(csv.DictReader((tmp_path / "a" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(5, 75, 5))
    assert list(rows[0]) == ["step", "epoch", "objective", "lr", "grad_norm", "grad_norm/conv1", "grad_norm/conv2",
                             "grad_norm/dense1"]
    np.testing.assert_allclose([float(r["lr"]) for r in rows[:3]], [4e-4, 9e-4, 1e-3], rtol=1e-6)
    for r in rows:
        layers = [float(r[k]) for k in r if k.startswith("grad_norm/")]
        assert abs(np.sqrt(np.sum(np.square(layers))) - float(r["grad_norm"])) < 1e-5 * float(r["grad_norm"])
    crash_after(5, monkeypatch)  # after step 40: saves at steps 10, 20, 30, 37 (epoch 1's end), 40
    with pytest.raises(KeyboardInterrupt):
        train.run(jc.preset("digits-cnn"), cfg, tmp_path / "b", **options)
    monkeypatch.undo()
    with open(tmp_path / "b" / "metrics.csv", "a") as f:  # a row written after the newest state, as a kill leaves
        f.write("45,2,9.9,0.001,1.0,1.0,0.0,0.0\n")
    train.resume_run(tmp_path / "b", progress=False, log=lambda s: None, log_steps=5)
    assert (tmp_path / "b" / "metrics.csv").read_bytes() == (tmp_path / "a" / "metrics.csv").read_bytes()


def test_progress_lines_leave_evaluation_out_of_the_speed(monkeypatch):
    """The speed (and so the time left) of the progress lines counts the steps' time only: an evaluation that
    takes 1 s between epochs does not make epoch 2 look slower."""
    import re
    import time

    real = train.make_evaluator

    def slow_evaluator(*args, **kwargs):
        evaluate = real(*args, **kwargs)

        def slow(*a):
            time.sleep(1.0)
            return evaluate(*a)

        return slow

    monkeypatch.setattr(train, "make_evaluator", slow_evaluator)
    cfg = train.TrainConfig(epochs=2)
    lines = []
    train.fit(jc.preset("digits-cnn"), train.prepare(DIGITS, cfg), cfg, heartbeat=lines.append, every=0.0)
    rates = {epoch: [float(re.search(r"([\d.]+) steps/s", line).group(1)) for line in lines
                     if line.startswith(f"epoch {epoch}/2")] for epoch in (1, 2)}
    # 37 steps take well under 1 s here: counted, the evaluation would cut epoch 2's speed several times over
    assert min(rates[2]) > 0.5 * rates[1][-1], (rates[1][-5:], rates[2][:5])
