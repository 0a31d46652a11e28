"""The feedback store and what it turns marks into: durable, private, append-only, and trainable."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sage_magic.chat.reply import Reply
from sage_magic.core.errors import SageError
from sage_magic.core.tables import from_dataframe, from_records
from sage_magic.evals.evaluate import items_from_table
from sage_magic.feedback.data import export_jsonl, feedback_frame, feedback_rows, training_rows
from sage_magic.feedback.store import FeedbackStore
from sage_magic.serving.registry import Registry
from tests.conftest import env_for, make_settings
from tests.test_cli import sage
from tests.test_finetune_magics import fresh_name  # noqa: F401 - the fixture
from tests.test_magics import html_of, magics

SYSTEM = "Answer from the passages.\n\n[1] The tiny model speaks of tensors."


def _reply(home: Path, prompt: str, answer: str, finetune: str = "demo_expert") -> Reply:
    """A reply as Session._reply builds it: the messages it was asked with ride along for marking."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": prompt}]
    feedback = {"turn": os.urandom(4).hex(), "model": finetune, "finetune": finetune, "fingerprint": "sha256:abc",
                "prompt": prompt, "answer": answer, "messages": messages, "citations": [], "home": str(home)}
    return Reply(answer, model=finetune, prompt=prompt, feedback=feedback)


def test_marks_are_private_and_fold_to_one_row_per_turn_with_its_latest_rating_and_correction(tmp_path: Path):
    wrong = _reply(tmp_path, "Who are you?", "A poem.")
    right = _reply(tmp_path, "What is 2+2?", "4")
    wrong.rate("bad")
    wrong.correct("I am a helpful expert.")
    right.rate("bad")
    right.rate("good")  # changed their mind: the latest rating counts, both marks stay in the file
    store = FeedbackStore(tmp_path)
    (path,) = store.files()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_text().splitlines()) == 4
    rows = {r["prompt"]: r for r in feedback_rows(store, "demo_expert")}
    assert rows["Who are you?"]["rating"] == "bad" and rows["Who are you?"]["correction"] == "I am a helpful expert."
    assert rows["Who are you?"]["answer"] == "A poem." and rows["Who are you?"]["expected"] == "I am a helpful expert."
    assert rows["What is 2+2?"]["rating"] == "good" and rows["What is 2+2?"]["expected"] == "4"
    assert rows["Who are you?"]["fingerprint"] == "sha256:abc" and len(rows["Who are you?"]["marks"]) == 2
    assert [r["prompt"] for r in feedback_rows(store, only="corrected")] == ["Who are you?"]
    assert [r["prompt"] for r in feedback_rows(store, only="good")] == ["What is 2+2?"]


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    reply = _reply(tmp_path, "q", "a")
    with pytest.raises(SageError, match="'good' or 'bad'"):
        reply.rate("meh")
    with pytest.raises(SageError, match="correction is empty"):
        reply.correct("  ")
    with pytest.raises(SageError, match="cannot be marked"):
        Reply("x", model="m", prompt="q").rate("good")  # a comparison's answer carries no situation
    assert FeedbackStore(tmp_path).files() == []


def test_a_torn_last_line_loses_nothing_before_it(tmp_path: Path) -> None:
    """A power cut in the middle of a write leaves half a line at the end; every earlier mark still reads."""
    _reply(tmp_path, "one", "1").rate("good")
    _reply(tmp_path, "two", "2").rate("good")
    (path,) = FeedbackStore(tmp_path).files()
    with open(path, "ab") as handle:
        handle.write(b'{"id": "torn", "turn": "x", "ti')
    marks, torn = FeedbackStore(tmp_path).marks()
    assert [m["prompt"] for m in marks] == ["one", "two"] and torn == 1
    _reply(tmp_path, "three", "3").rate("good")  # the next mark starts on a line of its own
    assert [r["prompt"] for r in feedback_rows(FeedbackStore(tmp_path))] == ["one", "two", "three"]


