"""Every file format msgan reads or writes, and nothing that builds a network.

    data = formats.read_network("ckpt.pt", "generator")  # what the file holds, as plain data (NetworkData)
    G = msgan.build(data)                                 # the network (msgan.load does both)

Reads msgan's own checkpoints, rosinality/stylegan2-pytorch and official MobileStyleGAN checkpoints, NVIDIA
StyleGAN2-ADA network pickles, the official FFHQ-1024 model's OpenVINO IR in the `random-face` wheel, projections
and images. Writes msgan checkpoints, projections, PNG images and the tiling cache, each atomically. A reader returns a NetworkData: the config the network is built
from and its tensors under msgan's key names; `checked_state` then holds the tensors against the network msgan.py
builds on PyTorch's meta device.

Threat model. A file may be anything: truncated, corrupt, hand-edited or written to attack the reader.
- It runs no code. torch.save files are read with torch.load(weights_only=True), whose unpickler builds only
  tensors and containers (and rosinality's argparse.Namespace); a file that names any other callable is refused.
  NVIDIA pickles are read by _NvidiaUnpickler, which resolves only NVIDIA_PICKLE_GLOBALS, each mapped to a
  stand-in that builds data; the Python source such a pickle carries is never compiled, and a network is rebuilt
  only if that source's sha256 is one msgan knows computes what msgan implements (NVIDIA_SOURCES).
- It allocates nothing it does not hold. A config is checked against MAX_* limits, and the network is built on the
  meta device first, so a file that claims a huge network is refused before memory is allocated for it.
- It hands the network no absurd number. Every tensor must be a dense float tensor of the expected shape, finite,
  and at most MAX_ABS_VALUE in magnitude (trained weights stay below 1e3): a flipped exponent bit (1e38), which
  would overflow into NaN images, is refused. Other float precisions become float32, with a warning.
- It never becomes a path: nothing read from a file is used to open, write or name another file.
- Downloads are pinned. The random-face wheel and each IR file in it are checked against their published sha256
  before anything in them is parsed.
What a file can still do: hold weights that draw something else than its name says. A loader proves that a network
is well-formed, not that it is the one you wanted.
Every error is one CheckpointError (DownloadError for fetching) whose one-line message names the file and, where one
is at fault, the key.
"""
import argparse
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import numbers
import os
import pathlib
import pickle
import re
import reprlib
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
import zlib
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image

import ops

FORMAT_NAME = "msgan"
FORMAT_VERSION = 1
MAPPING_LR_MUL = 0.01  # msgan's mapping weights are stored as N(0, 1) / lr_mul at StyleGAN2's lr_mul, as rosinality's
MAX_ABS_VALUE = 1e5    # no tensor of a checkpoint may exceed this magnitude: 200x the largest trained weight (~500)
# Limits of the configs msgan builds networks from: past them even a meta-device build overflows or takes very long.
MAX_RESOLUTION_LOG2 = 16  # 65536 x 65536, far beyond any GAN
MAX_WIDTH = 2**16         # channels, z_dim, w_dim: 128x StyleGAN2's widest layer
MAX_MAPPING_LAYERS = 64   # StyleGAN2 has 8
GENERATOR_ARCHS = ("stylegan2", "mobilestylegan")
DISCRIMINATOR_KEYS = ("img_resolution", "channels", "conv_clamp", "stddev_group")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the offending key/shape."""


class DownloadError(RuntimeError):
    """A pretrained model could not be fetched or failed its checksum."""


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['empty or truncated file'])[0]}"


def _short(value):
    """repr(value) cut to one short line, for messages about values read from a file (which may be huge)."""
    return reprlib.repr(value)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing: a file is whole or absent


@contextlib.contextmanager
def interrupts_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold `signals` inside the block and deliver them, once each, as it ends: a Ctrl-C cannot land between
    creating a temp file and renaming or removing it. Only the main thread receives Python signals; elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {}
    for signum in signals:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, cannot be restored
            previous[signum] = signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


_UMASK_LOCK = threading.Lock()  # atomic_file runs in sample.py's writer threads; the umask is per process


def _current_umask():
    with _UMASK_LOCK:
        mask = os.umask(0)  # the only way to read it is to set it (and put it back)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temp file name in `path`'s folder (same extension), renamed to `path` when the block ends. An
    error, a full disk or Ctrl-C leaves `path` as it was and no temp file behind; an OSError names `path`."""
    with interrupts_held():
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                       suffix=os.path.splitext(path)[1])
            os.fchmod(fd, 0o666 & ~_current_umask())  # the mode open() would give, not mkstemp's private 0600
            os.close(fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
            raise


def atomic_save(obj, path):
    """torch.save through `atomic_file`: never a half-written `path`."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------------------------
# Images: PNGs written with numpy and zlib (which releases the GIL, so sample.py's writer threads overlap), and
# training images read with Pillow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2                        # PNG row filter: each byte minus the byte above it
PNG_ZLIB_STRATEGY = zlib.Z_HUFFMAN_ONLY  # entropy coding of the filtered rows, no match search


def encode_png(array):
    """[H, W, 3] uint8 -> the bytes of an 8-bit RGB PNG.

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
    """Write an [H, W, 3] uint8 array as a PNG, atomically."""
    data = encode_png(array)
    with atomic_file(path) as tmp:
        pathlib.Path(tmp).write_bytes(data)


def read_image(path, res):
    """An image file as uint8 [3, res, res]: any mode (transparency on white, 16-bit scaled to 8), centre-cropped,
    resized with Lanczos. Raises what Pillow raises for a file it cannot read."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits (PIL would clip at 255)
            array = np.asarray(im, dtype=np.float32) * (255 / 65535)
            im = Image.fromarray(array.round().clip(0, 255).astype(np.uint8), "L")
        if im.mode in ("P", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode == "RGBA":
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((res, res), Image.LANCZOS)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# msgan's own format: {"format": "msgan", "version": 1, "generator" | "teacher" | "discriminator":
# {"config": dict, "state_dict": {key: tensor}}, ...anything else the writer adds (train.py: "train", "source")}


@dataclasses.dataclass
class NetworkData:
    """One network as a file holds it, before anything is built from it."""
    kind: str                    # "generator" (Generator(config)) or "discriminator" (Discriminator(**config))
    config: dict
    state: dict                  # msgan key -> tensor, as read: checked_state holds it against the built network
    path: str                    # the file, named in every message
    what: str                    # how messages name the network: "generator", "G_ema", ...
    file_keys: dict = dataclasses.field(default_factory=dict)  # msgan key -> the key's name in the file
    own: tuple = ()              # key prefixes the file may lack: the network keeps what it was built with
    zeros: tuple = ()            # key prefixes the file lacks that are zero


def write_checkpoint(path, networks, **extra):
    """Write {part: (config, state_dict)} as a msgan checkpoint, atomically; loadable with weights_only=True."""
    ckpt = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **extra}
    for part, (config, state) in networks.items():
        ckpt[part] = {"config": config, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}
    atomic_save(ckpt, path)


TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def read_checkpoint(path):
    """The raw contents of a torch.save file (a dict), read with weights_only=True."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file, and not a pretrained model name ({', '.join(PRETRAINED)})")
    try:  # rosinality checkpoints hold their argparse options: allow that one class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler, which never calls what a file names
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: refused: it references {found[1]}, which only code could build, and "
                                  "msgan never runs code from a checkpoint (torch.load weights_only=True)") from None
        # torch's own reason, without its framing (which suggests loading the file with weights_only=False)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if not line.startswith(TORCH_ADVICE)), "empty or truncated file")
        raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError: "
                              f"{reason.split('WeightsUnpickler error:')[-1].strip()})") from None
    except Exception as e:  # truncated, corrupt, or not a torch file at all: torch raises many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: unknown checkpoint format (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def read_network(path, part):
    """The NetworkData of `part` in the file at `path`, whichever format it is in (see msgan.load for `part`)."""
    path = os.fspath(path)
    if _is_bare_pickle(path):
        return _from_nvidia(read_nvidia_pickle(path), path, part)
    ckpt = read_checkpoint(path)
    if ckpt.get("format") == FORMAT_NAME:
        return _from_msgan(ckpt, path, part)
    if "g_ema" in ckpt or "g" in ckpt:
        if part == "discriminator":
            return _discriminator_from_state(_get(ckpt, "d", path), path)
        return _from_rosinality(ckpt, path)
    if isinstance(ckpt.get("state_dict"), dict) and any(isinstance(k, str) and k.startswith("mapping_net.")
                                                        for k in ckpt["state_dict"]):
        if part == "discriminator":
            state = _tensors(ckpt["state_dict"], path, "state_dict")
            prefix = "loss.gan_loss.m."
            file_keys = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
            return _discriminator_from_state({k: state[v] for k, v in file_keys.items()}, path, file_keys)
        return _from_official(ckpt, path, part)
    keys = ", ".join(_short(k) for k in list(ckpt)[:5])
    raise CheckpointError(f"{path}: unknown checkpoint format (top-level keys: {keys})")


