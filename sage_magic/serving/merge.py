"""Merging a LoRA adapter into its base (peft ``merge_and_unload``), atomically and at most once.

The merge runs in a child process (``python -m sage_magic.serving.merge``): torch and peft never enter the kernel,
and a merge that is killed takes nothing down with it. It writes into a staging folder beside the target
(see staging.py), puts a completeness marker carrying the fingerprint in last, then renames it into place.
So ``merged_model/`` is either absent, a complete earlier merge, or a complete new one; a second request
with the same adapter and base finds the marker and costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ..core.config import Settings
from ..core.errors import Cancelled, MergeFailed
from ..core.files import LockBusy, exclusive
from ..core.fingerprint import adapter_digest, base_identity, combine
from ..core.progress import Progress, ProgressCallback, silent
from ..core.staging import publish, staging, sweep_leftovers
from ..finetune.catalog import MERGED_MARKER, FineTune

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def merge_fingerprint(ft: FineTune) -> str:
    return combine("merge-v1", adapter_digest(ft.adapter_dir), base_identity(ft.base_path))


def merged_fingerprint_on_disk(ft: FineTune) -> str | None:
    marker = ft.merged_dir / MERGED_MARKER
    try:
        return json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def ensure_merged(settings: Settings, ft: FineTune, progress: ProgressCallback = silent,
                  cancel: threading.Event | None = None) -> Path:
    """Return ``merged_model/`` for this fine-tune, merging first only if it is missing or stale.

    A set ``cancel`` ends the wait for another process's merge, or kills our own merge worker, and raises
    :class:`Cancelled`; the staging folder goes with it, so nothing half-written is left."""
    fingerprint = merge_fingerprint(ft)
    if merged_fingerprint_on_disk(ft) == fingerprint:
        return ft.merged_dir
    cancelled = cancel.is_set if cancel is not None else None
    try:
        # two kernels asking for the same merge run it once
        with exclusive(ft.root / ".merge.lock", should_stop=cancelled):
            if merged_fingerprint_on_disk(ft) == fingerprint:  # another process merged while we waited
                progress(Progress("merge", f"{ft.name}: merged by another process", 1.0))
                return ft.merged_dir
            sweep_leftovers(ft.merged_dir)  # from a merge that was killed
            with staging(ft.merged_dir) as tmp:
                _run_worker(settings, ft, tmp, fingerprint, progress, cancel)
                publish(tmp, ft.merged_dir)
    except LockBusy:
        raise Cancelled(f"Cancelled while waiting for another process to merge {ft.name!r}.") from None
    progress(Progress("merge", f"{ft.name}: merged into {ft.merged_dir}", 1.0))
    return ft.merged_dir


def _run_worker(settings: Settings, ft: FineTune, out: Path, fingerprint: str, progress: ProgressCallback,
                cancel: threading.Event | None) -> None:
    command = [settings.python, "-m", "sage_magic.serving.merge", "--base", str(ft.base_path),
               "--adapter", str(ft.adapter_dir), "--out", str(out), "--fingerprint", fingerprint]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tail: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, env=env)
    if cancel is not None:  # the line loop below blocks on the worker's output: watch the cancel beside it
        threading.Thread(target=_kill_on_cancel, args=(proc, cancel), daemon=True).start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
                progress(Progress("merge", f"{ft.name}: {event['message']}", event.get("fraction")))
            except (ValueError, KeyError, TypeError):
                tail.append(line.rstrip())
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"Cancelled the merge of {ft.name!r}; nothing was changed in {ft.merged_dir}.")
    if code != 0 or not (out / MERGED_MARKER).is_file():
        detail = "\n".join(tail) or f"exit status {code}"
        raise MergeFailed(
            f"Merging {ft.name!r} into {ft.base_ref!r} failed; nothing was changed in {ft.merged_dir}. "
            f"Serve it unmerged (without --merge) or fix the cause below, then retry.\n{detail}"
        )


def _kill_on_cancel(proc: subprocess.Popen, cancel: threading.Event) -> None:
    while proc.poll() is None:
        if cancel.wait(0.1):
            proc.kill()
            return


# --- the child process ---------------------------------------------------------------------------------


def _report(message: str, fraction: float) -> None:
    print(json.dumps({"message": message, "fraction": fraction}), flush=True)


def merge_in_this_process(base: Path, adapter: Path, out: Path, fingerprint: str) -> None:
    """Load base + adapter, merge, save weights then tokenizer, and write the marker last."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    _report("loading base model", 0.05)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype="auto", low_cpu_mem_usage=True)
    _report("loading adapter", 0.35)
    model = PeftModel.from_pretrained(model, adapter)
    _report("merging weights", 0.5)
    with torch.no_grad():
        merged = model.merge_and_unload()
    _report("saving merged weights", 0.7)
    merged.save_pretrained(out, safe_serialization=True)
    _report("saving tokenizer", 0.9)
    has_own = any((adapter / name).is_file() for name in TOKENIZER_FILES)
    AutoTokenizer.from_pretrained(adapter if has_own else base).save_pretrained(out)
    marker = {"fingerprint": fingerprint, "base": str(base), "adapter": str(adapter),
              "seconds": round(time.monotonic() - started, 2), "merged_at": time.time()}
    (out / MERGED_MARKER).write_text(json.dumps(marker, indent=2))
    _report("done", 1.0)


def _exit_with_parent() -> None:
    """A merge nobody waits for is wasted minutes and gigabytes: stop when the requesting process dies."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    _exit_with_parent()
    parser = argparse.ArgumentParser(prog="python -m sage_magic.serving.merge")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fingerprint", required=True)
    args = parser.parse_args(argv)
    merge_in_this_process(args.base, args.adapter, args.out, args.fingerprint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
