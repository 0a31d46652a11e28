"""Scoring one answer against its expected answer, and summarising scores, with the standard library only.

Why no numpy or evaluate/rouge packages: the notebook kernel imports this, and the metrics are small enough
to be exact and obvious here. ``embedding`` needs a sentence model, so its cosines are computed in a child
process (:func:`embedding_scores`); ``judge:MODEL`` asks a served model, so the evaluator sends its prompt
(:func:`judge_prompt`) and parses the reply (:func:`parse_judge`).
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
from collections.abc import Callable, Sequence

from ..core.errors import SageError

_WORDS = re.compile(r"\w+", re.UNICODE)
JUDGE_SCALE = 10
JUDGE_PROMPT = (
    "You are grading an answer against a reference answer.\n"
    "Question: {prompt}\n"
    "Reference answer: {expected}\n"
    "Answer to grade: {answer}\n"
    f"Give a score from 0 (wrong or unrelated) to {JUDGE_SCALE} (correct and equivalent to the reference). "
    "Reply with one line: \"Score: N\"."
)
_SCORE = re.compile(r"score\s*(?:is|[:=])?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?\s*\**\s*\.?\s*$")


def normalize(text: str) -> str:
    """Case-folded, with runs of whitespace collapsed: formatting is not what exact/contains should judge."""
    return " ".join(text.split()).casefold()


def exact(answer: str, expected: str) -> float:
    return float(normalize(answer) == normalize(expected))


def contains(answer: str, expected: str) -> float:
    return float(normalize(expected) in normalize(answer))


def rouge_l(answer: str, expected: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens: the longest common subsequence against both lengths."""
    cand, ref = _WORDS.findall(answer.lower()), _WORDS.findall(expected.lower())
    if not cand or not ref:
        return float(cand == ref)
    previous = [0] * (len(ref) + 1)
    for word in cand:
        current = [0]
        for j, other in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


#: Metrics computed from the two texts alone.
TEXT_METRICS: dict[str, Callable[[str, str], float]] = {"exact": exact, "contains": contains, "rougeL": rouge_l}
EMBEDDING = "embedding"
JUDGE_PREFIX = "judge:"


def check_metrics(metrics: Sequence[str]) -> None:
    for metric in metrics:
        if metric in TEXT_METRICS or metric == EMBEDDING:
            continue
        if metric.startswith(JUDGE_PREFIX) and metric[len(JUDGE_PREFIX):]:
            continue
        raise SageError(f"Unknown metric {metric!r}. Metrics: {', '.join(TEXT_METRICS)}, {EMBEDDING}, and "
                        "judge:MODEL (a fine-tune name, base, or openai:MODEL grades each answer).")


def judge_prompt(prompt: str, expected: str, answer: str) -> str:
    return JUDGE_PROMPT.format(prompt=prompt, expected=expected, answer=answer)


def parse_judge(reply: str) -> float | None:
    """A grader's reply as a 0..1 score: "Score: 7", "score = 7/10", or a bare "7"; None when unreadable or
    outside the scale (a grader that rambles is not silently counted as 0)."""
    found = _SCORE.search(reply) or _BARE.match(reply)
    if found is None:
        return None
    value = float(found.group(1))
    scale = float(found.group(2)) if found.group(2) else float(JUDGE_SCALE)
    if scale <= 0 or not 0 <= value <= scale:
        return None
    return value / scale


def bootstrap_ci(values: Sequence[float], seed: int = 0, resamples: int = 1000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (deterministic for a seed)."""
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(math.ceil(0.975 * resamples)) - 1)]


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def embedding_scores(pairs: Sequence[tuple[str, str]], python: str, embedder: str | None) -> list[float]:
    """Cosine similarity of each (answer, expected) with the RAG embedder, computed in a child process so that
    torch and sentence-transformers never enter the caller. Any way the child fails (cannot start, exits with an
    error, answers nonsense) is one SageError, which the evaluator records on the answers it leaves unscored."""
    if not pairs:
        return []
    job = json.dumps({"embedder": embedder, "pairs": list(pairs)})
    try:
        done = subprocess.run([python, "-m", "sage_magic.evals.similarity"], input=job, capture_output=True,
                              text=True)
        failure = " ".join(done.stderr.strip().splitlines()[-3:]) if done.returncode != 0 else None
    except OSError as error:
        failure = f"{python} could not start: {error.strerror or error}"
    if failure is None:
        try:
            values = [float(x) for x in json.loads(done.stdout)]
        except (ValueError, TypeError):
            values = []
        if len(values) == len(pairs):
            return values
        failure = f"unreadable output: {done.stdout[:200]!r}"
    raise SageError(f"The embedding metric failed ({failure}). Install the document-index extra "
                    "(`pip install -e '.[rag]'` in the sage_magic checkout) or drop --metric embedding.")
