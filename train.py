"""Train MobileStyleGAN: distil a StyleGAN2 teacher into the wavelet student, or train a teacher.

    python train.py                                        # distil the shipped emoji teacher (2 CPU cores, ~30 min)
    python train.py --teacher CKPT --steps 20000           # distil any StyleGAN2 checkpoint msgan.load reads
    python train.py teacher --data DIR --res 32            # train a StyleGAN2 teacher on a folder of images
    python train.py --resume runs/RUN/last.pt              # continue a run exactly where it stopped
    python train.py bench                                  # training throughput (img/s) on this machine
    torchrun --standalone --nproc_per_node=2 train.py ...  # the same, data parallel (DDP) over processes

One loop serves both modes (see `train`). Every step draws all the randomness of its global batch up front
(z, style mixing, noise, augmentation, data indices), so any split of the batch over ranks and
gradient-accumulation rounds (--batch-gpu) computes the same thing. A step is a generator phase (the student
against the frozen teacher, or the teacher against the data, plus the GAN term through a frozen D) and a
discriminator phase on the same real and fake images (skipped when the GAN weight is 0), then an EMA update of
the generator. Every --log-every steps: a JSONL line, a sample grid, a validation figure and a checkpoint
(last.pt, and best.pt when validation improved). The checkpoint's generator is the EMA generator, so
msgan.load, sample.py and export.py use it as it is; the rest of the file is what --resume needs.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
import formats
import msgan
import ops
import sample
from sample import finite_float, int_in, psnr

DEFAULT_TEACHER = "emoji-teacher"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VAL_SEED = 123456         # fixed z / noise / reals of the validation set and the sample grids
INIT_SEED_OFFSET = 1      # initial weights come from --seed + this: a stream apart from the training z, or the
                          # first z of a run would equal rows of the first mapping layer's initial weights
GRID_SAMPLES = 16         # images per panel of a grid
GRID_MIN_TILE = 64        # grid images smaller than this are enlarged (nearest neighbour) by a whole factor
ADA_INTERVAL = 4          # adaptive augmentation (ADA, Karras et al. 2020): steps between updates of p,
ADA_KIMG = 100            # thousands of images over which p can move by 1,
ADA_P_MAX = 0.8           # and its ceiling: above ~0.8 augmentations start to leak into the generator
EMA_RAMPUP = 0.05         # the EMA half-life is at most this fraction of the images seen so far (NVIDIA's)
BENCH_WARMUP, BENCH_SECONDS = 1, 15  # benchmark: steps untimed, then timed steps until this many seconds
MAX_COUNT = 10**9         # steps, intervals: beyond any run
MAX_BATCH = 4096          # a larger batch only runs out of memory
MAX_VAL_SAMPLES = 65536   # validation samples are held in memory
MAX_SEED = 2**63 - 1

# Official MobileStyleGAN settings (configs/mobile_stylegan_ffhq.json, core/loss/*.py) and StyleGAN2's.
# The distillation schedule (steps x batch) fits 30 minutes on 2 CPU cores at 32x32 (see README, Training speed).
DISTILL_DEFAULTS = dict(steps=3000, batch=16, lr=5e-4, d_lr=5e-4, betas=(0.9, 0.999), grad_clip=10.0,
                        ema_kimg=2.0, r1=10.0, r1_every=16, r1_mode="replace", aug_p=0.5, ada_target=0.0,
                        mix_prob=0.0, log_every=250, val_samples=64)
TEACHER_DEFAULTS = dict(steps=50000, batch=32, lr=2e-3, d_lr=2e-3, betas=(0.0, 0.99), grad_clip=0.0,
                        ema_kimg=10.0, r1=0.01, r1_every=16, r1_mode="add", aug_p=0.0, ada_target=0.6,
                        mix_prob=0.9, log_every=500, val_samples=256)
# Only these may change when a run is resumed; everything else comes from the checkpoint. The learning rates
# and the EMA half-life are among them because lowering them is how a long GAN run is finished.
RESUME_OVERRIDES = ("steps", "outdir", "log_every", "device", "compile", "vgg", "data", "teacher", "resume",
                    "lr", "d_lr", "ema_kimg")


class TrainError(Exception):
    """A problem with the user's input or environment; reported on one line."""


class UsageError(TrainError):
    """A missing or contradictory flag (exit status 2, like argparse's own errors)."""


class NonFiniteLoss(TrainError):
    """A loss term became NaN or infinite; the run stops before the bad step touches any checkpoint."""


# ----------------------------------------------------------------------------------------------
# Command line


positive_int = int_in(1, MAX_COUNT)


def nonnegative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def probability(text):
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def channel_list(text):
    try:
        channels = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, e.g. 256,256,128,64, got {text!r}") from None
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return channels


