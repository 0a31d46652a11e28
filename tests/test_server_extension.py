"""The Jupyter Server extension: /sage-magic/ routes over the engine, authenticated, authorized and
XSRF-protected.

The requests go through a real Jupyter Server (pytest-jupyter's ``jp_fetch``), with no kernel running.
Stand-in processes (``sleep``) play a stranger holding a recycled pid, a supervisor carrying a server's
mark, and the vLLM a SIGKILLed supervisor left behind: a real server cannot show those faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from jupyter_server.auth import Authorizer
from tornado.httpclient import HTTPClientError

from sage_magic.core.config import Settings
from sage_magic.server.handlers import AUTH_RESOURCE
from sage_magic.serving.registry import Owner, Registry, ServerRecord, new_server_id
from tests.conftest import wait_until

pytest_plugins = ["pytest_jupyter.jupyter_server"]

DOCS = Path(__file__).parent / "fixtures" / "rag" / "docs"


@pytest.fixture
def sage_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The home and registry the extension reads (from the server's environment, as `sage` does): the
    session's shared ones for the test marked vllm, empty private ones for the others."""
    if request.node.get_closest_marker("vllm"):
        settings: Settings = request.getfixturevalue("settings")
    else:
        settings = Settings.from_env(environ={}, home=tmp_path / "home", runtime_dir=tmp_path / "run")
    monkeypatch.setenv("SAGE_HOME", str(settings.home))
    monkeypatch.setenv("SAGE_RUNTIME_DIR", str(settings.runtime_dir))
    return settings


class ReadOnlyAuthorizer(Authorizer):
    """A deployment's policy for a user who may look at SAGE's servers but not act on them."""

    def is_authorized(self, handler, user, action: str, resource: str) -> bool:
        return resource != AUTH_RESOURCE or action == "read"


@pytest.fixture
def authorizer_class() -> type[Authorizer] | None:
    """Jupyter's default authorizer (everyone may do everything); a test parametrizes this to change it."""
    return None


@pytest.fixture
def jp_server_config(sage_env: Settings, authorizer_class: type[Authorizer] | None) -> dict:
    server_app: dict = {"jpserver_extensions": {"sage_magic.server": True}}
    if authorizer_class is not None:
        server_app["authorizer_class"] = authorizer_class
    return {"ServerApp": server_app}


def _record(registry: Registry, supervisor_pid: int, log: Path | None = None) -> ServerRecord:
    server_id = new_server_id()
    record = ServerRecord(id=server_id, kind="base", identity="x", model_path="/m", served_name="m", host="127.0.0.1",
                          port=1, api_key="the-secret-key", log_path=str(log or registry.log_path(server_id)),
                          supervisor_pid=supervisor_pid, keep_alive=0.0, started_at=time.time(),
                          owners=[Owner.this_process()])
    with registry.locked():
        registry.save(record)
    return record


