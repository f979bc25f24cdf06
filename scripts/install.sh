#!/usr/bin/env bash
# Idempotent install of everything hvd_lb needs on a fresh Debian machine:
# Open MPI, the Fashion-MNIST data package, a .venv with torch + TensorFlow,
# and Horovod built from its sdist with PyTorch, TensorFlow, Gloo and MPI.
# A second run checks stamps and skips every step already done.
# This file is the only place where versions are pinned (Docker images call it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOROVOD_VERSION="${HVD_LB_HOROVOD_VERSION:-0.28.1}"
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0
TORCH_SPEC="${HVD_LB_TORCH_SPEC:-torch==$TORCH_VERSION}"
if [ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ]; then
  # GPU image: PyPI's default Linux torch wheel is the CUDA build; TF pulls its CUDA libraries.
  TF_SPEC="${HVD_LB_TF_SPEC:-tensorflow[and-cuda]==$TF_VERSION}"
else
  TF_SPEC="${HVD_LB_TF_SPEC:-tensorflow-cpu==$TF_VERSION}"
fi
PY_DEPS="numpy pytest pytest-timeout cffi psutil pyyaml cloudpickle packaging wheel setuptools matplotlib tqdm mpi4py"
VENV="${HVD_LB_VENV:-$ROOT/.venv}"
CACHE="${HVD_LB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_lb}"
APT_PACKAGES="openmpi-bin libopenmpi-dev"
APT_DATA="dataset-fashion-mnist"  # demo data; not in every distribution (the demo says so if missing)

log() { echo "[install] $*"; }
# Run a command silently; if it fails, print everything it wrote, then fail.
quiet() {
  local out rc=0
  out="$(mktemp)"
  "$@" >"$out" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "[install] failed (exit $rc): $*" >&2
    cat "$out" >&2
  fi
  rm -f "$out"
  return "$rc"
}
pip_q() { quiet "$PY" -m pip "$@"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- 1. Debian packages --------------------------------------------------------
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "apt-get install$missing"
  quiet as_root apt-get update -qq
  quiet as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
else
  log "Debian packages present"
fi
if ! dpkg-query -W -f='${Status}' $APT_DATA 2>/dev/null | grep -q "install ok installed"; then
  log "apt-get install $APT_DATA"
  { quiet as_root apt-get update -qq && quiet as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_DATA; } ||
    log "warning: $APT_DATA not installable here; hvd-lb demo will need HVD_LB_FASHION_MNIST"
fi

# --- 2. virtual environment with the frameworks ---------------------------------
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
PY="$VENV/bin/python"
deps_key="$TORCH_SPEC $TF_SPEC $PY_DEPS"
if [ "$(cat "$VENV/.hvd_lb_deps" 2>/dev/null)" != "$deps_key" ]; then
  log "pip install $deps_key"
  # torch first and alone: with it installed, TF's and others' ranges resolve to
  # the local CPU wheel instead of pulling a CUDA build.
  pip_q install -q "$TORCH_SPEC"
  pip_q install -q "$TF_SPEC" $PY_DEPS
  echo "$deps_key" > "$VENV/.hvd_lb_deps"
else
  log "Python packages present"
fi

# --- 3. Horovod, built once per (Horovod, torch, TF) and cached as a wheel -------
torch_v="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
tf_v="$("$PY" -c 'import os; os.environ["TF_CPP_MIN_LOG_LEVEL"]="3"; import tensorflow as tf; print(tf.__version__)' 2>/dev/null)"
key="horovod${HOROVOD_VERSION}-torch${torch_v}-tf${tf_v}-${HOROVOD_GPU_OPERATIONS:-cpu}"
stamp="$VENV/.hvd_lb_horovod"
if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && "$VENV/bin/horovodrun" --version >/dev/null 2>&1; then
  log "Horovod present ($key)"
else
  wheel_dir="$CACHE/$key"
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building Horovod $HOROVOD_VERSION ($key), ~15 min on 2 cores"
    build="$(mktemp -d)"
    pip_q download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
    tar xzf "$build"/horovod-"$HOROVOD_VERSION".tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    # The patch, applied to the pristine sdist (see README, "The Horovod patch"):
    # torch >= 2.1 headers need C++17; Horovod 0.28.1 asks for C++14 (root and
    # torch targets) and its vendored Gloo forces -std=c++11.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    sed -i 's/-std=c++11/-std=c++17/' "$src/third_party/gloo/CMakeLists.txt"
    # TF 2.21's wheel does not ship every XLA header xla_mpi_ops.cc includes: its
    # body is compiled only when HVD_LB_XLA_MPI_OPS is defined (off by default).
    sed -i 's/^#if TENSORFLOW_VERSION >= 2006000000$/#if defined(HVD_LB_XLA_MPI_OPS) \&\& TENSORFLOW_VERSION >= 2006000000/' \
      "$src/horovod/tensorflow/xla_mpi_ops.cc"
    grep -q HVD_LB_XLA_MPI_OPS "$src/horovod/tensorflow/xla_mpi_ops.cc" || { echo "patch did not apply" >&2; exit 1; }
    mkdir -p "$wheel_dir"
    ( cd "$src" && \
      CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      PATH="$VENV/bin:$PATH" \
      pip_q wheel -q --no-build-isolation --no-deps -w "$wheel_dir" . )
    rm -rf "$build"
  else
    log "using cached wheel in $wheel_dir"
  fi
  pip_q install -q --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
  echo "$key" > "$stamp"
fi

# --- 4. hvd_lb itself, editable ---------------------------------------------------
if ! (cd / && "$PY" -c 'import hvd_lb') >/dev/null 2>&1; then
  log "pip install -e $ROOT"
  pip_q install -q --no-deps --no-build-isolation -e "$ROOT"
fi
log "done"