def build_parser(mode):
    defaults = DISTILL_DEFAULTS if mode == "distill" else TEACHER_DEFAULTS
    if mode == "distill":
        parser = argparse.ArgumentParser(
            prog="train.py", description="Distil a StyleGAN2 teacher into a MobileStyleGAN student. "
            "(`python train.py teacher --help`: train a StyleGAN2 teacher on an image folder.)")
        parser.add_argument("--teacher", help=f"StyleGAN2 checkpoint or pretrained name (default {DEFAULT_TEACHER})")
        parser.add_argument("--init", metavar="STUDENT", help="start from this student's synthesis weights (same "
                            "geometry), e.g. one distilled from an earlier snapshot of the teacher")
        parser.add_argument("--vgg", help="VGG16 weight file for the perceptual loss (default: the torch hub cache)")
        parser.add_argument("--l1", type=nonnegative_float, default=1.0, help="weight of the pixel+wavelet L1 loss")
        parser.add_argument("--l2", type=nonnegative_float, default=1.0, help="weight of the pixel+wavelet L2 loss")
        parser.add_argument("--perceptual", type=nonnegative_float, default=1.0, help="weight of the VGG16 loss")
        parser.add_argument("--gan", type=nonnegative_float, default=0.5, help="weight of the GAN loss")
        parser.add_argument("--perceptual-size", type=positive_int, default=msgan.PERCEPTUAL_SIZE,
                            help="images are resized to this before VGG16 (official: 256)")
        parser.add_argument("--trunc", type=probability, default=1.0, help="truncation psi of the training w")
        parser.add_argument("--channels", type=channel_list, help="student widths at 4, 8, ..., R/2 (default: the "
                            "teacher's without its last entry, as the original)")
        parser.add_argument("--d-channels", type=channel_list, help="discriminator widths at R, R/2, ..., 4 "
                            "(default: the teacher's widths)")
    else:
        parser = argparse.ArgumentParser(prog="train.py teacher",
                                         description="Train a StyleGAN2 teacher on a folder of images.")
        parser.add_argument("--data", help="folder of PNG/JPEG/WebP images (any size and mode); required "
                            "unless resuming")
        parser.add_argument("--res", type=positive_int, default=32, help="training resolution (power of 2, >= 16)")
        parser.add_argument("--channels", type=channel_list, help="generator widths at 4, 8, ..., res "
                            "(default: see default_teacher_channels)")
        parser.add_argument("--d-channels", type=channel_list, help="discriminator widths at res, ..., 4 "
                            "(default: the generator's, reversed)")
        parser.add_argument("--z-dim", type=positive_int, default=128)
        parser.add_argument("--w-dim", type=positive_int, default=128)
        parser.add_argument("--mapping-layers", type=positive_int, default=2)
        parser.add_argument("--xflip", action="store_true", help="also train on mirrored images")
        parser.add_argument("--pl-weight", type=nonnegative_float, default=0.0,
                            help="path-length regularisation weight (StyleGAN2: 2; 0 = off)")
        parser.add_argument("--pl-every", type=positive_int, default=4, help="lazy path-length interval")
    parser.add_argument("--steps", type=positive_int, default=defaults["steps"], help="total optimiser steps")
    parser.add_argument("--batch", type=int_in(1, MAX_BATCH), default=defaults["batch"], help="global batch size")
    parser.add_argument("--batch-gpu", type=int_in(1, MAX_BATCH), help="samples per device per round "
                        "(default: batch / processes; smaller accumulates gradients)")
    parser.add_argument("--outdir", help="run folder (default: runs/<mode>-<date>-<time>)")
    parser.add_argument("--resume", help="checkpoint to continue from (its settings are used)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lr", type=nonnegative_float, default=defaults["lr"], help="generator Adam lr")
    parser.add_argument("--d-lr", type=nonnegative_float, default=defaults["d_lr"], help="discriminator Adam lr")
    parser.add_argument("--betas", type=float, nargs=2, default=defaults["betas"], help="Adam betas")
    parser.add_argument("--grad-clip", type=nonnegative_float, default=defaults["grad_clip"],
                        help="max gradient norm (0 = no clipping)")
    parser.add_argument("--ema-kimg", type=nonnegative_float, default=defaults["ema_kimg"],
                        help="EMA half-life in thousands of images (ramped up over the first images)")
    parser.add_argument("--r1", type=nonnegative_float, default=defaults["r1"], help="R1 gamma (0 = off)")
    parser.add_argument("--r1-every", type=positive_int, default=defaults["r1_every"], help="lazy R1 interval")
    parser.add_argument("--r1-mode", choices=["replace", "add"], default=defaults["r1_mode"],
                        help="on R1 steps, R1 replaces the D loss (official MobileStyleGAN) or is added to it (StyleGAN2)")
    parser.add_argument("--aug-p", type=probability, default=defaults["aug_p"],
                        help="probability of each augmentation (flip, affine, erase) per sample (the start "
                        "value with --ada-target)")
    parser.add_argument("--ada-target", type=probability, default=defaults["ada_target"],
                        help="adapt --aug-p so that E[sign D(real)] stays at this value (ADA; 0 = fixed p)")
    parser.add_argument("--mix-prob", type=probability, default=defaults["mix_prob"], help="style-mixing probability")
    parser.add_argument("--log-every", type=positive_int, default=defaults["log_every"],
                        help="steps between logs, grids, validation and checkpoints")
    parser.add_argument("--val-samples", type=int_in(1, MAX_VAL_SAMPLES), default=defaults["val_samples"],
                        help="fixed samples of the validation figures")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator (falls back to eager)")
    parser.add_argument("--amp", choices=["bf16"], help="bfloat16 autocast (CUDA only)")
    return parser


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "teacher" if argv[:1] == ["teacher"] else "distill"
    flags = argv[1:] if mode == "teacher" else argv
    parser = build_parser(mode)
    args = parser.parse_args(flags)
    args.mode = mode
    if args.resume:
        explicit = given_flags(mode, flags, vars(args))
        saved = read_resume_args(args.resume)
        if saved.get("mode") != mode:
            parser.error(f"--resume {args.resume}: a {saved.get('mode')} run; "
                         f"use `python train.py{' teacher' if saved.get('mode') == 'teacher' else ''} --resume ...`")
        ignored = sorted(k for k in explicit if k not in RESUME_OVERRIDES and k != "mode")
        if ignored:
            print(f"train.py: resuming: ignoring --{', --'.join(k.replace('_', '-') for k in ignored)} "
                  "(the checkpoint's settings apply)", file=sys.stderr)
        defaults = vars(parser.parse_args([]))  # for flags newer than the run
        args = argparse.Namespace(**{**defaults, **saved, "mode": mode, "resume": args.resume,
                                     **{k: getattr(args, k) for k in RESUME_OVERRIDES if k in explicit}})
        args.outdir = args.outdir if "outdir" in explicit else os.path.dirname(os.path.abspath(args.resume))
    if mode == "teacher" and not args.data:
        parser.error("the following argument is required: --data")
    args.betas = tuple(args.betas)
    return args, parser


def given_flags(mode, argv, dests):
    """The options on the command line, whatever their value: `--lr 5e-4` on resume counts even where 5e-4 is
    the default (comparing values with the defaults would drop it and keep the checkpoint's lr)."""
    unset = object()
    parser = build_parser(mode)
    parser.set_defaults(**{k: unset for k in dests})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}


def read_resume_args(path):
    try:
        ckpt = formats.read_checkpoint(path)
    except formats.CheckpointError as e:
        raise TrainError(f"--resume: {e}") from None
    if not isinstance(ckpt.get("train"), dict) or "args" not in ckpt["train"]:
        raise TrainError(f"--resume: {path} is not a train.py checkpoint (it holds no training state)")
    return dict(ckpt["train"]["args"])


# ----------------------------------------------------------------------------------------------
# Teacher training's data: a small image folder decoded once and kept in memory as uint8


