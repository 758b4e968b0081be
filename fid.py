"""FID and KID with plain PyTorch: the pytorch-fid Inception, no torchvision, no scipy.

Computes the same numbers as pytorch-fid (FID-InceptionV3 features, pytorch-fid's image
loading, mu/sigma statistics) and KID as torch-fidelity defines it. Also holds the VGG16
feature taps used by msgan's distillation perceptual loss.

Usage:
    python fid.py DIR_A DIR_B                        # FID between two image folders
    python fid.py DIR_A DIR_B --kid                  # ... and KID
    python fid.py DIR --save-stats ref.npz           # save mu/sigma (pytorch-fid npz format)
    python fid.py DIR ref.npz                        # either side may be a stats .npz
    python fid.py --model NAME|PATH -n 50000 --ref DIR|ref.npz   # FID of a msgan generator
options: --inception PATH (weight file), --dims 64|192|768|2048, --batch 50, --device cuda,
         --kid-subsets 100, --kid-subset-size 1000, --psi 1.0, --seed 0

Weights: without --inception the published files are taken from the torch hub cache
(~/.cache/torch/hub/checkpoints/, or $TORCH_HOME/hub/checkpoints/), downloaded there when
missing, and always checked against their full sha256.

Library use (e.g. from train.py; importing this module has no side effects):
    net = fid.load_inception().to(device)
    feats = net.features(images01, dims=2048)        # float NCHW in [0, 1] -> [N, 2048]
    kid_mean, kid_std = fid.kid(feats_a, feats_b)    # numpy feature arrays
    vgg = fid.load_vgg16().to(device)
    taps = vgg(fid.imagenet_normalize(images01))     # {"relu1_2": ..., "relu4_3": ...}
"""
import argparse
import functools
import hashlib
import math
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import formats
import msgan
import ops
from sample import finite_float, int_in  # the argparse value types of every script

# Published weight files. The sha256 values are the full digests of these files; torch hub
# names files after the first 8 hex digits, which we check in full instead.
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"

INCEPTION_SIZE = 299  # the network's input resolution; every image is resized to it
BN_EPS = 0.001  # the TensorFlow Inception's BatchNorm epsilon (torch's default 1e-5 is wrong here)
BLOCK_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}  # feature size -> Inception block it comes from
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's
HIGH_BIT_DEPTH_MODES = ("I", "F")  # PIL modes I;16*, I (32-bit int) and F (float)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision vgg16 "features" up to conv4_3 (numbers: conv output channels, "M": 2x2 max-pool),
# and the indices in that Sequential whose ReLU outputs are the perceptual-loss taps.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
VGG16_TAPS = {3: "relu1_2", 8: "relu2_2", 15: "relu3_3", 22: "relu4_3"}
KID_SUBSETS = 100  # torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
SWD_PROJECTIONS = 512  # random directions of the sliced Wasserstein distance
SWD_SEED = 0
MIN_SAMPLES_UNBIASED = 2048  # below this the 2048x2048 covariance is rank-deficient
# Command-line limits: past them a count is a typo, and would exhaust memory or time before giving a result.
MAX_SAMPLES = 1_000_000  # -n: their 2048-dim float64 features alone take 16 GB; FID is quoted at 50k
MAX_BATCH = 1024         # a larger batch is no faster, only closer to running out of memory
MAX_KID_SUBSETS = 10_000
SEED_LIMIT = 2**64       # torch.Generator seeds are unsigned 64-bit integers


class FIDError(Exception):
    """A user-facing problem (bad input, missing weights); the CLI prints it on one line."""


# -----------------------------------------------------------------------------
# weight files

def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(path, url, sha256):
    """State dict from an explicit path, or from the torch hub cache (downloaded if missing)."""
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # hash_prefix accepts the full digest, so the download is checked in full
                torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256)
            except (OSError, RuntimeError) as e:  # offline (URLError is an OSError) or bad hash
                raise FIDError(f"cannot download {url} ({e}); download it where you have internet "
                               f"access and put it at {path}, or pass the file's path explicitly") from e
        elif sha256_of(path) != sha256:  # a file placed by hand: make sure it is the published one
            raise FIDError(f"{path} is not the published weight file (sha256 should be {sha256}); "
                           "delete it to download it again")
    elif not Path(path).is_file():
        raise FIDError(f"weight file {path} does not exist")
    try:  # weights_only: a weight file must never be able to run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise FIDError(f"{path} is not a readable torch weight file ({type(e).__name__})") from e


