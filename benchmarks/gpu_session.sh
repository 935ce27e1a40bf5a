#!/usr/bin/env bash
# One prepared run on a lent GPU machine (docs/performance.md "GPU", docs/quality.md "Trained on a GPU"):
# the GPU throughput benchmarks of the shipped models, then the nuclei model's candidate recipes
# trained side by side, the best on validation installed with its card and every candidate scored
# on the dsb2018 test images.
# The machine has torch but not this project's dependencies, and no network: what it needs travels
# beside the checkout (ignored by git):
#   .whl/      cp312 wheels of pydantic, pydantic-core, pydantic-settings, annotated-types,
#              typing-inspection, python-dotenv, zarr, numcodecs, donfig, google-crc32c; site/:
#              imagecodecs with its deflate codec alone
#   .devdata/  dsb2018-train (images as lossless WebP, to fit the upload) and dsb2018
# numba (the post-processing's compiled steps) comes with the machine's image (device KINDS.md).
# `bash benchmarks/gpu_pack.sh` makes both here.
# Usage there: bash benchmarks/gpu_session.sh SECONDS OUT   (SECONDS: the run's whole budget)
# Environment: CANDIDATES (names, default all), LOADER_WORKERS (per candidate), RESERVE (seconds kept
# after training for the size model, install and test scores; default 320), KEEP (seconds kept after
# the candidates' time limit; default RESERVE/2); QUALITY=0, BENCH=0 and TRAIN=0 leave out the test
# scores, the benchmark and the training; BENCH_GENERAL=1 benchmarks the general model too.
# TRAIN_COMPILE (off, default, reduce-overhead): how the candidates' steps are compiled; unset, the
# fastest mode of benchmarks.training_step, which the benchmark part runs and keeps in
# runs/training_step.json (a warm machine keeps it, and inductor's cache, for the training call).
# The checkout, .whl/ and .devdata/ together outgrow a call's 64 MiB upload: a training call moves
# the shipped cellseg/models/nuclei.pt (35 MB) aside here first, and a benchmark call (TRAIN=0)
# carries only .whl/.
set -u
budget=${1:-540}
out=${2:-${OUT:-runs/gpu}}
started=$(date +%s)
left() { echo $(( budget - ($(date +%s) - started) )); }
export PYTHONUNBUFFERED=1 DO_NOT_TRACK=1
mkdir -p "$out"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
cp -r .whl/site/. /tmp/site/ || exit 1  # imagecodecs, its deflate codec alone (gpu_pack.sh)
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import numba" || { echo "numba is missing here: carry its and llvmlite's cp312 wheels in .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, cellseg.build_bundled, benchmarks.quality, benchmarks.gpu; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

# The benchmarks first, while the shipped models are the ones in the checkout.
if [ "${BENCH:-1}" = 1 ]; then
  echo "GPU benchmark, $(left) s left"
  # The product: one pass of `seconds`, then two of half as long (2 and 4 shards), each after a warm-up.
  seconds=$(( $(left) > 280 ? 30 : $(left) > 170 ? 15 : 8 ))
  timeout $(( $(left) - 5 )) python3 -m benchmarks.gpu --seconds $seconds --out "$out/gpu.json" 2>&1 | tail -n 30
  if [ "$(left)" -gt 40 ]; then  # the nuclei model's passes across images: batch 1 against 8
    timeout $(( $(left) - 5 )) python3 -m benchmarks.batching --device cuda --synthetic 64 --rounds 3 \
      --out "$out/batching.json" 2>&1 | tail -n 4
  fi
  if [ "$(left)" -gt 150 ]; then  # the training step, eager and compiled: the candidates train in the faster mode
    timeout $(( $(left) - 5 )) python3 -m benchmarks.training_step --device cuda --seconds 8 \
      --out "$out/training_step.json" 2>&1 | tail -n 5 && mkdir -p runs && cp "$out/training_step.json" runs/
  fi
  if [ "${BENCH_GENERAL:-0}" = 1 ] && [ "$(left)" -gt 50 ]; then  # no cell-size pass: the product's batched path
    timeout $(( $(left) - 5 )) python3 -m benchmarks.gpu --model general --seconds 8 --out "$out/gpu-general.json" 2>&1 | tail -n 12
  fi
fi
[ "${TRAIN:-1}" = 1 ] || { echo "done, $(left) s left"; exit 0; }

data=../shared/data
mkdir -p $data/dsb2018-train/images
cp -r .devdata/dsb2018 $data/ && cp -r .devdata/dsb2018-train/labels $data/dsb2018-train/ || exit 1
python3 - <<'EOF' || exit 1
import glob, os
from concurrent.futures import ProcessPoolExecutor
from PIL import Image
def png(path):
    Image.open(path).save("../shared/data/dsb2018-train/images/" + os.path.basename(path)[:-5] + ".png")
with ProcessPoolExecutor(16) as pool:
    list(pool.map(png, sorted(glob.glob(".devdata/dsb2018-train/images/*.webp"))))
print(len(os.listdir("../shared/data/dsb2018-train/images")), "training images")
EOF

# The candidates: each trains for TRAIN_MINUTES, then fits its size model and post-processing.
runs=runs/candidates
compile_mode=${TRAIN_COMPILE:-$(python3 -c "import json; print(json.load(open('runs/training_step.json'))['best_mode'])" \
  2>/dev/null || echo off)}
echo "training steps compiled: $compile_mode"
reserve=${RESERVE:-320}
train_minutes=$(python3 -c "print(round(max(1.0, ($(left) - $reserve) / 60), 2))")
echo "training budget per candidate: $train_minutes min ($(left) s left)"
timeout $(( $(left) - ${KEEP:-$(( reserve / 2 ))} )) python3 -m benchmarks.nuclei_candidates --out $runs --minutes "$train_minutes" \
  ${CANDIDATES:+--only $CANDIDATES} ${LOADER_WORKERS:+--loader-workers $LOADER_WORKERS} --compile "$compile_mode"
echo "candidates finished, $(left) s left"
python3 -m benchmarks.nuclei_candidates --out $runs --install 2>&1 | tail -n 2
for run in $( [ "${QUALITY:-1}" = 1 ] && ls -d $runs/*/training ); do
  name=$(basename "$(dirname "$run")")
  timeout $(( $(left) - 30 )) python3 -m benchmarks.quality --dataset $data/dsb2018 --model "$run/best.pt" \
    --out runs/quality/$name > $runs/$name-quality.log 2>&1 &
done
wait
tail -n 6 $runs/*-quality.log
tar czf "$out/results.tgz" $runs/*.log $runs/*/outcome.json $runs/*/training/history.json \
  runs/quality/*/quality.json cellseg/models/nuclei.json 2>/dev/null
# Files come back under 16 MiB each and 64 MiB in all: a checkpoint over 45 MB (width 48: 70 MB)
# comes back with its weights in bf16 (the rest as it is): benchmarks.checkpoint_bf16 --restore.
if [ "$(stat -c %s cellseg/models/nuclei.pt)" -gt 45000000 ]; then
  python3 -m benchmarks.checkpoint_bf16 cellseg/models/nuclei.pt "$out/nuclei-bf16.pt" &&
    split -b 15m "$out/nuclei-bf16.pt" "$out/nuclei-bf16.pt.part-" && rm "$out/nuclei-bf16.pt"
else
  split -b 15m cellseg/models/nuclei.pt "$out/nuclei.pt.part-"
fi
ls -la "$out"
echo "done, $(left) s left"
