# VA-VAE release schedule, stage 3 of 3: 15 epochs from stage 2's weights with the margins m1 = 0.5, m2 = 0.25, which
# relax the alignment where it costs reconstruction. The result is the released VA-VAE recipe.
out_dir = "out/vavae_stage3"
init_from = "out/vavae_stage2"  # the folder's latest checkpoint
epochs = 15
vf_weight = 0.1
cos_margin = 0.5
distmat_margin = 0.25
disc_start = 1
