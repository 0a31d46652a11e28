"""CLI benchmark: the wall time of whole `sage` processes, next to the floor of starting Python at all.

People call `sage ps`, `sage stop` and `sage logs` often and from scripts, so what they wait for is the
whole process: interpreter start, imports, parsing, the registry, output. Each command runs N times as a
child process, round-robin with the floors (`python -c pass` and `python -c "import sage_magic"`) so that
load on the machine hits all alike; median, min and max are printed with the ratio to `python -c pass` and
the goal. A missed goal does not fail the run; a command that fails or prints the wrong thing does (exit 1).
Compiled modules are cached for the children (in the temp dir), as an installed package has them; the
warm-up run fills that cache. `--no-bytecode-cache` measures a checkout run with PYTHONDONTWRITEBYTECODE
instead, where every process compiles sage_magic's modules again.

Everything runs on a private, empty registry and home in a temp dir (a finished server's log is planted
there, so `sage logs ID` has one to show), except the list commands, which read --home when given.

    python benchmarks/cli_bench.py --short                       # CI: 9 runs each, ~10 s
    python benchmarks/cli_bench.py --runs 31                      # more runs
    python benchmarks/cli_bench.py --runtime-dir /tmp/sage_magic-0  # also `sage ps` beside servers running there
    python benchmarks/cli_bench.py --serve --home /tmp/mydemo     # start the demo base for that (~1 min)
    python benchmarks/cli_bench.py --compare /path/to/other/checkout  # the same commands on other code, beside
    python benchmarks/cli_bench.py --short --no-bytecode-cache    # every process compiles sage_magic again
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from notebook_bench import bytecode_env

if TYPE_CHECKING:
    from sage_magic.serving.leases import Lease
    from sage_magic.serving.manager import Manager

ROOT = Path(__file__).resolve().parent.parent
GOAL_MS = 100.0
#: A finished server's id whose log the run plants (logs outlive their server: `sage logs ID` still works).
PLANTED = "0badc0de"
PLANTED_LINE = "ValueError: the cause the benchmark planted"

#: What each command prints on the empty registry: a run that prints otherwise is an error, not a figure.
#: (label, argv, expected exit status, text that must be in stdout + stderr, goal applies)
COMMANDS: tuple[tuple[str, tuple[str, ...], int, str, bool], ...] = (
    ("sage ps", ("ps",), 0, "No model servers are running.", True),
    ("sage ps --json", ("ps", "--json"), 0, "[]", True),
    ("sage stop --all", ("stop", "--all"), 0, "No model servers were running.", True),
    ("sage stop ID (nothing running)", ("stop", "feedface"), 2, "No running server matches 'feedface'", True),
    ("sage logs (list)", ("logs",), 0, PLANTED, True),
    ("sage logs ID", ("logs", PLANTED, "-n", "1"), 0, PLANTED_LINE, True),
    ("sage --help", ("--help",), 0, "index", False),
    ("sage chat --help", ("chat", "--help"), 0, "--finetune-model", False),
    ("sage finetune list", ("finetune", "list"), 0, "", False),
    ("sage index list", ("index", "list"), 0, "", False),
)


@dataclass
class Timed:
    """One row: a command line and its wall times in seconds."""

    label: str
    argv: list[str]
    env: dict[str, str]
    goal: bool
    status: int = 0
    expect: str = ""
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # the child's user + system time: less swayed by load

    def run(self) -> str:
        """One run; returns its output when it is not what the row expects (else "")."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = subprocess.run(self.argv, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             cwd=self.env["SAGE_HOME"])  # not a checkout: `python -m` puts the cwd first on sys.path
        self.times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        text = out.stdout + out.stderr
        if out.returncode != self.status or self.expect not in text:
            return f"{self.label}: exit {out.returncode} (expected {self.status}), output:\n{text[-1500:]}"
        return ""


def entry_script() -> str | None:
    """The `sage` console script of this interpreter's environment (what a user types), if installed."""
    beside = Path(sys.executable).with_name("sage")
    return str(beside) if beside.exists() else shutil.which("sage")


