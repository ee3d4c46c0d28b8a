"""Run in a subprocess with several forced CPU devices (see tests/test_parallel.py): prints one JSON line."""

import json
import sys

import numpy as np

import jaxcnn as jc
from jaxcnn import data, parallel, train

BATCH_NORM_NET = jc.Sequential([jc.Conv(8, 3, padding=1, bias=False), jc.BatchNorm(), jc.ReLU(), jc.MaxPool(2),
                                jc.Conv(8, 3, padding=1, bias=False), jc.BatchNorm(), jc.ReLU(), jc.GlobalAvgPool(),
                                jc.Dense(10)])  # no conv bias: batch norm subtracts it again


def train_steps(devices: int, steps: int = 20, batch: int = 32, rule: str | None = None, augment: str = "",
                net=None):
    cfg = train.TrainConfig(epochs=1, batch_size=batch, rule=rule, augment=augment)
    prep = train.prepare(data.load("digits"), cfg)
    prep = train.Prepared(prep.name, prep.x_fit[:steps * batch], prep.y_fit[:steps * batch], prep.x_val,
                          prep.y_val, prep.x_test, prep.y_test, prep.mean, prep.classes)  # exactly `steps` steps
    return train.fit(net or jc.preset("digits-cnn"), prep, cfg, devices=devices)


def smallest_batches():
    """Issue 15 item 8: 2 CPU devices, im2col, batches 2 and 6 (1 and 3 per device), where the host running ahead
    of the all-reduces deadlocked XLA's CPU client (see parallel.pace): each trains 200 steps and evaluates."""
    one = {batch: train_steps(1, 200, batch, "im2col") for batch in (2, 6)}
    two = {batch: train_steps(2, 200, batch, "im2col") for batch in (2, 6)}
    return {"devices": parallel.make_mesh().size,
            "params_rel": max(float(np.abs(one[b].params[k][n] - two[b].params[k][n]).max()
                                    / np.abs(one[b].params[k][n]).max())
                              for b in one for k in one[b].params for n in one[b].params[k]),
            "steps": [len(two[b].step_losses) for b in two]}


if __name__ == "__main__":
    if sys.argv[1] == "small":
        print(json.dumps(smallest_batches()))
        sys.exit()
    def params_rel(a, b):
        pairs = [(a.params[k][n], b.params[k][n]) for k in a.params for n in a.params[k]]
        pairs += [(a.state[k][n], b.state[k][n]) for k in a.state for n in a.state[k]]
        return max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in pairs)

    one, many = train_steps(1), train_steps(int(sys.argv[1]))
    rel = params_rel(one, many)
    # augmentation keyed by each example's place in the global batch: the same draws on any number of devices
    augmented_rel = params_rel(train_steps(1, augment="crop,flip"), train_steps(int(sys.argv[1]), augment="crop,flip"))
    # batch norm's statistics synchronised over the devices: the same params and running averages
    batch_norm = [train_steps(1, 8, net=BATCH_NORM_NET), train_steps(int(sys.argv[1]), 8, net=BATCH_NORM_NET)]
    batch_norm_rel = params_rel(*batch_norm)
    try:
        parallel.check_batch(30, parallel.make_mesh())
        error = None
    except ValueError as err:
        error = str(err)
    objective_rel = float(np.max(np.abs(one.step_losses - many.step_losses) / np.abs(one.step_losses)))
    print(json.dumps({"devices": parallel.make_mesh().size, "params_rel": rel, "augmented_rel": augmented_rel,
                      "batch_norm_rel": batch_norm_rel, "batch_norm_state": sorted(batch_norm[1].state),
                      "steps": len(one.step_losses), "objective_rel": objective_rel,
                      "val": [one.history[0]["val_loss"], many.history[0]["val_loss"]],
                      "test": [one.test["accuracy"], many.test["accuracy"]], "error": error}))