def load_image_folder(folder, res, log=print):
    """All readable images of a folder (not recursive, sorted by name): uint8 [N, 3, res, res].

    Unreadable files are skipped with a warning each; a folder with no readable image is an error.
    """
    if not os.path.isdir(folder):
        raise TrainError(f"--data {folder}: no such folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    images = []
    for name in names:
        try:
            images.append(formats.read_image(os.path.join(folder, name), res))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            log(f"warning: skipping {os.path.join(folder, name)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not images:
        raise TrainError(f"--data {folder}: no readable image ({', '.join(IMAGE_EXTENSIONS)})")
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------
# Networks


def default_teacher_channels(res):
    """Generator widths at 4, 8, ..., res for CPU-sized teachers: 256 up to 8x8, halving above, >= 32."""
    return [max(32, min(256, 2048 // r)) for r in (4 * 2**i for i in range(int(math.log2(res)) - 1))]


def init_student(student, src):
    """Copy the synthesis network of the student in `src` (parameters and style_inv buffers) into `student`; the
    mapping and the const noise stay the teacher's."""
    try:
        init = msgan.load(src)
    except (msgan.CheckpointError, msgan.DownloadError) as e:
        raise TrainError(f"--init: {e}") from None
    if not init.is_student:
        raise TrainError(f"--init {src}: a StyleGAN2 teacher, not a MobileStyleGAN student")
    own = {k: v for k, v in student.synthesis.state_dict().items() if not k.startswith("noise_const.")}
    given = init.synthesis.state_dict()
    for key, value in own.items():
        if key not in given:  # a folded (inference-only) student, for one, has no style_inv
            raise TrainError(f"--init {src}: not a trainable student of this teacher's geometry (no {key})")
        if given[key].shape != value.shape:
            raise TrainError(f"--init {src}: not the student of this teacher's geometry ({key} is "
                             f"{tuple(given[key].shape)}, this teacher's student has {tuple(value.shape)})")
    student.synthesis.load_state_dict({k: given[k] for k in own}, strict=False)
    return student


class GeneratorPass(nn.Module):
    """One training forward of a Generator as a single call (what DistributedDataParallel wraps):
    mapping of z and of the mixing z, style mixing at per-sample slots, truncation, synthesis.

    Returns (img [B, 3, R, R], freq (the student's wavelet heads) or None, ws [B, num_ws, w_dim]).
    """

    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, z, z_mix, mix_at, noise, psi=1.0):
        G = self.G
        w, w_mix = G.mapping(z), G.mapping(z_mix)                                  # [B, w_dim] each
        slot = torch.arange(G.num_ws, device=z.device)[None, :, None]              # [1, num_ws, 1]
        ws = G.truncate(torch.where(slot < mix_at[:, None, None], w[:, None], w_mix[:, None]), psi)
        if G.is_student:
            img, freq = G.synthesis(ws, noise=noise, return_freq=True)
            return img, freq, ws
        return G.synthesis(ws, noise=noise), None, ws


class DiscriminatorPass(nn.Module):
    """D's logits [B, 1] on augmented images as a single call (what DistributedDataParallel wraps)."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, img, aug_params):
        return self.D(msgan.augment(img, aug_params))


@torch.no_grad()
def update_ema(ema, model, beta):
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - beta)


# ----------------------------------------------------------------------------------------------
# What differs between the two modes: where real images come from, and the generator's own losses


class Distillation:
    """The student against the frozen teacher on the same w and noise (official MobileStyleGAN losses)."""

    def __init__(self, teacher, vgg, args):
        self.teacher, self.vgg, self.args = teacher, vgg, args
        self.noise_resolutions = teacher.synthesis.noise_resolutions  # the student takes its prefix
        self.psi = args.trunc

    def draw_reals(self, n, generator):
        return None  # the teacher makes them in the generator pass

    def generator_losses(self, g_pass, inputs, step):
        img, freq, ws = g_pass(inputs["z"], inputs["z_mix"], inputs["mix_at"], inputs["noise"], self.psi)
        with torch.no_grad():
            real = self.teacher.synthesis(ws, noise=inputs["noise"])
        terms = msgan.distillation_loss(freq, real)
        losses = {"l1": terms["l1"], "l2": terms["l2"]}
        if self.vgg is not None:
            losses["perceptual"] = msgan.perceptual_loss(img, real, self.vgg, self.args.perceptual_size)
        return img, real, losses

    def weights(self):
        return {"l1": self.args.l1, "l2": self.args.l2, "perceptual": self.args.perceptual, "gan": self.args.gan}


class TeacherTraining:
    """StyleGAN2 against a data set held in memory, with optional lazy path-length regularisation."""

    def __init__(self, images, args, device):
        self.images, self.args, self.device = images, args, device
        self.noise_resolutions = None  # set from the generator
        self.psi = 1.0
        self.pl_mean = torch.zeros((), device=device)  # running mean path length (saved with the run)

    def draw_reals(self, n, generator):
        index = torch.randint(len(self.images), (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < (0.5 if self.args.xflip else 0.0)
        return {"index": index, "flip": flip}

    def reals(self, draw):
        x = self.images[draw["index"]].to(self.device).float() / 127.5 - 1       # [B, 3, R, R] in [-1, 1]
        return torch.where(draw["flip"].to(self.device)[:, None, None, None], x.flip(3), x)

    def generator_losses(self, g_pass, inputs, step):
        pl_step = self.args.pl_weight > 0 and step % self.args.pl_every == 0
        img, _, ws = g_pass(inputs["z"], inputs["z_mix"], inputs["mix_at"], inputs["noise"])
        losses = {}
        if pl_step:  # ||J_w^T y|| for image-space noise y should stay near its running mean
            y = inputs["pl_noise"].to(img) / math.sqrt(img.shape[2] * img.shape[3])
            (grad,) = torch.autograd.grad((img * y).sum(), ws, create_graph=True)
            lengths = grad.pow(2).sum(2).mean(1).sqrt()                           # [B]
            self.pl_mean.lerp_(lengths.mean().detach(), 0.01)
            losses["pl"] = (lengths - self.pl_mean).pow(2).mean() * self.args.pl_every
        return img, self.reals(inputs["reals"]), losses

    def weights(self):
        return {"gan": 1.0, "pl": self.args.pl_weight}


# ----------------------------------------------------------------------------------------------
# Distributed set-up and the randomness of one step


def setup_distributed(device_name):
    """(rank, world size, device); torchrun's environment turns on DDP (NCCL on CUDA, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device_name)
    cuda = torch.device(device_name).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(tensor, op=None):
    if dist.is_initialized():
        dist.all_reduce(tensor, op or dist.ReduceOp.SUM)
    return tensor


def draw_step(task, G, batch, args, aug_p, generator=None):
    """Everything random in one step, for the whole global batch (CPU tensors, sliced per chunk)."""
    num_ws = G.num_ws
    mixing = torch.rand(batch, generator=generator) < args.mix_prob
    crossover = torch.randint(1, num_ws, (batch,), generator=generator)
    inputs = {
        "z": torch.randn(batch, G.z_dim, generator=generator),
        "z_mix": torch.randn(batch, G.z_dim, generator=generator),
        "mix_at": torch.where(mixing, crossover, torch.full_like(crossover, num_ws)),
        "noise": [torch.randn(batch, 1, r, r, generator=generator) for r in task.noise_resolutions],
        "aug_g": msgan.augment_params(batch, aug_p, generator),
        "aug_real": msgan.augment_params(batch, aug_p, generator),
        "aug_fake": msgan.augment_params(batch, aug_p, generator),
    }
    reals = task.draw_reals(batch, generator)
    if reals is not None:
        inputs["reals"] = reals
    if getattr(args, "pl_weight", 0) > 0:
        inputs["pl_noise"] = torch.randn(batch, 3, G.img_resolution, G.img_resolution, generator=generator)
    return inputs


def chunk_of(inputs, start, stop, device):
    """The samples [start, stop) of a step's inputs, on the device."""
    def cut(x):
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, list):
            return [cut(v) for v in x]
        return x[start:stop].to(device) if x.dtype.is_floating_point or x.dtype == torch.int64 else x[start:stop]
    return cut(inputs)


def check_finite(losses, step):
    """Stop on a non-finite loss term, on every rank alike; names the term and the step."""
    names = list(losses)
    bad = torch.tensor([0.0 if torch.isfinite(losses[n].detach()).all() else 1.0 for n in names])
    all_reduce(bad, dist.ReduceOp.MAX if dist.is_initialized() else None)
    if bad.any():
        term = names[int(bad.nonzero()[0])]
        raise NonFiniteLoss(f"non-finite {term} loss at step {step}; stopped, the last checkpoint is untouched")


# ----------------------------------------------------------------------------------------------
# Validation and sample grids (fixed inputs, independent of the training randomness)


def validation_inputs(task, G, n):
    g = torch.Generator().manual_seed(VAL_SEED)
    z = torch.randn(n, G.z_dim, generator=g)
    noise = [torch.randn(n, 1, r, r, generator=g) for r in task.noise_resolutions]
    return z, noise


class Validator:
    """Figures on a fixed validation set, reduced over ranks (each rank evaluates its share).

    Distillation: "psnr_db", the mean PSNR of the EMA student against the teacher (higher is better; it
    picks best.pt), and "val_distill", the l1 + l2 distillation loss on the same set. Teacher training:
    "swd_x1000", the sliced Wasserstein distance x 1000 between EMA samples and real images, in pixels
    (lower is better).
    """

    def __init__(self, task, G, args, rank, world, device):
        self.task, self.world = task, world
        z, noise = validation_inputs(task, G, args.val_samples)
        mine = slice(rank * len(z) // world, (rank + 1) * len(z) // world)
        self.z, self.noise = z[mine].to(device), [n[mine].to(device) for n in noise]
        self.grid_z, self.grid_noise = z[:GRID_SAMPLES].to(device), [n[:GRID_SAMPLES].to(device) for n in noise]
        self.distill = isinstance(task, Distillation)
        self.name, self.higher_is_better = ("psnr_db", True) if self.distill else ("swd_x1000", False)
        if not self.distill:
            order = torch.randperm(len(task.images), generator=torch.Generator().manual_seed(VAL_SEED))
            self.reals = task.images[order[:args.val_samples]].float() / 127.5 - 1

    @torch.no_grad()
    def run(self, G, batch):
        figures, fakes = torch.zeros(3), []  # sums of per-sample PSNR and distillation loss, count
        for i in range(0, len(self.z), batch):
            ws = G.truncate(G.mapping(self.z[i:i + batch]), self.task.psi)  # the training distribution of w
            noise = [n[i:i + batch] for n in self.noise]
            if not self.distill:
                fakes.append(G.synthesis(ws, noise=noise))
                continue
            img, freq = G.synthesis(ws, noise=noise, return_freq=True)
            target = self.task.teacher.synthesis(ws, noise=noise)  # the same w: the student has the teacher's mapping
            terms = msgan.distillation_loss(freq, target)
            figures += torch.tensor([psnr(img, target).sum().item(), (terms["l1"] + terms["l2"]).item() * len(img),
                                     len(img)])
        if self.distill:
            psnr_sum, loss_sum, count = all_reduce(figures).tolist()
            return {"psnr_db": psnr_sum / count, "val_distill": loss_sum / count}
        fakes = torch.cat(fakes)
        if self.world > 1:  # the distance needs every sample in one place
            gathered = [torch.empty_like(fakes) for _ in range(self.world)]
            dist.all_gather(gathered, fakes.contiguous())
            fakes = torch.cat(gathered)
        n = min(len(fakes), len(self.reals))
        return {"swd_x1000": 1000 * fid.sliced_wasserstein(fakes[:n].flatten(1).cpu(), self.reals[:n].flatten(1))}

    @torch.no_grad()
    def grid(self, generators, path):
        """One square grid of the fixed grid samples per generator, side by side, at the largest resolution (small
        images enlarged by a whole factor, nearest neighbour, to at least GRID_MIN_TILE pixels)."""
        size = max(G.img_resolution for G in generators)
        zoom = max(1, GRID_MIN_TILE // size)
        tiles = []
        for G in generators:
            img = G.synthesis(G.mapping(self.grid_z), noise=self.grid_noise)
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False) if img.shape[-1] != size else img
            img = F.interpolate(img, scale_factor=zoom, mode="nearest") if zoom > 1 else img
            rows = int(math.sqrt(len(img)))
            img = img[:rows * rows].reshape(rows, rows, *img.shape[1:])                 # [r, r, 3, H, W]
            tiles.append(img.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2))        # [3, r*H, r*W]
        gap = torch.ones(3, tiles[0].shape[1], 2, device=tiles[0].device)              # a white line between
        grid = torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=2)
        formats.save_png((grid * 127.5 + 128).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy(), path)


# ----------------------------------------------------------------------------------------------
# Setting up a run: its folder, its networks (fresh or from --resume)


class StopFlag:
    """While active, SIGINT / SIGTERM ask the loop to stop after the current step (a second Ctrl-C
    interrupts at once); the previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False

    def handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self.previous = [signal.signal(s, self.handler) for s in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for s, h in zip(self.SIGNALS, self.previous):
            signal.signal(s, h)


def prepare_outdir(args, resuming):
    """A writable run folder (checked now, not after an hour of training), cleared of the temp files a
    killed run may have left; an existing run is only ever continued with --resume, never overwritten."""
    last = os.path.join(args.outdir, "last.pt")
    if not resuming and os.path.exists(last):
        raise TrainError(f"--outdir {args.outdir} already holds a run (last.pt): continue it with "
                         f"--resume {last}, or choose another --outdir")
    grids = os.path.join(args.outdir, "grids")
    try:
        os.makedirs(args.outdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=args.outdir, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
        os.makedirs(grids, exist_ok=True)
        for folder in (args.outdir, grids):
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(folder, name))
    except OSError as e:
        raise TrainError(f"--outdir {args.outdir} is not writable ({e.strerror or e})") from None


def load_teacher(src, device):
    if src is None:
        if not os.path.isfile(os.path.join(formats.WEIGHTS_DIR, formats.PRETRAINED[DEFAULT_TEACHER])):
            raise UsageError(f"no default teacher ({DEFAULT_TEACHER}) in {formats.WEIGHTS_DIR}: "
                             "give one with --teacher PATH|NAME")
        src = DEFAULT_TEACHER
    try:
        teacher = msgan.load(src, device=device, part="teacher")
    except (msgan.CheckpointError, msgan.DownloadError) as e:
        try:  # a file holding only a student has no "teacher" part: say what it is instead
            teacher = msgan.load(src, device=device)
        except (msgan.CheckpointError, msgan.DownloadError):
            raise TrainError(f"--teacher: {e}") from None
    if teacher.is_student:
        raise TrainError(f"--teacher {src}: a MobileStyleGAN student, not a StyleGAN2 teacher")
    return teacher.requires_grad_(False)


def load_vgg(path, device, log):
    """VGG16 for the perceptual loss, or None when its weights are unavailable (one warning)."""
    try:
        return fid.load_vgg16(path).to(device)
    except fid.FIDError as e:
        log(f"warning: perceptual loss off: VGG16 weights unavailable ({e})")
        return None


def build_networks(args, resume, device, log):
    """(task, G, G_ema, D): the mode's task (its teacher or its images) and the networks, fresh or as --resume
    saved them. A fresh run draws its initial weights from the global RNG, in this order."""
    if args.mode == "distill":
        teacher = (msgan.load(args.resume, device=device, part="teacher").requires_grad_(False) if resume
                   else load_teacher(args.teacher, device))
        task = Distillation(teacher, load_vgg(args.vgg, device, log) if args.perceptual > 0 else None, args)
        resolution, channels = teacher.img_resolution, teacher.synthesis.channels

        def fresh_generator():
            try:
                student = msgan.student_for(teacher, args.channels)
            except ValueError as e:  # a teacher too small, or --channels that do not fit it
                raise TrainError(str(e)) from None
            return init_student(student, args.init) if args.init else student
    else:
        images = load_image_folder(args.data, args.res, log)
        log(f"data: {len(images)} images from {args.data} at {args.res}x{args.res}")
        task = TeacherTraining(images, args, device)
        if args.res < 16 or args.res & (args.res - 1):
            raise TrainError(f"--res {args.res}: must be a power of 2, at least 16")
        resolution, channels = args.res, args.channels or default_teacher_channels(args.res)
        if len(channels) != int(math.log2(args.res)) - 1:
            raise TrainError(f"--channels: {len(channels)} widths given, {int(math.log2(args.res)) - 1} needed "
                             f"for 4..{args.res}")

        def fresh_generator():
            return msgan.Generator(dict(arch="stylegan2", z_dim=args.z_dim, w_dim=args.w_dim,
                                        mapping_layers=args.mapping_layers, channels=channels))
    if resume is not None:
        G_ema = msgan.load(args.resume)
        G = copy.deepcopy(G_ema)
        G.load_state_dict(resume["train"]["G"])
        return task, G, G_ema, msgan.load(args.resume, part="discriminator")
    G = fresh_generator()
    d_channels = args.d_channels or channels[::-1]
    if len(d_channels) != int(math.log2(resolution)) - 1:
        raise TrainError(f"--d-channels: {len(d_channels)} widths given, {int(math.log2(resolution)) - 1} needed")
    return task, G, copy.deepcopy(G), msgan.Discriminator(resolution, d_channels)


# ----------------------------------------------------------------------------------------------
# The loop


def training_step(run):
    """One optimiser step of G and D on a fresh global batch, then ADA and the EMA update."""
    args = run.args
    inputs = draw_step(run.task, run.G, args.batch, args, run.aug_p)
    pairs = generator_phase(run, inputs)
    if run.weights["gan"] > 0:  # without a GAN term (distillation --gan 0) D would be trained for nothing
        discriminator_phase(run, pairs)
    run.images_seen += args.batch
    if args.ada_target > 0 and (run.step + 1) % ADA_INTERVAL == 0:
        run.adapt_augmentation()
    half_life = min(args.ema_kimg * 1000, run.images_seen * EMA_RAMPUP)
    update_ema(run.G_ema, run.G, 0.5 ** (args.batch / max(half_life, 1e-8)))
    run.step += 1


def generator_phase(run, inputs):
    """The mode's own losses plus the GAN term through a frozen D, over this rank's chunks.
    Returns [(real, fake, chunk)] for the discriminator phase."""
    run.D.requires_grad_(False)
    run.opt_g.zero_grad(set_to_none=True)
    pairs = []
    for k, (lo, hi) in enumerate(run.chunks):
        chunk = chunk_of(inputs, lo, hi, run.device)
        with run.sync(run.g_pass, k), run.autocast():
            fake, real, losses = run.task.generator_losses(run.g_pass, chunk, run.step)
            if run.weights["gan"] > 0:
                losses["gan"] = msgan.g_nonsaturating_loss(run.D(msgan.augment(fake, chunk["aug_g"])))
            check_finite(losses, run.step)
            (sum(run.weights[n] * v for n, v in losses.items()) / len(run.chunks)).backward()
        run.record(losses)
        pairs.append((real.detach(), fake.detach(), chunk))
    if run.args.grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in run.G.parameters() if p.requires_grad], run.args.grad_clip)
    run.opt_g.step()
    return pairs


def discriminator_phase(run, pairs):
    """Logistic loss on augmented real and fake images; lazy R1 on the augmented real ones, which on R1 steps
    is added to the loss (StyleGAN2) or replaces it (official MobileStyleGAN), per --r1-mode."""
    args = run.args
    run.D.requires_grad_(True)
    run.opt_d.zero_grad(set_to_none=True)
    r1_step = args.r1 > 0 and run.step % args.r1_every == 0
    for k, (real, fake, chunk) in enumerate(pairs):
        losses = {}
        with run.sync(run.d_pass, k), run.autocast():
            if not (r1_step and args.r1_mode == "replace"):
                real_logits = run.d_pass(real, chunk["aug_real"])
                losses["d"] = msgan.d_logistic_loss(real_logits, run.d_pass(fake, chunk["aug_fake"]))
                run.ada_signs += torch.tensor([real_logits.detach().sign().sum().item(), len(real_logits)])
            if r1_step:
                # at the images D judges: the gradient w.r.t. the real image through its augmentation (ADA's R1);
                # + 0 x every parameter: DDP waits for a gradient of each, and R1 gives none to D's last bias
                r1 = msgan.r1_penalty(lambda x: run.d_pass(x, chunk["aug_real"]), real)
                losses["r1"] = r1 * (args.r1 / 2 * args.r1_every) + 0 * sum(p.sum() for p in run.D.parameters())
            check_finite(losses, run.step)
            (sum(losses.values()) / len(pairs)).backward()
        run.record(losses)
    if args.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.D.parameters(), args.grad_clip)
    run.opt_d.step()


def train(args, log=functools.partial(print, flush=True)):
    """Run (or continue) training to args.steps; returns the Run."""
    with StopFlag() as stop:  # from the start: a signal during set-up stops after the first step
        run = Run(args, log)
        while run.step < args.steps:
            training_step(run)
            stopping = all_reduce(torch.tensor(float(stop.requested))).item() > 0
            if run.step % args.log_every == 0 or run.step == args.steps or stopping:
                run.report()
            if stopping:
                break
    last = os.path.join(args.outdir, "last.pt")
    if run.step < args.steps:
        run.say(f"stopped at step {run.step}: checkpoint {last}\ncontinue: python train.py"
                f"{' teacher' if args.mode == 'teacher' else ''} --resume {last} --steps {args.steps}")
        return run
    best = os.path.join(args.outdir, "best.pt")
    what = "student (EMA; the teacher is in the file too)" if args.mode == "distill" else "teacher (EMA)"
    compare = f" --compare {best}" if args.mode == "distill" else ""
    run.say(f"done: {best} holds the {what} with the best {run.validator.name} ({run.best:.3f}), {last} the last"
            f"\nsample it: python sample.py --model {best}{compare} -n 16")
    return run


class Run:
    """A training run: devices and ranks, the networks and their optimisers, the training forwards
    (g_pass, d_pass: what DDP wraps under torchrun), the counters, and the report."""

    def __init__(self, args, log):
        self.args = args
        self.rank, self.world, self.device = setup_distributed(args.device)
        self.is_main = self.rank == 0
        self.say = log if self.is_main else (lambda *a, **k: None)
        if args.amp and self.device.type != "cuda":
            raise TrainError("--amp bf16 needs a CUDA device")
        if args.batch % self.world:
            raise TrainError(f"--batch {args.batch} is not divisible by the {self.world} processes")
        per_rank = args.batch // self.world
        self.batch_gpu = args.batch_gpu or per_rank
        if per_rank % self.batch_gpu:
            raise TrainError(f"--batch-gpu {self.batch_gpu} does not divide the per-process batch {per_rank}")
        if self.batch_gpu % min(self.batch_gpu, msgan.Discriminator.STDDEV_GROUP):
            raise TrainError(f"--batch-gpu {self.batch_gpu}: the discriminator needs a multiple of "
                             f"{msgan.Discriminator.STDDEV_GROUP} samples (or fewer)")
        # round k of rank r takes samples [(k * world + r) * batch_gpu, ... + batch_gpu) of the global batch
        self.chunks = [((k * self.world + self.rank) * self.batch_gpu, (k * self.world + self.rank + 1) * self.batch_gpu)
                       for k in range(per_rank // self.batch_gpu)]
        if self.is_main:
            prepare_outdir(args, resuming=bool(args.resume))

        # Networks and optimisers, fresh or resumed.
        resume = formats.read_checkpoint(args.resume) if args.resume else None
        torch.manual_seed(args.seed + INIT_SEED_OFFSET)
        self.task, self.G, self.G_ema, self.D = build_networks(args, resume, self.device, self.say)
        if self.G.is_student:
            self.G.mapping.requires_grad_(False)
        self.G, self.D = self.G.to(self.device).train(), self.D.to(self.device).train()
        self.G_ema = self.G_ema.to(self.device).eval().requires_grad_(False)
        for net in (self.G, self.G_ema, self.D, getattr(self.task, "teacher", None)):
            if net is not None:  # the layout oneDNN and cuDNN convolutions run fastest in: +15% img/s at 32x32
                net.to(memory_format=torch.channels_last)
        if self.task.noise_resolutions is None:
            self.task.noise_resolutions = self.G.synthesis.noise_resolutions
        self.opt_g = torch.optim.Adam([p for p in self.G.parameters() if p.requires_grad], lr=args.lr,
                                      betas=args.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=args.d_lr, betas=args.betas)
        torch.manual_seed(args.seed)  # the one stream of training randomness, identical on every rank
        self.step, self.images_seen, self.best, self.aug_p = 0, 0, None, args.aug_p
        if resume is not None:
            self.restore(resume["train"])

        # The training forwards.
        self.g_pass = ops.maybe_compile(GeneratorPass(self.G), args.compile, self.say)
        self.d_pass = DiscriminatorPass(self.D)
        if self.world > 1:
            self.g_pass = nn.parallel.DistributedDataParallel(self.g_pass, broadcast_buffers=False)
            self.d_pass = nn.parallel.DistributedDataParallel(self.d_pass, broadcast_buffers=False)

        # Bookkeeping.
        self.weights = self.task.weights()
        self.ada_signs = torch.zeros(2)  # sum of sign(D(real)) and count since the last adaptation
        self.validator = Validator(self.task, self.G_ema, args, self.rank, self.world, self.device)
        self.logged, self.last_report = {}, (time.time(), self.images_seen, self.step)
        self.say(f"{args.mode}: {self.G.img_resolution}x{self.G.img_resolution}, "
                 f"G {sum(p.numel() for p in self.G.synthesis.parameters()):,} params, "
                 f"D {sum(p.numel() for p in self.D.parameters()):,}, batch {args.batch} "
                 f"({self.world} x {len(self.chunks)} x {self.batch_gpu}), {self.device}, out {args.outdir}")

    def restore(self, saved):
        """Optimisers, counters and RNG state as --resume saved them; --lr / --d-lr given now win."""
        for opt, state, lr in ((self.opt_g, saved["opt_g"], self.args.lr), (self.opt_d, saved["opt_d"], self.args.d_lr)):
            opt.load_state_dict(state)
            for group in opt.param_groups:
                group["lr"] = lr
        self.step, self.images_seen, self.best, self.aug_p = (saved["step"], saved["images_seen"], saved["best"],
                                                              saved["aug_p"])
        torch.set_rng_state(saved["rng"])
        if "cuda_rng" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if self.args.mode == "teacher":
            self.task.pl_mean.copy_(saved["pl_mean"])

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.args.amp else contextlib.nullcontext()

    def sync(self, module, k):
        """DDP gradient all-reduce only on the last accumulation round."""
        return module.no_sync() if self.world > 1 and k < len(self.chunks) - 1 else contextlib.nullcontext()

    def adapt_augmentation(self):
        """ADA: raise p while D is overconfident on reals (E[sign D(real)] above target), lower it otherwise."""
        signs, count = all_reduce(self.ada_signs.clone()).tolist()
        self.ada_signs.zero_()
        if count:
            rt = signs / count
            step = self.args.batch * ADA_INTERVAL / (ADA_KIMG * 1000)
            self.aug_p = min(max(self.aug_p + math.copysign(step, rt - self.args.ada_target), 0.0), ADA_P_MAX)
            self.logged["ada_rt"] = self.logged.get("ada_rt", 0.0) + rt * ADA_INTERVAL  # per-step mean in the log

    def record(self, losses):
        for name, value in losses.items():
            self.logged[name] = self.logged.get(name, 0.0) + value.detach().float().item() / len(self.chunks)

    def report(self):
        args, step = self.args, self.step
        start_time, start_images, start_step = self.last_report
        names = sorted(self.logged)  # every rank has the same terms: the schedule is global
        means = all_reduce(torch.tensor([self.logged[k] for k in names])) / (self.world * (step - start_step))
        line = dict(zip(names, means.tolist()))
        self.logged.clear()
        elapsed = time.time() - start_time
        rate = (self.images_seen - start_images) / max(elapsed, 1e-9)
        if args.mode == "teacher":
            self.G_ema.compute_w_avg()
        figures = self.validator.run(self.G_ema, self.batch_gpu)
        val = figures[self.validator.name]
        improved = self.best is None or (val > self.best if self.validator.higher_is_better else val < self.best)
        self.best = val if improved else self.best
        if self.is_main:
            record = {"step": step, "images": self.images_seen, **line, **figures,
                      "aug_p": self.aug_p, "lr": self.opt_g.param_groups[0]["lr"], "img_per_s": rate}
            with open(os.path.join(args.outdir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            panels = [self.task.teacher, self.G, self.G_ema] if args.mode == "distill" else [self.G, self.G_ema]
            self.validator.grid(panels, os.path.join(args.outdir, "grids", f"{step:07d}.png"))
            self.save(os.path.join(args.outdir, "last.pt"))
            if improved:
                self.save(os.path.join(args.outdir, "best.pt"))
            eta = (args.steps - step) * args.batch / max(rate, 1e-9)
            terms = "  ".join(f"{k} {v:.4g}" for k, v in line.items())
            shown = "  ".join(f"{k} {v:.3f}" for k, v in figures.items())
            self.say(f"step {step}/{args.steps}  {terms}  {shown}  "
                     f"{rate:.1f} img/s  ETA {format_duration(eta)}")
        if dist.is_initialized():
            dist.barrier()
        self.last_report = (time.time(), self.images_seen, step)

    def save(self, path):
        """The run as a msgan checkpoint: generator = the EMA generator (+ teacher, discriminator), and
        under "train" what --resume needs."""
        args = self.args
        train_state = {
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "step": self.step, "images_seen": self.images_seen, "best": self.best, "aug_p": self.aug_p,
            "G": self.G.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if args.mode == "teacher":
            train_state["pl_mean"] = self.task.pl_mean.cpu()
        if torch.cuda.is_available():
            train_state["cuda_rng"] = torch.cuda.get_rng_state_all()
        teacher = self.task.teacher if args.mode == "distill" else None
        msgan.save(path, generator=self.G_ema, teacher=teacher, discriminator=self.D, train=train_state,
                   source=f"train.py {args.mode}, step {self.step}")


# ----------------------------------------------------------------------------------------------
# Projection: a photograph into a generator's W+ (`python train.py project PHOTO`), as StyleGAN2's projector:
# Adam on the code from w_avg with a warm-up and a cosine cool-down, optionally the noise maps too.

PROJECT_STEPS = 600         # the FFHQ student: about 7 minutes on 2 CPU cores, compiled (README)
PROJECT_LR = 0.2            # peak learning rate of the code
PROJECT_RAMP = (0.05, 0.25)  # fractions of the steps: linear warm-up, cosine cool-down
PROJECT_SIZE = 256          # the photo and the image are compared at this size (or the model's, if smaller)
PROJECT_L1 = 3.0            # weight of the L1 terms (pixels, and Haar details at every scale) beside the L2
PROJECT_NOISE_REG = 1e5     # weight of the optimised noise maps' autocorrelation (StyleGAN2's)
PROJECT_MIN_PHOTO = 32      # pixels a side: a smaller photo holds no face to project
PROJECT_GIF_FRAMES = 24     # the animation of the optimisation
MAX_PROJECT_STEPS = 100_000


def projection_loss(img, target, vgg=None):
    """L2 + L1 of the pixels and L1 of the Haar detail coefficients at every scale down to 8 px: edges weigh as
    much as flat areas (with pixel terms alone a projection is a smooth blur). + the VGG16 distance, with vgg."""
    details, x, y = 0, img, target
    while x.shape[-1] > 8:
        wx, wy = ops.img_to_wavelets(x), ops.img_to_wavelets(y)          # [B, 12, S/2, S/2]
        details = details + F.l1_loss(wx[:, 3:], wy[:, 3:])
        x, y = wx[:, :3] / 2, wy[:, :3] / 2                               # the low band: the image at half size
    loss = F.mse_loss(img, target) + PROJECT_L1 * (F.l1_loss(img, target) + details)
    return loss if vgg is None else loss + msgan.perceptual_loss(img, target, vgg)


def noise_autocorrelation(noise):
    """StyleGAN2's regulariser of optimised noise maps: their squared autocorrelation at a shift of one pixel,
    at every scale down to 8 px (noise that carries the image would be correlated)."""
    total = 0
    for n in noise:
        while n.shape[-1] > 8:
            total = total + (n * n.roll(1, 3)).mean() ** 2 + (n * n.roll(1, 2)).mean() ** 2
            n = F.avg_pool2d(n, 2)
    return total


def projection_lr(t, peak):
    """The learning rate at progress t in [0, 1): linear warm-up, flat, cosine cool-down to 0."""
    up, down = PROJECT_RAMP
    return peak * min(1.0, t / up) * (0.5 - 0.5 * math.cos(math.pi * min(1.0, (1 - t) / down)))


def project(G, target, steps=PROJECT_STEPS, space="w+", optimize_noise=False, vgg=None, lr=PROJECT_LR,
            compile=False, seed=0, resume=None, on_step=None, log=print):
    """The W+ code (with optimize_noise, and the noise maps) whose image is closest to `target`.

        G = msgan.load("ffhq")
        photo = formats.read_image("face.jpg", 256)[None] / 127.5 - 1            # [1, 3, 256, 256] in [-1, 1]
        code = train.project(G, photo)
        img = G.synthesis(code["ws"], noise=code["noise"])                       # [1, 3, 1024, 1024]

    target: [1, 3, S, S] in [-1, 1]; the image is box-filtered from G's resolution R to S (R/S a power of 2)
    and compared by projection_loss. space "w": one w for every slot; "w+": one per slot. The code starts at
    w_avg, noise maps (optimised: kept at mean 0, std 1) from `seed`. Returns the best step's code: {"ws"
    [1, num_ws, w_dim], "noise" (a list, or None: the model's const noise), "psnr_db" (at S), "step", "steps",
    "space", "state": what `resume` takes to continue}. on_step(code, step, loss, psnr) runs after each step
    and may return True to stop early. G's parameters are frozen.
    """
    G.requires_grad_(False)
    factor = G.img_resolution // target.shape[-1]
    synthesis = ops.maybe_compile(G.synthesis, compile, log or (lambda line: None))
    if resume is None:
        w = G.w_avg.detach()[None, None].repeat(1, 1 if space == "w" else G.num_ws, 1)   # [1, 1 or num_ws, w_dim]
        generator = torch.Generator().manual_seed(seed)
        noise = [torch.randn(1, 1, r, r, generator=generator).to(target)
                 for r in G.synthesis.noise_resolutions] if optimize_noise else None
        start, best = 0, {"psnr_db": -math.inf}
    else:
        state = resume["state"]
        w, noise, start = state["w"].clone(), state["noise"] and [n.clone() for n in state["noise"]], state["step"]
        best = {k: resume[k] for k in ("ws", "noise", "psnr_db", "step")}
    parameters = [w.requires_grad_(True)] + [n.requires_grad_(True) for n in noise or []]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    if resume is not None:
        optimizer.load_state_dict(resume["state"]["optimizer"])
    code = {**best, "steps": steps, "space": space}
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = projection_lr(step / steps, lr)
        ws = w.expand(-1, G.num_ws, -1)
        img = synthesis(ws, noise=noise, noise_mode="const")
        img = F.avg_pool2d(img, factor) if factor > 1 else img                       # [1, 3, S, S]
        loss = projection_loss(img, target, vgg)
        if noise is not None:
            loss = loss + PROJECT_NOISE_REG * noise_autocorrelation(noise)
        psnr_db = psnr(img, target).item()
        if psnr_db > best["psnr_db"]:  # the image of the code before this step's update
            best = {"ws": ws.detach().clone(), "noise": noise and [n.detach().clone() for n in noise],
                    "psnr_db": psnr_db, "step": step}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if noise is not None:
            with torch.no_grad():
                for n in noise:
                    n.sub_(n.mean()).div_(n.std())
        code = {**best, "steps": steps, "space": space, "state": {
            "w": w.detach(), "noise": noise and [n.detach() for n in noise], "optimizer": optimizer.state_dict(),
            "step": step + 1}}
        if on_step is not None and on_step(code, step, loss.item(), psnr_db):
            break
    return code


def project_parser():
    parser = argparse.ArgumentParser(prog="train.py project", description="Project a photograph into a "
                                     "generator's W+: the code whose image matches it, to re-render, edit or mix.")
    parser.add_argument("photo", help="image file (centre-cropped to a square, resized to the model's resolution)")
    parser.add_argument("--model", default="ffhq", help="generator: pretrained name or checkpoint (default ffhq)")
    parser.add_argument("--steps", type=int_in(1, MAX_PROJECT_STEPS), default=PROJECT_STEPS)
    parser.add_argument("--space", choices=["w", "w+"], default="w+", help="one w for every slot, or one per slot")
    parser.add_argument("--noise", action=argparse.BooleanOptionalAction, default=True,
                        help="also optimise the noise maps, regularised (default on: the eyes and mouth come out "
                        "sharper)")
    parser.add_argument("--lr", type=nonnegative_float, default=PROJECT_LR, help="peak learning rate")
    parser.add_argument("--outdir", help="where the results go (default out/project-<photo name>)")
    parser.add_argument("--resume", metavar="CODE", help="a code.pt to continue (to --steps)")
    parser.add_argument("--vgg", help="VGG16 weight file for a perceptual term (default: the torch hub cache)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="of the noise maps' start")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the synthesis (default on: 3x faster steps after about a minute)")
    parser.add_argument("--log-every", type=positive_int, default=25, help="steps between progress lines")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--convert", action="store_true", help="project a greyscale, transparent, palette or 16-bit "
                        "photo as the RGB image it converts to (without it such a photo is refused)")
    return parser


def read_photo(path, res, convert, log):
    """The photo as [1, 3, res, res] in [-1, 1] (centre-cropped). A photo that is not plain RGB is refused unless
    convert, then converted with one warning: the generators draw RGB, so its conversion is a guess to confirm."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
        photo = formats.read_image(path, res)
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise TrainError(f"{path}: not an image Pillow can read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if min(size) < PROJECT_MIN_PHOTO:
        raise TrainError(f"{path}: {size[0]}x{size[1]} pixels, too small to project (at least {PROJECT_MIN_PHOTO} a side)")
    converted = {"L": "greyscale", "LA": "greyscale", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit",
                 "I": "16-bit", "RGBA": "transparent (composited on white)", "P": "palette"}.get(mode)
    if converted and not convert:
        raise TrainError(f"{path} is {converted}, not RGB: --convert projects the RGB image it converts to")
    if converted:
        log(f"warning: {path} is {converted}: projected as the RGB image it converts to")
    if size[0] != size[1]:
        log(f"{path}: {size[0]}x{size[1]}, the centre {min(size)}x{min(size)} square projected")
    return photo[None].float() / 127.5 - 1


def run_projection(argv, log=functools.partial(print, flush=True)):
    args = project_parser().parse_args(argv)
    stem = os.path.splitext(os.path.basename(args.photo))[0]
    args.outdir = args.outdir or os.path.join("out", f"project-{stem}")
    code_path = os.path.join(args.outdir, "code.pt")
    G = msgan.load(args.model, device=args.device)
    size = min(PROJECT_SIZE, G.img_resolution)
    target = read_photo(args.photo, size, args.convert, log).to(args.device)
    shown = read_photo(args.photo, G.img_resolution, args.convert, lambda line: None)
    resume = None
    if args.resume:
        resume = formats.read_projection(args.resume, G.num_ws, G.w_dim, G.synthesis.noise_resolutions)
        if "state" not in resume or resume.get("size") != size:
            raise TrainError(f"--resume {args.resume}: not a projection of this model at {size}x{size}")
        if resume["state"]["step"] >= args.steps:
            raise TrainError(f"--resume {args.resume}: already at step {resume['state']['step']}; give more --steps")
        args.space, args.noise = resume["space"], resume["noise"] is not None
    elif os.path.exists(code_path):
        raise TrainError(f"--outdir {args.outdir} already holds a projection (code.pt): continue it with "
                         f"--resume {code_path}, or choose another --outdir")
    try:
        os.makedirs(args.outdir, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--outdir {args.outdir} is not writable ({e.strerror or e})") from None
    vgg = load_vgg(args.vgg, args.device, log)
    frames, started = [], time.time()

    def save(code):
        formats.write_projection(code_path, code, model=str(args.model), photo=os.path.abspath(args.photo),
                                 size=size)

    def on_step(code, step, loss, psnr_db):
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or stop.requested:
            rate = (time.time() - started) / (done - (resume["state"]["step"] if resume else 0))
            log(f"step {done}/{args.steps}  loss {loss:.4f}  psnr {psnr_db:.2f} dB  best {code['psnr_db']:.2f}  "
                f"{rate:.2f} s/step  ETA {format_duration(rate * (args.steps - done))}")
            save(code)
        if done % max(1, args.steps // PROJECT_GIF_FRAMES) == 0:
            frames.append(render_code(G, code, min(G.img_resolution, PROJECT_SIZE)))
        return stop.requested

    log(f"project: {args.photo} into {args.model} ({G.img_resolution}x{G.img_resolution}, {args.space}"
        f"{', noise' if args.noise else ''}), compared at {size}x{size}, {args.steps} steps, out {args.outdir}")
    with StopFlag() as stop:
        code = project(G, target, args.steps, args.space, args.noise, vgg, args.lr, args.compile, args.seed, resume,
                       on_step, log)
    if "ws" not in code:  # stopped before the first step
        raise TrainError("stopped before the first step: nothing to write")
    save(code)
    image = render_code(G, code, G.img_resolution)
    formats.save_png(image, os.path.join(args.outdir, "projection.png"))
    side = min(G.img_resolution, 2 * PROJECT_SIZE)
    photo = sample.to_uint8(F.interpolate(shown, size=side, mode="area") if side < G.img_resolution else shown)[0]
    formats.save_png(np.concatenate([photo, render_code(G, code, side)], axis=1),
                     os.path.join(args.outdir, "side_by_side.png"))
    if frames:
        gif = [Image.fromarray(frame) for frame in frames]
        sample.save_image(gif[0], os.path.join(args.outdir, "progress.gif"), save_all=True, append_images=gif[1:],
                          duration=sample.GIF_FRAME_MS * 3, loop=0)
    verb = "done" if code["state"]["step"] >= args.steps else f"stopped at step {code['state']['step']}"
    log(f"{verb}: PSNR {code['psnr_db']:.2f} dB at {size}x{size} (step {code['step']}); {args.outdir}: code.pt, "
        f"projection.png, side_by_side.png, progress.gif\nre-render it: python sample.py --model {args.model} "
        f"--w {code_path}" + ("" if verb == "done" else f"\ncontinue: python train.py project {args.photo} --model "
                                f"{args.model} --resume {code_path} --steps {args.steps}"))


@torch.no_grad()
def render_code(G, code, size):
    """The image of a projection's best code, [size, size, 3] uint8 (box-filtered from G's resolution)."""
    img = G.synthesis(code["ws"], noise=code["noise"], noise_mode="const")
    return sample.to_uint8(F.avg_pool2d(img, G.img_resolution // size) if size < G.img_resolution else img)[0]


def benchmark(log=functools.partial(print, flush=True)):
    """`python train.py bench`: training throughput on this machine, img/s after a warm-up step.

    Distillation with the full official loss (a VGG16 of random weights: the same work as the real one)
    from random teachers: the emoji teacher's geometry at 32x32 and StyleGAN2's (rosinality, channel
    multiplier 2) at 256x256; teacher training at 32x32 in the emoji geometry on random images.
    """
    emoji, stylegan2_256 = [256, 128, 64, 32], msgan.default_channels(256)
    cases = [("distill", 32, emoji, 16, False), ("distill", 32, emoji, 16, True),
             ("distill", 256, stylegan2_256, 2, False), ("distill", 256, stylegan2_256, 2, True),
             ("teacher", 32, emoji, 32, False)]
    log(f"{'mode':8} {'res':>4}  {'teacher widths':28} {'batch':>5}  {'perceptual':>10}  {'img/s':>7}"
        f"   ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        vgg = os.path.join(tmp, "vgg16_random.pt")
        torch.save(fid.VGG16().state_dict(), vgg)
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        for i in range(64):
            formats.save_png(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy(), f"{data}/{i}.png")
        for mode, res, channels, batch, perceptual in cases:
            common = ["--steps", "1000000", "--batch", str(batch), "--outdir", os.path.join(tmp, f"{mode}{res}")]
            if mode == "distill":
                teacher = os.path.join(tmp, f"teacher{res}.pt")
                msgan.save(teacher, generator=msgan.Generator(dict(arch="stylegan2", z_dim=512, w_dim=512,
                                                                   mapping_layers=8, channels=channels)))
                args, _ = parse_args(["--teacher", teacher, "--vgg", vgg, "--perceptual", str(float(perceptual)),
                                      *common])
            else:
                args, _ = parse_args(["teacher", "--data", data, "--res", str(res),
                                      "--channels", ",".join(map(str, channels)), *common])
            run = Run(args, log=lambda *a, **k: None)
            for _ in range(BENCH_WARMUP):
                training_step(run)
            start, steps = time.perf_counter(), 0
            while steps < 2 or time.perf_counter() - start < BENCH_SECONDS:
                training_step(run)
                steps += 1
            rate = steps * batch / (time.perf_counter() - start)
            shown = ("yes" if perceptual else "no") if mode == "distill" else "-"
            log(f"{mode:8} {res:>4}  {','.join(map(str, channels)):28} {batch:>5}  {shown:>10}  {rate:7.2f}")


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    ops.use_huge_pages()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["bench"]:
            benchmark()
            return 0
        if argv[:1] == ["project"]:
            run_projection(argv[1:])
            return 0
        args, _ = parse_args(argv)
        if args.outdir is None:
            args.outdir = os.path.join("runs", f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        train(args)
    except TrainError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except (msgan.CheckpointError, msgan.DownloadError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder that went away: the last complete checkpoint is intact
        print(f"train.py: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted (the last checkpoint is intact)", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
