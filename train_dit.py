"""Train LightningDiT with rectified flow on VA-VAE latent shards.

    python train_dit.py --data_dir=data/latents --model=LightningDiT-B/1 --global_batch_size=32   # one process
    torchrun --nproc_per_node=8 train_dit.py --epochs 64                                         # the 64-epoch recipe

Data: a folder of safetensors shards holding `latents` (N, C, H, W), `latents_flip` (the same images flipped) and
`labels` (N,), plus `latents_stats.pt` with per-channel `mean`/`std` of shape (1, C, 1, 1). This is the official
release format, so its ImageNet latents train here directly; prepare.py writes the same format.

Checkpoints: out_dir/step_XXXXXXXX.pt = {model, ema, optimizer, step, epoch, config}. A rerun with the same
out_dir resumes from the highest step. All randomness is a function of (seed, step, rank): the epoch order and flips of
(seed, epoch), the noise, times and label dropout of a per-step seed, so a resumed run continues bit for bit without
storing generator states.
"""
import glob
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import checkpoint_name, configure, latest_checkpoint, load_checkpoint, save_checkpoint, setup_distributed
from dit import create_dit, load_state_dict_strict, rectified_flow_loss, sample, sample_timesteps

# data
data_dir = "data/imagenet256_latents"  # latent shards + latents_stats.pt
num_classes = 1000
# model (the released LightningDiT-XL/1 configuration)
model_name = "LightningDiT-XL/1"  # B, L, XL, 1p0B, 1p6B; /1 or /2 is the patch size
depth = 0  # non-zero depth, hidden_size, num_heads override the size's own (small experiments)
hidden_size = 0
num_heads = 0
use_qknorm = False
use_swiglu = True
use_rope = True
use_rmsnorm = True
wo_shift = False
class_dropout_prob = 0.1  # label dropout that trains the unconditional model for guidance
# optimisation (official 64-epoch recipe: 80k steps of 1024)
epochs = 64
max_steps = 0  # stop at this step if > 0 (it must fall within the epochs)
global_batch_size = 1024
micro_batch_size = 0  # per-process batch of one forward pass; 0: the whole share (smaller: gradient accumulation)
lr = 2e-4
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.0
warmup_steps = 0  # linear warmup (the release uses none)
grad_clip = 0.0  # clip the gradient norm if > 0 (the release does not)
ema_decay = 0.9999
nonfinite = "stop"  # NaN/inf loss: "stop" (checked on log and save steps) or "skip" the step (checked every step)
# system
seed = 0
out_dir = "out/dit"
log_every = 100
ckpt_every = 10000
# evaluation while training (off by default, as released); both decode with the VA-VAE at vavae_path
vavae_path = ""
sample_every = 0  # write a grid of EMA samples every N steps if > 0
fid_every = 0  # FID of fid_num_samples EMA samples against fid_reference every N steps if > 0
fid_num_samples = 1000
fid_reference = ""  # fid.py stats .npz, ADM reference batch or image folder
fid_cfg_scale = 1.0  # guidance of the FID samples (50 Euler steps, shift 0.3)
inception_weights = ""  # FID Inception .pth; empty: torch hub cache (see fid.py)
compile = None  # torch.compile the model; None: on CUDA only
bf16 = None  # bf16 autocast; None: on CUDA only (bf16 matmuls are very slow on CPUs)
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: look the GPU up in PEAK_BF16_FLOPS
allow_unsafe_checkpoint = False
config = configure(globals())

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def fail(message):
    raise SystemExit(f"error: {message}")


