# Sourced by docs/results.sh and docs/handwritten.sh: the file each shipped default adapter was
# trained on (adapters/default-<model>/command), and how a report records the build that decoded. Both scripts fit the TF-IDF baseline they
# compare the adapter with on the same file, so the baseline sees what the adapter saw.
synth_train() { # model
  case $1 in
    0.5b) echo data/results/synth-4800/train.jsonl ;;
    *) echo data/results/synth/train.jsonl ;;
  esac
}

eval_into() { # report-dir build eval-command...: runs it, then records in report-dir/build the
  # last build that decoded: this one if it decoded anything (a journal grew or started over),
  # else the one recorded when the journals were last written (a run resumed to the end
  # decodes nothing, and its tickets are the earlier build's).
  local r=$1 build=$2 before
  shift 2
  before=$(stat -c '%n %s %Y' "$r"/journal-*.jsonl 2>/dev/null || true)
  "$@"
  if [ "$before" != "$(stat -c '%n %s %Y' "$r"/journal-*.jsonl 2>/dev/null || true)" ] || [ ! -s "$r/build" ]; then
    echo "$build" > "$r/build"
  fi
}
