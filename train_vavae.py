"""Train the VA-VAE tokenizer: L1 + LPIPS reconstruction, KL, PatchGAN, and the VF loss aligning the latent to DINOv2.

    python train_vavae.py --data_dir=data/imagenet/train --lpips_weights=vgg.pth                # one process
    torchrun --nproc_per_node=8 train_vavae.py config/vavae_stage1.py                       # the release's 3 stages
    torchrun --nproc_per_node=8 train_vavae.py config/vavae_stage2.py                       # (each starts from the
    torchrun --nproc_per_node=8 train_vavae.py config/vavae_stage3.py                       #  previous one's weights)

The defaults are the release recipe (vavae/configs/f16d32_vfdinov2.yaml): 50 epochs, Adam 1e-4, betas (0.5, 0.9), 256
images per step, KL weight 1e-6, adaptive VF weight 0.1 with margins m1 = 0.5, m2 = 0.25, adaptive GAN weight 0.5.
Data: an ImageNet-layout folder (data_dir/<class>/<image>). As the release (taming ImagePaths), each image is resized
so that its short side is image_size (small images are upscaled, large ones downscaled; bilinear) and cropped at a
random position; no flips. Unreadable images are skipped (their batch is one smaller) and reported at the end.

Checkpoints: out_dir/step_XXXXXXXX.pt = {autoencoder, autoencoder_kwargs, vf_loss (linear_proj), discriminator, both
optimizers, step, epoch, config}, + autoencoder_ema (which vavae.load_autoencoder prefers) if kept. A rerun with the
same out_dir resumes from the highest step. All randomness is a function of (seed, step, rank) -- the epoch order and
crop positions of (seed, epoch), the posterior noise and LPIPS dropout of a per-step seed -- so a resumed run continues
bit for bit without stored generator states.
"""
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from config.runtime import (IMAGE_EXTENSIONS, MetricsLog, batch_schedule, catch_stop_signals, check_resume,
                            checkpoint_name, compile_and_autocast, configure, fail, latest_checkpoint, list_images,
                            load_checkpoint, load_rgb, prepare_out_dir, save_checkpoint, save_png, setup_distributed,
                            should_stop)
from vavae import (AutoencoderKL, FoundationModel, LPIPS, NLayerDiscriminator, VFLoss, adaptive_weight, hinge_d_loss,
                   images_to_uint8, load_autoencoder, load_weights)

# data
data_dir = "data/imagenet/train"  # path; one subfolder per class
image_size = 256  # >= 16; training crop, a multiple of the downsampling 2^(len(ch_mult) - 1) (16 as released)
num_workers = 8  # >= 0; image decoding processes per rank
# autoencoder (the released f16d32 by default)
ch = 128  # >= 32; width, a multiple of 32 (GroupNorm has 32 groups)
ch_mult = (1, 1, 2, 2, 4)  # ints; width of each resolution level in units of ch; latent side image_size / 2^(levels-1)
num_res_blocks = 2  # >= 1; resnet blocks per level (the decoder has one more)
embed_dim = 32  # >= 1; latent channels
init_from = ""  # path; start from these weights (a checkpoint or a folder of them; the released file works too)
# VF loss (paper section 3.2)
vf_model = "vit_large_patch14_dinov2.lvd142m"  # text; timm name; "vit_large_patch16_224.mae" for MAE; "" for LDM
vf_weights = "hub"  # text; "hub": download through timm; or a local weights file; "random": untrained (tests only)
vf_image_size = 224  # >= 14; the image is resized to this for the foundation model (DINOv2 224 -> 16x16; MAE: 256)
vf_imagenet_norm = False  # True | False; the release feeds DINOv2 the [-1,1] image without ImageNet normalisation
vf_weight = 0.1  # >= 0; times the adaptive weight ||grad nll|| / ||grad vf||
cos_margin = 0.5  # [0, 1]; m1
distmat_margin = 0.25  # [0, 1]; m2
# reconstruction and GAN losses
lpips_weights = "vgg.pth"  # path; LPIPS heads (`lpips` package: lpips/weights/v0.1/vgg.pth) or a checkpoint with them
perceptual_weight = 1.0  # >= 0; 0: no LPIPS (not even built)
kl_weight = 1e-6  # >= 0
disc_weight = 0.5  # >= 0; times the adaptive weight ||grad nll|| / ||grad g_loss||
disc_start = 2501  # >= 0; first step with the GAN; the release's 5001 counts Lightning optimizer steps, two per step
# optimisation
epochs = 50  # >= 1
max_steps = 0  # >= 0; stop at this step if > 0 (it must fall within the epochs)
global_batch_size = 256  # >= 1
micro_batch_size = 0  # >= 0; per-process batch of one forward pass; 0: the whole share (smaller: accumulation)
lr = 1e-4  # > 0
beta1 = 0.5  # [0, 1)
beta2 = 0.9  # [0, 1)
ema_decay = 0.0  # [0, 1); keep an EMA of the autoencoder weights if > 0 (the release keeps none)
# system
seed = 0  # [0, 1e9]; every random choice derives from it
out_dir = "out/vavae"  # path
log_every = 50  # >= 1; print a line and append it to out_dir/metrics.jsonl
image_every = 1000  # >= 0; write a PNG of the same 8 images over their reconstructions every N steps if > 0
ckpt_every = 5000  # >= 1; SIGINT/SIGTERM also save one, at the next step
timeout_minutes = 10.0  # > 0; a collective waiting longer than this (a stuck rank) ends the job
compile = None  # True | False | None; torch.compile the networks; None: on CUDA only
bf16 = None  # True | False | None; bf16 autocast; None: on CUDA only (bf16 is very slow on CPUs)
allow_unsafe_checkpoint = False  # True | False; let torch unpickle arbitrary objects (only files you trust)
config = configure(globals())



