"""Engine benchmark: what the manager costs next to driving vLLM by hand, measured on this machine.

Why a script and not a test: figures depend on the machine and its load, so they are printed with their
goals and ratios for a person (or a CI log) to read; a missed goal does not fail the run. An error does
(exit 1), and so does a vLLM process left behind, because leaking servers is a bug, not a slow figure.

Every figure comes from one run: a private home (a copy of --home, or a freshly built demo) and private
runtime folders under one temp dir, so nothing touches the user's servers or ~/.sage.

    python benchmarks/engine_bench.py --short            # CI: one cold-start pair, fewer samples
    python benchmarks/engine_bench.py --home /tmp/mydemo  # full run on a copy of an existing demo home
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sage_magic.core.config import Settings
from sage_magic.core.endpoint import Endpoint
from sage_magic.core.http import HttpError, request_text
from sage_magic.finetune.catalog import get_finetune
from sage_magic.serving.lora_slots import plan
from sage_magic.serving.manager import Manager

VLLM_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M")
MAX_LORA_RANK = 16
READY_TIMEOUT = 600.0
#: The environment the manager gives a LoRA-enabled server (launch.server_env), minus its API key.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
              "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
#: Loopback calls must not go through a configured proxy (the engine's http module does the same).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: Runs in a fresh interpreter so that "before import" means it: this process already imported the engine
#: (and torch, if it built the demo). RSS is read from /proc so that reading it imports nothing.
MEMORY_PROBE = r"""
import json, os, resource, sys
from pathlib import Path
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
out = {"before_import": rss()}
import sage_magic.serving.manager
from sage_magic.core.config import Settings
out["after_import"] = rss()
home, run, port, args = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), tuple(sys.argv[4:])
settings = Settings.from_env(environ={}, home=home, runtime_dir=run, port=port, vllm_args=args)
manager = sage_magic.serving.manager.Manager(settings)
endpoint = manager.serve_finetune("demo_expert").endpoint
out["after_serve"] = rss()
out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["reused"] = endpoint.reused
out["torch"] = "torch" in sys.modules
out["vllm"] = "vllm" in sys.modules
manager.close()
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Figure:
    """One row of the summary. ``met`` is None for figures shown for context, without a goal."""

    name: str
    value: str
    goal: str = "-"
    met: bool | None = None


@dataclass
class Run:
    """State shared by the sections: where things live, and every process group we must clean up."""

    workdir: Path
    home: Path
    base: Path
    figures: list[Figure]
    pgids: set[int]
    managers: list[Manager]
    calls: int = 30
    plain_tcp: list[float] = field(default_factory=list)  # GET /v1/models on a bare vLLM over TCP (section 5)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        met = "" if figure.met is None else f"  goal {figure.goal}: {'met' if figure.met else 'MISSED'}"
        print(f"  {figure.name}: {figure.value}{met}", flush=True)


# --- small helpers ---------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples it reports a value that was really measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def http(url: str, api_key: str | None = None, payload: dict | None = None, timeout: float = 5.0,
         socket: str | None = None) -> int:
    """A bare request, as a client that knows the server would make it; returns the HTTP status. Over the
    server's Unix socket when ``socket`` is given (the URL's host is then nominal)."""
    if socket is not None:
        try:
            request_text(url, api_key, payload, timeout, socket=socket)
            return 200
        except HttpError as error:
            if error.status is None:
                raise OSError(error.body) from None
            return error.status
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def settings_for(home: Path, runtime: Path) -> Settings:
    return Settings.from_env(environ={}, home=home, runtime_dir=runtime, port=free_port(), vllm_args=VLLM_ARGS,
                             max_lora_rank=MAX_LORA_RANK, ready_timeout=READY_TIMEOUT)


def vllm_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        text = " ".join(proc.info["cmdline"] or [])
        if "vllm" in text.lower() and proc.pid != os.getpid():
            found.append(proc)
    return found


