"""Data augmentation in the training step (jaxcnn.augment): crops and flips, each example keyed by the global step
and its place in the global batch, so splits over devices and resumed runs draw the same."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import augment, train

X = jnp.asarray(np.random.default_rng(0).normal(size=(24, 6, 5, 2)), jnp.float32)
KEY = jax.random.key(7)


def test_standard_means_crop_and_flip_except_for_digits():
    assert augment.parse("standard", "cifar10") == ("crop", "flip")
    assert augment.parse("standard", "mnist") == ("crop",) and augment.parse("", "mnist") == ()
    assert augment.parse("flip, crop", "digits") == ("flip", "crop")
    with pytest.raises(ValueError, match="augment must be 'standard' or a comma-separated list of crop, flip, got "
                                         "'rotate'"):
        train.TrainConfig(augment="rotate")
    with pytest.raises(ValueError, match="augment, label_smoothing and precision apply to the first-order"):
        train.TrainConfig(optimizer="newton", augment="crop")


def test_every_output_is_a_window_of_the_padded_image_or_its_mirror():
    p = 2
    out = np.asarray(augment.augment(X, KEY, jnp.arange(24), ("crop", "flip"), p))
    padded = np.pad(np.asarray(X), ((0, 0), (p, p), (p, p), (0, 0)))
    seen = set()
    for i in range(24):
        found = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (False, True)
                 if np.array_equal(out[i], (lambda w: w[:, ::-1] if f else w)(padded[i, dy:dy + 6, dx:dx + 5]))]
        assert found, f"example {i} is no window of its padded image"
        seen.add(found[0])
    assert len(seen) >= 10, seen  # the draws vary across examples
    assert np.array_equal(augment.augment(X, KEY, jnp.arange(24), (), p), X)


def test_the_draw_does_not_depend_on_how_the_batch_is_split():
    whole = augment.augment(X, KEY, jnp.arange(24), ("crop", "flip"), 1)
    parts = [augment.augment(X[i:i + 8], KEY, jnp.arange(i, i + 8), ("crop", "flip"), 1) for i in (0, 8, 16)]
    np.testing.assert_array_equal(whole, jnp.concatenate(parts))


def test_a_resumed_run_with_augmentation_is_bit_identical(tmp_path, monkeypatch):
    from tests.test_reliability import assert_same_run, crash_after

    cfg = train.TrainConfig(epochs=1, augment="crop,flip")
    options = dict(recipe="digits-cnn", progress=False, log=lambda s: None, checkpoint_every=10)
    train.run(jc.preset("digits-cnn"), cfg, tmp_path / "a", **options)
    crash_after(2, monkeypatch)  # after step 20 of 37
    with pytest.raises(KeyboardInterrupt):
        train.run(jc.preset("digits-cnn"), cfg, tmp_path / "b", **options)
    monkeypatch.undo()
    train.resume_run(tmp_path / "b", progress=False, log=lambda s: None)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    plain = train.run(jc.preset("digits-cnn"), train.TrainConfig(epochs=1), tmp_path / "c", **options)
    augmented = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert plain["test_loss"] != augmented["test_loss"]  # the augmentation changed the training
