# VA-VAE release schedule, stage 2 of 3: 15 epochs from stage 1's weights with the VF weight lowered to 0.1, for
# better reconstruction. Fresh optimizers; the GAN is on from step 1 (release: disc_start 1).
out_dir = "out/vavae_stage2"
init_from = "out/vavae_stage1"  # the folder's latest checkpoint
epochs = 15
vf_weight = 0.1
cos_margin = 0.0
distmat_margin = 0.0
disc_start = 1
