"""Bad input that used to end in a raw traceback (KeyError, ZeroDivisionError, AttributeError, an overflow or a
24 GB allocation) or in a message naming neither the file nor the layer: now a clear error, exit status 2."""

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import checkpoint, cli, data
from tests.test_data import idx_bytes, write_mnist

TINY = jc.Sequential([jc.Conv(2, 3, padding=1), jc.ReLU(), jc.Flatten(), jc.Dense(3)], name="tiny")


@pytest.mark.parametrize("call,match", [
    (lambda: jc.conv2d(jnp.ones((0, 4, 4, 1)), jnp.ones((3, 3, 1, 2))), r"empty arrays: x has shape \(0, 4, 4, 1\)"),
    (lambda: jc.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 0))), r"and w \(3, 3, 1, 0\)"),
    (lambda: jc.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)), padding=10**4),
     r"conv2d: the phi\(pad\(Z\)\) would have shape \(1, 20000, 20000, 9\), 3,600,000,000 entries, more than the "
     r"limit of 2\^31 - 1"),
    (lambda: jc.ops.conv2d_jvp((jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1))), (jnp.ones((1, 2, 2, 1)), None),
                           padding=10**4), r"conv2d_jvp: the phi\(pad\(Z\)\) would have shape \(1, 20000, 20000, 9\)"),
    (lambda: jc.ops.conv_relu_pool_jvp((jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1))), (None, jnp.ones((3, 3, 1, 1))),
                                   padding=10**5, rule="flip"),
     r"conv_relu_pool_jvp: the padded input would have shape"),
    (lambda: jc.preset("digits-cnn").apply({}, jnp.ones((1, 8, 8, 1))),
     r"layer 0 \(Conv\(32, padding=1\)\): params has no entry 'conv1' \(it has \[\]\)"),
    (lambda: jc.Sequential([jc.Flatten(), jc.Dense(2**31)]), r"dense: features = 2147483648 exceeds the limit"),
    (lambda: jc.Sequential([jc.Conv(8, 2**16), jc.Flatten(), jc.Dense(3)]).init(jax.random.key(0), (4, 4, 1)),
     r"layer 0 \(Conv\(8, kernel=65536\)\): its w would have shape 65536x65536x1x8"),
])
def test_sizes_are_checked_before_anything_is_allocated(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_idx_dims_that_overflow_and_image_sizes_that_differ_name_the_file(tmp_path):
    big = tmp_path / "big-idx3-ubyte"
    big.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2**31, 2**31, 2**31))
    with pytest.raises(data.DataError, match=r"big-idx3-ubyte: 16 bytes, but its header promises shape"):
        data.read_idx(big)
    write_mnist(tmp_path / "mnist")
    test_images = np.zeros((5, 32, 32), np.uint8)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(test_images)))
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte.gz: images of 32x32, but the training images "
                                             r"\(train-images-idx3-ubyte.gz\) are 28x28"):
        data.load("mnist", tmp_path)


def test_a_model_of_other_shapes_metadata_or_dataset_gets_a_clear_error(tmp_path, capsys):
    params = TINY.init(jax.random.key(0), (4, 4, 1))
    meta = {"recipe": "tiny", "dataset": "digits", "epoch": 1, "input_shape": [4, 4, 1], "train": {}}
    mean = np.zeros((4, 4, 1), np.float32)
    path = tmp_path / "model.safetensors"
    checkpoint.save_model(path, TINY, {**params, "conv1": {"w": params["conv1"]["w"]}, "extra": {"w": mean}}, mean,
                          meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"do not fit its network tiny on \(4, 4, 1\) inputs: "
                                                         r"missing params/conv1/b; unexpected params/extra/w"):
        checkpoint.load_model(path)
    checkpoint.save_model(path, TINY, params, mean, {"dataset": "digits"})
    assert cli.main(["evaluate", "--checkpoint", str(path)]) == 2
    assert "the model's metadata lacks train, recipe, epoch" in capsys.readouterr().err
    digits_model = jc.preset("digits-cnn")
    checkpoint.save_model(path, digits_model, digits_model.init(jax.random.key(0), (8, 8, 1)),
                          np.zeros((8, 8, 1), np.float32), {**meta, "input_shape": [8, 8, 1]})
    write_mnist(tmp_path / "mnist")
    assert cli.main(["evaluate", "--checkpoint", str(path), "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    assert "trained on digits images of 8x8x1, but mnist's are 28x28x1" in capsys.readouterr().err


def test_a_state_without_the_keys_resume_reads_is_passed_over(tmp_path, capsys):
    params = TINY.init(jax.random.key(0), (4, 4, 1))
    checkpoint.save_state(tmp_path / "checkpoints", 4, {"params": params}, {"train": {}})
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "its metadata lacks network, dataset, recipe, position" in captured.out
    assert "no training state of this run to resume from" in captured.err


def test_a_batch_larger_than_the_training_set_is_refused_before_rules_are_timed(tmp_path, capsys, monkeypatch):
    """It used to be found only after rule="auto" had compiled and timed six candidates at that batch (minutes at
    batch 100000): now before anything is timed, written or compiled."""
    monkeypatch.setenv("JAXCNN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--batch-size", "100000", "--out", str(out), "--no-progress"]) == 2
    assert "batch_size 100000 exceeds the 1212 training examples" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not out.exists()
