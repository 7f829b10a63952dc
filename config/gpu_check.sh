#!/bin/sh
# Everything a GPU machine should check, in one run from the repository root:  sh config/gpu_check.sh
#   1 tests      the test suite, with its CUDA paths (bf16 autocast, torch.compile, fused AdamW, NCCL: test_cuda.py)
#   2 train      LightningDiT-XL/1 training step at batch 64 and 128: images/s, MFU, peak memory (bf16, compiled)
#   3 official   the release's model side by side (needs .official/models, exported as BENCHMARKS.md shows)
#   4 sample     250-step Euler at batch 128, with and without skipping the unconditional half, fp32 and bf16
#   5 vavae      VA-VAE encode, decode and training step
#   6 inception  FID Inception features
#   7 loop       as a user runs it: demo images -> a (random) VA-VAE -> latents (prepare.py) -> train_dit.py with
#                sample grids to half the steps, then a resume from that checkpoint to the end
# A step's failure does not stop the next ones. Every command has a time limit, and the whole run ends within
# GPU_CHECK_SECONDS (default 470, under 8 minutes). Logs: one per step and summary.txt (each step's status and time,
# then the result lines) in $OUT, or in gpu_check/ when OUT is unset. Exit status 1 if any step failed.
# GPU_CHECK_TINY=1: the same steps at tiny sizes on a CPU, in about 2 minutes (step 1 runs one quick test file only);
# tests/test_bench.py runs it. PYTHON picks the interpreter (default python3).
set -u
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu_check}
mkdir -p "$LOGS" || exit 1
WORK=$(mktemp -d) || exit 1
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-470}))

if [ -n "${GPU_CHECK_TINY:-}" ]; then
    export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1  # the release's @torch.compile decorators: eager on a CPU
    TESTS="tests/test_cuda.py tests/test_bench.py::test_throughput_and_mfu_on_hand_computed_numbers"
    DIT="--depth=1 --hidden_size=32 --num_heads=2 --latent_size=2 --latent_channels=4 --warmup=0 --iters=1"
    SMALL_BATCH=2 LARGE_BATCH=4
    VAE="--vae_ch=32 --image_size=32 --vae_batch_size=1 --vf_model=vit_tiny_patch16_224 --vf_image_size=32"
    VAE="$VAE --warmup=0 --iters=1" INCEPTION="--inception_batch_size=2 --warmup=0 --iters=1"
    LOOP_IMAGES=2 LOOP_BATCH=4 LOOP_STEPS=4 LOOP_MODEL="--depth=1 --hidden_size=32 --num_heads=2"
else
    # the tiny run of this script in test_bench.py proves it on a CPU before GPU time is spent: not again here.
    # 16 cores: the tests in 8 processes of 2 threads (pytest-xdist, where installed) to fit the time limit
    TESTS="tests --deselect tests/test_bench.py::test_gpu_check_tiny_mode_passes_every_step_and_leaves_its_logs"
    if "$PY" -c "import xdist" 2>/dev/null; then TESTS="-n 8 $TESTS"; fi
    DIT="" SMALL_BATCH=64 LARGE_BATCH=128 VAE="" INCEPTION=""
    LOOP_IMAGES=100 LOOP_BATCH=64 LOOP_STEPS=200 LOOP_MODEL="--depth=6 --hidden_size=256 --num_heads=4"
fi
# the parity tests read ../shared/golden; where the project's shared folder is not beside this checkout (the device
# machine), a copy carried in as .golden stands in for it
if [ ! -d ../shared/golden ] && [ -d .golden ]; then
    mkdir -p ../shared && ln -s "$PWD/.golden" ../shared/golden
fi

run() {  # run LIMIT COMMAND...: one command of a step, interrupted after LIMIT s (or at the deadline); notes a failure
    limit=$(($1 < DEADLINE - $(date +%s) ? $1 : DEADLINE - $(date +%s)))
    shift
    echo "\$ $*"
    if [ "$limit" -le 0 ]; then
        echo "not run: the check's time is used up"
        failure="out of time"
        return
    fi
    timeout -s INT -k 20 "$limit" "$@"
    code=$?
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then
        echo "stopped after its limit of $limit s"
        failure=${failure:-"timed out after $limit s"}
    elif [ "$code" != 0 ]; then
        failure=${failure:-"failed (exit $code)"}
    fi
}

