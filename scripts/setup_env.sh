#!/usr/bin/env bash
# Creates (or reuses) the project's venv and installs everything drcl_d2 needs, idempotently.
#   torch 2.14.1 / torchvision 0.29.1 -> detectron2 -> runtime deps -> drcl_d2 (editable)
# detectron2 is taken, in order: an already-importable one (a user's own build is never replaced),
# the official source on GitHub, then the PyPI repackaging sal-detectron2 (pure-Python code, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.drcl_setup_done"

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt scripts/setup_env.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip"
$PIP install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true

if ! $PY -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.14.1 / torchvision 0.29.1"
  $PIP install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
fi
$PY -c "import torch, torchvision" || { echo "[setup] torch/torchvision failed to install" >&2; exit 1; }

D2_DEPS="fvcore iopath pycocotools omegaconf hydra-core tabulate termcolor yacs cloudpickle matplotlib tensorboard tqdm pillow setuptools<81"
if $PY -c "import detectron2" >/dev/null 2>&1; then
  echo "[setup] using the detectron2 already importable: $($PY -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
else
  echo "[setup] installing detectron2 runtime dependencies"
  $PIP install -q --disable-pip-version-check $D2_DEPS 2>&1 | grep -v "is ignored" || true
  echo "[setup] trying the official detectron2 source (github)"
  if ! timeout 900 $PIP install -q --disable-pip-version-check --no-build-isolation \
        'git+https://github.com/facebookresearch/detectron2.git' >/dev/null 2>&1; then
    echo "[setup] github not reachable or build failed: installing the PyPI repackaging sal-detectron2==0.7.2"
    PURELIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    $PIP install -q --disable-pip-version-check --no-deps --python-version 3.10 --only-binary=:all: \
        --target "$PURELIB" --upgrade sal-detectron2==0.7.2 2>&1 | grep -v "is ignored" || true
  fi
fi
$PIP install -q --disable-pip-version-check $D2_DEPS 2>&1 | grep -v "is ignored" || true
$PY -c "import detectron2.modeling, detectron2.engine" || { echo "[setup] detectron2 is not importable" >&2; exit 1; }

echo "[setup] installing drcl_d2 (editable), the SLURM launcher's submitit and test tools"
$PIP install -q --disable-pip-version-check --no-build-isolation -e '.[dev,slurm]' 2>&1 | grep -v "is ignored" || true
$PY -c "import drcl_d2, lvis, submitit, xdist" || { echo "[setup] drcl_d2 is not importable" >&2; exit 1; }
touch "$STAMP"
echo "[setup] done: $($PY -c 'import torch, detectron2; print("torch", torch.__version__, "detectron2", detectron2.__version__)')"
