#!/usr/bin/env bash
# One ticket from a cold process (issue #14): `triage infer < file` (process start, model load,
# the cached system prompt read from disk, one ticket) against a running llama-server answering
# one fresh request on the same messages (model already loaded, its prompt cache off, so it
# prefills the whole prompt as a first request does). Alternating, REPS rounds over the example
# incidents; the medians, their ratio and every sample go to the `one-shot` section of
# docs/benchmarks.md.
# Usage, from the repository root (builds llama-server first if needed, see docs/llama-server.sh):
#   bash docs/one-shot.sh   [MODEL=1.5b] [REPS=3] [TRIAGE=target/release/triage]
set -euo pipefail
MODEL=${MODEL:-1.5b}
REPS=${REPS:-3}
# The llama-server build (on first use) and serve_llama.
source "$(dirname "$0")/llama-server.sh"
incidents=(examples/vpn.txt examples/phishing.txt examples/printer-de.txt)
tmp=$(mktemp -d)
port=8094
serve_llama "$port" 1 one-shot-server.log
trap 'kill $llama_pid 2>/dev/null || true; rm -rf "$tmp"' EXIT

# The same messages and schema as triage (without `anyOf`, which llama.cpp's grammar
# conversion mishandles), greedy, no prompt cache.
body() {
  "$TRIAGE" --model "$MODEL" prompt --json < "$1" | python3 -c '
import json, sys
def strip(v):
    if isinstance(v, dict): return {k: strip(x) for k, x in v.items() if k != "anyOf"}
    if isinstance(v, list): return [strip(x) for x in v]
    return v
p = json.load(sys.stdin)
print(json.dumps({"model": "triage", "messages": p["messages"], "temperature": 0, "max_tokens": 320,
  "cache_prompt": False, "response_format": {"type": "json_schema",
  "json_schema": {"name": "ticket", "strict": True, "schema": strip(p["schema"])}}}))'
}
now() { date +%s.%N; }
for f in "${incidents[@]}"; do body "$f" > "$tmp/$(basename "$f").json"; done

# Not timed: the prefix cache file exists and both have read the GGUF once (page cache warm).
"$TRIAGE" --model "$MODEL" infer --no-adapter < "${incidents[0]}" > /dev/null 2>&1
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d @"$tmp/$(basename "${incidents[0]}").json" > /dev/null

: > "$tmp/samples"
for r in $(seq 1 "$REPS"); do
  for f in "${incidents[@]}"; do
    t0=$(now)
    "$TRIAGE" --model "$MODEL" infer --no-adapter < "$f" > "$tmp/triage.json" 2> /dev/null
    t1=$(now)
    curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
      -d @"$tmp/$(basename "$f").json" > "$tmp/llama.json"
    t2=$(now)
    prompt_n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("timings", {}).get("prompt_n", "?"))' "$tmp/llama.json")
    echo "$r $(basename "$f") $(echo "$t1 - $t0" | bc) $(echo "$t2 - $t1" | bc) $prompt_n" >> "$tmp/samples"
    echo "round $r $(basename "$f"): triage $(echo "$t1 - $t0" | bc) s, llama-server $(echo "$t2 - $t1" | bc) s" >&2
  done
done

python3 - "$tmp/samples" "$MODEL" "$REPS" "$(nproc)" <<'EOF'
import statistics, sys, re, subprocess
samples, model, reps, cores = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [l.split() for l in open(samples)]
tri = [float(r[2]) for r in rows]
lla = [float(r[3]) for r in rows]
mt, ml = statistics.median(tri), statistics.median(lla)
out = ["<!-- begin one-shot -->", "## One ticket from a cold process vs llama-server", "",
  f"Written by `bash docs/one-shot.sh` (MODEL={model}, REPS={reps}); machine: {cores} cores. "
  "triage: `triage infer --no-adapter < file`, timed from process start to exit (model load, the "
  "cached system prompt read from disk, one ticket). llama-server: the same GGUF already loaded, "
  "one slot, `cache_prompt: false`, so each request prefills the whole prompt as a first request "
  "does (the same messages; the schema without `anyOf`). Alternating, one at a time; the page "
  "cache is warm for both. Medians over every sample; the ratio is llama-server / triage "
  "(above 1: triage is faster).", "",
  "| | samples | median s | min s | max s |", "|---|---|---|---|---|",
  f"| triage infer (new process) | {len(tri)} | {mt:.2f} | {min(tri):.2f} | {max(tri):.2f} |",
  f"| llama-server, fresh request | {len(lla)} | {ml:.2f} | {min(lla):.2f} | {max(lla):.2f} |",
  "", f"**llama-server / triage: {ml / mt:.2f}×.**", "",
  "| round | incident | triage s | llama-server s | llama prompt tokens |", "|---|---|---|---|---|"]
out += [f"| {r[0]} | {r[1]} | {float(r[2]):.2f} | {float(r[3]):.2f} | {r[4]} |" for r in rows]
out += ["<!-- end one-shot -->"]
section = "\n".join(out)
doc = open("docs/benchmarks.md").read()
pat = re.compile(r"<!-- begin one-shot -->.*?<!-- end one-shot -->", re.S)
doc = pat.sub(lambda _: section, doc) if pat.search(doc) else doc.rstrip("\n") + "\n\n" + section + "\n"
open("docs/benchmarks.md", "w").write(doc)
print(f"triage {mt:.2f} s, llama-server {ml:.2f} s: ratio {ml / mt:.2f}x -> docs/benchmarks.md (one-shot)")
EOF