check() {  # check WHAT TEST...: a condition a step's results must meet
    what=$1
    shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; failure=${failure:-"failed: $what"}; fi
}

step() {  # step NAME: run the function NAME, its output on the terminal and in $LOGS/NAME.log; status into summary
    begin=$(date +%s)
    { failure=""; "$1"; echo "${failure:-ok}" > "$WORK/status"; } 2>&1 | tee "$LOGS/$1.log"
    status=$(cat "$WORK/status")
    case $status in ok | skipped*) ;; *) failed=$((failed + 1)) ;; esac
    printf '%-12s %-40s %5d s\n' "$1" "$status" $(($(date +%s) - begin)) >> "$WORK/summary"
}

tests() {
    run 150 env OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$PY" -m pytest -q -rs $TESTS
}

train() {
    run 90 "$PY" bench.py --parts=train $DIT --batch_size=$SMALL_BATCH  # the first calls compile XL/1: a minute or so
    run 90 "$PY" bench.py --parts=train $DIT --batch_size=$LARGE_BATCH
}

official() {
    if [ ! -f .official/models/lightningdit.py ]; then
        echo "skipped: no .official/models (BENCHMARKS.md shows how to export the release's models/ folder there)"
        failure="skipped (no .official)"
        return
    fi
    run 90 "$PY" bench.py --parts= $DIT --batch_size=$SMALL_BATCH --official_repo=.official
}

sample() {
    run 40 "$PY" bench.py --parts=sample $DIT --batch_size=$LARGE_BATCH --bf16=False
    run 40 "$PY" bench.py --parts=sample $DIT --batch_size=$LARGE_BATCH --bf16=True
}

vavae() {
    run 90 "$PY" bench.py --parts=vavae $VAE
}

inception() {
    run 30 "$PY" bench.py --parts=inception $INCEPTION
}

loop() {
    dir=$WORK/loop half=$((LOOP_STEPS / 2))
    run 30 "$PY" prepare.py --make_demo="$dir/images" --demo_images_per_class=$LOOP_IMAGES
    run 30 "$PY" -c "import sys, vavae; from config.runtime import save_checkpoint
ae = vavae.AutoencoderKL(ch=32)  # the demo's width; untrained: the loop's mechanics, not its images, are checked
save_checkpoint({'autoencoder': ae.state_dict(), 'autoencoder_kwargs': ae.kwargs}, sys.argv[1])" "$dir/vavae.pt"
    run 40 "$PY" prepare.py --data_dir="$dir/images" --vavae_path="$dir/vavae.pt" --out_dir="$dir/latents" \
        --image_size=64 --num_workers=2
    for steps in $half $LOOP_STEPS; do
        run 60 "$PY" train_dit.py --data_dir="$dir/latents" --out_dir="$dir/dit" --vavae_path="$dir/vavae.pt" \
            --num_classes=10 --model_name=LightningDiT-B/1 $LOOP_MODEL --global_batch_size=$LOOP_BATCH --lr=5e-4 \
            --epochs=1000 --max_steps=$steps --log_every=$((half / 2)) --ckpt_every=$half --sample_every=$half
    done
    check "the second run resumed at step $half" grep -q "resumed from .* at step $half" "$LOGS/loop.log"
    check "checkpoints at steps $half and $LOOP_STEPS" \
        test -f "$dir/dit/step_$(printf %08d $half).pt" -a -f "$dir/dit/step_$(printf %08d $LOOP_STEPS).pt"
    check "sample grids at steps $half and $LOOP_STEPS" \
        test -f "$dir/dit/samples_$(printf %08d $half).png" -a -f "$dir/dit/samples_$(printf %08d $LOOP_STEPS).png"
}

echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ); $("$PY" -c "import torch; print(f'torch {torch.__version__};', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1)" > "$WORK/summary"
failed=0
for name in tests train official sample vavae inception loop; do
    step $name
done
echo "total $(($(date +%s) - START)) s; $failed of 7 steps failed" >> "$WORK/summary"
echo >> "$WORK/summary"
for name in train official sample vavae inception; do
    grep "^device: \|images/s\|official / ours" "$LOGS/$name.log" >> "$WORK/summary"
done
cp "$WORK/summary" "$LOGS/summary.txt"
echo
cat "$LOGS/summary.txt"
[ "$failed" = 0 ]