def _from_msgan(ckpt, path, part):
    if not (isinstance(ckpt.get("version"), int) and ckpt["version"] == FORMAT_VERSION):
        raise CheckpointError(f"{path}: msgan checkpoint version {_short(ckpt.get('version'))} is not supported")
    stored = [k for k in ("generator", "teacher", "discriminator") if k in ckpt]
    generator = ckpt.get("generator")
    if (part == "teacher" and part not in ckpt and isinstance(generator, dict)
            and isinstance(generator.get("config"), dict) and generator["config"].get("arch") == "stylegan2"):
        part = "generator"  # a trained teacher is saved as the file's generator
    if part not in ckpt:
        raise CheckpointError(f"{path}: holds no {part} (it has: {', '.join(stored)})")
    entry = ckpt[part]
    if not (isinstance(entry, dict) and "config" in entry and "state_dict" in entry):
        raise CheckpointError(f"{path}: {part} is not a dict with 'config' and 'state_dict'")
    state = _tensors(entry["state_dict"], path, f"{part} state_dict")
    config = entry["config"]
    if part == "discriminator":
        _check_discriminator_config(config, path, part)
        return NetworkData("discriminator", {k: config[k] for k in DISCRIMINATOR_KEYS if k in config}, state,
                           path, part)
    _check_generator_config(config, path, part)
    return NetworkData("generator", config, state, path, part)


def checked_state(data, expected):
    """data.state, checked against `expected` (the state dict of the network built from data.config, on the meta
    device: keys and shapes are checked before any memory is allocated), as the float32 tensors to load.

    One clear message for a missing, unexpected, wrongly shaped, non-float, non-finite or absurdly large tensor.
    Tensors of another float precision are converted to float32, with a warning.
    """
    path, what, named = data.path, data.what, data.file_keys.get
    state = _tensors(data.state, path, what)
    loaded, converted = {}, collections.Counter()
    for key, value in expected.items():
        if key not in state:
            if key.startswith(data.zeros):
                loaded[key] = torch.zeros(value.shape)
            elif not key.startswith(data.own):
                raise CheckpointError(f"{path}: {what}: missing key {named(key, key)!r}")
        elif tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {what}: key {named(key, key)!r} has shape {list(state[key].shape)}, "
                                  f"expected {list(value.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: {what}: unexpected key {named(unexpected[0], unexpected[0])!r}")
    for key, value in state.items():
        dtype = expected[key].dtype
        if value.layout != torch.strided or value.is_meta or not value.is_floating_point():
            raise CheckpointError(f"{path}: {what}: key {named(key, key)!r} is a {value.dtype} {value.layout} "
                                  f"{value.device.type} tensor, expected a dense {dtype} one")
        if value.dtype != dtype:
            converted[str(value.dtype).removeprefix("torch.")] += 1
        loaded[key] = value.to(dtype)
        if not torch.isfinite(loaded[key]).all():  # checked after the conversion: 1e39 in float64 is inf in float32
            raise CheckpointError(f"{path}: {what}: key {named(key, key)!r} holds non-finite values (NaN or inf)")
        if loaded[key].numel() and loaded[key].abs().max() > MAX_ABS_VALUE:
            raise CheckpointError(f"{path}: {what}: key {named(key, key)!r} holds a value of magnitude "
                                  f"{loaded[key].abs().max().item():.3g}, beyond any trained weight "
                                  f"(limit {MAX_ABS_VALUE:g})")
    if converted:
        counts = " and ".join(f"{n} {dtype}" for dtype, n in sorted(converted.items()))
        warnings.warn(f"{path}: {what}: converted {counts} tensors to float32")
    return loaded


def _config_error(path, what, key, value, expected):
    return CheckpointError(f"{path}: {what}: config {key!r} is {_short(value)}, expected {expected}")


def _is_count(value, limit):
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


def _check_channels(config, path, what, min_len):
    channels, max_len = config.get("channels"), MAX_RESOLUTION_LOG2 - 1
    if not (isinstance(channels, (list, tuple)) and min_len <= len(channels) <= max_len
            and all(_is_count(c, MAX_WIDTH) for c in channels)):
        raise _config_error(path, what, "channels", channels, f"a list of {min_len} to {max_len} ints in "
                            f"1..{MAX_WIDTH} (the widths at 4, 8, 16, ...)")


def _check_clamp(config, path, what):
    clamp = config.get("conv_clamp")
    if clamp is not None and not (isinstance(clamp, (int, float)) and not isinstance(clamp, bool)
                                  and math.isfinite(clamp) and clamp > 0):
        raise _config_error(path, what, "conv_clamp", clamp, "None or a positive number")


def _check_generator_config(config, path, what):
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {what}: config is a {type(config).__name__}, not a dict")
    if config.get("arch") not in GENERATOR_ARCHS:
        raise _config_error(path, what, "arch", config.get("arch"), " or ".join(map(repr, GENERATOR_ARCHS)))
    for key, limit in (("z_dim", MAX_WIDTH), ("w_dim", MAX_WIDTH), ("mapping_layers", MAX_MAPPING_LAYERS)):
        if not _is_count(config.get(key), limit):
            raise _config_error(path, what, key, config.get(key), f"an int in 1..{limit}")
    _check_channels(config, path, what, min_len=2 if config["arch"] == "mobilestylegan" else 1)  # >= 1 block
    if not isinstance(config.get("folded", False), bool):
        raise _config_error(path, what, "folded", config["folded"], "True or False")
    _check_clamp(config, path, what)


def _check_discriminator_config(config, path, what):
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {what}: config is a {type(config).__name__}, not a dict")
    _check_channels(config, path, what, min_len=1)
    resolution = 4 * 2 ** (len(config["channels"]) - 1)
    if config.get("img_resolution") != resolution:
        raise _config_error(path, what, "img_resolution", config.get("img_resolution"),
                            f"{resolution} (for {len(config['channels'])} channel widths)")
    if "stddev_group" in config and not _is_count(config["stddev_group"], math.inf):
        raise _config_error(path, what, "stddev_group", config["stddev_group"], "a positive int")
    _check_clamp(config, path, what)


# ----------------------------------------------------------------------------------------------
# Projections (train.py project): {"format": "msgan-projection", "version": 1, "ws": [1, num_ws, w_dim],
# "noise": a list of [1, 1, r, r] maps or None, "psnr_db", "step", ...what train.py adds to continue it}

