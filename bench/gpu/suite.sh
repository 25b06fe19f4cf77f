#!/usr/bin/env bash
# The GPU suite: everything this project measures on a GPU, in one command of under 9 minutes,
# most valuable first, each step under `timeout`, so that a rare, short GPU session is spent on
# measuring rather than on setting up. Prepare here first (bench/gpu/prepare.sh fills .gpu/),
# then on the GPU machine, with .gpu carried:
#
#   bash bench/gpu/suite.sh               # figures in $OUT (or runs/gpu-suite): results.json,
#                                         # summary.md, logs.tar.gz (every step's log)
#   bash bench/gpu/suite.sh --cpu-dry-run # the same steps on CPU with tiny budgets (CI runs it)
#
# Steps (name: what, time limit on the GPU; the whole suite stops starting steps at 570 s):
#   env          versions, the GPU (nvidia-smi)                                        20 s
#   speed-*      bench/train_speed.py at the paper config, batch 512: bf16 (the trainer's
#                default there: train.precision auto; one-step profile, distinct input shapes
#                over 200 batches), fp32; s per epoch, peak memory, test evaluation time
#                                                                                 45 / 45 s
#   ttq-fb15k-237  bench/time_to_quality.py: the paper config for 5 minutes of training in the
#                fastest eager mode (steps sized from the faster speed step), validated every
#                5 epochs, then tested: epochs done, valid MRR against time, test MRR    330 s
#   gpu-tests    pytest -m gpu (tests/test_gpu.py, the CUDA resume test, ...)          60 s
#   speed-compiled  bf16 + torch.compile over the static shapes (compile time = warm-up)  60 s
#   speed-bf16-cudnn  bf16 with torch's own SDPA choice (cuDNN's attention allowed)       45 s
#   qa-smoke     kgqa.train: MiniLM (bf16 weights from .gpu), WebQSP filtered, one epoch,
#                co-trained HittER read by the copy head with name keys, from the ttq step's
#                FB15K-237 checkpoint, bf16 through DeepSpeed                             60 s
# A failed or timed-out step is recorded (results.json: rc, seconds) and the suite goes on.
# Options: --cpu-dry-run, --only STEP[,STEP] (names as above; speed = every speed step).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

dry=0 only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) dry=1; shift ;;
    --only) only="$2"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
gpu_dir=$root/.gpu
[[ -d $gpu_dir/wheels && -f $gpu_dir/data.tar.xz && -f $gpu_dir/minilm.tar.xz ]] || {
  echo "suite.sh: $gpu_dir is incomplete: run bash bench/gpu/prepare.sh first (on a machine with the package registries)" >&2; exit 2; }

out=${OUT:-$root/runs/gpu-suite}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")
mkdir -p "$out" "$work/logs"
steps=$work/steps.tsv
: >"$steps"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# DeepSpeed's CPU op is built once into the usual extensions cache; the suite's own caches
# (neighbour indexes, prepared QA splits) go to its work directory.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}
export XDG_CACHE_HOME=$work/cache
PYTHON=${PYTHON:-python3}

