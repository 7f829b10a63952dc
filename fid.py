"""FID, sFID, Inception Score and precision/recall as OpenAI's ADM evaluator computes them (guided-diffusion,
evaluations/evaluator.py, TensorFlow), in PyTorch; class accuracy of labelled samples; PSNR, SSIM, LPIPS of a tokenizer.

    python fid.py --samples=out/samples.npz --reference=VIRTUAL_imagenet256_labeled.npz
    python fid.py --samples=imagenet/train_subset --save_stats=imagenet_stats.npz   # a reference for later
    python fid.py --samples=imagenet/val --reconstruct_with=vavae.pt --lpips_weights=vgg.pth  # rFID, PSNR, SSIM, LPIPS
    torchrun --nproc_per_node=8 fid.py --samples=out/samples.npz --reference=imagenet_stats.npz

An input (checked before the network loads) is a folder of images of any size (ADM-center-cropped to image_size),
an ADM image batch (.npz: arr_0 uint8 N x H x W x 3, arr_1 int64 labels if any) or a stats .npz (mu, sigma and maybe
mu_s, sigma_s, pool, labels). ADM's reference batches hold images and stats: as ADM does, the stored stats give
FID/sFID and the images' features give precision/recall. Class accuracy: the share of samples whose label is the
majority label of their 5 nearest reference images (pool_3 features); labels come from arr_1, `labels`, or a folder
with one subfolder per class, numbered in sorted order as torchvision's ImageFolder and prepare.py do.

The network is TensorFlow's 'inception-2015-12-05' graph (the FID standard) in the pytorch-fid / torch-fidelity
weight layout, with the graph's own preprocessing and quirks; Inception Score needs its 1008-way softmax (`fc`).
The metrics go to a JSON file: one the inputs cannot give is null, and `not_computed` says why. With
--reconstruct_with, NAME.reconstructions.png beside it shows up to 8 crops (top) over their reconstructions.
"""
import json
import math
import os
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config.runtime import (IMAGE_EXTENSIONS, adm_center_crop, configure, explain, fail, list_images, load_checkpoint,
                            load_rgb, progress_printer, save_png, setup_distributed, write_atomically)

# inputs and outputs
samples = ""            # path; folder of images, ADM .npz (arr_0, labels arr_1) or stats .npz
reference = ""          # path; the same kinds, e.g. ADM's VIRTUAL_imagenet256_labeled.npz
save_stats = ""         # path; if set: write the stats of `samples` here (.npz) as a reference, instead of metrics
out_json = ""           # path; metrics file; empty: <samples>.metrics.json
image_size = 256        # >= 1; folder images of another size are ADM-center-cropped to it; the release: 256
# network
inception_weights = ""  # path; local .pth (pytorch-fid or torch-fidelity layout); empty: torch hub cache, else download
inception_url = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # text; downloaded into the torch hub cache
batch_size = 100        # >= 1; images per forward pass (per GPU)
timeout_minutes = 10    # > 0; a collective waiting longer than this (a stuck rank) ends the job
# tokenizer evaluation (the release's evaluate_tokenizer.py): the images of `samples` against their reconstructions
reconstruct_with = ""   # path; a VA-VAE checkpoint (any vavae.load_autoencoder format): report rFID, PSNR, SSIM, LPIPS
lpips_weights = ""      # path; LPIPS heads (vavae.LPIPS's formats, e.g. the lpips package's vgg.pth); empty: no LPIPS
seed = 0                # >= 0; the posterior noise of image i comes from a generator seeded with seed + i
allow_unsafe_checkpoint = False  # True | False; let torch unpickle arbitrary objects (only for files you trust)




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


