#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (and internet for the toolkit and the model):
#   1. builds triage with the `cuda` feature (installs a toolkit first if nvcc is missing);
#   2. runs the training tests (tiny model: overfit, resume) on the GPU;
#   3. structures 20 incidents with the 1.5B on the GPU and on the CPU (batch mode) and
#      compares the tickets (same greedy choices expected; confidences within 0.02);
#   4. trains the 1.5B default adapter on the GPU with configs/train.toml for at most
#      GPU_MINUTES (default 10) and samples the process's GPU memory every 0.5 s;
#   5. writes $OUT/gpu.md: what ran, each step's exit status, peak VRAM against the 4 GB budget.
# Usage, from the repository root:  bash docs/gpu.sh   [OUT=gpu-run] [GPU_MINUTES=10]
set -uo pipefail
OUT=${OUT:-gpu-run}
GPU_MINUTES=${GPU_MINUTES:-10}
mkdir -p "$OUT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
report="$OUT/gpu.md"
note() { echo "$*" | tee -a "$report"; }
: > "$report"
note "# GPU run, $(date -u +%Y-%m-%dT%H:%MZ)"
note ""
note "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

step() { # name command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "- $name: exit $rc after $(( $(date +%s) - t0 )) s (log: $OUT/$name.log)"
  return $rc
}

step toolkit bash .ci/cuda-toolkit || exit 1
step build cargo build --release -p triage --features cuda || exit 1
step tests env TRIAGE_TEST_DEVICE=cuda cargo test --release -p triage-train --features cuda \
  --test overfit --test resume
BIN="$CARGO_TARGET_DIR/release/triage"
step pull "$BIN" model pull 1.5b || exit 1
step data bash -c "'$BIN' data synth --n 2500 --seed 7 -o '$OUT/synth.jsonl' && \
  '$BIN' data split '$OUT/synth.jsonl' --by template --ratios 80,10,10 --out-dir '$OUT/synth' && \
  head -64 '$OUT/synth/val.jsonl' > '$OUT/synth/val-64.jsonl'" || exit 1

# Inference on the GPU against the CPU, same incidents, same batch mode.
python3 -c "import json; [print(json.dumps({'id': x['id'], 'text': x['text']})) for x in json.load(open('tests/fixtures/incidents.json'))[:20]]" > "$OUT/incidents.jsonl"
rm -f "$OUT/cpu.jsonl" "$OUT/cuda.jsonl"
step infer-cpu "$BIN" --model 1.5b infer --no-adapter --input "$OUT/incidents.jsonl" --output "$OUT/cpu.jsonl" --batch-size 8
step infer-cuda "$BIN" --model 1.5b infer --no-adapter --device cuda --input "$OUT/incidents.jsonl" --output "$OUT/cuda.jsonl" --batch-size 8
note "- inference, cuda vs cpu: $(python3 - "$OUT/cpu.jsonl" "$OUT/cuda.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
same = sum(x.get("ticket") == y.get("ticket") for x, y in zip(a, b))
diff = 0.0
for x, y in zip(a, b):
    cx = {c["field"]: c["confidence"] for c in x.get("meta", {}).get("confidence", [])}
    cy = {c["field"]: c["confidence"] for c in y.get("meta", {}).get("confidence", [])}
    diff = max([diff] + [abs(cx[k] - cy[k]) for k in cx if k in cy])
print(f"{same} of {len(a)} tickets identical, largest confidence difference {diff:.4f}")
PY
)"

# Peak GPU memory of the training process, sampled every 0.5 s.
"$BIN" --model 1.5b train --device cuda --config configs/train.toml \
  --data "$OUT/synth/train.jsonl" --val "$OUT/synth/val-64.jsonl" \
  --out "$OUT/adapter-1.5b" --run-dir "$OUT/run-1.5b" > "$OUT/train.log" 2>&1 &
pid=$!
t0=$(date +%s)
peak=0
while kill -0 "$pid" 2>/dev/null; do
  if [ $(( $(date +%s) - t0 )) -ge $(( GPU_MINUTES * 60 )) ]; then
    kill -INT "$pid"  # the trainer checkpoints and stops; `--resume` continues it
    sleep 20
    break
  fi
  used=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
    | awk -F', ' -v p="$pid" '$1 == p {print $2}')
  [ -n "$used" ] && [ "$used" -gt "$peak" ] && peak=$used
  sleep 0.5
done
wait "$pid"; rc=$?
secs=$(( $(date +%s) - t0 ))
steps=$(grep -c '"loss"' "$OUT/run-1.5b/metrics.jsonl" 2>/dev/null || echo 0)
note "- train (1.5B, configs/train.toml, cuda): exit $rc after $secs s, $steps optimizer steps"
note "- peak GPU memory of the training process: $peak MiB (budget 4096 MiB: $([ "$peak" -le 4096 ] && echo within || echo OVER))"
note ""
note "Adapter: $OUT/adapter-1.5b (written when the run finished); metrics: $OUT/run-1.5b/metrics.jsonl"
