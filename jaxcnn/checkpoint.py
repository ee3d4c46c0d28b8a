"""Saved files: models (``model.safetensors``) and training states (``checkpoints/step-*.safetensors``).

Both are safetensors files (arrays only, no pickle: loading cannot run code) with JSON metadata, written atomically
(temporary file, fsync, rename). One SHA-256 covers every tensor (name, dtype, shape, bytes) and the metadata
(its JSON text), so a flipped bit anywhere that matters is reported, never loaded: a recorded learning rate, epoch
or network is as protected as a weight. (Files written before the metadata was covered, with a SHA-256 of the
tensors only, still load; their tensors are checked.) Only regular files are opened (a FIFO would block), and a file
holding NaN or Inf is refused: no run resumes from, and no evaluation reports on, a model that is not finite.

A model holds params ``params/<layer>/<name>``, the preprocessing mean ``preprocess/mean`` and the network config,
so ``load_model`` rebuilds the network. A training state holds everything ``jaxcnn train --resume`` needs to go
on exactly as if never interrupted: params, optimizer state, the best params so far, the position in the data
(epoch and step; batch order is a pure function of the seed and epoch, so this is the whole random state), what
the current epoch has accumulated, the history, the preprocessing mean and both configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxcnn._io import atomic_write
from jaxcnn.network import Sequential

MODEL_FORMAT = "jaxcnn-model-1"
STATE_FORMAT = "jaxcnn-train-state-1"
STATE_NAME = re.compile(r"^step-(\d+)\.safetensors$")
DIGEST = "sha256_tensors_and_metadata"  # older files have "sha256", of the tensors only


class CheckpointError(ValueError):
    """A saved file is missing, truncated, corrupted, or not what was expected."""


@dataclass(frozen=True)
class SavedModel:
    network: Sequential
    params: dict
    mean: np.ndarray
    meta: dict
    state: dict = field(default_factory=dict)  # batch norm's running averages; {} for a network without


def save_model(path: str | os.PathLike, network: Sequential, params: dict, mean: np.ndarray, meta: dict,
               state: dict | None = None) -> None:
    """Write ``params`` (a dict of dicts of arrays), the network's ``state`` (batch norm's running averages), the
    mean image and ``meta`` to ``path`` atomically."""
    tensors = {**_flatten("params", params), **_flatten("state", state or {}), "preprocess/mean": np.asarray(mean)}
    _write(path, tensors, {"format": MODEL_FORMAT, "network": network.to_config(), **meta})


def load_model(path: str | os.PathLike, *, states: bool = False) -> SavedModel:
    """Read a model written by ``save_model``; a directory means its ``model.safetensors``. With ``states``, a
    training state (``checkpoints/step-*.safetensors``) is read as the model it holds: its current params, mean
    image and network, with ``epoch`` (the epoch it was in) and ``global_step`` among the metadata."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors, header = _read(path, (MODEL_FORMAT, STATE_FORMAT) if states else MODEL_FORMAT)
    if header.pop("format") == STATE_FORMAT:
        tensors = {k: v for k, v in tensors.items() if k.startswith(("params/", "state/", "preprocess/"))}
        header = {**header, "epoch": (header.get("position") or {}).get("epoch")}
        if "preprocess/mean" in tensors:  # the mean image has the input's shape
            header["input_shape"] = list(tensors["preprocess/mean"].shape)
    lacks = [what for what, there in (("its network", "network" in header),
                                      ("preprocess/mean", "preprocess/mean" in tensors)) if not there]
    if lacks:
        raise CheckpointError(f"{path}: not a jaxcnn model: it lacks {' and '.join(lacks)}")
    network = Sequential.from_config(header.pop("network"), source=str(path))
    params = _unflatten("params", tensors)
    state = _unflatten("state", tensors)
    if "input_shape" in header:
        _check_params(path, network, params, state, tuple(header["input_shape"]))
    return SavedModel(network, params, tensors["preprocess/mean"], header, state)


