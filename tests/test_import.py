"""`import sage_magic` and the status path stay light: no torch, transformers, peft or vllm in the caller."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "vllm", "sentence_transformers", "faiss", "onnxruntime", "openai")


def test_engine_modules_import_nothing_heavy() -> None:
    code = ("import json, sys, sage_magic, sage_magic.serving.manager, sage_magic.faces.options, sage_magic.cli.main, "
            "sage_magic.rag, sage_magic.finetune.demo, sage_magic.serving.merge; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
