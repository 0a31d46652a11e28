"""The RAG helper process: searches from a light process, errors as in-process, crashes contained, no orphans.

Each helper loads the real MiniLM model, so the tests share as few helpers as they can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from sage_magic import rag
from sage_magic.core.config import Settings
from sage_magic.core.errors import NotFound, SageError
from sage_magic.rag.service import SearchService

pytestmark = pytest.mark.rag

DOCS = Path(__file__).parent / "fixtures" / "rag" / "docs"
REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["How do I pick which graphics card the server runs on?", "My process was ended by the OOM killer",
             "How long does a server keep running after I close my notebook?", "CUDA_VISIBLE_DEVICES"]
HEAVY = ("torch", "sentence_transformers", "faiss", "transformers", "bm25s")


def gone(pid: int, within: float = 15.0) -> bool:
    """Whether process ``pid`` ends within ``within`` seconds (a zombie waiting to be reaped counts as gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    built = Settings.from_env(environ={}, home=tmp_path_factory.mktemp("home"))
    rag.add(built, "docs", [str(DOCS)])
    return built


@pytest.fixture(scope="module")
def service(settings: Settings) -> Iterator[SearchService]:
    shared = SearchService(settings)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def child(settings: Settings) -> Iterator[tuple[subprocess.Popen[str], dict]]:
    """A fresh Python process (as a notebook kernel would be) that searches through a SearchService, reports
    its hits, the heavy modules it imported and the helper's pid, then waits to be killed."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from dataclasses import asdict
        from pathlib import Path
        from sage_magic.core.config import Settings
        from sage_magic.rag import SearchService
        service = SearchService(Settings.from_env(environ={{}}, home=Path({str(settings.home)!r})))
        hits = {{q: [asdict(h) for h in service.search("docs", q, top_k=4)] for q in {QUESTIONS!r}}}
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps({{"hits": hits, "heavy": heavy, "helper": service.pid}}), flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    report = json.loads(process.stdout.readline() or "{}")
    yield process, report
    process.kill()
    process.wait()


def test_a_fresh_process_gets_the_in_process_hits_without_importing_torch(
    settings: Settings, child: tuple[subprocess.Popen[str], dict]
) -> None:
    _, report = child
    assert report["heavy"] == []
    for question in QUESTIONS:
        assert report["hits"][question] == [asdict(h) for h in rag.search(settings, "docs", question, top_k=4)]


def test_the_helper_dies_with_its_parent(child: tuple[subprocess.Popen[str], dict]) -> None:
    process, report = child
    helper = report["helper"]
    assert isinstance(helper, int) and not gone(helper, within=0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert gone(helper)


def test_errors_are_the_same_sage_errors_as_in_process(settings: Settings, service: SearchService) -> None:
    with pytest.raises(NotFound, match=r"no index named 'nope'.*Known indexes: docs"):
        service.search("nope", "gpu")
    for top_k in (0, 21, 2.5, True):
        with pytest.raises(SageError) as remote:
            service.search("docs", "gpu", top_k=top_k)  # type: ignore[arg-type]
        with pytest.raises(SageError) as local:
            rag.search(settings, "docs", "gpu", top_k=top_k)  # type: ignore[arg-type]
        assert str(remote.value) == str(local.value) and "top_k" in str(remote.value)
    with pytest.raises(SageError, match="Unknown search mode"):
        service.search("docs", "gpu", mode="fuzzy")


def test_threads_share_one_helper_and_each_gets_its_own_answers(settings: Settings, service: SearchService) -> None:
    expected = {q: rag.search(settings, "docs", q, top_k=3) for q in QUESTIONS}
    results: list[bool] = []
    errors: list[str] = []

    def ask(offset: int) -> None:
        for i in range(len(QUESTIONS) * 2):
            question = QUESTIONS[(i + offset) % len(QUESTIONS)]
            try:
                results.append(service.search("docs", question, top_k=3) == expected[question])
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 4 * 2 * len(QUESTIONS) and all(results)


def test_a_helper_killed_mid_search_is_a_sage_error_and_the_next_search_restarts_it(
    settings: Settings, service: SearchService
) -> None:
    first = service.warm("docs")
    # SIGSTOP holds the helper, so the search below is surely in flight when SIGKILL arrives.
    os.kill(first, signal.SIGSTOP)
    outcome: list[BaseException | list[rag.Hit]] = []

    def search() -> None:
        try:
            outcome.append(service.search("docs", QUESTIONS[0]))
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome.append(error)

    thread = threading.Thread(target=search)
    thread.start()
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], SageError), outcome
    assert "killed by SIGKILL" in str(outcome[0]) and "next search starts a new one" in str(outcome[0])
    assert service.search("docs", QUESTIONS[0]) == rag.search(settings, "docs", QUESTIONS[0])
    second = service.pid
    assert second not in (None, first) and gone(first)
    # A helper that dies while idle costs nothing but its restart: nothing was lost, so nothing is raised.
    assert second is not None
    os.kill(second, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while service.pid is not None and time.monotonic() < deadline:  # until the service has seen it die
        time.sleep(0.05)
    assert service.pid is None
    assert service.search("docs", QUESTIONS[1]) == rag.search(settings, "docs", QUESTIONS[1])
    assert service.pid not in (None, second)


def test_close_stops_the_helper(service: SearchService) -> None:
    pid = service.warm()
    service.close()
    assert service.pid is None and gone(pid)


def test_a_helper_that_cannot_run_is_a_sage_error_naming_the_interpreter(settings: Settings) -> None:
    with SearchService(settings.with_(python="/bin/false")) as broken:
        with pytest.raises(SageError, match="/bin/false"):
            broken.search("docs", "gpu")
