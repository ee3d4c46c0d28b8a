"""`--resume --epochs N` makes a finished or stopped run longer: with a constant learning rate the result is, bit for
bit, the run that was started N epochs long; the finished run's summary is kept; shorter is refused."""

import json

import pytest

import jaxcnn as jc
from jaxcnn import cli, train
from tests.test_reliability import assert_same_run, crash_after

RUN = ["train", "--no-progress"]


def test_a_finished_run_extended_is_the_longer_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*RUN, "--epochs", "2", "--out", str(a)]) == 0
    assert cli.main([*RUN, "--epochs", "1", "--out", str(b)]) == 0
    first = json.loads((b / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main([*RUN, "--resume", "--out", str(b)]) == 0
    assert "nothing to resume; to train it longer, pass --epochs larger than 1" in capsys.readouterr().out
    assert cli.main([*RUN, "--resume", "--out", str(b), "--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert f"extending the finished run in {b} from 1 to 2 epochs (its summary kept as summary-epoch-1.json)" in text
    assert "epoch   2/2" in text and "note:" not in text  # a constant learning rate: nothing changes
    assert json.loads((b / "summary-epoch-1.json").read_text()) == first
    manifest = json.loads((b / "run.json").read_text())
    assert manifest["complete"] and manifest["train"]["epochs"] == 2 and manifest["extended"] == [{"from": 1, "to": 2}]
    assert json.loads((b / "summary.json").read_text())["epochs"] == 2
    assert_same_run(a, b)

    assert cli.main([*RUN, "--resume", "--out", str(b), "--epochs", "1"]) == 2
    assert "is a run of 2 epochs; --resume can make it longer (--epochs > 2), not shorter" in capsys.readouterr().err
    assert cli.main([*RUN, "--resume", "--out", str(b), "--iterations", "5"]) == 2
    assert "is a run of the adam optimizer, whose length is in epochs: pass --epochs" in capsys.readouterr().err
    assert (b / "summary.json").is_file() and json.loads((b / "run.json").read_text())["complete"]


def test_a_stopped_run_extended_and_killed_again_resumes_to_its_new_length(tmp_path, monkeypatch, capsys):
    """Stopped in epoch 2 of 2, extended to 3 and killed before its first new state (every state left says 2
    epochs): a plain --resume goes on to epoch 3, run.json's length. A cosine schedule's stretch is announced."""
    out = tmp_path / "run"
    crash_after(3, monkeypatch)  # saves at steps 20, 37 (epoch 1's end), 40
    with pytest.raises(KeyboardInterrupt):
        train.run(jc.preset("digits-cnn"), train.TrainConfig(epochs=2, schedule="cosine"), out, recipe="digits-cnn",
                  progress=False, log=lambda s: None, checkpoint_every=20)
    monkeypatch.undo()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        train.resume_run(out, progress=False, log=print, extend_to=3)
    monkeypatch.undo()
    text = capsys.readouterr().out
    assert f"extending the run in {out} from 2 to 3 epochs" in text
    assert "note: the cosine learning-rate schedule now spans 3 epochs" in text
    assert json.loads((out / "run.json").read_text())["train"]["epochs"] == 3
    summary = train.resume_run(out, progress=False, log=print)
    assert summary["epochs"] == 3 and summary["train"]["epochs"] == 3
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "resuming" in capsys.readouterr().out
