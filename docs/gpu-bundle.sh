#!/usr/bin/env bash
# Builds what docs/gpu.sh needs on a GPU machine that has no Rust, no internet and no model
# (the lent H200 of this project's sessions: CUDA 13.0 driver, nvcc 13, PyTorch's CUDA 13 libraries),
# here, on a CPU machine with cargo and PyPI:
#   1. a CUDA 13.0 toolkit from PyPI wheels (nvcc, nvvm, headers, and the libraries to link against)
#      into $TOOLKIT; PTX from 13.0 matches a 13.0 driver (a newer nvcc writes PTX it refuses);
#   2. `triage` and the two training-test binaries with `--features cuda`, for compute capability
#      $CUDA_COMPUTE_CAP (90: Hopper), in their own target dir (the CPU build is left alone);
#   3. the header of the 1.5B GGUF (metadata and tensor table, ~6 MB of ~1.1 GB) for docs/gpu-model.py;
#   4. all of it, stripped and xz-compressed, in $BUNDLE (~25 MB; git-ignored) for the device tool's carry.
# The binaries link libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 and
# libcudart.so.13 by name: the GPU machine provides them (docs/gpu.sh finds PyTorch's copies).
# Usage, from the repository root:  bash docs/gpu-bundle.sh   [BUNDLE=.gpu-bundle]
set -euo pipefail
BUNDLE=${BUNDLE:-.gpu-bundle}
CACHE=${TRIAGE_CACHE_DIR:-$HOME/.cache/triage}
TOOLKIT=${TOOLKIT:-$CACHE/cuda-13.0}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$HOME/.cache/triage-cuda/target}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

T=$TOOLKIT/nvidia/cu13
if [ ! -x "$T/bin/nvcc" ]; then
  mkdir -p "$TOOLKIT/wheels"
  for p in nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-cccl nvidia-cuda-runtime \
           nvidia-cublas nvidia-cuda-nvrtc; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
      -d "$TOOLKIT/wheels" "$p==13.0.*"
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_27_x86_64 -d "$TOOLKIT/wheels" "nvidia-curand==10.4.0.*"
  for w in "$TOOLKIT"/wheels/*.whl; do python3 -m zipfile -e "$w" "$TOOLKIT"; done
  chmod +x "$T"/bin/* "$T"/nvvm/bin/*
  ( cd "$T/lib"
    ln -sf libcublas.so.13 libcublas.so; ln -sf libcublasLt.so.13 libcublasLt.so
    ln -sf libnvrtc.so.13 libnvrtc.so; ln -sf libcurand.so.10 libcurand.so
    ln -sf libcudart.so.13 libcudart.so )
fi
# libcuda.so (the driver's library, soname libcuda.so.1) to link against: the wheels carry none.
if [ ! -e "$T/lib/libcuda.so" ]; then
  for c in /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib/x86_64-linux-gnu/stubs/libcuda.so \
           /usr/local/cuda/lib64/stubs/libcuda.so; do
    [ -e "$c" ] && { ln -sf "$c" "$T/lib/libcuda.so"; break; }
  done
  [ -e "$T/lib/libcuda.so" ] || {
    echo "error: no libcuda.so to link against; install Debian's libcuda1 or a CUDA toolkit's stubs" >&2
    exit 1; }
fi
"$T/bin/nvcc" --version | tail -1

export PATH=$T/bin:$PATH CUDA_HOME=$T CUDARC_CUDA_VERSION=13000
cargo build --release --locked -p triage --features cuda
tests=$(cargo test --release --locked -p triage-train --features cuda --test overfit --test resume \
  --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')

rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
strip -o "$BUNDLE/triage" "$CARGO_TARGET_DIR/release/triage"
while read -r name exe; do strip -o "$BUNDLE/$name" "$exe"; done <<< "$tests"
# The CUDA build starts here too (no GPU is needed to open a model): it pulls, or finds, the 1.5B.
MODEL=$(LD_LIBRARY_PATH="$T/lib" "$CARGO_TARGET_DIR/release/triage" model pull 1.5b | tail -1)
python3 docs/gpu-model.py header "$MODEL" "$BUNDLE/model-1.5b.header"
basename "$MODEL" > "$BUNDLE/model-1.5b.name"
git rev-parse --short HEAD > "$BUNDLE/commit"
git diff --quiet HEAD -- crates Cargo.lock || echo "with uncommitted changes" >> "$BUNDLE/commit"
xz -T0 -9e "$BUNDLE"/triage "$BUNDLE"/overfit "$BUNDLE"/resume "$BUNDLE/model-1.5b.header"
ls -l "$BUNDLE"
du -sh "$BUNDLE"
