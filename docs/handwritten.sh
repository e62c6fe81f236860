#!/usr/bin/env bash
# The shipped default adapters on the hand-written incidents; rewrites the measured part of
# docs/handwritten.md (between its `begin measured` / `end measured` markers; the analysis
# around it is written by hand). For each model, one `triage eval` run holds all three systems:
# TF-IDF (fitted on the file the model's shipped adapter was trained on, docs/train-files.sh),
# the base model zero-shot and the shipped adapter. Each run journals every example (`--resume`
# continues an interrupted one).
# Usage, from the repository root, after docs/results.sh's data steps
# (data/results/synth/train.jsonl, data/results/synth-4800/train.jsonl):
#   bash docs/handwritten.sh   [TRIAGE=target/release/triage] [MODELS="1.5b 0.5b"] [BUILD=<commit of TRIAGE>]
set -euo pipefail
TRIAGE=${TRIAGE:-target/release/triage}
MODELS=${MODELS:-1.5b 0.5b}
BUILD=${BUILD:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DATA=data/handwritten/incidents.jsonl
. docs/train-files.sh # synth_train: each default adapter's training file; eval_into
for m in $MODELS; do
  t=$(synth_train "$m")
  [ -f "$t" ] || { echo "$t is missing: run docs/results.sh (its data steps) first" >&2; exit 1; }
  r=reports/handwritten-$m
  # Records the last build that decoded it (docs/train-files.sh).
  eval_into "$r" "$BUILD" "$TRIAGE" --model "$m" eval --data "$DATA" --train "$t" --out "$r" --resume
  echo "$t" > "$r/train"
done
measured=$(mktemp)
trap 'rm -f "$measured"' EXIT
{
  echo "<!-- begin measured: written by docs/handwritten.sh, do not edit by hand -->"
  echo "Measured on $(date -u +%Y-%m-%d), models: $MODELS; decoded by \`triage\` built from" \
    "$(for m in $MODELS; do printf '%s (%s), ' "$(cat "reports/handwritten-$m/build")" "$m"; done | sed 's/, $//')."
  echo
  python3 docs/handwritten.py "$MODELS" "$DATA"
  echo "<!-- end measured -->"
} > "$measured"
python3 - "$measured" docs/handwritten.md <<'EOF'
import sys
block, path = open(sys.argv[1]).read(), sys.argv[2]
text = open(path).read()
a, b = text.find("<!-- begin measured"), text.find("<!-- end measured -->")
if a < 0 or b < 0:
    sys.exit(f"{path}: no begin/end measured markers")
import os
with open(path + ".tmp", "w") as f:  # replaced whole: a kill mid-write leaves the old page
    f.write(text[:a] + block + text[b + len("<!-- end measured -->\n"):])
os.replace(path + ".tmp", path)
EOF
echo "wrote docs/handwritten.md"
