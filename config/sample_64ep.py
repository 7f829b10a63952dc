# FID sampling of the released LightningDiT-XL/1, 64 epochs (paper: FID 2.11 at 256px). Use with
#   torchrun --nproc_per_node=8 sample.py config/sample_64ep.py --dit_path=... --vavae_path=... --latent_stats_path=...
mode = "fid"
num_images = 50000
labels = "random"  # as the release (uniform labels); "balanced" gives N / 1000 per class
num_steps = 250
timestep_shift = 0.3
cfg_scale = 10.0
cfg_interval_start = 0.10
guidance = "legacy3"
method = "euler"
precision = "fp32"
