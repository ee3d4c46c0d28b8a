"""Data augmentation inside the jitted training step: random crops of a zero-padded image and horizontal flips.

Every example's randomness is a function of the run's seed, the global step and the example's place in the
global batch (``jax.random.fold_in``), so the augmented batch is the same however the batch is split over devices,
and a resumed run (whose step count is restored) draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

KINDS = ("crop", "flip")
DIGIT_DATASETS = ("digits", "mnist", "svhn")  # a mirrored digit is another symbol: no flips by default


def parse(spec: str, dataset: str) -> tuple[str, ...]:
    """``"crop,flip"`` -> ("crop", "flip"); ``"standard"``: crop, and flip unless the dataset holds digits;
    ``""``: none."""
    if spec == "standard":
        return ("crop",) if dataset in DIGIT_DATASETS else ("crop", "flip")
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"train: augment must be 'standard' or a comma-separated list of {', '.join(KINDS)}, "
                         f"got {spec!r}")
    return kinds


def default_padding(image_hw: tuple[int, int]) -> int:
    """Crop padding when none is given: an eighth of the image side (4 pixels for 32x32), at least 1."""
    return max(1, min(image_hw) // 8)


def augment(x: jax.Array, key: jax.Array, index: jax.Array, kinds: tuple[str, ...], padding: int) -> jax.Array:
    """``x`` [N, H, W, C] with each example i randomly cropped (``"crop"``: an H x W window of the image padded with
    ``padding`` zeros on every side) and/or flipped left-right with probability 1/2 (``"flip"``), drawn from
    ``fold_in(key, index[i])``: ``index`` holds each example's place in the global batch."""
    def one(image, i):
        crop_key, flip_key = jax.random.split(jax.random.fold_in(key, i))
        if "crop" in kinds:
            padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
            dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
            image = lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
        if "flip" in kinds:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
        return image

    return jax.vmap(one)(x, index) if kinds else x
