#!/bin/sh
# The whole pipeline on the built-in demo dataset (no download; about 13 minutes on 2 CPU cores):
#   demo images -> tiny VA-VAE -> latent shards -> tiny LightningDiT -> sample grid, FID and class accuracy.
# Run from the repository root:  PYTHON=.venv/bin/python sh config/demo.sh
# Each stage is one script with a config file; rerunning resumes every stage where it stopped.
# DEMO_QUICK=1 runs every stage for a few steps only (the test suite does this).
set -e
START=$(date +%s)
PY=${PYTHON:-python}
OUT=${DEMO_OUT:-out/demo}
IMAGE_SIZE=32  # image side in pixels; config/demo_vavae.py trains its tokenizer at the same size
if [ -n "$DEMO_QUICK" ]; then
    DEMO_SIZE=--demo_images_per_class=8 VAVAE_STEPS=--max_steps=4 DIT_STEPS=--max_steps=4 SAMPLE_STEPS=--num_steps=5
    FID_IMAGES=--num_images=20 RECON_IMAGES=1
fi

echo "== 1/6 demo images: $OUT/images"
[ -d "$OUT/images" ] || $PY prepare.py --make_demo="$OUT/images" --demo_image_size=$IMAGE_SIZE $DEMO_SIZE
echo "== 2/6 VA-VAE: $OUT/vavae"
echo "(no VF loss: offline there are no DINOv2 weights to align to; config/demo_vavae.py says how to add them)"
$PY train_vavae.py config/demo_vavae.py --data_dir="$OUT/images" --out_dir="$OUT/vavae" $VAVAE_STEPS
echo "== 3/6 latents: $OUT/latents"
$PY prepare.py --data_dir="$OUT/images" --vavae_path="$OUT/vavae" --out_dir="$OUT/latents" --image_size=$IMAGE_SIZE \
    --num_workers=1
echo "== 4/6 LightningDiT: $OUT/dit"
$PY train_dit.py config/demo_dit.py --data_dir="$OUT/latents" --out_dir="$OUT/dit" --vavae_path="$OUT/vavae" $DIT_STEPS
echo "== 5/6 samples: $OUT/samples"
SAMPLE="--dit_path=$OUT/dit --vavae_path=$OUT/vavae --latent_stats_path=$OUT/latents/latents_stats.pt \
    --num_steps=50 --cfg_scale=6.0 --cfg_interval_start=0.1 --guidance=all $SAMPLE_STEPS"
$PY sample.py $SAMPLE --mode=grid --grid_labels="[0,1,2,3,4,5,6,7,8,9]" --grid_seeds="(0,1,2,3)" --out_dir="$OUT"
$PY sample.py $SAMPLE --mode=fid --num_images=300 --labels=balanced --batch_size=100 --out_dir="$OUT/samples" $FID_IMAGES
echo "== 6/6 FID and class accuracy of the samples; reconstruction PSNR of the VA-VAE on 100 more demo images"
[ -d "$OUT/recon_check" ] || $PY prepare.py --make_demo="$OUT/recon_check" --demo_image_size=$IMAGE_SIZE \
    --demo_images_per_class=${RECON_IMAGES:-10}
FID="--image_size=$IMAGE_SIZE --batch_size=4 --inception_weights=${INCEPTION_WEIGHTS:-}"  # small batches: faster on a CPU
if $PY fid.py --samples="$OUT/samples/samples.npz" --reference="$OUT/images" --out_json="$OUT/fid.json" $FID &&
        $PY fid.py --samples="$OUT/recon_check" --reconstruct_with="$OUT/vavae" --out_json="$OUT/recon.json" $FID; then
    $PY - > "$OUT/results.txt" <<EOF
import json
f, r = (json.load(open(f"$OUT/{name}.json")) for name in ("fid", "recon"))
accuracy = "n/a" if f["class_accuracy"] is None else f"{f['class_accuracy']:.0%}"
print(f"recon PSNR {r['psnr']:.1f} dB | FID {f['fid']:.1f} ({f['num_samples']} samples) | class accuracy {accuracy}")
print("details: $OUT/fid.json, $OUT/recon.json, $OUT/recon.reconstructions.png")
EOF
else
    echo "FID skipped: no Inception weights (see the error above); pass INCEPTION_WEIGHTS=/path/to/pt_inception-2015-12-05.pth" \
        > "$OUT/results.txt"
fi
echo "== results ($(( $(date +%s) - START )) s in all)"
cat "$OUT/results.txt"
echo "done. sample grid: $OUT/grid.png (a row per seed, a column per class); FID samples: $OUT/samples/samples.npz"
echo "samples during training: $OUT/dit/samples_*.png; reconstructions: $OUT/vavae/recon_*.png"
echo "checkpoints: $OUT/vavae, $OUT/dit; latents: $OUT/latents"
