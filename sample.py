"""Generate images with a pretrained or trained generator.

    python sample.py -n 64                         # 64 PNGs + grid.jpg of the default model (ffhq) in out/
    python sample.py --seeds 0-7 --trunc 0.7       # seeds 0..7, truncation psi 0.7
    python sample.py --model ckpt.pt --compare teacher.pt --seeds 0-3   # teacher | student pairs
    python sample.py --interpolate --seeds 0-4     # looping GIF through the seeds' w codes
    python sample.py --bench                       # speed table: teacher and student paths, 256 and 1024 px

Image k of seed s is the same on every run: z (and, with --noise-mode random, the noise) comes from a
generator seeded with s alone. Across batch sizes and thread counts it is the same to float rounding (a pixel
value may rarely differ by one: BLAS sums a batch of one, or on another number of threads, in another order).
"""
import argparse
import collections
import concurrent.futures
import importlib.util
import math
import multiprocessing
import os
import pathlib
import platform
import resource
import statistics
import struct
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import msgan
import fid
from fid import finite_float, int_in  # argparse types shared by the scripts

GRID_TILE = 256          # grid tiles are downscaled to at most this many pixels
PNG_ZLIB_STRATEGY = zlib.Z_HUFFMAN_ONLY  # sample PNGs: entropy coding of the filtered rows, no match search
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2        # PNG row filter: each byte minus the byte above it
GRID_MAX_IMAGES = 256    # grid.jpg shows the first 256 images (16 x 16 tiles)
MAX_WORKERS = 4          # batches rendered at once: one per core up to this many (more cores go to each)
GIF_SIZE = 256           # GIF frames, pixels
GIF_FRAME_MS = 40        # 25 frames per second
BENCH_RESOLUTIONS = (256, 1024)
BENCH_ROUNDS = 5         # batch-1 rounds (half as many at the throughput batch)
BENCH_BATCH = 8          # batch of the img/s column
BENCH_SETTLE_S = 0.3     # idle time before each timed call: the last worker's OpenMP / onnxruntime threads spin
                         # for a while after their work and would otherwise slow the next worker down
# Command-line limits: past them a count is a typo, and would exhaust memory, disk or time before giving a result.
MAX_IMAGES = 1_000_000   # -n / --seeds: a million 1024x1024 PNGs fill about 1.5 TB
MAX_BATCH = 1024         # a larger batch is no faster, only closer to running out of memory
MAX_GIF_FRAMES = 3000    # all frames of --interpolate (2 minutes at 25 fps, ~600 MB) are held until written
SEED_LIMIT = 2**64       # torch.Generator seeds are unsigned 64-bit integers


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
    """[B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] uint8 (the NVlabs rounding). Permuted first, so that a
    channels-last image (the inference path's) is scaled and rounded in place as one contiguous block."""
    return img.permute(0, 2, 3, 1).mul(127.5).add_(128).clamp_(0, 255).to(torch.uint8).cpu().numpy()


def save_image(array, path, **kwargs):
    """Write an [H, W, 3] uint8 array or a PIL image atomically (msgan.atomic_file)."""
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    with msgan.atomic_file(path) as tmp:
        image.save(tmp, **kwargs)


def encode_png(array):
    """[H, W, 3] uint8 -> the bytes of an 8-bit RGB PNG, made with numpy and zlib (which releases the GIL).

    Every row gets the 'Up' filter, in one numpy subtraction, and zlib only Huffman-codes the result. For
    1024x1024 faces that takes 18 ms against 64 ms for Pillow at its fastest level (which tries every filter on
    every row and searches for matches), and the files come out 2% smaller (1.50 vs 1.53 MB).
    """
    height, width, _ = array.shape
    flat = array.reshape(height, width * 3)
    rows = np.empty((height, 1 + width * 3), np.uint8)  # [filter byte | filtered row], as PNG stores them
    rows[:, 0] = PNG_FILTER_UP
    rows[0, 1:] = flat[0]                                # the row above the first is zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])   # uint8 arithmetic wraps modulo 256, as PNG's does

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    deflate = zlib.compressobj(strategy=PNG_ZLIB_STRATEGY)
    pixels = deflate.compress(rows) + deflate.flush()
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def save_png(array, path):
    """Write an [H, W, 3] uint8 array as a PNG, atomically (msgan.atomic_file)."""
    data = encode_png(array)
    with msgan.atomic_file(path) as tmp:
        pathlib.Path(tmp).write_bytes(data)