class LatentShards:
    """Every latent of a folder of shards, memory-mapped (safetensors), normalised per channel."""

    def __init__(self, folder):
        from safetensors import safe_open
        if not os.path.isdir(folder):
            fail(f"data_dir {folder} does not exist; run prepare.py or download the official latents into it")
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            fail(f"data_dir {folder} holds no .safetensors shards; run prepare.py to write them")
        stats_path = os.path.join(folder, "latents_stats.pt")
        if not os.path.isfile(stats_path):
            fail(f"{stats_path} is missing: it holds the per-channel mean/std (prepare.py writes it)")
        stats = torch.load(stats_path, map_location="cpu", weights_only=True)
        self.mean, self.std = stats["mean"].float(), stats["std"].float()
        self.latents, self.flips, labels, shape = [], [], [], None
        for path in files:
            try:
                shard = safe_open(path, framework="pt")
                latents, flips = shard.get_slice("latents"), shard.get_slice("latents_flip")
                labels.append(shard.get_tensor("labels").long())
            except Exception as e:  # noqa: BLE001 -- safetensors raises several types for bad files
                fail(f"shard {path} is unreadable ({e}); delete it and rerun prepare.py")
            n = labels[-1].shape[0]
            if latents.get_shape() != flips.get_shape() or latents.get_shape()[0] != n or len(latents.get_shape()) != 4:
                fail(f"shard {path}: latents {latents.get_shape()}, latents_flip {flips.get_shape()} and labels "
                     f"({n},) do not fit together")
            if shape is not None and latents.get_shape()[1:] != shape:
                fail(f"shard {path} holds latents of shape {latents.get_shape()[1:]}, others {shape}")
            shape = latents.get_shape()[1:]
            self.latents.append(latents)
            self.flips.append(flips)
        self.shape = tuple(shape)
        if self.mean.shape != (1, self.shape[0], 1, 1) or self.std.shape != self.mean.shape:
            fail(f"{stats_path}: mean/std must have shape (1, {self.shape[0]}, 1, 1), got {tuple(self.mean.shape)}")
        self.labels = torch.cat(labels)
        self.shard_start = torch.tensor([0] + [len(x) for x in labels]).cumsum(0)

    def __len__(self):
        return len(self.labels)

    def get(self, indices, flip):
        """Latents (normalised) and labels of `indices`; flip[i] picks the flipped image's latent."""
        rows = []
        for i, f in zip(indices.tolist(), flip.tolist()):
            shard = int(torch.searchsorted(self.shard_start, i, right=True)) - 1
            j = i - int(self.shard_start[shard])
            rows.append((self.flips if f else self.latents)[shard][j:j + 1])
        x = torch.cat(rows).float()
        if not torch.isfinite(x).all():
            fail(f"non-finite values in the latents of images {indices.tolist()}; rerun prepare.py on them")
        return (x - self.mean) / self.std, self.labels[indices]


