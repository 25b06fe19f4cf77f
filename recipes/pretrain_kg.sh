#!/usr/bin/env bash
# Pre-train HittER for link prediction (paper section 3.3) through the DeepSpeed launcher,
# then print the test metrics of the best checkpoint.
#
#   bash recipes/pretrain_kg.sh --preset fb15k-237|wn18rr|cpu-small [--nproc N] [--resume]
#        [--data-dir DIR] [--output-dir DIR] [section.key=value ...]
#
# --nproc: processes on this node (default: the number of visible GPUs, else 1 CPU process).
# Every other argument goes to `python -m hitter_core.train` (see its --help). The output
# directory is --output-dir, else runs/hitter-<preset name> (the presets' own train.output_dir),
# always passed on explicitly; relative paths are relative to the current directory. The
# trainer prints the test table at the end (also in OUTPUT_DIR/test_metrics.txt). Environment:
#   PYTHON                  the interpreter with the project installed (default: python)
#   LAUNCHER=torchrun       torchrun --standalone instead of the deepspeed launcher (same code)
#   DEEPSPEED_ARGS="..."    extra deepspeed-launcher arguments, e.g. "--hostfile hosts" (the
#                           port is a free one unless DEEPSPEED_ARGS has --master_port)
#   TORCHRUN_ARGS="..."     extra torchrun arguments
#   KGQA_DATA_DIR           data root (default data/prepared); HF_HUB_OFFLINE is passed through
#   TORCH_EXTENSIONS_DIR    where DeepSpeed builds its CPU communication op once (~1-2 min)
set -euo pipefail
# A worker stops when this recipe is gone, even after kill -9 (hitter_core.runtime.stop_with_recipe).
export HITTER_RECIPE_PIDS="${HITTER_RECIPE_PIDS:+$HITTER_RECIPE_PIDS,}$$@$HOSTNAME"

PYTHON=${PYTHON:-python}
preset=""
nproc=""
output_dir=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --preset=*) preset="${1#*=}"; shift ;;
    --nproc) nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --output-dir) output_dir="$2"; shift 2 ;;
    --output-dir=*) output_dir="${1#*=}"; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -z "$preset" ]]; then
  echo "usage: bash recipes/pretrain_kg.sh --preset NAME [--nproc N] [overrides...]" >&2
  exit 2
fi
if [[ -z "$nproc" ]]; then
  nproc=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

if [[ -z "$output_dir" ]]; then
  name=$(basename "$preset")
  output_dir="runs/hitter-${name%.y*ml}"
fi
train_args=(--preset "$preset" --output-dir "$output_dir" "${args[@]}")
mkdir -p "$output_dir"
echo "pretrain_kg: preset $preset, $nproc process(es), output $output_dir"

# The launcher replaces this shell (exec), so a signal to the recipe reaches it and it stops
# its workers; the trainer prints the test table and where it wrote it.
if [[ "${LAUNCHER:-deepspeed}" == torchrun ]]; then
  # shellcheck disable=SC2086
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
    ${TORCHRUN_ARGS:-} -m hitter_core.train "${train_args[@]}"
fi
# A free port: other jobs on the machine may hold the launcher's default (29500).
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# --no_local_rank: the trainer reads LOCAL_RANK from the environment.
# shellcheck disable=SC2086
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$nproc" --no_local_rank \
  --master_port "$port" ${DEEPSPEED_ARGS:-} --module hitter_core.train "${train_args[@]}"
