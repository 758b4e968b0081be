"""Generate images with a pretrained or trained generator.

    python sample.py -n 64                         # 64 PNGs + grid.jpg of the default model (ffhq) in out/
    python sample.py --seeds 0-7 --trunc 0.7       # seeds 0..7, truncation psi 0.7
    python sample.py --model ckpt.pt --compare teacher.pt --seeds 0-3   # teacher | student pairs
    python sample.py --interpolate --seeds 0-4     # looping GIF through the seeds' w codes
    python sample.py --w out/project-me/code.pt --trunc 0.7              # a projection (train.py project), truncated
    python sample.py --w code.pt --mix coarse --seeds 0-7                # ... its coarse styles from each seed
    python sample.py --bench                       # speed table: teacher and student paths, 256 and 1024 px

Image k of seed s is the same on every run: z (and, with --noise-mode random, the noise) comes from a
generator seeded with s alone. Across batch sizes and thread counts it is the same to float rounding (a pixel
value may rarely differ by one: BLAS sums a batch of one, or on another number of threads, in another order).
"""
import argparse
import collections
import concurrent.futures
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

import formats
import msgan
import ops

GRID_TILE = 256          # grid tiles are downscaled to at most this many pixels
GRID_MAX_IMAGES = 256    # grid.jpg shows the first 256 images (16 x 16 tiles)
MAX_WORKERS = 4          # batches rendered at once: one per core up to this many (more cores go to each)
GIF_SIZE = 256           # GIF frames, pixels
GIF_FRAME_MS = 40        # 25 frames per second
PSNR_PEAK = 2.0          # images span [-1, 1]
PSNR_MIN_MSE = 1e-10     # identical images: a finite ceiling of 106 dB
# Command-line limits: past them a count is a typo, and would exhaust memory, disk or time before giving a result.
MAX_IMAGES = 1_000_000   # -n / --seeds: a million 1024x1024 PNGs fill about 1.5 TB
MAX_BATCH = 1024         # a larger batch is no faster, only closer to running out of memory
MAX_GIF_FRAMES = 3000    # all frames of --interpolate (2 minutes at 25 fps, ~600 MB) are held until written
SEED_LIMIT = 2**64       # torch.Generator seeds are unsigned 64-bit integers
MIX_SLOTS = {"coarse": (0, 3), "middle": (3, 7), "fine": (7, None)}  # W+ slots of 4-8 px, 16-32 px, 64 px and up


# ----------------------------------------------------------------------------------------------
# Generating images


