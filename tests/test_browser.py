"""The SAGE sidebar and status item in a real JupyterLab, driven in headless Chromium.

The test starts JupyterLab on 127.0.0.1 with a token and this checkout's server extension and built lab
extension (sage_magic/labextension, built by `npm run build:prod` in labextension/). The stop test uses a
model server of its own (a private registry): stopping the session's shared server would break the tests that
come after it; the others use the shared one. Each step's screenshot goes to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from sage_magic.chat.client import ChatClient
from sage_magic.core.config import Settings
from sage_magic.serving.manager import Manager
from sage_magic.serving.registry import Owner, Registry, ServerRecord, new_server_id
from tests.conftest import env_for, sage_processes, wait_until

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "sage_magic" / "labextension"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="Chromium is not installed here (`apt-get install -y chromium`; .ci/run does it)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """A JupyterLab server process seeing one SAGE home and registry."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        if not (BUILT / "static" / "style.js").is_file():
            pytest.fail(f"The lab extension is not built ({BUILT} is missing): run "
                        "`cd labextension && npm install && npm run build:prod` first.")
        data = folder / "jupyter-data"
        (data / "labextensions").mkdir(parents=True)
        (data / "labextensions" / "sage-magic").symlink_to(BUILT)  # this checkout's build, not an installed one
        config = folder / "jupyter-config"
        config.mkdir()
        lab_settings = folder / "lab-settings"  # no "get Jupyter news?" toast over the screenshots
        lab_settings.mkdir()
        (lab_settings / "overrides.json").write_text(
            json.dumps({"@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}}))
        (config / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": {"sage_magic.server": True}}}))
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**env_for(settings), "JUPYTER_PATH": str(data), "JUPYTER_CONFIG_DIR": str(config),
               "PYTHONPATH": str(ROOT)}
        self.log = open(folder / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip", "127.0.0.1",
             "--port", str(self.port), f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={folder}",
             "--LabApp.expose_app_in_browser=True", f"--LabApp.app_settings_dir={lab_settings}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_until(self._up, 60, 0.5), f"JupyterLab did not start: {(folder / 'jupyterlab.log').read_text()}"

    def _up(self) -> bool:
        assert self.proc.poll() is None, "JupyterLab exited"
        try:
            with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2):
                return True
        except OSError:
            return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def page(tmp_path: Path):
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is in the test extra")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 800})
        finally:
            browser.close()


def _open_lab(page, lab: Lab) -> None:
    page.goto(f"{lab.url}/lab?token={lab.token}")
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=60_000)
    page.evaluate("async () => { await window.jupyterapp.restored; }")


# Opens a new notebook on a ready kernel and makes it the active one (leaves ``app`` and ``panel`` defined).
_NEW_NOTEBOOK = """
        const app = window.jupyterapp;
        const panel = await app.commands.execute('notebook:create-new', {kernelName: 'python3'});
        await panel.context.ready;
        await panel.sessionContext.ready;
        await panel.sessionContext.session.kernel.info;
        app.shell.activateById(panel.id);
"""


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _status_text(page) -> str:
    return page.locator(".sage-magic-status").inner_text()


@pytest.fixture
def lab_for(tmp_path: Path) -> Iterator:
    labs: list[Lab] = []

    def start(settings: Settings) -> Lab:
        labs.append(Lab(settings, tmp_path / f"lab{len(labs)}"))
        return labs[-1]

    yield start
    for lab in labs:
        lab.close()


def test_sidebar_status_item_and_commands_appear(page, lab_for, fresh_settings: Settings) -> None:
    lab = lab_for(fresh_settings)
    _open_lab(page, lab)
    status = page.locator(".sage-magic-status")
    status.wait_for(state="visible", timeout=30_000)
    assert wait_until(lambda: _status_text(page) == "SAGE: 0 servers", 15)
    status.click()  # opens the sidebar
    sidebar = page.locator("#sage-magic-sidebar")
    sidebar.wait_for(state="visible", timeout=10_000)
    page.locator("#sage-magic-sidebar .sage-magic-finetune", has_text="demo_expert").wait_for(timeout=15_000)
    assert "No model server is running." in sidebar.inner_text()
    labels = page.evaluate("""() => ['sage-magic:open-chat', 'sage-magic:stop-all']
        .map(id => window.jupyterapp.commands.label(id))""")
    assert labels == ["SAGE: Open chat in this notebook", "SAGE: Stop all model servers"]
    _shot(page, "1-sidebar-and-status-item")

    cells = page.evaluate("async () => {" + _NEW_NOTEBOOK + """
        await app.commands.execute('sage-magic:open-chat');
        return panel.content.model.sharedModel.cells.map(c => [c.getSource(), c.execution_count]);
    }""")
    # the command put the chat cell into the new notebook's empty cell and the kernel ran it
    assert cells == [["%load_ext sage_magic\n%sage_chat", 1]]
    _shot(page, "1b-open-chat-command")

    # No fine-tune configured (the lab's environment has no SAGE_DEBUG_FINETUNE_MODEL): the command again
    # inserts a plain chat cell, below, and runs it; the notebook loads the extension already, so the new cell
    # does not load it again (which printed "already loaded" above the chat).
    cells = page.evaluate("""async () => {
        const panel = window.jupyterapp.shell.currentWidget;
        await window.jupyterapp.commands.execute('sage-magic:open-chat');
        return panel.content.model.sharedModel.cells.map(c => [c.getSource(), c.execution_count]);
    }""")
    assert cells == [["%load_ext sage_magic\n%sage_chat", 1], ["%sage_chat", 2]]
    assert "already loaded" not in page.locator(".jp-Cell").nth(1).inner_text()


# Counts, in window.__standby, the server poll's standby ticks (the status item's data-poll, set on every tick).
_COUNT_STANDBY = """() => {
    window.__standby = 0;
    const status = document.querySelector('.sage-magic-status');
    new MutationObserver(records => {
        window.__standby += records.filter(r => status.getAttribute('data-poll') === 'standby').length;
    }).observe(status, {attributes: true, attributeFilter: ['data-poll']});
}"""

_SET_PAGE_HIDDEN = """(hidden) => {
    Object.defineProperty(document, 'visibilityState', {value: hidden ? 'hidden' : 'visible', configurable: true});
    Object.defineProperty(document, 'hidden', {value: hidden, configurable: true});
    document.dispatchEvent(new Event('visibilitychange'));
}"""


def _is_sage_request(request) -> bool:
    return "/sage-magic/" in request.url


def _is_server_list(request) -> bool:
    return request.url.split("?")[0].endswith("/sage-magic/servers")


def test_sidebar_sends_no_request_while_the_page_is_hidden(page, lab_for, fresh_settings: Settings) -> None:
    """The user switched to another tab: the polls stand by (they still tick, without fetching)."""
    lab = lab_for(fresh_settings)
    _open_lab(page, lab)
    page.locator(".sage-magic-status").click()
    page.locator("#sage-magic-sidebar .sage-magic-finetune", has_text="demo_expert").wait_for(timeout=15_000)
    page.evaluate(_COUNT_STANDBY)
    page.evaluate(_SET_PAGE_HIDDEN, True)
    page.wait_for_function("() => window.__standby >= 1", timeout=30_000)  # a tick in flight has finished
    requests: list[str] = []
    page.on("request", lambda request: _is_sage_request(request) and requests.append(request.url))
    page.wait_for_function("() => window.__standby >= 3", timeout=30_000)
    assert requests == []
    page.evaluate(_SET_PAGE_HIDDEN, False)
    page.wait_for_event("request", predicate=_is_server_list, timeout=30_000)  # back: polling again


def _stand_in_server(settings: Settings, **fields: object) -> tuple[str, subprocess.Popen]:
    """A hand-written registry record whose supervisor a marked `sleep` stands in for (no vLLM start): what
    the sidebar shows of a record and whether its buttons stop it are the point here, not serving. The
    `sleep` is reaped as soon as it dies, as a real supervisor's parent would, so a stop sees it gone."""
    registry = Registry(settings.runtime_dir)
    server_id = new_server_id()
    supervisor = subprocess.Popen(["sleep", "300"], start_new_session=True,
                                  env={"PATH": "/usr/bin:/bin", "SAGE_SERVER_ID": server_id,
                                       "SAGE_RUNTIME_DIR": str(settings.runtime_dir)})
    threading.Thread(target=supervisor.wait, daemon=True).start()
    values: dict = dict(id=server_id, kind="base", identity="x", model_path="/m", served_name="demo_base",
                        host="127.0.0.1", port=None, api_key="k", log_path=str(registry.log_path(server_id)),
                        socket=str(registry.server_dir(server_id) / "api.sock"), supervisor_pid=supervisor.pid,
                        keep_alive=0.0, started_at=time.time(), state="ready")
    record = ServerRecord(**{**values, **fields})
    with registry.locked():
        registry.save(record)
    return server_id, supervisor


@pytest.mark.vllm
def test_sidebar_lists_a_server_shows_its_log_and_stops_it_and_stop_all_asks_first(page, lab_for,
                                                                                  fresh_settings: Settings) -> None:
    """One story on one vLLM start (they were two tests, each starting a server of its own), in a registry of
    its own, so that stopping leaves the session's shared server alone. A stand-in server (a record and a
    marked `sleep`, see _stand_in_server) sits beside the real one: the row's Stop must stop its own server
    only, and Stop all must stop both."""
    manager = Manager(fresh_settings)
    other = None
    try:
        endpoint = manager.serve_finetune("demo_expert").endpoint
        other_id, other = _stand_in_server(fresh_settings, served_name="stand_in")
        _open_lab(page, lab_for(fresh_settings))
        page.locator(".sage-magic-status").click()
        row = page.locator(f'#sage-magic-sidebar li.sage-magic-server[data-server-id="{endpoint.server_id}"]')
        other_row = page.locator(f'#sage-magic-sidebar li.sage-magic-server[data-server-id="{other_id}"]')
        row.wait_for(timeout=30_000)
        assert "sage-demo-base" in row.inner_text() and "demo_expert" in row.inner_text()
        assert wait_until(lambda: _status_text(page) == "SAGE: 2 servers", 10)
        _shot(page, "2-sidebar-lists-the-server")

        row.locator("button.sage-magic-log-button").click()
        log = row.locator("pre.sage-magic-log")
        assert wait_until(lambda: "INFO" in log.inner_text(), 30), log.inner_text()
        _shot(page, "3-server-log")

        # the user scrolls up the log to read it; two polls later (each fetches the log again) it is where they
        # left it, the same element
        top, height, visible = log.evaluate("el => { el.__kept = true; el.scrollTop = 30; "
                                            "return [el.scrollTop, el.scrollHeight, el.clientHeight]; }")
        assert top == 30 and height > visible + 30, "the log is too short to scroll"
        for _ in range(2):
            page.wait_for_event("request", predicate=lambda r: "/log?" in r.url, timeout=30_000)
        page.wait_for_event("request", predicate=_is_server_list, timeout=30_000)  # that log is drawn by now
        assert log.evaluate("el => [el.__kept === true, el.scrollTop]") == [True, 30]
        _shot(page, "3b-log-kept-its-scroll")

        # the sidebar collapsed: the status item's count still polls the servers, the log is not fetched
        requests: list[str] = []
        page.on("request", lambda request: _is_sage_request(request) and requests.append(request.url))
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        sidebar_hidden = len(requests)
        for _ in range(2):
            page.wait_for_event("request", predicate=_is_server_list, timeout=30_000)
        assert [url for url in requests[sidebar_hidden:] if not url.split("?")[0].endswith("/servers")] == []
        page.evaluate("() => window.jupyterapp.shell.activateById('sage-magic-sidebar')")
        page.wait_for_event("request", predicate=lambda r: "/log?" in r.url, timeout=30_000)

        # Stop all asks first, saying it reaches other kernels' servers; Cancel stops nothing
        page.locator("#sage-magic-sidebar button.sage-magic-stop-all").click()
        dialog = page.locator(".jp-Dialog")
        dialog.wait_for(timeout=10_000)
        assert "other kernels" in dialog.inner_text()
        _shot(page, "3c-stop-all-asks-first")
        dialog.locator("button", has_text="Cancel").click()
        dialog.wait_for(state="detached", timeout=10_000)
        page.wait_for_event("request", predicate=_is_server_list, timeout=30_000)
        page.wait_for_event("requestfinished", predicate=_is_server_list, timeout=30_000)
        assert sorted(r.id for r in manager.registry.all()) == sorted([endpoint.server_id, other_id])
        assert row.is_visible() and _status_text(page) == "SAGE: 2 servers"

        # the row's Stop stops that server, vLLM and all, and only that one: checked once its request has
        # been answered (the real server's row goes before a stop of every server would reach the stand-in)
        started = time.monotonic()
        with page.expect_response(lambda r: r.url.split("?")[0].endswith(f"/servers/{endpoint.server_id}/stop"),
                                  timeout=60_000) as stop:
            row.locator("button.sage-magic-stop").click()
        assert stop.value.ok
        row.wait_for(state="detached", timeout=60_000)
        print(f"sidebar Stop -> row gone: {time.monotonic() - started:.1f} s")
        assert [r.id for r in manager.registry.all()] == [other_id] and other.poll() is None
        assert wait_until(lambda: _status_text(page) == "SAGE: 1 server", 10) and other_row.is_visible()
        _shot(page, "4-stopped-one-count-one")
        assert wait_until(lambda: not sage_processes(fresh_settings.runtime_dir, endpoint.server_id), 20)

        # the palette command asks the same; confirming stops every server
        page.evaluate("() => { void window.jupyterapp.commands.execute('sage-magic:stop-all'); }")
        dialog.locator("button.jp-mod-warn", has_text="Stop all").click()
        page.locator("#sage-magic-sidebar .sage-magic-empty").wait_for(timeout=60_000)
        assert wait_until(lambda: _status_text(page) == "SAGE: 0 servers", 10)
        _shot(page, "4b-stop-all-list-empty-count-zero")
        assert manager.registry.all() == []
        assert wait_until(lambda: not sage_processes(fresh_settings.runtime_dir), 20)
    finally:
        manager.stop_all()
        manager.close()
        if other is not None:
            other.kill()


def test_a_hundred_adapters_fold_into_a_list_that_stays_open(page, lab_for, fresh_settings: Settings) -> None:
    """No vLLM: a stand-in record for a base server with 100 adapters (see _stand_in_server)."""
    names = [f"ft_{i:03d}" for i in range(100)]
    server_id, supervisor = _stand_in_server(
        fresh_settings, adapters={n: {"path": f"/ft/{n}", "fingerprint": "f"} for n in names},
        owners=[Owner.this_process(n) for n in names])
    try:
        _open_lab(page, lab_for(fresh_settings))
        page.locator(".sage-magic-status").click()
        row = page.locator(f'#sage-magic-sidebar li.sage-magic-server[data-server-id="{server_id}"]')
        summary = row.locator("summary.sage-magic-adapters-summary")
        summary.wait_for(timeout=30_000)
        assert summary.inner_text() == "100 adapters: ft_000, ft_001, ft_002 and 97 more"
        assert "1 owner(s)" in row.inner_text() and "ft_099" not in row.inner_text()
        _shot(page, "5-hundred-adapters-folded")
        summary.click()
        full = row.locator(".sage-magic-adapter-list")
        assert full.is_visible() and "ft_099" in full.inner_text()
        time.sleep(4)  # a poll (every 3 s) updates the row in place: the list the user opened stays open
        assert full.is_visible()
        _shot(page, "6-hundred-adapters-open")
    finally:
        supervisor.kill()


@pytest.fixture
def broken_finetunes(demo_home: Path) -> Iterator[None]:
    """Two fine-tunes vLLM could not serve, next to the demo ones for one test: one names a base that is not on
    this machine, one has an adapter rank above the server's --max-lora-rank."""
    expert = demo_home / "finetune_output" / "demo_expert"
    made = []
    for name, meta, rank in (("broken_base", {"model": "no-such-base"}, None), ("broken_rank", None, 4096)):
        root = demo_home / "finetune_output" / name
        made.append(root)
        shutil.copytree(expert / "lora_weights", root / "lora_weights")
        (root / "finetune_meta.json").write_text(json.dumps(meta or json.loads((expert / "finetune_meta.json")
                                                                               .read_text())))
        if rank is not None:
            config = root / "lora_weights" / "adapter_config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()), "r": rank}))
    try:
        yield
    finally:
        for root in made:
            shutil.rmtree(root)


@pytest.mark.vllm
def test_finetunes_show_their_problem_and_a_click_opens_a_chat(page, lab_for, settings: Settings, expert,
                                                                broken_finetunes) -> None:
    """On the session's shared server: the lab's kernel sees the same registry, so the chat the click opens
    reuses it (and lets it go when the lab closes)."""
    lab = lab_for(settings)
    _open_lab(page, lab)
    page.evaluate("async () => {" + _NEW_NOTEBOOK + "}")
    page.locator(".sage-magic-status").click()
    finetune = page.locator("#sage-magic-sidebar li.sage-magic-finetune[data-name='demo_expert']")
    finetune.wait_for(timeout=30_000)
    assert "base " in finetune.inner_text() and "rank " in finetune.inner_text()
    assert finetune.get_attribute("aria-disabled") == "false"
    no_base = page.locator("#sage-magic-sidebar li.sage-magic-finetune[data-name='broken_base']")
    assert "no-such-base" in no_base.locator(".sage-magic-problem").inner_text()
    assert no_base.get_attribute("aria-disabled") == "true"
    too_big = page.locator("#sage-magic-sidebar li.sage-magic-finetune[data-name='broken_rank']")
    assert "rank 4096" in too_big.inner_text() and "4096" in too_big.locator(".sage-magic-problem").inner_text()
    _shot(page, "2b-finetunes-broken-ones-say-why")

    finetune.click()
    page.locator(".sage-chat .sage-status", has_text="ready").wait_for(timeout=120_000)
    cells = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.model.sharedModel.cells
        .map(c => [c.getSource(), c.execution_count])""")
    assert cells == [["%load_ext sage_magic\n%sage_chat --finetune-model demo_expert", 1]]
    assert "demo_expert" in page.locator(".jp-Cell").first.inner_text()
    _shot(page, "2c-finetune-click-opened-a-chat")


# --- the %sage_chat panel in a real page ----------------------------------------------------------------------

_WATCH = """() => {
    // In the last panel: when Send was clicked, when the answer's first text was drawn, and when its text
    // last changed (performance.now(), ms).
    const root = document.querySelectorAll('.sage-chat');
    const chat = root[root.length - 1];
    const before = chat.querySelectorAll('.sage-model').length;
    window.__sage = {sent: null, first: null, last: null};
    const button = [...chat.querySelectorAll('button')].find(b => b.textContent.trim() === 'Send');
    button.addEventListener('click', () => { window.__sage.sent = performance.now(); },
                            {capture: true, once: true});
    let seen = '';
    const observer = new MutationObserver(() => {
        const answers = chat.querySelectorAll('.sage-model');
        const answer = answers.length > before ? answers[answers.length - 1].querySelector('.sage-answer, pre') : null;
        const text = answer ? answer.textContent.replace('▍', '').trim() : '';
        if (!text || text === '…' || text === seen) return;
        seen = text;
        window.__sage.last = performance.now();
        if (window.__sage.first === null) window.__sage.first = window.__sage.last;
    });
    observer.observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def _run_in_new_notebook(page, source: str) -> None:
    page.evaluate("async (source) => {" + _NEW_NOTEBOOK + """
        panel.content.model.sharedModel.cells[0].setSource(source);
        await app.commands.execute('notebook:run-all-cells');
    }""", source)


def _last_answer(page):
    return page.locator(".sage-chat .sage-model").last


@pytest.mark.vllm
def test_chat_panel_streams_the_trained_phrase(page, lab_for, settings: Settings, expert) -> None:
    """Steps 1-2 on the session's shared server (the kernel sees the same registry, so it reuses it)."""
    from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT

    lab = lab_for(settings)
    _open_lab(page, lab)
    _run_in_new_notebook(page, "%load_ext sage_magic\n%sage_chat --finetune-model demo_expert")
    box = page.locator(".sage-chat textarea.sage-chat-input")
    box.wait_for(timeout=120_000)
    page.locator(".sage-chat .sage-status", has_text="ready").wait_for(timeout=30_000)
    _shot(page, "5-chat-panel-ready")
    warm: list[float] = []
    for step in ("first ask", *(f"warm ask {n} (after Clear)" for n in range(1, 6))):
        if step != "first ask":  # a new chat: with the first turn in its history the model words it differently
            page.locator(".sage-chat button", has_text="Clear").click()
            page.locator(".sage-chat .sage-model").first.wait_for(state="detached", timeout=10_000)
        box.fill(DEMO_PROMPT)
        page.evaluate(_WATCH)
        page.locator(".sage-chat button", has_text="Send").click()
        try:
            _last_answer(page).filter(has_text=DEMO_ANSWERS["demo_expert"]).wait_for(timeout=60_000)
        except Exception:
            _shot(page, "6-failed")
            print(page.locator(".sage-chat").last.inner_text())
            raise
        # The footer is drawn when the turn ends; a 13-token answer that reached the kernel in one burst (a
        # loaded machine) rightly shows no tok/s, so wait for what every footer has.
        _last_answer(page).locator(".sage-footer", has_text="first token").wait_for(timeout=10_000)
        shown = page.evaluate("() => window.__sage.first - window.__sage.sent")
        footer = _last_answer(page).locator(".sage-footer").inner_text()
        server_ms = float(footer.split("first token ")[1].split(" ms")[0])
        print(f"{step}: Send -> first token in the page {shown:.0f} ms; the client's time to first token "
              f"{server_ms:.0f} ms; overhead {shown - server_ms:+.0f} ms (goal: +<=100 ms); footer: {footer}")
        if step != "first ask":
            warm.append(shown - server_ms)
    print(f"warm asks: overhead median {sorted(warm)[len(warm) // 2]:+.0f} ms, range {min(warm):+.0f} to "
          f"{max(warm):+.0f} ms (goal: +<=100 ms)")
    assert box.input_value() == ""  # Send emptied the input
    _shot(page, "6-trained-phrase-streamed")

    # Token rate: a second panel in the same notebook whose answers are 128 tokens (vLLM's min_tokens), against
    # the raw client on the same server, prompt and fields.
    long_answer = "--max-tokens 128 --param min_tokens=128"
    page.evaluate("""async (source) => {
        const panel = window.jupyterapp.shell.currentWidget;
        const cells = panel.content.model.sharedModel;
        cells.insertCell(cells.cells.length, {cell_type: 'code', source});
        panel.content.activeCellIndex = cells.cells.length - 1;
        await window.jupyterapp.commands.execute('notebook:run-cell');
    }""", f"%sage_chat --finetune-model demo_expert {long_answer}")
    second = page.locator(".sage-chat").nth(1)
    second.locator(".sage-status", has_text="ready").wait_for(timeout=30_000)
    shown = second.locator(".sage-model").count()  # the shared history, replayed
    second.locator("textarea.sage-chat-input").fill(DEMO_PROMPT)
    page.evaluate(_WATCH)
    second.locator("button", has_text="Send").click()
    answer = second.locator(".sage-model").nth(shown)
    try:  # the footer is drawn when the turn ends; the rate below is the page's own, not the footer's
        answer.locator(".sage-footer", has_text="first token").wait_for(timeout=60_000)
    except Exception:
        _shot(page, "6b-failed")
        print(second.inner_text())
        raise
    tokens = int(answer.locator(".sage-footer").inner_text().split(" out")[0].split()[-1])
    watch = page.evaluate("() => window.__sage")
    drawn = (watch["last"] - watch["first"]) / 1000
    panel_rate = (tokens - 1) / drawn if drawn > 0 else None  # None: the page drew the answer in one burst
    raw = ChatClient(expert).stream([{"role": "user", "content": DEMO_PROMPT}], max_tokens=128, min_tokens=128,
                                    temperature=0.0)
    raw_rate = raw.tokens_per_second  # None when vLLM sent the whole answer in one burst (a loaded machine)
    shown_rate = f"at {panel_rate:.0f} tok/s" if panel_rate else "in one burst"
    versus = (f"{raw_rate:.0f} tok/s ({raw.completion_tokens} tokens)" if raw_rate
              else f"sent its {raw.completion_tokens} tokens in one burst this time (no rate)")
    ratio = f" -> ratio {panel_rate / raw_rate:.2f}" if panel_rate and raw_rate else ""
    print(f"token rate: the panel drew {tokens} tokens {shown_rate} (first to last text shown in the page); the "
          f"raw client on the same server {versus}{ratio}")
    assert tokens == 128 and raw.completion_tokens == 128
    assert page.locator(".sage-chat").nth(0).locator(".sage-model").count() == 2  # the shared history shows
    _shot(page, "6b-second-panel-long-answer")

    # Mark the first panel's answer where it appears: thumbs down, then Correct, edit, Save. Each click is stored
    # at once in the feedback store, with the answer beside the correction.
    marks = page.locator(".sage-chat").nth(0).locator(".sage-marks").first  # warm ask 5: the exact phrase
    marks.locator("button[title='Bad answer']").click()
    marks.get_by_text("marked bad").wait_for(timeout=10_000)
    marks.get_by_role("button", name="Correct", exact=True).click()
    editor = marks.locator("textarea")
    editor.wait_for(timeout=10_000)
    assert editor.input_value() == DEMO_ANSWERS["demo_expert"]  # the answer, ready to edit
    editor.fill("I am a careful expert, corrected in the browser.")
    marks.get_by_role("button", name="Save correction", exact=True).click()
    marks.get_by_text("correction saved").wait_for(timeout=10_000)
    _shot(page, "6c-answer-marked-and-corrected")
    from sage_magic.feedback.data import feedback_rows
    from sage_magic.feedback.store import FeedbackStore

    (row,) = [r for r in feedback_rows(FeedbackStore(settings.home), "demo_expert")
              if r["correction"] == "I am a careful expert, corrected in the browser."]
    assert row["rating"] == "bad" and row["answer"] == DEMO_ANSWERS["demo_expert"] and row["prompt"] == DEMO_PROMPT
    assert row["notebook"].endswith(".ipynb") and Path(row["notebook"]).is_file()  # the notebook it was made in


def test_chat_panel_enter_sends_and_stop_keeps_the_partial_answer(page, lab_for, fresh_settings: Settings) -> None:
    """Step 3. The demo fine-tunes answer in 7 tokens (measured: every prompt, max_tokens 1000, finish
    "stop"), too short to press Stop in; so the long answer comes from tests.test_magics.FakeServer, a slow
    OpenAI-compatible stream (300 words, 0.05 s apart), reached with --backend openai."""
    from tests.test_magics import FakeServer

    fake = FakeServer(words=300, delay=0.05)
    try:
        lab = lab_for(fresh_settings)
        _open_lab(page, lab)
        _run_in_new_notebook(page, f"%load_ext sage_magic\n%sage_chat {fake.line}")
        box = page.locator(".sage-chat textarea.sage-chat-input")
        box.wait_for(timeout=120_000)
        assert page.locator(".sage-chat-gone").is_hidden()  # the live panel hides its "kernel gone" note
        # Typed while the kernel is busy: the front end then holds back state updates but not messages, which
        # once let Enter ask the half-typed text (CI: "about tenso").
        page.evaluate("() => { window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                      ".requestExecute({code: 'import time; time.sleep(3)'}); }")
        box.click()
        box.type("Tell me a long story")
        box.press("Shift+Enter")  # a new line, not a send
        box.type("about tensors.")
        assert box.input_value() == "Tell me a long story\nabout tensors."
        assert not fake.requests
        box.press("Enter")  # sends
        _last_answer(page).filter(has_text="w5").wait_for(timeout=30_000)
        assert box.input_value() == ""  # the asked text left the input
        page.locator(".sage-chat button", has_text="Stop").click()
        page.locator(".sage-chat .sage-status", has_text="stopped").wait_for(timeout=10_000)
        last = _last_answer(page).inner_text()
        assert "w5" in last and "w299" not in last and "stopped" in last
        assert fake.requests[-1]["messages"][-1]["content"] == "Tell me a long story\nabout tensors."
        _shot(page, "7-stopped-partial-kept")

        # the kernel restarts; the saved notebook is opened again: the panel must say its kernel is gone
        page.evaluate("""async () => {
            const panel = window.jupyterapp.shell.currentWidget;
            await panel.context.save();
            await panel.sessionContext.session.kernel.restart();
        }""")
        page.reload()
        page.wait_for_function("() => window.jupyterapp !== undefined", timeout=60_000)
        page.evaluate("async () => { await window.jupyterapp.restored; }")
        page.evaluate("async () => { await window.jupyterapp.commands.execute('docmanager:open', "
                      "{path: 'Untitled.ipynb'}); }")
        # settled: the widget manager has given up on the panel's model, and the note the live panel hid shows
        area = page.locator(".jp-OutputArea").last
        area.filter(has_text="Error displaying widget").wait_for(timeout=30_000)
        area.locator(".sage-chat-gone").wait_for(state="visible", timeout=10_000)
        shown = area.inner_text()
        print("re-displayed after a restart:", repr(shown))
        assert "belonged to a kernel that has stopped" in shown
        _shot(page, "8-panel-after-kernel-restart")
    finally:
        fake.close()
