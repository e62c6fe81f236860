#!/usr/bin/env bash
# Regenerates docs/results.md: the TF-IDF baseline vs the base model zero-shot vs the shipped
# adapter, in the same run, on
#   1. a held-out split of the synthetic default-taxonomy data (split by scenario, so test
#      scenarios are never seen in training): the 1.5B with adapters/default-1.5b and the 0.5B
#      with adapters/default-0.5b;
#   2. the shared customer-support dataset (its three releases together, split by
#      near-duplicate clusters) with its own taxonomy: the 1.5B with adapters/cs-1.5b.
# Each run names its adapter (`--adapter`, the one `triage eval` would apply by default from
# adapters/) and keeps a copy of its triage.json beside the report. Usage, from the repository root (about 3-4 h on 2 cores with nothing
# else running, the whole customer-support test split included; N_CS=200 saves about 1.5 h):
#   bash docs/results.sh            [TRIAGE=target/release/triage] [TRIAGE_BUILD=<commit>] [N_CS=0: all] [N_SYNTH=0: all]
#                                   [ONLY="synth-1.5b synth-0.5b cs-1.5b": the evaluations to rerun]
# Each evaluation writes reports/results-<name>/ and journals every decoded example there, so a
# rerun after an interruption continues where it stopped (`eval --resume`; a journal of another
# model, adapter, calibration or data is started over); docs/results.md is assembled from the reports
# that exist (with their dates), and a section without a report keeps the text it had in the
# previous docs/results.md.
set -euo pipefail
TRIAGE=${TRIAGE:-target/release/triage}
# The build each section names: TRIAGE_BUILD, else this tree's commit when TRIAGE is its own
# release build, else the binary's path.
if [ -n "${TRIAGE_BUILD:-}" ]; then BUILD=$TRIAGE_BUILD
elif [ "$TRIAGE" = target/release/triage ]; then
  BUILD=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || BUILD="$BUILD with uncommitted changes"
else BUILD=$TRIAGE; fi
N_CS=${N_CS:-0}
N_SYNTH=${N_SYNTH:-0}
ONLY=${ONLY:-synth-1.5b synth-0.5b cs-1.5b}
CS_TAXONOMY=configs/taxonomy/customer-support.toml
CS_DIR=../shared/datasets/customer-support-tickets
OUT=data/results
mkdir -p "$OUT" reports
. docs/train-files.sh # synth_train: each default adapter's training file; eval_into

# The same data as the training runs (README, "Training"): deterministic seeds.
"$TRIAGE" data synth --n 2500 --seed 7 -o "$OUT/synth.jsonl"
"$TRIAGE" data split "$OUT/synth.jsonl" --by template --ratios 80,10,10 --out-dir "$OUT/synth"
for v in v3-5lang v4-en-de v5-en-de; do
  "$TRIAGE" --taxonomy "$CS_TAXONOMY" data import "$CS_DIR/tickets-$v.csv" \
    --map text=body --map subject=subject --map category=queue --map priority=priority \
    --map request_type=type --map lang=language --source "cs-$v" -o "$OUT/cs-$v.jsonl"
done
cat "$OUT/cs-v3-5lang.jsonl" "$OUT/cs-v4-en-de.jsonl" "$OUT/cs-v5-en-de.jsonl" > "$OUT/cs.jsonl"
"$TRIAGE" --taxonomy "$CS_TAXONOMY" data split "$OUT/cs.jsonl" --by hash --ratios 80,10,10 --out-dir "$OUT/cs"
# default-0.5b (v4) trained on a larger draw of the same scenarios, 10 % of its reports with an
# injected instruction, split with --keep so every validation and test scenario of $OUT/synth
# stays out of training (adapters/default-0.5b/command). Each section's baseline is fitted on
# its adapter's training file (docs/train-files.sh).
"$TRIAGE" data synth --n 4800 --seed 11 --injections 0.1 -o "$OUT/synth-4800.jsonl"
"$TRIAGE" data split "$OUT/synth-4800.jsonl" --by template --keep "$OUT/synth" --out-dir "$OUT/synth-4800"

limit() { [ "$1" -gt 0 ] && echo "--limit $1" || true; }
evaluate() { # name model split train limit adapter [global flags...]: reports/results-<name>, unless ONLY leaves it out
  local name=$1 model=$2 split=$3 train=$4 n=$5 adapter=$6; shift 6
  case " $ONLY " in *" $name "*) ;; *) return 0;; esac
  local r=reports/results-$name
  # The section names the last build that decoded it (docs/train-files.sh).
  eval_into "$r" "$BUILD" "$TRIAGE" --model "$model" "$@" eval --data "$OUT/$split/test.jsonl" \
    --train "$train" --adapter "$adapter" $(limit "$n") --out "$r" --resume
  echo "$train" > "reports/results-$name/train" # and what its baseline was fitted on
  cp "$adapter/triage.json" "reports/results-$name/adapter-triage.json" # and what the adapter was
}
evaluate synth-1.5b 1.5b synth "$(synth_train 1.5b)" "$N_SYNTH" adapters/default-1.5b
evaluate synth-0.5b 0.5b synth "$(synth_train 0.5b)" "$N_SYNTH" adapters/default-0.5b
evaluate cs-1.5b 1.5b cs "$OUT/cs/train.jsonl" "$N_CS" adapters/cs-1.5b --taxonomy "$CS_TAXONOMY"

stale() { # made-sha256 split report: a section measured on another version of the split says so
  [ "$1" = "$(sha256sum "$OUT/$2/test.jsonl" | cut -d' ' -f1)" ] && return 0
  echo "**Measured on an earlier version of this test split**: the data has been regenerated"
  echo "since (new seeds, import or split), so these figures are not of today's split. \`ONLY=${3#results-} bash"
  echo "docs/results.sh\` measures it again."
  echo
}