PROJECTION_NAME = "msgan-projection"


def write_projection(path, code, **extra):
    """Write a projection's code atomically; loadable with weights_only=True."""
    atomic_save({"format": PROJECTION_NAME, "version": FORMAT_VERSION, **code, **extra}, path)


def read_projection(path, num_ws, w_dim, noise_resolutions):
    """A projection file's code, checked to fit a generator of that geometry: {"ws", "noise", ...}."""
    code = read_checkpoint(path)
    if code.get("format") != PROJECTION_NAME:
        raise CheckpointError(f"{path}: not a projection (train.py project writes code.pt)")
    ws, noise = code.get("ws"), code.get("noise")
    if not (isinstance(ws, torch.Tensor) and ws.is_floating_point() and tuple(ws.shape) == (1, num_ws, w_dim)):
        raise CheckpointError(f"{path}: ws is {_short(getattr(ws, 'shape', ws))}, expected a float tensor "
                              f"[1, {num_ws}, {w_dim}] (a projection into another model?)")
    if noise is not None and not (isinstance(noise, list) and len(noise) == len(noise_resolutions) and all(
            isinstance(n, torch.Tensor) and n.is_floating_point() and tuple(n.shape) == (1, 1, r, r)
            for n, r in zip(noise, noise_resolutions))):
        raise CheckpointError(f"{path}: noise is not a list of {len(noise_resolutions)} maps of this model's sizes")
    for what, tensor in [("ws", ws), *(("noise", n) for n in noise or [])]:
        if not torch.isfinite(tensor).all() or tensor.abs().max() > MAX_ABS_VALUE:
            raise CheckpointError(f"{path}: {what} holds non-finite or absurd values")
    return {**code, "ws": ws.float(), "noise": None if noise is None else [n.float() for n in noise]}


# ----------------------------------------------------------------------------------------------
# The tiling cache (msgan.tune_tiling): {"format": "msgan-tiling", "version": 1, "tiles": {key: tile bytes}}, a
# JSON file in weights/cache/. It is a cache: a missing, unreadable or malformed file reads as empty, and is
# rewritten whole on the next entry.


def read_tiling(path):
    """{key: tile bytes} of a tiling cache; {} when the file is missing or not a tiling cache."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    tiles = data.get("tiles") if isinstance(data, dict) and data.get("format") == "msgan-tiling" else None
    if not isinstance(tiles, dict):
        return {}
    return {key: value for key, value in tiles.items() if type(value) is int and value > 0}


def write_tiling(path, key, tile_bytes):
    """Add or replace one entry of the tiling cache at `path` (atomically; its folder is made if missing)."""
    tiles = {**read_tiling(path), key: int(tile_bytes)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": "msgan-tiling", "version": 1, "tiles": tiles}, f, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# rosinality/stylegan2-pytorch and official MobileStyleGAN checkpoints: tensors renamed to msgan's keys, the
# geometry read from their shapes


def _tensors(state, path, what):
    """state, checked to be a state dict (str -> tensor): every converter reads shapes from it."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {what} is a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: {what}: key {_short(key)} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {what}: key {key!r} is a {type(value).__name__}, not a tensor")
    return state


def _get(state, key, path):
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key!r}")
    return state[key]


def _shape(state, key, ndim, path, file_keys=None):
    """The shape of the tensor state[key], which converters read a size from: it must have ndim non-empty dims."""
    value = _get(state, key, path)
    if value.ndim != ndim or value.numel() == 0:
        name = (file_keys or {}).get(key, key)
        raise CheckpointError(f"{path}: key {name!r} has shape {list(value.shape)}, expected {ndim} non-empty "
                              "dimensions")
    return value.shape


def _rename(state, rules, path, file_keys=None):
    """Rename keys by regex rules applied in order, each to the result of the previous ones.

    A rule is (pattern, replacement) matched against the whole key; replacement None drops the key. Two keys
    that end up with one name are an error. file_keys, when given, records new key -> original key.
    """
    out, origin = {}, {}
    for original, value in state.items():
        key = original
        for pattern, repl in rules:
            match = re.fullmatch(pattern, key)
            if match and repl is None:
                break
            if match:
                key = repl(match) if callable(repl) else match.expand(repl)
        else:
            if key in out:  # two names of one tensor, e.g. "x.weight_permute" and "x.weight": which is meant?
                raise CheckpointError(f"{path}: keys {origin[key]!r} and {original!r} are both {key!r}")
            out[key], origin[key] = value, original
    if file_keys is not None:
        file_keys.update(origin)
    return out


def _mapping_config(state, prefix, first_index, path, file_keys=None):
    """z_dim, w_dim, layer count from EqualLinear weights `{prefix}{first_index + i}.weight`."""
    n = 0
    while f"{prefix}{first_index + n}.weight" in state:
        n += 1
    if n == 0:
        raise CheckpointError(f"{path}: missing key {prefix}{first_index}.weight (mapping network)")
    w_dim, z_dim = _shape(state, f"{prefix}{first_index}.weight", 2, path, file_keys)
    return dict(z_dim=z_dim, w_dim=w_dim, mapping_layers=n)


def _generated(state, *keys):
    """What a converted state may leave to the new network (NetworkData.own): `keys`, and the seeded const noise
    when the file stores none (official checkpoints; a file with some noise buffers must have all)."""
    noise = "synthesis.noise_const."
    return keys if any(key.startswith(noise) for key in state) else (*keys, noise)


# rosinality key -> msgan key. Mapping "style.N" (N from 1) becomes "mapping.layers.N-1".
MAPPING_RULE = (r"style\.(\d+)\.(weight|bias)", lambda m: f"mapping.layers.{int(m.group(1)) - 1}.{m.group(2)}")
ROSINALITY_RULES = [
    (r"(.*)\.(?:conv\.blur|upsample)\.kernel", None),          # fixed FIR buffers, rebuilt by the modules
    MAPPING_RULE,
    (r"input\.input", "const"),
    (r"(.*)\.noise\.weight", r"\1.noise_strength"),
    (r"(.*)\.activate\.bias", r"\1.bias"),
    (r"noises\.noise_(\d+)", r"noise_const.\1"),
    (r"(?!mapping\.)(.*)", r"synthesis.\1"),
]


def _squeeze_layouts(state):
    """Biases [1, C, 1, 1], official style_inv [1, 1, C, 1, 1] and rosinality's conv weights
    [1, O, I, k, k] to msgan's shapes."""
    for key, value in state.items():
        if key.endswith("style_inv"):
            state[key] = value.flatten()
        elif value.ndim == 5 and value.shape[0] == 1:
            state[key] = value[0]
        elif value.ndim == 4 and key.endswith(".bias"):
            state[key] = value.flatten()
    return state


def _from_rosinality(ckpt, path, names=None):
    """names: rosinality key -> the key's name in the file, for an official teacher (rosinality names by then)."""
    which = "g_ema" if "g_ema" in ckpt else "g"
    state = _tensors(ckpt[which], path, which)
    names = names or {}
    config = dict(arch="stylegan2", **_mapping_config(state, "style.", 1, path, names))
    channels = [_shape(state, "conv1.conv.weight", 5, path, names)[1]]  # [1, O, I, k, k]
    while f"convs.{2 * (len(channels) - 1)}.conv.weight" in state:
        channels.append(_shape(state, f"convs.{2 * (len(channels) - 1)}.conv.weight", 5, path, names)[1])
    config["channels"] = channels
    file_keys = {}
    state = _squeeze_layouts(_rename(state, ROSINALITY_RULES, path, file_keys))
    file_keys = {key: names.get(original, original) for key, original in file_keys.items()}
    if "latent_avg" in ckpt:
        if not isinstance(ckpt["latent_avg"], torch.Tensor):
            raise CheckpointError(f"{path}: key {names.get('latent_avg', 'latent_avg')!r} is a "
                                  f"{type(ckpt['latent_avg']).__name__}, not a tensor")
        state["w_avg"] = ckpt["latent_avg"].flatten()
        file_keys["w_avg"] = names.get("latent_avg", "latent_avg")
    return NetworkData("generator", config, state, path, "generator", file_keys, own=_generated(state, "w_avg"))