def child_env(code: Path, runtime: Path, home: Path, cache: Path | None) -> dict[str, str]:
    """The children run the sage_magic of ``code`` (PYTHONPATH wins over an installed copy), on our folders,
    with compiled modules cached in ``cache`` (None: compiled again in every run, see bytecode_env)."""
    env = {k: v for k, v in bytecode_env(str(cache), cache is not None).items()
           if not k.startswith("SAGE_DEBUG_")}
    env.update(PYTHONPATH=str(code), SAGE_RUNTIME_DIR=str(runtime), SAGE_HOME=str(home))
    return env


def plant_log(runtime: Path) -> None:
    """A finished server's log, written the way the launcher writes one."""
    from sage_magic.serving import logs as server_logs
    from sage_magic.serving.registry import Registry

    registry = Registry(runtime)
    with registry.locked():
        path = registry.log_path(PLANTED)
        server_logs.create(path, PLANTED, "demo_expert (base) from /models/sage-demo-base")
    with open(path, "a") as log:
        log.write(f"INFO the server starts\n{PLANTED_LINE}\n")


def rows_for(code: Path, runtime: Path, home: Path, list_home: Path, cache: Path | None,
             tag: str = "") -> list[Timed]:
    env, list_env = child_env(code, runtime, home, cache), child_env(code, runtime, list_home, cache)
    python = [sys.executable, "-m", "sage_magic.cli.main"]
    rows = [Timed(f"{label}{tag}", [*python, *argv], list_env if "list" in argv else env, goal and not tag, status,
                  expect) for label, argv, status, expect, goal in COMMANDS]
    script = entry_script()
    if script and not tag:  # the console script imports the same code; `python -m` adds runpy
        rows.insert(1, Timed("sage ps (console script)", [script, "ps"], env, True, 0, "No model servers"))
    return rows


def running_rows(code: Path, runtime: Path, home: Path, cache: Path | None) -> list[Timed]:
    """`sage ps` and `sage logs ID` beside the servers of ``runtime`` (read only: nothing is stopped there)."""
    from sage_magic.serving.registry import Registry

    records = Registry(runtime).all()
    if not records:
        return []
    env = child_env(code, runtime, home, cache)
    python = [sys.executable, "-m", "sage_magic.cli.main"]
    first = records[0].id
    return [Timed(f"sage ps ({len(records)} server(s) running)", [*python, "ps"], env, True, 0, first),
            Timed("sage logs ID (running server)", [*python, "logs", first, "-n", "5"], env, True, 0, "")]


def report(rows: list[Timed], floors: list[Timed]) -> bool:
    """Print the floors and the table (median, min, max; the median over `python -c pass` as a ratio and over
    `import sage_magic` in ms); True when every row with a goal met it."""
    bare, package = (statistics.median(f.times) for f in floors)
    print(f"{'':<40} {'median':>8} {'min':>7} {'max':>7} {'x pass':>7} {'- import':>9} {'cpu':>7}  goal")
    all_met = True
    for row in floors + rows:
        med = statistics.median(row.times)
        goal = ""
        if row.goal:
            met = med * 1000 <= GOAL_MS
            all_met &= met
            goal = f"<= {GOAL_MS:.0f} ms: {'met' if met else 'MISSED'}"
        print(f"{row.label:<40} {med * 1000:6.1f}ms {min(row.times) * 1000:5.1f}ms {max(row.times) * 1000:5.1f}ms "
              f"{med / bare:6.2f}x {(med - package) * 1000:+7.1f}ms {statistics.median(row.cpu) * 1000:5.1f}ms  {goal}")
    return all_met


def loaded_modules(env: dict[str, str], argv: list[str]) -> str:
    """The top-level modules one command imports beyond the standard library, and how many sage_magic ones."""
    probe = ("import sys\nfrom sage_magic.cli.main import main\nmain(sys.argv[1:])\n"
             "names = {m.split('.')[0] for m in sys.modules}\n"
             "extra = sorted(n for n in names if n not in sys.stdlib_module_names and not n.startswith('_'))\n"
             "ours = sum(m.startswith('sage_magic') for m in sys.modules)\n"
             "print('@@', ' '.join(n for n in extra if n != 'sage_magic'), f'(+ {ours} sage_magic modules)')\n")
    out = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True,
                         cwd=env["SAGE_HOME"])
    line = next((x for x in out.stdout.splitlines() if x.startswith("@@")), "@@ (probe failed)")
    return line[3:] or "none"


