"""Crashes, damaged checkpoints and numerical faults never lose work or give silent wrong answers."""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import checkpoint, cli, data, train

DIGITS = data.load("digits")


def final_state(out: Path) -> dict:
    """The newest training state's arrays, flattened to {"group/layer/name": array}."""
    arrays, _ = checkpoint.load_state(checkpoint.list_states(out / "checkpoints")[-1][1])
    return checkpoint._flatten("state", arrays)


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)  # bit for bit
    ma, mb = checkpoint.load_model(a), checkpoint.load_model(b)
    for layer in ma.params:
        for name in ma.params[layer]:
            np.testing.assert_array_equal(ma.params[layer][name], mb.params[layer][name], err_msg=f"{layer}/{name}")
    summary_a, summary_b = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert summary_a["test_accuracy"] == summary_b["test_accuracy"]
    assert summary_a["test_loss"] == summary_b["test_loss"]
    metrics = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert metrics[0] == metrics[1]


TRAIN = ["train", "--epochs", "6", "--checkpoint-every", "5", "--no-progress"]


def jaxcnn(*args) -> list[str]:
    return [sys.executable, "-m", "jaxcnn.cli", *args]


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    uninterrupted, killed = tmp_path / "a", tmp_path / "b"
    reference = subprocess.Popen(jaxcnn(*TRAIN, "--out", str(uninterrupted)), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)  # alongside the killed run: one core each
    delay = random.Random().uniform(0.0, 1.5)
    process = subprocess.Popen(jaxcnn(*TRAIN, "--out", str(killed)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not checkpoint.list_states(killed / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    states = checkpoint.list_states(killed / "checkpoints")
    assert states, "the run was killed before its first checkpoint"
    assert not (killed / "summary.json").exists(), f"the run finished within {delay:.2f} s: nothing was killed"
    resumed = subprocess.run(jaxcnn("train", "--resume", "--out", str(killed), "--no-progress"), check=True,
                             capture_output=True, text=True, timeout=300)
    reference_err = reference.communicate(timeout=300)[1]
    assert reference.returncode == 0, reference_err[-3000:]
    assert "resuming" in resumed.stdout, resumed.stdout
    assert_same_run(uninterrupted, killed)


def crash_after(n_saves: int, monkeypatch):
    """Make the n-th training-state save the last: the run dies right after it, as if killed."""
    real, calls = checkpoint.save_state, []

    def save_then_maybe_die(*args, **kwargs):
        path = real(*args, **kwargs)
        calls.append(path)
        if len(calls) == n_saves:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(train, "save_state", save_then_maybe_die)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    cfg = train.TrainConfig(epochs=3)
    net = jc.preset("digits-cnn")
    options = dict(recipe="digits-cnn", progress=False, log=lambda s: None, checkpoint_every=10)
    train.run(net, cfg, tmp_path / "a", **options)
    crash_after(5, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.run(net, cfg, tmp_path / "b", **options)
    monkeypatch.undo()
    states = checkpoint.list_states(tmp_path / "b" / "checkpoints")
    newest = states[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short by a crash outside our control
    log = []
    train.resume_run(tmp_path / "b", progress=False, log=log.append)
    assert any(f"skipping damaged checkpoint: {newest}" in line for line in log), log
    assert any(f"resuming {tmp_path / 'b'} from {states[-2][1].name}" in line for line in log), log
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_unfinished_run_is_not_overwritten_without_resume(tmp_path, monkeypatch, capsys):
    crash_after(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.run(jc.preset("digits-cnn"), train.TrainConfig(epochs=2), tmp_path, recipe="digits-cnn",
                  progress=False, log=lambda s: None, checkpoint_every=5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert cli.main(["train", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "already holds a run; choose another --out, or pass --resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--lr", "0.5", "--epochs", "9"]) == 2
    assert "--resume continues a run with the recipe it was started with (only --epochs, or --iterations for " \
           "newton, may make it longer); drop --lr" in capsys.readouterr().err


def poisoned(cfg: train.TrainConfig) -> tuple[train.Prepared, list[int | None]]:
    """The digits with one training image set to NaN: one that epoch 1 leaves out (its order's remainder), so it
    first strikes in epoch 2. Returns the data and, per epoch, the step (0-based) whose batch holds it, if any."""
    prep = train.prepare(DIGITS, cfg)
    n, batch = len(prep.x_fit), cfg.batch_size
    steps = n // batch
    orders = [np.random.default_rng([cfg.seed, e]).permutation(n) for e in range(1, cfg.epochs + 1)]
    victim = next(i for i in orders[0][steps * batch:] if list(orders[1]).index(i) < steps * batch)
    where = [list(o).index(victim) // batch for o in orders]
    x = prep.x_fit.copy()
    x[victim] = np.nan
    return dataclasses.replace(prep, x_fit=x), [w if w < steps else None for w in where]


def test_injected_nan_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = train.TrainConfig(epochs=3)
    prep, where = poisoned(cfg)
    steps = len(prep.x_fit) // cfg.batch_size
    bad = steps + where[1]  # 0-based global index of the first bad step
    saved = []
    with pytest.raises(train.NonFiniteError) as err:
        train.fit(jc.preset("digits-cnn"), prep, cfg, checkpoint_every=8,
                  checkpoint=lambda state: saved.append(checkpoint.save_state(tmp_path, *state)))
    message = str(err.value)
    assert f"at step {bad + 1} (epoch 2, step {where[1] + 1} of {steps})" in message, message
    # the conv layer as it ran: with the rule that rule="auto" gave it (the backend's default, for so small a step)
    assert re.search(r"layer 0 \(Conv\(32, padding=1, rule='\w+', store_phi=\w+\)\) was the first to output NaN "
                     r"or Inf", message), message
    # relu(NaN) = NaN: the NaN input reaches the loss, so every gradient is non-finite (never hidden).
    assert "non-finite gradients: conv1/b, conv1/w, conv2/b, conv2/w, dense1/b, dense1/w." in message, message
    newest = checkpoint.list_states(tmp_path)[-1][0]
    assert newest <= bad and newest > bad - 8, "the newest checkpoint is the last before the bad step"
    arrays, _ = checkpoint.load_state(checkpoint.list_states(tmp_path)[-1][1])
    assert all(np.isfinite(a).all() for a in checkpoint._flatten("s", arrays).values())


def test_skip_mode_skips_and_counts_the_bad_steps():
    cfg = train.TrainConfig(epochs=3)
    prep, where = poisoned(cfg)
    expected = [sum(w is not None for w in where[:e]) for e in range(1, 4)]  # cumulative, per epoch
    result = train.fit(jc.preset("digits-cnn"), prep, cfg, on_nan="skip")
    assert [r["skipped_steps"] for r in result.history] == expected and result.skipped == expected[-1]
    assert np.isnan(result.step_losses).sum() == expected[-1], "each skipped step's objective is NaN (not hidden)"
    assert all(np.isfinite(a).all() for layer in result.params.values() for a in layer.values())
    assert result.test["accuracy"] > 0.8


def test_divergence_from_the_command_line(tmp_path, capsys):
    code = cli.main(["train", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "1", "--out", str(tmp_path / "r"),
                     "--no-progress"])
    assert code == 3
    err = capsys.readouterr().err
    assert "stopped: non-finite objective or gradient at step" in err and "Lower --lr (now 1e+30)" in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_resume_cleans_up_a_write_cut_short(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".step-000000005.safetensors.abc.tmp"
    stale.write_bytes(b"half a file")
    assert checkpoint.newest_state(tmp_path / "checkpoints", report=lambda s: None) is None
    assert not stale.exists()
    assert os.listdir(tmp_path / "checkpoints") == []


def test_an_epoch_whose_every_step_was_skipped_warns_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """--on-nan skip with nothing trainable (every training image NaN): each epoch says so, and the run, though it
    writes its files, exits 3 instead of passing off its untrained model."""
    real = train.prepare

    def all_nan(dataset, cfg):
        prep = real(dataset, cfg)
        return dataclasses.replace(prep, x_fit=np.full_like(prep.x_fit, np.nan))

    monkeypatch.setattr(train, "prepare", all_nan)
    out = tmp_path / "run"
    code = cli.main(["train", "--on-nan", "skip", "--epochs", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert captured.out.count("WARNING: every one of epoch") == 2
    assert "every step of epoch(s) 1, 2 was skipped" in captured.err
    assert (out / "summary.json").exists()
