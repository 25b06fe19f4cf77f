#!/usr/bin/env bash
# Keep finished QA runs (kgqa.train output directories) in bench/results: metrics.json,
# run_config.yaml and the test predictions gzipped (gzip -9n, byte-stable; the user setting's
# summary and answers too where kgqa.evaluate user ran), which
# `python -m kgqa.evaluate report` and bench/qa_ceilings.py read as they are. Checkpoints and
# logs stay behind. A run under runs/ lands at the same path under bench/results/:
#
#   bash bench/keep_results.sh runs/kg-gain/webqsp-filtered-hitter-e12/paper/seed*
#
# Predictions are kept gzipped because the GPU suite carries the whole working tree within
# the device tool's 64 MiB (bench/gpu/prepare.sh checks it): about 14 KB a WebQSP run, not 92.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -gt 0 && $1 != -h && $1 != --help ]] || { sed -n '2,10p' "$0"; exit $(( $# == 0 ? 2 : 0 )); }
for run in "$@"; do
  run=${run%/}
  [[ -f $run/metrics.json ]] || { echo "keep_results.sh: $run: no metrics.json (not a finished run)" >&2; exit 2; }
  [[ $run == runs/* ]] || { echo "keep_results.sh: $run: not under runs/" >&2; exit 2; }
  target=bench/results/${run#runs/}
  mkdir -p "$target"
  cp "$run/metrics.json" "$run/run_config.yaml" "$target/"
  gzip -9n <"$run/predictions.test.jsonl" >"$target/predictions.test.jsonl.gz"
  if [[ -f $run/user_setting.test.json ]]; then  # kgqa.evaluate user's summary and answers
    cp "$run/user_setting.test.json" "$target/"
    gzip -9n <"$run/predictions.user.test.jsonl" >"$target/predictions.user.test.jsonl.gz"
  fi
  echo "kept: $target"
done