def _check_params(path: Path, network: Sequential, params: dict, state: dict, input_shape: tuple) -> None:
    """The saved params (and state) must be exactly the network's: the same layers, names and shapes."""
    expected = jax.eval_shape(lambda: (network.init(jax.random.key(0), input_shape),
                                       network.init_state(input_shape)))
    want = {key: tuple(a.shape) for kind, tree in zip(("params", "state"), expected)
            for key, a in _flatten(kind, tree, leaf=lambda a: a).items()}
    have = {k: tuple(v.shape) for k, v in {**_flatten("params", params), **_flatten("state", state)}.items()}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    wrong = [f"{k} is {have[k]}, expected {want[k]}" for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if missing or extra or wrong:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
            ([f"unexpected {', '.join(extra)}"] if extra else []) + wrong
        raise CheckpointError(f"{path}: its tensors do not fit its network {network.name} on {input_shape} inputs: "
                              f"{'; '.join(problems)}")


def save_state(folder: str | os.PathLike, global_step: int, arrays: dict[str, dict], meta: dict, keep: int = 3) -> Path:
    """Write training state ``folder/step-<global_step>.safetensors``, then delete all but the newest ``keep``.

    ``arrays`` maps a group name to a dict of arrays (``params``, ``best``, ``opt``, ...). Older states are removed
    only after the new one is complete, so a crash at any moment leaves at least one valid state.
    """
    folder = Path(folder)
    path = folder / f"step-{global_step:09d}.safetensors"
    tensors = {k: v for group, values in arrays.items() for k, v in _flatten(group, values).items()}
    _write(path, tensors, {"format": STATE_FORMAT, "global_step": global_step, **meta})
    for _, old in list_states(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_state(path: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """(arrays by group, meta) of a training state written by ``save_state``."""
    tensors, header = _read(Path(path), STATE_FORMAT)
    header.pop("format")
    groups = sorted({k.split("/", 1)[0] for k in tensors})
    return {g: _unflatten(g, tensors) for g in groups}, header


def list_states(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Training states in ``folder`` as (global step, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := STATE_NAME.match(name))
             and (folder / name).is_file()]
    return sorted(found)


def newest_state(folder: str | os.PathLike, report: Callable[[str], None] = print,
                 reject: Callable[[dict], str | None] = lambda meta: None):
    """The newest training state in ``folder`` that reads back intact and that ``reject(meta)`` does not object to
    (it returns the reason, or None), as (arrays, meta, path), or None if there is none. A damaged or rejected
    newer state is reported and the one before it tried. Temporary files that a killed write left behind are
    removed."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(".step-*.tmp"):
            stale.unlink(missing_ok=True)
    for _, path in reversed(list_states(folder)):
        try:
            arrays, meta = load_state(path)
        except CheckpointError as err:
            report(f"skipping damaged checkpoint: {err}")
            continue
        reason = reject(meta)
        if reason:
            report(f"skipping checkpoint {path}: {reason}")
            continue
        return arrays, meta, path
    return None


def _flatten(group: str, values: dict, leaf=lambda a: np.asarray(jax.device_get(a))) -> dict:
    """{"conv1": {"w": a}} -> {"group/conv1/w": leaf(a)}; nesting of any depth, keys without "/"."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(f"{group}/{key}", value, leaf))
        else:
            out[f"{group}/{key}"] = leaf(value)
    return out


def _unflatten(group: str, tensors: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        if head != group:
            continue
        *parents, leaf = rest.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _write(path, tensors: dict[str, np.ndarray], header: dict) -> None:
    import safetensors.numpy

    # One metadata entry: safetensors writes several in a per-process random order, and a file must come out the
    # same bytes whenever the same run writes it (resumed runs are compared byte for byte).
    header = {**header, DIGEST: _digest(tensors, json.dumps(header))}
    atomic_write(path, safetensors.numpy.save(tensors, metadata={"jaxcnn": json.dumps(header)}))


def _read(path: Path, expected_format: str | tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata (its ``format`` one of ``expected_format``) of a file, checked: digest, format,
    finite values."""
    import safetensors
    import safetensors.numpy

    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a directory, FIFO or device); expected a .safetensors "
                              f"file")
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            header = json.loads((f.metadata() or {})["jaxcnn"])
        tensors = safetensors.numpy.load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err}); it may be truncated or not a "
                              f"jaxcnn file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its metadata is not a JSON object: the file is corrupted")
    if DIGEST in header:
        recorded = header.pop(DIGEST)
        if _digest(tensors, json.dumps(header)) != recorded:
            raise CheckpointError(f"{path}: the tensors and metadata do not match their recorded SHA-256: the file "
                                  f"is corrupted")
    elif _digest(tensors) != header.pop("sha256", None):  # an older file: its tensors only
        raise CheckpointError(f"{path}: the tensors do not match their recorded SHA-256: the file is corrupted")
    expected = (expected_format,) if isinstance(expected_format, str) else expected_format
    if header.get("format") not in expected:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected "
                              f"{' or '.join(map(repr, expected))}")
    for key, a in sorted(tensors.items()):
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{path}: {key} holds {int(np.sum(~np.isfinite(a)))} non-finite values (NaN or "
                                  f"Inf); a model that is not finite is not loaded")
    return tensors, header


def _digest(tensors: dict[str, np.ndarray], metadata: str | None = None) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, then of the metadata's JSON text (when given; JSON
    written by ``json.dumps`` reads back to the same text)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    if metadata is not None:
        h.update(b"metadata\n" + metadata.encode())
    return h.hexdigest()
