"""Train LightningDiT with rectified flow on VA-VAE latent shards.

    python train_dit.py --data_dir=data/latents --model_name=LightningDiT-B/1 --global_batch_size=32   # one process
    torchrun --nproc_per_node=8 train_dit.py --epochs 64                                         # the 64-epoch recipe

Data: a folder of safetensors shards holding `latents` (N, C, H, W), `latents_flip` (the same images flipped) and
`labels` (N,), plus `latents_stats.pt` with per-channel `mean`/`std` of shape (1, C, 1, 1). This is the official
release format, so its ImageNet latents train here directly; prepare.py writes the same format.

Checkpoints: out_dir/step_XXXXXXXX.pt = {model, ema, optimizer, step, epoch, config}. A rerun with the same
out_dir resumes from the highest step. All randomness is a function of (seed, step, rank): the epoch order and flips of
(seed, epoch), the noise, times and label dropout of a per-step seed, so a resumed run continues bit for bit without
storing generator states.
"""
import bisect
import collections
import glob
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config.runtime import (MetricsLog, batch_schedule, catch_stop_signals, check_resume, checkpoint_name,
                            compile_and_autocast, configure, explain, fail, latest_checkpoint, load_checkpoint,
                            load_latent_stats, prepare_out_dir, safetensors_layout, save_checkpoint, save_png,
                            setup_distributed, should_stop)
from dit import DIT_SIZES, create_dit, load_state_dict_strict, rectified_flow_loss, sample, sample_timesteps

# data
data_dir = "data/imagenet256_latents"  # path; latent shards + latents_stats.pt
data_in_memory = False  # True | False; read every shard into RAM at start (else read rows from disk as needed)
prefetch_batches = 32  # >= 0; micro-batches read ahead by background threads, overlapping the disk with the step
num_classes = 1000  # >= 1; class labels 0..num_classes-1 (the null label for guidance is num_classes)
# model (the released LightningDiT-XL/1 configuration)
model_name = "LightningDiT-XL/1"  # text; B, L, XL, 1p0B, 1p6B; /1 or /2 is the patch size
depth = 0  # >= 0; non-zero depth, hidden_size, num_heads override the size's own (small experiments)
hidden_size = 0  # >= 0
num_heads = 0  # >= 0
use_qknorm = False  # True | False
use_swiglu = True  # True | False
use_rope = True  # True | False
use_rmsnorm = True  # True | False
wo_shift = False  # True | False
class_dropout_prob = 0.1  # [0, 1); label dropout that trains the unconditional model for guidance
init_from = ""  # path; start a new run from these weights (ours or the release's checkpoint, or a folder of them)
init_weights = "ema"  # ema | model; which weights of init_from
# optimisation (official 64-epoch recipe: 80k steps of 1024)
epochs = 64  # >= 1
max_steps = 0  # >= 0; stop at this step if > 0 (it must fall within the epochs)
global_batch_size = 1024  # >= 1
micro_batch_size = 0  # >= 0; per-process batch of one forward pass; 0: the whole share (smaller: accumulation)
lr = 2e-4  # > 0
beta1 = 0.9  # [0, 1)
beta2 = 0.95  # [0, 1)
weight_decay = 0.0  # >= 0
warmup_steps = 0  # >= 0; linear warmup (the release uses none)
grad_clip = 0.0  # >= 0; clip the gradient norm if > 0 (the release does not)
ema_decay = 0.9999  # [0, 1)
nonfinite = "stop"  # stop | skip; on a NaN/inf loss (stop: checked at log steps; skip: costs a device sync per step)
# system
seed = 0  # [0, 1e9]; every random choice derives from it
out_dir = "out/dit"  # path
log_every = 100  # >= 1; print a line and append it to out_dir/metrics.jsonl
ckpt_every = 10000  # >= 1; SIGINT/SIGTERM also save one, at the next step
timeout_minutes = 10.0  # > 0; a collective waiting longer than this (a stuck rank) ends the job
# evaluation while training (off by default, as released); both decode with the VA-VAE at vavae_path
vavae_path = ""  # path
sample_every = 0  # >= 0; write a grid of EMA samples every N steps if > 0
fid_every = 0  # >= 0; FID of fid_num_samples EMA samples against fid_reference every N steps if > 0
fid_num_samples = 1000  # >= 2
fid_reference = ""  # path; fid.py stats .npz, ADM reference batch or image folder
fid_cfg_scale = 1.0  # >= 0; guidance of the FID samples (50 Euler steps, shift 0.3)
inception_weights = ""  # path; FID Inception .pth; empty: torch hub cache (see fid.py)
compile = None  # True | False | None; torch.compile the model; None: on CUDA only
bf16 = None  # True | False | None; bf16 autocast; None: on CUDA only (bf16 matmuls are very slow on CPUs)
peak_flops = 0.0  # >= 0; per-device peak FLOP/s for MFU; 0: look the GPU up in PEAK_BF16_FLOPS
allow_unsafe_checkpoint = False  # True | False; let torch unpickle arbitrary objects (only files you trust)
config = configure(globals())

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                      "I32": torch.int32}