# official MobileStyleGAN student key (after "student.") -> msgan key (after "synthesis.")
OFFICIAL_STUDENT_RULES = [
    (r"device_info|(.*\.)?idwt\.(g0|g1)_(col|row)", None),      # bookkeeping and fixed Haar filters
    (r"input\.input", "const"),
    (r"(.*)\.conv\.weight_permute", r"\1.conv.weight"),
    (r"(.*)\.noise\.weight", r"\1.noise_strength"),
    (r"to_img1\.(.*)", r"to_wavelets1.\1"),
    (r"layers\.(\d+)\.to_img\.(.*)", r"blocks.\1.to_wavelets.\2"),
    (r"layers\.(\d+)\.(.*)", r"blocks.\1.\2"),
]
# official MobileStyleGAN teacher key (after "synthesis_net.") -> rosinality key
OFFICIAL_TEACHER_RULES = [
    (r"layers\.(\d+)\.conv1\.(.*)", lambda m: f"convs.{2 * int(m.group(1))}.{m.group(2)}"),
    (r"layers\.(\d+)\.conv2\.(.*)", lambda m: f"convs.{2 * int(m.group(1)) + 1}.{m.group(2)}"),
    (r"layers\.(\d+)\.to_rgb\.(.*)", r"to_rgbs.\1.\2"),
    (r"upsample\.kernel", None),
]


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _from_official(ckpt, path, part):
    state = _tensors(ckpt["state_dict"], path, "state_dict")
    mapping = {f"style.{k}": v for k, v in _strip(state, "mapping_net.layers.").items()}  # rosinality names
    mapping_names = {f"style.{k}": f"mapping_net.layers.{k}" for k in _strip(state, "mapping_net.layers.")}
    _shape(state, "style_mean", 3, path)
    w_avg = state["style_mean"][0, 0]  # [1, num_ws, D]: the same mean w in every slot
    if part == "teacher":
        teacher = _strip(state, "synthesis_net.")
        if not teacher:
            raise CheckpointError(f"{path}: holds no teacher (no synthesis_net.* keys)")
        file_keys = {}
        teacher = _rename(teacher, OFFICIAL_TEACHER_RULES, path, file_keys)
        names = {**{k: f"synthesis_net.{v}" for k, v in file_keys.items()}, **mapping_names,
                 "latent_avg": "style_mean"}
        return _from_rosinality({"g_ema": {**teacher, **mapping}, "latent_avg": w_avg}, path, names)
    student = _strip(state, "student.")
    if not student:
        raise CheckpointError(f"{path}: holds no student (no student.* keys)")
    file_keys = {}
    student = _squeeze_layouts(_rename(student, OFFICIAL_STUDENT_RULES, path, file_keys))
    file_keys = {k: f"student.{v}" for k, v in file_keys.items()}
    channels = [_shape(student, "conv1.conv.weight", 4, path, file_keys)[0]]
    while f"blocks.{len(channels) - 1}.conv2.conv.weight" in student:
        channels.append(_shape(student, f"blocks.{len(channels) - 1}.conv2.conv.weight", 4, path, file_keys)[0])
    config = dict(arch="mobilestylegan", channels=channels,
                  **_mapping_config(mapping, "style.", 1, path, mapping_names))
    file_keys = {f"synthesis.{k}": v for k, v in file_keys.items()}
    mapping = _rename(mapping, [MAPPING_RULE], path, file_keys)
    file_keys.update({k: mapping_names[v] for k, v in file_keys.items() if v in mapping_names})
    state = {**mapping, **{f"synthesis.{k}": v for k, v in student.items()}, "w_avg": w_avg}
    file_keys["w_avg"] = "style_mean"
    return NetworkData("generator", config, state, path, "generator", file_keys, own=_generated(state))


def _discriminator_from_state(state, path, file_keys=None, **options):
    """A rosinality-layout D state dict -> NetworkData of Discriminator(**config); channels from the tensor shapes."""
    state = _tensors(state, path, "discriminator")
    channels = [_shape(state, "convs.0.0.weight", 4, path, file_keys)[0]]
    while f"convs.{len(channels)}.conv2.1.weight" in state:
        channels.append(_shape(state, f"convs.{len(channels)}.conv2.1.weight", 4, path, file_keys)[0])
    config = dict(img_resolution=4 * 2 ** (len(channels) - 1), channels=channels, **options)
    _check_discriminator_config(config, path, "discriminator")
    state = {k: v for k, v in state.items() if not k.endswith(".kernel")}  # fixed blur buffers
    return NetworkData("discriminator", config, state, path, "discriminator", file_keys or {})


# ----------------------------------------------------------------------------------------------
# NVIDIA network pickles: network-snapshot-*.pkl of NVlabs/stylegan2-ada-pytorch (and of NVlabs/stylegan3 for
# its stylegan2 config). Each network in such a file is a call torch_utils.persistence._reconstruct_persistent_obj
# (meta), and NVIDIA's loader exec()s the module source that meta carries. msgan never runs or compiles it: a
# restricted unpickler maps the few globals a snapshot needs to inert stand-ins, turns every persistent object
# into an NvidiaObject record and refuses everything else. G_ema and D are then read from their tensors, and
# only if they were pickled with a source that msgan knows computes what msgan implements.

NVIDIA_SOURCES = {  # sha256 of an embedded module source (UTF-8) -> what it is. Recognised, never run.
    "53b4e1ec457171d4e2c1454d48013765ab626141c35cdd383b020950effe11a5":
        "NVlabs/stylegan2-ada-pytorch d72cc7d training/networks.py",
}
NVIDIA_SOURCES_ENV = "MSGAN_NVIDIA_SOURCES"  # more sha256s to accept, e.g. a fork's networks.py with the same math
PICKLE_PROTO = b"\x80"  # the first byte of every pickle of protocol 2 or newer
TORCH_LEGACY_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # torch.save's pre-zip format
NUMPY_SCALAR_KINDS = "biuf"  # bool, signed, unsigned, float: the numpy scalars in a snapshot (gains, counters)


