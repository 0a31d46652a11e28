"""Jupyter Server extension: the engine's registry and catalog over HTTP, for the SAGE sidebar.

JupyterLab's SAGE panel lists, stops and inspects model servers through these routes, even when no kernel
runs. Enabled by ``jupyter-config/server-config/sage_magic.json`` (installed with the package). It reads
its settings (SAGE_HOME, SAGE_RUNTIME_DIR, ...) from the environment of the Jupyter server, as `sage` does.
"""

from __future__ import annotations

from typing import Any

from ..core.config import Settings
from ..serving.manager import Manager
from .handlers import setup_handlers


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "sage_magic.server"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    settings = Settings.from_env()
    setup_handlers(server_app.web_app, Manager(settings))
    server_app.log.info("sage_magic: model server routes at /sage-magic/ (registry %s)", settings.runtime_dir)
