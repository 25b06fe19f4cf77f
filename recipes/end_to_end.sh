#!/usr/bin/env bash
# The main job, on a CPU machine: both stages of the paper end to end, small.
#
#   1. Link prediction (paper section 3): the cpu-small HittER on FB15K-237
#      (recipes/pretrain_kg.sh), tested with filtered MRR / Hits@k.
#   2. Factoid QA (paper section 4): WebQSP full and filtered, MiniLM (the offline test LM)
#      without KG and with the stage-1 HittER (recipes/finetune_qa.sh), one seed each; the
#      test accuracy table at the end.
#
#   KGQA_DATA_DIR=/path/to/data bash recipes/end_to_end.sh
#
# Settings (environment; defaults fit a 2-core machine in about 25 minutes, README "Main job"):
#   OUT                  output root [runs/end_to_end]
#   KG_STEPS             cap on HittER training steps of 1,024 triples (train.max_steps);
#                        empty: the whole cpu-small preset (3 epochs, 798 steps) []
#   QA_EPOCHS_FILTERED   fine-tuning epochs on WebQSP filtered [see below]
#   QA_EPOCHS_FULL       fine-tuning epochs on WebQSP full [see below]
#   QA_LR_ADAPTERS, QA_LR_PRETRAINED  learning rates of the short CPU runs [see below]
#   QA_KG_MODE           frozen | co-trained [frozen]
#   SEEDS, SEED          seeds per QA setting and the first one [1, 333]
#   QA_EXTRA             more kgqa.train arguments, e.g. "--max_train_examples 32" (smoke runs)
#   PYTHON               the interpreter with the project installed [python]
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/end_to_end}"
KG_STEPS="${KG_STEPS:-}"
QA_EPOCHS_FILTERED="${QA_EPOCHS_FILTERED:-6}"
QA_EPOCHS_FULL="${QA_EPOCHS_FULL:-2}"
# MiniLM ships without a masked-LM head: with the paper's 5e-5 / 5e-6 and a few epochs its
# fresh head learns almost nothing, so the short CPU runs use 10x the paper's rates.
QA_LR_ADAPTERS="${QA_LR_ADAPTERS:-5e-4}"
QA_LR_PRETRAINED="${QA_LR_PRETRAINED:-5e-5}"
QA_KG_MODE="${QA_KG_MODE:-frozen}"
SEEDS="${SEEDS:-1}"
SEED="${SEED:-333}"
read -r -a qa_extra <<<"${QA_EXTRA:-}"
export PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
: "${KGQA_DATA_DIR:?set KGQA_DATA_DIR to the data root (README \"Data\")}"

start=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

kg_args=()
[[ -n $KG_STEPS ]] && kg_args=("train.max_steps=$KG_STEPS")
echo "== stage 1: HittER cpu-small on FB15K-237${KG_STEPS:+, at most $KG_STEPS steps}"
bash recipes/pretrain_kg.sh --preset cpu-small --output-dir "$OUT/hitter" "${kg_args[@]}"
echo "== stage 1 done after $(elapsed)"

freeze=()
case "$QA_KG_MODE" in
  frozen) freeze=(--freeze-kg) ;;
  co-trained) ;;
  *) echo "QA_KG_MODE must be frozen or co-trained" >&2; exit 2 ;;
esac
for split in filtered full; do
  epochs=$QA_EPOCHS_FILTERED
  [[ $split == full ]] && epochs=$QA_EPOCHS_FULL
  for kg in none "$OUT/hitter/best"; do
    tag=nokg
    [[ $kg != none ]] && tag=hitter
    echo "== stage 2: WebQSP $split, MiniLM, KG $tag, $epochs epochs ($(elapsed) so far)"
    log="$OUT/qa-$split-$tag.log"
    bash recipes/finetune_qa.sh --dataset webqsp --split "$split" --lm minilm \
      --kg-checkpoint "$kg" "${freeze[@]}" --seeds "$SEEDS" --seed "$SEED" \
      --out "$OUT/qa/webqsp-$split-$tag" -- --epochs "$epochs" \
      --lr_adapters "$QA_LR_ADAPTERS" --lr_pretrained "$QA_LR_PRETRAINED" "${qa_extra[@]}" \
      >"$log" 2>&1 || { tail -n 30 "$log"; exit 1; }
    grep -E "test accuracy" "$log" || true
  done
done

echo
echo "== link prediction (stage 1), FB15K-237 test"
cat "$OUT/hitter/test_metrics.txt"
echo
echo "== factoid QA (stage 2), WebQSP test accuracy (%), MiniLM; mean ± std over seeds"
"$PYTHON" -m kgqa.evaluate report "$OUT/qa" --out "$OUT"
echo
echo "== total $(elapsed); report in $OUT/report.md, runs in $OUT/"
