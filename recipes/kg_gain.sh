#!/usr/bin/env bash
# Does the knowledge graph make answers better? Every row of the experiment, on one protocol
# (recipes/configs/qa-kg-gain-minilm-cpu.yaml: MiniLM, 20 epochs, checkpoint selected on dev,
# test read once) and paired seeds, then the report in the form of paper Table 6.
#
#   bash recipes/kg_gain.sh --kg-checkpoint runs/hitter-cpu-base/best --seeds 5
#   bash recipes/kg_gain.sh --dataset freebaseqa --rows lm,copy,text --seeds 3 --jobs 2
#
# Rows (--rows, comma-separated; default all):
#   lm              the plain LM (no KG)
#   text            the plain LM with the topic's neighbourhood as text (kgqa.verbalise)
#   paper           + HittER through the paper's cross-attention adapters
#   gated           + HittER through zero-initialised gated adapters
#   paper-untrained, paper-shuffled, gated-untrained, gated-shuffled   the adapter rows'
#                   two controls: an untrained HittER of the same shape; shuffled topics
#   copy            + HittER read by the copy head (kgqa.copy_head), 256 neighbours
#   copy-names      the copy head whose keys also read names and relation texts
#   copy-cotrained  the copy head, HittER co-trained
#   copy-names-cotrained   copy-names, HittER co-trained
#   copy-untrained  control: the copy head over an untrained HittER of the same shape
#   copy-shuffled   control: the copy head, every question given another question's topic
#   copy-names-untrained, copy-names-shuffled   the same two controls for copy-names
#   link            + HittER's own link prediction answers (kgqa.link_head): no neighbour list
#   link-cotrained  the link head, HittER co-trained
#   link-untrained, link-shuffled   the two controls for the link head
#   link-cotrained-untrained, link-cotrained-shuffled   the same two for link-cotrained (an
#                   untrained HittER co-trained on the questions; shuffled topics, co-trained)
#   link-conf       the link head whose weight also reads how sure it is (model.link_confidence)
#   link-conf-untrained, link-conf-shuffled   its two controls
# Options: --dataset webqsp|freebaseqa [webqsp], --split filtered|full [filtered],
#   --kg-checkpoint DIR (HittER, for the KG rows), --seeds N [5], --seed S [333],
#   --jobs J (runs at a time, one thread each; [1] = one run with all threads),
#   --out DIR [runs/kg-gain/<dataset>-<split>], -- OVERRIDES... for every run.
# A run whose metrics.json exists is skipped and an interrupted one resumed (kgqa.train
# --resume): rerun the same command to continue.
# Environment: PYTHON [python], KGQA_DATA_DIR (data root).
set -euo pipefail
# A worker stops when this recipe is gone, even after kill -9 (hitter_core.cli.stop_with_recipe).
export HITTER_RECIPE_PIDS="${HITTER_RECIPE_PIDS:+$HITTER_RECIPE_PIDS,}$$@$HOSTNAME"
# Ctrl-C or kill stops the workers too: long commands run in the background and the
# script waits for them (a trap runs at once during `wait`, not after a foreground command).
trap 'trap - INT TERM; kill 0' INT TERM
cd "$(dirname "$0")/.."

dataset=webqsp split=filtered kg="" seeds=5 seed=333 jobs=1 out="" rows="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dataset) dataset="$2"; shift 2 ;;
    --split) split="$2"; shift 2 ;;
    --kg-checkpoint) kg="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --rows) rows="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "kg_gain.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
rows="${rows:-lm,text,paper,gated,paper-untrained,paper-shuffled,gated-untrained,gated-shuffled,copy,copy-names,copy-cotrained,copy-names-cotrained,copy-untrained,copy-shuffled,copy-names-untrained,copy-names-shuffled,link,link-cotrained,link-untrained,link-shuffled,link-cotrained-untrained,link-cotrained-shuffled,link-conf,link-conf-untrained,link-conf-shuffled}"
out="${out:-runs/kg-gain/$dataset-$split}"
export PYTHON="${PYTHON:-python}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

