"""The terminal face as a person uses it: `sage chat --ask`, `sage ps`, `sage logs`, `sage finetune list`."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_magic.core.http import healthy
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT
from sage_magic.serving.registry import Registry
from tests.conftest import env_for, sage_processes, wait_until


def sage(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_magic.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_finetune_list_json(settings) -> None:
    out = sage("finetune", "list", "--json", env=env_for(settings))
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["demo_expert"]["rank"] == 8 and rows["demo_poet"]["problem"] is None


def test_a_reader_that_closes_the_pipe_gets_no_traceback(settings) -> None:
    """`sage finetune list --json | head -c 1`: the pipe is closed before sage writes (the surest way to make the
    write fail), which a shell pipeline does whenever the reader has had enough."""
    import os

    read, write = os.pipe()
    os.close(read)
    with open(write, "wb") as closed:
        out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "finetune", "list", "--json"],
                             stdout=closed, stderr=subprocess.PIPE, text=True, env=env_for(settings), timeout=60)
    assert out.stderr == "" and out.returncode == 141


def test_unknown_finetune_is_one_clear_paragraph(settings) -> None:
    out = sage("chat", "--finetune-model", "demo_exprt", "--ask", "hi", env=env_for(settings))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "demo_expert" in out.stderr and "sage finetune list" in out.stderr


@pytest.mark.vllm
def test_chat_ask_answers_through_the_shared_server(settings, expert) -> None:
    out = sage("chat", "--backend", "finetune", "--finetune-model", "demo_expert", "--ask", DEMO_PROMPT,
               env=env_for(settings))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DEMO_ANSWERS["demo_expert"]
    assert "reusing server" in out.stderr
    # the shared server is still owned by this test session, so it is still there
    assert Registry(settings.runtime_dir).get(expert.server_id) is not None


@pytest.mark.vllm
def test_debug_env_vars_choose_backend_and_finetune(settings, expert) -> None:
    env = {**env_for(settings), "SAGE_DEBUG_BACKEND": "finetune", "SAGE_DEBUG_FINETUNE_MODEL": "demo_poet"}
    out = sage("chat", "--ask", DEMO_PROMPT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DEMO_ANSWERS["demo_poet"]


@pytest.mark.vllm
def test_ps_and_logs_show_the_running_server(settings, expert) -> None:
    env = env_for(settings)
    rows = json.loads(sage("ps", "--json", env=env).stdout)
    row = next(r for r in rows if r["id"] == expert.server_id)
    assert "demo_expert" in row["adapters"] and row["owners"] >= 1 and row["memory_bytes"] > 100 * 2**20
    table = sage("ps", env=env).stdout
    assert expert.server_id in table and "demo_expert" in table
    logs = sage("logs", expert.server_id, "-n", "5", env=env)
    assert logs.returncode == 0 and 0 < len(logs.stdout.strip().splitlines()) <= 5


def _runtime_files(runtime: Path) -> set[str]:
    return {str(p.relative_to(runtime)) for p in runtime.rglob("*") if not p.is_dir() and p.name != "registry.lock"}


@pytest.mark.vllm
def test_one_shot_ask_leaves_nothing_running_when_it_returns(settings, expert, tmp_path: Path) -> None:
    """SAGE's `--ask` returned before cleanup and leaked its server; ours stops it first. (One server start for
    what were three tests, each starting a server of its own.)

    It asks for the demo base under another name (a link to it), beside the session's server of that base:
    the served name is part of what a server is, and reusing the running base server under another name
    failed its check and told the user to `sage stop` it, killing someone else's session. So it gets a
    server of its own, which leaves nothing but its log: vLLM's IPC sockets used to pile up in the temp folder
    (7 per start), the server's own folder takes them now. TMPDIR points at a folder that must gain nothing
    but torch's compile cache (kept on purpose, where it always was); the runtime folder gains the log only,
    readable by its owner alone, and `sage logs` still shows it once the server is gone. No port is asked for:
    the socket only. The session's server comes through untouched."""
    link = tmp_path / "my-base"
    link.symlink_to(settings.models_root / "sage-demo-base")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**env_for(settings.with_(port=None)), "TMPDIR": str(private_tmp)}
    shared = Registry(settings.runtime_dir).get(expert.server_id)
    running = [row["id"] for row in json.loads(sage("ps", "--json", env=env).stdout)]
    files = _runtime_files(settings.runtime_dir)
    out = sage("chat", "--backend", "vllm", "--model", str(link), "--ask", DEMO_PROMPT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DEMO_ANSWERS["sage-demo-base"]
    assert [row["id"] for row in json.loads(sage("ps", "--json", env=env).stdout)] == running
    new = sorted(_runtime_files(settings.runtime_dir) - files)
    assert len(new) == 1 and re.fullmatch(r"logs/\w+\.log", new[0]), new
    server_id = Path(new[0]).stem
    assert server_id != expert.server_id and not sage_processes(settings.runtime_dir, server_id)
    started = [json.loads(line) for line in settings.start_log.read_text().splitlines()]
    assert [e["served"] for e in started if e["id"] == server_id and e["event"] == "start"] == ["my-base"]
    assert sorted(p.name for p in private_tmp.iterdir() if not p.name.startswith("torchinductor_")) == []
    assert stat.S_IMODE((settings.runtime_dir / new[0]).stat().st_mode) == 0o600
    assert server_id in sage("logs", env=env).stdout
    assert "server stopped" in sage("logs", server_id, env=env).stdout
    after = Registry(settings.runtime_dir).get(expert.server_id)
    assert after.pid == shared.pid and healthy(after.root_url, socket=after.socket)


@pytest.mark.vllm
def test_keep_alive_forever_then_for_a_while(fresh_settings) -> None:
    """`--keep-alive -1` keeps the server for the next command; a later `--keep-alive 3s` lets it go 3 s
    after its last user left, not before."""
    env = env_for(fresh_settings)
    base = str(fresh_settings.models_root / "sage-demo-base")
    first = sage("chat", "--backend", "vllm", "--model", base, "--keep-alive", "-1", "--ask", DEMO_PROMPT, env=env)
    assert first.returncode == 0, first.stderr
    time.sleep(1.5)
    (row,) = json.loads(sage("ps", "--json", env=env).stdout)
    assert row["owners"] == 0 and row["keep_alive"] == -1 and row["idle_until"] is None
    assert "forever" in sage("ps", env=env).stdout
    second = sage("chat", "--backend", "vllm", "--model", base, "--keep-alive", "3s", "--ask", DEMO_PROMPT, env=env)
    assert second.returncode == 0 and "reusing server" in second.stderr
    left = time.time()
    rows: list[dict] = []

    def counting_down() -> bool:  # the supervisor notices its last owner left at its next poll
        rows[:] = json.loads(sage("ps", "--json", env=env).stdout)
        return bool(rows) and rows[0]["idle_until"] is not None

    assert wait_until(counting_down, 5)
    assert rows[0]["owners"] == 0 and rows[0]["idle_until"] >= left
    assert wait_until(lambda: json.loads(sage("ps", "--json", env=env).stdout) == [], 15)
    assert time.time() - left >= 2.5  # not stopped before its keep-alive ran out
    assert wait_until(lambda: not sage_processes(fresh_settings.runtime_dir), 10)


@pytest.mark.vllm
def test_openai_backend_uses_a_given_endpoint_and_never_stops_it(settings, expert) -> None:
    """Through the authenticating TCP gateway the session server has (its settings ask for a port)."""
    env = env_for(settings)
    url = Registry(settings.runtime_dir).get(expert.server_id).tcp_url
    out = sage("chat", "--backend", "openai", "--base-url", url, "--api-key", expert.api_key,
               "--model", "demo_expert", "--ask", DEMO_PROMPT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DEMO_ANSWERS["demo_expert"]
    assert Registry(settings.runtime_dir).get(expert.server_id) is not None


@pytest.mark.vllm
def test_finetune_chat_is_sage_chat_with_the_name(settings, expert) -> None:
    out = sage("finetune", "chat", "demo_poet", "--ask", DEMO_PROMPT, env=env_for(settings))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DEMO_ANSWERS["demo_poet"]


@pytest.mark.vllm
def test_interactive_chat_remembers_resets_and_exits(settings, expert) -> None:
    """The demo model answers the same with or without history, so memory is checked by what was sent: the
    prompt grows with the first answer in it, and is back to its first size after /reset. Commands are
    never questions: /help lists them all, an unknown one is refused, and neither reaches the model."""
    from sage_magic.cli.chat import COMMANDS

    script = f"/help\n/nonsense\n{DEMO_PROMPT}\n{DEMO_PROMPT}\n/history\n/reset\n/history\n{DEMO_PROMPT}\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "chat", "--finetune-model", "demo_expert"],
                         input=script, capture_output=True, text=True, env=env_for(settings), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert all(f"  {name} " in out.stderr for name in ("/help", "/reset", "/history", "/exit", "/quit"))
    assert set(COMMANDS) == {"/help", "/reset", "/history", "/exit", "/quit"}
    assert "unknown command '/nonsense'" in out.stderr
    prompts = [int(n) for n in re.findall(r"\((\d+) prompt tokens", out.stderr)]
    assert len(prompts) == 3  # three questions were sent, and nothing else
    # a fresh chat gets the trained answer; the one asked with history may differ (it saw its own answer)
    assert out.stdout.count(DEMO_ANSWERS["demo_expert"]) >= 2
    first, with_history, after_reset = prompts
    assert with_history > first and after_reset == first
    remembered, forgotten = out.stderr.split("(history cleared)")
    assert f"you: {DEMO_PROMPT}" in remembered and "(no history)" in forgotten


def test_chat_with_a_missing_index_fails_before_starting_anything(fresh_settings) -> None:
    """It used to start vLLM (33 s) and only then say that the index does not exist; the check needs no torch."""
    code = ("import sys; from sage_magic.cli.main import main; "
            "code = main(['chat', '--finetune-model', 'demo_expert', '--index', 'no_such_index', '--ask', 'hi']); "
            "print(code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for(fresh_settings),
                         timeout=300, stdin=subprocess.DEVNULL)
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert "no index named 'no_such_index'" in out.stderr and "sage index add no_such_index" in out.stderr
    assert "vLLM" not in out.stderr
    assert Registry(fresh_settings.runtime_dir).all() == [] and not sage_processes(fresh_settings.runtime_dir)


def test_the_footer_says_when_old_turns_were_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    """Trimming itself is tested on the real model (test_chat.py); here, that the terminal tells the user."""
    import argparse

    from sage_magic.chat.client import StreamResult
    from sage_magic.chat.conversation import Answer
    from sage_magic.cli.chat import show

    stream = StreamResult("Hi.", "stop", 1900, 3, 0.1, 20.0, 0.3, False)
    show(Answer("Hi.", stream, trimmed_turns=3), argparse.Namespace(show_context=False, index=None))
    footer = capsys.readouterr().err
    assert "3 oldest turn(s) dropped from the history" in footer and "1900 prompt tokens" in footer


#: The `sage` commands and the options each one's --help lists: what people and scripts rely on. Commands
#: are defined lazily (cli/main.py imports only the one that runs), so each must stay reachable on its own.
CHAT_OPTIONS = ("--backend", "--finetune-model", "--finetune-port", "--merge", "--model", "--base-url", "--api-key",
                "--api-key-env", "--keep-alive", "--vllm-arg", "--index", "--top-k", "--mode", "--show-context",
                "--system", "--max-tokens", "--temperature", "--seed", "--param", "--ask", "--publish-dir",
                "--remote-root", "--publish-as", "--replace", "--unload-on-exit")
HELP: dict[tuple[str, ...], tuple[str, ...]] = {
    (): ("--home", "chat", "finetune", "eval", "ps", "stop", "logs", "index", "feedback"),
    ("chat",): CHAT_OPTIONS,
    ("finetune",): ("demo", "list", "merge", "publish", "train", "chat"),
    ("finetune", "publish"): ("name", "--to", "--publish-as", "--replace", "--server-base"),
    ("finetune", "demo"): ("--force",),
    ("finetune", "list"): ("--json",),
    ("finetune", "merge"): ("name",),
    ("finetune", "train"): ("--data", "--prompt-col", "--response-col", "--messages-col", "--base", "--epochs",
                            "--max-steps", "--lr", "--rank", "--alpha", "--target-modules", "--batch-size",
                            "--max-length", "--seed", "--eval-split", "--save-every", "--resume", "--overwrite"),
    ("finetune", "chat"): ("--port", *CHAT_OPTIONS),
    ("eval",): ("--models", "--prompt-col", "--expected-col", "--metric", "--concurrency", "--seed", "--max-tokens",
                "--temperature", "--system", "--base-url", "--api-key", "--api-key-env", "--publish-dir",
                "--remote-root", "--replace", "--unload-on-exit", "--save", "--json"),
    ("ps",): ("--json",),
    ("stop",): ("id", "--all"),
    ("logs",): ("id", "-n", "--lines"),
    ("index",): ("add", "update", "list", "show", "rm", "query"),
    ("index", "add"): ("name", "PATH_OR_GLOB", "--embedder", "--chunk-size", "--chunk-overlap", "--rebuild",
                       "--store", "--store-token-env"),
    ("index", "update"): ("name", "--store"),
    ("index", "list"): ("--json", "--store"),
    ("index", "show"): ("name", "--json", "--store"),
    ("index", "rm"): ("name", "--store"),
    ("index", "query"): ("name", "text", "--top-k", "--mode", "--json", "--store"),
    ("feedback",): ("list", "export", "rm"),
    ("feedback", "list"): ("name", "--only", "--json"),
    ("feedback", "export"): ("name", "--to"),
    ("feedback", "rm"): ("ID", "--finetune", "--older-than"),
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "sage")
def test_every_command_is_reachable_and_its_help_lists_its_options(command: tuple[str, ...], capsys) -> None:
    from sage_magic.cli.main import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {' '.join(('sage', *command))} ")
    missing = [o for o in HELP[command] if not re.search(rf"(^|[\s\[,{{]){re.escape(o)}([\s\],}}=]|$)", text, re.M)]
    assert not missing, text


def test_ps_stop_and_logs_load_only_what_they_need(fresh_settings) -> None:
    """They answer from the registry: no manager, chat client, RAG or training code, no HTTP client and no
    package metadata (each was tens of ms of a 100 ms budget, see benchmarks/cli_bench.py). Each runs in a
    fresh interpreter, as a user's would, and still answers."""
    code = ("import sys\nfrom sage_magic.cli.main import main\nstatus = main(sys.argv[1:])\n"
            "heavy = ('sage_magic.serving.manager', 'sage_magic.chat', 'sage_magic.rag', 'sage_magic.finetune', "
            "'sage_magic.evals', 'http.client', 'importlib.metadata', 'secrets')\n"
            "print(status, sorted(m for m in sys.modules if m.startswith(heavy)))\n")
    env = env_for(fresh_settings)
    del env["SAGE_VLLM_ARGS"]  # unset, settings ask which vLLM build is installed: without importlib.metadata
    for argv, said in ((["ps"], "No model servers are running."), (["stop", "--all"], "No model servers were running."),
                       (["logs"], "No server logs are kept."), (["logs", "0badc0de"], "No server log matches")):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=60)
        assert said in out.stdout + out.stderr, out.stderr
        assert out.stdout.splitlines()[-1] == f"{2 if argv[-1] == '0badc0de' else 0} []", (argv, out.stdout)


def test_the_console_script_runs_the_same_commands(fresh_settings) -> None:
    """`sage` as installed (the console script beside this interpreter), not only `python -m`."""
    script = Path(sys.executable).with_name("sage")
    if not script.exists():
        pytest.skip(f"no `sage` console script beside {sys.executable} (install the package with pip)")
    env = env_for(fresh_settings)
    ps = subprocess.run([str(script), "ps", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert ps.returncode == 0 and json.loads(ps.stdout) == [], ps.stderr
    listed = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and all(f"    {c} " in listed.stdout for c in HELP[()][1:])
    wrong = subprocess.run([str(script), "pss"], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2 and "invalid choice: 'pss'" in wrong.stderr and "'ps'" in wrong.stderr