def seeded_inputs(G, seeds, noise_mode, device):
    """z [B, z_dim] and the noise list for these seeds; each sample depends on its own seed only."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = torch.stack([torch.randn(G.z_dim, generator=g) for g in gens])
    noise = None
    if noise_mode == "random":  # [B, 1, r, r] per styled conv, drawn after z from each seed's generator
        noise = [torch.cat([torch.randn(1, 1, r, r, generator=g) for g in gens]).to(device)
                 for r in G.synthesis.noise_resolutions]
    return z.to(device), noise


def to_uint8(img):
    """[B, 3, H, W] ~[-1, 1] -> [B, H, W, 3] uint8 (NVlabs rounding), permuted first: channels-last is one block."""
    return img.permute(0, 2, 3, 1).mul(127.5).add_(128).clamp_(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def psnr(img, target):
    """Per-sample PSNR in dB of images in [-1, 1] (peak-to-peak 2), both clamped to that range: [B]."""
    mse = (img.clamp(-1, 1) - target.clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(PSNR_PEAK**2 / mse.clamp(min=PSNR_MIN_MSE))


def compare_inputs(G, teacher, seeds, noise_mode, device):
    """seeded_inputs for G, or with a teacher the one noise list that feeds both: the teacher's, of which a
    student takes the maps it has (with noise_mode "const" too, so that both draw the same noise)."""
    z, noise = seeded_inputs(teacher if teacher is not None else G, seeds, noise_mode, device)
    if teacher is not None and noise is None and noise_mode == "const":
        noise = teacher.synthesis.resolve_noise(len(seeds), None, "const", device)
    return z, noise


def mix_styles(ws, w, group):
    """ws [B, num_ws, w_dim] with w [B, w_dim] in the slots of the style-mixing group ("coarse", ...)."""
    first, last = MIX_SLOTS[group]
    ws = ws.clone()
    ws[:, first:last] = w[:, None]
    return ws


@torch.no_grad()
def render(G, seeds, psi, noise_mode, device, teacher=None, code=None, mix=None):
    """One batch: (images [B, H, W, 3] uint8, PSNRs or Nones). With a teacher: teacher | student side by side,
    and the student's PSNR in dB against the teacher (images clamped to [-1, 1]). With a projection's code: its
    W+ (and noise), the seeds' w in the slots of the `mix` group if one is given."""
    z, noise = compare_inputs(G, teacher, seeds, noise_mode, device)
    w = G.mapping(z)                                                               # [B, w_dim]
    if code is not None:
        ws = code["ws"].to(device).expand(len(seeds), -1, -1)
        w = mix_styles(ws, w, mix) if mix else ws
        noise = noise if code["noise"] is None else [n.to(device) for n in code["noise"]]
    img = G.synthesis(G.truncate(w, psi), noise=noise, noise_mode=noise_mode).float()  # float32 from --bf16 too
    if teacher is None:
        return to_uint8(img), [None] * len(seeds)
    ref = teacher.synthesis(teacher.truncate(teacher.mapping(z), psi), noise=noise, noise_mode=noise_mode)
    if img.shape[-1] != ref.shape[-1]:
        img = F.interpolate(img, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    return to_uint8(torch.cat([ref, img], dim=3)), psnr(img, ref).tolist()


def worker_split(batches, compiled):
    """(batches rendered at once, intra-op threads of each) for this process's torch threads. One batch per core,
    each on a single thread, beats one batch on all cores: two batches at a time run 64 FFHQ forwards 5-15% faster
    on 2 cores, and each worker encodes its own PNGs on its own core instead of taking one from the next forward's
    threads. A torch.compile'd network runs one batch at a time (its first call compiles)."""
    cores = torch.get_num_threads()
    workers = 1 if compiled else max(1, min(MAX_WORKERS, cores, batches))
    return workers, max(1, cores // workers)


def write_samples(G, seeds, args, device, teacher=None, progress=None, code=None):
    """seed{s:04d}.png for every seed in args.outdir (with a projection's code: code.png, or with --mix
    code-{mix}-seed{s:04d}.png); returns (the grid's tiles, the PSNRs or Nones), in seed order. Batches are
    rendered by a few worker threads at once (worker_split), each writing its own PNGs, at most one batch per worker
    in flight: memory is flat in the number of seeds."""
    batches = [seeds[i:i + args.batch] for i in range(0, len(seeds), args.batch)]
    workers, threads = worker_split(len(batches), args.compile)

    def job(index):
        arrays, psnrs = render(G, batches[index], args.trunc, args.noise_mode, device, teacher, code, args.mix)
        for seed, array in zip(batches[index], arrays):
            name = f"seed{seed:04d}.png" if code is None else f"code-{args.mix}-seed{seed:04d}.png" if args.mix \
                else "code.png"
            formats.save_png(array, os.path.join(args.outdir, name))
        first = index * args.batch
        return [grid_tile(array) for array in arrays[:max(GRID_MAX_IMAGES - first, 0)]], psnrs

    tiles, psnrs = [], []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    msgan.tune_tiling(G, workers, log=log)  # once per machine: the inference path's tiles, timed as they will run
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sample")
    try:
        in_flight, submitted = collections.deque(), 0
        while submitted < len(batches) or in_flight:
            while submitted < len(batches) and len(in_flight) < workers:
                in_flight.append(pool.submit(job, submitted))
                submitted += 1
            batch_tiles, batch_psnrs = in_flight.popleft().result()  # in seed order; the first error is raised
            tiles += batch_tiles
            psnrs += batch_psnrs
            if progress:
                progress.update(len(psnrs))
    finally:
        # the batches in flight (one per worker) finish, started or still queued: the same files on every stop;
        # a second Ctrl-C must not abandon a file mid-write (each is atomic)
        with formats.interrupts_held():
            pool.shutdown(wait=True)
        torch.set_num_threads(previous_threads)
    return tiles, psnrs


def grid_tile(array):
    """[H, W, 3] uint8 -> PIL tile of at most GRID_TILE px a side: box filter for whole factors, else Lanczos."""
    image, size = Image.fromarray(array), array.shape[0]
    if size <= GRID_TILE:
        return image
    if size % GRID_TILE == 0:
        return image.reduce(size // GRID_TILE)
    return image.resize((GRID_TILE, GRID_TILE), Image.LANCZOS)


def make_grid(tiles):
    """List of equal PIL tiles -> one grid image with ceil(sqrt(n)) columns."""
    cols, tile = math.ceil(math.sqrt(len(tiles))), tiles[0].width
    grid = Image.new("RGB", (cols * tile, math.ceil(len(tiles) / cols) * tile))
    for i, image in enumerate(tiles):
        grid.paste(image, ((i % cols) * tile, (i // cols) * tile))
    return grid


def save_image(image, path, **kwargs):
    """Write a PIL image atomically (formats.atomic_file)."""
    with formats.atomic_file(path) as tmp:
        image.save(tmp, **kwargs)


@torch.no_grad()
def interpolate_gif(G, seeds, psi, frames, device, path, progress):
    """Looping GIF: linear interpolation in w between consecutive seeds (and back to the first)."""
    msgan.tune_tiling(G, log=log)
    z, _ = seeded_inputs(G, seeds, "const", device)
    w = G.truncate(G.mapping(z), psi)
    keys = torch.cat([w, w[:1]])
    images = []
    for k in range(len(seeds)):
        for t in torch.arange(frames) / frames:
            img = G.synthesis(keys[k].lerp(keys[k + 1], t.item())[None], noise_mode="const").float()
            images.append(Image.fromarray(to_uint8(img)[0]).resize((GIF_SIZE, GIF_SIZE), Image.LANCZOS))
            progress.update(len(images))
    save_image(images[0], path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)


# ----------------------------------------------------------------------------------------------
# Command line (train.py, fid.py and demo.py take their argparse value types from here)


def int_in(lo, hi):
    """argparse type: an integer in lo..hi (anything else is a usage error, exit 2)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in {lo}..{hi}, got {value}")
        return value
    return parse


def finite_float(text):
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_seeds(text):
    """'0-63' -> [0..63]; '1,5,9' -> [1, 5, 9]; combinations such as '0-3,10'."""
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"bad seed list {text!r} (expected e.g. 0-63 or 1,5,9)")
        ranges.append(range(int(lo), int(hi or lo) + 1))
    if any(r.stop > SEED_LIMIT for r in ranges):
        raise argparse.ArgumentTypeError(f"seed list {text!r}: seeds must be below 2**64")
    count = sum(len(r) for r in ranges)  # counted before the list is made: '0-99999999999' is a typo
    if count > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"seed list {text!r} has {count} seeds, more than {MAX_IMAGES}")
    if count == 0:
        raise argparse.ArgumentTypeError(f"seed list {text!r} is empty")
    return [seed for r in ranges for seed in r]


def log(text):
    print(f"sample.py: {text}", file=sys.stderr)


class Progress:
    """One stderr line, rewritten in place; `newline` is what an error message needs in front of it."""

    def __init__(self, total, what):
        self.total, self.what, self.start, self.newline = total, what, time.time(), ""

    def update(self, done):
        rate = (time.time() - self.start) / max(done, 1)
        self.newline = "\n" if done < self.total else ""
        print(f"\r{self.what} {done}/{self.total}  {rate:.2f} s/image  ETA {rate * (self.total - done):.0f} s",
              end="" if self.newline else "\n", file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ffhq", help="pretrained name (ffhq) or checkpoint path")
    parser.add_argument("-n", type=int_in(1, MAX_IMAGES), help="number of images (seeds --seed .. --seed+n-1)")
    parser.add_argument("--seed", type=int_in(0, SEED_LIMIT - 1), default=0, help="first seed with -n (default 0)")
    parser.add_argument("--seeds", type=parse_seeds, help="explicit seeds, e.g. 0-63 or 1,5,9")
    parser.add_argument("--trunc", type=finite_float, default=1.0, help="truncation psi (1 = none)")
    parser.add_argument("--noise-mode", choices=["const", "random", "none"], default="const")
    parser.add_argument("--batch", type=int_in(1, MAX_BATCH), default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--outdir", default="out")
    parser.add_argument("--compare", metavar="TEACHER",
                        help="also run this file's StyleGAN2 teacher: writes teacher | student pairs, prints the PSNR")
    parser.add_argument("--interpolate", action="store_true", help="write a looping GIF through the seeds")
    parser.add_argument("--w", metavar="CODE", help="draw a projection's code (train.py project) instead of seeds")
    parser.add_argument("--mix", choices=list(MIX_SLOTS), help="with --w: each seed's w drives these styles")
    parser.add_argument("--frames", type=int_in(1, MAX_GIF_FRAMES), default=24, help="GIF frames per seed transition")
    parser.add_argument("--compile", action="store_true", help="torch.compile the synthesis (else eager, with a warning)")
    parser.add_argument("--bf16", action="store_true", help="synthesis in bfloat16 where the hardware has it "
                        "(AVX512-BF16 or AMX CPUs, GPUs): faster, ~47 dB from float32; elsewhere a warning")
    parser.add_argument("--bench", action="store_true", help="print the speed table (random weights) and exit")
    args = parser.parse_args(argv)
    ops.use_huge_pages()
    if args.seeds is not None and args.n is not None:
        parser.error("give either -n or --seeds, not both")
    count = args.n or 8
    if args.seeds is None and args.seed + count > SEED_LIMIT:
        parser.error("--seed plus -n: seeds must be below 2**64")
    seeds = args.seeds or list(range(args.seed, args.seed + count))
    if args.mix and not args.w:
        parser.error("--mix goes with --w (a projection whose styles the seeds replace)")
    if args.w and (args.interpolate or args.compare):
        parser.error("--w draws a projection: not with --interpolate or --compare")
    if args.w and not args.mix:
        seeds = seeds[:1]  # one image: the code's
    if args.interpolate and len(seeds) * args.frames > MAX_GIF_FRAMES:
        parser.error(f"--interpolate: {len(seeds)} seeds x {args.frames} frames is more than {MAX_GIF_FRAMES} frames")

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device}: {str(e).splitlines()[0]}")
    if args.bench:
        import export  # the benchmark compares msgan's paths with the exported model in its runtimes
        print(export.bench_table(export.bench(device=device.type, compile=args.compile), torch.get_num_threads()))
        return 0
    progress = None
    try:
        G = msgan.load(args.model, device=device).fold()
        G.synthesis = ops.maybe_bfloat16(G.synthesis, args.bf16, log)
        G.synthesis = ops.maybe_compile(G.synthesis, args.compile, log)
        teacher = msgan.load(args.compare, device=device, part="teacher") if args.compare else None
        code = args.w and formats.read_projection(args.w, G.num_ws, G.w_dim, G.synthesis.noise_resolutions)
        if teacher is not None and teacher.z_dim != G.z_dim:
            raise ValueError(f"--compare: teacher z_dim {teacher.z_dim} != model z_dim {G.z_dim}")
        os.makedirs(args.outdir, exist_ok=True)
        if args.interpolate:
            path = os.path.join(args.outdir, "interpolation.gif")
            progress = Progress(len(seeds) * args.frames, "frames")
            interpolate_gif(G, seeds, args.trunc, args.frames, device, path, progress)
            print(f"wrote {path}")
            return 0
        progress = Progress(len(seeds), "images")
        tiles, psnrs = write_samples(G, seeds, args, device, teacher, progress, code)  # only small tiles are kept
        save_image(make_grid(tiles), os.path.join(args.outdir, "grid.jpg"), quality=90)
        print(f"wrote {len(seeds)} images and grid.jpg to {os.path.abspath(args.outdir)}")
        if teacher is not None:
            print(f"student vs teacher: PSNR {statistics.mean(psnrs):.2f} dB (mean of {len(psnrs)} images, "
                  f"min {min(psnrs):.2f})")
    except (msgan.CheckpointError, msgan.DownloadError, ValueError, OSError) as e:
        print(f"{progress.newline if progress else ''}sample.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{progress.newline if progress else ''}sample.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
