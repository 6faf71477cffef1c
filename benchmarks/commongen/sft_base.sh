#!/usr/bin/env bash
# The papers' setting on a real model: SmolLM2-135M-Instruct LoRA-fine-tuned on the references of all of CommonGen
# train (prompt "concepts = ...", no chat template; merged), then the four guides on top of that base, each
# guide's strength chosen on a selection split carved from train (strength.py, never dev or test), dev decoded with
# those strengths, and test once after dev with the same settings.
#
#   benchmarks/commongen/sft_base.sh OUTPUT_DIR
#
# Settings come from the environment (defaults in brackets): DEVICE [cpu], BASE [smollm2-135m-instruct],
# DATA [../shared/data/commongen/v1.1_LHRYANG], SFT_STEPS [2000] of SFT_BATCH [32] rows (about one epoch of
# train's 67,388 references; on a GPU prefer e.g. 250 of 256: a small model's step waits on kernel launches),
# TRAIN_SETS [200], GUIDE_STEPS [150], SEL_SETS [200], DEV_SETS [0 = all], TEST_SETS [0 = all], BS [64],
# THREADS [1], MERGE_OPTIONS [LoRA on layers 24-29, as on the zero-shot base], MERGE_SCALES [0,1,2,3,6,9,12],
# ALPHAS [0,1,2,4,8], VARIANTS [dinado-merge dinado-soft dinado-hard nado], TEST_AFTER [no limit: skip test when
# more seconds than this have passed since the start]. The guides' recipe is the zero-shot headline's (200 train
# sets x 8 samples, 150 steps of 32, soft coverage labels). Independent processes of a stage run side by side
# (one per guide and decoding): meant for a machine with a GPU and several cores; on 2 CPU cores it takes hours.
# Each process writes its log to <run>/log; a failed process is reported and the stages that need it are skipped.
set -u
OUT=${1:?usage: sft_base.sh OUTPUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
BASE=${BASE:-smollm2-135m-instruct}
DATA=${DATA:-$HERE/../../../shared/data/commongen/v1.1_LHRYANG}
SFT_STEPS=${SFT_STEPS:-2000}
SFT_BATCH=${SFT_BATCH:-32}
TRAIN_SETS=${TRAIN_SETS:-200}
GUIDE_STEPS=${GUIDE_STEPS:-150}
SEL_SETS=${SEL_SETS:-200}
DEV_SETS=${DEV_SETS:-0}
TEST_SETS=${TEST_SETS:-0}
BS=${BS:-64}
THREADS=${THREADS:-1}
MERGE_OPTIONS=${MERGE_OPTIONS:-'{"lora_target_modules": ".*layers\\.2[4-9]\\.(self_attn|mlp)\\.[a-z]+_proj"}'}
MERGE_SCALES=${MERGE_SCALES:-0,1,2,3,6,9,12}
ALPHAS=${ALPHAS:-0,1,2,4,8}
VARIANTS=${VARIANTS:-dinado-merge dinado-soft dinado-hard nado}
TEST_AFTER=${TEST_AFTER:-}
START=$(date +%s)
mkdir -p "$OUT"

say() { echo "[sft_base $(($(date +%s) - START)) s] $*"; }
# one process in the background, its output in <dir>/log
launch() {
    local dir=$1
    shift
    mkdir -p "$dir"
    ("$@" >"$dir/log" 2>&1 && touch "$dir/ok" || say "FAILED: $dir (see $dir/log)") &
}
ok() { [ -e "$1/ok" ]; }

COMMON=(--chat false --train-sets "$TRAIN_SETS" --samples-per-set 8 --train-batch-size 32
    --guide-steps "$GUIDE_STEPS" --labels soft --no-efficiency --device "$DEVICE" --threads "$THREADS"
    --batch-size "$BS" --data-dir "$DATA" --merge-options "$MERGE_OPTIONS")
RUN=("$PY" "$HERE/run.py")

say "1. fine-tune $BASE on train's references ($SFT_STEPS steps of $SFT_BATCH), sample $TRAIN_SETS x 8 from it"
launch "$OUT/train" "${RUN[@]}" "${COMMON[@]}" --base "$BASE" --base-finetune-steps "$SFT_STEPS" \
    --base-finetune-batch-size "$SFT_BATCH" --systems '' \
    --no-base --splits dev --dev-sets 1 --decodings greedy --best-of '' --output "$OUT/train"
wait
ok "$OUT/train" || exit 1
FROM=(--base "$OUT/train/base" --samples "$OUT/train/samples.safetensors")

say "2. train the guides: $VARIANTS"
for v in $VARIANTS; do
    launch "$OUT/train-$v" "${RUN[@]}" "${COMMON[@]}" "${FROM[@]}" --systems "$v" --no-base --splits dev \
        --dev-sets 1 --decodings greedy --best-of '' --output "$OUT/train-$v"
done
wait

say "3. choose each guide's strength on $SEL_SETS selection sets from train (dev's concept mix)"
for v in $VARIANTS; do
    ok "$OUT/train-$v" || continue
    scales=$ALPHAS
    [ "$v" = dinado-merge ] && scales=$MERGE_SCALES
    for d in sample beam; do
        launch "$OUT/strength-$v-$d" "$PY" "$HERE/strength.py" --run "$OUT/train-$v" --variant "$v" \
            --sets "$SEL_SETS" --scales "$scales" --decoding "$d" --concept-mix dev --device "$DEVICE" \
            --threads "$THREADS" --batch-size "$BS" --output "$OUT/strength-$v-$d"
    done
done
wait

decode() { # split, size
    local split=$1 size=$2 sizeflag="--$1-sets"
    launch "$OUT/$split-base" "${RUN[@]}" "${COMMON[@]}" "${FROM[@]}" --systems '' --splits "$split" \
        "$sizeflag" "$size" --decodings greedy,beam,sample --best-of 4 --output "$OUT/$split-base"
    for v in $VARIANTS; do
        for d in sample beam; do
            ok "$OUT/strength-$v-$d" || continue
            chosen=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["chosen"])' \
                "$OUT/strength-$v-$d/strength.json")
            strength=(--alpha "$chosen")
            [ "$v" = dinado-merge ] && strength=(--merge-scale "$chosen")
            launch "$OUT/$split-$v-$d" "${RUN[@]}" "${COMMON[@]}" "${FROM[@]}" --reuse-guides "$OUT/train-$v" \
                --systems "$v" --no-base --splits "$split" "$sizeflag" "$size" --decodings "$d" --best-of '' \
                "${strength[@]}" --output "$OUT/$split-$v-$d"
        done
    done
    wait
}

say "4. decode dev with the chosen strengths"
decode dev "$DEV_SETS"
if [ -n "$TEST_AFTER" ] && [ $(($(date +%s) - START)) -gt "$TEST_AFTER" ]; then
    say "test skipped: more than $TEST_AFTER s have passed"
else
    say "5. decode test once, with the settings fixed on dev"
    decode test "$TEST_SETS"
fi
say "done in $(($(date +%s) - START)) s: $OUT"
