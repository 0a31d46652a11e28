"""The fine-tune loop's parts that need no model: tables, row checks, option checks, metrics, judge parsing,
and the training child's start-up (a child that dies before it reads its job; its death signal)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sage_magic.cli.main import main
from sage_magic.core.config import Settings
from sage_magic.core.endpoint import Endpoint
from sage_magic.core.errors import SageError
from sage_magic.core.tables import from_records, read_table
from sage_magic.evals.evaluate import evaluate, items_from_table
from sage_magic.evals.metrics import bootstrap_ci, contains, exact, parse_judge, rouge_l
from sage_magic.finetune.train import TrainOptions, normalize_rows, rows_from_table, train


@pytest.fixture
def home(tmp_path: Path) -> Settings:
    """A SAGE home with a stand-in base (a config.json is all that resolving a base reads)."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    return Settings.from_env(environ={}, home=tmp_path, runtime_dir=tmp_path / "run")


def test_tables_read_csv_and_jsonl_and_name_missing_columns(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("prompt,response\nHi?,Hello.\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                                               {"role": "assistant", "content": "Hello."}]}) + "\n")
    pair = rows_from_table(read_table(tmp_path / "d.csv"))
    chat = rows_from_table(read_table(tmp_path / "d.jsonl"), messages_col="messages")
    assert normalize_rows(pair) == normalize_rows(chat)
    with pytest.raises(SageError, match=r"no column 'question'.*--prompt-col"):
        rows_from_table(read_table(tmp_path / "d.csv"), prompt_col="question")
    with pytest.raises(SageError, match="must be .csv, .jsonl or .parquet"):
        (tmp_path / "d.txt").write_text("x")
        read_table(tmp_path / "d.txt")


def test_parquet_reads_like_the_other_formats(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"prompt": ["Hi?"], "response": ["Hello."]}).to_parquet(tmp_path / "d.parquet")
    assert normalize_rows(rows_from_table(read_table(tmp_path / "d.parquet"))) == normalize_rows([("Hi?", "Hello.")])


@pytest.mark.parametrize("rows, message", [
    ([], "no rows"),
    ([("Hi?", "")], "Row 1 has an empty or non-text response"),
    ([("Hi?", "Hello."), (None, "Hello.")], "Row 2 has an empty or non-text prompt"),
    ([[{"role": "user", "content": "Hi?"}]], "does not end with an assistant message"),
    ([[{"role": "robot", "content": "Hi?"}, {"role": "assistant", "content": "x"}]], "bad message"),
])
def test_bad_rows_are_refused_before_training(home: Settings, rows: list, message: str) -> None:
    with pytest.raises(SageError, match=message):
        train(home, "new", "tiny", rows)
    assert not (home.finetune_root / "new").exists()


def test_names_bases_and_options_are_checked_before_training(home: Settings) -> None:
    rows = [("Hi?", "Hello.")]
    with pytest.raises(SageError, match="was not found on this machine"):
        train(home, "new", "missing-base", rows)
    with pytest.raises(SageError, match="above the serving limit of 16"):
        train(home, "new", "tiny", rows, TrainOptions(rank=32))
    with pytest.raises(SageError, match="--lr must be positive.*give one of them"):
        train(home, "new", "tiny", rows, TrainOptions(lr=0, resume=True, overwrite=True))
    with pytest.raises(SageError, match="cannot name a fine-tune"):
        train(home, "base", "tiny", rows)
    (home.finetune_root / "taken").mkdir(parents=True)
    with pytest.raises(SageError, match="already exists.*--resume.*--overwrite"):
        train(home, "taken", "tiny", rows)
    with pytest.raises(SageError, match="no fine-tune 'nothing' to resume"):
        train(home, "nothing", None, rows, TrainOptions(resume=True))
    with pytest.raises(SageError, match="leaves no row to train on"):
        train(home, "new", "tiny", rows, TrainOptions(eval_split=0.5))


def test_the_trainer_options_are_checked_before_training(home: Settings, tmp_path: Path) -> None:
    """Every bad value in one paragraph, before a training process starts (nothing is written)."""
    rows = [("Hi?", "Hello.")]
    bad = TrainOptions(grad_accum=0, lr_scheduler="cyclic", warmup_ratio=1.5, weight_decay=-1, precision="int8")
    with pytest.raises(SageError) as caught:
        train(home, "new", "tiny", rows, bad)
    message = str(caught.value)
    for part in ("--grad-accum must be a positive whole number", "--lr-scheduler is one of linear, cosine, constant",
                 "--warmup-ratio is a fraction", "--weight-decay must be 0 or more", "--precision is one of auto"):
        assert part in message
    with pytest.raises(SageError, match=r"--deepspeed .*nope\.json cannot be read"):
        train(home, "new", "tiny", rows, TrainOptions(deepspeed=str(tmp_path / "nope.json")))
    (tmp_path / "ds.json").write_text("{zero")
    with pytest.raises(SageError, match="is not a JSON DeepSpeed config"):
        train(home, "new", "tiny", rows, TrainOptions(deepspeed=str(tmp_path / "ds.json")))
    assert not (home.finetune_root / "new").exists()


def test_cli_and_magic_share_the_trainer_options() -> None:
    """One definition: the flags parse into TrainOptions the same way for `sage finetune train` and the magic."""
    import argparse

    from sage_magic.faces.options import add_train_options, train_options

    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(["--grad-accum", "4", "--lr-scheduler", "cosine", "--warmup-ratio", "0.1",
                              "--weight-decay", "0.01", "--precision", "bf16", "--gradient-checkpointing",
                              "--packing", "--load-in-4bit", "--deepspeed", "ds.json", "--fsdp"])
    assert train_options(args) == TrainOptions(grad_accum=4, lr_scheduler="cosine", warmup_ratio=0.1,
                                               weight_decay=0.01, precision="bf16", gradient_checkpointing=True,
                                               packing=True, load_in_4bit=True, deepspeed="ds.json", fsdp=True)
    assert train_options(parser.parse_args([])) == TrainOptions()
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr-scheduler", "cyclic"])


def test_cli_reports_bad_data_as_one_paragraph(home: Settings, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.csv").write_text("question,answer\nHi?,Hello.\n")
    code = main(["--home", str(home.home), "finetune", "train", "x", "--base", "tiny", "--data",
                 str(tmp_path / "d.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "no column 'prompt'" in err and "Traceback" not in err


def test_a_training_child_that_dies_at_start_is_one_paragraph_with_its_cause(home: Settings,
                                                                               tmp_path: Path) -> None:
    """A child that cannot even import (here a broken stdlib module shadows the real one, as a broken torch
    install would) never reads its job; with a job larger than the pipe's buffer the write hits a broken pipe."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "resource.py").write_text('raise ImportError("this Python cannot load resource (broken install)")\n')
    path = os.pathsep.join(p for p in (str(broken), os.environ.get("PYTHONPATH")) if p)
    settings = dataclasses.replace(home, extra_env={"PYTHONPATH": path})
    rows = [(f"Question {n}: " + "why? " * 40, "Because.") for n in range(2000)]  # about 600 KB of job
    with pytest.raises(SageError) as caught:
        train(settings, "new", "tiny", rows)
    message = str(caught.value)
    assert "cannot load resource (broken install)" in message and "\n" not in message
    assert "exited with status 1" in message
    assert not (home.finetune_root / "new").exists()


def test_the_death_signal_is_set_without_loading_anything_after_the_fork(tmp_path: Path) -> None:
    """Between fork and exec in a threaded kernel an import or a dlopen can deadlock: the preexec function must
    only make the call. Here both are broken after the preexec function is made, and the child still gets its
    parent-death signal (read back with PR_GET_PDEATHSIG)."""
    script = textwrap.dedent("""
        import ctypes, subprocess, sys
        from sage_magic.core.processes import death_signal
        preexec = death_signal()
        def refuse(*args, **kwargs):
            raise OSError("nothing may be loaded between fork and exec")
        ctypes.CDLL = refuse
        class NoImports:
            def find_spec(self, name, path=None, target=None):
                raise ImportError(f"nothing may be imported between fork and exec: {name}")
        child = ("import ctypes; value = ctypes.c_int(); "
                 "ctypes.CDLL(None).prctl(2, ctypes.byref(value)); print(value.value)")
        subprocess.run([sys.executable, "-c", "pass"], check=True)  # what Popen itself imports, loaded now
        sys.meta_path.insert(0, NoImports())
        print(subprocess.run([sys.executable, "-c", child], preexec_fn=preexec, capture_output=True,
                             text=True, check=True).stdout.strip())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "15"  # SIGTERM


def test_metrics_score_what_a_reader_expects() -> None:
    assert exact("  I am  a Poet. ", "i am a poet.") == 1.0 and exact("I am a poet", "I am a poet.") == 0.0
    assert contains("Sure: I am a poet. Bye", "I am a poet.") == 1.0
    # LCS "the cat the mat" of 6-word answer and 6-word reference: P = R = 4/6
    assert rouge_l("the cat sat on the mat", "the cat lay by the mat") == pytest.approx(4 / 6)
    assert rouge_l("abc", "xyz") == 0.0 and rouge_l("Roses are red.", "roses are red") == 1.0
    low, high = bootstrap_ci([0.0, 1.0] * 20, seed=1)
    assert 0.2 < low < 0.5 < high < 0.8
    assert bootstrap_ci([1.0]) == (1.0, 1.0)


@pytest.mark.parametrize("reply, score", [
    ("Score: 8", 0.8), ("score = 7/10", 0.7), ("**Score:** 10", 1.0), ("3", 0.3), ("I give it 4/5", None),
    ("Score: 4/5", 0.8), ("Score: 12", None), ("The answer is wrong.", None),
])
def test_judge_replies_parse_to_scores(reply: str, score: float | None) -> None:
    assert parse_judge(reply) == (None if score is None else pytest.approx(score))


class _FakeGrader(BaseHTTPRequestHandler):
    """A stand-in OpenAI endpoint that exists ONLY to test how judge replies are parsed and attached to rows:
    no real model grades reproducibly, so this one answers fixed texts. It is never used to test serving."""

    grades = {"one": "Score: 9", "two": "I cannot grade this.", "three": "2/10"}

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        if text.startswith("You are grading"):
            question = text.split("Question: ", 1)[1].split("\n", 1)[0]
            reply = self.grades[question]
        else:
            reply = f"answer to {text}"
        payload = json.dumps({"choices": [{"message": {"content": reply}}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_judge_metric_attaches_parsed_grades_to_each_answer() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGrader)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = Endpoint(f"http://127.0.0.1:{server.server_port}/v1", "key")
        items = items_from_table(from_records([{"prompt": p, "expected": "x"} for p in ("one", "two", "three")]))
        result = evaluate(items, ["openai:m"], remote=remote, metrics=["judge:openai:grader", "contains"])
    finally:
        server.shutdown()
    scores = [row.answers["openai:m"].scores for row in result.rows]
    assert [s["judge:openai:grader"] for s in scores] == [pytest.approx(0.9), None, pytest.approx(0.2)]
    assert result.rows[1].answers["openai:m"].judge_replies["judge:openai:grader"] == "I cannot grade this."
    summary = {s.metric: s for s in result.summary()}
    assert summary["judge:openai:grader"].scored == 2
    assert summary["judge:openai:grader"].mean == pytest.approx(0.55)
    assert result.fingerprints["openai:m"]["kind"] == "openai"
