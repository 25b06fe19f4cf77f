#!/usr/bin/env bash
# Does the knowledge graph make answers better? Every row of the experiment, on one protocol
# (recipes/configs/qa-kg-gain-minilm-cpu.yaml: MiniLM, 20 epochs, checkpoint selected on dev,
# test read once) and paired seeds, then the report in the form of paper Table 6.
#
#   bash recipes/kg_gain.sh --kg-checkpoint runs/hitter-cpu-base/best --seeds 5
#   bash recipes/kg_gain.sh --dataset freebaseqa --rows lm,copy,text --seeds 3 --jobs 2
#
# Rows (--rows, comma-separated; default all): READER[-cotrained][-untrained|-shuffled|-frequency]
#   READER          lm (the plain LM, no KG), or a reader of kgqa.readers (model.reader):
#                   text (the neighbourhood as text), paper, gated (cross-attention adapters),
#                   copy, copy-names (the copy head, 256 neighbours), link, link-conf (the link
#                   head; link-confidence), or an adapter reader + a head, e.g. paper+link
#   -cotrained      HittER co-trained (model.freeze_kg=false; the protocol freezes it)
#   -untrained      control: an untrained HittER of the same shape (model.kg_init=random)
#   -shuffled       control: every question given another question's topic
#   -frequency      control (link heads): answer frequencies in the train graph instead of
#                   HittER's scores (model.kg_init=frequency)
# Options: --dataset webqsp|freebaseqa [webqsp], --split filtered|full [filtered],
#   --kg-checkpoint DIR (HittER, for the KG rows), --seeds N [5], --seed S [333],
#   --jobs J (runs at a time, one thread each; [1] = one run with all threads),
#   --out DIR [runs/kg-gain/<dataset>-<split>], -- OVERRIDES... for every run.
# A run whose metrics.json exists is skipped and an interrupted one resumed (kgqa.train
# --resume): rerun the same command to continue.
# Environment: PYTHON [python], KGQA_DATA_DIR (data root).
set -euo pipefail
# A worker stops when this recipe is gone, even after kill -9 (hitter_core.runtime.stop_with_recipe).
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
rows="${rows:-lm,text,paper,gated,paper-untrained,paper-shuffled,gated-untrained,gated-shuffled,copy,copy-names,copy-cotrained,copy-names-cotrained,copy-untrained,copy-shuffled,copy-names-untrained,copy-names-shuffled,link,link-cotrained,link-untrained,link-shuffled,link-frequency,link-cotrained-untrained,link-cotrained-shuffled,link-conf,link-conf-untrained,link-conf-shuffled}"
out="${out:-runs/kg-gain/$dataset-$split}"
export PYTHON="${PYTHON:-python}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

row_overrides() {  # the overrides of one row: READER[-cotrained][-untrained|-shuffled|-frequency]
  local row=$1 reader sets=""
  case "$row" in
    *-untrained) sets+=" model.kg_init=random"; row=${row%-untrained} ;;
    *-frequency) sets+=" model.kg_init=frequency"; row=${row%-frequency} ;;
    *-shuffled) sets+=" train.shuffle_topics=true"; row=${row%-shuffled} ;;
  esac
  [[ $row == *-cotrained ]] && { sets+=" model.freeze_kg=false"; row=${row%-cotrained}; }
  reader=$row
  [[ $reader == *link-conf ]] && reader=${reader}idence  # the row's short name
  case "$reader" in
    lm) echo "model.reader=none model.kg_checkpoint=null"; return ;;
    text) echo "model.reader=text model.kg_checkpoint=null"; return ;;
    *copy*) sets+=" model.max_neighbours=256" ;;
  esac
  echo "model.kg_checkpoint=$kg model.reader=$reader$sets"
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