def load_inception(path=None, device="cpu", allow_unsafe=False):
    """The FID Inception network in eval mode. path: a local .pth; None: torch hub cache, downloaded if missing."""
    if path:
        if not os.path.isfile(path):
            fail(f"Inception weights {path} do not exist (get them from {inception_url})")
        state = load_checkpoint(path, allow_unsafe)
    else:
        try:
            state = torch.hub.load_state_dict_from_url(inception_url, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- offline, proxy, HTTP errors: all mean "no weights"
            fail(f"could not get the FID Inception weights ({explain(e)}). Download "
                 f"{inception_url} into {os.path.join(torch.hub.get_dir(), 'checkpoints')}/ or pass "
                 "--inception_weights=PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth also works)")
    model = FIDInception(with_fc=isinstance(state, dict) and "fc.weight" in state)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # torch lists every differing key on its own line: cut short
        detail = " ".join(str(e).split())
        fail(f"{path or inception_url} is not an FID Inception-v3 state dict: {detail[:300]}"
             + ("..." if len(detail) > 300 else ""))
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# features and metrics

def check_images(images, where="images"):
    if images.dtype not in (np.uint8, torch.uint8) or images.ndim != 4 or images.shape[-1] != 3:
        fail(f"{where} must be uint8 N x H x W x 3 (RGB, 0..255), got {images.dtype} {tuple(images.shape)}")


@torch.no_grad()
def inception_features(model, images, batch_size=64, progress=None):
    """{'pool': N x 2048, 'spatial': N x 2023, 'logits': N x 1008 or None}, float32 numpy arrays.

    images: uint8 N x H x W x 3 (numpy or torch), or an iterable of such batches (the CLI streams files this way).
    progress: if set, called with the size of each batch done."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        check_images(images)
        images = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]  # views, no copies
    device = next(model.parameters()).device
    outputs = []
    for batch in images:
        check_images(batch)
        batch = batch.to(device) if torch.is_tensor(batch) else torch.from_numpy(np.array(batch)).to(device)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convs would move features ~1e-3
            outputs.append([None if t is None else t.float().cpu().numpy() for t in model(batch)])
        if progress:
            progress(len(batch))
    if not outputs:
        fail("no images to compute features of")
    pool, spatial, logits = zip(*outputs)
    return {"pool": np.concatenate(pool), "spatial": np.concatenate(spatial),
            "logits": None if logits[0] is None else np.concatenate(logits)}


def feature_statistics(features):
    """(mean, covariance) in float64, covariance with N - 1 like ADM's np.cov."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        fail(f"statistics need at least 2 images (features of shape {features.shape})")
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
        fail(f"feature dimensions do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        fail("statistics contain NaN or inf (broken images or stats file)")
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
        fail(f"feature dimensions do not match: {tuple(real.shape)} vs {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        fail(f"precision/recall with k={k} needs more than {k} images per set")
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
        fail(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
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


def class_accuracy(ref_pool, ref_labels, sample_pool, sample_labels, k=5, device="cpu"):
    """Share of samples whose label is the majority label of their k nearest reference images (Euclidean distance
    of pool_3 features; a tie goes to the class whose votes are nearer). Nothing is excluded: a sample equal to a
    reference image counts that image as its nearest neighbour, so the labelled images themselves score ~100%."""
    ref = torch.as_tensor(np.asarray(ref_pool), dtype=torch.float32, device=device)
    ref_labels = torch.as_tensor(np.asarray(ref_labels), dtype=torch.long, device=device)
    weights = 1 + torch.arange(k, 0, -1, device=device) / 100  # 1.05 for the nearest ... 1.01: breaks ties only
    correct, rows = 0, max(1, 2 ** 27 // len(ref))  # blocks of distances of 512 MB
    for i in range(0, len(sample_pool), rows):
        fake = torch.as_tensor(np.asarray(sample_pool[i:i + rows]), dtype=torch.float32, device=device)
        nearest = torch.cdist(fake, ref).topk(k, largest=False).indices
        votes = torch.zeros(len(fake), int(ref_labels.max()) + 1, device=device)
        votes.scatter_add_(1, ref_labels[nearest], weights.expand(len(fake), k))
        correct += (votes.argmax(1).cpu() == torch.as_tensor(np.asarray(sample_labels[i:i + rows]))).sum().item()
    return correct / len(sample_pool)


# -----------------------------------------------------------------------------
# inputs: open_input checks one before any network loads, read_input computes its features

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool", "labels")


def read_rgb(path):
    try:
        return load_rgb(path)
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
        fail(f"{path} is not a readable image ({explain(e)}); replace it")


def open_folder(folder, size):
    files = list_images(folder)
    source = {"path": folder, "n": len(files), "files": files, "size": size, "cropped": 0, "stats": {}}
    # labelled as torchvision's ImageFolder and prepare.py read a folder: one subfolder per class, in sorted order
    number = {name: label for label, name in enumerate(sorted(e.name for e in os.scandir(folder) if e.is_dir()))}
    classes = [os.path.relpath(f, folder).split(os.sep)[0] for f in files]
    if len(number) > 1 and all(c in number for c in classes):
        source["stats"]["labels"] = np.array([number[c] for c in classes], np.int64)

    def batches(start, stop, n):
        for i in range(start, stop, n):
            images = [read_rgb(f) for f in files[i:min(i + n, stop)]]
            source["cropped"] += sum(image.size != (size, size) for image in images)
            yield np.stack([np.asarray(image if image.size == (size, size) else adm_center_crop(image, size))
                            for image in images])
    source["batches"] = batches
    return source


def open_npz(path):
    try:
        with np.load(path) as npz:
            stats = {k.replace("arr_1", "labels"): npz[k] for k in STATS_KEYS + ("arr_1",) if k in npz.files}
            keys, shape = sorted(npz.files), None
        if "arr_0" in keys:  # ADM's reference batches are up to tens of GB: read arr_0 from the zip in slices, later
            with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                offset = f.tell()
    except Exception as e:  # noqa: BLE001 -- zip, zlib and numpy raise many types for broken files
        fail(f"{path} is not a readable .npz ({explain(e)}); it may be "
             "truncated: write it again")
    complete = {"mu", "sigma"} <= set(keys) and ("mu_s" in keys) == ("sigma_s" in keys)
    if ("mu" in keys or "sigma" in keys) and not complete:
        fail(f"stats file {path} needs mu and sigma (and mu_s with sigma_s); it has {keys}")
    if "mu" not in keys and shape is None:
        fail(f"{path} has neither images (arr_0) nor statistics (mu, sigma): {keys}")
    source = {"path": path, "n": shape[0] if shape else 0, "files": None, "cropped": 0, "stats": stats}
    rows = len(stats.get("pool", ()))  # stats of the network's features: pool_3 (2048) and sFID's (2023)
    for key, kind, want in [("mu", "f", (2048,)), ("sigma", "f", (2048, 2048)), ("mu_s", "f", (2023,)),
                            ("sigma_s", "f", (2023, 2023)), ("pool", "f", (rows, 2048)), ("labels", "iu", (rows,))]:
        want, a = (source["n"],) if key == "labels" and source["n"] else want, stats.get(key)
        if a is not None and (a.dtype.kind not in kind or a.shape != want or not np.isfinite(a).all()
                              or kind == "iu" and (a < 0).any()):
            fail(f"{path}: {'arr_1' if key == 'labels' and 'arr_1' in keys else key} is {a.dtype} {a.shape}, it must "
                 f"be {'integers >= 0' if kind == 'iu' else 'finite floats'} of shape {want}; write it again")
    if shape is None:
        return source
    check_images(np.empty((0,) + tuple(shape[1:]), dtype), f"{path} arr_0")
    if fortran:
        fail(f"{path} arr_0 is stored in Fortran order; save it with np.savez(path, arr_0=np.ascontiguousarray(x))")
    image_bytes = math.prod(shape[1:])

    def batches(start, stop, size):
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            f.seek(offset + start * image_bytes)
            for i in range(start, stop, size):
                n = min(size, stop - i)
                yield np.frombuffer(f.read(n * image_bytes), np.uint8).reshape(n, *shape[1:])
    return dict(source, batches=batches)


def open_input(path, size=None):
    """Check an input without computing anything (existence, kind, .npz headers and stats, enough images): a dict
    with n images (0: stats only), batches(start, stop, size) of them, a folder's image files, the stored stats."""
    if not path or not os.path.exists(path):
        fail(f"input {path!r} does not exist (a folder of images, an ADM .npz or a stats .npz)")
    if not os.path.isdir(path) and not path.endswith(".npz"):
        fail(f"{path} is neither a folder of images nor an .npz file")
    source = open_folder(path, size or image_size) if os.path.isdir(path) else open_npz(path)
    if "batches" in source and source["n"] < 2:
        fail(f"{path} holds {source['n']} images ({' '.join(IMAGE_EXTENSIONS)}); FID needs at least 2")
    return source


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


def read_input(source, model, rank, world_size, device):
    """Like ADM's read_activations + read_statistics: features of the images (if any) and stats (stored ones win).
    source: a path or what open_input returned for it."""
    source = open_input(source) if isinstance(source, str) else source
    result, n = dict(source["stats"]), source["n"]
    if n:
        start, stop = rank * n // world_size, (rank + 1) * n // world_size
        name = f"{os.path.basename(os.path.normpath(source['path']))} (rank 0 of {world_size})"
        features = inception_features(model, source["batches"](start, stop, batch_size),
                                      progress=progress_printer(name, stop - start) if rank == 0 else None)
        features = {k: None if v is None else gather_rows(v, world_size, device) for k, v in features.items()}
        cropped = gather_rows(np.array([source["cropped"]]), world_size, device).sum()
        if cropped and rank == 0:
            print(f"{cropped} of {n} images of {source['path']} were not {source['size']}x{source['size']}: "
                  "ADM-center-cropped to it")
        for key, suffix in (("pool", ""), ("spatial", "_s")):
            if "mu" + suffix not in result:
                result["mu" + suffix], result["sigma" + suffix] = feature_statistics(features[key])
        result.update(pool=features["pool"], logits=features["logits"])
    return result


def evaluate(sample, ref, device="cpu"):
    """ADM's numbers and the class accuracy from two read_input results: (metrics, why); a metric the inputs cannot
    give is None, and why[metric] says what they lack."""
    has = {"sfid": "mu_s" in sample and "mu_s" in ref, "inception_score": sample.get("logits") is not None,
           "precision": "pool" in sample and "pool" in ref and min(len(sample["pool"]), len(ref["pool"])) > 3,
           "class_accuracy": "labels" in sample and "labels" in ref and len(ref["labels"]) >= 5
           and set(np.unique(sample["labels"])) <= set(np.unique(ref["labels"]))}
    metrics = {"fid": frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"]),
               "sfid": frechet_distance(sample["mu_s"], sample["sigma_s"], ref["mu_s"], ref["sigma_s"])
               if has["sfid"] else None,
               "inception_score": inception_score(sample["logits"]) if has["inception_score"] else None}
    metrics["precision"], metrics["recall"] = (precision_recall(ref["pool"], sample["pool"], device=device)
                                               if has["precision"] else (None, None))
    metrics["class_accuracy"] = (class_accuracy(ref["pool"], ref["labels"], sample["pool"], sample["labels"],
                                                device=device) if has["class_accuracy"] else None)
    why = {"sfid": "both inputs need spatial statistics: images, or mu_s and sigma_s",
           "inception_score": "these Inception weights have no fc layer" if "logits" in sample
           else "the samples are statistics, not images",
           "precision": "both inputs need the pool_3 features of more than 3 images",
           "class_accuracy": "the samples have no labels: arr_1, or a subfolder per class" if "labels" not in sample
           else "the reference has no labels: a subfolder per class, arr_1, or stats saved from them"
           if "labels" not in ref else "the reference has fewer than 5 images" if len(ref["labels"]) < 5
           else "some sample labels are no class of the reference"}
    return metrics, {k: why[k.replace("recall", "precision")] for k, v in metrics.items() if v is None}


@torch.no_grad()
def reconstruction_metrics(files, autoencoder, lpips, inception, rank, world_size, device):
    """A tokenizer's reconstruction quality as the release's evaluate_tokenizer.py measures it. Each image is
    resized (short side to image_size, bilinear with antialiasing, on the float image) and center-cropped as its
    torchvision transforms do, mapped to [-1, 1], encoded, and a posterior *sample* (not the mean) decoded.
    rFID: the decoded images against the crops, both as uint8 (the release saves both as PNGs); PSNR and SSIM on
    those uint8 images (the release's SSIM runs on the float images); LPIPS on the float images, the decoder output
    unclamped. Each is a mean over images (the release averages batch means of 8).
    Returns (metrics, grid): grid is rank 0's first (up to) 8 crops in a row over their reconstructions."""
    from vavae import images_to_uint8  # the tokenizer's stack only for this mode; first:
    import torchvision.transforms.functional as TF  # vavae makes torchvision importable next to a CPU-only torch
    start, stop = rank * len(files) // world_size, (rank + 1) * len(files) // world_size
    rows, shown = {"psnr": [], "ssim": [], "lpips": [], "pool": [], "pool_reference": []}, ([], [])
    progress = progress_printer(f"reconstructions (rank 0 of {world_size})", stop - start)
    for i in range(start, stop, batch_size):
        indices = range(i, min(i + batch_size, stop))
        x = torch.stack([TF.center_crop(TF.resize(TF.to_tensor(read_rgb(files[k])), image_size), image_size)
                         for k in indices]).to(device) * 2 - 1
        posterior = autoencoder.encode(x)
        noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(seed + k))
                             for k in indices]).to(device)
        recon = autoencoder.decode(posterior.mean + posterior.std * noise)
        reference_u8, recon_u8 = images_to_uint8(x).cpu(), images_to_uint8(recon).cpu()
        for row, images in zip(shown, (reference_u8, recon_u8)):
            row.extend(images[:8 - len(row)].numpy())
        rows["psnr"].append(psnr(reference_u8, recon_u8))
        rows["ssim"].append(ssim(reference_u8, recon_u8))
        if lpips is not None:
            rows["lpips"].append(lpips(recon, x).flatten().double().cpu().numpy())
        rows["pool"].append(inception_features(inception, recon_u8)["pool"])
        rows["pool_reference"].append(inception_features(inception, reference_u8)["pool"])
        if rank == 0:
            progress(len(indices))
    rows = {k: gather_rows(np.concatenate(v), world_size, device) for k, v in rows.items() if v}
    return {"rfid": frechet_distance(*feature_statistics(rows["pool"]), *feature_statistics(rows["pool_reference"])),
            "psnr": float(rows["psnr"].mean()), "ssim": float(rows["ssim"].mean()),
            "lpips": float(rows["lpips"].mean()) if "lpips" in rows else None}, \
        np.concatenate([np.concatenate(row, 1) for row in shown])


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    config = configure(globals())
    path = save_stats or out_json or os.path.normpath(samples) + ".metrics.json"
    for wrong, problem in [
            (not samples or not (reference or save_stats or reconstruct_with), "pass --samples=PATH and "
             "--reference=PATH (or --save_stats=OUT.npz to make a reference of --samples, or --reconstruct_with="
             "VAVAE.pt to evaluate a tokenizer on --samples)"),
            (reconstruct_with and (reference or save_stats), "--reconstruct_with compares --samples with their own "
             "reconstructions: drop --reference and --save_stats"),
            (save_stats and reference, "--save_stats writes the statistics of --samples and no metrics, so it would "
             "ignore --reference: pass one of them"),
            (lpips_weights and not reconstruct_with, "--lpips_weights is used only with --reconstruct_with"),
            (save_stats and not save_stats.endswith(".npz"), f"--save_stats={save_stats} must end in .npz"),
            (reconstruct_with and not os.path.isdir(samples), "--reconstruct_with needs --samples to be a folder of "
             f"images, got {samples}"),
            (not os.path.isdir(os.path.dirname(os.path.abspath(path))), f"could not write {path}: its folder does "
             "not exist")]:
        if wrong:
            fail(problem)
    rank, world_size, device = setup_distributed(timeout_minutes)
    sample, ref = open_input(samples), open_input(reference) if reference else None
    if reconstruct_with:  # the tokenizer's files are inputs too: check them before the Inception network loads
        import vavae
        autoencoder = vavae.load_autoencoder(reconstruct_with, allow_unsafe_checkpoint).to(device)
        lpips = vavae.LPIPS(lpips_weights, allow_unsafe_checkpoint).to(device).eval() if lpips_weights else None
    model = load_inception(inception_weights or None, device, allow_unsafe_checkpoint) \
        if reconstruct_with or sample["n"] or ref and ref["n"] else None  # two stats files need no network
    if reconstruct_with:
        metrics, grid = reconstruction_metrics(sample["files"], autoencoder, lpips, model, rank, world_size, device)
        why = {} if lpips else {"lpips": "no --lpips_weights given"}
        details = dict(samples=samples, reconstruct_with=reconstruct_with, num_images=sample["n"])
    else:
        sample = read_input(sample, model, rank, world_size, device)
        if save_stats and rank == 0:
            stats = {k: sample[k] for k in STATS_KEYS if sample.get(k) is not None}
            write_atomically(save_stats, lambda f: np.savez(f, **stats))
            print(f"wrote {', '.join(stats)} of {samples} to {save_stats}")
        elif not save_stats:
            ref = read_input(ref, model, rank, world_size, device)
            metrics, why = evaluate(sample, ref, device) if rank == 0 else (None, None)
            details = dict(samples=samples, reference=reference,
                           num_samples=None if sample.get("pool") is None else len(sample["pool"]),
                           num_reference=None if ref.get("pool") is None else len(ref["pool"]))
    if rank == 0 and not save_stats:
        record = metrics | {"not_computed": why} | details | {"config": config}
        write_atomically(path, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        print(" | ".join(f"{k} {f'n/a ({why[k]})' if v is None else f'{v:.4f}'}" for k, v in metrics.items()),
              f"-> {path}")
        if reconstruct_with:
            save_png(grid, os.path.splitext(path)[0] + ".reconstructions.png")
            print(f"the first {grid.shape[1] // image_size} images (top) over their reconstructions (bottom): "
                  f"{os.path.splitext(path)[0]}.reconstructions.png")
    if world_size > 1:
        torch.distributed.destroy_process_group()
