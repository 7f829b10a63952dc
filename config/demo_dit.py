# The demo's LightningDiT: 6 blocks of width 256 on the 8x8x8 latents of the demo VA-VAE (2x2 patches: 16 tokens),
# 10 classes. A short run: a high learning rate (with clipping) and an EMA that forgets its start within it.
data_dir = "out/demo/latents"
out_dir = "out/demo/dit"
num_classes = 10
model_name = "LightningDiT-B/2"
depth = 6
hidden_size = 256
num_heads = 4
global_batch_size = 64
lr = 2e-3
grad_clip = 1.0
ema_decay = 0.99
epochs = 80
log_every = 100
ckpt_every = 300
sample_every = 300  # out_dir/samples_*.png: the same noise and classes 0-7, as training goes on