def grid_tile(array):
    """[H, W, 3] uint8 -> a PIL tile of at most GRID_TILE pixels a side (what the grid keeps in memory): a box
    filter for whole factors (1 ms for 1024 -> 256 against 8 ms for Lanczos), else Lanczos."""
    image, size = Image.fromarray(array), array.shape[0]
    if size <= GRID_TILE:
        return image
    if size % GRID_TILE == 0:
        return image.reduce(size // GRID_TILE)
    return image.resize((GRID_TILE, GRID_TILE), Image.LANCZOS)


def make_grid(tiles):
    """List of equal PIL tiles -> one grid image with ceil(sqrt(n)) columns."""
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tile = tiles[0].width
    grid = Image.new("RGB", (cols * tile, rows * tile))
    for i, image in enumerate(tiles):
        grid.paste(image, ((i % cols) * tile, (i // cols) * tile))
    return grid


def newline(progress):
    """What an error message needs in front of it: a newline if a progress line is still open."""
    return "\n" if progress is not None and progress.open else ""


class Progress:
    """One stderr line, rewritten in place; `open` while it still needs its newline."""

    def __init__(self, total, what):
        self.total, self.what, self.start, self.open = total, what, time.time(), False

    def update(self, done):
        rate = (time.time() - self.start) / max(done, 1)
        self.open = done < self.total
        print(f"\r{self.what} {done}/{self.total}  {rate:.2f} s/image  ETA {rate * (self.total - done):.0f} s",
              end="" if self.open else "\n", file=sys.stderr, flush=True)


@torch.no_grad()
def render(G, seeds, psi, noise_mode, device, teacher=None):
    """One batch: (images [B, H, W, 3] uint8, PSNRs or Nones). With a teacher: teacher | student side by side,
    and the student's PSNR in dB against the teacher (images clamped to [-1, 1])."""
    # the teacher's (longer) noise list also feeds the student, which takes the maps it has
    z, noise = seeded_inputs(teacher if teacher is not None else G, seeds, noise_mode, device)
    if teacher is not None and noise is None and noise_mode == "const":
        noise = teacher.synthesis.resolve_noise(len(seeds), None, "const", device)
    img = G.synthesis(G.truncate(G.mapping(z), psi), noise=noise, noise_mode=noise_mode)
    if teacher is None:
        return to_uint8(img), [None] * len(seeds)
    ref = teacher.synthesis(teacher.truncate(teacher.mapping(z), psi), noise=noise, noise_mode=noise_mode)
    if img.shape[-1] != ref.shape[-1]:
        img = F.interpolate(img, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    return to_uint8(torch.cat([ref, img], dim=3)), fid.psnr(img, ref).tolist()


def worker_split(batches, compiled):
    """(batches rendered at once, intra-op threads of each) for this process's torch threads.

    One batch per core, each on a single thread, beats one batch on all cores: two batches at a time ran 64 FFHQ
    forwards 5-15% faster on 2 cores, and each worker then encodes its own PNGs on its own core instead of taking
    one from the next forward's OpenMP threads. A torch.compile'd network runs one batch at a time (its first
    call compiles).
    """
    cores = torch.get_num_threads()
    workers = 1 if compiled else max(1, min(MAX_WORKERS, cores, batches))
    return workers, max(1, cores // workers)


def write_samples(G, seeds, args, device, teacher=None, progress=None):
    """seed{s:04d}.png for every seed in args.outdir; returns (the grid's tiles, the PSNRs or Nones), in seed order.

    Batches are rendered by a few worker threads at once (worker_split), each writing its own PNGs, at most one
    batch per worker in flight: memory is flat in the number of seeds.
    """
    batches = [seeds[i:i + args.batch] for i in range(0, len(seeds), args.batch)]
    workers, threads = worker_split(len(batches), args.compile)

    def job(index):
        arrays, psnrs = render(G, batches[index], args.trunc, args.noise_mode, device, teacher)
        for seed, array in zip(batches[index], arrays):
            save_png(array, os.path.join(args.outdir, f"seed{seed:04d}.png"))
        first = index * args.batch
        return [grid_tile(array) for array in arrays[:max(GRID_MAX_IMAGES - first, 0)]], psnrs

    tiles, psnrs = [], []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
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
        with msgan.interrupts_held():
            pool.shutdown(wait=True)
        torch.set_num_threads(previous_threads)
    return tiles, psnrs


@torch.no_grad()
def interpolate_gif(G, seeds, psi, frames, device, path, progress):
    """Looping GIF: linear interpolation in w between consecutive seeds (and back to the first)."""
    z, _ = seeded_inputs(G, seeds, "const", device)
    w = G.truncate(G.mapping(z), psi)
    keys = torch.cat([w, w[:1]])
    images = []
    for k in range(len(seeds)):
        for t in torch.arange(frames) / frames:
            img = G.synthesis(keys[k].lerp(keys[k + 1], t.item())[None], noise_mode="const")
            images.append(Image.fromarray(to_uint8(img)[0]).resize((GIF_SIZE, GIF_SIZE), Image.LANCZOS))
            progress.update(len(images))
    save_image(images[0], path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)


# ----------------------------------------------------------------------------------------------
# Benchmark (--bench): every (model, path) runs in its own worker process, so that each one's peak RSS is its
# own; the workers take turns, one forward each per round, so that drift on a shared machine hits all alike.


def bench_config(kind, res):
    """Geometry of the benchmarked networks (random weights: the speed does not depend on them)."""
    if kind == "teacher":  # rosinality's StyleGAN2 (channel multiplier 2), as the official teacher
        return dict(arch="stylegan2", z_dim=512, w_dim=512, mapping_layers=8, channels=msgan.default_channels(res))
    channels = msgan.FFHQ_CONFIG["channels"][:int(math.log2(res)) - 2]  # the FFHQ student, cut at res
    return dict(arch="mobilestylegan", z_dim=512, w_dim=512, mapping_layers=8, channels=channels)


def bench_generator(kind, res):
    torch.manual_seed(0)
    return msgan.Generator(bench_config(kind, res)).requires_grad_(False)


def bench_runner(kind, res, path, device, onnx_path):
    """A function ws -> images for one (model, path), built inside its worker."""
    if path == "openvino":  # the official FFHQ-1024 IR from the random-face wheel; one w in, like msgan's
        import openvino as ov
        files = msgan.random_face_ir(os.path.join(msgan.WEIGHTS_DIR, "cache", msgan.RANDOM_FACE_WHEEL))
        model = ov.Core().read_model(model=files["SynthesisNetwork.xml"],
                                     weights=ov.Tensor(np.frombuffer(files["SynthesisNetwork.bin"], np.uint8)))
        compiled = {}

        def run_openvino(w):  # the IR has a static batch: one compiled model per batch size
            if len(w) not in compiled:
                model.reshape({model.inputs[0].get_any_name(): [len(w), w.shape[1]]})
                config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
                compiled[len(w)] = ov.Core().compile_model(model, "CPU", config)
            return compiled[len(w)](w.numpy())[0]
        return run_openvino
    if path == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        return lambda w: session.run(None, {"w": w.numpy()})[0]
    G = bench_generator(kind, res).to(device)
    if path == "reference":
        return G.synthesis.forward_reference if G.is_student else G.synthesis
    synthesis = G.fold().synthesis  # "inference" and "compiled"
    return synthesis if path == "inference" else torch.compile(synthesis)


def bench_worker(conn, kind, res, path, device, onnx_path):
    """Serve ("run", batch) -> seconds, ("rss",) -> peak RSS in bytes, None -> exit."""
    try:
        device = torch.device(device)
        run = bench_runner(kind, res, path, device, onnx_path)
        ws = {b: torch.randn(b, 512, generator=torch.Generator().manual_seed(b)).to(device) for b in (1, BENCH_BATCH)}
        with torch.no_grad():
            run(ws[1])  # warm-up (and, for "compiled", the compilation)
            conn.send("ready")
            while (request := conn.recv()) is not None:
                if request[0] == "rss":
                    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
                    continue
                start = time.perf_counter()
                run(ws[request[1]])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                conn.send(time.perf_counter() - start)
    except Exception as e:  # reported by the parent as this path's result
        conn.send(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def bench_paths(resolutions, device, compile):
    """(kind, res, path) of every benchmarked combination available here."""
    available = {name: importlib.util.find_spec(name) is not None for name in ("onnxruntime", "openvino")}
    paths = []
    for res in resolutions:
        paths.append(("teacher", res, "reference"))
        student = ["reference", "inference"] + (["compiled"] if compile else [])
        if available["onnxruntime"] and device == "cpu":
            student.append("onnxruntime")
        paths += [("student", res, path) for path in student]
    wheel = os.path.join(msgan.WEIGHTS_DIR, "cache", msgan.RANDOM_FACE_WHEEL)
    if 1024 in resolutions and available["openvino"] and device == "cpu" and os.path.isfile(wheel):
        paths.append(("official", 1024, "openvino"))
    return paths


def bench(resolutions=BENCH_RESOLUTIONS, rounds=BENCH_ROUNDS, device="cpu", compile=False):
    """Rows {model, res, path, ms (median, batch 1), img_s (batch BENCH_BATCH), rss (bytes), error}."""
    rows = [dict(model=kind, res=res, path=path) for kind, res, path in bench_paths(resolutions, device, compile)]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        workers = []
        for row in rows:  # started one at a time: no path is built while another is timed
            onnx_path = os.path.join(tmp, f"{row['model']}{row['res']}.onnx")
            if row["path"] == "onnxruntime":
                bench_export_onnx(bench_generator(row["model"], row["res"]), onnx_path)
            conn, child = context.Pipe()
            process = context.Process(target=bench_worker, daemon=True,
                                      args=(child, row["model"], row["res"], row["path"], device, onnx_path))
            process.start()
            reply = conn.recv()
            if reply != "ready":
                row["error"] = reply
            workers.append((row, conn, process))
        live = [(row, conn) for row, conn, _ in workers if "error" not in row]

        def ask(row, conn, request):
            """The worker's answer, or None after recording its error (it has exited)."""
            if "error" not in row:
                time.sleep(BENCH_SETTLE_S if request[0] == "run" else 0)
                conn.send(request)
                reply = conn.recv()
                if not isinstance(reply, str):
                    return reply
                row["error"] = reply
            return None

        def median_seconds(batch, count):
            times = {id(row): [] for row, _ in live}
            for _ in range(count):
                for row, conn in live:
                    times[id(row)].append(ask(row, conn, ("run", batch)))
            return {key: statistics.median(values) if None not in values else None for key, values in times.items()}
        seconds = median_seconds(1, rounds)
        for row, conn in live:
            row.update(ms=seconds[id(row)] and 1000 * seconds[id(row)], rss=ask(row, conn, ("rss",)))
        median_seconds(BENCH_BATCH, 1)  # warm-up at the larger batch
        seconds = median_seconds(BENCH_BATCH, max(1, rounds // 2))
        for row, _ in live:
            row["img_s"] = seconds[id(row)] and BENCH_BATCH / seconds[id(row)]
        for row, conn, process in workers:
            if "error" not in row:
                conn.send(None)
            process.join()
    return rows


def bench_export_onnx(G, path):
    """msgan's own synthesis.onnx of G (the file `export.py onnx` writes), for the onnxruntime path."""
    import export  # only the benchmark needs the exporter
    G.fold()
    with torch.no_grad():
        export.export_onnx(export.SynthesisGraph(G), {"w": torch.randn(1, G.w_dim)}, "img", path,
                           export.DEFAULT_OPSET, {})


def bench_table(rows, threads):
    """The benchmark as a Markdown table, plus the ratios that matter."""
    lines = [f"| model | res | path | ms/image (batch 1) | img/s (batch {BENCH_BATCH}) | peak RSS (GB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['res']} | {row['path']} | failed: {row['error']} | | |")
            continue
        lines.append(f"| {row['model']} | {row['res']} | {row['path']} | {row['ms']:.0f} | {row['img_s']:.2f} "
                     f"| {row['rss'] / 2**30:.2f} |")
    ms = {(row["model"], row["res"], row["path"]): row["ms"] for row in rows if "error" not in row}
    for res in sorted({row["res"] for row in rows}):
        student = {path: value for (model, r, path), value in ms.items() if model == "student" and r == res}
        best = min(student, key=student.get, default=None)
        teacher, official = ms.get(("teacher", res, "reference")), ms.get(("official", res, "openvino"))
        if best and teacher:
            lines.append(f"\n{res}px: teacher / student ({best}) = {teacher / student[best]:.1f}x")
        if best and official:
            lines.append(f"{res}px: msgan {best} / official OpenVINO = {student[best] / official:.2f}")
        if "inference" in student and "reference" in student:
            lines.append(f"{res}px: inference path / reference path = "
                         f"{student['inference'] / student['reference']:.2f}")
    machine = platform.processor() or platform.machine()
    lines.append(f"({threads} threads, {machine}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ffhq", help="pretrained name (ffhq) or checkpoint path")
    parser.add_argument("-n", type=int_in(1, MAX_IMAGES), default=None,
                        help="number of images (seeds --seed .. --seed+n-1)")
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
    parser.add_argument("--frames", type=int_in(1, MAX_GIF_FRAMES), default=24, help="GIF frames per seed transition")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the synthesis network (falls back to eager with a warning)")
    parser.add_argument("--bench", action="store_true", help="print the speed table of teacher and student "
                        f"paths at {' and '.join(map(str, BENCH_RESOLUTIONS))} px (random weights) and exit")
    args = parser.parse_args(argv)
    msgan.use_huge_pages()
    if args.seeds is not None and args.n is not None:
        parser.error("give either -n or --seeds, not both")
    count = args.n or 8
    if args.seeds is None and args.seed + count > SEED_LIMIT:
        parser.error("--seed plus -n: seeds must be below 2**64")
    seeds = args.seeds or list(range(args.seed, args.seed + count))
    if args.interpolate and len(seeds) * args.frames > MAX_GIF_FRAMES:
        parser.error(f"--interpolate: {len(seeds)} seeds x {args.frames} frames is more than {MAX_GIF_FRAMES} frames")

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device}: {str(e).splitlines()[0]}")
    if args.bench:
        print(bench_table(bench(device=device.type, compile=args.compile), torch.get_num_threads()))
        return 0
    progress = None
    try:
        G = msgan.load(args.model, device=device).fold()
        G.synthesis = msgan.maybe_compile(G.synthesis, args.compile, lambda text: print(text, file=sys.stderr))
        teacher = msgan.load(args.compare, device=device, part="teacher") if args.compare else None
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
        tiles, psnrs = write_samples(G, seeds, args, device, teacher, progress)  # only small tiles are kept
        save_image(make_grid(tiles), os.path.join(args.outdir, "grid.jpg"), quality=90)
        print(f"wrote {len(seeds)} images and grid.jpg to {os.path.abspath(args.outdir)}")
        if teacher is not None:
            print(f"student vs teacher: PSNR {statistics.mean(psnrs):.2f} dB (mean of {len(psnrs)} images, "
                  f"min {min(psnrs):.2f})")
    except (msgan.CheckpointError, msgan.DownloadError, ValueError, OSError) as e:
        print(f"{newline(progress)}sample.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{newline(progress)}sample.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
