"""The RAG helper process: ``python -m sage_magic.rag.worker --parent PID`` answers searches for one parent.

Why a process of its own: embedding a query needs the MiniLM model on ONNX Runtime or torch (seconds to import
and load, hundreds of MB) and FAISS. A notebook kernel should pay none of that, and a crash in their native code must
not take the kernel down with it. :class:`sage_magic.rag.service.SearchService` starts this process on
first use and keeps it, so the model and the opened indexes stay warm between questions.

Protocol: one JSON object per line, requests on stdin, answers on stdout, in request order::

    > {"id": 7, "op": "search", "settings": {"home": ..., "runtime_dir": ..., "embedder": null,
       "embed_backend": null},
       "index": "docs", "query": "...", "top_k": 4, "mode": "hybrid"}
    < {"id": 7, "hits": [{"source": ..., "location": ..., "score": ..., "text": ..., "chunk_id": ...}]}
    < {"id": 7, "error": {"type": "NotFound", "message": "..."}}   a SageError: the parent raises the same
    < {"id": 7, "error": {"type": null, "message": "Traceback..."}}  anything else: a bug, shown whole
    > {"id": 8, "op": "warm", "settings": {...}, "index": "docs"}    load the model (and the index) ahead
    < {"id": 8, "pid": 1234}

Lifetime: stdin doubles as the death pipe. Only the parent holds its write end, so EOF means the parent is
gone, however it died, and the loop ends. PR_SET_PDEATHSIG (as in supervisor.py) also ends a worker that is
busy in native code when its parent dies. fd 1 is pointed at stderr once the protocol has its own copy of
it, so a library that prints cannot corrupt the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from ..core.config import Settings
from ..core.errors import SageError
from ..core.processes import die_with_parent
from . import store
from .embedder import load_embedder
from .search import search


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (never raises: every failure becomes an error answer)."""
    answer: dict[str, Any] = {"id": request.get("id")}
    try:
        given = request["settings"]
        settings = Settings(home=Path(given["home"]), runtime_dir=Path(given["runtime_dir"]),
                            embedder=given.get("embedder"), embed_backend=given.get("embed_backend"))
        if request["op"] == "search":
            hits = search(settings, request["index"], request["query"], request["top_k"], request["mode"])
            answer["hits"] = [asdict(hit) for hit in hits]
        elif request["op"] == "warm":
            if request.get("index"):
                reader = store.open_reader(settings, request["index"])
                load_embedder(store.embedder_for(reader.manifest, settings))
            answer["pid"] = os.getpid()
        else:
            raise ValueError(f"unknown op {request['op']!r}")
    except SageError as error:
        answer["error"] = {"type": type(error).__name__, "message": str(error)}
    except Exception:  # noqa: BLE001 - a bug: its traceback goes back to the caller instead of killing the worker
        answer["error"] = {"type": None, "message": traceback.format_exc()}
    return answer


def serve(requests: IO[bytes], answers: IO[str]) -> None:
    """Answer requests until the parent closes our stdin."""
    for line in requests:
        try:
            request = json.loads(line)
        except ValueError:
            request = {"id": None, "op": None}
        answers.write(json.dumps(handle(request)) + "\n")
        answers.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_magic.rag.worker")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process this worker serves")
    args = parser.parse_args(argv)
    die_with_parent()
    if os.getppid() != args.parent:  # the parent died before the death signal was armed
        return 0
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