class RandomCrops(torch.utils.data.Dataset):
    """Item (index, crop seed) -> (3, S, S) float image in [-1, 1], or None if the file cannot be decoded."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, crop_seed = item
        try:
            image = load_rgb(self.files[index])
        except Exception:  # noqa: BLE001 -- PIL raises many types for broken files
            return None
        scale = self.size / min(image.size)  # short side -> size, as the release (it upscales small images too)
        image = image.resize((max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))),
                             resample=Image.BILINEAR)
        rng = random.Random(crop_seed)
        left, top = rng.randint(0, image.width - self.size), rng.randint(0, image.height - self.size)
        crop = np.array(image.crop((left, top, left + self.size, top + self.size)))
        return torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1.0  # = (u8 / 255 - 0.5) / 0.5


def collate(items):
    good = [x for x in items if x is not None]
    return (torch.stack(good) if good else None), len(items) - len(good)


def epoch_order(epoch, n):
    """The permutation of the dataset and a crop seed per image for one epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator), torch.randint(2 ** 31, (n,), generator=generator)


def micro_batches(start_step):
    """[(index, crop seed)] for each micro-batch of this rank, from start_step to the end of training."""
    epoch = -1
    for step in range(start_step, total_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order, crop_seeds = epoch_order(epoch, len(files))
        position = (step % steps_per_epoch) * global_batch_size + rank * per_rank
        for k in range(accumulation):
            indices = order[position + k * micro: position + (k + 1) * micro]
            yield list(zip(indices.tolist(), crop_seeds[indices].tolist()))


def load_strict(module, state, what):
    load_weights(module, state, what, " (check --ch/--embed_dim/--vf_model)")


def average_gradients(params):
    """Mean gradient over processes: one all-reduce after all micro-batches. Done by hand rather than by DDP hooks, so
    that the autograd.grad calls of the adaptive weights and the three discriminator passes per step need no care."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, chunk in zip(grads, flat.div_(world_size).split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


@torch.no_grad()
def save_image_grid(step):
    """The same (up to) 8 crops for the whole run (top row) over their reconstructions from the posterior mean."""
    with autocast:
        recon = autoencoder.decode(autoencoder.encode(grid_images).mean)
    rows = images_to_uint8(torch.cat([grid_images, recon.float()])).cpu()  # (2n, H, W, 3)
    n, h, w = len(rows) // 2, rows.shape[1], rows.shape[2]
    grid = rows.reshape(2, n, h, w, 3).permute(0, 2, 1, 3, 4).reshape(2 * h, n * w, 3)
    save_png(grid.numpy(), os.path.join(out_dir, f"recon_{step:08d}.png"))


# ----------------------------------------------------------------------------------------------------------------------
# setup

rank, world_size, device = setup_distributed(timeout_minutes)
master = rank == 0
catch_stop_signals()
use_compile, autocast = compile_and_autocast(device, compile, bf16)
if master:
    print("config:", config)

if not ch_mult or min(ch_mult) < 1:
    fail(f"ch_mult {ch_mult} must hold one positive width multiple per level, e.g. (1, 1, 2, 2, 4)")
if image_size % 2 ** (len(ch_mult) - 1) or ch % 32:
    fail(f"image_size ({image_size}) must be a multiple of {2 ** (len(ch_mult) - 1)} (ch_mult has {len(ch_mult)} "
         f"levels) and ch ({ch}) of 32 (GroupNorm has 32 groups)")

if not os.path.isdir(data_dir):
    fail(f"data_dir {data_dir} is not a folder (expected an ImageNet-layout folder: {data_dir}/<class>/<image>)")
files = list_images(data_dir)
if not files:
    fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {data_dir}")
per_rank, micro, accumulation, steps_per_epoch, total_steps = batch_schedule(
    len(files), f"images in {data_dir}", global_batch_size, micro_batch_size, world_size, epochs, max_steps)
if master:
    prepare_out_dir(out_dir)  # writable? now, not at the first checkpoint hours later

torch.manual_seed(seed)  # the same initial weights on every rank
autoencoder = AutoencoderKL(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=embed_dim,
                            embed_dim=embed_dim).to(device)
discriminator = NLayerDiscriminator().to(device)
lpips = LPIPS(lpips_weights, allow_unsafe_checkpoint).to(device) if perceptual_weight > 0 else None
if lpips:
    lpips.train()  # release quirk: Lightning switches the whole module to train mode, so LPIPS's dropout is active
foundation = FoundationModel(vf_model, vf_weights, vf_image_size, vf_imagenet_norm,
                             allow_unsafe_checkpoint).to(device) if vf_model else None
latent_side = image_size // autoencoder.downsample_factor
if foundation and foundation.grid != latent_side:
    fail(f"{vf_model} at --vf_image_size={vf_image_size} gives a {foundation.grid}x{foundation.grid} token grid but "
         f"{image_size} px images give {latent_side}x{latent_side} latents; set vf_image_size = latent side x patch")
vf_loss = VFLoss(embed_dim, foundation.feature_dim, cos_margin, distmat_margin).to(device) if foundation else None
ema = AutoencoderKL(**autoencoder.kwargs).to(device).requires_grad_(False) if ema_decay > 0 else None
trained = {"autoencoder": autoencoder, "discriminator": discriminator} | ({"vf_loss": vf_loss} if vf_loss else {})

ae_params = list(autoencoder.parameters()) + (list(vf_loss.parameters()) if vf_loss else [])
optimizer_ae = torch.optim.Adam(ae_params, lr=lr, betas=(beta1, beta2))
optimizer_disc = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(beta1, beta2))
for p in discriminator.parameters():  # zero gradients until disc_start: Adam counts those steps, as released
    p.grad = torch.zeros_like(p)

step = 0
resume_path = latest_checkpoint(out_dir)
RESUME_FREE = {"data_dir", "num_workers", "init_from", "epochs", "max_steps", "out_dir", "log_every", "image_every",
               "ckpt_every", "timeout_minutes", "compile", "allow_unsafe_checkpoint",  # they leave the arithmetic
               "lr"}  # changes it on purpose, e.g. to get past a divergence
if resume_path:
    checkpoint = load_checkpoint(resume_path, allow_unsafe_checkpoint,
                                 need=("autoencoder", "optimizer_ae", "optimizer_disc", "step", "config"),
                                 hint=": it is not a train_vavae.py checkpoint to resume. To start from its weights, "
                                      "move it out of out_dir and pass --init_from=IT")
    check_resume(checkpoint["config"], config, resume_path, RESUME_FREE)
    for name, module in trained.items():
        load_strict(module, checkpoint.get(name, {}), f"{name} of {resume_path}")
    if ema is not None:
        load_strict(ema, checkpoint.get("autoencoder_ema", checkpoint["autoencoder"]), resume_path)
    optimizer_ae.load_state_dict(checkpoint["optimizer_ae"])
    optimizer_disc.load_state_dict(checkpoint["optimizer_disc"])
    step = checkpoint["step"]
    del checkpoint
    if master:
        print(f"resumed from {resume_path} at step {step}")
elif init_from:  # weights only: a new stage starts with fresh optimizers at step 0
    path = latest_checkpoint(init_from) if os.path.isdir(init_from) else init_from
    if path is None:
        fail(f"--init_from={init_from} is a folder without step_*.pt checkpoints")
    load_strict(autoencoder, load_autoencoder(path, allow_unsafe_checkpoint).state_dict(), path)
    checkpoint = load_checkpoint(path, allow_unsafe_checkpoint)
    release = checkpoint.get("state_dict", {})  # the release's Lightning checkpoint keeps the loss modules here
    release = {"vf_loss": {k: v for k, v in release.items() if k.startswith("linear_proj.")},
               "discriminator": {k.removeprefix("loss.discriminator."): v for k, v in release.items()
                                 if k.startswith("loss.discriminator.")}}
    for name in ("vf_loss", "discriminator"):
        state = checkpoint.get(name) or release[name]
        if name in trained and state:
            load_strict(trained[name], state, f"{name} of {path}")
        elif name in trained and master:
            print(f"note: {path} has no {name} weights; it starts from its initialisation")
    del checkpoint
    if master:
        print(f"initialised from {path}")
if ema is not None and not resume_path:
    ema.load_state_dict(autoencoder.state_dict())

if use_compile:  # in place, so that state_dict keys keep their names
    for module in (autoencoder.encoder, autoencoder.decoder, discriminator, lpips, foundation):
        if module is not None:
            module.compile()
decoder_last, encoder_last = autoencoder.decoder.conv_out.weight, autoencoder.encoder.conv_out.weight
if master and image_every:  # 8 images spread over the data set, one fixed crop each: progress can be compared
    grid_images = [RandomCrops(files, image_size)[(i, 0)] for i in range(0, len(files), len(files) // 8 or 1)][:8]
    grid_images = torch.stack([x for x in grid_images if x is not None] or [torch.zeros(3, image_size, image_size)])
    grid_images = grid_images.to(device)
metrics = MetricsLog(out_dir, step, total_steps, master)
if master:
    print(f"{sum(p.numel() for p in autoencoder.parameters()):,} autoencoder parameters; {len(files):,} images; "
          f"{steps_per_epoch} steps per epoch; training to step {total_steps}; {world_size} process(es) x "
          f"{accumulation} micro-batch(es) of {micro}")


def save(step):
    if master:
        state = {name: module.state_dict() for name, module in trained.items()}
        state |= {"autoencoder_kwargs": autoencoder.kwargs, "optimizer_ae": optimizer_ae.state_dict(),
                  "optimizer_disc": optimizer_disc.state_dict(), "step": step, "epoch": step / steps_per_epoch,
                  "config": config}
        if ema is not None:
            state["autoencoder_ema"] = ema.state_dict()
        save_checkpoint(state, os.path.join(out_dir, checkpoint_name(step)))
        metrics.plot()
        print(f"saved {os.path.join(out_dir, checkpoint_name(step))}")
    if world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------------
# training loop

loader = torch.utils.data.DataLoader(RandomCrops(files, image_size), batch_sampler=micro_batches(step),
                                     num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda")
batches = iter(loader)
# nll_sum is the released objective (summed over pixels); l1 and lpips are its two terms as per-pixel means
LOG_NAMES = ("loss", "nll_sum", "l1", "lpips", "kl", "vf_loss", "vf_weight", "g_loss", "d_weight", "d_loss")
GAN_NAMES = ("g_loss", "d_weight", "d_loss")  # shown once the GAN has started
log_sums, log_steps, log_time, skipped, stop = torch.zeros(len(LOG_NAMES), device=device), 0, time.time(), 0, False
zero = torch.zeros((), device=device)
for group in optimizer_ae.param_groups + optimizer_disc.param_groups:
    group["lr"] = lr  # this run's learning rate, also after a resume
while step < total_steps and not stop:
    torch.manual_seed((seed * 1_000_003 + step) * world_size + rank)  # posterior noise and LPIPS dropout of this step
    gan = step >= disc_start  # before it the GAN terms are multiplied by 0: not computed, the same update
    step_logs, decoded = torch.zeros(len(LOG_NAMES), device=device), 0
    for k in range(accumulation):
        x, failed = next(batches)
        skipped += failed
        if x is None:
            continue
        decoded += len(x)
        x = x.to(device, non_blocking=True)
        batch = x.shape[0]

        # autoencoder, VF projection: reconstruction + KL + adaptive GAN + adaptive VF (release LPIPSWithDiscriminator)
        with autocast:
            posterior = autoencoder.encode(x)
            z = posterior.sample()
            recon = autoencoder.decode(z)
            l1 = (x - recon).abs()
            p_loss = lpips(x, recon) if lpips else torch.zeros(batch, 1, 1, 1, device=device)
            rec_loss = l1 + perceptual_weight * p_loss  # p_loss (B,1,1,1) is added to every pixel
            # the release divides by exp(logvar) and adds logvar, but logvar is in no optimizer: it stays 0
            nll = rec_loss.sum() / batch  # summed over pixels and channels, averaged over the batch, as released
            kl = posterior.kl().sum() / batch
            discriminator.requires_grad_(False)  # the generator loss trains the autoencoder only
            g_loss = -discriminator(recon).mean() if gan else zero  # BatchNorm in train mode (batch statistics)
            discriminator.requires_grad_(True)
            vf = vf_loss(z, foundation(x)) if foundation else zero  # LDM baseline: none
        if gan or foundation:
            nll_grad_dec, nll_grad_enc = torch.autograd.grad(nll, [decoder_last, encoder_last], retain_graph=True)
        d_weight = adaptive_weight(nll_grad_dec, g_loss, decoder_last, 1e4) * disc_weight if gan else zero
        w_vf = adaptive_weight(nll_grad_enc, vf, encoder_last, 1e8) * vf_weight if foundation else zero
        loss = nll + kl_weight * kl + d_weight * g_loss + w_vf * vf
        (loss / accumulation).backward()

        # discriminator: hinge loss on the same images and reconstructions
        if gan:
            with autocast:
                d_loss = hinge_d_loss(discriminator(x), discriminator(recon.detach()))
            (d_loss / accumulation).backward()
        else:
            d_loss = zero
        values = (loss, nll, l1.mean(), p_loss.mean(), kl, vf, w_vf, g_loss, d_weight, d_loss)
        step_logs += torch.stack([v.detach().float() for v in values]) / accumulation

    if decoded == 0:  # a whole batch unreadable: a broken folder or mount, not a few bad files
        fail(f"none of the {per_rank} images of step {step} (rank {rank}) could be decoded; check {data_dir}")
    if world_size > 1:
        average_gradients(ae_params)
        average_gradients(list(discriminator.parameters()))
        dist.all_reduce(step_logs)
        step_logs /= world_size
    if not torch.isfinite(step_logs).all():  # checked before the update: the last checkpoint holds finite weights
        fail(f"non-finite loss at step {step} ({dict(zip(LOG_NAMES, step_logs.tolist()))}); nothing was saved after "
             f"the last checkpoint in {out_dir}. Lower --lr or check the data")
    optimizer_ae.step()
    optimizer_disc.step()
    optimizer_ae.zero_grad(set_to_none=False)
    optimizer_disc.zero_grad(set_to_none=False)
    if ema is not None:
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(autoencoder.parameters()), 1 - ema_decay)
    step += 1
    log_sums += step_logs
    log_steps += 1

    last = step == total_steps
    stop = should_stop(step)  # SIGINT/SIGTERM: a checkpoint now, on every rank at the same step
    if master and image_every and (step % image_every == 0 or last):
        save_image_grid(step)
    if step % log_every == 0 or last or stop:
        logs = {k: v for k, v in zip(LOG_NAMES, (log_sums / log_steps).tolist())
                if (step > disc_start or k not in GAN_NAMES) and (lpips or k != "lpips")}
        elapsed = time.time() - log_time
        eta = metrics.log(step, {"epoch": step / steps_per_epoch, **logs, "lr": lr,
                                 "img_per_s": log_steps * global_batch_size / elapsed})
        if master:
            print(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} | "
                  + " ".join(f"{k} {v:.4g}" for k, v in logs.items())
                  + f" | {log_steps * global_batch_size / elapsed:.1f} img/s | eta {eta}", flush=True)
        log_sums.zero_()
        log_steps, log_time = 0, time.time()
    if step % ckpt_every == 0 or last or stop:
        save(step)

if world_size > 1:
    skipped = torch.tensor(skipped, device=device)
    dist.all_reduce(skipped)
    skipped = int(skipped)
    dist.destroy_process_group()
if master:
    if skipped:
        print(f"warning: skipped {skipped} unreadable image(s) (their batches were smaller)")
    print(metrics.summary(step, global_batch_size, "l1"))