report_field() { # report.json key: the report object's field (not a run's), '?' if unreadable
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["report"][sys.argv[2]])' "$1" "$2" 2>/dev/null || echo '?'
}

trained_on() { # report train: ends section's sentence with what its adapter records of its training file
  python3 - "reports/$1/adapter-triage.json" "$2" <<'PY' || echo "the file its adapter was trained on (unchecked: the check failed)."
import hashlib, json, sys
meta, train = sys.argv[1], sys.argv[2]
try:
    files = [d for d in json.load(open(meta)).get("data", []) if d.get("role") in ("train", "dataset")]
    recorded = str(files[0]["sha256"]) if files else None
except (OSError, ValueError, KeyError, TypeError, AttributeError):
    recorded = None
try:
    actual = hashlib.sha256(open(train, "rb").read()).hexdigest()
except OSError:
    actual = None
if actual is None:
    print("the file its adapter was trained on (unchecked: the file cannot be read now).")
elif recorded is None:
    print("the file its adapter was trained on (by its `command`; the adapter's `triage.json` does")
    print("not record the sha256 of its training file).")
elif recorded.lower() == actual:
    print("the file its adapter was trained on (the sha256 its `triage.json` records).")
else:
    print(f"**not the bytes its adapter was trained on**: its `triage.json` records sha256")
    print(f"{recorded[:16]}…, so the file has changed since (or it names another file).")
PY
}

section() { # report title split
  echo "## $2"
  echo
  if [ ! -f "reports/$1/report.md" ]; then
    # No report here (reports/ is not committed): keep the section the last run wrote.
    local kept
    kept=$(awk -v t="## $2" '$0==t{p=1; next} /^## /{p=0} p' "$PREV" | sed '/./,$!d')
    if [ -n "$kept" ] && ! grep -q '^Not measured yet' <<<"$kept"; then
      grep -q '^\*\*Measured on an earlier version' <<<"$kept" ||
        stale "$(grep -o 'test split sha256 [0-9a-f]*' <<<"$kept" | cut -d' ' -f4)" "$3" "$1"
      echo "$kept"
      echo
      return
    fi
    echo "Not measured yet: its adapter is still training (\`ONLY=${1#results-} bash docs/results.sh\` adds it)."
    echo
    return
  fi
  local n total built
  built=$(cat "reports/$1/build" 2>/dev/null || echo "a build this report did not record")
  n=$(report_field "reports/$1/report.json" examples)
  total=$(grep -c . "$OUT/$3/test.jsonl")
  # The date and build of the last decoding (the build file is rewritten only then).
  local when=reports/$1/build
  [ -f "$when" ] || when=reports/$1/report.md
  echo "Evaluated on $(date -u -r "$when" +%Y-%m-%d) with \`triage\` built from $built,"
  if [ "$n" = "$total" ]; then echo "on all $n examples of the test split."; else echo "on the first $n of the test split's $total examples."; fi
  if [ -f "reports/$1/train" ]; then
    local train
    train=$(cat "reports/$1/train")
    echo "The baseline was fitted on the $(grep -c . "$train") training examples of \`$train\`,"
    trained_on "$1" "$train"
  fi
  echo
  local made
  made=$(report_field "reports/$1/report.json" dataset_sha256)
  [ "$made" != "?" ] && echo "<!-- test split sha256 $made -->" && echo
  stale "$made" "$3" "$1"
  # The overview (everything before the first per-system section) ...
  awk '/^## /{n++} n<2 && !/^# /' "reports/$1/report.md" | sed -e 's/^## /### /'
  # ... then the adapter's language and reliability tables.
  awk '/^## adapter/{a=1; next} /^## /{a=0} a && /^### (By language|Reliability)/{p=1} a && /^### (Review|Per class|Worst)/{p=0} a && p' \
    "reports/$1/report.md" | sed -e 's/^### /#### Adapter: /'
  echo
}

PREV=$(mktemp)
trap 'rm -f "$PREV"' EXIT
cp docs/results.md "$PREV" 2>/dev/null || true
{
  echo "# Reference results"
  echo
  echo "Generated by \`bash docs/results.sh\` on $(date -u +%Y-%m-%d); each section names the build"
  echo "and the date it was measured with"
  echo "(machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))."
  echo "Full reports (per class, worst errors, review thresholds, confusion matrices):"
  echo "\`reports/results-*/\`."
  echo
  echo "Systems, in the same run on the same examples: the TF-IDF + logistic-regression baseline"
  echo "(fitted on the training examples of the section's adapter), the base model zero-shot with"
  echo "constrained decoding, and the shipped adapter (\`adapters/\`, applied by default). Latencies"
  echo "are per example, often measured beside a training run on the same cores (speed figures:"
  echo "\`docs/benchmarks.md\`)."
  echo "\"Reliability\" groups every field decision by its confidence: a calibrated model is right"
  echo "about as often as its confidence says (sections measured by newer builds also give each"
  echo "bucket's mean confidence and the expected calibration error)."
  echo
  [ -f docs/results-notes.md ] && cat docs/results-notes.md && echo
  section results-synth-1.5b "Synthetic test split, Qwen2.5-Coder 1.5B" synth
  section results-synth-0.5b "Synthetic test split, Qwen2.5-Coder 0.5B" synth
  section results-cs-1.5b "Customer-support test split, Qwen2.5-Coder 1.5B" cs
  if [ -f docs/ablation.md ]; then cat docs/ablation.md; fi
} | cat -s > docs/results.md.tmp # one blank line between sections, kept or rebuilt
mv docs/results.md.tmp docs/results.md # whole: a kill while writing leaves the old page
echo "wrote docs/results.md"
