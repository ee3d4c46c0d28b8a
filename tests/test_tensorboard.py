"""--tensorboard: the metrics.csv rows and every epoch's metrics as TensorBoard event files, read back here with
tensorboardX's own protobuf; a resumed run tells TensorBoard to drop what the killed run logged after its state."""

import csv
import json
import struct
import sys
from pathlib import Path

import pytest

import jaxcnn as jc
from jaxcnn import cli, train
from tests.test_reliability import crash_after


def events(folder: Path) -> list:
    """Every event of every file in ``folder``, in file order (TFRecord: length, its CRC, the record, its CRC)."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + length])
            found.append(event)
            at += 12 + length + 4
    return found


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows it: a purge (a resumed run's restart) drops later steps."""
    table: dict[str, dict[int, float]] = {}
    for event in events(folder):
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            for values in table.values():
                for step in [s for s in values if s >= event.step]:
                    del values[step]
        for value in event.summary.value:
            table.setdefault(value.tag, {})[event.step] = value.simple_value
    return table


def test_step_and_epoch_scalars_match_the_csv_and_jsonl_and_survive_a_resume(tmp_path, monkeypatch):
    options = dict(recipe="digits-cnn", progress=False, log=lambda s: None, checkpoint_every=10, log_steps=5,
                   tensorboard=True)
    cfg = train.TrainConfig(epochs=2)
    crash_after(4, monkeypatch)  # killed right after step 37's state (epoch 1's end), before epoch 1 was logged
    with pytest.raises(KeyboardInterrupt):
        train.run(jc.preset("digits-cnn"), cfg, tmp_path, **options)
    monkeypatch.undo()
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path / "tensorboard")) as late:  # what a process killed later had logged
        late.add_scalar("step/objective", 99.0, 46)
    train.resume_run(tmp_path, progress=False, log=lambda s: None, log_steps=5, tensorboard=True)
    table = scalars(tmp_path / "tensorboard")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    for name in ("objective", "lr", "grad_norm", "grad_norm/conv1"):
        assert table[f"step/{name}"] == pytest.approx({int(r["step"]): float(r[name]) for r in rows}, rel=1e-6), name
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("train_objective", "val_loss", "val_accuracy"):
        assert table[f"epoch/{name}"] == pytest.approx({37 * r["epoch"]: r[name] for r in history}, rel=1e-6)


def test_without_tensorboardx_the_run_is_refused_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    assert cli.main(["train", "--tensorboard", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'jaxcnn[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