def serve(home: Path, runtime: Path, workdir: Path) -> tuple[Manager, Lease]:
    """Start the demo base (demo_expert on it) on ``runtime``, from a copy of ``home``, for the running-server
    rows; the caller releases the lease and stops the server."""
    from sage_magic.core.config import Settings
    from sage_magic.serving.manager import Manager

    copy = workdir / "home"
    shutil.copytree(home, copy)
    settings = Settings.from_env(environ={}, home=copy, runtime_dir=runtime,
                                 vllm_args=("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M"))
    manager = Manager(settings)
    started = time.monotonic()
    lease = manager.serve_finetune("demo_expert")
    print(f"demo base server for demo_expert ready in {time.monotonic() - started:.1f} s", flush=True)
    return manager, lease


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="9 runs per command (CI)")
    parser.add_argument("--runs", type=int, default=None, help="runs per command (default 21; --short 9)")
    parser.add_argument("--home", type=Path, help="SAGE_HOME for `finetune list`/`index list` (read only), and the "
                                                  "demo home --serve copies (default: an empty home)")
    parser.add_argument("--runtime-dir", type=Path, help="also time `sage ps` and `sage logs ID` on this registry, "
                                                         "beside the servers running there (nothing is stopped)")
    parser.add_argument("--serve", action="store_true", help="start the demo base in a private registry for those "
                                                             "rows (needs --home with the demo, and vLLM)")
    parser.add_argument("--compare", type=Path, help="another checkout: its sage_magic is timed beside this one")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="every process compiles sage_magic again, as a checkout with PYTHONDONTWRITEBYTECODE does")
    args = parser.parse_args()
    runs = args.runs or (9 if args.short else 21)
    if args.serve and args.home is None:
        parser.error("--serve needs --home (a folder with the demo: `sage finetune demo --home DIR`)")

    with tempfile.TemporaryDirectory(prefix="sage-cli-bench-") as tmp:
        workdir = Path(tmp)
        runtime, home = workdir / "run", workdir / "home-empty"
        home.mkdir()
        plant_log(runtime)
        list_home = args.home or home
        cache = None if args.no_bytecode_cache else workdir / "pycache"
        env = child_env(ROOT, runtime, home, cache)
        floors = [Timed("python -c pass", [sys.executable, "-c", "pass"], env, False),
                  Timed("python -c 'import sage_magic'", [sys.executable, "-c", "import sage_magic"], env, False)]
        rows = rows_for(ROOT, runtime, home, list_home, cache)
        if args.compare:
            rows += rows_for(args.compare.resolve(), runtime, home, list_home, cache, tag=" [compare]")
        manager = lease = None
        try:
            if args.serve:
                served = workdir / "served"
                manager, lease = serve(args.home, served, workdir)
                rows += running_rows(ROOT, served, home, cache)
            if args.runtime_dir:
                found = running_rows(ROOT, args.runtime_dir, home, cache)
                if not found:
                    print(f"(no server runs in {args.runtime_dir}: no running-server rows)")
                rows += found
            every = floors + rows
            errors = [e for e in (row.run() for row in every) if e]  # a warm-up run, checked
            for row in every:
                row.times.clear()
                row.cpu.clear()
            for _ in range(runs):
                errors += [e for e in (row.run() for row in every) if e]
        finally:
            if lease is not None:
                lease.release()
            if manager is not None:
                manager.stop_all()
                manager.close(wait=True)
        print(f"{runs} runs each, round-robin, on {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}); "
              f"sage_magic from {ROOT}; bytecode {'compiled in every run' if cache is None else 'cached (installed)'}")
        all_met = report(rows, floors)
        for argv in (["ps"], ["logs", PLANTED]):
            print(f"`sage {' '.join(argv)}` imports beyond the standard library: {loaded_modules(env, argv)}")
        print(f"goal (sage ps, stop, logs <= {GOAL_MS:.0f} ms median): {'met' if all_met else 'MISSED'}")
    for error in errors[:5]:
        print(f"ERROR {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
