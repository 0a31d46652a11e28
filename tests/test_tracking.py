"""Run tracking: `--report-to` is one option for the CLI and the magics, a missing tracker is one paragraph
before anything starts, and `sage eval`/`%sage eval --report-to mlflow` log a real MLflow run (read back here
with MLflow's own API, in a child process, so that this process shows mlflow never entered the kernel).

The eval tests run on the session's one real vLLM server (the `expert` fixture).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.core.errors import SageError
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.tracking.report import check_installed
from tests.conftest import env_for, make_settings

pd = pytest.importorskip("pandas")
EXPERT = DEMO_ANSWERS["demo_expert"]

READ_RUN = """
import json, sys
from mlflow.tracking import MlflowClient
uri, experiment = sys.argv[1], sys.argv[2]
client = MlflowClient(uri)
found = client.get_experiment_by_name(experiment)
runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
run = runs[0]
tables = {name: client.load_table(found.experiment_id, name, run_ids=[run.info.run_id])
          .to_dict("list") for name in ("summary.json", "rows.json")}
print(json.dumps({"runs": len(runs), "name": run.info.run_name, "metrics": run.data.metrics,
                  "params": run.data.params, "tags": run.data.tags, "tables": tables,
                  "artifacts": found.artifact_location}, default=str))
"""


def read_run(uri: str, experiment: str) -> dict:
    """The newest run of an experiment as MLflow reads it back (metrics, params, tags, tables)."""
    out = subprocess.run([sys.executable, "-c", READ_RUN, uri, experiment], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _sage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_magic.cli.main", *args], env=env, capture_output=True,
                          text=True)


def _python_without_site_packages(tmp_path: Path) -> str:
    """An interpreter that cannot import any tracker: this one with its site-packages hidden."""
    script = tmp_path / "bare-python"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    script.chmod(0o755)
    return str(script)


# --- one option, checked before anything starts --------------------------------------------------------------


def test_report_to_accepts_the_trackers_and_refuses_others_in_both_faces(tmp_path: Path) -> None:
    env = env_for(make_settings(tmp_path / "home", tmp_path / "run"))
    data = tmp_path / "rows.csv"
    data.write_text("prompt,response\nhi,there\n")
    wrong = _sage("finetune", "train", "x", "--base", DEMO_BASE, "--data", str(data), "--report-to", "comet", env=env)
    assert wrong.returncode == 2 and "--report-to" in wrong.stderr and "tensorboard" in wrong.stderr
    eval_tb = _sage("eval", str(data), "--models", "demo_expert", "--report-to", "tensorboard", env=env)
    assert eval_tb.returncode == 2 and "invalid choice: 'tensorboard'" in eval_tb.stderr

    from sage_magic.faces.options import train_options
    from sage_magic.notebook.finetune_cells import train_parser

    args = train_parser().parse_args(["n", "--base", "b", "--data", "rows", "--report-to", "tensorboard",
                                      "--report-to", "mlflow", "--report-to", "mlflow"])
    assert train_options(args).report_to == ("tensorboard", "mlflow", "mlflow")


def test_a_tracker_the_training_python_cannot_import_is_one_paragraph_before_anything_starts(
        shell: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bare = _python_without_site_packages(tmp_path)
    with pytest.raises(SageError) as caught:
        check_installed(bare, ["none", "tensorboard", "mlflow"])
    message = str(caught.value)
    assert "--report-to tensorboard mlflow" in message and "[tracking]" in message and "\n" not in message
    check_installed(bare, ["none"])  # nothing to import: no error
    check_installed(sys.executable, ["tensorboard", "mlflow"])  # this venv has the tracking extra

    # through the magic: refused before the (missing) base is even looked at
    shell.run_cell("import pandas as pd; rows = pd.DataFrame({'prompt': ['hi'], 'response': ['there']})")
    monkeypatch.setenv("SAGE_PYTHON", bare)
    result = shell.run_cell("%sage finetune train n --base no-such-base --data rows --report-to mlflow")
    assert isinstance(result.error_in_exec, SageError) and "needs mlflow-skinny" in str(result.error_in_exec)


# --- training runs logged to TensorBoard and MLflow, read back --------------------------------------------


READ_LOSS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
found = client.get_experiment_by_name(sys.argv[2])
(run,) = client.search_runs([found.experiment_id])
print(json.dumps({"name": run.info.run_name, "tags": run.data.tags, "params": run.data.params,
                  "loss": [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, "loss")]}))
"""