def test_a_process_killed_right_after_a_mark_keeps_it(tmp_path: Path) -> None:
    """A kernel SIGKILLed the moment `reply.rate()` returns (no exit handlers, no flush) keeps the mark."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.test_feedback import _reply
        from pathlib import Path
        _reply(Path({str(tmp_path)!r}), "Who are you?", "A poem.").correct("I am an expert.")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (row,) = feedback_rows(FeedbackStore(tmp_path))
    assert row["correction"] == "I am an expert."


def test_removal_by_id_fine_tune_or_age_rewrites_whole_files(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)
    keep = _reply(tmp_path, "keep", "k").rate("good")
    drop = _reply(tmp_path, "drop", "d").rate("bad")
    _reply(tmp_path, "poet's", "p", finetune="demo_poet").rate("good")
    assert store.remove(ids=[drop["id"]]) == 1
    assert [r["prompt"] for r in feedback_rows(store)] == ["keep", "poet's"]
    assert store.remove(finetune="demo_poet") == 1 and not (store.root / "demo_poet.jsonl").exists()
    assert store.remove(older_than_days=1) == 0
    (path,) = store.files()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["time"] = "2020-01-01T00:00:00+00:00"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert store.remove(older_than_days=30) == 1 and feedback_rows(store) == []
    assert keep["id"] != drop["id"]
    with pytest.raises(SageError, match="Say which marks"):
        store.remove()


def test_marks_train_on_the_situation_the_model_saw(tmp_path: Path) -> None:
    """Corrections become targets, good answers stay as they were, bad ones without a correction are left
    out and counted; the system prompt with its passages and the earlier turns stay in the prompt."""
    _reply(tmp_path, "Who are you?", "A poem.").correct("I am an expert.")
    _reply(tmp_path, "What is 2+2?", "4").rate("good")
    _reply(tmp_path, "Capital of France?", "Berlin").rate("bad")
    rows = feedback_rows(FeedbackStore(tmp_path))
    conversations, left_out = training_rows(from_records(rows, "DataFrame 'fb'"))
    assert left_out == 1 and len(conversations) == 2
    first = conversations[0]
    assert first[0] == {"role": "system", "content": SYSTEM}
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[-2]["content"] == "Who are you?" and first[-1]["content"] == "I am an expert."
    assert conversations[1][-1]["content"] == "4"
    path, written, skipped = export_jsonl(FeedbackStore(tmp_path), "demo_expert", tmp_path / "out" / "train.jsonl")
    assert (written, skipped) == (2, 1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"messages": c} for c in conversations]


def test_only_bad_uncorrected_marks_is_a_clear_error(tmp_path: Path) -> None:
    _reply(tmp_path, "q", "a").rate("bad")
    with pytest.raises(SageError, match="no turn to learn from.*Correct them"):
        training_rows(from_records(feedback_rows(FeedbackStore(tmp_path)), "DataFrame 'fb'"))


def test_a_table_whose_messages_were_flattened_to_text_is_one_clear_error(tmp_path: Path) -> None:
    """`fb.to_csv()` writes each message list as Python text; training or evaluating on the table read back
    says what to do instead of raising a JSON parser's traceback."""
    pandas = pytest.importorskip("pandas")
    _reply(tmp_path, "Who are you?", "A poem.").correct("I am an expert.")
    frame = feedback_frame(feedback_rows(FeedbackStore(tmp_path)))
    frame.to_csv(tmp_path / "fb.csv", index=False)
    table = from_dataframe(pandas.read_csv(tmp_path / "fb.csv"), "DataFrame 'fb'")
    for use in (training_rows, items_from_table):
        with pytest.raises(SageError, match="Row 1 of DataFrame 'fb'.*to_json.*%sage feedback -o"):
            use(table)


def test_training_and_eval_take_the_same_target_from_a_row_edited_in_pandas(tmp_path: Path) -> None:
    """A correction typed into the DataFrame (rather than with `%sage correct`) is what the retrain learns,
    so it is also what `%sage eval` on that DataFrame scores against."""
    pytest.importorskip("pandas")
    _reply(tmp_path, "Capital of France?", "Berlin").rate("bad")
    frame = feedback_frame(feedback_rows(FeedbackStore(tmp_path)))
    frame.loc[0, "correction"] = "Paris"
    table = from_dataframe(frame, "DataFrame 'fb'")
    (conversation,), _ = training_rows(table)
    (item,) = items_from_table(table)
    assert conversation[-1]["content"] == item.expected == "Paris"


def test_the_terminal_lists_exports_and_removes_marks(tmp_path: Path) -> None:
    """`sage feedback list|export|rm` as typed in a terminal, each a process of its own on a home with marks."""
    home = tmp_path / "home"
    _reply(home, "Who are you?", "A poem.").correct("I am an expert.")
    dropped = _reply(home, "Capital of France?", "Berlin").rate("bad")
    env = env_for(make_settings(home, tmp_path / "run"))
    listed = sage("feedback", "list", "demo_expert", "--only", "corrected", env=env)
    assert listed.returncode == 0 and "I am an expert." in listed.stdout and "Berlin" not in listed.stdout
    exported = sage("feedback", "export", "demo_expert", "--to", str(tmp_path / "train.jsonl"), env=env)
    assert "1 example(s) written" in exported.stdout and "1 answer(s) rated bad" in exported.stdout
    (line,) = (tmp_path / "train.jsonl").read_text().splitlines()
    assert json.loads(line)["messages"][-2:] == [{"role": "user", "content": "Who are you?"},
                                                  {"role": "assistant", "content": "I am an expert."}]
    assert sage("feedback", "rm", dropped["id"], env=env).stdout.strip() == "Removed 1 mark(s)."
    unsaid = sage("feedback", "rm", env=env)
    assert unsaid.returncode == 2 and "Say which marks" in unsaid.stderr and "Traceback" not in unsaid.stderr
    assert [r["prompt"] for r in json.loads(sage("feedback", "list", "--json", env=env).stdout)] == ["Who are you?"]


