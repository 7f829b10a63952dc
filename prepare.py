"""Encode an ImageNet-layout image folder into VA-VAE latent shards for train_dit.py.

    python prepare.py --data_dir=data/imagenet/train --vavae_path=vavae.pt --out_dir=data/latents
    torchrun --nproc_per_node=8 prepare.py --data_dir=... --image_size=512
    python prepare.py --make_demo=data/demo      # write the built-in demo image set (no download) and stop

Output, in the official release format (the released train.py and our train_dit.py read it):
  latents_rank{RR}_shard{SSS}.safetensors  `latents` (N,C,h,w) f32, `latents_flip` (latent of the mirrored image),
                                           `labels` (N,) int64; metadata total_size/dtype/device as released
  latents_stats.pt                         {'mean', 'std'} each (1,C,1,1): per channel over N,h,w of `latents`
  prepare.json                             what produced the shards (settings, class names); a rerun checks it

Classes are the subfolders in sorted order, as torchvision's ImageFolder numbers them. Images are ordered as
ImageFolder orders them and cut into contiguous shards of `shard_size`; shard k is written by rank k % world_size.
Preprocessing is the release's: ADM center crop, then (u8/255 - 0.5)/0.5, then one posterior sample. The noise of that
sample comes from a generator seeded with seed + image index, so the latents do not depend on the number of GPUs or
the batch size (up to float summation order in the encoder). Every file is written under a temporary name and renamed;
a rerun removes the temporary files of a killed run and skips finished shards (a damaged one, such as a copy cut short,
is encoded again).
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save

from config.runtime import (IMAGE_EXTENSIONS, adm_center_crop, configure, explain, fail, load_rgb, prepare_out_dir,
                            progress_printer, safetensors_layout, save_checkpoint, save_png, setup_distributed,
                            walk_once, write_atomically)
from vavae import load_autoencoder, uint8_to_images

# data
data_dir = "data/imagenet/train"  # path; one subfolder per class
out_dir = "data/latents"  # path; shards, latents_stats.pt, prepare.json
image_size = 256  # [16, 4096]; 256 or 512 as released; the latent is image_size / 16
# tokenizer
vavae_path = "vavae-imagenet256-f16d32-dinov2.pt"  # path; our train_vavae.py checkpoint or the released VA-VAE weights
allow_unsafe_checkpoint = False  # True | False; let torch unpickle arbitrary objects (only for checkpoints you trust)
# run
batch_size = 64  # >= 1; images per encoder call and rank (the mirrored copies double it)
num_workers = 8  # >= 0; image decoding processes per rank
shard_size = 10000  # >= 1; images per shard file, as released
seed = 0  # [0, 1e18]; posterior noise of image i is drawn from a generator seeded with seed + i
timeout_minutes = 10.0  # > 0; a collective waiting longer than this (a stuck rank) ends the job
# demo dataset: if set, write it to this folder and stop (train a VA-VAE on it, then encode it with prepare.py)
make_demo = ""  # path; a new or empty folder
demo_classes = 10  # [1, 10]; the first N of the 10 shape-and-colour classes
demo_images_per_class = 100  # >= 1
demo_image_size = 64  # [8, 1024]; pixels


# -----------------------------------------------------------------------------
# images

def scan_image_folder(root):
    """(files, classes): files is [(path, label)] in torchvision ImageFolder order, classes the sorted subfolder names.

    Unlike ImageFolder, an empty class keeps its index (with a warning) instead of stopping the run, so labels
    always match the folder listing, and a folder reached again through a symbolic link (a link loop) is read once;
    files with other extensions are ignored and counted."""
    if not os.path.isdir(root):
        fail(f"data folder {root} {'is a file' if os.path.exists(root) else 'does not exist'} (expected one subfolder "
             "per class)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        fail(f"data folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    files, ignored = [], 0
    for label, name in enumerate(classes):
        walked = list(walk_once(os.path.join(root, name)))
        images = [(os.path.join(folder, n), label) for folder, names in sorted(walked) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += sum(len(names) for _, names in walked) - len(images)
        files += images
        if not images:
            print(f"warning: class folder {name!r} (label {label}) has no images; its label stays reserved")
    if ignored:
        print(f"warning: ignored {ignored} files without an image extension ({' '.join(IMAGE_EXTENSIONS)})")
    if not files:
        fail(f"no images found under {root} (image files end in {' '.join(IMAGE_EXTENSIONS)})")
    return files, classes


class ImageFiles(torch.utils.data.Dataset):
    """(index, HWC uint8 crop or None, label, error message) for each file; bad files do not stop the run."""

    def __init__(self, files, indices, size):
        self.files, self.indices, self.size = files, indices, size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.files[index]
        try:
            return index, np.asarray(adm_center_crop(load_rgb(path), self.size)), label, None
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
            return index, None, label, f"{path} ({explain(e)})"


def collate_good(items):
    good = [item for item in items if item[1] is not None]
    indices = torch.tensor([item[0] for item in good], dtype=torch.int64)
    pixels = torch.from_numpy(np.stack([item[1] for item in good])) if good else None
    labels = torch.tensor([item[2] for item in good], dtype=torch.int64)
    return indices, pixels, labels, [item[3] for item in items if item[1] is None]


# -----------------------------------------------------------------------------
# demo dataset: class = shape x colour, drawn at random position, scale and rotation on a textured background

DEMO_CLASSES = {("red", "circle"): (220, 40, 40), ("green", "square"): (40, 170, 60),
                ("blue", "triangle"): (40, 80, 225), ("yellow", "star"): (240, 205, 40),
                ("magenta", "cross"): (205, 50, 205), ("cyan", "ring"): (40, 205, 215),
                ("orange", "diamond"): (245, 130, 25), ("purple", "hexagon"): (115, 55, 175),
                ("white", "crescent"): (245, 245, 245), ("black", "arrow"): (20, 20, 20)}  # (colour, shape): RGB


def _polygon(shape, cx, cy, r, angle):
    if shape in ("square", "triangle", "hexagon"):
        n = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        points = [(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]
    elif shape == "star":
        points = [((1 if k % 2 == 0 else 0.42) * math.cos(math.pi * k / 5), (1 if k % 2 == 0 else 0.42)
                   * math.sin(math.pi * k / 5)) for k in range(10)]
    elif shape == "cross":
        a = 0.33
        points = [(a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a), (-a, -1), (a, -1), (a, -a), (1, -a), (1, a),
                  (a, a)]
    elif shape == "diamond":
        points = [(1, 0), (0, 0.55), (-1, 0), (0, -0.55)]
    else:  # arrow
        points = [(1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3), (-1, -0.3), (0.2, -0.3), (0.2, -0.7)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _demo_image(rng, shape, colour, size):
    # background: a gradient between two muted colours, faint stripes and pixel noise
    ys, xs = np.mgrid[0:size, 0:size] / size
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(direction) + ys * math.sin(direction) + 1.5) / 3
    a, b = rng.uniform(70, 180, size=3), rng.uniform(70, 180, size=3)
    stripes = 12 * np.sin(2 * math.pi * rng.uniform(2, 6) * (xs * math.sin(direction) - ys * math.cos(direction)))
    background = a + (b - a) * ramp[..., None] + stripes[..., None] + rng.normal(0, 6, size=(size, size, 3))
    # foreground: an anti-aliased mask drawn at 4x and box-filtered down
    big = 4 * size
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.3, 0.7, size=2) * big
    r, angle = rng.uniform(0.18, 0.32) * big, rng.uniform(0, 2 * math.pi)
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
        if shape == "crescent":
            ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
            draw.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    alpha = np.asarray(mask.resize((size, size), resample=Image.BOX), dtype=np.float64)[..., None] / 255
    shading = 1 + 0.25 * (ramp[..., None] - 0.5)  # a little light falloff so shapes are not flat
    foreground = (np.array(colour) + rng.uniform(-15, 15, size=3)) * shading
    pixels = background * (1 - alpha) + foreground * alpha
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def make_demo_dataset(folder, num_classes=10, images_per_class=100, size=64, seed=0):
    """Write a small class-conditional image set as ImageNet-layout PNGs; the same arguments give the same bytes."""
    prepare_out_dir(folder, "make_demo")
    if os.listdir(folder):  # its subfolders become the classes: anything else there would be one more
        fail(f"--make_demo={folder} is not empty (it holds {sorted(os.listdir(folder))[0]}); choose a new or empty "
             "folder")
    rng = np.random.default_rng(seed)
    for label, ((colour, shape), rgb) in enumerate(list(DEMO_CLASSES.items())[:num_classes]):
        class_folder = os.path.join(folder, f"{label:02d}_{colour}_{shape}")
        os.makedirs(class_folder)
        for i in range(images_per_class):
            save_png(_demo_image(rng, shape, rgb, size), os.path.join(class_folder, f"{i:04d}.png"))
    return folder


# -----------------------------------------------------------------------------

def shard_path(shard, world_size):
    """Shard k holds images [k * shard_size, (k + 1) * shard_size) and is written by rank k % world_size,
    named after that rank and its own shard counter as in the release."""
    return os.path.join(out_dir, f"latents_rank{shard % world_size:02d}_shard{shard // world_size:03d}.safetensors")


def shard_done(path):
    """Whether path holds a finished shard. A cheap check catches a copy cut short (the header parses, names our three
    tensors, and the file ends where it says the data ends); such a shard is reported and encoded again."""
    try:
        layout = safetensors_layout(path)
        whole = {"latents", "latents_flip", "labels"} <= set(layout) and \
            os.path.getsize(path) == max(end for *_, end in layout.values())
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # missing or damaged
        whole = False
    if not whole and os.path.exists(path):
        print(f"note: {path} is damaged (a copy cut short?); encoding it again")
    return whole


def check_manifest(manifest):
    """Shards of an earlier run are kept only if that run had the same settings (their names and contents depend on
    them); then record this run's settings."""
    path = os.path.join(out_dir, "prepare.json")
    if any(name.endswith(".safetensors") for name in os.listdir(out_dir)):
        try:
            with open(path) as f:
                previous = dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            fail(f"{out_dir} holds shards but {path} is missing or unreadable ({e}), so they may come from another "
                 "run; use a new --out_dir")
        changed = [k for k in manifest if previous.get(k) != manifest[k]]
        if changed:
            fail(f"{out_dir} holds shards made with other settings ({', '.join(changed)} differ; see {path}). Use a "
                 "new --out_dir, or rerun with the old settings.")
    write_atomically(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


@torch.no_grad()
def encode_shard(autoencoder, files, indices, device, progress):
    """Latents of the images and of their mirror images; posterior noise seeded per image."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, indices, image_size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_good,
                                         pin_memory=device.type == "cuda")
    latents, latents_flip, labels, skipped = [], [], [], []
    for image_indices, pixels, batch_labels, errors in loader:
        skipped += errors
        if pixels is not None:
            x = uint8_to_images(pixels.to(device))
            posterior = autoencoder.encode(torch.cat([x, x.flip(3)]))  # mirrored copy: the flip augmentation
            noise = torch.stack([torch.randn((2, *posterior.mean.shape[1:]),
                                             generator=torch.Generator().manual_seed(seed + int(i)))
                                 for i in image_indices])  # (B, 2, C, h, w): [image, mirror] per image
            noise = torch.cat([noise[:, 0], noise[:, 1]]).to(device)
            z = (posterior.mean + posterior.std * noise).float().cpu()  # the posterior sample, with our noise
            if not z.isfinite().all():
                fail(f"{vavae_path} gives non-finite latents (first for {files[image_indices[0]][0]}); its weights "
                     "may be broken")
            latents.append(z[:len(image_indices)])
            latents_flip.append(z[len(image_indices):])
            labels.append(batch_labels)
        progress(len(image_indices) + len(errors))
    if not latents:
        return None, None, None, skipped
    return torch.cat(latents), torch.cat(latents_flip), torch.cat(labels), skipped


def main(argv=None):
    settings = configure(globals(), argv)
    if make_demo:
        make_demo_dataset(make_demo, demo_classes, demo_images_per_class, demo_image_size)
        print(f"wrote the demo dataset ({demo_classes} classes x {demo_images_per_class} images of "
              f"{demo_image_size}px) to {make_demo}")
        return

    rank, world_size, device = setup_distributed(timeout_minutes)
    if not os.path.exists(vavae_path):
        fail(f"VA-VAE checkpoint {vavae_path} does not exist (train one with train_vavae.py or download the released "
             "vavae-imagenet256-f16d32-dinov2.pt)")
    autoencoder = load_autoencoder(vavae_path, allow_unsafe_checkpoint).to(device)  # a bad file stops before any write
    if image_size % autoencoder.downsample_factor:
        fail(f"--image_size={image_size} must be a multiple of {autoencoder.downsample_factor} (the autoencoder's "
             "downsampling)")
    files_and_classes = list(scan_image_folder(data_dir)) if rank == 0 else [None, None]
    if world_size > 1:  # one scan, so every rank sees the same file list
        torch.distributed.broadcast_object_list(files_and_classes, src=0)
    files, classes = files_and_classes
    if rank == 0:
        print(f"{len(files)} images in {len(classes)} classes, {world_size} rank(s); settings: {settings}")
        prepare_out_dir(out_dir)  # before the slow part; one rank only, as it removes temporary files
        check_manifest({"data_dir": os.path.abspath(data_dir), "num_files": len(files), "classes": classes,
                        "image_size": image_size, "vavae_path": os.path.abspath(vavae_path), "seed": seed,
                        "shard_size": shard_size, "world_size": world_size})
    if world_size > 1:
        torch.distributed.barrier()

    with torch.no_grad():
        latent_shape = autoencoder.encode(torch.zeros(1, 3, image_size, image_size, device=device)).mean.shape[1:]
    num_shards = math.ceil(len(files) / shard_size)
    mine = [k for k in range(rank, num_shards, world_size) if not shard_done(shard_path(k, world_size))]
    todo = sum(min(shard_size, len(files) - k * shard_size) for k in mine)
    if rank == 0:
        print(f"latents of shape {tuple(latent_shape)}; {num_shards} shard(s) of up to {shard_size} images, "
              f"{len(range(0, num_shards, world_size)) - len(mine)} of rank 0's already written", flush=True)
    progress = progress_printer(f"rank 0 of {world_size}", todo) if rank == 0 else (lambda n: None)

    for k in mine:
        indices = list(range(k * shard_size, min((k + 1) * shard_size, len(files))))
        latents, latents_flip, labels, skipped = encode_shard(autoencoder, files, indices, device, progress)
        if latents is None:  # a whole shard unreadable: a broken folder or mount, not a few bad files
            fail(f"none of the {len(indices)} images of shard {k} could be read, e.g. {skipped[0]}; check {data_dir}")
        metadata = {"total_size": str(len(labels)), "dtype": str(latents.dtype), "device": "cpu",
                    "skipped": json.dumps(skipped)}  # the first three as released; `skipped` lists unreadable files
        tensors = {"latents": latents.contiguous(), "latents_flip": latents_flip.contiguous(), "labels": labels}
        write_atomically(shard_path(k, world_size), lambda f: f.write(save(tensors, metadata=metadata)))
    if world_size > 1:
        torch.distributed.barrier()

    # per-channel statistics over N, h, w of every shard's `latents` (unbiased std, as the release's torch.std),
    # each rank summing its own shards in float64
    sums = torch.zeros(3, latent_shape[0], dtype=torch.float64)  # count, sum, sum of squares
    skipped = []
    for k in range(rank, num_shards, world_size):
        with safe_open(shard_path(k, world_size), framework="pt") as f:
            z = f.get_tensor("latents").double()
            skipped += json.loads(f.metadata().get("skipped", "[]"))
        sums[0] += z.numel() / z.shape[1]
        sums[1] += z.sum(dim=(0, 2, 3))
        sums[2] += z.pow(2).sum(dim=(0, 2, 3))
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, skipped)
        skipped = [s for part in gathered for s in part]
    if rank == 0:
        count, total, squares = sums
        mean = total / count
        std = ((squares - count * mean ** 2) / (count - 1)).sqrt()
        stats = {"mean": mean.float().view(1, -1, 1, 1), "std": std.float().view(1, -1, 1, 1)}
        save_checkpoint(stats, os.path.join(out_dir, "latents_stats.pt"))
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s):\n  " + "\n  ".join(skipped))
        print(f"done: {len(files) - len(skipped)} images in {num_shards} shard(s), statistics in "
              f"{os.path.join(out_dir, 'latents_stats.pt')}")
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