def ours(run: Run) -> list[psutil.Process]:
    """Processes we started: their group is one we recorded, or their command line names our temp dir
    (vLLM renames EngineCore and Worker, so the group is what catches those)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            pgid = os.getpgid(proc.pid)
        except OSError:
            continue
        if proc.pid != os.getpid() and (pgid in run.pgids or str(run.workdir) in " ".join(proc.info["cmdline"] or [])):
            found.append(proc)
    return found


# --- the home ----------------------------------------------------------------------------------------------


def prepare_home(source: Path | None, workdir: Path) -> Path:
    """A private home: a copy of ``source`` (left untouched), or the demo built from scratch."""
    home = workdir / "home"
    if source is not None:
        if not (source / "finetune_output" / "demo_expert").is_dir():
            raise SystemExit(f"{source} holds no demo (finetune_output/demo_expert); build one or omit --home.")
        shutil.copytree(source, home, symlinks=True)
        print(f"home: copy of {source}", flush=True)
        return home
    from sage_magic.finetune.demo import build_demo

    result = build_demo(settings_for(home, workdir / "run-build"))
    print(f"home: demo built in {result.seconds:.1f} s", flush=True)
    return home


# --- 2. time to ready: manager vs bare vLLM ---------------------------------------------------------------


def bare_command(run: Run, port: int) -> list[str]:
    """The manager's own vLLM arguments, adapter slots included (sized from the home's fine-tunes)."""
    slots = plan(settings_for(run.home, run.workdir), run.base, VLLM_ARGS)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(run.base), "--host",
            "127.0.0.1", "--port", str(port), "--enable-lora", *slots.args(), *VLLM_ARGS]


def wait_health(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Poll /health more often than the manager does (0.1 s vs 0.5 s): this is the baseline to beat."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bare vLLM exited with {proc.returncode}; see {log}")
        try:
            if http(f"http://127.0.0.1:{port}/health", timeout=2.0) == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"bare vLLM not ready after {READY_TIMEOUT:.0f} s; see {log}")


def stop_bare(proc: subprocess.Popen) -> float:
    """SIGTERM the API server (it shuts its engine down), then its group, then SIGKILL what is left."""
    started = time.perf_counter()
    for sig, target in ((signal.SIGTERM, "leader"), (signal.SIGTERM, "group"), (signal.SIGKILL, "group")):
        try:
            os.kill(proc.pid, sig) if target == "leader" else os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.05)
        if not group_alive(proc):
            break
    return time.perf_counter() - started


def group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader: an unreaped zombie would keep its group id alive
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def time_bare(run: Run, index: int) -> float:
    port = free_port()
    log = run.workdir / f"bare-{index}.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(bare_command(run, port), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **SERVER_ENV})
    run.pgids.add(proc.pid)
    try:
        wait_health(proc, port, log)
        seconds = time.perf_counter() - started
        if not run.plain_tcp:  # the baseline of section 5, while a bare server is up anyway
            run.plain_tcp = [timed(lambda: _get_ok(f"http://127.0.0.1:{port}/v1/models", None))
                             for _ in range(run.calls)]
    finally:
        stopped = stop_bare(proc)
    print(f"  bare    #{index}: ready in {seconds:.2f} s (stopped in {stopped:.2f} s)", flush=True)
    return seconds


def time_manager(run: Run, index: int) -> tuple[float, Manager, Endpoint]:
    """Cold start through the manager, fresh runtime folder; the caller stops the server."""
    manager = Manager(settings_for(run.home, run.workdir / f"run-{index}"))
    run.managers.append(manager)
    started = time.perf_counter()
    endpoint = manager.serve_model(run.base).endpoint
    seconds = time.perf_counter() - started
    record = manager.registry.get(endpoint.server_id or "")
    if record is not None and record.pid:
        run.pgids.add(record.pid)
    print(f"  manager #{index}: ready in {seconds:.2f} s (server says {record.ready_seconds if record else '?'} s "
          f"after spawn)", flush=True)
    return seconds, manager, endpoint


def stop_manager(manager: Manager) -> float:
    return timed(lambda: (manager.stop_all(), manager.close()))


def bench_ready(run: Run, repeat: int) -> tuple[Manager, Endpoint]:
    """Alternate bare and manager starts so that drift in machine load hits both; keep the last server."""
    print(f"\n2. Time to ready, cold ({repeat} pair(s), bare first)", flush=True)
    ratios = []
    for index in range(repeat):
        bare = time_bare(run, index)
        seconds, manager, endpoint = time_manager(run, index)
        ratios.append(seconds / bare)
        run.add(Figure(f"ready ratio manager/bare #{index}", f"{ratios[-1]:.3f} ({seconds:.1f} s / {bare:.1f} s)"))
        if index < repeat - 1:
            print(f"  manager #{index}: stopped in {stop_manager(manager):.2f} s", flush=True)
    ratio = statistics.median(ratios)
    run.add(Figure("time-to-ready ratio manager/bare (median)", f"{ratio:.3f}", "<= 1.05", ratio <= 1.05))
    return manager, endpoint


# --- 3. adding an adapter to a running server ---------------------------------------------------------------


def bench_adapter(run: Run, manager: Manager, endpoint: Endpoint) -> None:
    print("\n3. Adapter added to the running base server", flush=True)
    started = time.perf_counter()
    expert = manager.serve_finetune("demo_expert").endpoint
    first = time.perf_counter() - started
    if expert.server_id != endpoint.server_id:
        raise RuntimeError("serve_finetune(demo_expert) started a new server instead of using the base one")
    run.add(Figure("serve_finetune(demo_expert), first adapter", f"{first:.3f} s"))
    second = timed(lambda: manager.serve_finetune("demo_poet").release())
    run.add(Figure("serve_finetune(demo_poet), second adapter", f"{second:.3f} s", "<= 1 s", second <= 1.0))
    # The raw part: the same adapter under a new name, straight to vLLM (the manager adds the rest).
    root = endpoint.base_url.rsplit("/v1", 1)[0]
    body = {"lora_name": "bench_raw_poet", "lora_path": str(get_finetune(manager.settings, "demo_poet").adapter_dir)}
    raw = timed(lambda: _post_ok(f"{root}/v1/load_lora_adapter", endpoint.api_key, body, endpoint.socket))
    status = http(f"{root}/v1/unload_lora_adapter", endpoint.api_key, {"lora_name": "bench_raw_poet"}, timeout=60,
                  socket=endpoint.socket)
    if status != 200:
        raise RuntimeError(f"unloading the raw adapter answered HTTP {status}")
    run.add(Figure("raw POST /v1/load_lora_adapter", f"{raw:.3f} s (manager adds {second - raw:.3f} s)"))


def _post_ok(url: str, api_key: str | None, body: dict, socket: str | None = None) -> None:
    status = http(url, api_key, body, timeout=120, socket=socket)
    if status != 200:
        raise RuntimeError(f"POST {url} answered HTTP {status}")


# --- 1. warm reuse ---------------------------------------------------------------------------------------------


def bench_reuse(run: Run, manager: Manager, endpoint: Endpoint, calls: int) -> None:
    """Each call re-resolves the fine-tune and takes and releases a lease, as a notebook cell run again would.
    The floor is a bare ``GET /v1/models`` to the same server over the same socket: one round trip, the least
    any check of a server costs. Samples alternate, so that drift in the machine's load hits both alike."""
    print(f"\n1. Warm reuse of demo_expert ({calls} calls) vs a bare GET /v1/models", flush=True)
    models_url = f"{endpoint.base_url}/models"
    reuse, bare = [], []
    for _ in range(calls):
        reuse.append(timed(lambda: manager.serve_finetune("demo_expert").release()))
        bare.append(timed(lambda: _get_ok(models_url, endpoint.api_key, endpoint.socket)))
    p50, p95, bare_p50 = percentile(reuse, 0.5), percentile(reuse, 0.95), percentile(bare, 0.5)
    ratio = p50 / bare_p50
    run.add(Figure("warm reuse p50 / floor: bare GET /v1/models p50",
                   f"{ms(p50)} / {ms(bare_p50)} = {ratio:.2f}x", "<= 2x", ratio <= 2.0))
    run.add(Figure("warm reuse p95 / max", f"{ms(p95)} / {ms(max(reuse))}", "<= 50 ms", p95 <= 0.05))
    tenth = max(1, calls // 10)
    early, late = statistics.median(reuse[:tenth]), statistics.median(reuse[-tenth:])
    record = manager.registry.get(endpoint.server_id or "")
    owners = len(record.owners) if record else 0
    run.add(Figure("reuse drift (first 10% vs last 10% median)",
                   f"{ms(early)} -> {ms(late)}; owner entries in the record: {owners}"))


def _get_ok(url: str, api_key: str | None, socket: str | None = None) -> None:
    status = http(url, api_key, socket=socket)
    if status != 200:
        raise RuntimeError(f"GET {url} answered HTTP {status}")


# --- 5. what the private socket and the gateway cost per request ------------------------------------------


def bench_transport(run: Run, manager: Manager, endpoint: Endpoint, calls: int) -> None:
    """The security design's price: our servers answer on a Unix socket; a TCP port, when asked for, is the
    supervisor's gateway (key checked on every route, then bytes piped to the socket). Plain TCP, a bare
    vLLM's port, is what an unprotected server would cost. Samples alternate to share the machine's drift."""
    print(f"\n5. Per-request cost: socket vs gateway (TCP) vs plain TCP ({calls} calls each)", flush=True)
    record = manager.registry.get(endpoint.server_id or "")
    if record is None or record.tcp_url is None:
        raise RuntimeError("the benchmark's server has no gateway port")
    key, sock = endpoint.api_key, endpoint.socket
    over_socket, over_gateway, chat_socket, chat_gateway = [], [], [], []
    chat = {"model": endpoint.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "temperature": 0}
    for index in range(calls):
        over_socket.append(timed(lambda: _get_ok(f"{endpoint.base_url}/models", key, sock)))
        over_gateway.append(timed(lambda: _get_ok(f"{record.tcp_url}/models", key)))
        if index % 3 == 0:
            chat_socket.append(timed(lambda: _post_ok(f"{endpoint.base_url}/chat/completions", key, chat, sock)))
            chat_gateway.append(timed(lambda: _post_ok(f"{record.tcp_url}/chat/completions", key, chat)))
    sock50, gate50 = percentile(over_socket, 0.5), percentile(over_gateway, 0.5)
    extra = statistics.median(g - o for g, o in zip(over_gateway, over_socket))
    run.add(Figure("GET /v1/models over the socket p50 / p95",
                   f"{ms(sock50)} / {ms(percentile(over_socket, 0.95))}"))
    run.add(Figure("GET /v1/models via the gateway p50 / p95",
                   f"{ms(gate50)} / {ms(percentile(over_gateway, 0.95))}"))
    run.add(Figure("gateway extra per request (median of paired gateway-socket)", ms(extra), "<= 5 ms",
                   extra <= 0.005))
    if run.plain_tcp:  # another server (it lists one model, not base + adapters) at another moment: context
        run.add(Figure("GET /v1/models plain TCP, bare vLLM (section 2) p50", ms(percentile(run.plain_tcp, 0.5))))
    chat_extra = statistics.median(g - o for g, o in zip(chat_gateway, chat_socket))
    run.add(Figure(f"chat completion (4 tokens) socket p50, gateway extra ({len(chat_socket)} pairs)",
                   f"{ms(percentile(chat_socket, 0.5))}, {ms(chat_extra)}"))


#: A trivial HTTP server for the gateway's own cost: on a Unix socket or a TCP port, answering at once.
TRIVIAL_SERVER = r"""
import http.server, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b'{"data": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def address_string(self):
        return "local"
    def log_message(self, *args):
        pass
if sys.argv[1] == "unix":
    socketserver.ThreadingUnixStreamServer(sys.argv[2], Handler).serve_forever()
else:
    socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
"""
GATEWAY = r"""
import socket, sys, time
from sage_magic.serving.gateway import Gateway
Gateway(socket.socket(fileno=int(sys.argv[1])), sys.argv[2], "key").start()
time.sleep(3600)
"""


def bench_gateway_hop(run: Run, calls: int) -> None:
    """The gateway's own cost, without vLLM's noise: a trivial server answering on a socket (reached directly
    and through the gateway, in its own process as in the supervisor) and on a plain TCP port."""
    print(f"\n5b. The gateway hop alone, on a trivial server ({calls * 5} calls each)", flush=True)
    upstream = str(run.workdir / "trivial.sock")
    plain_port = free_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    procs = [subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, "unix", upstream]),
             subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, "tcp", str(plain_port)]),
             subprocess.Popen([sys.executable, "-c", GATEWAY, str(listener.fileno()), upstream],
                              pass_fds=(listener.fileno(),))]
    gateway_url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/models"
    listener.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_ok(f"http://127.0.0.1:{plain_port}/v1/models", None)
                _get_ok(gateway_url, "key")
                break
            except (OSError, RuntimeError):  # not listening yet, or the gateway's 503 while its upstream socket
                if time.monotonic() > deadline:  # does not exist yet
                    raise
                time.sleep(0.2)
        samples: dict[str, list[float]] = {"socket": [], "plain TCP": [], "gateway": []}
        for _ in range(calls * 5):
            samples["socket"].append(timed(lambda: _get_ok("http://localhost/v1/models", None, upstream)))
            samples["plain TCP"].append(timed(lambda: _get_ok(f"http://127.0.0.1:{plain_port}/v1/models", None)))
            samples["gateway"].append(timed(lambda: _get_ok(gateway_url, "key")))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    p50 = {name: percentile(values, 0.5) for name, values in samples.items()}
    extra = statistics.median(g - p for g, p in zip(samples["gateway"], samples["plain TCP"]))
    run.add(Figure("trivial server p50: socket / plain TCP / gateway",
                   f"{ms(p50['socket'])} / {ms(p50['plain TCP'])} / {ms(p50['gateway'])}"))
    run.add(Figure("gateway hop vs plain TCP (median of pairs)", ms(extra), "<= 2 ms", extra <= 0.002))


