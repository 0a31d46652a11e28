"""Thin HTTP handlers over the engine: every decision (which record, whether a pid is ours) is the engine's.

Routes (under the server's base URL, authenticated like every Jupyter route; POSTs need the XSRF token).
Each is also authorized on the resource ``sage`` (:data:`AUTH_RESOURCE`): the GETs need the action "read",
the POSTs "write", so a deployment's Authorizer can make a user read-only (they see servers, cannot stop them):

    GET  /sage-magic/servers                 running model servers (no API key, ever)
    POST /sage-magic/servers/ID/stop         stop one server, by its exact registry id
    POST /sage-magic/servers/stop-all        stop every server of the registry
    GET  /sage-magic/servers/ID/log?lines=N  the tail of that server's own log file
    GET  /sage-magic/finetunes               the fine-tune catalog
    GET  /sage-magic/indexes                 the document indexes

A server is only ever named by its registry id; its log is the path its registry record holds, so no
request can name a file or a pid. The GETs change nothing (the sidebar polls them, a read-only user may send
them, and a GET carries no XSRF token): a server whose supervisor died is listed as "stale", and only a stop
(or the next launch, or the supervisor itself) cleans up.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Callable

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .. import rag
from ..core.errors import NotFound, SageError
from ..finetune.catalog import list_finetunes
from ..serving.manager import Manager
from ..serving.registry import ServerRecord

MAX_LOG_LINES = 2000
#: What an Authorizer is asked about for every route here (actions: "read" for GETs, "write" for POSTs).
AUTH_RESOURCE = "sage"


class EngineError(web.HTTPError):
    """An engine SageError on its way to the client: its one-paragraph message becomes the JSON reply."""

    def __init__(self, error: SageError, status: int | None = None) -> None:
        super().__init__(status or (404 if isinstance(error, NotFound) else 409))
        self.sage_message = str(error)


class _Base(APIHandler):
    """Shared plumbing: the manager, engine errors as JSON, and blocking engine calls off the event loop."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, manager: Manager) -> None:
        self.manager = manager

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, EngineError):
            self.finish({"message": error.sage_message})
        else:
            super().write_error(status_code, **kwargs)

    def record(self, server_id: str) -> ServerRecord:
        """The record with exactly this id (never a prefix, a name or a path)."""
        record = self.manager.registry.get(server_id)
        if record is None:
            raise EngineError(NotFound(f"No running server has id {server_id!r}. GET /sage-magic/servers "
                                       "lists them."))
        return record

    async def engine(self, call: Callable[..., Any], *args: Any) -> Any:
        """Run an engine call off the event loop (stopping waits seconds for a supervisor)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, call, *args)
        except SageError as error:  # e.g. the server stopped on its own meanwhile
            raise EngineError(error) from None


class ServersHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        statuses = await self.engine(self.manager.servers)
        self.finish({"servers": [s.as_dict() for s in statuses]})


class StopHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self, server_id: str) -> None:
        stopped = await self.engine(self.manager.stop, self.record(server_id).id)
        self.finish({"stopped": [stopped.id]})


class StopAllHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        stopped = await self.engine(self.manager.stop_all)
        self.finish({"stopped": [r.id for r in stopped]})


class LogHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self, server_id: str) -> None:
        try:
            lines = min(max(int(self.get_argument("lines", "200")), 1), MAX_LOG_LINES)
        except ValueError:
            raise EngineError(SageError(f"lines must be a whole number from 1 to {MAX_LOG_LINES}."), 400) from None
        record = self.record(server_id)
        text = await self.engine(self.manager.logs, record.id, lines)
        self.finish({"id": record.id, "lines": lines, "log": text})


class FinetunesHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        entries = await self.engine(list_finetunes, self.manager.settings)
        self.finish({"finetunes": [e.as_dict() for e in entries]})


class IndexesHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        infos = await self.engine(rag.list_indexes, self.manager.settings)
        self.finish({"indexes": [{k: v for k, v in asdict(i).items() if k != "sources"} for i in infos]})


def setup_handlers(web_app: Any, manager: Manager) -> None:
    base = url_path_join(web_app.settings["base_url"], "sage-magic")
    server_id = r"(?P<server_id>[^/]+)"  # any segment: the registry decides what is an id
    routes: list[tuple[str, type[_Base]]] = [
        ("servers", ServersHandler),
        ("servers/stop-all", StopAllHandler),
        (f"servers/{server_id}/stop", StopHandler),
        (f"servers/{server_id}/log", LogHandler),
        ("finetunes", FinetunesHandler),
        ("indexes", IndexesHandler),
    ]
    web_app.add_handlers(".*$", [(url_path_join(base, path), handler, {"manager": manager})
                                 for path, handler in routes])
