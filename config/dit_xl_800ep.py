# LightningDiT-XL/1 for 800 epochs on the VA-VAE ImageNet-256 latents (FID 1.35 with sample.py config/sample_800ep.py).
# Everything else is the release recipe, which is train_dit.py's default (64 epochs: FID 2.11).
epochs = 800