class NvidiaObject:
    """A persistent object of an NVIDIA pickle, as plain data.

    class_name: the class NVIDIA's loader would instantiate ("Generator", "SynthesisLayer", ...); module_src: the
    source text that defines it, an inert string; state: its __dict__. Every persistent object of a snapshot is a
    torch module, so state holds _parameters and _buffers (name -> tensor), _modules (name -> NvidiaObject) and
    the attributes its __init__ set (resolution, conv_clamp, architecture, ...).
    """

    def __init__(self, class_name, module_src, state):
        self.class_name, self.module_src, self.state = class_name, module_src, state

    def __repr__(self):
        return f"NvidiaObject({self.class_name!r})"

    def __setstate__(self, state):  # a pickle can BUILD onto any object it made: never onto a record
        raise CheckpointError(f"refused a pickle that rewrites NVIDIA {self.class_name} after making it")

    def child(self, name):
        return self.state["_modules"].get(name)

    def attr(self, name, path, kind):
        """An attribute its __init__ set, checked to be a `kind` (a type or tuple of types, as for isinstance): a
        pickle can hold anything there."""
        if name not in self.state:
            raise CheckpointError(f"{path}: NVIDIA {self.class_name} has no attribute {name!r}")
        if not isinstance(self.state[name], kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(f"{path}: NVIDIA {self.class_name} attribute {name!r} is {_short(self.state[name])}, "
                                  f"not a {names}")
        return self.state[name]


def _nvidia_reconstruct(meta):
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: a record where NVIDIA exec()s the source."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("module_src"), str) and isinstance(meta.get("state"), dict)):
        raise CheckpointError("refused a persistent object that is not NVIDIA's plain class record")
    return NvidiaObject(meta["class_name"], meta["module_src"], meta["state"])


def _nvidia_storage(blob):
    """Stand-in for torch.storage._load_from_bytes: blob is torch.save(storage) in torch's legacy format, which
    NVIDIA reads with torch.load(weights_only=False). Read with torch's weights-only unpickler, as a 1-D tensor."""
    if not isinstance(blob, bytes):
        raise CheckpointError("refused a storage that is not a byte string")
    try:
        storage = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"refused a storage blob that torch's weights-only loader rejects ({type(e).__name__})")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"refused a storage blob that holds a {type(storage).__name__}, not a storage")
    with warnings.catch_warnings():  # the legacy format can only give the deprecated TypedStorage
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")
        return torch.empty(0, dtype=storage.dtype).set_(storage.untyped())  # [numel]


def _nvidia_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a strided view of the storage (torch checks the bounds)."""
    if not (isinstance(storage, torch.Tensor) and storage.ndim == 1):
        raise CheckpointError("refused a tensor that is not built on a storage")
    return storage.as_strided(size, stride, offset)


def _nvidia_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): the tensor itself."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("refused a parameter that is not a tensor")
    return data


class _NumpyDtype:
    """Stand-in for numpy.dtype(code, align, copy): keeps the code, and the byte order from numpy's pickled state."""

    def __init__(self, code, align=False, copy=True):
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):  # numpy's dtype state: (version, byte order, ...)
        self.byteorder = state[1]


def _numpy_scalar(dtype, data):
    """Stand-in for numpy's multiarray.scalar(dtype, raw bytes): numeric scalars only."""
    if not (isinstance(dtype, _NumpyDtype) and isinstance(dtype.code, str) and isinstance(data, bytes)):
        raise CheckpointError("refused a numpy scalar that is not (dtype code, raw bytes)")
    dt = np.dtype(dtype.code)
    if dt.kind not in NUMPY_SCALAR_KINDS or dt.itemsize != len(data):
        raise CheckpointError(f"refused a numpy scalar of dtype {dtype.code!r}: only numbers are allowed")
    return np.frombuffer(data, dt.newbyteorder(dtype.byteorder))[0]


def _codecs_encode(text, encoding):
    """Stand-in for _codecs.encode, which protocol-2 pickles use for every bytes object: latin-1 text only."""
    if not (isinstance(text, str) and encoding == "latin1"):
        raise CheckpointError("refused _codecs.encode other than of latin-1 text")
    return text.encode("latin1")


NVIDIA_PICKLE_GLOBALS = {  # everything a snapshot references, each mapped to something that only builds data
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,                    # protocol 3 spells a set this way (protocol 4 needs no global) ...
    "__builtin__.set": set,                 # ... and protocol 2 this way
    "_codecs.encode": _codecs_encode,       # bytes in protocol-2 pickles
    "dnnlib.util.EasyDict": dict,           # NVIDIA's dict with attribute access: its items are what matters
    "numpy.dtype": _NumpyDtype,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray.scalar": _numpy_scalar,  # written by numpy < 2, as in most downloads
    "torch._utils._rebuild_tensor_v2": _nvidia_tensor,
    "torch._utils._rebuild_parameter": _nvidia_parameter,
    "torch._utils._rebuild_parameter_with_state": _nvidia_parameter,
    "torch.storage._load_from_bytes": _nvidia_storage,
    "torch_utils.persistence._reconstruct_persistent_obj": _nvidia_reconstruct,
}


class _NvidiaUnpickler(pickle.Unpickler):
    """Resolves only NVIDIA_PICKLE_GLOBALS, and no persistent ids: it builds data and can call nothing else."""

    def find_class(self, module, name):
        if f"{module}.{name}" in NVIDIA_PICKLE_GLOBALS:
            return NVIDIA_PICKLE_GLOBALS[f"{module}.{name}"]
        if module.startswith("dnnlib.tflib"):
            raise CheckpointError("a TensorFlow-era StyleGAN pickle (dnnlib.tflib): not supported, msgan reads "
                                  "PyTorch snapshots (NVIDIA's stylegan2-ada-pytorch legacy.py converts it)")
        raise CheckpointError(f"refused global {module}.{name}: NVIDIA snapshots need only tensors, numbers and "
                              "NVIDIA's records, and msgan runs no code from a pickle")

    def persistent_load(self, pid):
        raise CheckpointError("refused a persistent id: NVIDIA snapshots have none")


def read_nvidia_pickle(path):
    """The contents of an NVIDIA network pickle as plain data, without running any of it.

    Returns the pickled dict (G, D, G_ema, augment_pipe, training_set_kwargs, ...), with an NvidiaObject for each
    of NVIDIA's persistent objects. Raises CheckpointError for any global outside NVIDIA_PICKLE_GLOBALS.
    """
    try:
        with open(path, "rb") as f:
            return _NvidiaUnpickler(f).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt
        reason = (str(e).splitlines() or ["empty or truncated file"])[0]
        raise CheckpointError(f"{path}: not a readable NVIDIA pickle ({type(e).__name__}: {reason})") from None


def _is_bare_pickle(path):
    """A pickle that torch.save did not write (torch writes a zip archive, or its legacy format): NVIDIA's."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(len(TORCH_LEGACY_HEAD))
    return head.startswith(PICKLE_PROTO) and head != TORCH_LEGACY_HEAD


def nvidia_modules(net, path, prefix="", ancestors=()):
    """(key prefix, record) of net and all its submodules, in the order of torch's state_dict(), each checked to
    be a torch module's state (a pickle can still edit a dict after a record was made from it)."""
    for field, kind in (("_parameters", torch.Tensor), ("_buffers", torch.Tensor), ("_modules", NvidiaObject)):
        items = net.state.get(field)
        if not isinstance(items, dict):
            raise CheckpointError(f"{path}: NVIDIA {net.class_name} {prefix!r}: {field} is not a dict")
        for name, value in items.items():
            if not (isinstance(name, str) and (value is None or isinstance(value, kind))):
                key = prefix + name if isinstance(name, str) else prefix + _short(name)
                raise CheckpointError(f"{path}: NVIDIA {net.class_name}: {key!r} is a {type(value).__name__}, "
                                      f"not a {kind.__name__}")
    if not isinstance(net.state.get("_non_persistent_buffers_set", set()), set) or net in ancestors:
        raise CheckpointError(f"{path}: NVIDIA {net.class_name} {prefix!r} is not a torch module's state")
    yield prefix, net
    for name, child in net.state["_modules"].items():
        if child is not None:
            yield from nvidia_modules(child, path, f"{prefix}{name}.", (*ancestors, net))


def _nvidia_state_dict(net, path):
    """What net.state_dict() would return: each module's parameters, then its persistent buffers."""
    state = {}
    for prefix, module in nvidia_modules(net, path):
        transient = module.state.get("_non_persistent_buffers_set", set())
        buffers = {k: v for k, v in module.state["_buffers"].items() if k not in transient}
        state.update((prefix + k, v) for k, v in {**module.state["_parameters"], **buffers}.items() if v is not None)
    return state


