"""``--report-to``: which trackers a run logs to, checked before it starts, and the environment they read.

Nothing here imports a tracker: mlflow costs seconds and hundreds of modules to import, and the kernel and the
``sage`` process must stay light. Training logs through the Trainer's own callbacks in the training child (which
read the environment built by :func:`training_env`); an evaluation is logged by ``python -m
sage_magic.tracking.mlflow_child``, a one-shot child fed the results as JSON on stdin (:func:`log_eval`).

MLflow logs to MLFLOW_TRACKING_URI, else to ``$SAGE_HOME/mlflow.db`` (SQLite) with artifacts in
``$SAGE_HOME/mlruns/``. TensorBoard writes into the fine-tune's own ``runs/`` folder. W&B is passed through to
the Trainer as it is (it reads WANDB_* itself).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.config import Settings
from ..core.errors import SageError

NONE = "none"
TRACKERS = (NONE, "tensorboard", "mlflow", "wandb")
#: What each tracker needs importable in the child (any one of them).
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}
_INSTALL = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny sqlalchemy alembic", "wandb": "wandb"}
#: MLflow experiments runs go to when MLFLOW_EXPERIMENT_NAME is not set.
TRAIN_EXPERIMENT = "sage-finetune"
EVAL_EXPERIMENT = "sage-eval"


def trackers(values: Iterable[str] | None) -> tuple[str, ...]:
    """The trackers a repeated ``--report-to`` names, in order, once each; ``none`` names none."""
    return tuple(dict.fromkeys(v for v in (values or ()) if v != NONE))


def check_installed(python: str, wanted: Iterable[str]) -> None:
    """One error before anything starts when the interpreter that will log cannot import a tracker (one short
    child, which only looks the modules up: importing mlflow would take seconds)."""
    wanted = [t for t in trackers(wanted) if t in _MODULES]
    if not wanted:
        return
    probe = ("import importlib.util as u, json, sys; print(json.dumps([t for t, ms in json.loads(sys.argv[1]).items()"
             " if not any(u.find_spec(m) for m in ms)]))")
    try:
        done = subprocess.run([python, "-c", probe, json.dumps({t: _MODULES[t] for t in wanted})],
                              capture_output=True, text=True, timeout=60)
        missing = json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        raise SageError(f"Could not check the trackers of --report-to with {python} ({error}). Check that "
                        "SAGE_PYTHON (or this Python) runs, or leave out --report-to.") from None
    if missing:
        packages = " ".join(_INSTALL[t] for t in missing)
        raise SageError(f"--report-to {' '.join(missing)} needs {packages}, which {python} cannot import. Install "
                        f"the tracking extra (`pip install -e '.[tracking]'` in the sage_magic checkout, or `pip "
                        f"install {packages}`), or leave out --report-to {' '.join(missing)}.")


def mlflow_env(settings: Settings, experiment: str, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's variables for a child: the tracking URI (SAGE_HOME's SQLite file unless MLFLOW_TRACKING_URI is
    set), the experiment (MLFLOW_EXPERIMENT_NAME wins) and the run's tags."""
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri,
           "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment}
    if tags:
        env["MLFLOW_TAGS"] = json.dumps(dict(tags))
    return env


def training_env(settings: Settings, wanted: Iterable[str], name: str, base: str) -> dict[str, str]:
    """The environment the training child's Trainer callbacks read, for the trackers wanted."""
    wanted = trackers(wanted)
    if "mlflow" not in wanted:
        return {}
    return mlflow_env(settings, TRAIN_EXPERIMENT, {"sage.finetune": name, "sage.base": base})


def log_eval(settings: Settings, result: Any, run_name: str | None = None) -> str:
    """Log an evaluation's summary, per-row results and the models' fingerprints as one MLflow run, from a child
    process; returns the line a face prints (the run's id and where it is). One SageError if it fails: faces call
    this after showing the results, which it never affects."""
    job = {"run_name": run_name or "eval " + ",".join(result.models), "result": result.to_json(),
           "records": result.records()}
    env = {**os.environ, **settings.extra_env, **mlflow_env(settings, EVAL_EXPERIMENT)}
    try:
        done = subprocess.run([settings.python, "-m", "sage_magic.tracking.mlflow_child"], input=json.dumps(job),
                              capture_output=True, text=True, env=env)
        failure = " ".join(done.stderr.strip().splitlines()[-2:]) if done.returncode != 0 else None
    except OSError as error:
        failure = f"{settings.python} could not start: {error.strerror or error}"
    if failure is None:
        try:
            run = json.loads(done.stdout)
            return f"Logged to MLflow: run {run['run_id']} in experiment {run['experiment']!r} at {run['uri']}"
        except (ValueError, KeyError, TypeError):
            failure = f"unreadable output: {done.stdout[:200]!r}"
    raise SageError(f"The results could not be logged to MLflow ({failure}); the results shown are not affected. "
                    "Check MLFLOW_TRACKING_URI (unset, runs go to $SAGE_HOME/mlflow.db) and that the tracking "
                    "extra is installed, then run again with --report-to mlflow, or leave it out.")
