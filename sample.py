"""Draw images from LightningDiT + VA-VAE: a labelled grid to look at, or N images for FID.

    python sample.py --dit_path=out/dit/step_00080000.pt --vavae_path=vavae.pt --latent_stats_path=latents_stats.pt
    torchrun --nproc_per_node=8 sample.py config/sample_800ep.py --mode=fid --num_images=50000 --out_dir=out/fid50k

Defaults reproduce the release's FID sampling of the 800-epoch LightningDiT-XL: Euler on 250 time points (249 model
calls) shifted by 0.3, guidance 6.7 on channels 0-2 only ("legacy3") from t = 0.125 on, fp32, decode clamped to uint8.
config/sample_64ep.py holds the 64-epoch settings (10.0 from t = 0.10).

mode="grid": one PNG, a column per class label and a row per seed (out_dir/grid.png).
mode="fid": out_dir/{i:06d}.png for i < num_images, then out_dir/samples.npz with `arr_0` (N, H, W, 3) uint8 in image
order and `arr_1` (N,) int64, the class label of image i: the layout of ADM's evaluation suite (its labelled reference
batches hold the same two arrays). Image i starts from the noise of a generator seeded with base_seed + i and has
label i % num_classes (labels="balanced") or a label drawn from that generator (labels="random"). Images are made in
fixed batches of consecutive indices dealt out to the ranks in turn, so the set is the same bit for bit on any number of
GPUs (at a fixed batch_size; another batch size, or compile, changes only float summation order), and num_images needs
no particular divisibility. A rerun skips finished batches; out_dir/run.json records the settings, and a rerun with
other settings stops instead of mixing two runs (a larger num_images is fine: it adds images). PNGs are saved by a
background thread while the model draws the next batch; every file is written under a temporary name and renamed, so a
killed run leaves only whole files (the next run removes its temporary ones).
"""
import collections
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

from config.runtime import (configure, explain, fail, load_latent_stats, prepare_out_dir, progress_printer,
                            save_png, setup_distributed, write_atomically)
from dit import load_dit, sample
from vavae import denormalize_latents, images_to_uint8, load_autoencoder

# models
dit_path = "lightningdit-xl-imagenet256-800ep.pt"  # path; our train_dit.py checkpoint (EMA weights) or a released one
vavae_path = "vavae-imagenet256-f16d32-dinov2.pt"  # path; the VA-VAE whose latents the DiT was trained on
latent_stats_path = "latents_stats.pt"  # path; written by prepare.py (the release ships one for ImageNet)
allow_unsafe_checkpoint = False  # True | False; let torch unpickle arbitrary objects (only for checkpoints you trust)
# what to draw
mode = "grid"  # grid | fid
out_dir = "out/samples"  # path
grid_labels = None  # None | ints; column labels; None: the release's demo classes on ImageNet, else the first 16
grid_seeds = (0, 1)  # ints; one row per seed; the seed fixes the noise, so a row shows classes from the same start
num_images = 50000  # >= 1; fid mode
labels = "random"  # random | balanced; random: uniform per image, as the release; balanced: image i has i % num_classes
base_seed = 0  # [0, 1e18]; image i of the fid set starts from seed base_seed + i
batch_size = 32  # >= 1; images per rank and model call (guidance doubles it)
# sampler: the release's settings for the 800-epoch model
num_steps = 250  # >= 2; time points; Euler makes num_steps - 1 model calls
timestep_shift = 0.3  # > 0; t -> s t / (1 + (s - 1) t); below 1 spends more steps near the noise
cfg_scale = 6.7  # >= 0; classifier-free guidance scale; 1: none
cfg_interval_start = 0.125  # [0, 1]; guidance only where t >= this (t = 0 is noise)
guidance = "legacy3"  # legacy3 | all; legacy3 (release): guide channels 0-2; all: standard classifier-free guidance
method = "euler"  # euler | heun; euler as released
precision = "fp32"  # fp32 | bf16; fp32 as released; bf16: the DiT under bf16 autocast (CUDA only)
compile = None  # True | False | None; torch.compile the DiT; None: on CUDA only
timeout_minutes = 10.0  # > 0; a collective waiting longer than this (a stuck rank) ends the job

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


