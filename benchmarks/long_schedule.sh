#!/usr/bin/env bash
# Longer and wider training than the CPU default, several runs side by side on one GPU, each
# scored with benchmarks.quality (plain and with --tta): where the accuracy plateau lies when
# compute is not the limit (issue 7). Each run is an ordinary `cellseg train` with flags.
#
#   benchmarks/long_schedule.sh DATA_ROOT OUT_DIR [MINUTES] [DEVICE]
#
# DATA_ROOT holds isbi2012/ and dsb2018/ (../shared/data); MINUTES is each run's training budget
# (default 6); DEVICE defaults to cuda. RUNS="name ..." picks a subset of the runs below;
# PATIENCE (default 40) sets early stopping (the CPU default schedule uses 15).
# Writes OUT_DIR/<run>/ (checkpoints, history.json), OUT_DIR/<run>.log and OUT_DIR/summary.jsonl.
set -u
data=${1:?DATA_ROOT}
out=${2:?OUT_DIR}
minutes=${3:-6}
device=${4:-cuda}
python=${PYTHON:-python3}
threads=${THREADS_PER_RUN:-2}
patience=${PATIENCE:-40}

# name | dataset | ground truth folder | extra flags
all_runs="
isbi-default|isbi2012|masks|
isbi-w32|isbi2012|masks|--base-width 32 --patches-per-image 8
isbi-w32-strong|isbi2012|masks|--base-width 32 --patches-per-image 8 --strong-augmentation
isbi-w32-p512|isbi2012|masks|--base-width 32 --patch-size 512
dsb-bw10|dsb2018|labels|--border-weight 10
dsb-bw10-w32|dsb2018|labels|--border-weight 10 --base-width 32 --patches-per-image 8
dsb-bw10-w32-strong|dsb2018|labels|--border-weight 10 --base-width 32 --patches-per-image 8 --strong-augmentation
dsb-masks-w32|dsb2018|masks|--base-width 32 --patches-per-image 8
isbi-w32-b8|isbi2012|masks|--base-width 32 --batch-size 8 --patches-per-image 16
dsb-bw10-b8|dsb2018|labels|--border-weight 10 --batch-size 8 --patches-per-image 16
dsb-masks-w32-b8|dsb2018|masks|--base-width 32 --batch-size 8 --patches-per-image 16
dsb-labels|dsb2018|labels|
isbi-d5|isbi2012|masks|--depth 5
isbi-d6|isbi2012|masks|--depth 6
isbi-bw5|isbi2012|masks|--border-weight 5
isbi-dice|isbi2012|masks|--loss bce_dice
dsb-labels-d5|dsb2018|labels|--depth 5
dsb-bw10-d5|dsb2018|labels|--border-weight 10 --depth 5
dsb-masks-d5|dsb2018|masks|--depth 5
isbi-nonorm|isbi2012|masks|--norm none
isbi-nonorm-lr1e-4|isbi2012|masks|--norm none --lr 1e-4
isbi-batchnorm|isbi2012|masks|--norm batch
isbi-groupnorm|isbi2012|masks|--norm group
dsb-labels-nonorm|dsb2018|labels|--norm none
dsb-labels-cd18|dsb2018|labels|--cell-diameter 18
dsb-labels-cd18-w32|dsb2018|labels|--cell-diameter 18 --base-width 32 --patches-per-image 8
dsb-labels-cd25|dsb2018|labels|--cell-diameter 25
dsb-masks-cd18|dsb2018|masks|--cell-diameter 18
dsb-dist-cd18|dsb2018|labels|--distance-map --cell-diameter 18
dsb-dist-cd18-w32|dsb2018|labels|--distance-map --cell-diameter 18 --base-width 32 --patches-per-image 8
dsb-dist-cd18-d5|dsb2018|labels|--distance-map --cell-diameter 18 --depth 5
dsb-dist-cd18-bw5|dsb2018|labels|--distance-map --cell-diameter 18 --border-weight 5
dsb-dist-cd18-strong|dsb2018|labels|--distance-map --cell-diameter 18 --strong-augmentation
dsb-dist-cd22|dsb2018|labels|--distance-map --cell-diameter 22
"
selected=${RUNS:-$(echo "$all_runs" | cut -d'|' -f1 | xargs)}

mkdir -p "$out"
: > "$out/summary.jsonl"
declare -A dataset_of
for name in $selected; do
    line=$(echo "$all_runs" | grep "^$name|") || { echo "unknown run $name" >&2; exit 2; }
    IFS='|' read -r _ dataset truth extra <<< "$line"
    dataset_of[$name]=$dataset
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$threads $python -m cellseg.cli train \
        --images "$data/$dataset/images" --masks "$data/$dataset/$truth" --out "$out/$name" --overwrite \
        --epochs 1000 --patience "$patience" --max-minutes "$minutes" --device "$device" $extra \
        > "$out/$name.log" 2>&1 &
done
wait
echo "training done: $(date -u +%T)"

for name in $selected; do
    for tta in "" "--tta"; do
        OMP_NUM_THREADS=$threads $python -m benchmarks.quality --dataset "$data/${dataset_of[$name]}" \
            --run "$out/$name" --out "$out/quality-$name$tta" $tta 2>> "$out/$name.log" \
            | sed "s/^{/{\"name\": \"$name\", /" >> "$out/summary.jsonl" &
    done
done
wait
for name in $selected; do
    $python - "$out/$name/history.json" "$name" <<'EOF' || echo "$name: no history (see $name.log)"
import json, sys
history = json.load(open(sys.argv[1]))
epochs = history["epochs"] if isinstance(history, dict) else history
best = max(epochs, key=lambda e: e["val_dice"])
print(f"{sys.argv[2]}: {len(epochs)} epochs, best val Dice {best['val_dice']:.4f} at epoch {best['epoch']}")
EOF
done
cat "$out/summary.jsonl"
