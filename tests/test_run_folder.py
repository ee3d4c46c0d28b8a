"""A run folder: its completion is one marker written last, --resume finishes what a finished run lacks, cleans
up cut-short writes, and never adopts a training state of another run; strict JSON; safe folder names; a
misspelled config table is an error."""

import json
import math
import shutil

import pytest

from jaxcnn import cli, train
from jaxcnn._io import strict_json

RUN = ["train", "--epochs", "1", "--no-progress"]


def test_completion_is_marked_last_and_resume_finishes_a_run_cut_short(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*RUN, "--out", str(out)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["complete"] is True and manifest["recipe"] == "digits-cnn" and manifest["dataset"] == "digits"
    # killed after summary.json, before curves.png and the marker; two writes cut short
    (out / "curves.png").unlink()
    (out / "run.json").write_text(json.dumps({**manifest, "complete": False}))
    stale = [out / ".curves.png.x1.tmp", out / ".model.safetensors.x2.tmp", out / "checkpoints" / ".step-1.x3.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "training had finished; wrote what the run lacked (curves.png)" in capsys.readouterr().out
    assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "run.json").read_text())["complete"]
    assert not any(path.exists() for path in stale)
    assert cli.main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "run.json says complete): nothing to resume" in capsys.readouterr().out


def test_a_training_state_of_another_run_is_never_adopted(tmp_path, capsys):
    ours, other = tmp_path / "ours", tmp_path / "other"
    assert cli.main([*RUN, "--out", str(ours)]) == 0
    assert cli.main([*RUN, "--lr", "0.003", "--out", str(other)]) == 0
    for name in ("summary.json", "curves.png"):  # make ours unfinished
        (ours / name).unlink()
    own = sorted((ours / "checkpoints").iterdir())[-1]
    foreign = ours / "checkpoints" / "step-000000999.safetensors"
    shutil.copy(sorted((other / "checkpoints").iterdir())[-1], foreign)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(ours), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"skipping checkpoint {foreign}: its train differ from run.json's: it is not of this run" in text, text
    assert f"resuming {ours} from {own.name}" in text
    assert json.loads((ours / "summary.json").read_text())["train"]["lr"] == 0.001


def test_summary_is_strict_json_and_a_non_finite_ending_exits_3(tmp_path, capsys, monkeypatch):
    text = strict_json({"a": math.nan, "b": {"c": -math.inf, "d": [1.0, math.inf]}, "e": 2.0})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {
        "a": None, "b": {"c": None, "d": [1.0, None]}, "e": 2.0, "non_finite": ["a", "b.c", "b.d[1]"]}
    fit = train.fit

    def overflowing(*args, **kwargs):
        result = fit(*args, **kwargs)
        result.test = {**result.test, "loss": math.inf}
        return result

    monkeypatch.setattr(train, "fit", overflowing)
    out = tmp_path / "run"
    assert cli.main([*RUN, "--out", str(out)]) == 3
    assert "the best model's test loss is inf" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["test_loss"] is None and summary["non_finite"] == ["test_loss"]


def test_a_misspelled_table_is_an_error_and_names_make_safe_folders(tmp_path, capsys, monkeypatch):
    config = tmp_path / "net.toml"
    config.write_text('name = "x"\n[[layers]]\ntype = "flatten"\n[[layers]]\ntype = "dense"\nfeatures = 10\n'
                      '[trian]\nepochs = 1\n')
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "unknown top-level key(s) or table(s) trian; expected some of description, layers, name, train" in \
        capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert cli.safe_name("../../X") == "_.._X" and cli.safe_name("my net/v2") == "my_net_v2"
    config.write_text(config.read_text().replace('name = "x"', 'name = "../../escaped"').replace("[trian]",
                                                                                              "[train]"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 0
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.startswith("_.._escaped-digits-") and not (tmp_path.parent / "escaped").exists()
