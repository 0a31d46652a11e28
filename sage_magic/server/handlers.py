"""Thin HTTP handlers over the engine: every decision (which record, whether a pid is ours) is the engine's.

Routes (under the server's base URL, authenticated like every Jupyter route; POSTs need the XSRF token):

    GET  /sage-magic/servers                 running model servers (no API key, ever)
    POST /sage-magic/servers/ID/stop         stop one server, by its exact registry id
    POST /sage-magic/servers/stop-all        stop every server of the registry
    GET  /sage-magic/servers/ID/log?lines=N  the tail of that server's own log file
    GET  /sage-magic/finetunes               the fine-tune catalog
    GET  /sage-magic/indexes                 the document indexes

A server is only ever named by its registry id; its log is the path its registry record holds, so no
request can name a file or a pid.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Callable

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .. import rag
from ..catalog import list_finetunes
from ..errors import NotFound, SageError
from ..manager import Manager
from ..registry import ServerRecord

MAX_LOG_LINES = 2000


class _Base(APIHandler):
    """Shared plumbing: the manager, engine errors as JSON, and blocking engine calls off the event loop."""

    def initialize(self, manager: Manager) -> None:
        self.manager = manager

    def reply_error(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish({"message": message})

    def record(self, server_id: str) -> ServerRecord | None:
        """The record with exactly this id; answers 404 itself when there is none."""
        record = self.manager.registry.get(server_id)
        if record is None:
            self.reply_error(404, f"No running server has id {server_id!r}. GET /sage-magic/servers lists them.")
        return record

    async def off_loop(self, call: Callable[..., Any], *args: Any) -> Any:
        """Stopping waits for the supervisor (seconds); the server's event loop must not wait with it."""
        return await asyncio.get_running_loop().run_in_executor(None, call, *args)


class ServersHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        statuses = await self.off_loop(self.manager.servers)
        self.finish({"servers": [s.as_dict() for s in statuses]})


class StopHandler(_Base):
    @web.authenticated
    async def post(self, server_id: str) -> None:
        record = self.record(server_id)
        if record is None:
            return
        try:
            stopped = await self.off_loop(self.manager.stop, record.id)
        except NotFound:  # it went away on its own between the lookup and the stop
            self.reply_error(404, f"Server {record.id} is not running any more.")
            return
        self.finish({"stopped": [stopped.id]})


class StopAllHandler(_Base):
    @web.authenticated
    async def post(self) -> None:
        stopped = await self.off_loop(self.manager.stop_all)
        self.finish({"stopped": [r.id for r in stopped]})


class LogHandler(_Base):
    @web.authenticated
    async def get(self, server_id: str) -> None:
        try:
            lines = min(max(int(self.get_argument("lines", "200")), 1), MAX_LOG_LINES)
        except ValueError:
            self.reply_error(400, f"lines must be a whole number from 1 to {MAX_LOG_LINES}.")
            return
        record = self.record(server_id)
        if record is None:
            return
        try:
            text = await self.off_loop(self.manager.logs, record.id, lines)
        except NotFound:
            self.reply_error(404, f"Server {record.id} is not running any more.")
            return
        self.finish({"id": record.id, "lines": lines, "log": text})


class FinetunesHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        entries = await self.off_loop(list_finetunes, self.manager.settings)
        self.finish({"finetunes": [e.as_dict() for e in entries]})


class IndexesHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        try:
            infos = await self.off_loop(rag.list_indexes, self.manager.settings)
        except SageError as error:  # e.g. an index folder written by a newer version
            self.reply_error(500, str(error))
            return
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