def _check_nvidia_source(net, path, what):
    """msgan never runs the embedded source, so it rebuilds only networks pickled with a source it knows: a
    modified one (a fork, or a tampered file) may compute something else."""
    known = set(NVIDIA_SOURCES) | set(os.environ.get(NVIDIA_SOURCES_ENV, "").replace(",", " ").split())
    for source in {module.module_src for _, module in nvidia_modules(net, path)}:
        digest = _sha256(source.encode("utf-8", "surrogatepass"))
        if digest not in known:
            raise CheckpointError(f"{path}: {what} was pickled with a source (sha256 {digest}) that is not a known "
                                  f"NVIDIA release; msgan never runs it, and rebuilds only code it knows (to accept "
                                  f"this one, add its sha256 to ${NVIDIA_SOURCES_ENV})")


def _nvidia_conv_clamp(net, class_names, path, what, skip=()):
    """The one conv_clamp of the layers of the given classes (None: no clamp), as a plain float."""
    clamps = {module.attr("conv_clamp", path, (numbers.Real, type(None)))
              for prefix, module in nvidia_modules(net, path)
              if module.class_name in class_names and not prefix.endswith(skip)}
    if len(clamps) != 1:
        raise CheckpointError(f"{path}: {what}: layers with different conv_clamp ({sorted(map(str, clamps))}): "
                              "not supported")
    (clamp,) = clamps
    return None if clamp is None else float(clamp)


def _drop_resample_filters(state, path, what):
    """NVIDIA stores its FIR filter in every module that resamples; msgan builds [1, 3, 3, 1] itself: check it."""
    expected = ops.make_blur_kernel()
    for key in [k for k in state if k.endswith("resample_filter")]:
        f = state.pop(key)
        if f.shape != expected.shape or not torch.allclose(f, expected):
            raise CheckpointError(f"{path}: {what}: {key} is not the [1, 3, 3, 1] filter msgan implements")


def _is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0


def _nvidia_block_index(resolution):
    """Block b<r> of NVIDIA's synthesis (r = 8, 16, ...) is msgan's to_rgbs[k], convs[2k] and convs[2k+1], with
    k = log2(r) - 3. Any other r gives -1: its keys are then refused as unexpected keys, named as in the file."""
    r = int(resolution)
    return r.bit_length() - 4 if r >= 8 and _is_power_of_two(r) else -1


# NVIDIA G_ema key -> msgan key, applied in order
NVIDIA_GENERATOR_RULES = [
    (r"mapping\.fc(\d+)\.(weight|bias)", r"mapping.layers.\1.\2"),
    (r"mapping\.w_avg", "w_avg"),
    (r"synthesis\.b4\.const", "synthesis.const"),
    (r"synthesis\.b4\.conv1\.(.*)", r"synthesis.conv1.\1"),
    (r"synthesis\.b4\.torgb\.(.*)", r"synthesis.to_rgb1.\1"),
    (r"synthesis\.b(\d+)\.conv([01])\.(.*)",
     lambda m: f"synthesis.convs.{2 * _nvidia_block_index(m[1]) + int(m[2])}.{m[3]}"),
    (r"synthesis\.b(\d+)\.torgb\.(.*)", lambda m: f"synthesis.to_rgbs.{_nvidia_block_index(m[1])}.{m[2]}"),
    (r"(.*)\.affine\.(weight|bias)", r"\1.conv.modulation.\2"),  # the style FC of each layer
    (r"(synthesis\.(?:conv1|convs\.\d+|to_rgb1|to_rgbs\.\d+))\.weight", r"\1.conv.weight"),
    (r"synthesis\.conv1\.noise_const", "synthesis.noise_const.0"),  # noise buffers, numbered in forward order
    (r"synthesis\.convs\.(\d+)\.noise_const", lambda m: f"synthesis.noise_const.{int(m[1]) + 1}"),
]


def _unsqueeze_nvidia_layouts(state):
    """NVIDIA's const [C, 4, 4], noise_const [r, r] and 0-dim noise_strength -> [1, C, 4, 4], [1, 1, r, r], [1]."""
    for key, value in state.items():
        if key == "synthesis.const":
            state[key] = value[None]
        elif key.startswith("synthesis.noise_const."):
            state[key] = value[None, None]
        elif key.endswith("noise_strength"):
            state[key] = value.flatten()
    return state


def _nvidia_generator(G, path):
    synthesis, mapping = G.child("synthesis"), G.child("mapping")
    if synthesis is None or mapping is None:
        raise CheckpointError(f"{path}: G_ema: an NVIDIA {G.class_name} without mapping and synthesis networks")
    if synthesis.child("input") is not None:  # StyleGAN3's Fourier-feature input layer
        raise CheckpointError(f"{path}: G_ema is a StyleGAN3 (alias-free, config -t/-r) generator: not supported, "
                              "msgan's teacher is StyleGAN2")
    if G.attr("c_dim", path, numbers.Integral):
        raise CheckpointError(f"{path}: G_ema is a conditional generator (c_dim = {G.state['c_dim']}): not "
                              "supported, msgan's networks take no class labels")
    architectures = sorted({block.attr("architecture", path, str) for _, block in nvidia_modules(G, path)
                            if block.class_name == "SynthesisBlock"})
    if architectures != ["skip"]:
        raise CheckpointError(f"{path}: G_ema has the {'/'.join(architectures)!r} architecture: not supported, "
                              "msgan's teacher is StyleGAN2's 'skip' generator (NVIDIA's default)")
    _check_nvidia_source(G, path, "G_ema")
    conv_clamp = _nvidia_conv_clamp(synthesis, ("SynthesisLayer", "ToRGBLayer"), path, "G_ema")

    state = _nvidia_state_dict(G, path)
    _drop_resample_filters(state, path, "G_ema")
    file_keys = {}
    state = _unsqueeze_nvidia_layouts(_rename(state, NVIDIA_GENERATOR_RULES, path, file_keys))
    config = dict(arch="stylegan2", **_mapping_config(state, "mapping.layers.", 0, path, file_keys),
                  conv_clamp=conv_clamp)
    for i in range(config["mapping_layers"]):  # stored weights are N(0, 1) / lr: bring them to msgan's lr
        lr = float(mapping.child(f"fc{i}").attr("bias_gain", path, numbers.Real))  # NVIDIA's: the lr multiplier
        if lr != MAPPING_LR_MUL:
            for name in ("weight", "bias"):
                state[f"mapping.layers.{i}.{name}"] = state[f"mapping.layers.{i}.{name}"] * (lr / MAPPING_LR_MUL)
    config["channels"] = [_shape(state, "synthesis.conv1.conv.weight", 4, path, file_keys)[0]]
    while f"synthesis.convs.{2 * len(config['channels']) - 1}.conv.weight" in state:  # the 2nd conv of each block
        key = f"synthesis.convs.{2 * len(config['channels']) - 1}.conv.weight"
        config["channels"].append(_shape(state, key, 4, path, file_keys)[0])
    _check_generator_config(config, path, "G_ema")
    return NetworkData("generator", config, state, path, "G_ema", file_keys)


