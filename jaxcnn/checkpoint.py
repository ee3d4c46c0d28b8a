"""Saved models: params, preprocessing constants and metadata in one safetensors file, written atomically.

The file holds tensors ``params/<layer>/<name>`` and ``preprocess/mean``, and JSON metadata with the network
config (so ``load_model`` rebuilds the network), the dataset and training recipe, and a SHA-256 of the tensors:
a truncated or corrupted file is reported, never half-loaded. safetensors stores only arrays (no pickle), so
loading a file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import jax
import numpy as np

from jaxcnn._io import atomic_write
from jaxcnn.network import Sequential

FORMAT = "jaxcnn-model-1"


class CheckpointError(ValueError):
    """A model file is missing, truncated, corrupted, or not a jaxcnn model."""


@dataclass(frozen=True)
class SavedModel:
    network: Sequential
    params: dict
    mean: np.ndarray
    meta: dict


def save_model(path: str | os.PathLike, network: Sequential, params: dict, mean: np.ndarray, meta: dict) -> None:
    """Write ``params`` (a dict of dicts of arrays), the mean image and ``meta`` to ``path`` atomically."""
    import safetensors.numpy

    tensors = {f"params/{layer}/{name}": np.asarray(jax.device_get(a))
               for layer, group in params.items() for name, a in group.items()}
    tensors["preprocess/mean"] = np.asarray(mean)
    header = {"format": FORMAT, "network": network.to_config(), "sha256": _digest(tensors), **meta}
    atomic_write(path, safetensors.numpy.save(tensors, metadata={"jaxcnn": json.dumps(header)}))


def load_model(path: str | os.PathLike) -> SavedModel:
    """Read a model written by ``save_model``; a directory means its ``model.safetensors``."""
    import safetensors
    import safetensors.numpy

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such model file (jaxcnn train writes OUT/model.safetensors)")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            header = json.loads((f.metadata() or {})["jaxcnn"])
        tensors = safetensors.numpy.load_file(path)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable model file ({type(err).__name__}: {err}); it may be truncated "
                              f"or not a jaxcnn model") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
    if _digest(tensors) != header.get("sha256"):
        raise CheckpointError(f"{path}: the tensors do not match their recorded SHA-256: the file is corrupted")
    params: dict = {}
    for key, value in tensors.items():
        if key.startswith("params/"):
            _, layer, name = key.split("/")
            params.setdefault(layer, {})[name] = value
    network = Sequential.from_config(header["network"], source=path)
    meta = {k: v for k, v in header.items() if k not in ("format", "network", "sha256")}
    return SavedModel(network, params, tensors["preprocess/mean"], meta)


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()