class LatentShards:
    """Every latent of a folder of safetensors shards, normalised per channel. Rows are read with os.pread, which
    releases the GIL while the disk works, so prefetch threads overlap reading with training; or held in RAM."""

    def __init__(self, folder, in_memory):
        if not os.path.isdir(folder):
            fail(f"data_dir {folder} is not a folder; run prepare.py, or download the official latents into one")
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            fail(f"data_dir {folder} holds no .safetensors shards; run prepare.py to write them")
        stats_path = os.path.join(folder, "latents_stats.pt")
        if not os.path.isfile(stats_path):
            fail(f"{stats_path} is missing: it holds the per-channel mean/std (prepare.py writes it)")
        self.mean, self.std = load_latent_stats(stats_path)
        self.shards, labels, self.shape = [], [], None
        for path in files:
            try:
                layout = {name: (SAFETENSORS_DTYPES[dtype], shape, begin) for name, (dtype, shape, begin, _) in
                          safetensors_layout(path).items() if name in ("latents", "latents_flip", "labels")}
            except (OSError, ValueError, KeyError, TypeError) as e:
                fail(f"shard {path} is unreadable ({explain(e)}); delete it and rerun prepare.py")
            if len(layout) != 3:
                fail(f"shard {path} lacks latents, latents_flip or labels; rerun prepare.py")
            (dtype, shape, _), (label_dtype, label_shape, label_offset) = layout["latents"], layout["labels"]
            if label_dtype.is_floating_point or len(label_shape) != 1:
                fail(f"shard {path}: labels must be integers of shape (N,), got {label_dtype} {label_shape}")
            if len(shape) != 4 or layout["latents_flip"][:2] != (dtype, shape) or shape[0] != label_shape[0]:
                fail(f"shard {path}: latents {shape}, latents_flip {layout['latents_flip'][1]} and labels "
                     f"{label_shape} do not fit together")
            if self.shape is not None and shape[1:] != self.shape:
                fail(f"shard {path} holds latents of shape {list(shape[1:])}, others {list(self.shape)}")
            self.shape = shape[1:]
            file = open(path, "rb")
            memory = file.read() if in_memory else None
            self.shards.append((file, memory, dtype, dtype.itemsize * math.prod(self.shape),
                                layout["latents"][2], layout["latents_flip"][2]))
            labels.append(self.read(len(self.shards) - 1, label_offset, label_dtype.itemsize * shape[0],
                                    label_dtype).long())
        if self.mean.shape[1] != self.shape[0]:
            fail(f"{stats_path} has statistics of {self.mean.shape[1]} channels, the latents {self.shape[0]}")
        self.labels = torch.cat(labels)
        self.shard_start = torch.tensor([0] + [len(x) for x in labels]).cumsum(0).tolist()

    def read(self, shard, offset, size, dtype):
        file, memory = self.shards[shard][:2]
        data = memory[offset:offset + size] if memory is not None else os.pread(file.fileno(), size, offset)
        if len(data) != size:
            fail(f"shard {file.name} ended early (truncated?); delete it and rerun prepare.py")
        return torch.frombuffer(bytearray(data), dtype=dtype)

    def __len__(self):
        return len(self.labels)

    def get(self, indices, flip):
        """Latents (normalised, float32) and labels of `indices`; flip[i] picks the flipped image's latent."""
        rows = []
        for i, f in zip(indices.tolist(), flip.tolist()):
            shard = bisect.bisect_right(self.shard_start, i) - 1
            _, _, dtype, row_bytes, latents, flips = self.shards[shard]
            rows.append(self.read(shard, (flips if f else latents) + (i - self.shard_start[shard]) * row_bytes,
                                  row_bytes, dtype))
        x = torch.stack(rows).view(len(rows), *self.shape).float()
        if not torch.isfinite(x).all():
            fail(f"non-finite values in the latents of images {indices.tolist()}; rerun prepare.py on them")
        return (x - self.mean) / self.std, self.labels[indices]