def epoch_order(epoch, n):
    """The permutation of the dataset and the per-image flip choice (p = 0.5) of one epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator), torch.rand(n, generator=generator) < 0.5


# ----------------------------------------------------------------------------------------------------------------------
# setup

rank, world_size, device = setup_distributed()
master = rank == 0
use_compile = device.type == "cuda" if compile is None else compile
use_bf16 = device.type == "cuda" if bf16 is None else bf16
autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if master:
    print("config:", config)

if nonfinite not in ("stop", "skip"):
    fail(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
if global_batch_size % world_size:
    fail(f"global_batch_size {global_batch_size} is not divisible by the {world_size} processes")
per_rank = global_batch_size // world_size
micro = micro_batch_size or per_rank
if per_rank % micro:
    fail(f"micro_batch_size {micro} does not divide the per-process batch {per_rank}")
accumulation = per_rank // micro

data = LatentShards(data_dir)
if int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes:
    fail(f"labels in {data_dir} span [{int(data.labels.min())}, {int(data.labels.max())}], outside [0, {num_classes})")
steps_per_epoch = len(data) // global_batch_size
if steps_per_epoch == 0:
    fail(f"{len(data)} latents in {data_dir} are fewer than one global batch of {global_batch_size}")
total_steps = epochs * steps_per_epoch
if max_steps > total_steps:
    fail(f"--max_steps={max_steps} is past the end of --epochs={epochs} ({total_steps} steps of {global_batch_size}); "
         "raise --epochs or lower --max_steps")
total_steps = max_steps or total_steps

model_args = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                  input_size=data.shape[1], in_channels=data.shape[0], num_classes=num_classes,
                  class_dropout_prob=class_dropout_prob, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                  use_rope=use_rope, use_rmsnorm=use_rmsnorm, wo_shift=wo_shift)
torch.manual_seed(seed)  # the same initial weights on every rank
raw_model = create_dit(model_name, **model_args).to(device)
ema = create_dit(model_name, **model_args).to(device).eval().requires_grad_(False)
ema.load_state_dict(raw_model.state_dict())
optimizer = torch.optim.AdamW([p for p in raw_model.parameters() if p.requires_grad], lr=lr, betas=(beta1, beta2),
                              weight_decay=weight_decay, fused=device.type == "cuda")

step = 0
resume_path = latest_checkpoint(out_dir)
if resume_path:
    checkpoint = load_checkpoint(resume_path, allow_unsafe_checkpoint)
    load_state_dict_strict(raw_model, checkpoint["model"], resume_path)
    load_state_dict_strict(ema, checkpoint["ema"], resume_path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    step = checkpoint["step"]
    del checkpoint
    if master:
        print(f"resumed from {resume_path} at step {step}")

model = torch.compile(raw_model) if use_compile else raw_model
if world_size > 1:
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
model.train()
flops_per_step = 3 * raw_model.forward_flops() * global_batch_size  # forward + backward (2x forward)
if device.type == "cuda" and not peak_flops:
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), 0.0)
if master:
    print(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; {len(data):,} latents of shape {data.shape}; "
          f"{steps_per_epoch} steps per epoch; training to step {total_steps}; {world_size} process(es) x "
          f"{accumulation} micro-batch(es) of {micro}; {flops_per_step / global_batch_size / 1e9:.1f} GFLOP per image")


def save(step):
    if master:
        save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "epoch": step / steps_per_epoch, "config": config},
                        os.path.join(out_dir, checkpoint_name(step)))
        print(f"saved {os.path.join(out_dir, checkpoint_name(step))}")
    if world_size > 1:
        dist.barrier()


@torch.no_grad()
def generate(z, y, cfg_scale):
    """EMA samples decoded to uint8 images (B, H, W, 3): 50 Euler steps, shift 0.3, guidance from t = 0.1."""
    with autocast:
        latents = sample(ema, z, y, num_steps=50, cfg_scale=cfg_scale, cfg_interval_start=0.1)
        images = vae.decode(denormalize_latents(latents.float(), data.mean.to(device), data.std.to(device)))
    return images_to_uint8(images.float())


def save_sample_grid(step):
    """One row of 8 samples (fixed noise, classes 0..7) to watch training progress."""
    from PIL import Image
    z = torch.randn(8, *data.shape, device=device, generator=torch.Generator(device).manual_seed(0))
    images = generate(z, torch.arange(8, device=device) % num_classes, cfg_scale=4.0)
    grid = images.permute(1, 0, 2, 3).reshape(images.shape[1], -1, 3)
    Image.fromarray(grid.cpu().numpy()).save(os.path.join(out_dir, f"samples_{step:08d}.png"))


def online_fid():
    """FID of fid_num_samples EMA samples (the same noise and labels at every evaluation), spread over the ranks."""
    import numpy as np
    generator = torch.Generator(device).manual_seed(seed * 100_003 + rank)
    pools = []
    for start in range(rank * micro, fid_num_samples, world_size * micro):
        n = min(micro, fid_num_samples - start)
        z = torch.randn(n, *data.shape, device=device, generator=generator)
        y = torch.randint(0, num_classes, (n,), device=device, generator=generator)
        pools.append(fid.inception_features(inception, generate(z, y, fid_cfg_scale))["pool"])
    pool = fid.gather_rows(np.concatenate(pools) if pools else np.zeros((0, 2048), np.float32), world_size, device)
    return fid.frechet_distance(*fid.feature_statistics(pool), fid_reference_stats["mu"], fid_reference_stats["sigma"])


if sample_every or fid_every:
    if not vavae_path:
        fail("--sample_every and --fid_every need --vavae_path to decode the samples")
    from vavae import denormalize_latents, images_to_uint8, load_autoencoder
    vae = load_autoencoder(vavae_path, allow_unsafe_checkpoint).to(device)
    if vae.embed_dim != data.shape[0]:
        fail(f"the VA-VAE at {vavae_path} has {vae.embed_dim} latent channels, the data {data.shape[0]}")
if fid_every:
    import fid
    if not fid_reference:
        fail("--fid_every needs --fid_reference (a stats .npz from fid.py --save_stats, or an image folder)")
    inception = fid.load_inception(inception_weights or None, device)
    fid_reference_stats = fid.read_input(fid_reference, inception, rank, world_size, device)

# ----------------------------------------------------------------------------------------------------------------------
# training loop

loss_sums = torch.zeros(2, device=device)  # (mse, cos) summed over the steps since the last log, on-device
log_steps, log_time, epoch, order = 0, time.time(), -1, None
while step < total_steps:
    if step // steps_per_epoch != epoch:
        epoch = step // steps_per_epoch
        order, flip = epoch_order(epoch, len(data))
    position = (step % steps_per_epoch) * global_batch_size + rank * per_rank
    torch.manual_seed((seed * 1_000_003 + step) * world_size + rank)  # noise, times and label dropout of this step
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr

    step_losses = torch.zeros(2, device=device)
    for k in range(accumulation):
        indices = order[position + k * micro: position + (k + 1) * micro]
        x1, y = data.get(indices, flip[indices])
        if device.type == "cuda":
            x1, y = x1.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        t = sample_timesteps(micro, device)
        x0 = torch.randn_like(x1)
        sync = k == accumulation - 1 or world_size == 1
        with autocast, (nullcontext() if sync else model.no_sync()):
            mse, cos = rectified_flow_loss(model, x1, y, t, x0)
            loss = (mse.mean() + cos.mean()) / accumulation  # the release adds the two terms 1:1
        loss.backward()
        step_losses += torch.stack([mse.mean(), cos.mean()]).detach() / accumulation

    finite = True
    if nonfinite == "skip":  # one host sync per step, only when asked for
        total = step_losses.sum()
        if world_size > 1:
            dist.all_reduce(total)
        finite = bool(torch.isfinite(total))
        if not finite and master:
            print(f"step {step}: non-finite loss, step skipped")
    if finite:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        with torch.no_grad():  # EMA: ema <- decay * ema + (1 - decay) * model, fused over all tensors
            torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
        loss_sums += step_losses
        log_steps += 1
    optimizer.zero_grad(set_to_none=True)
    step += 1

    last = step == total_steps
    if log_steps and (step % log_every == 0 or step % ckpt_every == 0 or last):
        if world_size > 1:
            dist.all_reduce(loss_sums)
        mse_avg, cos_avg = (loss_sums / (log_steps * world_size)).tolist()
        if not math.isfinite(mse_avg + cos_avg):
            fail(f"non-finite loss at step {step} (mse {mse_avg}, cos {cos_avg}); nothing was saved after the last "
                 f"checkpoint in {out_dir}. Lower --lr, set --grad_clip, or use --nonfinite=skip")
        elapsed = time.time() - log_time
        line = (f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} | loss {mse_avg + cos_avg:.4f} "
                f"(mse {mse_avg:.4f} cos {cos_avg:.4f}) | {log_steps / elapsed:.2f} steps/s "
                f"{log_steps * global_batch_size / elapsed:.0f} img/s")
        if peak_flops:
            line += f" | MFU {flops_per_step * log_steps / elapsed / (peak_flops * world_size):.1%}"
        if master:
            print(line, flush=True)
        loss_sums.zero_()
        log_steps, log_time = 0, time.time()
    if step % ckpt_every == 0 or last:
        save(step)
    if sample_every and master and (step % sample_every == 0 or last):
        save_sample_grid(step)
    if fid_every and (step % fid_every == 0 or last):
        score = online_fid()
        if master:
            print(f"step {step} | FID {score:.2f} ({fid_num_samples} EMA samples, guidance {fid_cfg_scale})", flush=True)

if world_size > 1:
    dist.destroy_process_group()
if master:
    print(f"done: step {step}; checkpoints in {out_dir}")
