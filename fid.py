"""FID, sFID, Inception Score and precision/recall as OpenAI's ADM evaluator computes them (guided-diffusion,
evaluations/evaluator.py, TensorFlow), in PyTorch; plus PSNR and SSIM for tokenizer reconstructions.

    python fid.py --samples=out/samples.npz --reference=VIRTUAL_imagenet256_labeled.npz
    python fid.py --samples=imagenet_val_256/ --save_stats=imagenet_val_256_stats.npz   # a reference for later
    python fid.py --samples=imagenet/val --reconstruct_with=vavae.pt --lpips_weights=vgg.pth  # rFID, PSNR, SSIM, LPIPS
    torchrun --nproc_per_node=8 fid.py --samples=out/samples.npz --reference=...

An input is a folder of PNG/JPEG images, an ADM image batch (.npz with arr_0: uint8 N x H x W x 3), or a stats
.npz (mu, sigma and optionally mu_s, sigma_s, pool). ADM's reference batches hold images and stats: as ADM does,
the stored stats give FID/sFID and the images' features give precision/recall.

The network is TensorFlow's 'inception-2015-12-05' graph (the FID standard) in the pytorch-fid / torch-fidelity
weight layout, with the graph's own preprocessing and quirks. Inception Score needs the graph's 1008-way softmax
layer (`fc`); weight files without it give IS = None.
"""
import json
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from config import configure, setup_distributed

# inputs and outputs
samples = ""            # folder of PNG/JPEG, ADM .npz (arr_0) or stats .npz
reference = ""          # the same kinds, e.g. ADM's VIRTUAL_imagenet256_labeled.npz
save_stats = ""         # if set: write the stats of `samples` (mu, sigma, mu_s, sigma_s, pool) here, as a reference
out_json = ""           # metrics file; empty: <samples>.metrics.json
# network
inception_weights = ""  # local .pth (pytorch-fid or torch-fidelity layout); empty: torch hub cache, else download
inception_url = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # downloaded into the torch hub cache
batch_size = 100        # images per forward pass (per GPU)
# tokenizer evaluation (the release's evaluate_tokenizer.py): the images of `samples` against their reconstructions
reconstruct_with = ""   # a VA-VAE checkpoint (any vavae.load_autoencoder format): report rFID, PSNR, SSIM, LPIPS
lpips_weights = ""      # LPIPS heads (vavae.LPIPS's formats, e.g. the lpips package's vgg.pth); empty: no LPIPS
image_size = 256        # short side resized to this, then center-cropped (the release: 256)
seed = 0                # the posterior noise of image i comes from a generator seeded with seed + i
allow_unsafe_checkpoint = False  # let torch unpickle arbitrary objects (only for checkpoints you trust)


# -----------------------------------------------------------------------------
# Inception-v3 as in the TF FID graph

