"""The jaxcnn command as a user runs it: train with no arguments, evaluate, and clear errors on bad input."""

import json

import numpy as np
import pytest

from jaxcnn import cli
from jaxcnn.checkpoint import load_model


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`jaxcnn train` with no arguments but --out: the digits preset, 30 epochs, offline."""
    out = tmp_path_factory.mktemp("runs") / "first"
    assert cli.main(["train", "--out", str(out), "--no-progress"]) == 0
    return out


def test_default_training_reaches_97_percent_and_writes_every_output(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97, summary
    for key in ("test_accuracy", "test_loss", "epochs", "seconds", "grad"):
        assert key in summary
    assert summary["epochs"] == 30 and summary["grad"] == "hand" and summary["dataset"] == "digits"
    assert set(summary["versions"]) == {"jax", "jaxlib", "optax", "numpy"} and all(summary["versions"].values())
    lines = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 31))
    assert {"train_objective", "train_accuracy", "val_loss", "val_accuracy", "seconds"} <= set(lines[0])
    assert (default_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(default_run)
    assert model.meta["epoch"] == summary["best_epoch"] and model.meta["test"]["accuracy"] == summary["test_accuracy"]
    assert model.mean.shape == (8, 8, 1) and float(np.abs(model.mean).max()) > 0


def test_evaluate_reproduces_the_test_accuracy(default_run, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(default_run)]) == 0
    out = capsys.readouterr().out
    accuracy = json.loads((default_run / "summary.json").read_text())["test_accuracy"]
    assert f"accuracy {accuracy:.2%} ({accuracy:.6f})" in out and "(reproduced)" in out


def test_a_finished_run_is_never_overwritten(default_run, capsys):
    before = (default_run / "model.safetensors").read_bytes()
    assert cli.main(["train", "--out", str(default_run), "--epochs", "1", "--no-progress"]) == 2
    assert "already holds a run; choose another --out" in capsys.readouterr().err
    assert (default_run / "model.safetensors").read_bytes() == before


def test_config_whose_layers_do_not_fit_is_refused_before_compiling(tmp_path, capsys):
    config = tmp_path / "net.toml"
    config.write_text("""
        name = "too-much-pooling"
        [[layers]]
        type = "conv"
        features = 8
        kernel = 3
        [[layers]]
        type = "max_pool"
        window = 4
        [[layers]]
        type = "max_pool"
        window = 4
        [[layers]]
        type = "flatten"
        [[layers]]
        type = "dense"
        features = 10
    """)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "layer 2 (MaxPool(window=4)) does not fit its input of shape 1x1x8" in err
    assert not out.exists(), "nothing is written for a refused run"


def test_missing_dataset_files_are_listed_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing dataset files" in err and "train-images-idx3-ubyte.gz" in err and "--download" in err
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["train", "--preset", "alexnet"], "invalid choice: 'alexnet'"),
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["train", "--preset", "lenet5", "--config", "x.toml"], "not allowed with argument"),
])
def test_unknown_choices_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_bad_recipe_values_are_reported(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "epochs must be a positive int, got 0" in capsys.readouterr().err


def test_presets_are_listed(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("simplenn-mnist", "simplenn-cifar", "lenet5", "vgg-small", "digits-cnn"):
        assert name in out


def test_evaluate_reads_a_training_state_from_checkpoints(default_run, capsys):
    from jaxcnn.checkpoint import list_states

    step, newest = list_states(default_run / "checkpoints")[-1]
    assert cli.main(["evaluate", "--checkpoint", str(newest)]) == 0
    out = capsys.readouterr().out
    assert f"digits-cnn (training state after step {step}, 30.00 epochs) on the digits test set: accuracy" in out


def test_version_and_every_option_explained_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("jaxcnn ") and "(jax " in out, out
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                text = formatter._expand_help(action)
                assert action.help, f"{name} {action.option_strings[0]} has no help text"
                assert text.count("default") <= 1 and "(default: None)" not in text, (name, text)
        assert "(default: None)" not in sub.format_help()


def test_out_that_is_a_file_is_refused_before_anything_starts(tmp_path, capsys):
    afile = tmp_path / "results"
    afile.write_text("a user's file")
    assert cli.main(["train", "--out", str(afile), "--no-progress"]) == 2
    assert f"--out {afile} is a file; expected a folder" in capsys.readouterr().err
    assert afile.read_text() == "a user's file"


def test_without_a_terminal_progress_lines_come_every_few_seconds(tmp_path, capsys):
    """Progress bars need a terminal; in a log (here: pytest's captured stderr) `--log-every` lines say the step,
    loss, speed and time left instead (every 0.01 s: nearly every step)."""
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--log-every", "0.01", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ") and ": step " in line]
    assert len(lines) > 10, lines
    first = lines[0]
    assert first.startswith("epoch 1/2: step ") and "/37, loss " in first and " steps/s, epoch done in ~" in first
    assert any(line.startswith("epoch 2/2: step ") for line in lines)
    assert cli.main(["train", "--epochs", "1", "--log-every", "-1", "--out", str(tmp_path / "x")]) == 2
