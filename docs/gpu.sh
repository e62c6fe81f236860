#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU. Two ways in:
#   - online, with cargo: builds triage with the `cuda` feature (installs a toolkit first if nvcc
#     is missing) and pulls the 1.5B;
#   - offline, without cargo (the GPU machine lent to this project's sessions): takes the
#     binaries from $BUNDLE, made elsewhere by docs/gpu-bundle.sh, links them to the CUDA 13
#     libraries found on the machine (PyTorch's), and stands in for the 1.5B with a file of the
#     same layout and random weights (docs/gpu-model.py): memory and speed are the real model's,
#     tickets, losses and accuracy mean nothing.
# Then:
#   1. the training tests (tiny model: overfit, resume) on the GPU; a failing resume test runs
#      again with TRIAGE_CUDA_FORCE_DMMV=1 (candle's older quantized path);
#   2. structures N_INCIDENTS incidents with the 1.5B on the GPU;
#   3. for each of TRAIN_VARIANTS (`plain`: configs/train.toml; `checkpointing`: the same with
#      --checkpointing, per-layer recomputation for ~4 GB GPUs; `top4`: --checkpointing with the
#      adapter on the top 4 layers only, a memory probe toward 4 GB whose accuracy is not
#      measured), the trainer's --dry-run
#      estimate, then the 1.5B default adapter trained on the GPU (on TRAIN_EXAMPLES examples, 0: all) for at most GPU_SECONDS,
#      the GPU memory sampled every 0.5 s;
#   4. structures the same incidents on the CPU (batch mode, at most CPU_LIMIT seconds) and
#      compares the tickets (same greedy choices expected; confidences within 0.02);
#   5. writes $OUT/gpu.md: what ran, each step's exit status, peak VRAM against the 4 GB budget,
#      training tokens/s.
# Usage, from the repository root:  bash docs/gpu.sh
#   [GPU_OUT=gpu-run] [BUNDLE=.gpu-bundle] [GPU_SECONDS=600] [TRAIN_VARIANTS="plain checkpointing"; also top4] [N_INCIDENTS=20] [TRAIN_EXAMPLES=0] [CPU_LIMIT=900] [TEST_LIMIT=600]
set -uo pipefail
OUT=${GPU_OUT:-gpu-run}
BUNDLE=${BUNDLE:-.gpu-bundle}
GPU_SECONDS=${GPU_SECONDS:-600}
TRAIN_VARIANTS=${TRAIN_VARIANTS:-plain checkpointing}
N_INCIDENTS=${N_INCIDENTS:-20}
TRAIN_EXAMPLES=${TRAIN_EXAMPLES:-0}
CPU_LIMIT=${CPU_LIMIT:-900}
TEST_LIMIT=${TEST_LIMIT:-600}
mkdir -p "$OUT"
report="$OUT/gpu.md"
note() { echo "$*" | tee -a "$report"; }
: > "$report"
note "# GPU run, $(date -u +%Y-%m-%dT%H:%MZ)"
note ""
note "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

step() { # name seconds command...: runs it with a time limit, logs it, notes its exit status
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "- $name: exit $rc$([ $rc = 124 ] && echo " (stopped at its ${limit} s limit)") after $(( $(date +%s) - t0 )) s (log: $OUT/$name.log)"
  return $rc
}

if command -v cargo >/dev/null 2>&1; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
  note "Mode: online (built here with cargo)"
  step toolkit 1800 bash .ci/cuda-toolkit || exit 1
  step build 3600 cargo build --release -p triage --features cuda || exit 1
  BIN="$CARGO_TARGET_DIR/release/triage"
  overfit=(cargo test --release -p triage-train --features cuda --test overfit)
  resume=(cargo test --release -p triage-train --features cuda --test resume)
  step pull 1800 "$BIN" model pull 1.5b || exit 1
  MODEL=$("$BIN" model path 1.5b)
