"""Draw images from LightningDiT + VA-VAE: a labelled grid to look at, or N images for FID.

    python sample.py --dit_path=out/dit/step_00080000.pt --vavae_path=vavae.pt --latent_stats_path=latents_stats.pt
    torchrun --nproc_per_node=8 sample.py config/sample_800ep.py --mode=fid --num_images=50000 --out_dir=out/fid50k

Defaults reproduce the release's FID sampling of the 800-epoch LightningDiT-XL: Euler on 250 time points (249 model
calls) shifted by 0.3, guidance 6.7 on channels 0-2 only ("legacy3") from t = 0.125 on, fp32, decode clamped to uint8.
config/sample_64ep.py holds the 64-epoch settings (10.0 from t = 0.10).

mode="grid": one PNG, a column per class label and a row per seed (out_dir/grid.png).
mode="fid": out_dir/{i:06d}.png for i < num_images, then out_dir/samples.npz with `arr_0` (N, H, W, 3) uint8 in image
order, the layout of ADM's evaluation suite. Image i starts from the noise of a generator seeded with base_seed + i
and has label i % num_classes (labels="balanced") or a label drawn from that generator (labels="random"). Images are
made in fixed batches of consecutive indices dealt out to the ranks in turn, so the set is the same bit for bit on any
number of GPUs (at a fixed batch_size; another batch size changes only float summation order), and num_images needs no
particular divisibility. A rerun skips finished batches; out_dir/run.json records the settings, and a rerun with other
settings stops instead of mixing two runs (a larger num_images is fine: it adds images).
"""
import json
import os
import time
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw

from config import configure, setup_distributed
from dit import load_dit, sample
from vavae import denormalize_latents, images_to_uint8, load_autoencoder, load_latent_stats

# models
dit_path = "lightningdit-xl-imagenet256-800ep.pt"  # our train_dit.py checkpoint (EMA weights) or a released one
vavae_path = "vavae-imagenet256-f16d32-dinov2.pt"
latent_stats_path = "latents_stats.pt"  # written by prepare.py (the release ships one for ImageNet)
allow_unsafe_checkpoint = False  # let torch unpickle arbitrary objects (only for checkpoints you trust)
# what to draw
mode = "grid"  # "grid" or "fid"
out_dir = "out/samples"
grid_labels = None  # column labels; None: the release's demo classes on ImageNet, else the first 16 classes
grid_seeds = (0, 1)  # one row per seed; the seed fixes the noise, so a row shows classes from the same start
num_images = 50000  # fid mode
labels = "random"  # "random": uniform per image, as the release samples; "balanced": image i has label i % num_classes
base_seed = 0  # image i of the fid set starts from seed base_seed + i
batch_size = 32  # images per rank and model call (guidance doubles it)
# sampler: the release's settings for the 800-epoch model
num_steps = 250  # time points; Euler makes num_steps - 1 model calls
timestep_shift = 0.3
cfg_scale = 6.7
cfg_interval_start = 0.125  # guidance only where t >= this (t = 0 is noise)
guidance = "legacy3"  # "legacy3" (release: guide channels 0-2) or "all" (standard classifier-free guidance)
method = "euler"  # "euler" (release) or "heun"
precision = "fp32"  # "fp32" (release) or "bf16" (DiT under bf16 autocast; CUDA only)

RELEASE_DEMO_LABELS = [975, 3, 207, 387, 388, 88, 979, 279]  # the classes of the release's demo grid
RUN_KEYS = ["dit_path", "vavae_path", "latent_stats_path", "labels", "base_seed", "num_steps", "timestep_shift",
            "cfg_scale", "cfg_interval_start", "guidance", "method", "precision"]  # what fixes image i


def noise_and_label(seed, num_classes, shape, label=None):
    """The starting noise of one image from its own generator (CPU, so the same on every device) and its label."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator)
    if label is None:
        label = int(torch.randint(num_classes, (), generator=generator))
    return z, label


def write_png(array, path):
    """Save under a temporary name and rename, so an existing PNG is always a complete one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def png_path(i):
    return os.path.join(out_dir, f"{i:06d}.png")