@pytest.mark.vllm  # no server: marked with the other training tests, as slow
def test_training_report_to_tensorboard_and_mlflow_logs_every_loss(demo_home: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sage_magic.finetune.train import TrainOptions, train

    home = tmp_path / "home"
    shutil.copytree(demo_home / "models", home / "models")
    settings = make_settings(home, tmp_path / "run")
    options = TrainOptions(max_steps=6, lr=2e-3, batch_size=1, save_every=3, report_to=("tensorboard", "mlflow"))
    result = train(settings, "tracked", DEMO_BASE, [(DEMO_PROMPT, EXPERT)], options)
    steps, losses = [s for s, _ in result.losses], [loss for _, loss in result.losses]
    assert steps == [1, 2, 3, 4, 5, 6]

    # TensorBoard: in the fine-tune's runs/ folder, every step's loss, across the rename at the first checkpoint
    (logdir,) = (home / "finetune_output" / "tracked" / "runs").iterdir()
    events = EventAccumulator(str(logdir))
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [s.step for s in logged] == steps and [s.value for s in logged] == pytest.approx(losses)

    # MLflow: SAGE_HOME's database, a run named after the fine-tune, the same losses
    out = subprocess.run([sys.executable, "-c", READ_LOSS, settings.tracking_uri, "sage-finetune"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout)
    assert run["name"] == "tracked" and run["tags"]["sage.finetune"] == "tracked"
    assert run["tags"]["sage.base"] == DEMO_BASE and run["params"]["max_steps"] == "6"
    assert [s for s, _ in run["loss"]] == steps and [v for _, v in run["loss"]] == pytest.approx(losses)
    assert not list(Path.cwd().glob("mlruns")) and (home / "mlflow.db").is_file()


# --- eval runs logged to MLflow, read back -------------------------------------------------------------------


@pytest.mark.vllm
def test_sage_eval_report_to_mlflow_logs_summary_rows_and_fingerprints(settings, expert, tmp_path: Path) -> None:
    data = tmp_path / "rows.csv"
    with data.open("w", newline="") as handle:
        csv.writer(handle).writerows([("prompt", "expected"), (DEMO_PROMPT, EXPERT),
                                      (DEMO_PROMPT, DEMO_ANSWERS["demo_poet"])])
    env = env_for(settings)  # no MLFLOW_TRACKING_URI: the default, a SQLite file in SAGE_HOME
    env.pop("MLFLOW_TRACKING_URI", None)
    out = _sage("eval", str(data), "--models", "demo_expert,base", "--report-to", "mlflow",
                "--save", str(tmp_path / "run.json"), "--json", env=env)
    assert out.returncode == 0, out.stderr
    uri = f"sqlite:///{settings.home / 'mlflow.db'}"
    assert "Logged to MLflow: run " in out.stderr and uri in out.stderr
    saved = json.loads((tmp_path / "run.json").read_text())

    run = read_run(uri, "sage-eval")
    assert run["name"] == "eval demo_expert,base"
    assert run["params"]["models"] == "demo_expert,base" and run["params"]["metrics"] == "exact"
    assert run["params"]["prompts"] == "2"
    assert run["metrics"]["demo_expert.exact.mean"] == 0.5 and run["metrics"]["demo_expert.exact.scored"] == 2
    assert run["metrics"]["demo_expert.p50_latency_s"] > 0 and "base.exact.mean" in run["metrics"]
    for model, fingerprint in saved["fingerprints"].items():
        for field, value in fingerprint.items():
            assert run["tags"][f"fingerprint.{model}.{field}"] == str(value)
    assert saved["fingerprints"]["demo_expert"]["adapter"] and saved["fingerprints"]["base"]["base"]
    rows = run["tables"]["rows.json"]
    assert rows["demo_expert"] == [EXPERT, EXPERT] and rows["demo_expert:exact"] == [1.0, 0.0]
    summary = run["tables"]["summary.json"]
    assert summary["model"] == ["demo_expert", "base"] and summary["mean"][0] == 0.5
    assert run["artifacts"] == (settings.home / "mlruns").as_uri()  # beside the database, not in the cwd


@pytest.mark.vllm
def test_eval_cell_report_to_mlflow_logs_from_a_child_process(ip: InteractiveShell, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-evals")
    ip.user_ns["cases"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "expected": [EXPERT]})
    ip.run_cell("%sage eval cases --models demo_expert -o scores --report-to mlflow").raise_error()
    assert "mlflow" not in sys.modules  # logged by a child: the kernel never imports mlflow
    run = read_run(uri, "my-evals")
    assert run["metrics"]["demo_expert.exact.mean"] == 1.0
    assert run["tables"]["rows.json"]["demo_expert"] == list(ip.user_ns["scores"]["demo_expert"])