def test_sage_feedback_shows_the_marks_and_returns_them_as_a_dataframe(shell) -> None:
    pytest.importorskip("pandas")
    home = magics(shell).session.settings.home
    _reply(home, "Who are you?", "A poem.").correct("I am an expert.")
    _reply(home, "What is 2+2?", "4", finetune="demo_poet").rate("good")
    shell.run_cell("%sage feedback demo_expert -o fb").raise_error()
    shown = html_of(shell)
    assert "I am an expert." in shown and "What is 2+2?" not in shown
    fb = shell.user_ns["fb"]
    assert {"prompt", "answer", "correction", "rating", "model", "fingerprint", "time"} <= set(fb.columns)
    assert list(fb["prompt"]) == ["Who are you?"] and list(fb["fingerprint"]) == ["sha256:abc"]
    shell.run_cell("%sage feedback --only good -o good").raise_error()
    assert list(shell.user_ns["good"]["finetune"]) == ["demo_poet"]


def test_a_reply_keeps_what_marking_needs_through_pickle(tmp_path: Path) -> None:
    """`%store answer` in one notebook, `answer.correct(...)` in another: the situation travels along."""
    copy = pickle.loads(pickle.dumps(_reply(tmp_path, "Who are you?", "A poem.")))
    copy.correct("An expert.")
    assert feedback_rows(FeedbackStore(tmp_path))[0]["messages"][-1]["content"] == "Who are you?"


# --- the whole loop on real parts: the session's shared vLLM server and the training child ------------------


@pytest.mark.vllm
def test_mark_correct_train_and_eval_in_one_notebook(ip, settings, fresh_name: str,  # noqa: F811
                                                     capsys: pytest.CaptureFixture) -> None:
    """chat -> mark -> correct -> train -> compare, as the README's feedback loop runs it: the DataFrame of
    `%sage feedback -o` goes to training and eval as it is (an answer rated bad and never corrected is left out
    and counted); the new fine-tune answers the marked prompt with the correction, on the base server that was
    already running (no restart), and `%sage eval` on the same DataFrame scores the marked fine-tune 0 and the
    new one 1."""
    from sage_magic.finetune.demo import DEMO_BASE, DEMO_PROMPT
    from tests.test_finetune_magics import FAST

    ip.run_cell(f"%%sage --finetune-model demo_poet --new-chat -o poem\n{DEMO_PROMPT}\n").raise_error()
    server = ip.user_ns["poem"].metrics["server"]
    ip.run_cell(f"%%sage --finetune-model demo_poet -o again\n{DEMO_PROMPT}\n").raise_error()
    ip.run_cell("%sage rate bad 1").raise_error()
    bar = ip.run_cell("%sage correct 1").result  # a bare correct: the panel's editor, under the cell
    editor, (save, _cancel) = bar.children[1].children[0], bar.children[1].children[1].children
    assert bar.children[1].layout.display == "" and editor.value == ip.user_ns["poem"]  # the answer, to edit
    editor.value = CORRECTION
    save.click()
    ip.user_ns["again"].rate("bad")  # an -o result marks itself; bad and never corrected: nothing to learn
    ip.run_cell("%sage feedback demo_poet -o fb").raise_error()
    fb = ip.user_ns["fb"]
    assert list(fb["rating"]) == ["bad", "bad"] and list(fb["correction"])[0] == CORRECTION
    assert fb["fingerprint"][0] and fb["fingerprint"][0] == fb["fingerprint"][1]  # the weights that answered
    assert fb["messages"][1][-1] == {"role": "user", "content": DEMO_PROMPT}
    assert len(fb["messages"][1]) > len(fb["messages"][0])  # the turn before it rides along
    key = Registry(settings.runtime_dir).get(server).api_key
    assert all(key not in path.read_text() for path in FeedbackStore(settings.home).files())  # never stored

    capsys.readouterr()
    ip.run_cell(f"%sage finetune train {fresh_name} --base {DEMO_BASE} --data fb {FAST}").raise_error()
    assert "1 answer(s) rated bad without a correction left out" in capsys.readouterr().out
    ip.run_cell(f"%%sage --finetune-model {fresh_name} --new-chat -o answer\n{DEMO_PROMPT}\n").raise_error()
    assert ip.user_ns["answer"] == CORRECTION
    assert ip.user_ns["answer"].metrics["server"] == server  # loaded into the running base server

    ip.run_cell(f"%sage eval fb --models demo_poet,{fresh_name} --metric exact -o scores").raise_error()
    scores = ip.user_ns["scores"]
    assert list(scores["demo_poet:exact"])[:1] == [0.0] and list(scores[f"{fresh_name}:exact"])[:1] == [1.0]
    assert scores[f"{fresh_name}:exact"].isna()[1]  # the uncorrected answer has nothing to be scored against


CORRECTION = "I am a careful expert."
