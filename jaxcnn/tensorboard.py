"""TensorBoard event files of a run (``jaxcnn train --tensorboard``), written with tensorboardX when installed.

Everything is plotted against the global step (an epoch's metrics at the step that ends it, a Newton iteration's
at its number), so that a resumed run can tell TensorBoard to drop what the killed run logged after its state.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

INSTALL = "pip install 'jaxcnn[tensorboard]' (or pip install tensorboardX)"


def require() -> None:
    """Raise before training starts if tensorboardX is missing."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(f"--tensorboard writes TensorBoard event files with tensorboardX, which is not "
                                  f"installed: {INSTALL}") from None


class Board:
    """Scalars of a run in ``folder``: every logged step's (``step/<name>``) and every epoch's (``epoch/<name>``).
    ``done``: the steps a resumed run had done; TensorBoard then discards events the earlier process logged
    after them (they are logged again)."""

    def __init__(self, folder: Path, done: int | None = None):
        from tensorboardX import SummaryWriter

        # tensorboardX names a file by the second and host: a suffix keeps a resumed run from overwriting the file
        # of one started in the same second
        self.writer = SummaryWriter(str(folder), purge_step=None if done is None else done + 1,
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def steps(self, rows: list[dict]) -> None:
        for row in rows:
            self._scalars("step", row, int(row["step"]), skip=("step", "epoch"))

    def epoch(self, record: dict, global_step: int) -> None:
        self._scalars("epoch", record, global_step, skip=())

    def _scalars(self, prefix: str, values: dict, global_step: int, skip: tuple[str, ...]) -> None:
        for name, value in values.items():
            if name not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", float(value), global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
