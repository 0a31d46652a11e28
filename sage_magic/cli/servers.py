"""`sage ps`, `sage stop`, `sage logs`: see and control the model servers sage_magic started.

They act on the registry through serving/servers.py and serving/logs.py, not through the manager: they hold
no lease, and the manager's imports (launching, merging, the HTTP client) would double what people wait for
when they call these from scripts (benchmarks/cli_bench.py).
"""

from __future__ import annotations

import argparse
import json
import time

from ..core.config import Settings
from ..faces.options import positive_lines
from ..faces.text import FOLDED_HINT, SERVER_HEADERS, adapter_lists, server_rows, table
from ..serving import logs as server_logs
from ..serving import servers
from ..serving.registry import Registry


def define_ps(ps: argparse.ArgumentParser) -> None:
    """`sage ps`'s options (main.COMMANDS)."""
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.add_argument("--all", action="store_true", help="list every adapter of a base server under the table "
                                                       "(the table folds long lists)")
    ps.set_defaults(run=run_ps)


def define_stop(stop: argparse.ArgumentParser) -> None:
    """`sage stop`'s options (main.COMMANDS)."""
    target = stop.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="server id (or a unique prefix, or a served name); the name of an "
                                              "adapter unloads only that adapter")
    target.add_argument("--all", action="store_true", help="stop every server sage_magic started")
    stop.set_defaults(run=run_stop)


def define_logs(logs: argparse.ArgumentParser) -> None:
    """`sage logs`'s options (main.COMMANDS)."""
    logs.add_argument("id", nargs="?", help="server id (or a unique prefix, or a running server's name); "
                                            "without it, list the logs kept")
    logs.add_argument("-n", "--lines", type=positive_lines, default=50, help="how many lines (default 50)")
    logs.set_defaults(run=run_logs)


def run_ps(args: argparse.Namespace, settings: Settings) -> int:
    statuses = servers.statuses(Registry(settings.runtime_dir))
    if args.json:
        print(json.dumps([s.as_dict() for s in statuses], indent=2))
        return 0
    if not statuses:
        print("No model servers are running.")
        return 0
    print(table(server_rows(statuses), SERVER_HEADERS))
    folded = adapter_lists(statuses)
    if folded:
        print(f"\n{folded}" if args.all else f"({FOLDED_HINT})")
    return 0


def run_stop(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.runtime_dir)
    if not args.all:
        print(servers.stop_target(registry, args.id, settings.stop_grace))
        return 0
    stopped = servers.stop_all(registry, settings.stop_grace)
    for record in stopped:
        print(f"stopped {record.id} ({record.served_name})")
    if not stopped:
        print("No model servers were running.")
    return 0


def run_logs(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.runtime_dir)
    if args.id:
        print(server_logs.log_tail(server_logs.find(registry, args.id), args.lines))
        return 0
    found = server_logs.entries(registry)
    if not found:
        print("No server logs are kept.")
        return 0
    rows = [(e.server_id, "running" if e.running else "ended",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified)), f"{e.size / 1024:.0f} KiB", e.about or "-")
            for e in found]
    print(table(rows, ("ID", "STATE", "LAST WRITE", "SIZE", "SERVED")))
    print(f"`sage logs ID` shows one. Kept: the {server_logs.KEEP_LOGS} newest, at most "
          f"{server_logs.KEEP_SECONDS // 86400} days.")
    return 0