copy=(model.adapter=none model.copy_head=true model.max_neighbours=256)
link=(model.adapter=none model.link_head=true)
conf=("${link[@]}" model.link_confidence=true)
row_overrides() {  # the overrides of one row
  case "$1" in
    lm) echo "model.kg_checkpoint=null" ;;
    text) echo "model.kg_checkpoint=null model.kg_text_length=128" ;;
    paper) echo "model.kg_checkpoint=$kg model.adapter=paper" ;;
    gated) echo "model.kg_checkpoint=$kg model.adapter=gated" ;;
    paper-untrained | gated-untrained)
      echo "model.kg_checkpoint=$kg model.adapter=${1%-*} model.kg_init=random" ;;
    paper-shuffled | gated-shuffled)
      echo "model.kg_checkpoint=$kg model.adapter=${1%-*} train.shuffle_topics=true" ;;
    copy) echo "model.kg_checkpoint=$kg ${copy[*]}" ;;
    copy-names) echo "model.kg_checkpoint=$kg ${copy[*]} model.copy_name_keys=true" ;;
    copy-cotrained) echo "model.kg_checkpoint=$kg ${copy[*]} model.freeze_kg=false" ;;
    copy-names-cotrained)
      echo "model.kg_checkpoint=$kg ${copy[*]} model.copy_name_keys=true model.freeze_kg=false" ;;
    copy-untrained) echo "model.kg_checkpoint=$kg ${copy[*]} model.kg_init=random" ;;
    copy-shuffled) echo "model.kg_checkpoint=$kg ${copy[*]} train.shuffle_topics=true" ;;
    copy-names-untrained)
      echo "model.kg_checkpoint=$kg ${copy[*]} model.copy_name_keys=true model.kg_init=random" ;;
    copy-names-shuffled)
      echo "model.kg_checkpoint=$kg ${copy[*]} model.copy_name_keys=true train.shuffle_topics=true" ;;
    link) echo "model.kg_checkpoint=$kg ${link[*]}" ;;
    link-cotrained) echo "model.kg_checkpoint=$kg ${link[*]} model.freeze_kg=false" ;;
    link-untrained) echo "model.kg_checkpoint=$kg ${link[*]} model.kg_init=random" ;;
    link-shuffled) echo "model.kg_checkpoint=$kg ${link[*]} train.shuffle_topics=true" ;;
    link-cotrained-untrained)
      echo "model.kg_checkpoint=$kg ${link[*]} model.freeze_kg=false model.kg_init=random" ;;
    link-cotrained-shuffled)
      echo "model.kg_checkpoint=$kg ${link[*]} model.freeze_kg=false train.shuffle_topics=true" ;;
    link-conf) echo "model.kg_checkpoint=$kg ${conf[*]}" ;;
    link-conf-untrained) echo "model.kg_checkpoint=$kg ${conf[*]} model.kg_init=random" ;;
    link-conf-shuffled) echo "model.kg_checkpoint=$kg ${conf[*]} train.shuffle_topics=true" ;;
    *) echo "kg_gain.sh: unknown row '$1' (see --help)" >&2; return 2 ;;
  esac
}

tasks=()
for row in ${rows//,/ }; do
  sets=$(row_overrides "$row")
  if [[ $sets == *kg_checkpoint=[!n]* && ! -f "$kg/config.json" ]]; then
    echo "kg_gain.sh: row $row needs --kg-checkpoint DIR (a HittER checkpoint)" >&2; exit 2
  fi
  for ((i = 0; i < seeds; i++)); do
    s=$((seed + i)) dir="$out/$row/seed$((seed + i))"
    [[ -f $dir/metrics.json ]] && { echo "done: $dir"; continue; }
    tasks+=("$dir|train.dataset=$dataset train.split=$split train.seed=$s $sets ${extra[*]}")
  done
done

run_one() {  # "dir|overrides": one kgqa.train run, its log beside it
  local dir=${1%%|*} sets=${1#*|}
  mkdir -p "$dir"
  echo "== $dir ($(date +%H:%M:%S))"
  # shellcheck disable=SC2086
  "$PYTHON" -m kgqa.train --preset qa-kg-gain-minilm-cpu --output-dir "$dir" --resume $sets \
    >>"$dir/train.log" 2>&1 || { echo "FAILED: $dir (see $dir/train.log)" >&2; return 1; }
  grep -h "test accuracy" "$dir/train.log" | sed "s|^|   $dir: |"
}
export -f run_one
if [[ $jobs -gt 1 ]]; then export OMP_NUM_THREADS=1; fi
if [[ ${#tasks[@]} -gt 0 ]]; then
  printf '%s\n' "${tasks[@]}" | xargs -d '\n' -P "$jobs" -I{} bash -c 'run_one "$1"' _ {} &
  wait $!
fi
"$PYTHON" -m kgqa.evaluate report "$out" --out "$out"