def resize_bilinear_tf1(x, size):
    """TF1 tf.image.resize_bilinear(align_corners=False), the FID graph's resize: source = destination * in/out
    with no half-pixel offset (unlike F.interpolate), edge rows/columns repeated; float32 like TF."""
    def grid(n_in):
        scale = torch.tensor(n_in, dtype=torch.float32) / size
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.floor()
        return lo.long().to(x.device), (lo.long() + 1).clamp(max=n_in - 1).to(x.device), (src - lo).to(x.device)
    y0, y1, dy = grid(x.shape[2])
    x0, x1, dx = grid(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def tf_avg_pool(x):
    # TF's SAME-padded 3x3 average divides by the number of real pixels, not 9
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def tf_max_pool(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (the graph's has no scale: gamma is stored as 1), ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 with factorised 7x7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, in_channels, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = ConvBN(c7, c7, **row), ConvBN(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = ConvBN(in_channels, c7, 1), ConvBN(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = ConvBN(c7, c7, **row), ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)), self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(in_channels, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 with split 3x3: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = ConvBN(384, 384, **row), ConvBN(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = ConvBN(in_channels, 448, 1), ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = ConvBN(384, 384, **row), ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        b3, dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(self.pool(x))], 1)


class FIDInception(nn.Module):
    """uint8 N x H x W x 3 -> pool_3 (N x 2048), ADM's sFID features (N x 2023), logits (N x 1008) or None."""

    def __init__(self, with_fc):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        # the graph's last block max-pools where the paper (and the block before) average-pools
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, tf_avg_pool), InceptionE(2048, tf_max_pool)
        self.fc = nn.Linear(2048, 1008) if with_fc else None

    def forward(self, images):
        x = resize_bilinear_tf1(images.permute(0, 3, 1, 2).float(), 299)
        x = (x - 128) / 128  # the graph's Sub 128, Mul 1/128 (exact: a power of two)
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        # ADM's sFID layer 'mixed_6/conv:0' is Mixed_6d's 1x1 branch (after ReLU); it keeps 7 of 192 channels and
        # flattens TF's NHWC layout, so the order must be H, W, C for our stats to match ADM's reference files
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean((2, 3))  # 'pool_3': average over the 8x8 map
        # ADM's IS takes softmax(pool_3 @ W): the graph's softmax weights without their bias
        logits = None if self.fc is None else pool @ self.fc.weight.T
        return pool, spatial, logits


def load_inception(path=None, device="cpu"):
    """The FID Inception network in eval mode. path: a local .pth; None: torch hub cache, downloaded if missing."""
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"error: Inception weights {path} do not exist (get them from {inception_url})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- torch raises several types for files it cannot read
            raise SystemExit(f"error: {path} is not a readable state dict ({type(e).__name__}: {e})") from None
    else:
        try:
            state = torch.hub.load_state_dict_from_url(inception_url, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- offline, proxy, HTTP errors: all mean "no weights"
            raise SystemExit(f"error: could not get the FID Inception weights ({type(e).__name__}: {e}). Download "
                             f"{inception_url} into {os.path.join(torch.hub.get_dir(), 'checkpoints')}/ or pass "
                             "--inception_weights=PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth also works)"
                             ) from None
    model = FIDInception(with_fc="fc.weight" in state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch lists every differing key on its own line: one line, cut short
        detail = " ".join(str(e).split())
        raise SystemExit(f"error: {path or inception_url} is not an FID Inception-v3 state dict: {detail[:300]}"
                         + ("..." if len(detail) > 300 else "")) from None
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# features and metrics

def check_images(images, where="images"):
    if images.dtype not in (np.uint8, torch.uint8) or images.ndim != 4 or images.shape[-1] != 3:
        raise SystemExit(f"error: {where} must be uint8 N x H x W x 3 (RGB, 0..255), "
                         f"got {images.dtype} {tuple(images.shape)}")


@torch.no_grad()
def inception_features(model, images, batch_size=64, log_prefix=None):
    """{'pool': N x 2048, 'spatial': N x 2023, 'logits': N x 1008 or None}, float32 numpy arrays.

    images: uint8 N x H x W x 3 (numpy or torch), or an iterable of such batches (the CLI streams files this way).
    log_prefix: if set, print progress with images/s."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        check_images(images)
        images = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]  # views, no copies
    device = next(model.parameters()).device
    outputs, done, start = [], 0, time.time()
    for batch in images:
        check_images(batch)
        batch = batch.to(device) if torch.is_tensor(batch) else torch.from_numpy(np.array(batch)).to(device)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convs would move features ~1e-3
            outputs.append([None if t is None else t.float().cpu().numpy() for t in model(batch)])
        done += len(batch)
        if log_prefix is not None and (len(outputs) % 20 == 0 or len(outputs) == 1):
            print(f"{log_prefix}: {done} images, {done / (time.time() - start):.1f} images/s", flush=True)
    if not outputs:
        raise SystemExit("error: no images to compute features of")
    pool, spatial, logits = zip(*outputs)
    return {"pool": np.concatenate(pool), "spatial": np.concatenate(spatial),
            "logits": None if logits[0] is None else np.concatenate(logits)}


def feature_statistics(features):
    """(mean, covariance) in float64, covariance with N - 1 like ADM's np.cov."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise SystemExit(f"error: statistics need at least 2 images (features of shape {features.shape})")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    The eigenvalues of S1 S2 are those of the symmetric PSD matrix S1^1/2 S2 S1^1/2, so tr((S1 S2)^1/2) is the sum
    of square roots of its (clipped) eigenvalues: two symmetric eigendecompositions, never complex or NaN, unlike
    ADM's scipy sqrtm on the rank-deficient covariances of small sets (equal to it where that one is well posed)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise SystemExit(f"error: feature dimensions do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise SystemExit("error: statistics contain NaN or inf (broken images or stats file)")
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` images, averaged: ADM's 50k samples make 10 splits."""
    p = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), 1).numpy()
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def pairwise_sq_distances(u, v):
    """ADM's DistanceBlock: squared distances |u|^2 - 2 u.v + |v|^2 in float16, redone in float32 only if float16
    overflows. Its rounding decides borderline neighbours, so we keep it for the same numbers."""
    for dtype in (torch.float16, torch.float32):
        a, b = u.to(dtype), v.to(dtype)
        d = ((a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None]).clamp(min=0)
        if d.isfinite().all():
            break
    return d.float()


def manifold_radii(features, k, batch_size):
    # squared distance to the k-th nearest neighbour, the point itself counted as the 0-th (ADM's partition at k)
    radii = []
    for i in range(0, len(features), batch_size):
        d = torch.cat([pairwise_sq_distances(features[i:i + batch_size], features[j:j + batch_size])
                       for j in range(0, len(features), batch_size)], 1)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(real_features, fake_features, k=3, batch_size=10000, device="cpu"):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM: a k-NN ball around every feature vector;
    precision = share of fake vectors inside some real ball, recall = share of real vectors inside some fake ball."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise SystemExit(f"error: feature dimensions do not match: {tuple(real.shape)} vs {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise SystemExit(f"error: precision/recall with k={k} needs more than {k} images per set")
    real_radii, fake_radii = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    for i in range(0, len(real), batch_size):
        for j in range(0, len(fake), batch_size):
            d = pairwise_sq_distances(real[i:i + batch_size], fake[j:j + batch_size])
            real_in[i:i + batch_size] |= (d <= fake_radii[None, j:j + batch_size]).any(1)
            fake_in[j:j + batch_size] |= (d <= real_radii[i:i + batch_size, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


def _image_pair(a, b):
    a, b = (torch.as_tensor(np.asarray(x)) for x in (a, b))
    check_images(a, "first images")
    check_images(b, "second images")
    if a.shape != b.shape:
        raise SystemExit(f"error: image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.double(), b.double()


def psnr(a_u8, b_u8):
    """Per-image PSNR in dB of uint8 N x H x W x 3 images, as the release's evaluate_tokenizer.py: MSE over pixels and
    channels of each image, 20 log10(255 / sqrt(MSE)); it reports the mean over images. Identical images: inf."""
    a, b = _image_pair(a_u8, b_u8)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return (20 * torch.log10(255 / mse.sqrt())).numpy()


def ssim(a_u8, b_u8):
    """Per-image SSIM of uint8 N x H x W x 3 images, as the release's torchmetrics StructuralSimilarityIndexMeasure
    (data range 2 on images mapped to [-1, 1], i.e. 255 here): 11x11 Gaussian window with sigma 1.5 per channel,
    images reflect-padded by 5 so the SSIM map covers every pixel (torchmetrics >= 1.5), mean over channels and
    pixels. It reports the mean over images."""
    a, b = (x.permute(0, 3, 1, 2) for x in _image_pair(a_u8, b_u8))
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) / 1.5) ** 2 / 2)
    g = g / g.sum()
    window = (g[:, None] * g[None]).expand(3, 1, 11, 11)
    a, b = F.pad(a, (5, 5, 5, 5), mode="reflect"), F.pad(b, (5, 5, 5, 5), mode="reflect")
    mu_a, mu_b, aa, bb, ab = F.conv2d(torch.cat([a, b, a * a, b * b, a * b]), window, groups=3).split(len(a))
    var_a, var_b = (aa - mu_a ** 2).clamp(min=0), (bb - mu_b ** 2).clamp(min=0)
    cov = ab - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).numpy()


# -----------------------------------------------------------------------------
# reading inputs

def image_files(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                  for name in names if name.lower().endswith((".png", ".jpg", ".jpeg")))


def read_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
        raise SystemExit(f"error: {path} is not a readable image ({type(e).__name__}: {e})") from None


def image_source(path):
    """(number of images, batches(start, stop, batch_size)) for a folder or an ADM .npz, without loading it all."""
    if os.path.isdir(path):
        files = image_files(path)

        def batches(start, stop, size):
            for i in range(start, stop, size):
                arrays = [np.asarray(read_image(f)) for f in files[i:min(i + size, stop)]]
                for f, a in zip(files[i:], arrays):
                    if a.shape != arrays[0].shape:
                        raise SystemExit(f"error: {f} is {a.shape[1]}x{a.shape[0]}, other images are "
                                         f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all images must have one size")
                yield np.stack(arrays)
        return len(files), batches

    # ADM's reference batches are up to tens of GB: read arr_0 straight from the zip in slices
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            offset = f.tell()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SystemExit(f"error: {path} is not a readable .npz ({type(e).__name__}: {e}); truncated?") from None
    check_images(np.empty((0,) + tuple(shape[1:]), dtype), f"{path} arr_0")
    if fortran:
        raise SystemExit(f"error: {path} arr_0 is stored in Fortran order; "
                         "save it with np.savez(path, arr_0=np.ascontiguousarray(images))")
    image_bytes = math.prod(shape[1:])

    def batches(start, stop, size):
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            f.seek(offset + start * image_bytes)
            for i in range(start, stop, size):
                n = min(size, stop - i)
                yield np.frombuffer(f.read(n * image_bytes), np.uint8).reshape(n, *shape[1:])
    return shape[0], batches


def gather_rows(x, world_size, device):
    """Every rank's rows, concatenated in rank order (all_gather needs equal shapes: pad, then trim)."""
    if world_size == 1:
        return x
    t = torch.from_numpy(x).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([len(t)], device=device))
    most = max(int(s) for s in sizes)
    padded = torch.cat([t, t.new_zeros(most - len(t), *t.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).cpu().numpy()


def read_input(path, model, rank, world_size, device):
    """Like ADM's read_activations + read_statistics: features of the images (if any) and stats (stored ones win)."""
    if not path or not os.path.exists(path):
        raise SystemExit(f"error: input {path!r} does not exist (a folder of PNG/JPEG, an ADM .npz or a stats .npz)")
    result, has_images = {}, True
    if not os.path.isdir(path) and not path.endswith(".npz"):
        raise SystemExit(f"error: {path} is neither a folder of images nor an .npz file")
    if not os.path.isdir(path):
        try:
            npz = np.load(path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise SystemExit(f"error: {path} is not a readable .npz ({type(e).__name__}: {e}); truncated?") from None
        with npz:
            keys = set(npz.files)
            if "mu" in keys or "sigma" in keys:
                if not {"mu", "sigma"} <= keys or ("mu_s" in keys) != ("sigma_s" in keys):
                    raise SystemExit(f"error: stats file {path} needs mu and sigma (and mu_s with sigma_s); "
                                     f"it has {sorted(keys)}")
                result.update({k: npz[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if k in keys})
            elif "arr_0" not in keys:
                raise SystemExit(f"error: {path} has neither images (arr_0) nor statistics (mu, sigma): {sorted(keys)}")
            has_images = "arr_0" in keys
    if has_images:
        n, batches = image_source(path)
        if n < 2:
            raise SystemExit(f"error: {path} holds {n} images; FID needs at least 2")
        start, stop = rank * n // world_size, (rank + 1) * n // world_size
        name = os.path.basename(os.path.normpath(path))
        log = f"{name} (rank 0 of {world_size}, {stop - start} images)" if rank == 0 else None
        features = inception_features(model, batches(start, stop, batch_size), log_prefix=log)
        features = {k: None if v is None else gather_rows(v, world_size, device) for k, v in features.items()}
        for key, suffix in (("pool", ""), ("spatial", "_s")):
            if "mu" + suffix not in result:
                result["mu" + suffix], result["sigma" + suffix] = feature_statistics(features[key])
        result.update(pool=features["pool"], logits=features["logits"])
    return result


def evaluate(sample, ref, device="cpu"):
    """ADM's numbers from two read_input results; None where an input lacks what a metric needs (sFID: spatial
    stats; IS: logits, i.e. an fc layer; precision/recall: pool features of more than k = 3 images each)."""
    metrics = {"fid": frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"]),
               "sfid": None, "inception_score": None, "precision": None, "recall": None}
    if "mu_s" in sample and "mu_s" in ref:
        metrics["sfid"] = frechet_distance(sample["mu_s"], sample["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if sample.get("logits") is not None:
        metrics["inception_score"] = inception_score(sample["logits"])
    if "pool" in sample and "pool" in ref and min(len(sample["pool"]), len(ref["pool"])) > 3:
        metrics["precision"], metrics["recall"] = precision_recall(ref["pool"], sample["pool"], device=device)
    return metrics


@torch.no_grad()
def reconstruction_metrics(folder, inception, rank, world_size, device):
    """A tokenizer's reconstruction quality as the release's evaluate_tokenizer.py measures it. Each image is
    resized (short side to image_size, bilinear with antialiasing, on the float image) and center-cropped as its
    torchvision transforms do, mapped to [-1, 1], encoded, and a posterior *sample* (not the mean) decoded.
    rFID: the decoded images against the crops, both as uint8 (the release saves both as PNGs); PSNR and SSIM on
    those uint8 images (the release's SSIM runs on the float images); LPIPS on the float images, the decoder output
    unclamped. Each is a mean over images (the release averages batch means of 8)."""
    from vavae import LPIPS, images_to_uint8, load_autoencoder  # the tokenizer's stack only for this mode; first:
    import torchvision.transforms.functional as TF  # vavae makes torchvision importable next to a CPU-only torch
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --reconstruct_with needs --samples to be a folder of images, got {folder}")
    files = image_files(folder)
    if len(files) < 2:
        raise SystemExit(f"error: {folder} holds {len(files)} images; rFID needs at least 2")
    autoencoder = load_autoencoder(reconstruct_with, allow_unsafe_checkpoint).to(device)
    lpips = LPIPS(lpips_weights, allow_unsafe_checkpoint).to(device).eval() if lpips_weights else None
    start, stop = rank * len(files) // world_size, (rank + 1) * len(files) // world_size
    rows = {"psnr": [], "ssim": [], "lpips": [], "pool": [], "pool_reference": []}
    for i in range(start, stop, batch_size):
        indices = range(i, min(i + batch_size, stop))
        x = torch.stack([TF.center_crop(TF.resize(TF.to_tensor(read_image(files[k])), image_size), image_size)
                         for k in indices]).to(device) * 2 - 1
        posterior = autoencoder.encode(x)
        noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(seed + k))
                             for k in indices]).to(device)
        recon = autoencoder.decode(posterior.mean + posterior.std * noise)
        reference_u8, recon_u8 = images_to_uint8(x).cpu(), images_to_uint8(recon).cpu()
        rows["psnr"].append(psnr(reference_u8, recon_u8))
        rows["ssim"].append(ssim(reference_u8, recon_u8))
        if lpips is not None:
            rows["lpips"].append(lpips(recon, x).flatten().double().cpu().numpy())
        rows["pool"].append(inception_features(inception, recon_u8)["pool"])
        rows["pool_reference"].append(inception_features(inception, reference_u8)["pool"])
        if rank == 0:
            print(f"reconstructed {indices.stop - start} of {stop - start} images (rank 0 of {world_size})", flush=True)
    rows = {k: gather_rows(np.concatenate(v), world_size, device) for k, v in rows.items() if v}
    return {"rfid": frechet_distance(*feature_statistics(rows["pool"]), *feature_statistics(rows["pool_reference"])),
            "psnr": float(rows["psnr"].mean()), "ssim": float(rows["ssim"].mean()),
            "lpips": float(rows["lpips"].mean()) if "lpips" in rows else None}, len(files)


def write_atomically(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not write {path}: {e.strerror or e}") from None


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    config = configure(globals())
    if not samples or bool(reconstruct_with) == bool(reference or save_stats):
        raise SystemExit("error: pass --samples=PATH and --reference=PATH (or --save_stats=OUT.npz to make a reference "
                         "of --samples, or only --reconstruct_with=VAVAE.pt to evaluate a tokenizer on --samples)")
    rank, world_size, device = setup_distributed()
    model = load_inception(inception_weights or None, device)
    if reconstruct_with:
        metrics, n = reconstruction_metrics(samples, model, rank, world_size, device)
        details = dict(samples=samples, reconstruct_with=reconstruct_with, num_images=n)
    else:
        sample = read_input(samples, model, rank, world_size, device)
        if save_stats and rank == 0:
            stats = {k: sample[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if sample.get(k) is not None}
            write_atomically(save_stats, lambda f: np.savez(f, **stats))
            print(f"wrote {', '.join(stats)} of {samples} to {save_stats}")
        elif not save_stats:
            ref = read_input(reference, model, rank, world_size, device)
            metrics = evaluate(sample, ref, device) if rank == 0 else None
            details = dict(samples=samples, reference=reference,
                           num_samples=None if sample.get("pool") is None else len(sample["pool"]),
                           num_reference=None if ref.get("pool") is None else len(ref["pool"]))
    if rank == 0 and not save_stats:
        summary = " | ".join(f"{name} {'n/a' if v is None else f'{v:.4f}'}" for name, v in metrics.items())
        path = out_json or os.path.normpath(samples) + ".metrics.json"
        record = metrics | details | {"config": config}
        write_atomically(path, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        print(f"{summary} -> {path}")
    if world_size > 1:
        torch.distributed.destroy_process_group()
