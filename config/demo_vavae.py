# The demo's tokenizer: a small VA-VAE on the 32 px demo images (ch 32, three levels of one resnet block, 2.7M
# parameters): f4, 8x8x8 latents. Why this shape, and why no VF loss, GAN or LPIPS: BENCHMARKS.md, "The demo".
# The VF loss is off: offline there are no DINOv2 weights, and an untrained DINOv2 gives it nothing to align to.
# With the weights, add --vf_model=vit_small_patch14_dinov2.lvd142m --vf_weights=hub --vf_image_size=112 (8x8 tokens).
data_dir = "out/demo/images"
out_dir = "out/demo/vavae"
image_size = 32
ch = 32
ch_mult = (1, 2, 4)
num_res_blocks = 1
embed_dim = 8
vf_model = ""
lpips_weights = "random"
perceptual_weight = 0.0
disc_start = 2000  # after the last step: within 1000 steps the GAN costs PSNR and draws rings around shapes
global_batch_size = 16
lr = 5e-4
epochs = 24
num_workers = 1
log_every = 100
image_every = 500
ckpt_every = 500