def _nvidia_discriminator_rules(img_resolution):
    """NVIDIA D key -> msgan (rosinality) key. b<R>.fromrgb is convs.0, block b<r> is convs.<log2(R/r) + 1>, the
    epilogue b4 is final_conv and final_linear. A block b<r> of any other r becomes convs.-1: an unexpected key."""
    def block(m):
        r = int(m[1])
        return (img_resolution // r).bit_length() if 8 <= r <= img_resolution and _is_power_of_two(r) else -1
    return [
        (r"b\d+\.fromrgb\.weight", "convs.0.0.weight"),
        (r"b\d+\.fromrgb\.bias", "convs.0.1.bias"),
        (r"b(\d+)\.conv0\.weight", lambda m: f"convs.{block(m)}.conv1.0.weight"),
        (r"b(\d+)\.conv0\.bias", lambda m: f"convs.{block(m)}.conv1.1.bias"),
        (r"b(\d+)\.conv1\.weight", lambda m: f"convs.{block(m)}.conv2.1.weight"),  # conv2.0 is the blur
        (r"b(\d+)\.conv1\.bias", lambda m: f"convs.{block(m)}.conv2.2.bias"),
        (r"b(\d+)\.skip\.weight", lambda m: f"convs.{block(m)}.skip.1.weight"),
        (r"b4\.conv\.weight", "final_conv.0.weight"),
        (r"b4\.conv\.bias", "final_conv.1.bias"),
        (r"b4\.fc\.(weight|bias)", r"final_linear.0.\1"),
        (r"b4\.out\.(weight|bias)", r"final_linear.1.\1"),
    ]


def _nvidia_discriminator(D, path):
    if D.attr("c_dim", path, numbers.Integral):
        raise CheckpointError(f"{path}: D is a conditional discriminator (c_dim = {D.state['c_dim']}): not "
                              "supported, msgan's networks take no class labels")
    epilogue = D.child("b4")
    if epilogue is None:
        raise CheckpointError(f"{path}: D: an NVIDIA {D.class_name} without the 4x4 epilogue b4")
    architectures = sorted({block.attr("architecture", path, str) for _, block in nvidia_modules(D, path)
                            if block.class_name in ("DiscriminatorBlock", "DiscriminatorEpilogue")})
    if architectures != ["resnet"]:
        raise CheckpointError(f"{path}: D has the {'/'.join(architectures)!r} architecture: not supported, "
                              "msgan's discriminator is StyleGAN2's 'resnet' (NVIDIA's default)")
    mbstd = epilogue.child("mbstd")
    if mbstd is None:
        raise CheckpointError(f"{path}: D: an NVIDIA {D.class_name} without the minibatch-stddev layer b4.mbstd")
    channels = mbstd.attr("num_channels", path, numbers.Integral)
    group = mbstd.attr("group_size", path, (numbers.Integral, type(None)))
    if channels != 1 or not isinstance(group, int) or group < 1:
        raise CheckpointError(f"{path}: D: b4.mbstd has num_channels {channels} and group_size {group}: only 1 "
                              "channel and a fixed group size are supported")
    _check_nvidia_source(D, path, "D")
    conv_clamp = _nvidia_conv_clamp(D, ("Conv2dLayer",), path, "D", skip="skip.")  # the skip convs are never clamped

    state = _nvidia_state_dict(D, path)
    _drop_resample_filters(state, path, "D")
    blocks = [int(m[1]) for m in (re.match(r"b(\d+)\.", key) for key in state) if m]  # keys b<R>.*, ..., b4.*
    img_resolution = max(blocks, default=0)
    if img_resolution < 4 or not _is_power_of_two(img_resolution):
        raise CheckpointError(f"{path}: D: its blocks b<resolution> give no image resolution (a power of two >= 4)")
    file_keys = {}
    state = _rename(state, _nvidia_discriminator_rules(img_resolution), path, file_keys)
    return _discriminator_from_state(state, path, file_keys, conv_clamp=conv_clamp, stddev_group=group)


def _from_nvidia(snapshot, path, part):
    """G_ema (the generator people sample; G is the raw training copy) or D of an NVIDIA snapshot."""
    name = "D" if part == "discriminator" else "G_ema"
    net = snapshot.get(name) if isinstance(snapshot, dict) else None
    if not isinstance(net, NvidiaObject):
        raise CheckpointError(f"{path}: not an NVIDIA network snapshot (it holds no {name} network)")
    list(nvidia_modules(net, path))  # checks the whole tree before anything reads it
    return _nvidia_discriminator(net, path) if name == "D" else _nvidia_generator(net, path)


# ----------------------------------------------------------------------------------------------
# Pretrained models. "ffhq" is the official MobileStyleGAN FFHQ-1024, which its author ships as OpenVINO IR inside
# the PyPI wheel random-face (Apache-2.0). It is fetched with pip, checked by sha256, and read here with the
# standard library and numpy (OpenVINO itself is never needed); msgan.load imports it once into weights/.

WEIGHTS_DIR = os.environ.get("MSGAN_WEIGHTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights"))
PRETRAINED = {"ffhq": "ffhq.pt", "emoji-teacher": "emoji-teacher.pt", "emoji": "emoji.pt"}
FETCHED = ("ffhq",)  # made on first use; the others ship in weights/
TILING_CACHE = os.path.join(WEIGHTS_DIR, "cache", "tiling.json")  # msgan.tune_tiling
RANDOM_FACE_REQUIREMENT = "random-face==2021.7.21.1"
RANDOM_FACE_WHEEL = "random_face-2021.7.21.1-py3-none-any.whl"
RANDOM_FACE_SHA256 = {
    RANDOM_FACE_WHEEL: "e5d10e2be7df63f06123855ec591ca35dcb1d059eba47ddcb175d7d26b4019b5",
    "random_face/data/MappingNetwork.xml": "73e2096cad6e696e4af47df2477e048ab4c42c0e0dec83c7c66604822689e55b",
    "random_face/data/MappingNetwork.bin": "212dd716bdb556e18db603ea97300d4fa3c872b878c726b2402fea80820e7305",
    "random_face/data/SynthesisNetwork.xml": "7918fce515243954d3e06628cb39a23902d6b1d5d02932cc0c2faee7a2aeeedd",
    "random_face/data/SynthesisNetwork.bin": "c7da15fa22d508c82e1c30dd6b4cdf67fe3ccdddaf85b310ee764dbf0c289645",
}
FFHQ_CONFIG = dict(arch="mobilestylegan", z_dim=512, w_dim=512, mapping_layers=8,
                   channels=[512, 512, 512, 512, 512, 256, 128, 64], folded=True)


def pretrained_file(name):
    """Where the pretrained model `name` lives; a shipped one that is missing is an error."""
    path = os.path.join(WEIGHTS_DIR, PRETRAINED[name])
    if not os.path.isfile(path) and name not in FETCHED:
        raise CheckpointError(f"{path}: missing; it ships with msgan (restore it with `git checkout weights/`)")
    return path


def fetch_random_face_wheel(cache_dir=None):
    """The random-face wheel in cache_dir (default: WEIGHTS_DIR/cache), downloaded with pip (no dependencies)
    unless cached intact.

    Several processes may run this at once: each downloads into its own temp folder and renames the checked wheel
    into place, so the cache only ever holds a whole file.
    """
    cache_dir = cache_dir or os.path.join(WEIGHTS_DIR, "cache")
    wheel = os.path.join(cache_dir, RANDOM_FACE_WHEEL)
    expected = RANDOM_FACE_SHA256[RANDOM_FACE_WHEEL]
    try:
        with open(wheel, "rb") as f:
            if _sha256(f.read()) == expected:
                return wheel
        os.unlink(wheel)  # a corrupt, partial or tampered cache entry: fetch it again
    except FileNotFoundError:
        pass  # not cached, or another process dropped the bad copy first
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "-d", tmp, RANDOM_FACE_REQUIREMENT]
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, RANDOM_FACE_WHEEL)
            if result.returncode != 0 or not os.path.isfile(got):
                reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise DownloadError(f"could not download {RANDOM_FACE_REQUIREMENT} with pip ({reason}); "
                                    f"with no network, put {RANDOM_FACE_WHEEL} into {cache_dir}")
            with open(got, "rb") as f:
                if _sha256(f.read()) != expected:
                    raise DownloadError(f"{RANDOM_FACE_WHEEL}: sha256 mismatch, refusing to use it: your package "
                                        f"index serves another file under this name; put the wheel from pypi.org "
                                        f"(sha256 {expected}) into {cache_dir}")
            os.replace(got, wheel)
    except OSError as e:
        raise DownloadError(f"{cache_dir}: cannot write the download there ({e.strerror or e}); make it writable, or "
                            f"set MSGAN_WEIGHTS to a writable folder") from None
    return wheel


