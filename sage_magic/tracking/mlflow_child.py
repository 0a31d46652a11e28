"""Child process that logs an evaluation to MLflow, and the experiment set-up training shares with it.

Reads ``{"run_name": ..., "result": EvalResult.to_json(), "records": EvalResult.records()}`` on stdin and writes
``{"run_id", "experiment", "uri"}`` on stdout. A child because importing mlflow costs seconds and hundreds of
modules that a notebook kernel should never carry; MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME come from the
parent (``sage_magic.tracking.report.mlflow_env``).

The run holds what a reader compares runs by: params (models, metrics, sampling), one tag per model fingerprint
field (``fingerprint.MODEL.FIELD``, so a run is tied to the exact adapters and base it measured), metrics per
model and metric (``MODEL.METRIC.mean|low|high|scored|failed``, ``MODEL.p50_latency_s``, ``MODEL.tokens_per_s``)
and two tables, ``summary.json`` and ``rows.json`` (one row per prompt, as ``-o``/``to_dataframe`` has them).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def artifact_root(uri: str) -> str | None:
    """Where a SQLite store keeps artifacts: ``mlruns/`` beside the database file. MLflow's own default is
    ``./mlruns`` in whatever folder the process runs in, which would scatter runs over notebooks' folders.
    Other stores (a tracking server) decide for themselves: None."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, created (with its artifacts under :func:`artifact_root`) if it
    is new. Training calls this before its Trainer starts, so that the Trainer's MLflow callback finds it."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def shown_uri(uri: str) -> str:
    """The URI without a user name or password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def key(*parts: str) -> str:
    """An MLflow metric or tag name from model and metric names (it allows letters, digits and ``_-. /:``)."""
    return ".".join(re.sub(r"[^A-Za-z0-9_\-. /:]", "_", p) for p in parts)


def log_eval(job: dict[str, Any]) -> dict[str, str]:
    import mlflow

    uri, experiment = os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"]
    experiment_id = ensure_experiment(uri, experiment)
    result = job["result"]
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=job["run_name"]) as run:
        settings = {k: v for k, v in result["settings"].items() if v is not None}
        mlflow.log_params({"models": ",".join(result["models"]), "metrics": ",".join(result["metrics"]),
                           "prompts": len(result["rows"]), **settings})
        tags = {"sage.kind": "eval", "sage.cancelled": str(result["cancelled"]).lower()}
        for model, fingerprint in result["fingerprints"].items():
            tags.update({key("fingerprint", model, field): str(value) for field, value in fingerprint.items()})
        mlflow.set_tags(tags)
        metrics: dict[str, float] = {}
        for line in result["summary"]:
            model, metric = line["model"], line["metric"]
            for name in ("mean", "low", "high", "scored", "failed"):
                if metric != "-" and line[name] is not None:
                    metrics[key(model, metric, name)] = float(line[name])
            for name, label in (("p50_latency", "p50_latency_s"), ("tokens_per_s", "tokens_per_s")):
                if line[name] is not None:
                    metrics[key(model, label)] = float(line[name])
        mlflow.log_metrics(metrics)
        mlflow.log_table(_columns(result["summary"]), "summary.json")
        mlflow.log_table(_columns(job["records"]), "rows.json")
    return {"run_id": run.info.run_id, "experiment": experiment, "uri": shown_uri(uri)}


def _columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Records as the column dict ``mlflow.log_table`` takes (every key of any record is a column)."""
    names = list(dict.fromkeys(k for r in records for k in r))
    return {name: [r.get(name) for r in records] for name in names}


def main() -> int:
    job = json.load(sys.stdin)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # mlflow's chatter must not corrupt the answer
    out.write(json.dumps(log_eval(job)))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
