#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine, idempotent: system packages (when root), a virtual
# environment in .venv and the project with its test dependencies. `make demo` / `make test`
# call it; it does nothing when the stamp file is newer than pyproject.toml and setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt setup.py ] \
   && [ "$STAMP" -nt tools/setup_env.sh ]; then
  exit 0
fi

# apt_install "PACKAGES" "message if we cannot": installs missing Debian packages when root;
# otherwise prints the message and returns 1, and the caller decides whether that is fatal.
apt_install() {
  if dpkg -s $1 >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install $1"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $1
  else
    echo "$2" >&2
    return 1
  fi
}

# Fashion-MNIST (the default data set) comes from Debian's dataset-fashion-mnist package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist \
    "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" || exit 1
fi

# A real Slurm controller + compute daemons for the multi-node tests (tools/local_slurm.sh).
# Never slurm-wlm-emulator: it repoints the real daemons to itself.
apt_install "munge slurmctld slurmd slurm-client" \
  "Slurm is not installed: the multi-node tests will be skipped" || true

# The accelerated loaders (data.loader: dali | ffcv) and their tests. DALI is a wheel (the
# CUDA 13 build, matching torch; its CPU pipelines run without a GPU). FFCV compiles against
# libjpeg-turbo and OpenCV, which it also needs at run time: Debian packages.
FFCV_APT="pkg-config libturbojpeg0-dev libopencv-dev"
EXTRAS="dev,slurm,timm,dali,ffcv"
apt_install "$FFCV_APT" \
  "FFCV needs 'sudo apt-get install $FFCV_APT'; installing without FFCV (its tests skip)" \
  || EXTRAS="dev,slurm,timm,dali"

# data_pipelines/jpeg_window.c (the torchvision backend's partial JPEG decoding) is compiled
# by the install below when a C compiler and the headers are there; without them the backend
# decodes whole files (slower, the same pixels).
apt_install "gcc python3-dev libjpeg62-turbo-dev" \
  "jpeg_window is not built without 'sudo apt-get install gcc python3-dev libjpeg62-turbo-dev'" \
  || true

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
echo "== installing the project, its test dependencies and the loaders ($EXTRAS)"
"$PIP" install -q -e ".[$EXTRAS]"
"$VENV/bin/python" -c "from ltrainer.data_pipelines.decode import decoder_name as d
print('== torchvision backend, train crops of colour JPEGs:', d())"
touch "$STAMP"