# --- set-up: the wheels (GPU only: they are CPython 3.12 builds), the data, the LM --------------
if [[ $dry == 0 ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$gpu_dir"/wheels/*.whl >"$work/logs/pip.log" 2>&1 \
    || echo "suite.sh: wheel install failed (logs/pip.log); the steps that need them will fail" >&2
  export PYTHONPATH=$root:$work/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$work/data"
for pack in "$gpu_dir/data.tar.xz:$work/data" "$gpu_dir/minilm.tar.xz:$work"; do  # -> minilm/
  "$PYTHON" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "${pack%%:*}" "${pack#*:}"  # Python's lzma: no xz binary needed
done
export KGQA_DATA_DIR=$work/data
if [[ $dry == 1 ]]; then  # evaluation on CPU: 200 valid / test triples, not tens of thousands
  for f in "$work"/data/{fb15k-237,wn18rr}/{valid,test}.txt; do
    head -n 200 "$f" >"$f.head" && mv "$f.head" "$f"
  done
fi

if [[ $dry == 0 ]]; then
  device=cuda speed_preset=fb15k-237 speed=(--batch-size 512 --steps 20)
  speed_eval=(--eval-queries 8192) t_test=60 t_speed=45 t_ttq=330 t_qa=60
  ttq_seconds=300 ttq_sets=(train.validate_every=5) qa_sets=() budget=570
else  # tiny budgets: every step runs, none measures anything
  device=cpu speed_preset=cpu-small speed=(--batch-size 16 --steps 2 --warmup 1 --threads 2)
  speed_eval=(--eval-queries 64) t_test=300 t_speed=120 t_ttq=300 t_qa=300
  ttq_seconds=0 ttq_sets=(train.batch_size=32 train.eval_batch_size=256)
  qa_sets=(train.max_train_examples=32 train.max_eval_examples=16) budget=1200
fi

# step NAME SECONDS CMD...: run CMD under timeout, its output in logs/NAME.log, one line in
# steps.tsv (name, rc, seconds); skipped when --only names other steps.
# Every limit is cut to what is left of the suite's budget, so the whole stays inside the
# device tool's 10 minutes a command.
deadline=$(( $(date +%s) + budget ))
step() {
  local name=$1 limit=$2
  shift 2
  if [[ -n $only && ",$only," != *",$name,"* && ! ( $name == speed-* && ",$only," == *",speed,"* ) ]]; then
    return 0
  fi
  local t0 rc left=$(( deadline - $(date +%s) ))
  if (( left < 15 )); then
    printf '%s\t%s\t0\n' "$name" 125 >>"$steps"
    echo "== $name: skipped, the suite's ${budget}s budget is spent"
    return 0
  fi
  (( limit > left )) && limit=$left
  t0=$(date +%s.%N)
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=10 "$limit" "$@" >"$work/logs/$name.log" 2>&1
  rc=$?
  awk -v n="$name" -v rc="$rc" -v t0="$t0" -v t1="$(date +%s.%N)" \
    'BEGIN { printf "%s\t%s\t%.1f\n", n, rc, t1 - t0 }' >>"$steps"
  echo "   rc $rc, $(tail -n 1 "$steps" | cut -f3) s"
  tail -n 3 "$work/logs/$name.log" | sed 's/^/   | /'
}

step env 30 bash -c "nvidia-smi || true; \"$PYTHON\" - <<'PY'
import importlib.metadata as m, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
for p in ('transformers', 'deepspeed', 'datasets', 'evaluate', 'pyarrow', 'huggingface_hub',
          'pydantic', 'safetensors'):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, 'MISSING')
PY"

# The step time of a speed variant, from its JSON (no figure: 0.1 s).
step_seconds() {
  "$PYTHON" - "$work/speed-$1.json" <<'PY'
import json, sys
try:
    print(json.load(open(sys.argv[1]))["step_s_mean"])
except (OSError, KeyError, ValueError):
    print(0.1)
PY
}
speed_step() {  # speed_step VARIANT LIMIT FLAGS...
  local variant=$1 limit=$2
  shift 2
  step "speed-$variant" "$limit" "$PYTHON" bench/train_speed.py --preset "$speed_preset" \
    --device "$device" "${speed[@]}" "${speed_eval[@]}" "$@" --json "$work/speed-$variant.json"
}

speed_step bf16 "$t_speed" --bf16 --profile --shape-steps 200
speed_step fp32 "$t_speed" train.precision=fp32

# Time to quality: ttq_seconds of training in the faster of the two eager modes (the dry run
# takes 3 steps); max_epochs high so that max_steps ends the schedule.
fast=bf16 fast_sets=(train.precision=bf16)
if "$PYTHON" -c "import sys; sys.exit(float(sys.argv[1]) <= float(sys.argv[2]))" \
    "$(step_seconds bf16)" "$(step_seconds fp32)"; then
  fast=fp32 fast_sets=(train.precision=fp32)
fi
n=$("$PYTHON" -c "import sys; s = float(sys.argv[2]); print(max(3, int(s / float(sys.argv[1]))) if s else 3)" \
  "$(step_seconds $fast)" "$ttq_seconds")
ttq_preset=fb15k-237
[[ $dry == 1 ]] && ttq_preset=cpu-small
step ttq-fb15k-237 "$t_ttq" "$PYTHON" bench/time_to_quality.py --preset "$ttq_preset" \
  --output-dir "$work/runs/fb15k-237" --json "$work/ttq-fb15k-237.json" "${fast_sets[@]}" \
  "${ttq_sets[@]}" train.max_steps="$n" train.max_epochs=100000 train.patience=0 \
  train.device="$device"

step gpu-tests "$t_test" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/

# GPU only: compiling takes minutes on a 2-core CPU (it works there: inside compiled code the
# layers take torch's own ops, hitter_core.kernels), and cuDNN's attention is CUDA's.
if [[ $dry == 0 ]]; then
  speed_step compiled $((t_speed * 4 / 3)) --bf16 --compile --eval-queries 1024
  speed_step bf16-cudnn "$t_speed" --bf16 --sdpa-backend torch --profile
fi

kg_sets=(model.reader=none model.kg_checkpoint=null)
if [[ -f $work/runs/fb15k-237/best/config.json ]]; then  # the adapters and the link head, co-trained
  kg_sets=(model.kg_checkpoint="$work/runs/fb15k-237/best" model.reader=paper+link
           model.freeze_kg=false)
fi
step qa-smoke "$t_qa" "$PYTHON" -m kgqa.train --preset qa-kg-gain-minilm-cpu \
  --output-dir "$work/runs/qa-smoke" --data-dir "$KGQA_DATA_DIR" model.lm="$work/minilm" \
  "${kg_sets[@]}" train.epochs=1 \
  "${qa_sets[@]}"

# --- results: one JSON of every figure, a Markdown summary, the logs -----------------------------
cp "$steps" "$work/logs/steps.tsv"
for f in "$work"/speed-*.json "$work"/ttq-*.json; do [[ -f $f ]] && cp "$f" "$work/logs/"; done
for d in fb15k-237 qa-smoke; do
  for f in test_metrics.json metrics.json metrics.jsonl train.log; do
    [[ -f $work/runs/$d/$f ]] && cp "$work/runs/$d/$f" "$work/logs/$d-$f"
  done
done
"$PYTHON" bench/gpu/collect.py "$work" --dry-run "$dry" --out "$out"
tar -C "$work" -czf "$out/logs.tar.gz" logs
echo "wrote $out/results.json, $out/summary.md, $out/logs.tar.gz"
failed=$(awk -F'\t' '$2 != 0' "$steps" | wc -l)
[[ $dry == 1 && $failed -gt 0 ]] && { echo "suite.sh: $failed step(s) failed in the dry run" >&2; exit 1; }
exit 0
