"""Marks as data: the rows ``%sage feedback`` shows, and what training, evaluation and other trainers read.

A marked turn becomes a training example by one rule, the same everywhere (``%sage finetune train --data``,
``sage feedback export``): its target is the correction when there is one, else the model's own answer when
it was rated good; an answer rated bad and never corrected teaches nothing and is left out (and counted).
The prompt side is the messages exactly as the model got them (system prompt with the retrieved passages,
the conversation before the turn, the question), so the fine-tune learns the situation it failed in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import SageError
from ..core.tables import Table, is_missing, require_pandas
from .store import RATINGS, FeedbackStore, fold, paused_gc

#: The columns of a feedback table, in the order shown (``messages`` and ``citations`` ride along for
#: training and evaluation; ``expected`` shows what a row teaches and an eval scores against, as of reading:
#: both work it out from the row again with :func:`target`, so an edited correction counts).
COLUMNS = ("turn", "time", "finetune", "model", "fingerprint", "rating", "prompt", "answer", "correction",
           "expected", "notebook", "messages", "citations", "marks")
#: What marks a table as feedback (a DataFrame from ``%sage feedback``, or its rows as dicts).
SIGNATURE = frozenset({"turn", "messages", "answer", "correction", "rating"})
FILTERS = ("good", "bad", "corrected")


def target(row: Mapping[str, Any]) -> str | None:
    """The answer a turn teaches: its correction, else its own answer if rated good; None: nothing."""
    correction = row.get("correction")
    if not is_missing(correction):
        return str(correction)
    if row.get("rating") == "good" and not is_missing(row.get("answer")):
        return str(row["answer"])
    return None


def feedback_rows(store: FeedbackStore, finetune: str | None = None, only: str | None = None) -> list[dict]:
    """One row per marked turn (see :data:`COLUMNS`), of one fine-tune when given; ``only`` keeps the turns
    rated good, rated bad, or corrected."""
    if only is not None and only not in FILTERS:
        raise SageError(f"--only takes {', '.join(FILTERS)}, not {only!r}.")
    with paused_gc():
        return _rows(fold(store.marks(finetune)[0]), only)


def _rows(turns: list[dict], only: str | None) -> list[dict]:
    rows = []
    for turn in turns:
        row = {key: turn.get(key) for key in COLUMNS if key not in ("expected", "marks")}
        row["expected"] = target(turn)
        row["marks"] = turn["ids"]
        if only == "corrected" and is_missing(row["correction"]):
            continue
        if only in RATINGS and row["rating"] != only:
            continue
        rows.append(row)
    return rows


def feedback_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The rows as a pandas DataFrame with every column, also when there are none yet."""
    return require_pandas().DataFrame(list(rows), columns=list(COLUMNS))


def is_feedback(table: Table) -> bool:
    return SIGNATURE <= set(table.columns)


def training_rows(table: Table) -> tuple[list[list[dict[str, str]]], int]:
    """Conversations to train on from a feedback table, and how many marked turns were left out (rated bad,
    never corrected)."""
    rows, left_out = [], 0
    for number, record in enumerate(table.records, start=1):
        answer = target(record)
        if answer is None:
            left_out += 1
            continue
        rows.append([*_prompt_messages(record, number, table.source), {"role": "assistant", "content": answer}])
    if not rows:
        raise SageError(f"{table.source} has no turn to learn from: {left_out} answer(s) rated bad and none "
                        "corrected. Correct them (`%sage correct N`, the panel's Correct) or rate good ones.")
    return rows, left_out


def _prompt_messages(record: Mapping[str, Any], number: int, source: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)  # a table saved with to_json, or `sage feedback list --json`
        except ValueError:
            messages = None  # to_csv writes each list as Python text, which no longer reads as messages
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if (isinstance(messages, str) or not isinstance(messages, Sequence) or not messages
            or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages)):
        raise SageError(f"Row {number} of {source} has no readable messages, so the situation its answer was "
                        "given in is unknown. Keep the `messages` column of the `%sage feedback` table as it came "
                        "(a CSV file turns its message lists into text: save the table with to_json or "
                        "to_pickle instead), or read the marks again with `%sage feedback -o VAR`.")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def context_and_prompt(record: Mapping[str, Any], number: int, source: str) -> tuple[list[dict[str, str]], str]:
    """An eval item's situation: the messages before the question (system prompt with passages, earlier
    turns) and the question itself, as the marked answer got them."""
    messages = _prompt_messages(record, number, source)
    return messages[:-1], messages[-1]["content"]


def export_jsonl(store: FeedbackStore, finetune: str | None, path: str | Path) -> tuple[Path, int, int]:
    """Write the chat-format training file other tools read (one ``{"messages": [...]}`` a line: axolotl's
    ``chat_template`` type, LLaMA-Factory's OpenAI format, TRL's conversational format), atomically.
    Returns the path, the examples written and the turns left out."""
    rows = feedback_rows(store, finetune)
    if not rows:
        whose = f"fine-tune {finetune!r}" if finetune else "any model"
        raise SageError(f"There are no marks for {whose} yet. Rate or correct answers first "
                        "(`%sage rate`, `%sage correct`, or the panel's buttons).")
    table = Table("the feedback store", COLUMNS, tuple(rows))
    conversations, left_out = training_rows(table)
    target_path = Path(path).expanduser()
    tmp = target_path.with_name(f".{target_path.name}.{os.getpid()}.tmp")
    try:
        target_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            for conversation in conversations:
                handle.write(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n")
        os.replace(tmp, target_path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SageError(f"Cannot write {target_path} ({error.strerror}). Choose a folder you can write to.") from None
    return target_path, len(conversations), left_out