def epoch_order(epoch, n):
    """The permutation of the dataset and the per-image flip choice (p = 0.5) of one epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator), torch.rand(n, generator=generator) < 0.5


def micro_batches(start_step):
    """This rank's micro-batches (latents, labels) from start_step on, in order; read `prefetch_batches` ahead by
    threads. The order is a function of (seed, epoch) alone, whatever the prefetching."""
    def indices():
        epoch = -1
        for step in range(start_step, total_steps):
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                order, flip = epoch_order(epoch, len(data))
            position = (step % steps_per_epoch) * global_batch_size + rank * per_rank
            for k in range(accumulation):
                chosen = order[position + k * micro: position + (k + 1) * micro]
                yield chosen, flip[chosen]
    if not prefetch_batches:
        yield from (data.get(*batch) for batch in indices())
        return
    with ThreadPoolExecutor(min(prefetch_batches, 16)) as pool:
        pending = collections.deque()
        for batch in indices():
            pending.append(pool.submit(data.get, *batch))
            if len(pending) > prefetch_batches:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------------------------------
# setup

rank, world_size, device = setup_distributed(timeout_minutes)
master = rank == 0
catch_stop_signals()
use_compile, autocast = compile_and_autocast(device, compile, bf16)
if master:
    print("config:", config)


data = LatentShards(data_dir, data_in_memory)
if int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes:
    fail(f"labels in {data_dir} span [{int(data.labels.min())}, {int(data.labels.max())}], outside [0, {num_classes}); "
         "set --num_classes")
per_rank, micro, accumulation, steps_per_epoch, total_steps = batch_schedule(
    len(data), f"latents in {data_dir}", global_batch_size, micro_batch_size, world_size, epochs, max_steps)
if master:
    prepare_out_dir(out_dir)  # writable? now, not at the first checkpoint hours later

model_args = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                  input_size=data.shape[1], in_channels=data.shape[0], num_classes=num_classes,
                  class_dropout_prob=class_dropout_prob, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                  use_rope=use_rope, use_rmsnorm=use_rmsnorm, wo_shift=wo_shift)
width, heads = [given or default for given, default in
                zip((hidden_size, num_heads), DIT_SIZES.get(model_name[13:].partition("/")[0], (0, 0, 1, 1))[1:])]
if width % heads or width // heads % 4:
    fail(f"hidden_size {width} must be num_heads {heads} x a multiple of 4 (RoPE rotates pairs along two axes)")
torch.manual_seed(seed)  # the same initial weights on every rank
raw_model = create_dit(model_name, **model_args).to(device)
ema = create_dit(model_name, **model_args).to(device).eval().requires_grad_(False)
optimizer = torch.optim.AdamW([p for p in raw_model.parameters() if p.requires_grad], lr=lr, betas=(beta1, beta2),
                              weight_decay=weight_decay, fused=device.type == "cuda")

step = 0
resume_path = latest_checkpoint(out_dir)
RESUME_FREE = {"data_dir", "data_in_memory", "prefetch_batches", "init_from", "init_weights", "epochs", "max_steps",
               "out_dir", "log_every", "ckpt_every", "timeout_minutes", "vavae_path", "sample_every", "fid_every",
               "fid_num_samples", "fid_reference", "fid_cfg_scale", "inception_weights", "compile", "peak_flops",
               "allow_unsafe_checkpoint",  # these leave the arithmetic of the steps as it was; the next three change
               "lr", "grad_clip", "nonfinite"}  # it on purpose, e.g. to get past a divergence
if resume_path:
    checkpoint = load_checkpoint(resume_path, allow_unsafe_checkpoint, need=("model", "ema", "optimizer", "step",
                                                                             "config"),
                                 hint=": it is not a train_dit.py checkpoint to resume. To start from its weights, "
                                      "move it out of out_dir and pass --init_from=IT")
    check_resume(checkpoint["config"], config, resume_path, RESUME_FREE)
    load_state_dict_strict(raw_model, checkpoint["model"], resume_path)
    load_state_dict_strict(ema, checkpoint["ema"], resume_path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    step = checkpoint["step"]
    del checkpoint
    if master:
        print(f"resumed from {resume_path} at step {step}")
else:
    if init_from:  # weights only: a new run from step 0 with a fresh optimizer
        checkpoint = load_checkpoint(init_from, allow_unsafe_checkpoint)
        bare = isinstance(checkpoint, dict) and "x_embedder.proj.weight" in checkpoint  # a bare state dict
        if not bare and not (isinstance(checkpoint, dict) and isinstance(checkpoint.get(init_weights), dict)):
            fail(f"{init_from} holds no {init_weights} weights (--init_weights={init_weights}; the other choice is "
                 f"{'model' if init_weights == 'ema' else 'ema'})")
        load_state_dict_strict(raw_model, {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in
                                           (checkpoint if bare else checkpoint[init_weights]).items()}, init_from)
        del checkpoint
        if master:
            print(f"initialised from the {init_weights} weights of {init_from}")
    ema.load_state_dict(raw_model.state_dict())

model = torch.compile(raw_model) if use_compile else raw_model
if world_size > 1:
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
model.train()
flops_per_step = 3 * raw_model.forward_flops() * global_batch_size  # forward + backward (2x forward)
if device.type == "cuda" and not peak_flops:
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), 0.0)
metrics = MetricsLog(out_dir, step, total_steps, master)
if master:
    print(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; {len(data):,} latents of shape {data.shape}; "
          f"{steps_per_epoch} steps per epoch; training to step {total_steps}; {world_size} process(es) x "
          f"{accumulation} micro-batch(es) of {micro}; {flops_per_step / global_batch_size / 1e9:.1f} GFLOP per image")


def save(step):
    if master:
        save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "epoch": step / steps_per_epoch, "config": config},
                        os.path.join(out_dir, checkpoint_name(step)))
        metrics.plot()
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
    z = torch.randn(8, *data.shape, device=device, generator=torch.Generator(device).manual_seed(0))
    images = generate(z, torch.arange(8, device=device) % num_classes, cfg_scale=4.0)
    grid = images.permute(1, 0, 2, 3).reshape(images.shape[1], -1, 3)
    save_png(grid.cpu().numpy(), os.path.join(out_dir, f"samples_{step:08d}.png"))


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
    reference = fid.open_input(fid_reference, data.shape[-1] * vae.downsample_factor)  # folders: crop to sample size
    inception = fid.load_inception(inception_weights or None, device)
    fid_reference_stats = fid.read_input(reference, inception, rank, world_size, device)

# ----------------------------------------------------------------------------------------------------------------------
# training loop

loss_sums = torch.zeros(2, device=device)  # (mse, cos) summed over the steps since the last log, on-device
log_steps, log_time, stop = 0, time.time(), False
batches = micro_batches(step)
while step < total_steps and not stop:
    torch.manual_seed((seed * 1_000_003 + step) * world_size + rank)  # noise, times and label dropout of this step
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr

    step_losses = torch.zeros(2, device=device)
    for k in range(accumulation):
        x1, y = next(batches)
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
    if nonfinite == "skip":  # the host decides whether to step: one device sync per step (a skip on the device
        total = step_losses.sum()  # would need copies of the weights, EMA and optimizer state), so not the default
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
    optimizer.zero_grad(set_to_none=False)  # zeroed in place: no reallocation (page faults on CPUs) every step
    step += 1

    last = step == total_steps
    stop = should_stop(step)  # SIGINT/SIGTERM: a checkpoint now, on every rank at the same step
    fid_score = online_fid() if fid_every and (step % fid_every == 0 or last) else None
    if log_steps and (step % log_every == 0 or step % ckpt_every == 0 or last or stop):
        if world_size > 1:
            dist.all_reduce(loss_sums)
        mse_avg, cos_avg = (loss_sums / (log_steps * world_size)).tolist()
        if not math.isfinite(mse_avg + cos_avg):
            fail(f"non-finite loss at step {step} (mse {mse_avg}, cos {cos_avg}); nothing was saved after the last "
                 f"checkpoint in {out_dir}. Lower --lr, set --grad_clip, or use --nonfinite=skip")
        elapsed = time.time() - log_time
        record = {"epoch": step / steps_per_epoch, "loss": mse_avg + cos_avg, "mse": mse_avg, "cos": cos_avg,
                  "lr": optimizer.param_groups[0]["lr"], "img_per_s": log_steps * global_batch_size / elapsed}
        if peak_flops:
            record["mfu"] = flops_per_step * log_steps / elapsed / (peak_flops * world_size)
        eta = metrics.log(step, record | ({"fid": fid_score} if fid_score is not None else {}))
        if master:
            print(f"step {step}/{total_steps} epoch {record['epoch']:.2f} | loss {record['loss']:.4f} (mse "
                  f"{mse_avg:.4f} cos {cos_avg:.4f}) | {log_steps / elapsed:.2f} steps/s "
                  f"{record['img_per_s']:.0f} img/s"
                  + (f" | MFU {record['mfu']:.1%}" if peak_flops else "") + f" | eta {eta}", flush=True)
        loss_sums.zero_()
        log_steps, log_time = 0, time.time()
    elif fid_score is not None:
        metrics.log(step, {"fid": fid_score})
    if fid_score is not None and master:
        print(f"step {step} | FID {fid_score:.2f} ({fid_num_samples} EMA samples, guidance {fid_cfg_scale})",
              flush=True)
    if sample_every and master and (step % sample_every == 0 or last):
        save_sample_grid(step)
    if step % ckpt_every == 0 or last or stop:
        save(step)

if world_size > 1:
    dist.destroy_process_group()
if master:
    print(metrics.summary(step, global_batch_size, "loss"))
