"""Servers live exactly as long as someone uses them: kernels dying every way, shared owners, races."""

from __future__ import annotations

import os
import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor

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


def _owners(registry: Registry, server_id: str) -> set[int]:
    record = registry.get(server_id)
    return {o.pid for o in record.owners} if record is not None else set()


@pytest.mark.kernel
def test_kernels_launching_at_once_share_one_server_that_goes_with_the_last_of_them(fresh_settings) -> None:
    """Three kernels ask for the same fine-tune at the same moment: one server starts, one supervisor, every
    kernel an owner. (One vLLM start: these were four tests, a kernel per way of dying and four processes
    racing, each starting a server of its own.) "Interrupt kernel" sends SIGINT to the launching kernel's
    process group: the server survives it. Each way a kernel goes then takes its ownership with it and leaves
    the server to the rest: the launcher SIGKILLed (none of its code runs; its pipe to the supervisor closes),
    another restarted; when the last one shuts down, the server goes."""
    from jupyter_client import KernelManager

    registry = Registry(fresh_settings.runtime_dir)
    kernels = []
    try:
        for _ in range(3):
            km = KernelManager(kernel_name="python3")
            km.start_kernel(env=env_for(fresh_settings))
            client = km.client()
            client.start_channels()
            kernels.append((km, client))
            client.wait_for_ready(timeout=60)
        with ThreadPoolExecutor(len(kernels)) as pool:  # all at once: they race for the registry
            served = list(pool.map(lambda kernel: _run(kernel[1], SERVE_IN_KERNEL, timeout=300).strip(), kernels))
        assert len(set(served)) == 1, served
        record = registry.get(served[0])
        assert record is not None and healthy(record.root_url, socket=record.socket)
        pids = {km.provisioner.process.pid: (km, client) for km, client in kernels}
        assert _owners(registry, record.id) == set(pids)
        supervisors = [p for p in sage_processes(fresh_settings.runtime_dir)
                       if "sage_magic.serving.supervisor" in " ".join(p.cmdline())]
        assert len(supervisors) == 1
        launcher = supervisors[0].ppid()
        assert launcher in pids
        (restarted, shut) = [pid for pid in pids if pid != launcher]

        km, client = pids[launcher]
        km.interrupt_kernel()
        _run(client, "1 + 1", timeout=30)
        assert healthy(record.root_url, socket=record.socket)
        os.kill(launcher, signal.SIGKILL)
        assert wait_until(lambda: _owners(registry, record.id) == {restarted, shut}, 10), "the launcher still owns it"
        assert healthy(record.root_url, socket=record.socket) and psutil.pid_exists(record.pid)
        pids[restarted][0].restart_kernel(now=False)
        assert wait_until(lambda: _owners(registry, record.id) == {shut}, 10), "the restarted kernel still owns it"
        assert healthy(record.root_url, socket=record.socket) and psutil.pid_exists(record.pid)
        pids[shut][0].shutdown_kernel(now=False)
        gone = wait_until(lambda: not sage_processes(fresh_settings.runtime_dir) and port_free(record.port), 10)
        assert gone, f"left behind: {[p.info for p in sage_processes(fresh_settings.runtime_dir)]}"
        assert registry.all() == []
    finally:
        for km, client in kernels:
            client.stop_channels()
            if km.has_kernel:
                km.shutdown_kernel(now=True)
