#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what the GPU machine lacks, for bench/gpu/suite.sh. Runs here,
# on the CPU machine, with the package registries in reach; the GPU machine has no network.
#
#   bash bench/gpu/prepare.sh            # then: device run, carry .gpu, bash bench/gpu/suite.sh
#
# .gpu/wheels/  deepspeed (built with DS_BUILD_OPS=0: no compiled ops, none are used) and the
#               packages it, datasets and evaluate need that the GPU image does not have
#               (bench/gpu/README.md lists the image), for CPython 3.12 on x86-64
# .gpu/data.tar.xz  FB15K-237, WN18RR (triples, entity names) and WebQSP (official + HittER's
#               files) from $KGQA_DATA_DIR
# .gpu/minilm.tar.xz  all-MiniLM-L6-v2 (the offline test LM) in bf16 safetensors, packed: about
#               34 MB (45 MB unpacked)
# The whole folder must stay under the device tool's 64 MiB (with the repository): checked.
# Options: --force (rebuild everything), --out DIR [.gpu]. Environment: KGQA_DATA_DIR, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=.gpu force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) force=1; shift ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python}"
data="${KGQA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
[[ -f $data/fb15k-237/train.txt ]] || { echo "prepare.sh: no FB15K-237 under $data (set KGQA_DATA_DIR)" >&2; exit 2; }
git check-ignore -q "$out/x" || { echo "prepare.sh: $out is not git-ignored; add it to .gitignore" >&2; exit 2; }
[[ $force == 1 ]] && rm -rf "$out"
mkdir -p "$out/wheels"

# --- wheels: the versions installed here, so the GPU runs what the tests ran -----------------
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
if ! ls "$out"/wheels/deepspeed-*.whl >/dev/null 2>&1; then
  echo "building the deepspeed $(version deepspeed) wheel (DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
    -w "$out/wheels" "deepspeed==$(version deepspeed)"
fi
# Not in the GPU image (bench/gpu/README.md): pure-Python or CPython-3.12 binary wheels.
missing=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
         datasets evaluate dill multiprocess)
specs=()
for p in "${missing[@]}"; do specs+=("$p==$(version "$p")"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$out/wheels" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "${specs[@]}"

# --- data: the triples and QA files the suite reads --------------------------------------------
if [[ ! -f $out/data.tar.xz ]]; then
  echo "packing data from $data"
  tar -C "$data" -cf - \
    fb15k-237/{train,valid,test}.txt fb15k-237/entity_names.tsv \
    wn18rr/{train,valid,test}.txt \
    webqsp/WebQSP.{train,test}.json webqsp/hitter_format \
    | xz -3 -T2 > "$out/data.tar.xz.tmp"  # 4.6 MB in 3 s (-6 -T1: 3.9 MB in 20 s)
  mv "$out/data.tar.xz.tmp" "$out/data.tar.xz"
fi

# --- MiniLM in bf16 -----------------------------------------------------------------------------
if [[ ! -f $out/minilm.tar.xz ]]; then
  echo "converting MiniLM to bf16"
  "$PYTHON" - "$out/minilm" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from kgqa.lm import resolve_lm

src, dst = Path(resolve_lm("minilm")), Path(sys.argv[1])
tmp = dst.with_name(dst.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy(src / name, tmp / name)
weights = load_file(src / "model.safetensors")
save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
           for k, v in weights.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
shutil.rmtree(dst, ignore_errors=True)
tmp.rename(dst)
PY
  # Packed, the weights travel in 34 MB instead of 45: room for the repository's results.
  tar -C "$out" -cf - minilm | xz -1 -T2 > "$out/minilm.tar.xz.tmp"
  mv "$out/minilm.tar.xz.tmp" "$out/minilm.tar.xz"
  rm -rf "$out/minilm"
fi

# --- the size the device tool carries -----------------------------------------------------------
limit=$((64 * 1024 * 1024))
gpu_bytes=$(du -sb "$out" | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
total=$((gpu_bytes + tree_bytes))
printf '%s: %.1f MiB; working tree %.1f MiB; together %.1f of 64 MiB\n' "$out" \
  "$(bc -l <<< "$gpu_bytes / 1048576")" "$(bc -l <<< "$tree_bytes / 1048576")" \
  "$(bc -l <<< "$total / 1048576")"
if (( total > limit )); then
  echo "prepare.sh: over the device tool's 64 MiB: carry less" >&2; exit 1
fi
ls -1 "$out/wheels"