def random_face_ir(wheel):
    """{file name: bytes} of the four OpenVINO IR files in the random-face wheel, each checked against its
    published sha256, so a damaged or edited wheel raises DownloadError and is never read as a network."""
    redo = "delete it, and msgan.load('ffhq') downloads the published wheel again"
    try:
        with zipfile.ZipFile(wheel) as zf:
            files = {name: zf.read(name) for name in RANDOM_FACE_SHA256 if name.startswith("random_face/")}
    except Exception as e:  # a damaged zip raises many types (BadZipFile, zlib.error, EOFError, KeyError, ...)
        raise DownloadError(f"{wheel}: not an intact random-face wheel ({_first_line(e)}); {redo}") from None
    for name, data in files.items():
        if _sha256(data) != RANDOM_FACE_SHA256[name]:
            raise DownloadError(f"{wheel}: {name}: sha256 mismatch, the wheel was modified; {redo}")
    return {os.path.basename(name): data for name, data in files.items()}


class _OpenVinoIR:
    """Just enough of an OpenVINO IR (v10) graph: layers, data edges and the payload of Const layers."""

    def __init__(self, xml_bytes, bin_bytes):
        root = ElementTree.fromstring(xml_bytes)
        self.bin = bin_bytes
        self.layers = {layer.get("id"): layer for layer in root.find("layers")}
        self.by_name = {layer.get("name"): layer.get("id") for layer in root.find("layers")}
        self.inputs, self.users = {}, {}  # layer -> {port: source layer}, layer -> [consumer layers]
        for edge in root.find("edges"):
            src, dst = edge.get("from-layer"), edge.get("to-layer")
            self.inputs.setdefault(dst, {})[int(edge.get("to-port"))] = src
            self.users.setdefault(src, []).append(dst)

    def type(self, layer):
        return self.layers[layer].get("type")

    def args(self, layer):
        return [src for _, src in sorted(self.inputs[layer].items())]

    def arg_of_type(self, layer, type_):
        (found,) = [a for a in self.args(layer) if self.type(a) == type_]
        return found

    def next_of_type(self, layer, type_):
        """Breadth-first along the data flow: the nearest consumer of the given type."""
        queue = list(self.users.get(layer, []))
        while queue:
            cur = queue.pop(0)
            if self.type(cur) == type_:
                return cur
            queue += self.users.get(cur, [])
        raise ValueError(f"no {type_} after layer {layer}")

    def const(self, layer):
        if isinstance(layer, str) and layer not in self.layers:
            layer = self.by_name[layer]
        data = self.layers[layer].find("data").attrib
        if self.type(layer) != "Const" or data["element_type"] != "f32":
            raise ValueError(f"IR layer {layer} is not a float32 Const")
        shape = [int(d) for d in data["shape"].split(",")] if data["shape"].strip() else []
        array = np.frombuffer(self.bin, np.float32, math.prod(shape), int(data["offset"]))
        return torch.from_numpy(array.reshape(shape).copy())


def _import_mapping(ir, w_dim):
    """8 x (MatMul -> Add(Reshape(bias)) -> PReLU -> x sqrt2): weights folded with the EqualLinear scales."""
    state, layer = {}, ir.by_name["var"]
    weight_scale = torch.tensor(MAPPING_LR_MUL / math.sqrt(w_dim), dtype=torch.float32)
    for k in range(FFHQ_CONFIG["mapping_layers"]):
        layer = ir.next_of_type(layer, "MatMul")
        bias_add = ir.next_of_type(layer, "Add")
        bias = ir.args(bias_add)[1]
        bias = ir.args(bias)[0] if ir.type(bias) == "Reshape" else bias
        state[f"mapping.layers.{k}.weight"] = ir.const(ir.args(layer)[1]) / weight_scale  # back to raw N(0,1)/lr_mul
        state[f"mapping.layers.{k}.bias"] = ir.const(bias) / torch.tensor(MAPPING_LR_MUL)
    return state


def _import_modulation(ir, official, ours, state):
    state[f"{ours}.modulation.weight"] = ir.const(f"m.{official}.modulation.weight")
    state[f"{ours}.modulation.bias"] = ir.const(f"m.{official}.modulation.bias").flatten()  # stored [1, C]


def _import_styled_conv(ir, official, ours, state):
    """One styled conv: bias and modulation by name; the folded weight and noise sit next to the bias."""
    bias = ir.by_name[f"m.{official}.bias"]
    noise_add = next(a for a in ir.args(ir.users[bias][0]) if a != bias)   # (conv + noise) + bias
    conv = ir.arg_of_type(noise_add, "Convolution")
    noise = ir.const(ir.arg_of_type(noise_add, "Const"))  # noise_strength * noise, baked by the tracer
    strength = noise.std(unbiased=False)                  # any positive split is exact; this one keeps
    state[f"{ours}.noise_strength"] = strength.reshape(1)  # noise_mode="random" at the original strength
    state[f"{ours}.conv.weight"] = ir.const(ir.args(conv)[1])
    state[f"{ours}.bias"] = ir.const(bias).flatten()
    _import_modulation(ir, f"{official}.conv", f"{ours}.conv", state)
    if f"m.{official}.conv.weight_dw" in ir.by_name:
        state[f"{ours}.conv.weight_dw"] = ir.const(f"m.{official}.conv.weight_dw").flatten(1, 2)  # [C,1,1,k,k]
    return noise / strength


def import_random_face(wheel):
    """The FFHQ-1024 Generator (folded student + mapping) in the random-face wheel's IR, as NetworkData.

    The IR holds what makes the final image: the student's other wavelet heads (which only feed the distillation
    loss) are zero, and w_avg, which the IR lacks, is left to the network (msgan.build computes it).
    """
    files = random_face_ir(wheel)
    mapping = _OpenVinoIR(files["MappingNetwork.xml"], files["MappingNetwork.bin"])
    ir = _OpenVinoIR(files["SynthesisNetwork.xml"], files["SynthesisNetwork.bin"])
    blocks = len(FFHQ_CONFIG["channels"]) - 1
    state = _import_mapping(mapping, FFHQ_CONFIG["w_dim"])
    state["synthesis.const"] = ir.const("m.input.input")
    convs = [("conv1", "conv1")] + [(f"layers.{i}.conv{j}", f"blocks.{i}.conv{j}")
                                    for i in range(blocks) for j in (1, 2)]
    for index, (official, ours) in enumerate(convs):
        state[f"synthesis.noise_const.{index}"] = _import_styled_conv(ir, official, f"synthesis.{ours}", state)
    for i in range(blocks):
        _import_modulation(ir, f"layers.{i}.up", f"synthesis.blocks.{i}.up", state)
    head = f"synthesis.blocks.{blocks - 1}.to_wavelets"  # the only wavelet head that makes the image
    _import_modulation(ir, f"layers.{blocks - 1}.to_img.conv", f"{head}.conv", state)
    state[f"{head}.conv.weight"] = ir.const(f"m.layers.{blocks - 1}.to_img.conv.weight")
    state[f"{head}.bias"] = ir.const(f"m.layers.{blocks - 1}.to_img.bias").flatten()
    unused_heads = ("synthesis.to_wavelets1.", *(f"synthesis.blocks.{i}.to_wavelets." for i in range(blocks - 1)))
    return NetworkData("generator", dict(FFHQ_CONFIG), state, wheel, "random-face import", own=("w_avg",),
                       zeros=unused_heads)