else
  [ -f "$BUNDLE/triage.xz" ] || { note "no cargo and no $BUNDLE/triage.xz: run docs/gpu-bundle.sh first"; exit 1; }
  note "Mode: offline, binaries from $BUNDLE (commit $(tr '\n' ' ' < "$BUNDLE/commit"))"
  bin=$OUT/bin
  mkdir -p "$bin"
  for f in triage overfit resume; do xz -dc "$BUNDLE/$f.xz" > "$bin/$f" && chmod +x "$bin/$f"; done
  # The CUDA 13 libraries the binaries link by name, from the machine's Python packages.
  libs=$(python3 - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for lib in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"):
    hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "**", lib), recursive=True)]
    if not hits:
        sys.exit(f"{lib} not found under {roots}")
    d = os.path.dirname(hits[0])
    if d not in dirs:
        dirs.append(d)
print(":".join(dirs))
PY
) || { note "CUDA 13 libraries not found: $libs"; exit 1; }
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  BIN="$bin/triage"
  overfit=("$bin/overfit")
  resume=("$bin/resume")
  MODEL=$OUT/random-$(cat "$BUNDLE/model-1.5b.name")
  xz -dc "$BUNDLE/model-1.5b.header.xz" > "$OUT/model.header"
  step stand-in-model 300 python3 docs/gpu-model.py inflate "$OUT/model.header" "$MODEL" || exit 1
  rm -f "$OUT/model.header"
  note "- model: a stand-in with $(cat "$BUNDLE/model-1.5b.name")'s metadata, tensor table and size, random weights"
  # The tests need a GGUF only for the tokenizer and chat template; the stand-in has both.
  export TRIAGE_TEST_GGUF=$MODEL
fi
export TRIAGE_TEST_DEVICE=cuda
step test-overfit "$TEST_LIMIT" "${overfit[@]}"
# If it fails (docs/gpu.md: NaN at batch > 1 without dense copies), once more with candle's
# quantized CUDA products forced onto the dequantize-then-multiply path instead of MMQ/MMVQ:
# passing there points at those kernels.
step test-resume "$TEST_LIMIT" "${resume[@]}" ||
  TRIAGE_CUDA_FORCE_DMMV=1 step test-resume-dmmv "$TEST_LIMIT" "${resume[@]}"

step data 300 bash -c "'$BIN' data synth --n 2500 --seed 7 -o '$OUT/synth.jsonl' && \
  '$BIN' data split '$OUT/synth.jsonl' --by template --ratios 80,10,10 --out-dir '$OUT/synth' && \
  head -64 '$OUT/synth/val.jsonl' > '$OUT/synth/val-64.jsonl'" || exit 1

# Inference on the GPU against the CPU, same incidents, same batch mode.
python3 -c "import json,sys; [print(json.dumps({'id': x['id'], 'text': x['text']})) for x in json.load(open('tests/fixtures/incidents.json'))[:int(sys.argv[1])]]" "$N_INCIDENTS" > "$OUT/incidents.jsonl"
rm -f "$OUT/cpu.jsonl" "$OUT/cuda.jsonl"
batch=$(( N_INCIDENTS < 8 ? N_INCIDENTS : 8 ))
step infer-cuda 600 "$BIN" --model "$MODEL" infer --no-adapter --device cuda --input "$OUT/incidents.jsonl" --output "$OUT/cuda.jsonl" --batch-size "$batch"
train=$OUT/synth/train.jsonl
if [ "$TRAIN_EXAMPLES" -gt 0 ]; then
  head -n "$TRAIN_EXAMPLES" "$train" > "$OUT/synth/train-part.jsonl"
  train=$OUT/synth/train-part.jsonl
fi

