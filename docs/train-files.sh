# Sourced by docs/results.sh and docs/handwritten.sh: the file each shipped default adapter was
# trained on (adapters/default-<model>/command). Both scripts fit the TF-IDF baseline they
# compare the adapter with on the same file, so the baseline sees what the adapter saw.
synth_train() { # model
  case $1 in
    0.5b) echo data/results/synth-4800/train.jsonl ;;
    *) echo data/results/synth/train.jsonl ;;
  esac
}