# --- 4. what the engine costs the calling process ---------------------------------------------------------------


def bench_memory(run: Run, manager: Manager) -> None:
    print("\n4. The calling process: memory, heavy imports, import time", flush=True)
    settings = manager.settings
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(settings.home), str(settings.runtime_dir),
                            str(free_port()), *VLLM_ARGS], check=False, capture_output=True, text=True,
                           timeout=300, cwd=run.workdir)
    if probe.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{probe.stderr[-2000:]}")
    out = json.loads(probe.stdout.strip().splitlines()[-1])
    if not out["reused"]:
        raise RuntimeError("the memory probe started a server instead of reusing the running one")
    run.add(Figure("RSS before import sage_magic.serving.manager", mib(out["before_import"])))
    run.add(Figure("RSS after import", mib(out["after_import"])))
    run.add(Figure("RSS after Manager + serve_finetune (reuse)", mib(out["after_serve"])))
    run.add(Figure("peak RSS of the calling process", mib(out["peak"])))
    run.add(Figure("'torch' in sys.modules after serving", str(out["torch"]), "False", not out["torch"]))
    run.add(Figure("'vllm' in sys.modules after serving", str(out["vllm"]), "False", not out["vllm"]))
    servers = manager.servers()
    if servers:
        run.add(Figure("vLLM server tree RSS (for scale)", mib(servers[0].memory_bytes)))