def load_matching(module, state_dict):
    """Load the tensors the module has; extra keys (Inception fc.*, VGG classifier.*) are ignored.

    BatchNorm's num_batches_tracked counters may be present or absent: they do not affect eval mode.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    if missing:
        raise FIDError(f"weight file lacks {len(missing)} of the {len(own)} expected keys, e.g. {missing[0]}")
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return module


# -----------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid's variant of the 2015-12-05 TensorFlow graph)
# Module names match the published state dict, e.g. Mixed_7c.branch_pool.bn.running_var.

max_pool_3x3_s2 = functools.partial(F.max_pool2d, kernel_size=3, stride=2)


def avg_pool_3x3_same(x):
    # TensorFlow's pooling ignores the zero padding when averaging; pytorch-fid patches
    # torchvision's blocks to do the same (count_include_pad=False).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3_same(x):
    # The last block (Mixed_7c) of the TF graph max-pools where torchvision average-pools.
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def global_avg_pool(x):
    return F.adaptive_avg_pool2d(x, 1)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eval, eps 0.001) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):  # Mixed_5b/5c/5d: 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_same(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3dbl, max_pool_3x3_s2(x)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e: 17x17, factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(avg_pool_3x3_same(x))
        return torch.cat([b1, b7, b7dbl, bp], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, max_pool_3x3_s2(x)], 1)


class InceptionE(nn.Module):  # Mixed_7b (pool=avg_pool_3x3_same), Mixed_7c (pool=max_pool_3x3_same): 8x8
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b3, b3dbl, bp], 1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception. Input: float NCHW in [0, 1], any size.

    forward(x, taps=(3,)) returns the requested block outputs, like pytorch-fid's output_blocks:
    0: [N,64,73,73]  1: [N,192,35,35]  2: [N,768,17,17]  3: [N,2048,1,1] (final average pool).
    features(x, dims) returns them spatially averaged to [N, dims] (pytorch-fid's --dims).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=avg_pool_3x3_same)
        self.Mixed_7c = InceptionE(2048, pool=max_pool_3x3_same)
        # The published file also holds the 1008-class classifier fc.*; FID never uses it.

    def train(self, mode=True):
        # A metric network must never use or update batch statistics: stay in eval mode.
        return super().train(False)

    def blocks(self):
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, max_pool_3x3_s2],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, max_pool_3x3_s2],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
             self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, global_avg_pool],
        ]

    def forward(self, x, taps=(3,)):
        # pytorch-fid resizes first (even 299x299 input, where it is an identity), without
        # antialiasing, then maps [0, 1] to the [-1, 1] range the TF network was trained on.
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        outputs = {}
        for i, block in enumerate(self.blocks()[:max(taps) + 1]):  # skip blocks nobody asked for
            for layer in block:
                x = layer(x)
            outputs[i] = x
        return [outputs[t] for t in taps]

    def features(self, x, dims=2048):
        """[N, dims] float32 features of images in [0, 1]; dims is 64, 192, 768 or 2048."""
        if dims not in BLOCK_BY_DIM:
            raise FIDError(f"Inception features have {sorted(BLOCK_BY_DIM)} dims, not {dims}")
        (out,) = self(x, taps=(BLOCK_BY_DIM[dims],))
        return global_avg_pool(out).flatten(1)


def load_inception(path=None):
    """The FID Inception with weights from `path`, or the published file (see load_weights)."""
    net = InceptionV3()
    load_matching(net, load_weights(path, INCEPTION_URL, INCEPTION_SHA256))
    return net.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# VGG16 feature taps for the perceptual loss (torchvision vgg16 key names: features.N.*)

def imagenet_normalize(x):
    """(x - mean) / std with ImageNet statistics, for images in [0, 1] (msgan's [-1, 1] images:
    pass (x + 1) / 2). This is the input the published VGG16 weights expect."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class VGG16(nn.Module):
    """torchvision vgg16().features[:23]; forward(x) returns {"relu1_2": .., "relu2_2": ..,
    "relu3_3": .., "relu4_3": ..}. Takes the raw network input: normalising is the caller's choice."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        taps = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps[VGG16_TAPS[i]] = x
        return taps


def load_vgg16(path=None):
    """VGG16 taps with weights from `path`, or the published file (conv5 and classifier ignored)."""
    net = VGG16()
    load_matching(net, load_weights(path, VGG16_URL, VGG16_SHA256))
    return net.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# images in, features out

def list_images(folder):
    """pytorch-fid's file list: lower-case extensions only (globs are case-sensitive), sorted. Entries that are
    not files (a folder or a dangling link named like an image) are skipped."""
    paths = sorted(p for ext in IMAGE_EXTENSIONS for p in Path(folder).glob("*." + ext) if p.is_file())
    if not paths:
        raise FIDError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return paths


def read_image(path):
    """float32 CHW in [0, 1], like PIL .convert("RGB") + torchvision ToTensor (gray is replicated,
    alpha is dropped without compositing, an animated file gives its first frame).

    Refused with an FIDError: files PIL cannot decode; 16-bit and float images, which PIL's RGB conversion
    clips instead of scaling (pytorch-fid would measure white images); and images of more than
    Image.MAX_IMAGE_PIXELS pixels (PIL's decompression-bomb limit), before they are decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice the limit
            with Image.open(path) as im:
                if im.mode.startswith(HIGH_BIT_DEPTH_MODES):
                    raise FIDError(f"{path} is a 16-bit or float image (mode {im.mode}), which pytorch-fid's RGB "
                                   "conversion clips instead of scaling: convert it to 8 bits first")
                rgb = np.array(im.convert("RGB"))
    except FIDError:
        raise
    except Exception as e:  # PIL's decoders raise many types for a damaged file (OSError, SyntaxError, ...)
        reason = (str(e).strip().splitlines() or ["empty or truncated file"])[0]
        raise FIDError(f"cannot read image {path}: {type(e).__name__}: {reason}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def folder_batches(paths, batch_size):
    """[B, 3, H, W] batches of the images at `paths`, in order (the last batch may be smaller)."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = [read_image(p) for p in chunk]
        for p, im in zip(chunk, images):
            if im.shape != images[0].shape:
                raise FIDError(f"{p} is {im.shape[2]}x{im.shape[1]} but {chunk[0]} is "
                               f"{images[0].shape[2]}x{images[0].shape[1]}: images in one batch "
                               "must have equal size (try --batch 1)")
        yield torch.stack(images)


def load_generator(model, device):
    """msgan.load(model) with its errors as FIDError."""
    try:
        G = msgan.load(model, device=device).fold()  # a student's inference form
    except (OSError, ValueError, RuntimeError) as e:  # msgan's CheckpointError / DownloadError
        raise FIDError(f"cannot load generator: {e}") from e
    msgan.tune_tiling(G, log=lambda text: print(f"fid.py: {text}", file=sys.stderr))  # once per machine
    return G


@torch.no_grad()
def generated_batches(G, n, batch_size, device, psi=1.0, seed=0):
    """n images of generator G, quantised exactly as if saved to and read back from PNG.

    Batch i (of batch_size images) uses z = randn from torch.Generator().manual_seed(seed + i),
    so z depends on (seed, batch_size) only, not on the device.
    """
    for i, start in enumerate(range(0, n, batch_size)):
        g = torch.Generator().manual_seed(seed + i)
        z = torch.randn(min(batch_size, n - start), G.z_dim, generator=g).to(device)
        img = G(z, psi=psi, noise_mode="const")
        yield (img * 127.5 + 128).clamp(0, 255).to(torch.uint8).float() / 255


def show_progress(label, done, total, start):
    elapsed = time.time() - start
    eta = elapsed / done * (total - done)
    print(f"\r{label}: {done}/{total} images, {done / elapsed:.1f} img/s, ETA {eta:.0f} s",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


@torch.no_grad()
def activations(net, batches, total, dims=2048, device="cpu", label=None):
    """float64 [N, dims] Inception features of an iterable of [0, 1] image batches (pytorch-fid's
    get_activations); prints a progress line on stderr when a label is given."""
    feats, done, start = [], 0, time.time()
    for x in batches:
        feats.append(net.features(x.to(device), dims).cpu().numpy().astype(np.float64))
        done += len(x)
        if label:
            show_progress(label, done, total, start)
    return np.concatenate(feats)


# -----------------------------------------------------------------------------
# statistics, FID, KID (numpy, float64)

def statistics(feats):
    """mu and sigma (np.cov, rowvar=False, ddof=1) of an [N, dims] feature array."""
    if len(feats) < 2:
        raise FIDError(f"need at least 2 samples for a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path, mu, sigma):
    """Write mu and sigma (pytorch-fid's key names) atomically (formats.atomic_file): a full disk or an interrupt
    never leaves a half-written `path`."""
    try:
        with formats.atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, mu=mu, sigma=sigma)
    except OSError as e:
        raise FIDError(e.strerror or str(e)) from None


def load_stats(path, dims=None):
    """mu, sigma (float64) from a pytorch-fid style .npz; with dims, check the feature size. Anything else (another
    kind of file, other keys, shapes or dtypes, NaN or inf) is an FIDError. Never unpickles (allow_pickle=False)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except Exception as e:  # numpy and zipfile raise many types for a damaged file (BadZipFile, zlib.error, ...)
        reason = (str(e).strip().splitlines() or ["empty or truncated file"])[0]
        raise FIDError(f"{path} is not a stats file with 'mu' and 'sigma' ({type(e).__name__}: {reason})") from None
    for name, value in (("mu", mu), ("sigma", sigma)):
        if value.dtype.kind not in "fiu":
            raise FIDError(f"{path}: {name} has dtype {value.dtype}, expected real numbers")
        if not np.isfinite(value).all():
            raise FIDError(f"{path}: {name} holds NaN or inf")
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    if dims is not None and d != dims:
        raise FIDError(f"{path} holds {d}-dim features but {dims}-dim ones are asked for (--dims)")
    return mu.astype(np.float64), sigma.astype(np.float64)


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix; round-off negatives become 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), as pytorch-fid.

    S1 S2 is similar to the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), so tr((S1 S2)^(1/2)) is the
    sum of the square roots of that matrix's (real, non-negative) eigenvalues. This needs no scipy
    and, unlike scipy's sqrtm, has no complex round-off to discard for rank-deficient covariances
    (fewer samples than dims). No epsilon is added to the diagonals.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    s1_half = sqrtm_psd(sigma1)
    m = s1_half @ sigma2 @ s1_half
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise away round-off
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def sliced_wasserstein(a, b, projections=SWD_PROJECTIONS, seed=SWD_SEED):
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between two sets of vectors
    [N, D] (equal N). A cheap, network-free distance between image distributions (train.py's validation of a teacher)."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(a.shape[1], projections, generator=g), dim=0).to(a)  # [D, P]
    pa, pb = (a @ directions).sort(0).values, (b @ directions).sort(0).values                # [N, P]
    return (pa - pb).abs().mean().item()


def mmd2_unbiased(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / dims + 1)^3.

    For equal sizes this is torch-fidelity's estimator; unequal sizes use the analogous form
    sum_{i!=j} Kxx / (m(m-1)) + sum_{i!=j} Kyy / (n(n-1)) - 2 sum Kxy / (mn).
    """
    m, n, dims = len(x), len(y), x.shape[1]
    kxx = (x @ x.T / dims + 1) ** 3
    kyy = (y @ y.T / dims + 1) ** 3
    kxy = (x @ y.T / dims + 1) ** 3
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.sum() / (m * n))


def kid_on_subsets(feats1, feats2, idx1, idx2):
    """Per-subset MMD^2 for explicit row indices (one row of idx1/idx2 per subset)."""
    return np.array([mmd2_unbiased(feats1[i1], feats2[i2]) for i1, i2 in zip(idx1, idx2)])


def kid(feats1, feats2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=KID_SEED):
    """KID mean and std (ddof=0) over random subsets, drawn like torch-fidelity: with
    np.random.RandomState(seed), per subset choice(N1, size) then choice(N2, size), no replacement.
    Unlike torch-fidelity, a subset size above the smaller sample count is reduced to it."""
    if feats1.shape[1] != feats2.shape[1]:
        raise FIDError(f"feature sizes differ: {feats1.shape[1]} vs {feats2.shape[1]}")
    size = min(subset_size, len(feats1), len(feats2))
    if size < 2:
        raise FIDError(f"KID needs at least 2 samples on each side, got {len(feats1)} and {len(feats2)}")
    rng = np.random.RandomState(seed)
    idx1, idx2 = [], []
    for _ in range(subsets):
        idx1.append(rng.choice(len(feats1), size, replace=False))
        idx2.append(rng.choice(len(feats2), size, replace=False))
    values = kid_on_subsets(feats1, feats2, idx1, idx2)
    return float(values.mean()), float(values.std())


# -----------------------------------------------------------------------------
# command line

def parse_args(argv):
    p = argparse.ArgumentParser(prog="fid.py", description="FID (and KID) between image folders, "
                                "pytorch-fid stats files and msgan generators.")
    p.add_argument("paths", nargs="*", metavar="DIR|STATS.npz",
                   help="two sources to compare, or one with --save-stats")
    p.add_argument("--model", metavar="NAME|PATH", help="msgan generator to sample images from")
    p.add_argument("-n", type=int_in(2, MAX_SAMPLES), default=50000,
                   help="images to generate with --model (default 50000)")
    p.add_argument("--ref", metavar="DIR|STATS.npz", help="reference to compare --model with")
    p.add_argument("--psi", type=finite_float, default=1.0, help="truncation psi for --model (default 1)")
    p.add_argument("--seed", type=int_in(0, SEED_LIMIT - 1), default=0, help="batch i of --model uses z from "
                   "torch.Generator().manual_seed(seed + i) (default 0)")
    p.add_argument("--inception", metavar="PATH", help="FID Inception weights "
                   "(default: torch hub cache, downloaded when missing)")
    p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=50, help="batch size (default 50)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dims", type=int, default=2048, choices=sorted(BLOCK_BY_DIM),
                   help="Inception feature size (default 2048)")
    p.add_argument("--kid", action="store_true", help="also print KID (needs images, not stats files)")
    p.add_argument("--kid-subsets", type=int_in(1, MAX_KID_SUBSETS), default=KID_SUBSETS)
    p.add_argument("--kid-subset-size", type=int_in(2, MAX_SAMPLES), default=KID_SUBSET_SIZE)
    p.add_argument("--save-stats", metavar="OUT.npz", help="save mu/sigma of the one source given")
    args = p.parse_args(argv)
    if args.model and args.paths:
        p.error("with --model, give the reference as --ref, not as a positional path")
    if args.ref and not args.model:
        p.error("--ref only goes with --model")
    sources = (["--model"] if args.model else []) + args.paths + ([args.ref] if args.ref else [])
    if len(sources) != (1 if args.save_stats else 2):
        p.error("give one source with --save-stats, otherwise two to compare")
    if args.save_stats and not args.save_stats.endswith(".npz"):
        p.error("--save-stats needs a file name ending in .npz (fid.py reads such files as stats)")
    if args.seed + math.ceil(args.n / args.batch) > SEED_LIMIT:
        p.error("--seed plus the number of batches must stay below 2**64")
    return args, sources


def image_source(source, args):
    """(label, batches, count) of the --model generator or an image folder (loaded/listed right away)."""
    if source == "--model":
        G = load_generator(args.model, args.device)
        batches = generated_batches(G, args.n, args.batch, args.device, args.psi, args.seed)
        return f"{args.model} (-n {args.n})", batches, args.n
    if Path(source).is_dir():
        paths = list_images(source)
        return source, folder_batches(paths, args.batch), len(paths)
    raise FIDError(f"{source} is neither an image folder nor a stats .npz file")


def image_stats(net, image_source, args):
    """(mu, sigma, features) of the images of one source."""
    label, batches, total = image_source
    feats = activations(net, batches, total, args.dims, args.device, label)
    if len(feats) < MIN_SAMPLES_UNBIASED:
        print(f"fid.py: warning: {label} has only {len(feats)} samples; FID of fewer than "
              f"{MIN_SAMPLES_UNBIASED} samples is biased", file=sys.stderr)
    return (*statistics(feats), feats)


def main(argv=None):
    args, sources = parse_args(argv)
    ops.use_huge_pages()
    # cuDNN's TF32 convolutions would move the features by far more than float32 round-off
    torch.backends.cudnn.allow_tf32 = False
    try:
        # open every source before the slow part, so that bad input fails fast
        stats = [load_stats(s, args.dims) if s.endswith(".npz") else None for s in sources]
        images = [None if st else image_source(s, args) for s, st in zip(sources, stats)]
        if args.kid and any(stats):
            raise FIDError("--kid needs images: a stats .npz only holds mu and sigma")
        net = load_inception(args.inception).to(args.device) if any(images) else None
        results = [(*st, None) if st else image_stats(net, im, args) for st, im in zip(stats, images)]
        if args.save_stats:
            mu, sigma, _ = results[0]
            save_stats(args.save_stats, mu, sigma)
            print(f"saved {mu.shape[0]}-dim statistics to {args.save_stats}")
            return
        (mu1, sigma1, feats1), (mu2, sigma2, feats2) = results
        print(f"FID: {frechet_distance(mu1, sigma1, mu2, sigma2):.6f}")
        if args.kid:
            mean, std = kid(feats1, feats2, args.kid_subsets, args.kid_subset_size)
            print(f"KID: {mean:.6f} +- {std:.6f}")
    except FIDError as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # save_stats leaves no partial file
        print("\nfid.py: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