def _supervised(registry: Registry) -> tuple[ServerRecord, subprocess.Popen]:
    """A record whose supervisor is alive and ours: a process carrying the server's mark stands in for it."""
    record = _record(registry, 0)
    supervisor = _sleeper(record.id)
    record.supervisor_pid = supervisor.pid
    with registry.locked():
        registry.save(record)
    return record, supervisor


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _sleeper(server_id: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("SAGE_SERVER_ID", None)
    if server_id:
        env["SAGE_SERVER_ID"] = server_id  # the launcher's mark
    return subprocess.Popen(["sleep", "60"], start_new_session=True, env=env)


async def _raw(client, auth: dict, base_url: str, path: str, **kwargs: object):
    """A request whose path is sent exactly as written (jp_fetch would escape a %2F into %252F)."""
    return await client.fetch(f"{base_url}{path}", headers=auth, raise_error=False, **kwargs)


async def _status(fetch, *parts: str, **kwargs: object) -> int:
    try:
        return (await fetch(*parts, **kwargs)).code
    except HTTPClientError as error:
        return error.code


async def test_requests_without_the_token_are_refused(jp_fetch, sage_env: Settings) -> None:
    for route in ("servers", "finetunes", "indexes"):
        assert await _status(jp_fetch, "sage-magic", route, headers={"Authorization": ""}) == 403
    assert await _status(jp_fetch, "sage-magic", "servers", "stop-all", method="POST", body="",
                         headers={"Authorization": ""}) == 403


async def test_lists_work_with_no_kernel_and_never_show_the_api_key(jp_fetch, jp_serverapp,
                                                                     sage_env: Settings) -> None:
    supervisor = _sleeper()
    try:
        record = _record(Registry(sage_env.runtime_dir), os.getpid())  # this process stands in as supervisor
        record.supervisor_pid = supervisor.pid
        response = await jp_fetch("sage-magic", "servers")
    finally:
        supervisor.kill()
        supervisor.wait()
    assert jp_serverapp.kernel_manager.list_kernel_ids() == []
    body = response.body.decode()
    assert "the-secret-key" not in body and "api_key" not in body
    (row,) = json.loads(body)["servers"]  # its supervisor is not ours: listed as stale, left for a stop
    assert row["id"] == record.id and row["state"] == "stale" and row["memory_bytes"] == 0
    assert json.loads((await jp_fetch("sage-magic", "finetunes")).body) == {"finetunes": []}
    assert json.loads((await jp_fetch("sage-magic", "indexes")).body) == {"indexes": []}


async def test_stop_needs_the_xsrf_token_with_cookie_login(jp_fetch, jp_serverapp, sage_env: Settings) -> None:
    """A browser logs in with a cookie: then a POST without the XSRF token must be refused, as Jupyter's own."""
    token = jp_serverapp.identity_provider.token
    login = await jp_fetch("login", headers={"Authorization": ""})
    xsrf = next(c.split(";")[0].split("=", 1)[1] for c in login.headers.get_list("Set-Cookie")
                if c.startswith("_xsrf="))
    logged = await jp_fetch("login", method="POST", follow_redirects=False, raise_error=False,
                            headers={"Authorization": "", "Cookie": f"_xsrf={xsrf}"},
                            body=urllib.parse.urlencode({"_xsrf": xsrf, "password": token}))
    assert logged.code == 302
    cookies = "; ".join(c.split(";")[0] for c in logged.headers.get_list("Set-Cookie")) + f"; _xsrf={xsrf}"
    browser = {"Authorization": "", "Cookie": cookies}

    record, marked = _supervised(Registry(sage_env.runtime_dir))
    try:
        assert await _status(jp_fetch, "sage-magic", "servers", headers=browser) == 200  # the cookie works
        assert await _status(jp_fetch, "sage-magic", "servers", record.id, "stop", method="POST", body="",
                             headers=browser) == 403
        assert marked.poll() is None and Registry(sage_env.runtime_dir).get(record.id) is not None
        with_xsrf = {**browser, "X-XSRFToken": xsrf}
        answer = await jp_fetch("sage-magic", "servers", record.id, "stop", method="POST", body="", headers=with_xsrf)
        assert json.loads(answer.body) == {"stopped": [record.id]}
        assert wait_until(lambda: marked.poll() is not None, 10)
        assert Registry(sage_env.runtime_dir).get(record.id) is None
    finally:
        marked.kill()
        marked.wait()


async def test_stop_all_stops_every_registered_server(jp_fetch, sage_env: Settings) -> None:
    registry = Registry(sage_env.runtime_dir)
    supervisors = [_supervised(registry)[1] for _ in range(2)]
    try:
        answer = json.loads((await jp_fetch("sage-magic", "servers", "stop-all", method="POST", body="")).body)
        assert len(answer["stopped"]) == 2
        assert wait_until(lambda: all(s.poll() is not None for s in supervisors), 10)
        assert registry.all() == []
    finally:
        for proc in supervisors:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("server_id", ["{pid}", "..%2Fevil", "..", "nope"])
async def test_an_id_not_in_the_registry_signals_nobody(jp_fetch, http_server_client, jp_auth_header, jp_base_url,
                                                        sage_env: Settings, server_id: str) -> None:
    stranger = _sleeper()
    try:
        # a record file outside servers/ naming the stranger: only a path trick could reach it
        evil = sage_env.runtime_dir / "evil.json"
        evil.parent.mkdir(parents=True, exist_ok=True)
        fake = _record(Registry(sage_env.runtime_dir), stranger.pid)
        evil.write_text(json.dumps(fake.to_json()))
        Registry(sage_env.runtime_dir).remove(fake.id)
        answer = await _raw(http_server_client, jp_auth_header, jp_base_url,
                            f"sage-magic/servers/{server_id.format(pid=stranger.pid)}/stop", method="POST", body="")
        assert answer.code == 404
        time.sleep(0.3)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


async def test_a_record_holding_a_recycled_pid_is_dropped_without_signalling(jp_fetch,
                                                                              sage_env: Settings) -> None:
    stranger = _sleeper()  # holds the pid the record names, but carries no server mark
    try:
        record = _record(Registry(sage_env.runtime_dir), stranger.pid)
        status = await _status(jp_fetch, "sage-magic", "servers", record.id, "stop", method="POST", body="")
        assert status == 200  # the record goes; the stranger is not signalled
        time.sleep(0.3)
        assert stranger.poll() is None
        assert Registry(sage_env.runtime_dir).get(record.id) is None
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("server_id", ["..%2Fevil", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "evil"])
async def test_the_log_route_reads_only_the_registry_logs(jp_fetch, http_server_client, jp_auth_header, jp_base_url,
                                                          sage_env: Settings, server_id: str) -> None:
    secret = sage_env.runtime_dir.parent / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("TOP SECRET\n")
    evil = sage_env.runtime_dir / "servers" / ".." / "evil.json"
    evil.parent.mkdir(parents=True, exist_ok=True)
    evil.write_text(json.dumps({**_record(Registry(sage_env.runtime_dir), os.getpid()).to_json(),
                                "id": "evil", "log_path": str(secret)}))
    answer = await _raw(http_server_client, jp_auth_header, jp_base_url, f"sage-magic/servers/{server_id}/log")
    body = answer.body.decode() if answer.body else ""
    assert answer.code == 404 and "No running server has id" in body
    assert "TOP SECRET" not in body and "root:" not in body


async def test_log_tail_of_a_registered_server(jp_fetch, sage_env: Settings) -> None:
    registry = Registry(sage_env.runtime_dir)
    record, marked = _supervised(registry)
    Path(record.log_path).write_text("".join(f"line {i}\n" for i in range(500)))
    try:
        answer = json.loads((await jp_fetch("sage-magic", "servers", record.id, "log", params={"lines": "3"})).body)
        assert answer["log"] == "line 497\nline 498\nline 499"
        assert await _status(jp_fetch, "sage-magic", "servers", record.id, "log", params={"lines": "x"}) == 400
    finally:
        marked.kill()
        marked.wait()


async def test_listing_a_server_whose_supervisor_died_kills_and_deletes_nothing(jp_fetch,
                                                                               sage_env: Settings) -> None:
    """A SIGKILLed supervisor leaves its record, and its vLLM may still run (here a process with the
    server's mark, in its own process group as vLLM is). A GET used to reap: kill that group and delete the
    record. Now only the explicit stop does."""
    registry = Registry(sage_env.runtime_dir)
    record = _record(registry, _dead_pid())
    server = _sleeper(record.id)
    record.pid = server.pid
    with registry.locked():
        registry.save(record)
    try:
        for _ in range(2):  # the sidebar polls
            (row,) = json.loads((await jp_fetch("sage-magic", "servers")).body)["servers"]
            assert row["id"] == record.id and row["state"] == "stale" and row["pid"] == server.pid
        assert server.poll() is None and registry.get(record.id) is not None
        answer = await jp_fetch("sage-magic", "servers", record.id, "stop", method="POST", body="")
        assert json.loads(answer.body) == {"stopped": [record.id]}
        assert wait_until(lambda: server.poll() is not None, 20)
        assert registry.get(record.id) is None
        assert json.loads((await jp_fetch("sage-magic", "servers")).body)["servers"] == []
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("authorizer_class", [ReadOnlyAuthorizer])
async def test_a_read_only_user_may_list_but_not_stop(jp_fetch, sage_env: Settings,
                                                      authorizer_class: type[Authorizer]) -> None:
    registry = Registry(sage_env.runtime_dir)
    record, supervisor = _supervised(registry)
    try:
        (row,) = json.loads((await jp_fetch("sage-magic", "servers")).body)["servers"]
        assert row["id"] == record.id and row["state"] == "starting"
        for route in (("finetunes",), ("indexes",), ("servers", record.id, "log")):
            assert await _status(jp_fetch, "sage-magic", *route) == 200
        for action in ((record.id, "stop"), ("stop-all",)):
            assert await _status(jp_fetch, "sage-magic", "servers", *action, method="POST", body="") == 403
        assert supervisor.poll() is None and registry.get(record.id) is not None
        assert json.loads((await jp_fetch("sage-magic", "servers")).body)["servers"][0]["state"] == "starting"
    finally:
        supervisor.kill()
        supervisor.wait()


async def test_a_server_with_a_hundred_adapters_lists_each_once_and_counts_kernels(jp_fetch,
                                                                                   sage_env: Settings) -> None:
    """The sidebar folds the list itself (labextension/src/panel.ts); the route must give it every name, sorted,
    and count the kernels using the server, not the lease each holds per fine-tune."""
    registry = Registry(sage_env.runtime_dir)
    record = _record(registry, os.getpid())
    names = [f"ft_{i:03d}" for i in range(100)]
    record.adapters = {n: {"path": f"/ft/{n}", "fingerprint": "f"} for n in reversed(names)}
    record.owners = [Owner.this_process(f"lease-{n}") for n in names]
    with registry.locked():
        registry.save(record)
    (row,) = json.loads((await jp_fetch("sage-magic", "servers")).body)["servers"]
    assert row["adapters"] == names and row["owners"] == 1 and row["leases"] == 100


@pytest.mark.vllm
async def test_lists_the_running_shared_server(jp_fetch, sage_env: Settings, request: pytest.FixtureRequest) -> None:
    """Against the session's real vLLM server (sage_env points at its registry): the row the sidebar shows."""
    endpoint = request.getfixturevalue("expert")
    answer = await jp_fetch("sage-magic", "servers")
    body = answer.body.decode()
    assert endpoint.api_key not in body
    (row,) = [s for s in json.loads(body)["servers"] if s["id"] == endpoint.server_id]
    assert row["name"] == "sage-demo-base" and "demo_expert" in row["adapters"]
    assert row["state"] == "ready" and row["owners"] >= 1 and row["memory_bytes"] > 0 and row["pid"] > 0
    assert row["port"] or row["socket"]
    log = json.loads((await jp_fetch("sage-magic", "servers", endpoint.server_id, "log",
                                     params={"lines": "2000"})).body)["log"]
    assert "Application startup complete" in log  # the shared server has logged many requests since its start
    names = [f["name"] for f in json.loads((await jp_fetch("sage-magic", "finetunes")).body)["finetunes"]]
    assert {"demo_expert", "demo_poet"} <= set(names)


@pytest.mark.rag
def test_listing_indexes_loads_no_torch(tmp_path: Path) -> None:
    """The index list (the sidebar polls it) reads manifests only: the Jupyter server must not load torch."""
    from sage_magic import rag

    settings = Settings.from_env(environ={}, home=tmp_path / "home", runtime_dir=tmp_path / "run")
    rag.add(settings, "docs", [str(DOCS)])
    code = ("import json, sys; from sage_magic.core.config import Settings; import sage_magic.server; "
            "from sage_magic.server.handlers import rag; "
            "print(json.dumps([[i.name, i.files] for i in rag.list_indexes(Settings.from_env())])); "
            "print(json.dumps([m for m in ('torch', 'sentence_transformers', 'faiss', 'numpy') if m in sys.modules]))")
    env = {**os.environ, "SAGE_HOME": str(settings.home), "SAGE_RUNTIME_DIR": str(settings.runtime_dir)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    listed, heavy = (json.loads(line) for line in out.stdout.splitlines())
    assert listed == [["docs", 6]] and heavy == []
