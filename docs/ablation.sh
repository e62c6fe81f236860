#!/usr/bin/env bash
# What the number of adapted layers (`top_layers`) costs in accuracy, on the same training
# budget: three 0.5B adapters trained on the same 400 synthetic examples for the same 50
# optimizer steps (one epoch at batch 8), with the adapter on the top 4, the top 8 (the
# default) and all 24 layers; each evaluated on the first 128 validation examples (never the
# test split). Writes docs/ablation.md, which docs/results.sh includes.
# Usage, from the repository root (about 2 h on 2 cores):
#   bash docs/ablation.sh   [TRIAGE=target/release/triage] [RUNS=$HOME/.cache/triage/runs]
set -euo pipefail
TRIAGE=${TRIAGE:-target/release/triage}
RUNS=${RUNS:-$HOME/.cache/triage/runs}
OUT=data/results
mkdir -p "$OUT" "$RUNS" reports
"$TRIAGE" data synth --n 2500 --seed 7 -o "$OUT/synth.jsonl"
"$TRIAGE" data split "$OUT/synth.jsonl" --by template --ratios 80,10,10 --out-dir "$OUT/synth"
shuf -n 400 --random-source=<(yes) "$OUT/synth/train.jsonl" > "$OUT/synth/train-400.jsonl"
head -64 "$OUT/synth/val.jsonl" > "$OUT/synth/val-64.jsonl"
head -128 "$OUT/synth/val.jsonl" > "$OUT/synth/val-128.jsonl"

for k in 4 8 24; do
  name=ablate-0.5b-k$k
  if [ ! -f "$RUNS/$name/adapter/triage.json" ]; then
    resume=""; [ -f "$RUNS/$name/checkpoint/state.json" ] && resume="--resume"
    "$TRIAGE" --model 0.5b train --data "$OUT/synth/train-400.jsonl" --val "$OUT/synth/val-64.jsonl" \
      --config configs/train.toml --steps 50 --top-layers "$k" \
      --run-dir "$RUNS/$name" --out "$RUNS/$name/adapter" $resume
  fi
  [ -f "reports/$name/report.json" ] || "$TRIAGE" --model 0.5b eval --data "$OUT/synth/val-128.jsonl" \
    --no-zero-shot --adapter "$RUNS/$name/adapter" --out "reports/$name"
done
[ -f reports/ablate-0.5b-zero-shot/report.json ] || "$TRIAGE" --model 0.5b eval \
  --data "$OUT/synth/val-128.jsonl" --no-adapter --out reports/ablate-0.5b-zero-shot

python3 - "$RUNS" <<'EOF' > docs/ablation.md
import json, sys, os
runs = sys.argv[1]
rows = []
def acc(report):
    s = json.load(open(report))["report"]["systems"][-1]
    f = {x["field"]: x["accuracy"] for x in s["fields"]}
    return f, s["exact_match"]
for k in (4, 8, 24):
    name = f"ablate-0.5b-k{k}"
    steps = [json.loads(l) for l in open(f"{runs}/{name}/metrics.jsonl") if '"tokens_per_s"' in l]
    tps = sum(s["tokens_per_s"] for s in steps) / len(steps)
    val = [json.loads(l)["val_loss"] for l in open(f"{runs}/{name}/metrics.jsonl") if '"val_loss"' in l]
    f, allr = acc(f"reports/{name}/report.json")
    rows.append((f"top {k}" if k < 24 else "all 24", tps, val[0], val[-1], f, allr))
f, allr = acc("reports/ablate-0.5b-zero-shot/report.json")
fields = list(f)
print("## Adapted layers: what `top_layers` costs in accuracy\n")
print("Written by `bash docs/ablation.sh`: three 0.5B adapters, the same 400 synthetic training examples,")
print("50 optimizer steps (one epoch at batch 8), seed and learning rate; the adapter on the top 4, top 8")
print("(the default) or all 24 layers. Accuracy on the first 128 validation examples (not the test split).")
print("Steps' tokens/s were measured while the runs shared the machine with other work: compare rows")
print("with `docs/benchmarks.md`, not across machines.\n")
print("| adapted layers | step tok/s | val loss before → after | " + " | ".join(fields) + " | all fields |")
print("|---" * (4 + len(fields)) + "|")
print("| none (zero-shot) | – | – | " + " | ".join(f"{100*f[x]:.1f}%" for x in fields) + f" | {100*allr:.1f}% |")
for name, tps, v0, v1, f, allr in rows:
    print(f"| {name} | {tps:.1f} | {v0:.3f} → {v1:.3f} | " + " | ".join(f"{100*f[x]:.1f}%" for x in fields) + f" | {100*allr:.1f}% |")
EOF
echo "wrote docs/ablation.md"
