"""The training child's side of ``--report-to``: where TensorBoard writes, and MLflow's experiment.

The Trainer's own callbacks do the logging (loss, learning rate, grad norm, eval loss, the run's arguments),
named by the fine-tune (``SFTConfig.run_name``); rank 0 alone logs. Two things they cannot know:

- TensorBoard belongs in the fine-tune's ``runs/`` folder, but a new run is built in a hidden folder that is
  renamed to ``NAME/`` at its first checkpoint, and TensorBoard appends to its event file by path: so it writes
  into the hidden folder's ``runs/``, and :func:`follow_move` closes its writer before the rename and points it
  into ``NAME/runs/``, where the next log starts a second event file of the same run (TensorBoard reads both).
- MLflow's experiment is created with its artifacts beside its SQLite file (``mlflow_child.ensure_experiment``),
  not in whatever folder the process runs in.

Heavy imports happen inside functions: this runs in the training child only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TENSORBOARD_ENV = "TENSORBOARD_LOGGING_DIR"


def prepare(report_to: Sequence[str], out: Path, is_rank_zero: bool) -> None:
    """Before the Trainer exists: TensorBoard's folder under ``out/runs/`` (unless TENSORBOARD_LOGGING_DIR is
    set by the user), MLflow's experiment (rank 0: the one that logs)."""
    if "tensorboard" in report_to and not os.environ.get(TENSORBOARD_ENV):
        from transformers.integrations.integration_utils import default_logdir

        os.environ[TENSORBOARD_ENV] = str(out / default_logdir())  # runs/<date>_<host>
    if "mlflow" in report_to and is_rank_zero:
        from .mlflow_child import ensure_experiment

        ensure_experiment(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"])


def follow_move(trainer: Any, old: Path, new: Path) -> None:
    """Call right before folder ``old`` is renamed to ``new``: a TensorBoard writer inside it is closed (all it
    logged is in its file, which moves along) and reopens under ``new`` at the next log."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if not isinstance(callback, TensorBoardCallback) or not callback.logging_dir:
            continue
        folder = Path(callback.logging_dir)
        if folder.is_relative_to(old):
            if callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None
            callback.logging_dir = str(new / folder.relative_to(old))
