# VA-VAE release schedule, stage 1 of 3 (vavae/configs/f16d32_vfdinov2_long.yaml): 100 epochs with a large VF weight
# and no margins, to align the latent fully with DINOv2. Then config/vavae_stage2.py.
#   torchrun --nproc_per_node=8 train_vavae.py config/vavae_stage1.py --data_dir=... --lpips_weights=...
out_dir = "out/vavae_stage1"
epochs = 100
vf_weight = 0.5
cos_margin = 0.0
distmat_margin = 0.0
disc_start = 2501  # the release's 5001 Lightning optimizer steps (two per step)
