"""Servers live exactly as long as someone uses them: kernels dying every way, shared owners, races."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from sage_magic.core.http import healthy
from sage_magic.serving.launch import port_free
from sage_magic.serving.registry import Registry
from tests.conftest import env_for, sage_processes, wait_until

pytestmark = pytest.mark.vllm

SERVE_IN_KERNEL = textwrap.dedent("""
    from sage_magic.core.config import Settings
    from sage_magic.serving.manager import shared
    endpoint = shared(Settings.from_env()).serve_finetune("demo_expert").endpoint
    print(endpoint.server_id)
""")


def _run(client, code: str, timeout: float) -> str:
    outputs: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            outputs.append(msg["content"]["text"])
        elif msg["msg_type"] in ("execute_result", "display_data", "update_display_data"):  # a live answer too
            outputs.append(msg["content"]["data"].get("text/plain", ""))
        elif msg["msg_type"] == "error":
            outputs.append("\n".join(msg["content"]["traceback"]))

    reply = client.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", "".join(outputs)
    return "".join(outputs)


@pytest.mark.kernel
@pytest.mark.parametrize("death", ["shutdown", "restart", "sigkill"])
def test_the_server_goes_when_its_kernel_goes(death: str, fresh_settings) -> None:
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env_for(fresh_settings))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        server_id = _run(client, SERVE_IN_KERNEL, timeout=300).strip()
        record = Registry(fresh_settings.runtime_dir).get(server_id)
        assert record is not None and healthy(record.root_url, socket=record.socket)
        if death == "shutdown":
            # "Interrupt kernel" sends SIGINT to the kernel's process group: the server must survive it
            km.interrupt_kernel()
            _run(client, "1 + 1", timeout=30)
            assert healthy(record.root_url, socket=record.socket)
            km.shutdown_kernel(now=False)
        elif death == "restart":
            km.restart_kernel(now=False)
        else:
            os.kill(km.provisioner.process.pid, signal.SIGKILL)
        gone = wait_until(lambda: not sage_processes(fresh_settings.runtime_dir) and port_free(record.port), 10)
        assert gone, f"left behind after {death}: {[p.info for p in sage_processes(fresh_settings.runtime_dir)]}"
        assert Registry(fresh_settings.runtime_dir).all() == []
    finally:
        client.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


OWNER = textwrap.dedent("""
    import json, sys
    from sage_magic.core.config import Settings
    from sage_magic.serving.manager import Manager
    manager = Manager(Settings.from_env())
    endpoint = manager.serve_finetune("demo_expert").endpoint
    print(json.dumps({"id": endpoint.server_id, "pid": manager.registry.get(endpoint.server_id).pid}), flush=True)
    sys.stdin.readline()
    manager.close()
""")


def test_concurrent_launches_start_one_server_that_stops_with_its_last_owner(fresh_settings) -> None:
    env = env_for(fresh_settings)
    owners = [subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env) for _ in range(4)]
    try:
        seen = [json.loads(p.stdout.readline()) for p in owners]
        assert len({s["id"] for s in seen}) == 1 and len({s["pid"] for s in seen}) == 1
        registry = Registry(fresh_settings.runtime_dir)
        (record,) = registry.all()
        assert len(record.owners) == 4
        supervisors = [p for p in sage_processes(fresh_settings.runtime_dir)
                       if "sage_magic.serving.supervisor" in " ".join(p.cmdline())]
        assert len(supervisors) == 1
        launcher = supervisors[0].ppid()
        by_pid = {p.pid: p for p in owners}
        assert launcher in by_pid

        # the launcher dies the hard way: the other three still use the server
        by_pid[launcher].kill()
        by_pid[launcher].wait()
        rest = [p for p in owners if p.pid != launcher]
        assert wait_until(lambda: len(registry.get(record.id).owners) == 3, 5)
        assert healthy(record.root_url, socket=record.socket)
        # two leave politely: still up
        for proc in rest[:2]:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
        assert wait_until(lambda: len(registry.get(record.id).owners) == 1, 5)
        assert healthy(record.root_url, socket=record.socket) and psutil.pid_exists(record.pid)
        # the last one leaves: the server goes
        rest[2].stdin.write("\n")
        rest[2].stdin.flush()
        rest[2].wait(timeout=30)
        assert wait_until(lambda: not sage_processes(fresh_settings.runtime_dir) and port_free(record.port), 10)
        assert registry.all() == []
    finally:
        for proc in owners:
            if proc.poll() is None:
                proc.kill()