# Each training config for at most GPU_SECONDS, with the peak GPU memory of the training
# process (and of the whole GPU over its idle level) sampled every 0.5 s.
config=configs/train.toml
for name in $TRAIN_VARIANTS; do
  case $name in
    plain) flags=() ;;
    checkpointing) flags=(--checkpointing) ;;
    top4) flags=(--checkpointing --top-layers 4) ;;
    *) note "- train variant $name: unknown (plain, checkpointing or top4); skipped"; continue ;;
  esac
  step "dry-run-$name" 300 "$BIN" --model "$MODEL" train --device cuda --config "$config" "${flags[@]}" \
    --data "$train" --dry-run
  grep -E "total|activations|dense|base weights" "$OUT/dry-run-$name.log" | sed 's/^ */  estimate: /' >> "$report"
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  "$BIN" --model "$MODEL" train --device cuda --config "$config" "${flags[@]}" \
    --data "$train" --val "$OUT/synth/val-64.jsonl" \
    --out "$OUT/adapter-$name" --run-dir "$OUT/run-$name" > "$OUT/train-$name.log" 2>&1 &
  pid=$!
  t0=$(date +%s)
  peak=0
  gpu_peak=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ $(( $(date +%s) - t0 )) -ge "$GPU_SECONDS" ]; then
      kill -INT "$pid"  # the trainer checkpoints and stops; `--resume` continues it
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      break
    fi
    used=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
      | awk -F', ' -v p="$pid" '$1 == p {print $2}')
    [ -n "$used" ] && [ "$used" -gt "$peak" ] && peak=$used
    all=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ -n "$all" ] && [ $(( all - base )) -gt "$gpu_peak" ] && gpu_peak=$(( all - base ))
    sleep 0.5
  done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  wait "$pid"; rc=$?
  secs=$(( $(date +%s) - t0 ))
  metrics="$OUT/run-$name/metrics.jsonl"
  steps=$(grep -c '"loss"' "$metrics" 2>/dev/null || echo 0)
  note "- train (1.5B, $config ${flags[*]}, cuda, $(wc -l < "$train") examples): exit $rc after $secs s, $steps optimizer steps$(grep -o 'error: .*' "$OUT/train-$name.log" | head -1 | sed 's/^/; /')"
  note "  - throughput: $(python3 - "$metrics" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    rows = []
steps = [r for r in rows if "tokens_per_s" in r][2:]  # the first steps warm the kernels
losses = [r["val_loss"] for r in rows if "val_loss" in r]
if steps:
    tps = sorted(r["tokens_per_s"] for r in steps)
    print(f"median {tps[len(tps) // 2]:.0f} tokens/s over {len(steps)} steps after the first two"
          f"; validation losses {', '.join(f'{x:.3f}' for x in losses)}")
else:
    print("no optimizer step after the first two")
PY
)"
  note "  - peak GPU memory of the training process: $peak MiB (the GPU's use over its idle level: $gpu_peak MiB); budget 4096 MiB: $(if [ "$peak" = 0 ] && [ "$gpu_peak" = 0 ]; then echo "not measured"; elif [ "$peak" -le 4096 ] && [ "$gpu_peak" -le 4096 ]; then echo within; else echo OVER; fi)"
done
note ""

# The same incidents on the CPU (last: the slowest step, under its own limit), then compared.
step infer-cpu "$CPU_LIMIT" "$BIN" --model "$MODEL" infer --no-adapter --input "$OUT/incidents.jsonl" --output "$OUT/cpu.jsonl" --batch-size "$batch"
note "- inference, cuda vs cpu: $(python3 - "$OUT/cpu.jsonl" "$OUT/cuda.jsonl" <<'PY'
import json, sys
def load(p):
    try:
        return [json.loads(l) for l in open(p)]
    except OSError:
        return []
a, b = load(sys.argv[1]), load(sys.argv[2])
same = sum(x.get("ticket") == y.get("ticket") for x, y in zip(a, b))
enums = sum(
    {k: v for k, v in (x.get("ticket") or {}).items() if k != "summary"}
    == {k: v for k, v in (y.get("ticket") or {}).items() if k != "summary"}
    for x, y in zip(a, b)
)
diff = 0.0
for x, y in zip(a, b):
    cx = {c["field"]: c["confidence"] for c in x.get("meta", {}).get("confidence", [])}
    cy = {c["field"]: c["confidence"] for c in y.get("meta", {}).get("confidence", [])}
    diff = max([diff] + [abs(cx[k] - cy[k]) for k in cx if k in cy])
print(f"{same} of {min(len(a), len(b))} tickets identical ({enums} with the same enum fields), "
      f"largest confidence difference {diff:.4f} ({len(a)} cpu, {len(b)} cuda)")
PY
)"