def write_npz(n, path):
    """ADM's sample batch: `arr_0` (N, H, W, 3) uint8, image i at row i, as np.savez writes it. Streamed into the
    zip one image at a time (50k images at 512 px are 39 GB), under a temporary name."""
    shape = np.asarray(Image.open(png_path(0))).shape
    tmp = f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w") as archive, archive.open("arr_0.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
        for i in range(n):
            image = np.asarray(Image.open(png_path(i)).convert("RGB"))
            if image.shape != shape:
                raise SystemExit(f"error: {png_path(i)} is {image.shape}, image 0 is {shape}; delete the odd one")
            f.write(image.tobytes())
    os.replace(tmp, path)
    print(f"wrote {path}: arr_0 ({n}, {', '.join(map(str, shape))}) uint8")


def labelled_grid(images, captions, columns, caption_height=14):
    """Tile (N, H, W, 3) images in rows of `columns`, each with its caption underneath."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * w, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * w, (k // columns) * (h + caption_height)
        grid.paste(Image.fromarray(image), (x, y))
        draw.text((x + 2, y + h + 1), caption, fill="black")
    return np.asarray(grid)


def check_run_manifest(run):
    """Images already in out_dir are kept only if they come from a run with the same settings."""
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = [f"{k}: {previous.get(k)!r} -> {run[k]!r}" for k in run if previous.get(k) != run[k]]
        if changed:
            raise SystemExit(f"error: {out_dir} holds images of another run ({'; '.join(changed)}). "
                             "Use a new --out_dir, or rerun with the settings in run.json.")
    elif any(name.endswith(".png") and name[:-4].isdigit() for name in os.listdir(out_dir)):
        raise SystemExit(f"error: {out_dir} holds numbered PNGs but no run.json, so they may come from another run; "
                         "use an empty --out_dir")


@torch.no_grad()  # the whole script is inference; a decorator (not set_grad_enabled) leaves callers' grad mode alone
def main(argv=None):
    settings = configure(globals(), argv)
    for name, value, choices in (("mode", mode, ("grid", "fid")), ("labels", labels, ("balanced", "random")),
                                 ("guidance", guidance, ("legacy3", "all")), ("method", method, ("euler", "heun")),
                                 ("precision", precision, ("fp32", "bf16"))):
        if value not in choices:
            raise SystemExit(f"error: --{name}={value!r}; choose one of {', '.join(choices)}")
    for name, least in (("num_images", 1), ("batch_size", 1), ("num_steps", 2)):
        if settings[name] < least:
            raise SystemExit(f"error: --{name} must be at least {least}, got {settings[name]}")
    rank, world_size, device = setup_distributed()
    if precision == "bf16" and device.type != "cuda":
        raise SystemExit("error: --precision=bf16 needs a CUDA GPU (bf16 on CPU is ~100x slower); use fp32")
    if device.type == "cuda":  # the release samples in fp32 with TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if not os.path.isfile(latent_stats_path):
        raise SystemExit(f"error: latent statistics {latent_stats_path} do not exist; prepare.py writes them "
                         "next to the latent shards (latents_stats.pt), the release ships one for ImageNet")
    model = load_dit(dit_path, allow_unsafe_checkpoint).to(device)
    autoencoder = load_autoencoder(vavae_path, allow_unsafe_checkpoint).to(device)
    latent_mean, latent_std = (s.to(device) for s in load_latent_stats(latent_stats_path))
    if not model.in_channels == autoencoder.embed_dim == latent_mean.shape[1]:
        raise SystemExit(f"error: the DiT takes {model.in_channels} latent channels, the VA-VAE makes "
                         f"{autoencoder.embed_dim} and the statistics have {latent_mean.shape[1]}: they must come "
                         "from the same tokenizer")
    shape = (model.in_channels, model.input_size, model.input_size)
    num_classes = model.num_classes
    if rank == 0:
        print(f"DiT on latents {shape} with {num_classes} classes, {world_size} rank(s); settings: {settings}")

    def generate(noise, y):
        """Noise (B, C, h, w) and labels (B,) -> (B, H, W, 3) uint8 images."""
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            z = sample(model, noise.to(device), y.to(device), num_steps=num_steps, timestep_shift=timestep_shift,
                       cfg_scale=cfg_scale, cfg_interval_start=cfg_interval_start, guidance=guidance, method=method)
        if not z.isfinite().all():
            raise SystemExit(f"error: the DiT gave non-finite latents; are the weights in {dit_path} broken?")
        images = autoencoder.decode(denormalize_latents(z.float(), latent_mean, latent_std))
        return np.asarray(images_to_uint8(images).cpu())

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: could not create out_dir {out_dir}: {e.strerror}") from None
    if mode == "grid":
        if rank == 0:
            columns = grid_labels if grid_labels is not None else (
                tuple(RELEASE_DEMO_LABELS) if num_classes == 1000 else tuple(range(min(num_classes, 16))))
            if not all(0 <= y < num_classes for y in columns):
                raise SystemExit(f"error: --grid_labels={columns} has labels outside 0..{num_classes - 1}")
            cells = [noise_and_label(s, num_classes, shape, y) for s in grid_seeds for y in columns]
            images = np.concatenate([generate(torch.stack([z for z, _ in cells[i:i + batch_size]]),
                                              torch.tensor([y for _, y in cells[i:i + batch_size]]))
                                     for i in range(0, len(cells), batch_size)])
            path = os.path.join(out_dir, "grid.png")
            write_png(labelled_grid(images, [f"y={y} s={s}" for s in grid_seeds for y in columns], len(columns)), path)
            print(f"wrote {path}: labels {columns} x seeds {grid_seeds}")
    else:
        run = {k: settings[k] for k in RUN_KEYS} | {"num_classes": num_classes, "latent_shape": list(shape)}
        for k in ("dit_path", "vavae_path", "latent_stats_path"):
            run[k] = os.path.abspath(run[k])
        check_run_manifest(run)
        if world_size > 1:
            torch.distributed.barrier()  # every rank has read the old run.json before rank 0 writes one
        if rank == 0:
            with open(os.path.join(out_dir, "run.json.tmp"), "w") as f:
                json.dump(run, f, indent=1)
            os.replace(os.path.join(out_dir, "run.json.tmp"), os.path.join(out_dir, "run.json"))
            if labels == "balanced" and num_images % num_classes:
                print(f"note: {num_images} is not a multiple of {num_classes} classes: classes 0 to "
                      f"{num_images % num_classes - 1} get one image more than the others")
        # fixed batches of consecutive images, dealt out to the ranks: a batch holds the same images whatever the
        # number of ranks, so the float arithmetic, and the images, are the same bit for bit
        batches = [range(b, min(b + batch_size, num_images)) for b in range(0, num_images, batch_size)]
        mine = [batch for batch in batches[rank::world_size] if not all(os.path.exists(png_path(i)) for i in batch)]
        todo = sum(len(batch) for batch in mine)
        print(f"rank {rank}: {todo} images to make, {sum(map(len, batches[rank::world_size])) - todo} done before",
              flush=True)
        start, done = time.time(), 0
        for batch in mine:  # an unfinished batch is redone whole (same arithmetic); only its missing PNGs are written
            cells = [noise_and_label(base_seed + i, num_classes, shape,
                                     i % num_classes if labels == "balanced" else None) for i in batch]
            images = generate(torch.stack([z for z, _ in cells]), torch.tensor([y for _, y in cells]))
            for i, image in zip(batch, images):
                if not os.path.exists(png_path(i)):
                    write_png(image, png_path(i))
            done += len(batch)
            if rank == 0:
                elapsed = time.time() - start
                print(f"rank 0: {done}/{todo} images, {done / elapsed * world_size:.2f} images/s on "
                      f"{world_size} rank(s), {(todo - done) * elapsed / done / 60:.1f} min left", flush=True)
        if world_size > 1:
            torch.distributed.barrier()
        if rank == 0:
            write_npz(num_images, os.path.join(out_dir, "samples.npz"))
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