def png_path(i):
    return os.path.join(out_dir, f"{i:06d}.png")


def read_png(i):
    try:
        with Image.open(png_path(i)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
        fail(f"{png_path(i)} is unreadable ({explain(e)}); delete it and rerun to draw it again")


def write_npz(path, image_labels):
    """ADM's sample batch, as np.savez writes it: `arr_0` (N, H, W, 3) uint8, image i at row i, streamed into the zip
    one image at a time (50k images at 512 px are 39 GB), and `arr_1` (N,) int64, the label of image i."""
    n, shape = len(image_labels), read_png(0).shape

    def write(file):
        with zipfile.ZipFile(file, "w") as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
                for i in range(n):
                    image = read_png(i)
                    if image.shape != shape:
                        fail(f"{png_path(i)} is {image.shape}, image 0 is {shape}; delete the odd one and rerun")
                    f.write(image.tobytes())
            with archive.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(image_labels, dtype=np.int64))
    write_atomically(path, write)
    print(f"wrote {path}: arr_0 ({n}, {', '.join(map(str, shape))}) uint8, arr_1 ({n},) int64 labels")


def labelled_grid(images, captions, columns, caption_height=14):
    """Tile (N, H, W, 3) images in rows of `columns`, each with its caption underneath; images narrower than 64 px
    are enlarged (nearest pixel) by a whole factor, so that the caption fits and the pixels stay visible."""
    zoom = -(-64 // images.shape[2])
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
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
        try:
            with open(path) as f:
                previous = dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            fail(f"{path} is unreadable ({e}); it records the settings of the images in {out_dir}: use a new --out_dir")
        changed = [f"{k}: {previous.get(k)!r} -> {run[k]!r}" for k in run if previous.get(k) != run[k]]
        if changed:
            fail(f"{out_dir} holds images of another run ({'; '.join(changed)}). Use a new --out_dir, or rerun with "
                 "the settings in run.json")
    elif any(name.endswith(".png") and name[:-4].isdigit() for name in os.listdir(out_dir)):
        fail(f"{out_dir} holds numbered PNGs but no run.json, so they may come from another run; use a new --out_dir")


@torch.no_grad()  # the whole script is inference; a decorator (not set_grad_enabled) leaves callers' grad mode alone
def main(argv=None):
    settings = configure(globals(), argv)
    rank, world_size, device = setup_distributed(timeout_minutes)
    if precision == "bf16" and device.type != "cuda":
        fail("--precision=bf16 needs a CUDA GPU (bf16 on CPU is ~100x slower); use fp32")
    if mode == "grid" and (grid_labels == () or not grid_seeds):
        fail(f"--grid_labels={grid_labels} and --grid_seeds={grid_seeds} need one entry or more, e.g. (1, 2, 3)")
    if not os.path.isfile(latent_stats_path):
        fail(f"latent statistics {latent_stats_path} do not exist; prepare.py writes them next to the latent shards "
             "(latents_stats.pt), the release ships one for ImageNet")
    if rank == 0:  # before the slow part; one rank only, as it removes temporary files (the others wait below)
        prepare_out_dir(out_dir)

    model = load_dit(dit_path, allow_unsafe_checkpoint).to(device)
    autoencoder = load_autoencoder(vavae_path, allow_unsafe_checkpoint).to(device)
    latent_mean, latent_std = (s.to(device) for s in load_latent_stats(latent_stats_path))
    if not model.in_channels == autoencoder.embed_dim == latent_mean.shape[1]:
        fail(f"the DiT takes {model.in_channels} latent channels, the VA-VAE makes {autoencoder.embed_dim} and the "
             f"statistics have {latent_mean.shape[1]}: they must come from the same tokenizer")
    sampling_model = torch.compile(model) if (device.type == "cuda" if compile is None else compile) else model
    shape = (model.in_channels, model.input_size, model.input_size)
    num_classes = model.num_classes
    if rank == 0:
        print(f"DiT on latents {shape} with {num_classes} classes, {world_size} rank(s); settings: {settings}")

    def generate(noise, y):
        """Noise (B, C, h, w) and labels (B,) -> (B, H, W, 3) uint8 images."""
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            z = sample(sampling_model, noise.to(device), y.to(device), num_steps=num_steps,
                       timestep_shift=timestep_shift, cfg_scale=cfg_scale, cfg_interval_start=cfg_interval_start,
                       guidance=guidance, method=method)
        if not z.isfinite().all():
            fail(f"the DiT gave non-finite latents; are the weights in {dit_path} broken?")
        images = autoencoder.decode(denormalize_latents(z.float(), latent_mean, latent_std))
        return np.asarray(images_to_uint8(images).cpu())

    if mode == "grid":
        if rank == 0:
            columns = grid_labels if grid_labels is not None else (
                tuple(RELEASE_DEMO_LABELS) if num_classes == 1000 else tuple(range(min(num_classes, 16))))
            if not all(0 <= y < num_classes for y in columns):
                fail(f"--grid_labels={columns} has labels outside 0..{num_classes - 1}")
            cells = [noise_and_label(s, num_classes, shape, y) for s in grid_seeds for y in columns]
            images = np.concatenate([generate(torch.stack([z for z, _ in cells[i:i + batch_size]]),
                                              torch.tensor([y for _, y in cells[i:i + batch_size]]))
                                     for i in range(0, len(cells), batch_size)])
            path = os.path.join(out_dir, "grid.png")
            save_png(labelled_grid(images, [f"y={y} s={s}" for s in grid_seeds for y in columns], len(columns)), path)
            print(f"wrote {path}: labels {columns} x seeds {grid_seeds}")
    else:
        run = {k: os.path.abspath(settings[k]) if k.endswith("_path") else settings[k] for k in RUN_KEYS}
        run |= {"num_classes": num_classes, "latent_shape": list(shape)}
        if rank == 0:
            check_run_manifest(run)
            write_atomically(os.path.join(out_dir, "run.json"), lambda f: f.write(json.dumps(run, indent=1).encode()))
            if labels == "balanced" and num_images % num_classes:
                print(f"note: {num_images} is not a multiple of {num_classes} classes: classes 0 to "
                      f"{num_images % num_classes - 1} get one image more than the others")
        if world_size > 1:
            torch.distributed.barrier()  # no rank adds images before out_dir and its run.json are checked

        def start_of(i):  # image i's noise and label
            return noise_and_label(base_seed + i, num_classes, shape, i % num_classes if labels == "balanced" else None)

        # fixed batches of consecutive images, dealt out to the ranks: a batch holds the same images whatever the
        # number of ranks, so the float arithmetic, and the images, are the same bit for bit
        batches = [range(b, min(b + batch_size, num_images)) for b in range(0, num_images, batch_size)]
        mine = [batch for batch in batches[rank::world_size] if not all(os.path.exists(png_path(i)) for i in batch)]
        todo = sum(len(batch) for batch in mine)
        print(f"rank {rank}: {todo} images to make, {sum(map(len, batches[rank::world_size])) - todo} done before",
              flush=True)
        progress = progress_printer(f"rank 0 of {world_size}", todo) if rank == 0 else (lambda n: None)
        # PNGs are saved on a thread beside the model (PNG encoding and file writes release the GIL), at most two
        # batches behind it; result() hands a write error (its one error line) to this thread
        with ThreadPoolExecutor(1) as png_writer:
            saving = collections.deque()
            for batch in mine:  # an unfinished batch is redone whole (same arithmetic); only its missing PNGs saved
                cells = [start_of(i) for i in batch]
                images = generate(torch.stack([z for z, _ in cells]), torch.tensor([y for _, y in cells]))
                saving += [png_writer.submit(save_png, image, png_path(i)) for i, image in zip(batch, images)
                           if not os.path.exists(png_path(i))]
                while len(saving) > 2 * batch_size:
                    saving.popleft().result()
                progress(len(batch))
            for future in saving:
                future.result()
        if world_size > 1:
            torch.distributed.barrier()
        if rank == 0:
            write_npz(os.path.join(out_dir, "samples.npz"), [start_of(i)[1] for i in range(num_images)])
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
