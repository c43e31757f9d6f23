#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine, idempotent: system packages (when root), a virtual
# environment in .venv and the project with its test dependencies. `make demo` / `make test`
# call it; it does nothing when the stamp file is newer than pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt tools/setup_env.sh ]; then
  exit 0
fi

# Fashion-MNIST (the default data set) comes from Debian's dataset-fashion-mnist package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2
    exit 1
  fi
fi

# A real Slurm controller + compute daemons for the multi-node tests (tools/local_slurm.sh).
# Never slurm-wlm-emulator: it repoints the real daemons to itself.
SLURM_APT="munge slurmctld slurmd slurm-client"
if ! dpkg -s $SLURM_APT >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install $SLURM_APT"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $SLURM_APT
  else
    echo "Slurm is not installed: the multi-node tests will be skipped" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the builds this project is tested with (they also run
# on CPU); on a GPU cluster install the build that matches its CUDA first and this is a no-op.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "== installing torch and torchvision (a few minutes)"
  "$PIP" install -q torch==2.14.1 torchvision==0.29.1
fi
echo "== installing the project and its test dependencies"
"$PIP" install -q -e ".[dev,slurm]"
touch "$STAMP"