def bench_import(run: Run, samples: int) -> None:
    """Interleaved, so that a burst of load elsewhere hits both commands alike."""
    empty, engine = [], []
    for _ in range(samples):
        empty.append(timed(lambda: _python("pass", run.workdir)))
        engine.append(timed(lambda: _python("import sage_magic, sage_magic.serving.manager", run.workdir)))
    base, full = statistics.median(empty), statistics.median(engine)
    run.add(Figure(f"python -c 'import sage_magic.serving.manager' (median of {samples})",
                   f"{ms(full)} vs {ms(base)} for 'pass' (ratio {full / base:.2f}, +{ms(full - base)})"))


def _python(code: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd)


# --- the run ---------------------------------------------------------------------------------------------------


def cleanup(run: Run) -> list[psutil.Process]:
    """Stop every manager's servers and wait for our process groups to go; returns what is left."""
    for manager in run.managers:
        manager.stop_all()
        manager.close()
    deadline = time.monotonic() + 15
    while (left := ours(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def print_summary(figures: list[Figure]) -> None:
    width = max(len(f.name) for f in figures)
    value_width = min(48, max(len(f.value) for f in figures))
    print(f"\n{'figure':<{width}}  {'value':<{value_width}}  {'goal':<8}  met")
    print("-" * (width + value_width + 18))
    for f in figures:
        met = "n/a" if f.met is None else ("yes" if f.met else "NO")
        print(f"{f.name:<{width}}  {f.value:<{value_width}}  {f.goal:<8}  {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="CI size: fewer repeats and samples (< 4 min)")
    parser.add_argument("--home", type=Path, help="copy this demo home instead of building the demo")
    parser.add_argument("--repeat", type=int, help="bare/manager cold-start pairs (default 1 short, 2 full)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.short else 2)
    calls, samples = (30, 5) if args.short else (200, 15)
    started = time.perf_counter()
    foreign = len(vllm_processes())
    size = "short" if args.short else "full"
    print(f"engine_bench: {size} run, {os.cpu_count()} CPUs, python {sys.version.split()[0]}"
          f"; vLLM processes of others running now: {foreign}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="sage-engine-bench-"))
    home = prepare_home(args.home.expanduser().resolve() if args.home else None, workdir)
    run = Run(workdir, home, get_finetune(settings_for(home, workdir / "run-resolve"), "demo_expert").base_path,
              [], set(), [], calls)
    failed = True
    try:
        manager, endpoint = bench_ready(run, repeat)
        bench_adapter(run, manager, endpoint)
        bench_reuse(run, manager, endpoint, calls)
        bench_transport(run, manager, endpoint, calls)
        bench_gateway_hop(run, calls)
        bench_memory(run, manager)
        bench_import(run, samples)
        failed = False
    except Exception:  # noqa: BLE001 - report it, clean up, and exit 1 below
        traceback.print_exc()
    left = cleanup(run)
    for proc in left:
        print(f"LEFT BEHIND: pid {proc.pid}", file=sys.stderr)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    run.add(Figure("our vLLM processes left at the end", str(len(left)), "0", not left))
    if failed or left:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print_summary(run.figures)
    print(f"\nwall time {time.perf_counter() - started:.0f} s; vLLM processes of others running now: "
          f"{len(vllm_processes())}", flush=True)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
