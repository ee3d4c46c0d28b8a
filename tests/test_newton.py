"""simpleNN's Newton method (jaxcnn.newton, `jaxcnn train --optimizer newton`): converges on the digits, resumes
exactly, refuses bad settings, stops on a non-finite objective."""

import json
import math

import numpy as np
import pytest

from jaxcnn import cli, network, newton, train
from jaxcnn import data as datasets

FAST = ["--optimizer", "newton", "--C", "100", "--batch-size", "256", "--no-progress"]


def test_newton_on_the_digits_from_the_command_line(tmp_path, capsys):
    """12 iterations (about 10 s on 2 cores) reach >= 96% test accuracy; then a run resumed from the state after
    iteration 2 (the two newest states deleted, as if killed there) ends with the same history, the same lambda
    and byte-identical params."""
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--iterations", "12", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "newton: 12 iterations, loss squared, C = 100" in text and "iter  12/12" in text and "CG" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.96, summary
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in history] == list(range(1, 13))
    assert all(r["cg_iterations"] >= 1 and r["lambda"] > 0 and 0 < r["step_size"] <= 1 for r in history)
    assert history[-1]["train_objective"] < history[0]["train_objective"]
    model = (out / "model.safetensors").read_bytes()
    for state in sorted((out / "checkpoints").iterdir())[-2:]:
        state.unlink()
    for name in ("summary.json", "model.safetensors", "metrics.jsonl"):
        (out / name).unlink()
    states = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert states == ["step-000000010.safetensors"], states
    assert cli.main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "Newton iteration 11 of 12 next" in capsys.readouterr().out
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in drop} for r in history]
    assert (out / "model.safetensors").read_bytes() == model


def test_subsamples_are_parts_of_one_permutation_taken_in_turn():
    parts = [newton.subsample(0, k, 10, 0.3) for k in range(1, 9)]
    assert all(len(p) == 3 for p in parts)
    first_sweep = np.concatenate(parts[:4])  # 4 parts of 3 cover the 10 examples, the last filled from the start
    assert sorted(set(first_sweep.tolist())) == list(range(10)) and list(first_sweep[10:]) == list(parts[0][:2])
    assert not np.array_equal(np.concatenate(parts[4:]), first_sweep)  # the next sweep: a new permutation
    assert np.array_equal(newton.subsample(0, 3, 10, 0.3), parts[2])  # a function of seed and k only


@pytest.mark.parametrize("flag,value,message", [
    ("--gn-fraction", "0", "gn_fraction must be in (0, 1]"),
    ("--gn-fraction", "1.5", "gn_fraction must be in (0, 1]"),
    ("--cg-max", "0", "cg_max must be a positive int"),
    ("--cg-tol", "1", "cg_tol must be in (0, 1)"),
    ("--damping", "-1", "damping must be a finite number >= 0"),
    ("--iterations", "0", "iterations must be a positive int"),
])
def test_bad_settings_are_refused(flag, value, message, tmp_path, capsys):
    assert cli.main(["train", "--optimizer", "newton", flag, value, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_non_finite_objective_stops_with_a_clear_error():
    net = network.Sequential([network.Flatten(), network.Dense(10)])
    cfg = train.TrainConfig(optimizer="newton", loss="squared", iterations=2, batch_size=64)
    prep = train.prepare(datasets.load("digits", "data"), cfg)
    prep = train.Prepared(**{**prep.__dict__, "x_fit": np.where(np.arange(prep.x_fit.size).reshape(
        prep.x_fit.shape) == 5, np.nan, prep.x_fit).astype(prep.x_fit.dtype)})
    with pytest.raises(train.NonFiniteError, match="newton iteration 1: the objective or gradient is not finite"):
        newton.fit(net, prep, cfg)


def test_hand_and_autodiff_newton_agree():
    """The same iterations with the hand rules (tangent rules, VJPs) and with autodiff (jax.jvp, jax.vjp)."""
    net = network.preset("digits-cnn")
    runs = {}
    for grad in ("hand", "autodiff"):
        cfg = train.TrainConfig(optimizer="newton", loss="squared", iterations=3, batch_size=256, C=100.0,
                                grad=grad)
        prep = train.prepare(datasets.load("digits", "data"), cfg)
        runs[grad] = newton.fit(net, prep, cfg).history
    for a, b in zip(runs["hand"], runs["autodiff"]):
        assert a["cg_iterations"] == b["cg_iterations"]
        np.testing.assert_allclose(a["train_objective"], b["train_objective"], rtol=1e-4)


def test_a_stored_and_a_recomputed_forward_pass_give_the_same_iterations(monkeypatch):
    """CG's G v on S_k's stored forward pass (the default) and, past newton.STORE_LIMIT, recomputing it."""
    net = network.preset("digits-cnn")
    cfg = train.TrainConfig(optimizer="newton", loss="squared", iterations=2, batch_size=128, C=100.0)
    prep = train.prepare(datasets.load("digits", "data"), cfg)
    assert newton.store_plan(net, cfg, prep.input_shape, len(prep.x_fit))[1].startswith(
        "G v reuses S_k's stored forward pass (")
    stored = newton.fit(net, prep, cfg).history
    monkeypatch.setattr(newton, "STORE_LIMIT", 0)
    assert f"G v recomputes S_k's forward pass in segments of {math.ceil(0.05 * len(prep.x_fit))} (" in \
        newton.store_plan(net, cfg, prep.input_shape, len(prep.x_fit))[1]
    recomputed = newton.fit(net, prep, cfg).history
    for a, b in zip(stored, recomputed):
        assert a["cg_iterations"] == b["cg_iterations"]
        np.testing.assert_allclose(a["train_objective"], b["train_objective"], rtol=1e-5)
