"""Saved files: every byte checked (tensors and metadata under one SHA-256), non-finite models refused, only regular
files opened. The fuzz tests flip one bit in every byte of a small model file and training state: each flip is
refused (CheckpointError, exit status 2 from the CLI) or harmless (the same params and the same metadata).
``pytest -m slow`` flips every bit of every byte, and every byte of a digits-cnn model."""

import json
import os

import jax
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import checkpoint, cli
from jaxcnn.checkpoint import CheckpointError, load_model, load_state, save_model, save_state

TINY = jc.Sequential([jc.Conv(2, 3, padding=1), jc.ReLU(), jc.MaxPool(2), jc.Flatten(), jc.Dense(3)], name="tiny")


def tiny_model(path, net=TINY, shape=(4, 4, 1)):
    params = net.init(jax.random.key(0), shape)
    save_model(path, net, params, np.full(shape, 0.5, np.float32),
               {"recipe": "tiny", "dataset": "digits", "epoch": 3, "train": {"lr": 0.001, "epochs": 5}})
    return path


def tiny_state(folder, step=7):
    params = TINY.init(jax.random.key(0), (4, 4, 1))
    arrays = {"params": params, "opt": {"mu": jax.tree_util.tree_map(np.zeros_like, params)}}
    return save_state(folder, step, arrays, {"train": {"lr": 0.001, "epochs": 5}, "position": {"epoch": 2}})


def flat(group):
    return {k: np.asarray(v) for k, v in checkpoint._flatten("g", group).items()}


def same_model(a, b) -> bool:
    fa, fb = flat(a.params), flat(b.params)
    return (a.meta == b.meta and a.network == b.network and np.array_equal(a.mean, b.mean) and fa.keys() == fb.keys()
            and all(np.array_equal(fa[k], fb[k]) for k in fa))


def fuzz(path, load, same, positions, bits=(None,)):
    """Flip bits of ``path`` one at a time: (refused, harmless) counts; a flip both accepted and changing what is
    loaded fails the test."""
    original = path.read_bytes()
    reference = load(path)
    refused = harmless = 0
    try:
        for i in positions:
            for bit in bits:
                raw = bytearray(original)
                raw[i] ^= 1 << (i % 8 if bit is None else bit)
                path.write_bytes(bytes(raw))
                try:
                    loaded = load(path)
                except CheckpointError:
                    refused += 1
                    continue
                assert same(loaded, reference), f"byte {i} bit {bit}: accepted with different content"
                harmless += 1
    finally:
        path.write_bytes(original)
    return refused, harmless


def same_state(a, b) -> bool:
    fa, fb = flat(a[0]), flat(b[0])
    return a[1] == b[1] and fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_every_byte_of_a_model_and_a_state_flipped_is_refused_or_harmless(tmp_path):
    model = tiny_model(tmp_path / "model.safetensors")
    refused, harmless = fuzz(model, load_model, same_model, range(model.stat().st_size))
    assert refused > 0.9 * model.stat().st_size, (refused, harmless)
    state = tiny_state(tmp_path / "checkpoints")
    refused, harmless = fuzz(state, load_state, same_state, range(state.stat().st_size))
    assert refused > 0.9 * state.stat().st_size, (refused, harmless)


@pytest.mark.slow
def test_every_bit_of_every_byte_and_a_digits_model(tmp_path):
    model = tiny_model(tmp_path / "model.safetensors")
    fuzz(model, load_model, same_model, range(model.stat().st_size), bits=range(8))
    state = tiny_state(tmp_path / "checkpoints")
    fuzz(state, load_state, same_state, range(state.stat().st_size), bits=range(8))
    big = tiny_model(tmp_path / "digits.safetensors", jc.preset("digits-cnn"), (8, 8, 1))
    fuzz(big, load_model, same_model, range(big.stat().st_size))


def test_a_changed_recorded_number_is_refused_and_resume_falls_back(tmp_path, capsys):
    """The audit's case: lr 0.001 -> 0.003 in a state's JSON (one bit) was trained on; now the state is refused
    and the one before it is used."""
    folder = tmp_path / "checkpoints"
    tiny_state(folder, step=5)
    newest = tiny_state(folder, step=6)
    raw = newest.read_bytes()
    assert raw.count(b'\\"lr\\": 0.001') == 1  # JSON inside the safetensors header's JSON: quotes escaped
    newest.write_bytes(raw.replace(b'\\"lr\\": 0.001', b'\\"lr\\": 0.003'))
    with pytest.raises(CheckpointError, match="tensors and metadata do not match their recorded SHA-256"):
        load_state(newest)
    messages = []
    _, meta, path = checkpoint.newest_state(folder, report=messages.append)
    assert path.name == "step-000000005.safetensors" and meta["train"]["lr"] == 0.001
    assert "skipping damaged checkpoint" in messages[0]
    model = tiny_model(tmp_path / "model.safetensors")
    assert model.read_bytes().count(b'\\"epoch\\": 3') == 1
    model.write_bytes(model.read_bytes().replace(b'\\"epoch\\": 3', b'\\"epoch\\": 7'))
    assert cli.main(["evaluate", "--checkpoint", str(model)]) == 2
    assert "do not match their recorded SHA-256" in capsys.readouterr().err


def test_a_file_written_before_the_metadata_was_covered_still_loads(tmp_path):
    import safetensors.numpy

    params = TINY.init(jax.random.key(0), (4, 4, 1))
    tensors = {**checkpoint._flatten("params", params), "preprocess/mean": np.zeros((4, 4, 1), np.float32)}
    header = {"format": checkpoint.MODEL_FORMAT, "network": TINY.to_config(), "epoch": 1,
              "sha256": checkpoint._digest(tensors)}
    path = tmp_path / "old.safetensors"
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"jaxcnn": json.dumps(header)}))
    assert load_model(path).meta == {"epoch": 1}
    header["sha256"] = "0" * 64
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"jaxcnn": json.dumps(header)}))
    with pytest.raises(CheckpointError, match="do not match their recorded SHA-256"):
        load_model(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_model_holding_nan_or_inf_is_refused(tmp_path, capsys, value):
    params = TINY.init(jax.random.key(0), (4, 4, 1))
    params["conv1"]["w"] = np.asarray(params["conv1"]["w"]).copy()
    params["conv1"]["w"][0, 0, 0, 1] = value
    path = tmp_path / "model.safetensors"
    save_model(path, TINY, params, np.zeros((4, 4, 1), np.float32), {"dataset": "digits", "epoch": 1})
    with pytest.raises(CheckpointError, match=r"params/conv1/w holds 1 non-finite values \(NaN or Inf\)"):
        load_model(path)
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert "non-finite" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_never_opened(tmp_path, capsys):
    """A FIFO named like a model or a state would block a reader forever: it is refused or passed over."""
    os.mkfifo(tmp_path / "model.safetensors")
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    assert "not a regular file" in capsys.readouterr().err
    folder = tmp_path / "checkpoints"
    real = tiny_state(folder, step=3)
    os.mkfifo(folder / "step-000000009.safetensors")
    assert checkpoint.list_states(folder) == [(3, real)]
