# The demo's LightningDiT: 6 blocks of width 256 on the 4x4x32 latents of the demo VA-VAE, 10 classes.
data_dir = "out/demo/latents"
out_dir = "out/demo/dit"
num_classes = 10
model_name = "LightningDiT-B/1"
depth = 6
hidden_size = 256
num_heads = 4
global_batch_size = 64
lr = 5e-4
ema_decay = 0.99  # a short run: the EMA must forget the zero-output initialisation within it
epochs = 60
log_every = 100
ckpt_every = 300
sample_every = 300  # out_dir/samples_*.png: the same noise and classes 0-7, as training goes on
