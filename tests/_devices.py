"""Run in a subprocess with several forced CPU devices (see tests/test_parallel.py): prints one JSON line."""

import json
import sys

import numpy as np

import jaxcnn as jc
from jaxcnn import data, parallel, train


def twenty_steps(devices: int):
    cfg = train.TrainConfig(epochs=1, batch_size=32)
    prep = train.prepare(data.load("digits"), cfg)
    prep = train.Prepared(prep.name, prep.x_fit[:20 * 32], prep.y_fit[:20 * 32], prep.x_val, prep.y_val,
                          prep.x_test, prep.y_test, prep.mean, prep.classes)  # exactly 20 steps
    return train.fit(jc.preset("digits-cnn"), prep, cfg, devices=devices)


if __name__ == "__main__":
    one, many = twenty_steps(1), twenty_steps(int(sys.argv[1]))
    rel = max(float(np.abs(one.params[k][n] - many.params[k][n]).max() / np.abs(one.params[k][n]).max())
              for k in one.params for n in one.params[k])
    try:
        parallel.check_batch(30, parallel.make_mesh())
        error = None
    except ValueError as err:
        error = str(err)
    objective_rel = float(np.max(np.abs(one.step_losses - many.step_losses) / np.abs(one.step_losses)))
    print(json.dumps({"devices": parallel.make_mesh().size, "params_rel": rel,
                      "steps": len(one.step_losses), "objective_rel": objective_rel,
                      "val": [one.history[0]["val_loss"], many.history[0]["val_loss"]],
                      "test": [one.test["accuracy"], many.test["accuracy"]], "error": error}))
