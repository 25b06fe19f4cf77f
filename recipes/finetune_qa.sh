#!/usr/bin/env bash
# QA fine-tuning of the KG-enhanced masked LM (paper section 4, Table 6): one run of
# kgqa.train per seed (through the DeepSpeed launcher when --nproc > 1), then the accuracy table of every run
# under the output directory (python -m kgqa.evaluate report).
#
#   bash recipes/finetune_qa.sh --dataset webqsp --split filtered \
#       --kg-checkpoint runs/hitter-fb15k-237/best --seeds 5
#   bash recipes/finetune_qa.sh --preset qa-webqsp-minilm-cpu --kg-checkpoint none \
#       --seeds 3 -- train.epochs=5                          # CPU, no-KG baseline
#
# Options (defaults in brackets; unset ones come from the preset):
#   --preset NAME|FILE            recipes/configs/<NAME>.yaml or a YAML file [qa-paper]
#   --dataset webqsp|freebaseqa   train.dataset
#   --split full|filtered         train.split
#   --kg-checkpoint DIR|none      HittER checkpoint (save_pretrained dir) or none [none]
#   --freeze-kg                   keep HittER frozen (model.freeze_kg=true)
#   --seeds N                     runs with seeds SEED, SEED+1, ..., SEED+N-1 [1]
#   --seed SEED                   first seed [333]
#   --lm NAME|DIR                 model.lm: bert-base-uncased, or minilm (offline, CPU)
#   --nproc N                     processes (GPUs) per run [1]
#   --out DIR                     runs go to DIR/seed<seed> [runs/qa/<preset>-<kg>]
#   -- OVERRIDES...               section.key=value overrides for every kgqa.train run
#                                 (python -m kgqa.train --help), e.g. -- train.epochs=5
# Environment: PYTHON [python] (the interpreter with the project installed), KGQA_DATA_DIR
# (data root), TORCH_EXTENSIONS_DIR (where DeepSpeed builds its CPU communication op once).
set -euo pipefail
# A worker stops when this recipe is gone, even after kill -9 (hitter_core.runtime.stop_with_recipe).
export HITTER_RECIPE_PIDS="${HITTER_RECIPE_PIDS:+$HITTER_RECIPE_PIDS,}$$@$HOSTNAME"
# Ctrl-C or kill stops the workers too: long commands run in the background and the
# script waits for them (a trap runs at once during `wait`, not after a foreground command).
trap 'trap - INT TERM; kill 0' INT TERM

preset=qa-paper kg=none freeze=0 seeds=1 seed=333 nproc=1 out="" extra=() sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --dataset) sets+=("train.dataset=$2"); shift 2 ;;
    --split) sets+=("train.split=$2"); shift 2 ;;
    --kg-checkpoint) kg="$2"; shift 2 ;;
    --freeze-kg) freeze=1; shift ;;
    --seeds) seeds="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --lm) sets+=("model.lm=$2"); shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "finetune_qa.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python}"
kg_tag=nokg
if [[ "$kg" == none ]]; then
  sets+=(model.reader=none)  # the plain LM, whatever the preset's reader
else
  [[ -f "$kg/config.json" ]] || { echo "no HittER checkpoint at $kg" >&2; exit 2; }
  sets+=("model.kg_checkpoint=$kg") kg_tag=hitter
  if [[ $freeze == 1 ]]; then sets+=(model.freeze_kg=true); kg_tag=hitter-frozen; fi
fi
out="${out:-runs/qa/$(basename "$preset" .yaml)-$kg_tag}"
mkdir -p "$out"

for ((i = 0; i < seeds; i++)); do
  s=$((seed + i))
  echo "== preset $preset, kg $kg_tag, seed $s -> $out/seed$s"
  if [[ -f "$out/seed$s/metrics.json" ]]; then  # written last: the run is complete
    echo "$out/seed$s/metrics.json: the run finished already; nothing to resume"
    continue
  fi
  args=(--preset "$preset" --output-dir "$out/seed$s" --resume "${sets[@]}" "train.seed=$s"
        "${extra[@]}")
  if [[ $nproc == 1 ]]; then  # one process: the trainer forms a world of one, no launcher
    "$PYTHON" -m kgqa.train "${args[@]}" &
  else
    # A free port per run: other jobs on the machine may hold the launcher's default (29500).
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port" \
      --module kgqa.train "${args[@]}" &
  fi
  wait $!
done

"$PYTHON" -m kgqa.evaluate report "$out" --out "$out"
