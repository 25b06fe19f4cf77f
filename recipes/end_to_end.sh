#!/usr/bin/env bash
# The main job, on a CPU machine: both stages of the paper end to end, small.
#
#   1. Link prediction (paper section 3): the cpu-base HittER on FB15K-237
#      (recipes/pretrain_kg.sh), tested with filtered MRR / Hits@k.
#   2. Factoid QA (paper section 4): WebQSP filtered, MiniLM (the offline test LM) without KG
#      and with the stage-1 HittER, frozen, read by the link head (recipes/finetune_qa.sh),
#      one seed each, 20 epochs, the two runs side by side with half the cores each; then the
#      user setting (kgqa.evaluate user: the test questions asked as kgqa.ask asks them) and the
#      test accuracy table at the end, with where the model to ask is.
#
#   KGQA_DATA_DIR=/path/to/data bash recipes/end_to_end.sh
#
# Hyper-parameters live in the presets: recipes/configs/cpu-base.yaml (stage 1) and
# qa-webqsp-link-minilm-cpu.yaml (stage 2: the recommended CPU recipe, chosen by
# recipes/kg_gain.sh). Settings (environment; README "Main job"):
#   OUT                  output root [runs/end_to_end]
#   KG_STEPS             cap on HittER training steps of 512 triples (train.max_steps, smoke
#                        runs); empty: the whole cpu-base preset (8 epochs, 4,256 steps) []
#   KG_SEED              HittER's training seed (train.seed; another seed, another HittER) [0]
#   SEEDS, SEED          seeds per QA setting and the first one [1, 333]
#   QA_EXTRA             more kgqa.train overrides for both QA runs, e.g.
#                        "train.max_train_examples=32" (smoke runs), "model.freeze_kg=false"
#                        (HittER co-trained), or the paper's block instead of the link head:
#                        "model.reader=paper" (the paper's adapters), "model.reader=paper+link"
#   PYTHON               the interpreter with the project installed [python]
set -euo pipefail
# A worker stops when this recipe is gone, even after kill -9 (hitter_core.runtime.stop_with_recipe).
export HITTER_RECIPE_PIDS="${HITTER_RECIPE_PIDS:+$HITTER_RECIPE_PIDS,}$$@$HOSTNAME"
# Ctrl-C or kill stops the workers too: long commands run in the background and the
# script waits for them (a trap runs at once during `wait`, not after a foreground command).
trap 'trap - INT TERM; kill 0' INT TERM
case "${1:-}" in
  -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
  "") ;;
  *) echo "end_to_end.sh takes no arguments (settings are environment variables; see --help)" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/end_to_end}"
KG_STEPS="${KG_STEPS:-}"
KG_SEED="${KG_SEED:-0}"
SEEDS="${SEEDS:-1}"
SEED="${SEED:-333}"
read -r -a qa_extra <<<"${QA_EXTRA:-}"
export PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
: "${KGQA_DATA_DIR:?set KGQA_DATA_DIR to the data root (README \"Data\")}"

start=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

kg_args=("train.seed=$KG_SEED")
[[ -n $KG_STEPS ]] && kg_args+=("train.max_steps=$KG_STEPS")
echo "== stage 1: HittER cpu-base on FB15K-237, seed $KG_SEED${KG_STEPS:+, at most $KG_STEPS steps}"
bash recipes/pretrain_kg.sh --preset cpu-base --output-dir "$OUT/hitter" "${kg_args[@]}" &
wait $!
echo "== stage 1 done after $(elapsed)"

# The two QA runs side by side, each on half the cores (batches of 16 short questions keep few
# threads busy).
preset=qa-webqsp-link-minilm-cpu
threads=$("$PYTHON" -c 'import os; print((len(os.sched_getaffinity(0)) + 1) // 2)')
echo "== stage 2: WebQSP filtered, preset $preset, without KG and with HittER, side by side," \
  "$threads thread(s) each ($(elapsed) so far)"
pids=() logs=()
for kg in none "$OUT/hitter/best"; do
  tag=nokg
  [[ $kg != none ]] && tag=hitter
  log="$OUT/qa-filtered-$tag.log"
  OMP_NUM_THREADS=$threads bash recipes/finetune_qa.sh --preset "$preset" \
    --kg-checkpoint "$kg" --seeds "$SEEDS" --seed "$SEED" --out "$OUT/qa/webqsp-filtered-$tag" \
    -- "${qa_extra[@]}" >"$log" 2>&1 &
  pids+=($!) logs+=("$log")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { tail -n 30 "${logs[$i]}"; exit 1; }
  grep -E "test accuracy" "${logs[$i]}" || true
done
echo "== stage 2 done after $(elapsed)"

echo "== the user setting: the test questions asked as kgqa.ask asks them (topic linked, answer" \
  "length unknown, entity answers; $(elapsed) so far)"
"$PYTHON" -m kgqa.evaluate user "$OUT"/qa/webqsp-filtered-*/seed*/

echo
echo "== link prediction (stage 1), FB15K-237 test"
cat "$OUT/hitter/test_metrics.txt"
echo
echo "== factoid QA (stage 2), WebQSP test accuracy (%), MiniLM; mean ± std over seeds"
"$PYTHON" -m kgqa.evaluate report "$OUT/qa" --out "$OUT"
echo
echo "== total $(elapsed); report in $OUT/report.md, runs in $OUT/"
echo "== ask the KG model (one question a line with --interactive):"
echo "   python -m kgqa.ask $OUT/qa/webqsp-filtered-hitter/seed$SEED/best \"what is the capital of somalia?\""
