"""msgan's tests, ordered as the files import each other: ops.py, msgan.py, formats.py, then each script.

    python -m pytest -q test_msgan.py                  # everything (2-4 minutes on 2 CPU cores)
    python -m pytest -q test_msgan.py -k "nvidia"      # one part

Golden data: ../shared/reference (its READMEs, mobilestylegan_reference_public.md and
discriminator_and_loss_public.md among them, say what every stored tensor is and the exact call that produced it).
Every checkpoint is written to a temporary folder with torch.save and read back through msgan.load, as a user would.

Sections, top to bottom:
    helpers and fixtures         shared by the sections below
    ops.py                       Haar wavelets, upfirdn2d, grid sampling, bias + leaky ReLU, in-place forms, CUDA kernels
    msgan.py                     teacher, student and its inference path, W+ and noise, discriminator and GAN
                                 losses, distillation losses and augmentation
    formats.py                   msgan's format, NVIDIA pickles, the FFHQ import, the loaders' guarantees one by
                                 one, atomic writes and PNG
    sample.py, export.py, fid.py, train.py (distillation, then teacher training)
    the shipped emoji models     offline, through every command
    every command line           bad counts, unusable folders, Ctrl-C
    hostile inputs               a seeded corpus of 400+ broken and malicious files against every loader
"""
import argparse
import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import pickle
import pickletools
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import demo
import export
import fid
import formats
import msgan
import ops
import sample
import train

REF = Path(__file__).resolve().parent.parent / "shared" / "reference"
TOL = 1e-4          # max-abs tolerance of a float32 re-implementation (see the reference's "Numerical tolerance")
D_TOL = 1e-5        # discriminator logits and losses are small, well-conditioned numbers
NUM_BLOCKS = 3      # the reference student: 4x4 conv + 3 blocks (8, 16, 32) + final IDWT -> 64x64
UPFIRDN2D_CASES = ["upsample_x2", "blur_after_conv_transpose", "disc_blur_k3", "disc_blur_k1_skip",
                   "downsample_x2", "down2_pad22", "down2_pad11", "asym_kernel_up2", "asym_kernel_general",
                   "asym_kernel_negpad"]
FFHQ_REF = REF / "ffhq_openvino" / "ffhq_public.npz"
FFHQ_TOL = 1e-3  # OpenVINO's own CPU arithmetic is the reference
FID_REF = REF / "fid"
FID_PY = Path(__file__).resolve().parent / "fid.py"
FID_WEIGHTS_SEED = 1000
FID_ATOL = FID_RTOL = 1e-4  # float32 activations on another CPU than the one that made the data
NV_PKL = REF / "nvlabs" / "nvlabs_public.pkl"
REPO = Path(__file__).resolve().parent
TRAIN_PY = REPO / "train.py"
QUICK = ["--batch", "4", "--log-every", "2", "--val-samples", "8"]
MODELS = ["student", "teacher"]
BATCHES = (1, 3)    # every graph is exported once and run at both: the batch axis must be dynamic


def assert_max_abs(actual, expected, tol=TOL, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    err = (actual.detach() - expected).abs().max().item()
    assert err <= tol, f"{what}: max |diff| = {err:.3g} > {tol:g}"


def assert_rel(actual, expected, rel):
    actual, expected = float(torch.as_tensor(actual).detach()), float(expected)
    assert abs(actual - expected) <= rel * abs(expected), f"{actual!r} vs {expected!r} (rel tol {rel:g})"


def contains_shape(message, shape):
    """Whether an error message spells out `shape` ("[3, 5]", "(3, 5)", "3x5", torch.Size([3, 5]), ...)."""
    dims = r"\s*[,x×]\s*".join(str(d) for d in shape)
    return re.search(rf"(?<![\d.]){dims}(?![\d.])", message) is not None


def max_abs(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max())


def leftovers(folder):
    """Anything export.py must never leave behind: its staging folders."""
    return [name for name in os.listdir(folder) if name.startswith(".tmp")]


def png(path):
    return np.asarray(Image.open(path))


def load_reference(name):
    path = REF / name
    if not path.is_file():
        pytest.fail(f"golden reference {path} is missing: the tests need ../shared/reference next to this repo")
    return torch.load(path, weights_only=True)


def import_wheel(wheel):
    """The FFHQ model of a random-face wheel, imported as msgan.load("ffhq") imports it."""
    return msgan.build(formats.import_random_face(wheel))


def const_noise(G):
    """The generator's stored "const" noise buffers, in forward order."""
    state = G.synthesis.state_dict()
    keys = sorted((k for k in state if k.startswith("noise_const.")), key=lambda k: int(k.split(".")[-1]))
    return [state[k] for k in keys]


def run_sample(*args):
    return sample.main([str(a) for a in args])


def run_train(*args):
    return train.main([str(a) for a in args])


@pytest.fixture(scope="module")
def make_weights():
    spec = importlib.util.spec_from_file_location("make_weights", FID_REF / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Fixtures: the CPU for every test not marked gpu, the reference data (loaded once), checkpoints written to a
# temporary folder, small models


REAL_CUDA_CHECK = torch.cuda.is_available
HAS_CUDA = REAL_CUDA_CHECK()  # read once, before cpu_everywhere hides the device
USER_CUDA_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="session", autouse=True)
def cpu_everywhere():
    """Every script defaults to --device cuda where there is a GPU. The tests compare with the CPU's golden data and
    exact figures, so on a GPU machine too they run on the CPU, in this process and in the processes they start;
    only the tests marked gpu see the device (see show_the_gpu)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(autouse=True)
def show_the_gpu(request, monkeypatch):
    if "gpu" in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", REAL_CUDA_CHECK)
        if USER_CUDA_DEVICES is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", USER_CUDA_DEVICES)


def test_tests_run_on_the_cpu_unless_marked_gpu():
    assert not torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert train.parse_args([])[0].device == train.project_parser().parse_args(["photo.png"]).device == "cpu"


@pytest.fixture(scope="module")
def ref():
    return load_reference("mobilestylegan_reference_public.pt")


@pytest.fixture(scope="module")
def dref():
    return load_reference("discriminator_and_loss_public.pt")["discriminator"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, ref, dref):
    """The reference checkpoints as files: rosinality generator, official MobileStyleGAN, rosinality training."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.save(ref["rosinality"]["checkpoint"], folder / "rosinality.pt")
    torch.save(ref["mobilestylegan"]["checkpoint"], folder / "official.pt")
    torch.save({"g_ema": ref["rosinality"]["checkpoint"]["g_ema"], "d": dref["checkpoint"]["d"]},
               folder / "rosinality_train.pt")
    return folder


@pytest.fixture(scope="module")
def teacher(ckpt_dir):
    return msgan.load(ckpt_dir / "rosinality.pt")


@pytest.fixture(scope="module")
def student(ckpt_dir):
    return msgan.load(ckpt_dir / "official.pt")


@pytest.fixture(scope="module")
def D(ckpt_dir):
    return msgan.load(ckpt_dir / "rosinality_train.pt", part="discriminator")


@pytest.fixture(scope="module")
def r(ref):
    """Shortcut: rosinality inputs and outputs (no name is both)."""
    inputs, outputs = ref["rosinality"]["inputs"], ref["rosinality"]["outputs"]
    assert not set(inputs) & set(outputs)
    return {**inputs, **outputs}


@pytest.fixture(scope="module")
def mi(ref):
    """Shortcut: official MobileStyleGAN inputs."""
    return ref["mobilestylegan"]["inputs"]


@pytest.fixture(scope="module")
def mo(ref):
    """Shortcut: official MobileStyleGAN outputs."""
    return ref["mobilestylegan"]["outputs"]


@pytest.fixture(scope="module")
def student_noise(mi):
    """The official noise [n4, cat(n8a, n8b), ...] as msgan's list: one [1, 1, S, S] map per styled conv."""
    noise = mi["noise"]
    return [noise[0]] + [n[j:j + 1] for n in noise[1:] for j in (0, 1)]


@pytest.fixture(scope="module")
def ffhq():
    return msgan.load("ffhq")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random StyleGAN2 teacher at 16x16 (widths 32, 16, 16) saved as a msgan checkpoint."""
    torch.manual_seed(0)
    G = msgan.Generator(dict(arch="stylegan2", z_dim=16, w_dim=16, mapping_layers=2, channels=[32, 16, 16]))
    G.compute_w_avg()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    msgan.save(path, generator=G)
    return path


@pytest.fixture(scope="module")
def distill_ref():
    return load_reference("discriminator_and_loss_public.pt")["distill"]


@pytest.fixture(scope="module")
def nv():
    return load_reference("nvlabs/nvlabs_public_expected.pt")


@pytest.fixture(scope="module", params=["pickle", "saved"])
def nv_nets(request, tmp_path_factory):
    """(G, D) read from NVIDIA's pickle by msgan.load, and the same after msgan.save + msgan.load (no pickle)."""
    G, D = msgan.load(NV_PKL), msgan.load(NV_PKL, part="discriminator")
    if request.param == "saved":
        path = tmp_path_factory.mktemp("nvlabs") / "imported.pt"
        msgan.save(path, generator=G, discriminator=D)
        G, D = msgan.load(path), msgan.load(path, part="discriminator")
    return G, D


# Writing NVIDIA-style pickles for the NVIDIA tests: read_nvidia_pickle's data, pickled with each NvidiaObject as a
# call of torch_utils.persistence._reconstruct_persistent_obj(meta), which is how NVIDIA's persistence writes it.

@pytest.fixture
def nvidia_pickler(monkeypatch):
    """write(snapshot, path, protocol) -> path. Only the function's name goes into the file; it is never called."""
    persistence = types.ModuleType("torch_utils.persistence")

    def reconstruct(meta):
        raise AssertionError("never called: pickling only records the name")
    reconstruct.__module__, reconstruct.__qualname__ = persistence.__name__, "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = reconstruct
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, formats.NvidiaObject):
                return reconstruct, (dict(type="class", version=6, module_src=obj.module_src,
                                          class_name=obj.class_name, state=obj.state),)
            return NotImplemented

    def write(snapshot, path, protocol=4):
        with open(path, "wb") as f:
            Pickler(f, protocol=protocol).dump(snapshot)
        return path
    return write


@pytest.fixture(scope="module")
def random_face_wheel():
    return formats.fetch_random_face_wheel(os.path.join(formats.WEIGHTS_DIR, "cache"))


@pytest.fixture(scope="module")
def inception_sd(make_weights):
    return make_weights.make_state_dict(str(FID_REF / "inception_fid_manifest.json"), FID_WEIGHTS_SEED)


@pytest.fixture(scope="module")
def inception(inception_sd):
    return fid.load_matching(fid.InceptionV3(), inception_sd).eval()


@pytest.fixture(scope="module")
def inception_file(inception_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception_synthetic.pt"
    torch.save(inception_sd, path)
    return path


@pytest.fixture(scope="module")
def vgg(make_weights):
    sd = make_weights.make_state_dict(str(FID_REF / "vgg16_manifest.json"), FID_WEIGHTS_SEED, prefix="features.")
    return fid.load_matching(fid.VGG16(), sd).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The golden checkpoints as files: the official student and the rosinality teacher."""
    ref = torch.load(REF / "mobilestylegan_reference_public.pt", weights_only=True)
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.save(ref["mobilestylegan"]["checkpoint"], folder / "student.pt")
    torch.save(ref["rosinality"]["checkpoint"], folder / "teacher.pt")
    return folder


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """exported(model, *flags) -> the output folder of `export.py onnx --model <model> --wplus *flags` (cached)."""
    cache = {}

    def get(model, *flags):
        if (model, flags) not in cache:
            outdir = tmp_path_factory.mktemp(f"onnx-{model}")
            export.main(["onnx", "--model", str(ckpts / f"{model}.pt"), "--outdir", str(outdir), "--wplus", *flags])
            cache[model, flags] = outdir
        return cache[model, flags]
    return get


@pytest.fixture(scope="module")
def demo_server_object():
    """demo.py's server for the shipped emoji student beside its teacher, in-process on a free port."""
    server = demo.start(argparse.Namespace(model="emoji", compare="emoji-teacher", host="127.0.0.1", port=0,
                                           device="cpu", w=None, bf16=False))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def demo_server(demo_server_object):
    return demo_server_object.url


# ----------------------------------------------------------------------------------------------
# ops.py: Haar wavelets, upfirdn2d, grid sampling, fused bias + leaky ReLU, the in-place forms, the optional CUDA kernels


def test_haar_dwt_matches_pytorch_wavelets(ref):
    h = ref["haar"]
    low, high = ops.haar_dwt(h["x"])
    assert_max_abs(low, h["yl"], 1e-6)
    assert_max_abs(high, h["yh0"], 1e-6)


def test_wavelets_to_img_is_the_inverse_haar_of_pytorch_wavelets(ref):
    h = ref["haar"]
    for low, high, img in ((h["yl"], h["yh0"], h["recon"]), (h["synth_low"], h["synth_high"], h["synth_out"])):
        assert_max_abs(ops.wavelets_to_img(torch.cat([low, high.flatten(1, 2)], dim=1)), img, 1e-6)


def test_wavelets_to_img_matches_dwt_to_img_and_img_to_wavelets_inverts_it(ref):
    h = ref["haar"]
    img = ops.wavelets_to_img(h["packed12"])
    assert_max_abs(img, h["packed12_img"], 1e-6)
    assert_max_abs(ops.img_to_wavelets(img), h["packed12"], 1e-6)
    assert_max_abs(ops.wavelets_to_img(ops.img_to_wavelets(h["x"])), h["x"], 1e-6)


def test_reference_holds_exactly_these_upfirdn2d_cases(ref):
    assert [case["name"] for case in ref["upfirdn2d"]] == UPFIRDN2D_CASES


@pytest.mark.parametrize("name", UPFIRDN2D_CASES)
def test_upfirdn2d_matches_rosinality(ref, name):
    (case,) = [c for c in ref["upfirdn2d"] if c["name"] == name]
    assert case["pad_order"] == "(pad_x0, pad_x1, pad_y0, pad_y1)"
    out = ops.upfirdn2d(case["input"], case["kernel"], up=case["up"], down=case["down"], pad=tuple(case["pad"]))
    assert_max_abs(out, case["output"], 1e-5)


@pytest.mark.parametrize("H, W, kernel, up, down, pad", [
    (8, 8, (4, 4), 2, 1, (2, 1, 2, 1)),   # ToRGB's skip upsampling
    (9, 9, (4, 4), 1, 1, (1, 1, 1, 1)),   # the blur after a transposed conv
    (8, 8, (4, 4), 1, 2, (1, 1, 1, 1)),   # the discriminator's downsampling
    (6, 7, (2, 3), 3, 2, (-1, 2, 0, 1)),  # odd sizes, crops
])
def test_upfirdn2d_gradient_is_an_upfirdn2d(H, W, kernel, up, down, pad):
    """The CUDA path's backward (and double backward) is upfirdn2d again, with upfirdn2d_grad_args: the
    transpose of the op, checked here against autograd through the reference."""
    g = torch.Generator().manual_seed(H)
    x = torch.randn(2, 3, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(*kernel, dtype=torch.float64, generator=g)
    y = ops.upfirdn2d_reference(x, k, up, down, pad)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(grad)
    g_up, g_down, g_pad = ops.upfirdn2d_grad_args(x.shape, k.shape, up, down, pad)
    assert_max_abs(ops.upfirdn2d_reference(grad, k.flip(0, 1), g_up, g_down, g_pad), x.grad, 1e-12)



def test_grid_sample_is_a_linear_map_and_its_first_two_derivatives_are_its_transpose_and_itself():
    """ops.grid_sample writes its backward (and that backward's backward) itself, since PyTorch's CUDA grid sampler
    has no second derivative. At a fixed grid the op is a matrix A (built here column by column from PyTorch's
    sampler); the three orders through autograd match A x, A^T and A (R1's order) as plain matrix products."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 6, 5)
    theta = torch.tensor([[0.9, 0.2, 0.05], [-0.2, 0.8, 0.1]], dtype=torch.float64).expand(2, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, shape, align_corners=False)
    basis = torch.eye(math.prod(shape), dtype=torch.float64).view(-1, *shape)
    A = torch.stack([ops.grid_sample_reference(e, grid).flatten() for e in basis], dim=1)  # [out, in]
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(A.shape[0], dtype=torch.float64, generator=g)

    def orders(sample):
        y = sample(x).flatten()
        (dx,) = torch.autograd.grad((y.square() * weight).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), x)
        return y, dx, ddx
    for got, want in zip(orders(lambda t: ops.grid_sample(t, grid)), orders(lambda t: A @ t.flatten())):
        assert_max_abs(got, want, 1e-12)
    assert torch.equal(ops.grid_sample(x, grid), ops.grid_sample_reference(x, grid))  # the same forward


def test_bias_leaky_relu_matches_fused_leaky_relu(ref):
    f = ref["fused_leaky_relu"]
    assert_max_abs(ops.bias_leaky_relu(f["x4d"], f["bias4d"]), f["out4d"], 1e-6)
    assert_max_abs(ops.bias_leaky_relu(f["x2d"], f["bias2d"]), f["out2d"], 1e-6)
    assert_max_abs(ops.bias_leaky_relu(f["x4d"]), f["out4d_nobias"], 1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_inplace_ops_match_their_reference(memory_format):
    """The inference forms of the IDWT and of the depthwise-separable modulated conv against the reference ops;
    the output keeps the input's memory format."""
    g = torch.Generator().manual_seed(0)
    packed, scale = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 32, generator=g)
    expected = ops.wavelets_to_img(packed * scale[:, :, None, None])
    got = ops.wavelets_to_img_inplace(packed.contiguous(memory_format=memory_format), scale)
    assert_max_abs(got, expected, 1e-6)
    assert got.is_contiguous(memory_format=memory_format)
    x, styles = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, generator=g)
    weight, weight_dw, bias = (torch.randn(24, 16, 1, 1, generator=g), torch.randn(16, 1, 3, 3, generator=g),
                               torch.randn(24, generator=g))
    expected = ops.mobile_modulated_conv2d(x, weight, styles, weight_dw=weight_dw) + bias[:, None, None]
    x_in = x.contiguous(memory_format=memory_format)
    got = ops.mobile_modulated_conv2d_inplace(x_in, weight, styles, weight_dw, bias)
    assert_max_abs(got, expected, 1e-5)
    assert torch.equal(x_in, x)  # with a depthwise conv the input is left alone
    assert got.is_contiguous(memory_format=memory_format)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """Without a GPU, the kernels' CUDA source at least compiles (the torch binding needs a CUDA build of torch)."""
    source = tmp_path / "msgan_ops.cu"
    source.write_text(ops.CUDA_SOURCE)
    result = subprocess.run(["nvcc", "-c", "-O3", "-o", str(tmp_path / "msgan_ops.o"), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "msgan_ops.o").stat().st_size > 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernels_match_the_reference_ops():
    """On a GPU: values, gradients and second-order gradients of the kernels against the reference ops."""
    assert all(" ok " in line for line in ops.check_cuda_kernels(timing_runs=1))


def test_cuda_kernels_fall_back_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken_build(*args, **kwargs):
        raise OSError("nvcc: not found")
    monkeypatch.setattr(cpp_extension, "load_inline", broken_build)
    ops.cuda_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"CUDA kernels unavailable \(OSError: nvcc: not found\)") as record:
            assert ops.cuda_kernels() is None and ops.cuda_kernels() is None  # built (and warned) once
        assert len(record) == 1
        ops.cuda_kernels.cache_clear()
        monkeypatch.setenv("MSGAN_CUDA_KERNELS", "0")
        assert ops.cuda_kernels() is None  # off: no build attempted, no warning
    finally:
        ops.cuda_kernels.cache_clear()


def test_huge_pages_are_asked_for_unless_the_user_said_otherwise(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    ops.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    ops.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


# ----------------------------------------------------------------------------------------------
# msgan.py: the teacher, as rosinality's Generator


@torch.no_grad()
def test_teacher_mapping_matches_rosinality(teacher, r):
    assert_max_abs(teacher.mapping(r["z"]), r["w"])


@torch.no_grad()
def test_teacher_img_z_with_reference_noise(teacher, r):
    assert_max_abs(teacher.synthesis(teacher.mapping(r["z"]), noise=r["noise"]), r["img_z"])


@torch.no_grad()
def test_teacher_const_noise_is_the_checkpoint_noise(teacher, r):
    assert_max_abs(teacher(r["z"], noise_mode="const"), r["img_z"])


@torch.no_grad()
def test_teacher_truncation_around_latent_avg(teacher, r, ref):
    assert torch.equal(teacher.w_avg, ref["rosinality"]["checkpoint"]["latent_avg"])
    assert torch.equal(teacher.w_avg[None], r["truncation_latent"])
    w = teacher.truncate(teacher.mapping(r["z"]), r["truncation"])
    assert_max_abs(w[:, None].expand(-1, teacher.num_ws, -1), r["latent_z_trunc"])
    assert_max_abs(teacher(r["z"], psi=r["truncation"]), r["img_z_trunc"])


@torch.no_grad()
def test_teacher_wplus(teacher, r):
    assert_max_abs(teacher.synthesis(r["wplus"], noise=r["noise"]), r["img_wplus"])


@torch.no_grad()
def test_teacher_wplus_truncated(teacher, r):
    ws = teacher.truncate(r["wplus"], r["truncation"])
    assert_max_abs(teacher.synthesis(ws, noise=r["noise"]), r["img_wplus_trunc"])


@torch.no_grad()
def test_teacher_style_mixing(teacher, r):
    """W+ slots < inject_index from mapping(z), the rest from mapping(z2)."""
    cut = r["inject_index"]
    w1, w2 = teacher.mapping(r["z"]), teacher.mapping(r["z2"])
    ws = torch.cat([w1[:, None].expand(-1, cut, -1), w2[:, None].expand(-1, teacher.num_ws - cut, -1)], dim=1)
    assert_max_abs(ws, r["latent_mix"])
    assert_max_abs(teacher.synthesis(ws, noise=r["noise"]), r["img_mix"])


# ----------------------------------------------------------------------------------------------
# msgan.py: the student, as the official MobileSynthesisNetwork, and its inference path


@torch.no_grad()
def test_student_mapping_matches_official(student, mi, mo):
    assert_max_abs(student.mapping(mi["z"]), mi["w"])
    assert torch.equal(mo["w_from_z"], mi["w"])


@torch.no_grad()
def test_student_single_w_img_and_every_freq(student, mi, mo, student_noise):
    img, freq = student.synthesis(mi["w"], noise=student_noise, return_freq=True)
    assert_max_abs(img, mo["single_w"]["img"], what="img")
    assert len(freq) == len(mo["single_w"]["freq"]) == NUM_BLOCKS + 1
    for k, (got, expected) in enumerate(zip(freq, mo["single_w"]["freq"])):
        assert_max_abs(got, expected, what=f"freq[{k}]")
    assert torch.equal(student.synthesis(mi["w"], noise=student_noise), img)  # same img without return_freq


@torch.no_grad()
def test_student_official_wplus_img_and_every_freq(student, mi, mo, student_noise):
    img, freq = student.synthesis(mi["wplus"], noise=student_noise, return_freq=True, ws_layout="official")
    assert_max_abs(img, mo["wplus"]["img"], what="img")
    assert len(freq) == len(mo["wplus"]["freq"]) == NUM_BLOCKS + 1
    for k, (got, expected) in enumerate(zip(freq, mo["wplus"]["freq"])):
        assert_max_abs(got, expected, what=f"freq[{k}]")


@torch.no_grad()
def test_student_distiller_truncation(student, ref, mi, mo, student_noise):
    """Distiller.forward(truncated=True): style_mean + 0.5 * (mapping(z) - style_mean), official W+ layout."""
    style_mean = ref["mobilestylegan"]["checkpoint"]["state_dict"]["style_mean"]  # [1, 11, 64]
    assert torch.equal(student.w_avg, style_mean[0, 0])
    assert torch.equal(student.w_avg, ref["rosinality"]["checkpoint"]["latent_avg"])
    expected = mo["distiller_truncated_b1"]
    w = student.mapping(mi["z_distiller_b1"])
    ws = student.truncate(w[:, None].expand(-1, style_mean.shape[1], -1), 0.5)
    assert_max_abs(ws, expected["style"], what="style")
    assert_max_abs(student.synthesis(ws, noise=student_noise, ws_layout="official"), expected["img"], what="img")


@torch.no_grad()
def test_official_checkpoint_teacher_is_rosinality(ckpt_dir, r, ref):
    G = msgan.load(ckpt_dir / "official.pt", part="teacher")
    assert not G.is_student
    assert torch.equal(G.w_avg, ref["rosinality"]["checkpoint"]["latent_avg"])
    assert_max_abs(G.synthesis(G.mapping(r["z"]), noise=r["noise"]), r["img_z"])


@torch.no_grad()
def test_fold_keeps_outputs_and_survives_save_load(ckpt_dir, tmp_path, mi, student_noise):
    G = msgan.load(ckpt_dir / "official.pt")  # a fresh copy: folding changes the module in place

    def run(G):
        return G.synthesis(mi["wplus"], noise=student_noise, return_freq=True, ws_layout="official")

    before_img, before_freq = run(G)
    assert G.fold() is G
    assert not any(k.endswith("style_inv") for k in G.state_dict())  # demodulation now lives in the weights
    after_img, after_freq = run(G)
    for k, (before, after) in enumerate(zip([before_img] + before_freq, [after_img] + after_freq)):
        assert_max_abs(after, before, 1e-5 * before.abs().max().item(), what=f"output {k}")

    msgan.save(tmp_path / "folded.pt", generator=G)
    img2, freq2 = run(msgan.load(tmp_path / "folded.pt"))
    assert torch.equal(img2, after_img)
    assert all(torch.equal(a, b) for a, b in zip(freq2, after_freq))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("noise_mode", ["const", "given", "none"])
@pytest.mark.parametrize("ws_layout", ["standard", "official"])
@pytest.mark.parametrize("tile_bytes", [msgan.TILE_BYTES, 5000, 1])
def test_inference_path_matches_the_reference_path(ckpt_dir, batch, noise_mode, ws_layout, tile_bytes):
    """A folded student under no_grad takes forward_inference (channels-last, in-place ops, blocks in tiles): the
    same image as forward_reference to float32 rounding, and its inputs untouched. With autograd on, the reference
    runs. This small network fits one tile per block at the default size; smaller tiles make strips of a few rows
    (5000 bytes) or of one row (1 byte), one sample at a time, whose halo rows must reproduce the whole map."""
    G = msgan.load(ckpt_dir / "official.pt").fold()
    S = G.synthesis
    S.tile_bytes = tile_bytes
    g = torch.Generator().manual_seed(batch)
    num_ws = S.num_ws if ws_layout == "standard" else S.num_ws_official
    ws = torch.randn(batch, num_ws, G.w_dim, generator=g)
    noise = ([torch.randn(batch, 1, r, r, generator=g) for r in S.noise_resolutions] if noise_mode == "given"
             else None)
    mode = "const" if noise_mode == "given" else noise_mode
    inputs = [ws.clone()] + [n.clone() for n in noise or []]
    with torch.no_grad():
        fast = S(ws, noise=noise, noise_mode=mode, ws_layout=ws_layout)
        ref = S.forward_reference(ws, noise=noise, noise_mode=mode, ws_layout=ws_layout)
    assert fast.is_contiguous(memory_format=torch.channels_last)  # it did take the inference path
    assert_max_abs(fast, ref, 1e-5 * ref.abs().max().item())
    assert all(torch.equal(a, b) for a, b in zip(inputs, [ws] + (noise or [])))
    ws.requires_grad_(True)
    img = S(ws, noise=noise, noise_mode=mode, ws_layout=ws_layout)  # autograd on: the reference path
    img.square().mean().backward()
    assert torch.equal(img.detach(), ref) and ws.grad.abs().sum() > 0


def test_blocks_are_tiled_by_sample_and_rows_when_their_features_outgrow_a_tile():
    block = msgan.MobileBlock(64, 16, w_dim=8)
    row_bytes = 32 * 16 * 4  # one row of one sample's 16-channel features at 32x32
    assert msgan.block_tiles(block, 2, 32, 2 * 32 * row_bytes) == [(slice(None), 0, 32)]  # the whole batch fits
    assert msgan.block_tiles(block, 2, 32, 10 * row_bytes) == [(slice(b, b + 1), r0, min(r0 + 10, 32))
                                                               for b in (0, 1) for r0 in (0, 10, 20, 30)]
    block.to(torch.bfloat16)  # two bytes a value: twice the rows in a tile
    assert msgan.block_tiles(block, 2, 32, 10 * row_bytes) == [(slice(b, b + 1), r0, min(r0 + 20, 32))
                                                               for b in (0, 1) for r0 in (0, 20)]


def test_tune_tiling_times_each_tile_size_once_per_machine_and_caches_the_fastest(ckpt_dir, teacher, tmp_path,
                                                                                  monkeypatch):
    """The fastest candidate wins (here: made fastest by a stand-in forward), the choice is cached per machine,
    threads and network, and a second network reads it without timing. A cache that is corrupt is rewritten, one
    that cannot be written only says so; a teacher or an unfolded student is left alone."""
    G = msgan.load(ckpt_dir / "official.pt").fold()
    S, cache, lines = G.synthesis, tmp_path / "cache" / "tiling.json", []
    fastest = msgan.TILE_CANDIDATES[2]
    reference = S.forward_inference(torch.randn(1, G.w_dim))

    def timed_forward(ws, *args, **kwargs):
        time.sleep(0 if S.tile_bytes == fastest else 0.01)
        return reference
    monkeypatch.setattr(S, "forward_inference", timed_forward)
    assert msgan.tune_tiling(G, workers=2, cache=str(cache), log=lines.append) == fastest
    assert S.tile_bytes == fastest and "timed in" in lines[0] and str(cache) in lines[0]
    entries = formats.read_tiling(str(cache))
    assert list(entries.values()) == [fastest] and ops.cpu_name() in next(iter(entries))

    again = msgan.load(ckpt_dir / "official.pt").fold()
    assert msgan.tune_tiling(again, workers=2, cache=str(cache), log=lines.append) == fastest
    assert again.synthesis.tile_bytes == fastest and len(lines) == 1  # read, not timed
    assert formats.read_tiling(str(cache)) == entries

    cache.write_text("{not json")
    assert formats.read_tiling(str(cache)) == {}
    assert msgan.tune_tiling(G, cache=str(cache)) == fastest and len(formats.read_tiling(str(cache))) == 1
    unwritable = tmp_path / "a file" / "tiling.json"
    unwritable.parent.write_text("")
    assert msgan.tune_tiling(G, cache=str(unwritable), log=lines.append) == fastest
    assert "not cached" in lines[-1]
    assert msgan.tune_tiling(teacher, cache=str(cache)) is None


def test_inference_path_needs_a_folded_network(ckpt_dir):
    with pytest.raises(ValueError, match="folded"):
        msgan.load(ckpt_dir / "official.pt").synthesis.forward_inference(torch.zeros(1, 512))


# ----------------------------------------------------------------------------------------------
# msgan.py: W+ layouts, noise, bad inputs, and the parameter counts of the full-size networks


@torch.no_grad()
def test_student_standard_layout_equals_converted_official_layout(student, r, student_noise):
    ws = r["wplus"]  # a standard W+ [4, 10, 64]
    official = msgan.standard_to_official_ws(ws, NUM_BLOCKS)
    assert official.shape == (4, 3 * NUM_BLOCKS + 2, 64)
    img, freq = student.synthesis(ws, noise=student_noise, return_freq=True)
    img_o, freq_o = student.synthesis(official, noise=student_noise, return_freq=True, ws_layout="official")
    assert torch.equal(img, img_o)
    assert all(torch.equal(a, b) for a, b in zip(freq, freq_o))


@torch.no_grad()
def test_teacher_and_student_share_wplus_and_noise(teacher, student, r, student_noise):
    assert teacher.num_ws == student.num_ws == 10
    assert teacher.img_resolution == student.img_resolution == 64
    img_t = teacher.synthesis(r["wplus"], noise=r["noise"])
    img_s = student.synthesis(r["wplus"], noise=r["noise"])  # the teacher's 9 maps: the student uses the first 7
    assert img_t.shape == img_s.shape == (4, 3, 64, 64)
    assert torch.equal(img_s, student.synthesis(r["wplus"], noise=student_noise))


@torch.no_grad()
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_single_w_equals_w_repeated_num_ws_times(request, which, r):
    G = request.getfixturevalue(which)
    w = G.mapping(r["z"])
    assert torch.equal(G.synthesis(w), G.synthesis(w[:, None].repeat(1, G.num_ws, 1)))


@torch.no_grad()
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_noise_modes(request, which, r):
    G = request.getfixturevalue(which)
    z = r["z"]
    const = G(z, noise_mode="const")
    assert torch.equal(G(z, noise_mode="const"), const)                   # deterministic
    assert not torch.equal(G(z, noise_mode="random"), G(z, noise_mode="random"))  # fresh every call
    assert not torch.equal(G(z, noise_mode="none"), const)
    assert torch.equal(G(z, noise_mode="none"), G(z, noise_mode="none"))
    assert torch.equal(G(z, noise=const_noise(G)), const)                 # explicit list == the const buffers


@torch.no_grad()
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_bad_synthesis_input_raises_value_error(request, which):
    G = request.getfixturevalue(which)
    w = torch.zeros(2, G.w_dim)
    with pytest.raises(ValueError, match="ws"):
        G.synthesis(torch.zeros(2, G.num_ws + 1, G.w_dim))
    with pytest.raises(ValueError, match="ws"):
        G.synthesis(torch.zeros(2, G.w_dim + 1))
    with pytest.raises(ValueError, match="noise"):
        G.synthesis(w, noise=[torch.zeros(1, 1, 4, 4)] * 3)
    with pytest.raises(ValueError, match="noise"):  # right length, wrong resolution
        G.synthesis(w, noise=[torch.zeros(1, 1, 5, 5)] * 9)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(w, noise_mode="sometimes")


@pytest.fixture(scope="module")
def full_size():
    """Teacher and student at 1024^2, built on the meta device (shapes only: no memory, no init time)."""
    channels = msgan.default_channels(1024)
    config = dict(z_dim=512, w_dim=512, mapping_layers=8)
    with torch.device("meta"):
        return (msgan.Generator(dict(arch="stylegan2", channels=channels, **config)),
                msgan.Generator(dict(arch="mobilestylegan", channels=channels[:-1], **config)))


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_1024(full_size):
    T, S = full_size
    assert (T.img_resolution, S.img_resolution) == (1024, 1024)
    assert num_params(T.synthesis) == 28_268_812
    assert num_params(T.mapping) == num_params(S.mapping) == 2_101_248
    assert num_params(S.synthesis) == 8_852_079


# ----------------------------------------------------------------------------------------------
# msgan.py: the discriminator and the GAN losses (golden data: discriminator_and_loss_public.md, §1)


DISCRIMINATOR_BATCHES = {  # stored logits -> the batch that produced them
    "logits": lambda x, x8: x,
    "logits_b1": lambda x, x8: x[:1],
    "logits_b2": lambda x, x8: x[:2],
    "logits_b3": lambda x, x8: x[:3],
    "logits_b8": lambda x, x8: x8,
    "logits_b12": lambda x, x8: torch.cat([x8, x]),
}


@torch.no_grad()
@pytest.mark.parametrize("key", DISCRIMINATOR_BATCHES)
def test_discriminator_logits(D, dref, key):
    batch = DISCRIMINATOR_BATCHES[key](dref["inputs"]["x"], dref["inputs"]["x8"])
    assert_max_abs(D(batch), dref["outputs"][key], D_TOL)


@pytest.mark.parametrize("which", ["x", "real"])
def test_r1_penalty(D, dref, which):
    penalty = msgan.r1_penalty(D, dref["inputs"][which])
    assert_rel(penalty, dref["r1"][which]["penalty"], 1e-4)


@torch.no_grad()
def test_nonsaturating_losses(D, dref):
    ns = dref["nonsaturating"]
    fake_logits, real_logits = D(dref["inputs"]["fake"]), D(dref["inputs"]["real"])
    assert_max_abs(fake_logits, ns["fake_logits"], D_TOL)
    assert_max_abs(real_logits, ns["real_logits"], D_TOL)
    assert abs(msgan.g_nonsaturating_loss(fake_logits).item() - ns["loss_g"]) <= D_TOL
    assert abs(msgan.d_logistic_loss(real_logits, fake_logits).item() - ns["loss_d"]) <= D_TOL


@torch.no_grad()
def test_discriminator_batch_not_divisible_by_group_raises(D, dref):
    x = dref["inputs"]["x"]
    with pytest.raises(ValueError, match=r"\b5\b"):
        D(torch.cat([x, x[:1]]))


# ----------------------------------------------------------------------------------------------
# msgan.py: distillation losses and the differentiable augmentation (discriminator_and_loss_public.md, §2)


def test_distillation_loss_matches_the_official_term_by_term(distill_ref):
    inputs = distill_ref["inputs"]
    terms = msgan.distillation_loss(inputs["pred_freq"], inputs["gt_img"])
    for k, expected in enumerate(distill_ref["per_scale"]):
        for name in ("l1_rgb", "l1_freq", "l2_rgb", "l2_freq"):
            assert_rel(terms[f"{name}/{k}"], expected[name], 1e-5)
    assert_rel(terms["l1"], distill_ref["official_return"]["l1"], 1e-5)
    assert_rel(terms["l2"], distill_ref["official_return"]["l2"], 1e-5)


def test_perceptual_loss_matches_the_official_with_synthetic_vgg(distill_ref, vgg):
    inputs = distill_ref["inputs"]
    img = inputs["pred_img"].clone().requires_grad_(True)
    teacher_img = inputs["gt_img"].clone().requires_grad_(True)
    loss = msgan.perceptual_loss(img, teacher_img, vgg)
    assert_rel(loss, distill_ref["perceptual"]["loss_p"], 1e-4)
    loss.backward()
    assert img.grad.abs().sum() > 0 and teacher_img.grad is None  # no gradient through the teacher branch


def test_augmentation_with_p_0_is_the_identity():
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(msgan.augment(x, msgan.augment_params(5, 0.0)), x)


def only(op, n, **values):
    """Parameters that switch on one op only, with the given values."""
    params = msgan.augment_params(n, 1.0, torch.Generator().manual_seed(0))
    for name in ("flip", "affine", "erase"):
        params[name] = torch.full((n,), float(name == op))
    params.update({k: torch.full((n,), float(v)) for k, v in values.items()})
    return params


def test_augmentation_ops_on_known_inputs():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert torch.equal(msgan.augment(x, only("flip", 2)), x.flip(3))
    # a pure translation by whole pixels: 2 right (dx = 2/8 of the width) and 1 up (dy = -1/8)
    shifted = msgan.augment(x, only("affine", 2, angle=0, scale=1, dx=2 / 8, dy=-1 / 8))
    expected = torch.zeros_like(x)
    expected[:, :, :-1, 2:] = x[:, :, 1:, :-2]
    assert_max_abs(shifted, expected, 1e-4)
    # a rotation by +90 degrees about the centre turns the pixel grid clockwise (as shown, y pointing down)
    turned = msgan.augment(x, only("affine", 2, angle=math.pi / 2, scale=1, dx=0, dy=0))
    assert_max_abs(turned, torch.rot90(x, -1, (2, 3)), 1e-3)
    # erasing rows 2..5 and columns 4..7 (fractions of H and W)
    erased = msgan.augment(x, only("erase", 2, erase_y=2 / 8, erase_h=4 / 8, erase_x=4 / 8, erase_w=4 / 8))
    expected = x.clone()
    expected[:, :, 2:6, 4:8] = 0
    assert torch.equal(erased, expected)


def test_augmentation_draws_the_official_ranges_and_passes_gradients():
    params = msgan.augment_params(4000, 0.5, torch.Generator().manual_seed(1))
    for name in ("flip", "affine", "erase"):
        assert abs(params[name].mean().item() - 0.5) < 0.03
    assert params["angle"].abs().max() <= math.radians(20) and params["dx"].abs().max() <= 0.1
    assert params["dy"].abs().max() <= 0.3 and 0.7 <= params["scale"].min() and params["scale"].max() <= 1.2
    area = params["erase_h"] * params["erase_w"]
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 0.33 + 1e-6
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    msgan.augment(x, msgan.augment_params(6, 1.0, torch.Generator().manual_seed(2))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def graph_ops(tensor):
    """The names of the autograd nodes tensor was computed by."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_r1_through_the_augmentation_never_needs_pytorchs_grid_sampler_double_backward():
    """R1 differentiates D's gradient w.r.t. the real image, through the affine warp. PyTorch's CUDA grid sampler
    has no second derivative (training on a GPU stopped at the first R1 step), so the warp's gradient is
    ops.grid_sample's own transpose op, on every device."""
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    params = msgan.augment_params(2, 1.0, torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(msgan.augment(x, params).square().sum(), x, create_graph=True)
    assert not any("GridSampler" in name for name in graph_ops(grad)), graph_ops(grad)
    grad.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.gpu
@needs_cuda
def test_r1_through_the_augmentation_on_cuda_matches_the_cpu():
    params = msgan.augment_params(2, 1.0, torch.Generator().manual_seed(4))
    real, conv = torch.randn(2, 3, 16, 16), torch.nn.Conv2d(3, 1, 3)  # a stand-in discriminator
    penalties = [msgan.r1_penalty(lambda x: conv.to(device)(msgan.augment(x, params)).sum((1, 2, 3)), real.to(device))
                 for device in ("cpu", "cuda")]
    assert abs(penalties[1].item() - penalties[0].item()) <= 1e-4 * penalties[0].item()


# ----------------------------------------------------------------------------------------------
# formats.py: msgan's own format, and what a bad checkpoint is told


@torch.no_grad()
def test_save_load_round_trip_is_bit_exact(teacher, student, tmp_path, r):
    path = tmp_path / "pair.pt"
    msgan.save(path, generator=student, teacher=teacher)
    plain = torch.load(path, weights_only=True)  # no pickled classes: safe to open anywhere
    assert plain["format"] == "msgan" and {"generator", "teacher"} <= set(plain)

    S2, T2 = msgan.load(path), msgan.load(path, part="teacher")
    assert S2.is_student and not T2.is_student
    for G, G2 in ((student, S2), (teacher, T2)):
        assert torch.equal(G2.w_avg, G.w_avg)
        assert torch.equal(G2(r["z"], psi=0.7), G(r["z"], psi=0.7))
        assert torch.equal(G2.synthesis(r["wplus"]), G.synthesis(r["wplus"]))


@torch.no_grad()
def test_generator_saved_alone_round_trips(teacher, tmp_path, r):
    msgan.save(tmp_path / "teacher.pt", generator=teacher)
    T2 = msgan.load(tmp_path / "teacher.pt")
    assert torch.equal(T2(r["z"]), teacher(r["z"]))
    with pytest.raises(msgan.CheckpointError, match="discriminator"):
        msgan.load(tmp_path / "teacher.pt", part="discriminator")


@torch.no_grad()
def test_discriminator_save_load_round_trip(D, dref, tmp_path):
    msgan.save(tmp_path / "d.pt", discriminator=D)
    D2 = msgan.load(tmp_path / "d.pt", part="discriminator")
    x = dref["inputs"]["x"]
    assert torch.equal(D2(x), D(x))


def test_missing_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "nothing_here.pt"
    with pytest.raises(msgan.CheckpointError, match=re.escape(str(path))):
        msgan.load(path)


def test_truncated_file_raises_checkpoint_error(tmp_path, ref):
    path = tmp_path / "truncated.pt"
    torch.save(ref["rosinality"]["checkpoint"], path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(msgan.CheckpointError, match=re.escape(str(path))):
        msgan.load(path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, ref):
    g_ema = dict(ref["rosinality"]["checkpoint"]["g_ema"])
    key = "conv1.conv.modulation.weight"
    good_shape = tuple(g_ema[key].shape)
    g_ema[key] = torch.zeros(3, 5)
    path = tmp_path / "wrong_shape.pt"
    torch.save({"g_ema": g_ema}, path)
    with pytest.raises(msgan.CheckpointError) as err:
        msgan.load(path)
    message = str(err.value)
    assert str(path) in message and key in message
    assert contains_shape(message, (3, 5)), message
    assert contains_shape(message, good_shape), message


def test_missing_key_is_named(tmp_path, ref):
    g_ema = dict(ref["rosinality"]["checkpoint"]["g_ema"])
    key = "convs.5.conv.modulation.bias"
    del g_ema[key]
    path = tmp_path / "missing_key.pt"
    torch.save({"g_ema": g_ema, "latent_avg": ref["rosinality"]["checkpoint"]["latent_avg"]}, path)
    with pytest.raises(msgan.CheckpointError) as err:
        msgan.load(path)
    assert str(path) in str(err.value) and key in str(err.value), str(err.value)


def test_unknown_format_is_reported(tmp_path):
    path = tmp_path / "foo.pt"
    torch.save({"foo": 1}, path)
    with pytest.raises(msgan.CheckpointError, match="unknown") as err:
        msgan.load(path)
    assert str(path) in str(err.value) and "format" in str(err.value)


# ----------------------------------------------------------------------------------------------
# formats.py: NVIDIA StyleGAN2-ADA network pickles (golden data in ../shared/reference/nvlabs: a snapshot written by
# NVIDIA's stylegan2-ada-pytorch, and the float32 outputs NVIDIA's own code computed from it). Tolerances are the
# ones its README suggests for an independent float32 implementation.


NV_MAPPING_TOL = 1e-5   # mapping and truncation: the same op sequence as NVIDIA's


NV_CLAMP_TOL = 5e-3     # the clamp cases reach values of ~1e3


NV_CLAMP_CASES = {      # case -> the parameter NVIDIA scaled (b8.torgb.weight, b4.const), in msgan's names
    "torgb": "synthesis.to_rgbs.0.conv.weight",
    "conv": "synthesis.const",
}


@torch.no_grad()
def test_nvidia_mapping_and_truncation(nv_nets, nv):
    G, _ = nv_nets
    w = G.mapping(nv["inputs"]["z"])
    every_slot = lambda w: w[:, None].expand(-1, G.num_ws, -1)  # NVIDIA's mapping broadcasts w to [B, num_ws, D]
    assert_max_abs(every_slot(w), nv["mapping"]["psi1"], NV_MAPPING_TOL)
    assert_max_abs(every_slot(G.truncate(w, 0.7)), nv["mapping"]["psi0_7"], NV_MAPPING_TOL)
    cutoff = nv["config"]["truncation_cutoff"]
    assert_max_abs(G.truncate(w, 0.5, cutoff=cutoff), nv["mapping"]["psi0_5_cutoff"], NV_MAPPING_TOL)


@torch.no_grad()
def test_nvidia_synthesis_in_every_noise_mode(nv_nets, nv):
    G, _ = nv_nets
    ws, expected = nv["inputs"]["ws"], nv["synthesis"]
    assert_max_abs(G.synthesis(ws, noise_mode="const"), expected["const"])  # NVIDIA's noise_const buffers
    assert_max_abs(G.synthesis(ws, noise_mode="none"), expected["none"])
    noise = [expected["random_noise"][layer] for layer in
             ["b4.conv1"] + [f"b{r}.conv{i}" for r in (8, 16, 32, 64) for i in (0, 1)]]  # forward order
    assert_max_abs(G.synthesis(ws, noise=noise), expected["random"])
    with torch.random.fork_rng():  # NVIDIA draws each layer's noise from the global generator, in forward order
        torch.manual_seed(nv["seeds"]["noise_random"])
        assert_max_abs(G.synthesis(ws, noise_mode="random"), expected["random"])


@torch.no_grad()
def test_nvidia_generator_truncated(nv_nets, nv):
    G, _ = nv_nets
    assert_max_abs(G(nv["inputs"]["z"], psi=0.7), nv["generator"]["psi0_7_const"])


@torch.no_grad()
@pytest.mark.parametrize("case", NV_CLAMP_CASES)
def test_nvidia_conv_clamp(nv_nets, nv, case):
    """NVIDIA's stored cases: one parameter scaled until layer outputs exceed conv_clamp."""
    G, _ = nv_nets
    expected = nv["clamp"][case]
    assert G.config["conv_clamp"] == nv["config"]["conv_clamp"]

    def run(conv_clamp):  # -> image and the output of b4.conv1 (msgan's synthesis.conv1)
        net = msgan.Generator({**G.config, "conv_clamp": conv_clamp})
        net.load_state_dict(G.state_dict())
        net.get_parameter(NV_CLAMP_CASES[case]).mul_(expected["factor"])
        layer = []
        net.synthesis.conv1.register_forward_hook(lambda module, args, out: layer.append(out))
        return net.synthesis(nv["inputs"]["ws"]), layer[0]

    img, conv1 = run(G.config["conv_clamp"])
    assert_max_abs(img, expected["img_clamped"], NV_CLAMP_TOL)
    img_unclamped, conv1_unclamped = run(None)  # without the clamp: off by hundreds, as NVIDIA's own unclamped run
    assert_rel((img_unclamped - img).abs().max(), expected["img_max_abs_diff_clamped_vs_unclamped"], 1e-4)
    if case == "conv":  # the case's designated layer is b4.conv1
        assert_max_abs(conv1, expected["layer_out_clamped"], NV_CLAMP_TOL)
        assert_max_abs(conv1_unclamped, expected["layer_out_unclamped"], NV_CLAMP_TOL)


@torch.no_grad()
def test_nvidia_discriminator(nv_nets, nv):
    _, D = nv_nets
    assert (D.conv_clamp, D.stddev_group) == (nv["config"]["conv_clamp"], nv["config"]["d_mbstd_group_size"])
    fake, expected = nv["synthesis"]["const"], nv["discriminator"]
    x = D.convs(fake)
    assert_max_abs(x, expected["blocks_fake"]["b8"])
    assert_max_abs(D.minibatch_stddev(x), expected["mbstd_out_fake"])
    assert_max_abs(D(fake), expected["logits_fake"])
    assert_max_abs(D(nv["inputs"]["d_images_random"]), expected["logits_random"])


def test_nvidia_geometry_comes_from_the_pickle_and_teacher_is_g_ema(nv):
    G, config = msgan.load(NV_PKL, part="teacher"), nv["config"]
    assert (G.z_dim, G.w_dim, G.num_ws, G.img_resolution) == (config["z_dim"], config["w_dim"], config["num_ws"],
                                                             config["img_resolution"])
    assert G.config["mapping_layers"] == config["mapping_layers"]
    assert G.synthesis.channels == [config["channels"][str(4 * 2**i)] for i in range(5)]
    sum_abs = nv["g_ema_state_checksums"]["mapping.w_avg"][1]  # NVIDIA's tracked w_avg, not a recomputed one
    assert_rel(G.w_avg.double().abs().sum(), sum_abs, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), msgan.load(NV_PKL).state_dict().values()))


def nvidia_records(obj):
    """obj and all its NvidiaObject submodules."""
    yield obj
    for child in obj.state["_modules"].values():
        if child is not None:
            yield from nvidia_records(child)


def pickle_globals(data):
    """'module name' of every global a pickle references (statically, nothing is loaded)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(" ".join(strings[-2:]))
        elif "UNICODE" in op.name:
            strings.append(arg)
    return found


@pytest.mark.parametrize("protocol", [2, 3])
def test_nvidia_pickle_written_by_older_python_and_numpy(nvidia_pickler, tmp_path, protocol):
    """Most downloads were written under Python <= 3.7 (protocol 3; 2 for older tools) and numpy 1.x (numpy.core)."""
    path = nvidia_pickler(formats.read_nvidia_pickle(NV_PKL), tmp_path / "older.pkl", protocol)
    data = path.read_bytes()
    assert data.count(b"cnumpy._core.multiarray\nscalar\n") == 1
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n"))
    found = pickle_globals(path.read_bytes())
    assert path.read_bytes()[1] == protocol and "numpy.core.multiarray scalar" in found
    assert ("_codecs encode" in found and "__builtin__ set" in found) if protocol == 2 else "builtins set" in found
    for part in ("generator", "discriminator"):
        older, original = msgan.load(path, part=part), msgan.load(NV_PKL, part=part)
        assert older.state_dict().keys() == original.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(older.state_dict().values(), original.state_dict().values()))


# Security: nothing in a pickle runs. Each hostile file is loaded by msgan (refused, no marker), then by a plain
# unpickler as the control that proves the payload is live.


def call_pickle(module, name, arg):
    """A pickle that calls module.name(arg) when loaded: PROTO 2, GLOBAL, the argument, TUPLE1, REDUCE, STOP."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(arg, protocol=2)[2:-1] + b"\x85R."


HOSTILE_CALLS = [  # (module, name, code; {marker} is the file the code creates)
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),  # how pickle spells os.system on Linux
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
    ("__builtin__", "eval", "open({marker!r}, 'w').close()"),  # the protocol-2 spelling of builtins
]


@pytest.mark.parametrize("module, name, code", HOSTILE_CALLS, ids=[f"{m}.{n}" for m, n, _ in HOSTILE_CALLS])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, module, name, code):
    marker, path = tmp_path / "ran", tmp_path / "network-snapshot.pkl"
    path.write_bytes(call_pickle(module, name, code.format(marker=str(marker))))
    for part in ("generator", "teacher", "discriminator"):
        with pytest.raises(msgan.CheckpointError, match=rf"^{re.escape(str(path))}: refused global {module}\.{name}"):
            msgan.load(path, part=part)
    assert not marker.exists()
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_storage_blob_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    """NVIDIA's loader torch.load()s each storage blob with weights_only=False; msgan with torch's weights-only one."""
    marker, path = tmp_path / "ran", tmp_path / "network-snapshot.pkl"
    blob = call_pickle("os", "system", f"touch {marker}")
    path.write_bytes(call_pickle("torch.storage", "_load_from_bytes", blob))
    with pytest.raises(msgan.CheckpointError, match="refused a storage blob"):
        msgan.load(path)
    assert not marker.exists()
    pickle.loads(blob)
    assert marker.exists()


def test_persistent_ids_are_refused(tmp_path):
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(b"\x80\x03X\x03\x00\x00\x00pidQ.")  # PROTO 3, the string "pid", BINPERSID, STOP
    with pytest.raises(msgan.CheckpointError, match="refused a persistent id"):
        msgan.load(path)


def test_truncated_nvidia_pickle_is_one_clear_error(tmp_path):
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(NV_PKL.read_bytes()[:1_000_000])
    with pytest.raises(msgan.CheckpointError, match=rf"^{re.escape(str(path))}: not a readable NVIDIA pickle"):
        msgan.load(path)


def test_tampered_embedded_source_is_refused_and_never_run(nvidia_pickler, tmp_path, monkeypatch):
    """NVIDIA's loader exec()s the source each network carries; here it would create the marker."""
    marker = tmp_path / "ran"
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    snapshot = formats.read_nvidia_pickle(NV_PKL)
    networks_py = snapshot["G_ema"].module_src
    for record in [r for key in ("G", "D", "G_ema") for r in nvidia_records(snapshot[key])]:
        record.module_src = payload + networks_py
    path = nvidia_pickler(snapshot, tmp_path / "tampered.pkl")
    digest = hashlib.sha256((payload + networks_py).encode()).hexdigest()
    for part, name in (("generator", "G_ema"), ("discriminator", "D")):
        with pytest.raises(msgan.CheckpointError, match=f"{name} was pickled with a source .* not a known NVIDIA"):
            msgan.load(path, part=part)
    assert not marker.exists()
    monkeypatch.setenv(formats.NVIDIA_SOURCES_ENV, digest)  # a user who accepts that source: still nothing runs
    G = msgan.load(path)
    assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), msgan.load(NV_PKL).state_dict().values()))
    assert not marker.exists()
    exec(payload)
    assert marker.exists()


@torch.no_grad()
def test_nvidia_mapping_learning_rate_is_read_from_the_pickle(nvidia_pickler, tmp_path, nv):
    """NVIDIA stores mapping weights as N(0, 1) / lr: the same network trained with lr 0.1 stores them 10x smaller."""
    snapshot, lr = formats.read_nvidia_pickle(NV_PKL), 0.1
    for record in nvidia_records(snapshot["G_ema"].child("mapping")):
        if record.class_name == "FullyConnectedLayer":
            old_lr = record.state["bias_gain"]
            record.state["weight_gain"] *= lr / old_lr
            record.state["bias_gain"] = lr
            for name, value in record.state["_parameters"].items():
                record.state["_parameters"][name] = value * (old_lr / lr)
    G = msgan.load(nvidia_pickler(snapshot, tmp_path / "lr.pkl"))
    assert_max_abs(G.mapping(nv["inputs"]["z"]), nv["mapping"]["psi1"][:, 0], NV_MAPPING_TOL)


def set_block_architecture(architecture):
    def edit(snapshot):
        for record in nvidia_records(snapshot["G_ema"]):
            if record.class_name == "SynthesisBlock":
                record.state["architecture"] = architecture
    return edit


def make_stylegan3(snapshot):
    """StyleGAN3's synthesis starts with a Fourier-feature layer named `input` (then L0_36_512, ...)."""
    synthesis = snapshot["G_ema"].child("synthesis")
    synthesis.state["_modules"] = {"input": synthesis.child("b4"), "L0_36_512": synthesis.child("b8")}


NV_VARIANTS = {  # name -> (edit of the snapshot, part, what the message says)
    "conditional G": (lambda s: s["G_ema"].state.update(c_dim=10), "generator", "conditional generator"),
    "conditional D": (lambda s: s["D"].state.update(c_dim=10), "discriminator", "conditional discriminator"),
    "orig G": (set_block_architecture("orig"), "generator", "'orig' architecture"),
    "resnet G": (set_block_architecture("resnet"), "generator", "'resnet' architecture"),
    "stylegan3": (make_stylegan3, "generator", "StyleGAN3"),
}


@pytest.mark.parametrize("variant", NV_VARIANTS)
def test_unsupported_nvidia_variant_says_which_and_why(nvidia_pickler, tmp_path, variant):
    edit, part, says = NV_VARIANTS[variant]
    snapshot = formats.read_nvidia_pickle(NV_PKL)
    edit(snapshot)
    path = nvidia_pickler(snapshot, tmp_path / "variant.pkl")
    with pytest.raises(msgan.CheckpointError) as err:
        msgan.load(path, part=part)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "not supported" in message and "\n" not in message


def test_tensorflow_era_pickle_says_so(tmp_path):
    path = tmp_path / "stylegan2-ffhq-config-f.pkl"
    path.write_bytes(b"\x80\x03cdnnlib.tflib.network\nNetwork\n)\x81.")  # GLOBAL, EMPTY_TUPLE, NEWOBJ: TF's Network
    with pytest.raises(msgan.CheckpointError, match="TensorFlow-era .* not supported"):
        msgan.load(path)


# ----------------------------------------------------------------------------------------------
# formats.py: the pretrained FFHQ-1024 model, imported from the random-face wheel (fetched once into weights/)


def test_ffhq_matches_openvino_reference(ffhq):
    ref = np.load(FFHQ_REF)
    with torch.no_grad():
        w = ffhq.mapping(torch.from_numpy(ref["z"]))
        img = ffhq.synthesis(torch.from_numpy(ref["w"]), noise_mode="const")  # [3, 3, 1024, 1024]
    assert_max_abs(w, torch.from_numpy(ref["w"]), what="w")
    pooled = img.reshape(3, 3, 128, 8, 128, 8).mean((3, 5))                # 8x8 average pool
    crops = torch.stack([img[b, :, y:y + 64, x:x + 64] for b, y, x in ref["crop_where"]])
    assert_max_abs(pooled, torch.from_numpy(ref["pooled"]), FFHQ_TOL, "pooled")
    assert_max_abs(crops, torch.from_numpy(ref["crops"]), FFHQ_TOL, "crops")
    assert_max_abs(img.mean((1, 2, 3)), torch.from_numpy(ref["img_mean"]), FFHQ_TOL, "img_mean")
    assert_max_abs(img.std((1, 2, 3), unbiased=False), torch.from_numpy(ref["img_std"]), FFHQ_TOL, "img_std")


def test_ffhq_model_properties(ffhq):
    assert (ffhq.z_dim, ffhq.w_dim, ffhq.num_ws, ffhq.img_resolution) == (512, 512, 18, 1024)
    assert ffhq.is_student and ffhq.synthesis.folded
    # w_avg is the mean of many mapped z: close to the reference's independent 4096-sample estimate
    mean_w = torch.from_numpy(np.load(FFHQ_REF)["mean_w"][0])
    assert (ffhq.w_avg - mean_w).norm() < 0.05 * mean_w.norm()


def offline(monkeypatch, weights_dir):
    """Point msgan at an empty weights folder and make pip fail as it would with no network."""
    monkeypatch.setattr(formats, "WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_ffhq_offline_gives_one_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    with pytest.raises(msgan.DownloadError, match="could not download random-face==2021.7.21.1") as e:
        msgan.load("ffhq")
    assert "\n" not in str(e.value) and formats.RANDOM_FACE_WHEEL in str(e.value)
    assert not (tmp_path / "ffhq.pt").exists() and list((tmp_path / "cache").iterdir()) == []


def test_ffhq_corrupt_cache_is_dropped_not_used(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / formats.RANDOM_FACE_WHEEL).write_bytes(b"truncated download")
    with pytest.raises(msgan.DownloadError):
        msgan.load("ffhq")
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "ffhq.pt").exists()


def test_ffhq_download_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    """A package index serving a different file under the pinned name: pip takes it, msgan refuses it."""
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / formats.RANDOM_FACE_WHEEL, "w") as wheel:  # a valid but foreign wheel
        info = "random_face-2021.7.21.1.dist-info/"
        wheel.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: random-face\nVersion: 2021.7.21.1\n")
        wheel.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(info + "RECORD", "")
    offline(monkeypatch, tmp_path / "weights")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(msgan.DownloadError, match="sha256 mismatch"):
        msgan.load("ffhq")
    assert list((tmp_path / "weights" / "cache").iterdir()) == []


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(msgan.CheckpointError, match="not a pretrained model name"):
        msgan.load("ffhq-typo")


def write_wheel(path, source, edit):
    """A copy of the wheel `source` whose members go through edit(name, content) (None drops a member)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as copy:
        for name in original.namelist():
            content = edit(name, original.read(name))
            if content is not None:
                copy.writestr(name, content)
    return path


def test_damaged_or_edited_wheel_is_refused_and_the_error_says_what_to_do(tmp_path, random_face_wheel):
    truncated = tmp_path / "truncated.whl"
    truncated.write_bytes(Path(random_face_wheel).read_bytes()[:5_000_000])
    ir = "random_face/data/MappingNetwork.bin"
    edited_ir = write_wheel(tmp_path / "edited.whl", random_face_wheel,
                            lambda name, content: content[:-4] + b"\0\0\0\0" if name == ir else content)
    for wheel, says in ((truncated, "not an intact random-face wheel"), (edited_ir, f"{ir}: sha256 mismatch")):
        with pytest.raises(msgan.DownloadError, match=re.escape(says)) as e:
            import_wheel(wheel)
        assert str(e.value).startswith(str(wheel)) and "delete it, and msgan.load('ffhq') downloads" in str(e.value)


def test_edited_ir_is_refused_even_when_the_wheel_checksum_is_made_to_match(tmp_path, monkeypatch,
                                                                            random_face_wheel):
    """Defence in depth: with the wheel's own sha256 pin changed to the edited wheel's, the pinned sha256 of each
    IR file still catches the edit, and nothing is written."""
    offline(monkeypatch, tmp_path)
    (tmp_path / "cache").mkdir()
    ir = "random_face/data/SynthesisNetwork.xml"
    wheel = write_wheel(tmp_path / "cache" / formats.RANDOM_FACE_WHEEL, random_face_wheel,
                        lambda name, content: content.replace(b"</net>", b"<!-- edited --></net>")
                        if name == ir else content)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(formats.RANDOM_FACE_SHA256, formats.RANDOM_FACE_WHEEL, digest)
    with pytest.raises(msgan.DownloadError, match=f"{ir}: sha256 mismatch"):
        msgan.load("ffhq")
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def write_then_fail(target, error=errno.ENOSPC):
    """What a write does on a full disk: some bytes land in the file, then the write fails."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "ab") as f:
            f.write(b"partial")
    else:
        target.write(b"partial")
    raise OSError(error, os.strerror(error))


def read_only(*args, **kwargs):
    """What creating a file in a read-only folder does (root ignores chmod, so the tests patch the call)."""
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


@pytest.mark.parametrize("failure", ["full disk", "read-only"])
def test_ffhq_import_into_a_full_or_read_only_weights_folder(tmp_path, monkeypatch, random_face_wheel, failure):
    offline(monkeypatch, tmp_path)
    (tmp_path / "cache").mkdir()
    shutil.copy(random_face_wheel, tmp_path / "cache")
    if failure == "full disk":
        monkeypatch.setattr(torch, "save", lambda obj, f: write_then_fail(f))
    else:
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(msgan.DownloadError, match=r"ffhq\.pt: cannot write the imported model .*MSGAN_WEIGHTS"):
        msgan.load("ffhq")
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no ffhq.pt, whole or partial


def test_damaged_ffhq_file_says_how_to_redo_it(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "ffhq.pt").write_bytes(b"PK\x03\x04 half of a file")
    with pytest.raises(msgan.CheckpointError, match=r"delete it, and msgan.load\('ffhq'\) imports it again$"):
        msgan.load("ffhq")


CONCURRENT_FIRST_USE = """
import pathlib, sys, time
import msgan
me, other = map(pathlib.Path, sys.argv[1:])
save = msgan.save

def save_together(*args, **kwargs):  # both processes have imported the model: now both write weights/ffhq.pt
    me.touch()
    deadline = time.time() + 120
    while not other.exists() and time.time() < deadline:
        time.sleep(0.01)
    save(*args, **kwargs)

msgan.save = save_together
G = msgan.load("ffhq")
print(G.img_resolution, G.w_avg.sum().item())
"""


def test_two_processes_doing_the_first_ffhq_load_at_once_both_succeed(tmp_path, random_face_wheel):
    """Two processes load "ffhq" for the first time at once, the wheel already cached (no download). A barrier makes
    both write weights/ffhq.pt at the same moment: both succeed, and one whole file is left, no temp file."""
    weights = tmp_path / "weights"
    (weights / "cache").mkdir(parents=True)
    shutil.copy(random_face_wheel, weights / "cache")
    env = {**os.environ, "MSGAN_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT_FIRST_USE, str(tmp_path / me),
                                   str(tmp_path / other)], cwd=Path(__file__).resolve().parent, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for me, other in (("a", "b"), ("b", "a"))]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith("1024 ")
    assert sorted(os.listdir(weights)) == ["cache", "ffhq.pt"]
    assert os.listdir(weights / "cache") == [formats.RANDOM_FACE_WHEEL]
    G = msgan.load(weights / "ffhq.pt")
    assert f"{G.img_resolution} {G.w_avg.sum().item()}\n" == outputs[0][0]


# ----------------------------------------------------------------------------------------------
# formats.py: the loaders' guarantees one by one, as readable examples (the hostile corpus, at the end, tries them all)


class Payload:
    """Unpickling this runs code: builtins.exec, which creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def poke(t, rng, value):
    """A copy of float tensor t with one random element set to value."""
    t = t.clone()
    t.view(-1)[rng.randrange(t.numel())] = value
    return t


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, ref, zip_format):
    """A checkpoint with a __reduce__ payload (here builtins.exec, which would create a file): msgan.load refuses it
    for every part without running it; torch.load(weights_only=False) on the same file runs it."""
    marker, path = tmp_path / "ran", tmp_path / "ckpt.pt"
    ckpt = {**ref["rosinality"]["checkpoint"], "args": Payload(marker)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    for part in ("generator", "teacher", "discriminator"):
        with pytest.raises(msgan.CheckpointError, match=rf"^{re.escape(str(path))}: refused: it references exec"):
            msgan.load(path, part=part)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_nan_and_integer_weights_are_refused_naming_the_key(tmp_path, ref):
    g_ema = dict(ref["rosinality"]["checkpoint"]["g_ema"])
    key = "convs.2.conv.weight"
    torch.save({"g_ema": {**g_ema, key: poke(g_ema[key], random.Random(0), float("nan"))}}, tmp_path / "nan.pt")
    with pytest.raises(msgan.CheckpointError, match=rf"nan\.pt: generator: key '{key}' holds non-finite values"):
        msgan.load(tmp_path / "nan.pt")
    torch.save({"g_ema": {**g_ema, key: g_ema[key].long()}}, tmp_path / "int.pt")
    with pytest.raises(msgan.CheckpointError, match=rf"int\.pt: generator: key '{key}' is a torch.int64"):
        msgan.load(tmp_path / "int.pt")


def test_a_flipped_exponent_bit_is_refused_before_it_draws_nan(tmp_path, ref, monkeypatch):
    """One bit of one float32 weight of the official student flipped in the file, the top bit of its exponent (0.5
    becomes 1.7e38): every weight is still finite, yet the network would draw NaN. msgan.load refuses it, naming
    the key, as it refuses any magnitude beyond formats.MAX_ABS_VALUE (1e6 here)."""
    ckpt = ref["mobilestylegan"]["checkpoint"]
    key = "student.layers.0.up.modulation.bias"  # the style of the first IDWT upsampling
    weight = ckpt["state_dict"][key]
    flipped = weight.clone()
    index = ((flipped.abs() >= 0.5) & (flipped.abs() < 1)).view(-1).nonzero()[0]  # exponent 126: its top bit is 0
    flipped.view(-1).view(torch.int32)[index] ^= 1 << 30
    assert torch.isfinite(flipped).all() and flipped.abs().max() > 1e38
    for name, tensor in (("flipped", flipped), ("large", poke(weight, random.Random(0), 1e6))):
        torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], key: tensor}}, tmp_path / f"{name}.pt")
        with pytest.raises(msgan.CheckpointError, match=rf"{name}\.pt: generator: key '{key}' holds a value of "
                           r"magnitude [\d.e+]+, beyond any trained weight"):
            msgan.load(tmp_path / f"{name}.pt")
    monkeypatch.setattr(formats, "MAX_ABS_VALUE", math.inf)  # without the bound: what the file would draw
    G = msgan.load(tmp_path / "flipped.pt")
    with torch.no_grad():
        assert torch.isnan(G(torch.randn(8, G.z_dim, generator=torch.Generator().manual_seed(0)))).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_precisions_load_as_float32_with_a_warning(tmp_path, ref, r, dtype):
    """The dtype policy: float64/float16/bfloat16 tensors are converted to float32, and msgan.load says so."""
    ckpt = ref["rosinality"]["checkpoint"]
    torch.save({**ckpt, "g_ema": {k: v.to(dtype) for k, v in ckpt["g_ema"].items()}}, tmp_path / "other.pt")
    name = str(dtype).removeprefix("torch.")
    with pytest.warns(UserWarning, match=rf"other\.pt: generator: converted \d+ {name} tensors to float32"):
        G = msgan.load(tmp_path / "other.pt")
    assert all(v.dtype == torch.float32 for v in G.state_dict().values())
    tol = {torch.float64: TOL, torch.float16: 0.05, torch.bfloat16: 0.2}[dtype]  # float16/bfloat16: ~3/~2 digits
    with torch.no_grad():
        assert_max_abs(G(r["z"]), r["img_z"], tol)


def test_absurd_config_is_refused_before_anything_is_built(tmp_path, teacher):
    """A msgan file whose config claims 2**16-wide layers: refused before a byte is allocated for them."""
    msgan.save(tmp_path / "ok.pt", generator=teacher)
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    ckpt["generator"]["config"]["channels"] = [2**16] * 9  # built for real: 2**32 * 9 floats per conv, ~1 TB
    torch.save(ckpt, tmp_path / "huge.pt")
    with pytest.raises(msgan.CheckpointError, match=r"huge\.pt: generator: key 'synthesis\.const' has shape"):
        msgan.load(tmp_path / "huge.pt")


# ----------------------------------------------------------------------------------------------
# formats.py: writing files: atomic, with the mode a plain open gives, safe from Ctrl-C; the PNG encoder


@pytest.mark.parametrize("when", ["tempfile.mkstemp", "os.replace"])
def test_a_ctrl_c_during_an_atomic_write_is_held_until_the_file_is_whole(when, tmp_path, monkeypatch):
    """The two moments a real Ctrl-C can hit: SIGINT right after the temp file is made, or right before the
    rename. The write completes, no temp file stays, then the KeyboardInterrupt arrives."""
    module_name, _, name = when.partition(".")
    module = {"tempfile": tempfile, "os": os}[module_name]
    real = getattr(module, name)

    def signal_then_call(*args, **kwargs):
        result = real(*args, **kwargs) if when == "tempfile.mkstemp" else None
        signal.raise_signal(signal.SIGINT)
        return result if when == "tempfile.mkstemp" else real(*args, **kwargs)
    path = tmp_path / "grid.png"
    monkeypatch.setattr(module, name, signal_then_call)
    with pytest.raises(KeyboardInterrupt):
        sample.save_image(Image.new("RGB", (4, 4)), str(path))
    monkeypatch.undo()
    assert not leftovers(tmp_path)
    Image.open(path).verify()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_files_get_the_mode_a_plain_open_would_give(umask, tmp_path):
    """Not the private 0600 of the temp file behind them: a PNG or a checkpoint is as readable as any new file."""
    previous = os.umask(umask)
    try:
        formats.save_png(np.zeros((2, 2, 3), np.uint8), str(tmp_path / "a.png"))
        formats.atomic_save({"x": 1}, str(tmp_path / "b.pt"))
    finally:
        os.umask(previous)
    for name in ("a.png", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_files_written_from_many_threads_keep_the_umask():
    """sample.py writes PNGs from a thread pool: reading the umask (set it, put it back) must not race, or a file
    comes out world-writable and the process can be left with umask 0."""
    previous, interval = os.umask(0o022), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: without the lock this races within ms
    try:
        seen = set()
        def read_often():
            seen.update(formats._current_umask() for _ in range(20000))
        threads = [threading.Thread(target=read_often) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen == {0o022} and os.umask(0o022) == 0o022
    finally:
        sys.setswitchinterval(interval)
        os.umask(previous)


@pytest.mark.parametrize("height, width", [(1, 1), (5, 7), (64, 33)])
def test_encode_png_is_a_lossless_png_any_reader_decodes(height, width):
    """formats.py's PNG encoder (Up filter, Huffman-only deflate): Pillow reads back the exact pixels, and the
    file is a plain 8-bit RGB PNG whose chunks carry valid CRCs (Pillow checks them)."""
    array = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(formats.encode_png(array)))
    assert image.format == "PNG" and image.mode == "RGB"
    image.load()
    assert np.array_equal(np.asarray(image), array)


# ----------------------------------------------------------------------------------------------
# sample.py, run in-process as `python sample.py ...` would run it (small reference student)


def test_sample_writes_pngs_and_grid_and_is_batch_invariant(ckpt_dir, tmp_path, capsys):
    model = ckpt_dir / "official.pt"
    assert run_sample("--model", model, "--seeds", "0-4", "--batch", 4, "--outdir", tmp_path / "a") == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert run_sample("--model", model, "--seeds", "3,4", "--batch", 1, "--outdir", tmp_path / "b") == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["grid.jpg"] + [f"seed{s:04d}.png" for s in range(5)]
    assert png(tmp_path / "a" / "seed0000.png").shape == (64, 64, 3)
    for seed in (3, 4):  # same seed, same image whatever the batch, to float rounding (BLAS sums a batch of 1
        # in another order): a value may move by one level, rarely
        a, b = (png(tmp_path / run / f"seed{seed:04d}.png").astype(int) for run in ("a", "b"))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    assert not np.array_equal(png(tmp_path / "a" / "seed0000.png"), png(tmp_path / "a" / "seed0001.png"))


def test_sample_renders_one_batch_per_core_with_the_same_images(ckpt_dir, tmp_path, monkeypatch):
    """Batches rendered at once by worker threads (one per core, each single-threaded) change the speed, not the
    images, their order in the grid or the PSNR list; the process's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert sample.worker_split(3, compiled=False) == (2, 1)
        assert sample.worker_split(1, compiled=False) == (1, 2) and sample.worker_split(3, compiled=True) == (1, 2)
        args = ["--model", ckpt_dir / "official.pt", "--compare", ckpt_dir / "rosinality.pt", "--seeds", "0-5",
                "--batch", 2]
        assert run_sample(*args, "--outdir", tmp_path / "two") == 0
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(sample, "MAX_WORKERS", 1)
        assert run_sample(*args, "--outdir", tmp_path / "one") == 0
    finally:
        torch.set_num_threads(threads)
    for seed in range(6):
        a, b = (png(tmp_path / run / f"seed{seed:04d}.png").astype(int) for run in ("one", "two"))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    a, b = (np.asarray(Image.open(tmp_path / run / "grid.jpg")).astype(int) for run in ("one", "two"))
    assert np.abs(a - b).mean() < 0.5  # the same tiles in the same places (JPEG noise aside)


def test_sample_compile_falls_back_to_eager_with_one_warning(ckpt_dir, tmp_path, capsys, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(torch, "compile", no_compiler)
    assert run_sample("--model", ckpt_dir / "official.pt", "--compile", "--seeds", "0", "--outdir", tmp_path) == 0
    assert capsys.readouterr().err.count("--compile unavailable (RuntimeError: no working C++ compiler)") == 1
    assert (tmp_path / "seed0000.png").exists()


def test_sample_bf16_runs_bfloat16_where_the_hardware_has_it_else_float32_with_one_warning(ckpt_dir, tmp_path,
                                                                                            capsys, monkeypatch):
    """--bf16: the synthesis in bfloat16 (close to float32, not equal), teacher | student pairs included (their
    noise is passed in float32); without bfloat16 hardware one warning, and float32's images."""
    args = ["--model", ckpt_dir / "official.pt", "--compare", ckpt_dir / "rosinality.pt", "--seeds", "0-1"]
    assert run_sample(*args, "--outdir", tmp_path / "float32") == 0
    monkeypatch.setattr(ops, "native_bf16", lambda device: True)
    assert run_sample(*args, "--bf16", "--outdir", tmp_path / "bf16") == 0
    monkeypatch.setattr(ops, "native_bf16", lambda device: False)
    capsys.readouterr()
    assert run_sample(*args, "--bf16", "--outdir", tmp_path / "emulated") == 0
    assert capsys.readouterr().err.count("warning: --bf16: no bfloat16 hardware") == 1
    for seed in (0, 1):
        a, b, c = (png(tmp_path / run / f"seed{seed:04d}.png").astype(float) for run in ("float32", "bf16", "emulated"))
        assert np.array_equal(a, c) and not np.array_equal(a, b)
        assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 35


def test_sample_grid_keeps_only_downscaled_tiles(ckpt_dir, tmp_path, monkeypatch):
    """Memory flat in -n: the grid is built from tiles made as each image arrives, never from full images."""
    monkeypatch.setattr(sample, "GRID_TILE", 16)
    made = []
    real_tile = sample.grid_tile
    monkeypatch.setattr(sample, "grid_tile", lambda array: made.append(real_tile(array)) or made[-1])
    assert run_sample("--model", ckpt_dir / "official.pt", "--seeds", "0-4", "--outdir", tmp_path) == 0
    assert [tile.size for tile in made] == [(16, 16)] * 5
    assert Image.open(tmp_path / "grid.jpg").size == (3 * 16, 2 * 16)


def test_sample_random_noise_is_seeded_per_image(ckpt_dir, tmp_path):
    model = ckpt_dir / "official.pt"
    for outdir, batch in (("a", 3), ("b", 1)):
        assert run_sample("--model", model, "-n", 3, "--noise-mode", "random", "--batch", batch,
                          "--outdir", tmp_path / outdir) == 0
    assert np.array_equal(png(tmp_path / "a" / "seed0002.png"), png(tmp_path / "b" / "seed0002.png"))
    run_sample("--model", model, "-n", 3, "--outdir", tmp_path / "const")
    assert not np.array_equal(png(tmp_path / "a" / "seed0002.png"), png(tmp_path / "const" / "seed0002.png"))


def test_sample_compare_writes_teacher_student_pairs_and_psnr(ckpt_dir, tmp_path, capsys):
    assert run_sample("--model", ckpt_dir / "official.pt", "--compare", ckpt_dir / "rosinality.pt",
                      "--seeds", "7", "--outdir", tmp_path) == 0
    pair = png(tmp_path / "seed0007.png")
    assert pair.shape == (64, 128, 3)  # teacher | student
    assert re.search(r"student vs teacher: PSNR [\d.]+ dB \(mean of 1 images", capsys.readouterr().out)
    # a model compared with itself: zero error, the ceiling 10 log10(2² / 1e-10) dB
    assert run_sample("--model", ckpt_dir / "rosinality.pt", "--compare", ckpt_dir / "rosinality.pt",
                      "--seeds", "0-1", "--outdir", tmp_path / "same") == 0
    assert "PSNR 106.02 dB" in capsys.readouterr().out


def test_sample_interpolate_writes_a_looping_gif(ckpt_dir, tmp_path):
    assert run_sample("--model", ckpt_dir / "official.pt", "--interpolate", "--seeds", "0-1",
                      "--frames", 3, "--outdir", tmp_path) == 0
    gif = Image.open(tmp_path / "interpolation.gif")
    assert gif.n_frames == 6 and gif.info["loop"] == 0


@pytest.mark.parametrize("args", [["--trunc", "abc"], ["--seeds", "3-x"], ["-n", "0"], ["--noise-mode", "loud"],
                                  ["-n", "2", "--seeds", "0-1"]])
def test_sample_bad_flags_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_sample(*args)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_sample_bad_model_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    assert run_sample("--model", tmp_path / "missing.pt", "--outdir", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample.py: error:") and "missing.pt" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# export.py: the exported graphs compute PyTorch's images in a real runtime. Small models: the golden checkpoints
# (a 64x64 official student and a 64x64 rosinality teacher), exported through export.main exactly as
# `python export.py ...` would; onnxruntime, openvino and coremltools are test requirements.


OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # a CPU with bf16 support would otherwise compute in bf16


def pytorch_model(ckpts, model):
    return msgan.load(ckpts / f"{model}.pt")


def random_inputs(G, batch, seed=1):
    """z, a realistic w (the mapping of random z) and a realistic W+ code of `batch` samples."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(batch, G.z_dim, generator=g)
        w = G.mapping(torch.randn(batch, G.z_dim, generator=g))
        ws = G.mapping(torch.randn(batch * G.num_ws, G.z_dim, generator=g)).view(batch, G.num_ws, G.w_dim)
    return z, w, ws


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model", MODELS)
def test_onnx_matches_pytorch_for_w_and_wplus_at_batch_1_and_3(ckpts, exported, model):
    outdir = exported(model)
    assert sorted(os.listdir(outdir)) == ["mapping.onnx", "synthesis.onnx", "synthesis_wplus.onnx"]
    G = pytorch_model(ckpts, model)
    mapping, synthesis, wplus = (session(outdir / f"{n}.onnx") for n in ("mapping", "synthesis", "synthesis_wplus"))
    for batch in BATCHES:
        z, w, ws = random_inputs(G, batch)
        with torch.no_grad():
            assert max_abs(mapping.run(None, {"z": z.numpy()})[0], G.mapping(z)) <= TOL
            assert max_abs(synthesis.run(None, {"w": w.numpy()})[0], G.synthesis(w)) <= TOL
            assert max_abs(wplus.run(None, {"ws": ws.numpy()})[0], G.synthesis(ws)) <= TOL


@pytest.mark.parametrize("model", MODELS)
def test_noise_inputs_fed_the_const_noise_give_the_baked_image(ckpts, exported, model):
    G = pytorch_model(ckpts, model)
    baked, inputs = exported(model), exported(model, "--noise-input")
    noise = {f"noise_{i}": n.numpy() for i, n in enumerate(const_noise(G))}
    _, w, ws = random_inputs(G, 3)
    for graph, feed in (("synthesis", {"w": w.numpy()}), ("synthesis_wplus", {"ws": ws.numpy()})):
        with_inputs = session(inputs / f"{graph}.onnx")
        assert [i.name for i in with_inputs.get_inputs()] == [*feed, *noise]
        expected = session(baked / f"{graph}.onnx").run(None, feed)[0]
        assert max_abs(with_inputs.run(None, {**feed, **noise})[0], expected) <= TOL
    # other noise changes the image, exactly as in PyTorch
    other = [torch.randn_like(n) for n in const_noise(G)]
    feed = {"w": w.numpy(), **{f"noise_{i}": n.numpy() for i, n in enumerate(other)}}
    out = session(inputs / "synthesis.onnx").run(None, feed)[0]
    with torch.no_grad():
        assert max_abs(out, G.synthesis(w, noise=other)) <= TOL


def test_student_graph_is_the_inference_form(ckpts, exported):
    """Demodulation folded (no square roots left) and only the wavelet head that makes the image."""
    G = pytorch_model(ckpts, "student")
    model = onnx.load(exported("student") / "synthesis.onnx")
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Sqrt", "Reciprocal", "Pow"}, ops
    names = [init.name for init in model.graph.initializer]
    last = len(G.synthesis.blocks) - 1
    heads = {name.split(".to_wavelets")[0] for name in names if "to_wavelets" in name}
    assert heads == {f"synthesis.blocks.{last}"}, heads
    assert not [name for name in names if "style_inv" in name]
    # the batch axis is symbolic on the input and the output
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_metadata_describes_the_model(ckpts, exported):
    G = pytorch_model(ckpts, "student")
    meta = session(exported("student") / "mapping.onnx").get_modelmeta().custom_metadata_map
    assert (int(meta["img_resolution"]), int(meta["num_ws"])) == (G.img_resolution, G.num_ws)
    assert meta["noise"] == "baked const"
    assert np.array_equal(np.array(json.loads(meta["w_avg"]), np.float32), G.w_avg.numpy())


def test_fp16_student_stays_close_and_keeps_float32_io(ckpts, tmp_path):
    export.main(["onnx", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path), "--fp16"])
    model = onnx.load(tmp_path / "synthesis.onnx")
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert {init.data_type for init in model.graph.initializer} & floats == {onnx.TensorProto.FLOAT16}
    G = pytorch_model(ckpts, "student")
    _, w, _ = random_inputs(G, 3)
    out = session(tmp_path / "synthesis.onnx").run(None, {"w": w.numpy()})[0]
    assert out.dtype == np.float32
    with torch.no_grad():
        assert max_abs(out, G.synthesis(w)) <= export.PARITY_ATOL_FP16


def test_int8_students_keep_a_quarter_of_the_bytes_and_stay_close_to_float32(ckpts, tmp_path, capsys):
    """--int8 writes two int8 models beside the float32 files. In both every float convolution and style affine reads
    int8 weights through a DequantizeLinear; synthesis_int8.onnx computes its last blocks in integer arithmetic
    (QLinearConv, no float Conv there) and takes one sample, synthesis_int8_weights.onnx keeps float32 activations
    and any batch. Each keeps the float model's metadata and its PSNR against float32 is printed. The bars are this
    small model's (FFHQ's figures are in the README)."""
    export.main(["onnx", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path), "--int8"])
    printed = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["mapping.onnx", "synthesis.onnx", "synthesis_int8.onnx",
                                            "synthesis_int8_weights.onnx"]
    G = pytorch_model(ckpts, "student")
    _, w, _ = random_inputs(G, 3)
    reference = np.clip(session(tmp_path / "synthesis.onnx").run(None, {"w": w.numpy()})[0], -1, 1)
    float_model = onnx.load(tmp_path / "synthesis.onnx")
    for name, min_psnr, batch in [("synthesis_int8.onnx", 30, 1), ("synthesis_int8_weights.onnx", 35, 3)]:
        model = onnx.load(tmp_path / name)
        int8 = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8}
        made_by = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm"):
                weight = made_by[node.input[1]]
                assert weight.op_type == "DequantizeLinear" and weight.input[0] in int8, (name, node.name)
        integer_convs = sum(node.op_type == "QLinearConv" for node in model.graph.node)
        # per int8 block: depthwise and pointwise convs of its two layers (the IDWT is a float ConvTranspose)
        assert integer_convs == (4 * min(export.INT8_BLOCKS, len(G.synthesis.blocks)) + 1 if batch == 1 else 0), name
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["dtype"] == export.INT8_MODELS[name] and meta["img_resolution"] == "64" and "w_avg" in meta
        weight_bytes = [sum(onnx.numpy_helper.to_array(init).nbytes for init in m.graph.initializer)
                        for m in (model, float_model)]  # this small graph's nodes weigh more than its weights
        assert weight_bytes[0] < 0.3 * weight_bytes[1], name
        quantised = np.clip(session(tmp_path / name).run(None, {"w": w[:batch].numpy()})[0], -1, 1)
        assert quantised.shape == (batch, 3, 64, 64)
        assert 10 * np.log10(4 / np.mean((quantised - reference[:batch]) ** 2)) > min_psnr, name
        assert re.search(rf"{re.escape(name)}: 0\.\d\dx the float32 file; PSNR against it \d+\.\d\d dB", printed)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="dimensions"):
        session(tmp_path / "synthesis_int8.onnx").run(None, {"w": w[:2].numpy()})  # per-sample weights: batch 1
    # onnxruntime folds the int8 models' weight dequantisation at load, and not the float32 model's
    for name, folded in [("synthesis.onnx", False)] + [(name, True) for name in export.INT8_MODELS]:
        options = export.onnxruntime_session(ort, str(tmp_path / name)).get_session_options()
        with contextlib.nullcontext() if folded else pytest.raises(RuntimeError, match="does not have"):
            assert options.get_session_config_entry("session.disable_quant_qdq") == "1"


def test_int8_synthesis_in_pytorch_is_what_onnxruntime_runs(ckpts, tmp_path):
    """Int8Synthesis's forward specifies the exported int8 model: onnxruntime's integer kernels give the same image
    but for a rare rounding tie of the requantisation (float32 scales multiplied in another order), and both stay
    close to float32. Its int8 ops also agree one by one with the ONNX operators they export to."""
    G = pytorch_model(ckpts, "student").fold()
    calibration_w = [torch.from_numpy(w) for w in export.mapped_w(G, range(1000, 1000 + export.INT8_CALIBRATION_W))]
    module = export.Int8Synthesis(G, calibration_w).eval()
    path = tmp_path / "int8.onnx"
    with torch.no_grad(), export.quiet_tracing():
        torch.onnx.export(module, (calibration_w[0],), path, input_names=["w"], output_names=["img"],
                          opset_version=17, custom_opsets={"com.microsoft": 1}, dynamo=False)
        for seed in range(3):
            w = torch.from_numpy(export.mapped_w(G, [seed])[0])
            expected, onnx_image = module(w), session(path).run(None, {"w": w.numpy()})[0]
            assert np.mean((onnx_image - expected.numpy()) ** 2) < 4e-5  # PSNR above 50 dB (often identical)
            assert np.mean(np.abs(onnx_image - expected.numpy()) < 1e-5) > 0.99
            float_image = G.synthesis.forward_reference(w)
            assert 10 * torch.log10(4 / (expected.clamp(-1, 1) - float_image.clamp(-1, 1)).pow(2).mean()) > 25
    # one op: uint8 in, int8 weights with a scale per channel, int32 bias, uint8 out
    x = torch.randint(0, 256, (1, 8, 5, 5), dtype=torch.uint8)
    weight, w_scale = export.quantize_rows(torch.randn(6, 8, 1, 1))
    bias = torch.randint(-1000, 1000, (6,), dtype=torch.int32)
    y_pytorch = export.QLinearConv.apply(x, 0.02, 100, weight, w_scale, bias, 0.05, 128, 1, 0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"])], "one",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 8, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, 6, 5, 5])],
        [onnx.numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in [
            ("xs", 0.02, np.float32), ("xz", 100, np.uint8), ("w", weight.numpy(), np.int8),
            ("ws", w_scale.numpy(), np.float32), ("wz", np.zeros(6), np.int8), ("ys", 0.05, np.float32),
            ("yz", 128, np.uint8), ("b", bias.numpy(), np.int32)]])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "one.onnx")
    y_onnx = session(tmp_path / "one.onnx").run(None, {"x": x.numpy()})[0]
    assert np.abs(y_onnx.astype(int) - y_pytorch.numpy().astype(int)).max() <= 1


@pytest.mark.parametrize("argv, code, message", [
    (["torchscript", "--int8"], 2, "--int8 goes with onnx"),
    (["onnx", "--int8", "--fp16"], 2, "--int8 goes with onnx"),
    (["onnx", "--int8", "--noise-input"], 2, "--int8 goes with onnx"),
    (["onnx", "--int8", "--model", "{ckpts}/teacher.pt"], 1, "--int8 quantises a MobileStyleGAN student"),
    (["onnx", "--int8", "--model", "{ckpts}/student.pt", "--teacher"], 1, "--int8 quantises a MobileStyleGAN student"),
])
def test_int8_refuses_what_it_cannot_quantise(ckpts, tmp_path, capsys, argv, code, message):
    returned, err = run_main([arg.format(ckpts=ckpts) for arg in argv] + ["--outdir", str(tmp_path / "out")], capsys)
    assert returned == code and message in err.splitlines()[-1] and (code == 2 or err.count("\n") == 1)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_int8_without_onnxruntime_says_so_in_one_line(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    code, err = run_main(["onnx", "--int8", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path)], capsys)
    assert code == 1 and err == ("export.py: error: export.py --int8 needs the optional package onnxruntime, which is "
                                 "not installed (pip install onnxruntime)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model, part", [("student", "generator"), ("teacher", "generator"), ("student", "teacher")])
def test_torchscript_matches_pytorch(ckpts, tmp_path, model, part):
    """The rosinality teacher, the official student, and (--teacher) the official checkpoint's teacher."""
    flags = ["--teacher"] if part == "teacher" else []
    export.main(["torchscript", "--model", str(ckpts / f"{model}.pt"), "--outdir", str(tmp_path), "--wplus", *flags])
    G = msgan.load(ckpts / f"{model}.pt", part=part)
    synthesis = torch.jit.load(str(tmp_path / "synthesis.torchscript.pt"))
    wplus = torch.jit.load(str(tmp_path / "synthesis_wplus.torchscript.pt"))
    for batch in BATCHES:
        _, w, ws = random_inputs(G, batch)
        with torch.no_grad():
            assert max_abs(synthesis(w), G.synthesis(w)) <= TOL
            assert max_abs(wplus(ws), G.synthesis(ws)) <= TOL


def test_openvino_matches_pytorch(ckpts, tmp_path):
    import openvino as ov
    argv = ["openvino", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path), "--wplus", "--noise-input"]
    export.main(argv)
    G = pytorch_model(ckpts, "student")
    compiled = ov.Core().compile_model(str(tmp_path / "synthesis_wplus.xml"), "CPU", OPENVINO_F32)
    noise = {f"noise_{i}": n.numpy() for i, n in enumerate(const_noise(G))}
    for batch in BATCHES:
        _, _, ws = random_inputs(G, batch)
        with torch.no_grad():
            assert max_abs(compiled({"ws": ws.numpy(), **noise})[0], G.synthesis(ws)) <= TOL


def test_coreml_declares_the_expected_inputs_and_outputs(ckpts, tmp_path):
    import coremltools as ct
    export.main(["coreml", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path), "--wplus", "--noise-input"])
    G = pytorch_model(ckpts, "student")
    spec = ct.models.MLModel(str(tmp_path / "synthesis_wplus.mlpackage"), skip_model_load=True).get_spec().description
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.input}
    noise = {f"noise_{i}": [1, 1, r, r] for i, r in enumerate(G.synthesis.noise_resolutions)}
    assert inputs == {"ws": [1, G.num_ws, G.w_dim], **noise}
    assert [o.name for o in spec.output] == ["img"]
    batch_range = spec.input[0].type.multiArrayType.shapeRange.sizeRanges[0]
    assert batch_range.lowerBound == 1 and batch_range.upperBound != 1  # the batch axis is flexible


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    return e.value.code, capsys.readouterr().err


def test_unknown_format_is_an_argparse_error(capsys):
    code, err = run_main(["tflite"], capsys)
    assert code == 2 and "invalid choice: 'tflite'" in err


def test_unwritable_output_directory(ckpts, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_main(["onnx", "--model", str(ckpts / "student.pt"), "--outdir", str(blocker / "out")], capsys)
    assert code == 1
    assert err.startswith("export.py: error: cannot write to the output directory") and err.count("\n") == 1


def test_checkpoint_that_fails_to_load(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, err = run_main(["onnx", "--model", str(bad), "--outdir", str(tmp_path / "out")], capsys)
    assert code == 1 and err.startswith(f"export.py: error: {bad}: not a readable checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_parity_failure_fails_and_keeps_no_file(ckpts, tmp_path, capsys, monkeypatch):
    (tmp_path / "synthesis.onnx").write_bytes(b"an older export")
    monkeypatch.setattr(export, "PARITY_ATOL", -1.0)  # no graph can pass
    code, err = run_main(["onnx", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path)], capsys)
    assert code == 1 and "differs from PyTorch" in err
    assert sorted(os.listdir(tmp_path)) == ["synthesis.onnx"]
    assert (tmp_path / "synthesis.onnx").read_bytes() == b"an older export"


def test_missing_onnxruntime_is_a_warning_not_a_failure(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    export.main(["onnx", "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path)])
    captured = capsys.readouterr()
    assert "warning: onnxruntime is not installed" in captured.err and "onnx.checker ok" in captured.out
    assert sorted(os.listdir(tmp_path)) == ["mapping.onnx", "synthesis.onnx"]


@pytest.mark.parametrize("fmt, package", [("openvino", "openvino"), ("coreml", "coremltools")])
def test_missing_optional_package_is_a_clear_error(ckpts, tmp_path, capsys, monkeypatch, fmt, package):
    monkeypatch.setitem(sys.modules, package, None)
    code, err = run_main([fmt, "--model", str(ckpts / "student.pt"), "--outdir", str(tmp_path / "out")], capsys)
    assert code == 1 and f"pip install {package}" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_command_line_exit_status_and_message(tmp_path):
    """The real command: `python export.py onnx --model <broken file>` exits 1 with one line on stderr."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK truncated download")
    command = [sys.executable, "export.py", "onnx", "--model", str(bad), "--outdir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("export.py: error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def ffhq_reference_check(run):
    """run(w [3, 512]) -> img [3, 3, 1024, 1024]; compared with ffhq_public.npz as test_msgan.py does."""
    ref = np.load(REF / "ffhq_openvino" / "ffhq_public.npz")
    img = np.concatenate([run(ref["w"][i:i + 1]) for i in range(len(ref["w"]))])  # batch 1: lighter on memory
    pooled = img.reshape(3, 3, 128, 8, 128, 8).mean((3, 5))
    crops = np.stack([img[b, :, y:y + 64, x:x + 64] for b, y, x in ref["crop_where"]])
    assert max_abs(pooled, ref["pooled"]) <= FFHQ_TOL
    assert max_abs(crops, ref["crops"]) <= FFHQ_TOL


def test_ffhq_onnx_matches_the_reference_and_reports_speed(tmp_path, capsys):
    export.main(["onnx", "--outdir", str(tmp_path), "--batch", "1"])  # --model defaults to ffhq
    out = capsys.readouterr().out
    assert "synthesis.onnx in onnxruntime" in out and "ms/image at 1024x1024" in out
    synthesis = session(tmp_path / "synthesis.onnx")
    ffhq_reference_check(lambda w: synthesis.run(None, {"w": w})[0])


def test_ffhq_openvino_matches_the_reference(tmp_path):
    import openvino as ov
    export.main(["openvino", "--outdir", str(tmp_path), "--batch", "1"])
    compiled = ov.Core().compile_model(str(tmp_path / "synthesis.xml"), "CPU", OPENVINO_F32)
    ffhq_reference_check(lambda w: compiled({"w": w})[0])
    # the IR holds the weights, not the noise maps and biases folded into full-size constants (273 MB)
    assert os.path.getsize(tmp_path / "synthesis.bin") < 1.05 * os.path.getsize(tmp_path / "synthesis.onnx")


def test_sample_and_onnx_export_of_an_nvidia_pickle(tmp_path, capsys):
    assert run_sample("--model", NV_PKL, "--seeds", "0-1", "--outdir", tmp_path / "samples") == 0
    assert png(tmp_path / "samples" / "seed0001.png").shape == (64, 64, 3)
    export.main(["onnx", "--model", str(NV_PKL), "--outdir", str(tmp_path / "onnx")])
    assert "onnx.checker ok" in capsys.readouterr().out
    synthesis = tmp_path / "onnx" / "synthesis.onnx"
    assert any(node.op_type == "Clip" for node in onnx.load(synthesis).graph.node)  # conv_clamp is in the graph
    G = msgan.load(NV_PKL)
    _, w, _ = random_inputs(G, 3)
    with torch.no_grad():
        assert max_abs(session(synthesis).run(None, {"w": w.numpy()})[0], G.synthesis(w)) <= TOL


def test_bench_times_every_path_in_its_own_process(monkeypatch):
    """sample.py --bench at a toy size: every path of teacher and student gives a time, a throughput and a peak
    RSS, and the table states the ratios. The bfloat16 row is there where the hardware computes bfloat16."""
    monkeypatch.setattr(ops, "native_bf16", lambda device: True)
    rows = export.bench(resolutions=(16,), rounds=1)
    paths = [(row["model"], row["path"]) for row in rows]
    assert paths[:4] == [("teacher", "reference"), ("student", "reference"), ("student", "inference"),
                         ("student", "inference-bf16")]
    for path in export.BENCH_ONNX:  # onnxruntime is among the test extras
        assert ("student", path) in paths
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["img_s"] > 0 and 50e6 < row["rss"] < 8e9, row
    table = export.bench_table(rows, torch.get_num_threads())
    assert "16px: teacher / student" in table and "16px: inference path / reference path" in table
    assert "16px: onnxruntime int8 / float32" in table
    assert "16px: inference path bfloat16 / float32" in table
    monkeypatch.setattr(ops, "native_bf16", lambda device: False)
    assert ("student", 16, "inference-bf16") not in export.bench_paths((16,), "cpu", False)


def test_bench_reports_a_worker_killed_mid_run_and_finishes_the_others(monkeypatch):
    """A worker the kernel kills (out of memory, say) is a failed row with a reason, not a traceback."""
    two_paths = [("student", 16, "reference"), ("student", 16, "inference")]
    monkeypatch.setattr(export, "bench_paths", lambda *args: two_paths)
    sleep, killed = time.sleep, []

    def kill_one_worker_first(seconds):  # the bench waits BENCH_SETTLE_S before it asks a worker for a forward
        if not killed:
            victim = max(multiprocessing.active_children(), key=lambda process: process.pid)  # the last started
            os.kill(victim.pid, signal.SIGKILL)
            victim.join()
            killed.append(victim)
        sleep(seconds)
    monkeypatch.setattr(time, "sleep", kill_one_worker_first)
    rows = export.bench(resolutions=(16,), rounds=1)
    assert sorted("error" in row for row in rows) == [False, True]
    assert [row["error"] for row in rows if "error" in row] == [export.WORKER_DIED]
    assert all(row["ms"] > 0 and row["img_s"] > 0 for row in rows if "error" not in row)
    assert "failed: its process ended without answering" in export.bench_table(rows, 1)


# ----------------------------------------------------------------------------------------------
# fid.py: pytorch-fid's Inception, torchvision's VGG16 taps, FID and KID (golden data in ../shared/reference/fid).
# The networks use the synthetic weights of the reference folder's make_weights.py (base seed 1000), so no
# download is needed. Float32 activations: atol = rtol = 1e-4 (another CPU than the one that made the data).


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, atol=FID_ATOL, rtol=FID_RTOL)


def write_pngs(folder, count, size, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_inception_has_the_published_key_names(inception):
    manifest = json.loads((FID_REF / "inception_fid_manifest.json").read_text())["keys"]
    published = {e["key"] for e in manifest if not e["key"].startswith("fc.")}  # fc: unused classifier
    assert set(inception.state_dict()) == published


def test_inception_blocks_on_64x64_input(inception):
    expected = np.load(FID_REF / "inception_expected_64.npz")
    blocks = np.load(FID_REF / "inception_blocks_img0_64.npz")
    with torch.no_grad():
        outs = inception(torch.from_numpy(expected["x"]), taps=(0, 1, 2, 3))
        feat64 = inception.features(torch.from_numpy(expected["x"]), dims=64)  # runs block 0 only
    assert_close(outs[3].flatten(1), expected["feat2048"])
    for block, dims in enumerate((64, 192, 768)):
        assert_close(outs[block][0], blocks[f"block{block}"])
        assert_close(fid.global_avg_pool(outs[block]).flatten(1), expected[f"pooled_dim{dims}"])
    assert_close(feat64, expected["pooled_dim64"])


@pytest.mark.parametrize("name", ["299", "down"])  # 299: resize is an identity; down: 400x333 -> 299
def test_inception_features_of_uint8_images(inception, name):
    expected = np.load(FID_REF / f"inception_expected_{name}.npz")
    with torch.no_grad():
        feats = inception.features(torch.from_numpy(expected["x_uint8"]).float() / 255)
    assert_close(feats, expected["feat2048"])


def test_inception_stays_in_eval_mode(inception):
    inception.train()
    assert not inception.training and not inception.Mixed_7c.branch_pool.bn.training


def test_weights_load_with_or_without_batchnorm_counters(inception_sd):
    without = {k: v for k, v in inception_sd.items() if not k.endswith("num_batches_tracked")}
    assert len(without) == len(inception_sd) - 94
    for sd in (inception_sd, without):
        net = fid.load_matching(fid.InceptionV3(), sd)
        assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"])
    with pytest.raises(fid.FIDError, match="lacks 1 of"):
        incomplete = {k: v for k, v in without.items() if k != "Mixed_6e.branch1x1.conv.weight"}
        fid.load_matching(fid.InceptionV3(), incomplete)


def test_vgg16_taps(vgg):
    a, b = np.load(FID_REF / "vgg16_expected_a.npz"), np.load(FID_REF / "vgg16_expected_b.npz")
    x = fid.imagenet_normalize(torch.from_numpy(a["x"]))
    np.testing.assert_allclose(x.numpy(), a["x_normalized"], atol=1e-6)
    with torch.no_grad():
        taps = vgg(x)
    assert list(taps) == ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
    assert_close(taps["relu1_2"], a["relu1_2"])
    for name in ("relu2_2", "relu3_3", "relu4_3"):
        assert_close(taps[name], b[name])


def test_png_folder_like_pytorch_fid(inception):
    expected = np.load(FID_REF / "png_expected.npz")
    paths = fid.list_images(FID_REF / "pngs")
    assert [p.name for p in paths] == ["img_1.png", "img_10.png", "img_2.png", "img_3.png"]  # sorted
    images = next(fid.folder_batches(paths, batch_size=50))  # RGB, gray (L) and RGBA files
    rgb = torch.from_numpy(expected["rgb_uint8_after_convert"])  # NHWC uint8
    assert torch.equal(images, rgb.permute(0, 3, 1, 2) / 255)
    act2048 = fid.activations(inception, fid.folder_batches(paths, 50), len(paths))
    assert act2048.dtype == np.float64
    assert_close(act2048, expected["act2048"])
    mu, sigma = fid.statistics(fid.activations(inception, fid.folder_batches(paths, 3), len(paths), dims=64))
    assert_close(mu, expected["mu64"])
    assert_close(sigma, expected["sigma64"])


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(fid.FIDError, match="no images"):
        fid.list_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(fid.FIDError, match="cannot read image"):
        next(fid.folder_batches(fid.list_images(tmp_path), 2))
    mixed = tmp_path / "mixed"
    write_pngs(mixed, 1, 8, seed=0)
    Image.new("RGB", (9, 8)).save(mixed / "1.png")
    with pytest.raises(fid.FIDError, match="equal size"):
        next(fid.folder_batches(fid.list_images(mixed), 2))
    assert len(list(fid.folder_batches(fid.list_images(mixed), 1))) == 2  # one image per batch is fine
    with pytest.raises(fid.FIDError, match="at least 2 samples"):
        fid.statistics(np.zeros((1, 64)))


@pytest.mark.parametrize("first, second, case, rtol", [
    ("A", "B", "fid_A_B", 1e-9),  # full rank: all methods agree to ~1e-13
    ("C_rankdef", "D_rankdef", "fid_C_D_rank_deficient", 1e-6),  # methods differ by ~5e-7 absolute
    # 10 samples in 64 dims: scipy 1.17.1 gives this value, scipy 1.11.4 raises; we agree to ~7e-9
    ("E_severe", "F_severe", "fid_E_F_severely_rank_deficient", 1e-6),
])
def test_frechet_distance_matches_pytorch_fid(first, second, case, rtol):
    arrays = np.load(FID_REF / "fid_kid_arrays.npz")
    expected = json.loads((FID_REF / "fid_kid_expected.json").read_text())[case]
    value = fid.frechet_distance(*fid.statistics(arrays[first]), *fid.statistics(arrays[second]))
    assert value == pytest.approx(expected["pytorch_fid_calculate_frechet_distance"], rel=rtol)


def test_frechet_distance_of_identical_statistics_is_zero():
    stats = fid.statistics(np.load(FID_REF / "fid_kid_arrays.npz")["A"])
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-9
    with pytest.raises(fid.FIDError, match="feature sizes differ"):
        fid.frechet_distance(*stats, np.zeros(32), np.eye(32))


def test_kid_matches_torch_fidelity():
    arrays = np.load(FID_REF / "fid_kid_arrays.npz")
    expected = json.loads((FID_REF / "fid_kid_expected.json").read_text())["kid"]
    a, b = arrays["A"], arrays["B"]
    per_subset = fid.kid_on_subsets(a, b, arrays["kid_idx1"], arrays["kid_idx2"])
    np.testing.assert_allclose(per_subset, arrays["kid_per_subset"], rtol=0, atol=1e-9)
    assert per_subset.mean() == pytest.approx(expected["subsets"]["kid_mean"], abs=1e-9)
    # kid() draws its subsets like torch-fidelity, so the same seed gives the same subsets
    mean, std = fid.kid(a, b, subsets=50, subset_size=100, seed=2020)
    assert mean == pytest.approx(expected["subsets"]["kid_mean"], abs=1e-9)
    assert std == pytest.approx(expected["subsets"]["kid_std"], abs=1e-9)
    full_set = expected["full_set_deterministic"]["kid_mean"]
    assert fid.mmd2_unbiased(a, b[:256]) == pytest.approx(full_set, abs=1e-9)
    unequal_sizes = expected["unequal_sizes_full_unbiased_OWN_FORMULA"]["value"]
    assert fid.mmd2_unbiased(a, b) == pytest.approx(unequal_sizes, abs=1e-9)


def test_stats_npz_round_trip(tmp_path):
    mu, sigma = fid.statistics(np.load(FID_REF / "fid_kid_arrays.npz")["A"])
    fid.save_stats(tmp_path / "a.npz", mu, sigma)
    with np.load(tmp_path / "a.npz") as f:
        assert sorted(f.files) == ["mu", "sigma"]  # pytorch-fid's keys
    mu2, sigma2 = fid.load_stats(tmp_path / "a.npz", dims=64)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(fid.FIDError, match="64-dim features but 2048-dim"):
        fid.load_stats(tmp_path / "a.npz", dims=2048)


def test_missing_weights_offline_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected_place = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(fid.FIDError, match="put it at " + str(expected_place)):
        fid.load_inception()
    expected_place.write_bytes(b"some other file")  # placed by hand, but not the published file
    with pytest.raises(fid.FIDError, match=fid.INCEPTION_SHA256):
        fid.load_inception()


def run_cli(*args):
    command = [sys.executable, str(FID_PY), *map(str, args)]
    # one OpenMP thread: spinning thread pools crawl when the 2 CPU cores are shared with other work
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_cli_fid_and_kid_of_two_folders(tmp_path, inception_file):
    a = write_pngs(tmp_path / "a", 4, 32, seed=1)
    b = write_pngs(tmp_path / "b", 5, 32, seed=2)
    result = run_cli(a, b, "--inception", inception_file, "--kid", "--batch", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FID: ") and float(lines[0].split()[1]) > 0
    assert lines[1].startswith("KID: ")
    assert "FID of fewer than 2048 samples is biased" in result.stderr


def test_cli_empty_folder_is_a_one_line_error(tmp_path, inception_file):
    (tmp_path / "empty").mkdir()
    b = write_pngs(tmp_path / "b", 2, 16, seed=2)
    result = run_cli(tmp_path / "empty", b, "--inception", inception_file)
    assert result.returncode != 0
    assert result.stderr.startswith("fid.py: error: no images") and result.stderr.count("\n") == 1


def test_cli_save_stats_then_compare_with_npz(tmp_path, inception_file, capsys):
    a = write_pngs(tmp_path / "a", 3, 24, seed=3)
    weights = ["--inception", str(inception_file), "--device", "cpu"]
    fid.main([str(a), "--save-stats", str(tmp_path / "a.npz"), "--dims", "64", *weights])
    fid.main([str(a), str(tmp_path / "a.npz"), "--dims", "64", *weights])
    assert abs(float(capsys.readouterr().out.splitlines()[-1].split()[1])) < 1e-6  # same images: FID 0
    with pytest.raises(SystemExit) as exit_info:  # the stats file holds 64-dim features
        fid.main([str(a), str(tmp_path / "a.npz"), *weights])
    assert exit_info.value.code == 1
    assert "64-dim features but 2048-dim" in capsys.readouterr().err


def test_cli_generates_from_a_model(tmp_path, inception_file, ckpt_dir, capsys):
    ref = write_pngs(tmp_path / "ref", 3, 16, seed=4)
    fid.main(["--model", str(ckpt_dir / "official.pt"), "-n", "5", "--batch", "2", "--seed", "7",
              "--ref", str(ref), "--inception", str(inception_file), "--dims", "64", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("FID: ") and float(out.split()[1]) > 0


def test_generated_batches_are_seeded_per_batch(student):
    batches = list(fid.generated_batches(student, n=5, batch_size=2, device="cpu", seed=7))
    assert [len(b) for b in batches] == [2, 2, 1]   # batch i uses manual_seed(seed + i)
    z = torch.randn(1, student.z_dim, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = ((student(z) * 127.5 + 128).clamp(0, 255).to(torch.uint8).float() / 255)
    assert torch.equal(batches[2], expected)


def test_generated_images_are_quantised_like_png():
    class ConstantGenerator:
        z_dim = 4

        def __call__(self, z, psi, noise_mode):
            return torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 1, 4).expand(len(z), 3, 1, 4)

    (images,) = fid.generated_batches(ConstantGenerator(), n=2, batch_size=2, device="cpu")
    png_values = torch.tensor([0, 128, 255, 255], dtype=torch.uint8)  # what a saved PNG would hold
    assert torch.equal(images[0, 0, 0], png_values.float() / 255)


# ----------------------------------------------------------------------------------------------
# train.py: distillation, run as `python train.py ...` runs it (in-process through train.main, or as a
# subprocess where signals or several processes are involved). A random 16x16 teacher keeps runs short.


def train_subprocess(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two spinning thread pools on 2 shared cores crawl
    return subprocess.Popen([sys.executable, str(TRAIN_PY), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def log_lines(outdir):
    return [json.loads(line) for line in (Path(outdir) / "log.jsonl").read_text().splitlines()]


def train_state(path):
    """Everything a run's checkpoint holds that training changes: parameters, optimisers, EMA, D, step."""
    ckpt = torch.load(path, weights_only=True)
    return ckpt["train"], ckpt["generator"]["state_dict"], ckpt["discriminator"]["state_dict"]


def assert_same_tensors(a, b, atol=0.0):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y, atol)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= atol
    elif isinstance(a, float) and atol:
        assert abs(a - b) <= atol * max(1.0, abs(a))
    else:
        assert a == b


def test_distilling_the_golden_teacher_lowers_the_loss_and_raises_psnr(ckpt_dir, tmp_path):
    """A few dozen CPU steps from the public rosinality teacher (64x64, random weights): loss down, validation PSNR
    up (+1.8 to +3.0 dB for seeds 0-2; its noise-like images need the high lr to move PSNR in 40 steps)."""
    out = tmp_path / "run"
    assert run_train("--teacher", ckpt_dir / "rosinality.pt", "--steps", 40, "--batch", 8, "--log-every", 8,
                     "--val-samples", 16, "--lr", "5e-3", "--trunc", "0.5", "--outdir", out) == 0
    logs = log_lines(out)
    assert [r["step"] for r in logs] == [8, 16, 24, 32, 40]
    first, last = logs[0], logs[-1]
    assert last["l1"] + last["l2"] < 0.8 * (first["l1"] + first["l2"])
    assert last["val_distill"] < 0.8 * first["val_distill"] and last["psnr_db"] > first["psnr_db"] + 1.0
    assert {"l1", "l2", "gan", "d", "lr", "img_per_s", "images"} <= set(last)
    assert sorted(os.listdir(out)) == ["best.pt", "grids", "last.pt", "log.jsonl"]
    grid = Image.open(out / "grids" / "0000040.png")
    assert grid.size == (3 * 4 * 64 + 2 * 2, 4 * 64)  # teacher | student | EMA student, 4x4 each
    # the checkpoint is a msgan file: its generator is the EMA student, its teacher the teacher
    student, teacher = msgan.load(out / "last.pt"), msgan.load(out / "last.pt", part="teacher")
    assert student.is_student and not teacher.is_student and student.img_resolution == 64
    ema = torch.load(out / "last.pt", weights_only=True)["generator"]["state_dict"]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in ema.items())
    assert sample.main(["--model", str(out / "last.pt"), "--seeds", "0-1", "--outdir", str(tmp_path / "s")]) == 0


def test_a_run_ends_naming_its_model_and_the_command_that_samples_it(tiny_teacher, tmp_path, capsys):
    """The last lines say where the model is and how to sample it (the command works as printed), and the grids
    of small models are enlarged, nearest neighbour, so that 16x16 images show at 64x64."""
    out = tmp_path / "run"
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", out) == 0
    done, command = capsys.readouterr().out.splitlines()[-2:]
    assert done.startswith(f"done: {out / 'best.pt'} holds the student") and str(out / "last.pt") in done
    assert command == f"sample it: python sample.py --model {out / 'best.pt'} --compare {out / 'best.pt'} -n 16"
    assert sample.main([*command.split()[4:], "--outdir", str(tmp_path / "samples")]) == 0
    grid = np.asarray(Image.open(out / "grids" / "0000002.png"))
    assert grid.shape == (2 * 64, 3 * 2 * 64 + 2 * 2, 3)  # teacher | student | EMA student, 2x2 tiles of 64x64
    teacher_panel = grid[:, :2 * 64]
    assert (teacher_panel[0::4, 0::4] == teacher_panel[3::4, 3::4]).all()  # each pixel of a 16x16 image: 4x4


def test_resume_continues_bit_identically(tiny_teacher, tmp_path):
    common = ["--teacher", tiny_teacher, *QUICK, "--gan", "0.5"]
    assert run_train(*common, "--steps", 4, "--outdir", tmp_path / "a") == 0
    assert run_train("--resume", tmp_path / "a" / "last.pt", "--steps", 8) == 0
    assert run_train(*common, "--steps", 8, "--outdir", tmp_path / "b") == 0
    resumed, straight = train_state(tmp_path / "a" / "last.pt"), train_state(tmp_path / "b" / "last.pt")
    assert resumed[0]["step"] == straight[0]["step"] == 8
    for name in ("G", "opt_g", "opt_d", "rng"):
        assert_same_tensors(resumed[0][name], straight[0][name])
    assert_same_tensors(resumed[1], straight[1])  # EMA student
    assert_same_tensors(resumed[2], straight[2])  # discriminator
    assert [r["step"] for r in log_lines(tmp_path / "a")] == [2, 4, 6, 8]


def test_resume_may_lower_the_learning_rates_and_lengthen_the_ema(tiny_teacher, tmp_path, capsys):
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", tmp_path) == 0
    assert run_train("--resume", tmp_path / "last.pt", "--steps", 4, "--lr", 1e-4, "--d-lr", 2e-4,
                     "--ema-kimg", 7, "--batch", 3) == 0
    assert "ignoring --batch" in capsys.readouterr().err  # not an override: the checkpoint's batch stays
    state = train_state(tmp_path / "last.pt")[0]
    assert [g["lr"] for g in state["opt_g"]["param_groups"]] == [1e-4]
    assert [g["lr"] for g in state["opt_d"]["param_groups"]] == [2e-4]
    assert (state["args"]["lr"], state["args"]["d_lr"], state["args"]["ema_kimg"]) == (1e-4, 2e-4, 7)
    assert state["args"]["batch"] != 3
    # a value equal to the default is still given: back to the default lr after a run at another one
    assert run_train("--resume", tmp_path / "last.pt", "--steps", 6, "--lr", train.DISTILL_DEFAULTS["lr"]) == 0
    state = train_state(tmp_path / "last.pt")[0]
    assert [g["lr"] for g in state["opt_g"]["param_groups"]] == [train.DISTILL_DEFAULTS["lr"]]
    assert [g["lr"] for g in state["opt_d"]["param_groups"]] == [2e-4]


DDP_WRAPPER = '''
import sys, torch, torch.distributed as dist, train
args, _ = train.parse_args(sys.argv[1:])
run = train.train(args)
torch.save(run.G.state_dict(), f"{args.outdir}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
'''


def test_ddp_two_processes_keep_ranks_identical_and_match_one_process(tiny_teacher, tmp_path):
    """torchrun, gloo, 2 ranks x 4 samples == 1 process with the same global batch of 8 in 2 rounds of 4."""
    wrapper = tmp_path / "ddp_train.py"
    wrapper.write_text(DDP_WRAPPER)
    args = ["--teacher", tiny_teacher, "--batch", 8, "--batch-gpu", 4, "--steps", 3, "--log-every", 3,
            "--val-samples", 8]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TRAIN_PY.parent)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(wrapper), *map(str, args), "--outdir", str(tmp_path / "ddp")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_tensors(rank0, rank1)
    assert run_train(*args, "--outdir", tmp_path / "one") == 0
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["train"]["G"]
    assert_same_tensors(rank0, one, atol=1e-5)
    ddp_log, one_log = log_lines(tmp_path / "ddp")[-1], log_lines(tmp_path / "one")[-1]
    assert abs(ddp_log["l1"] - one_log["l1"]) < 1e-4 * one_log["l1"]  # metrics are reduced over ranks
    assert abs(ddp_log["psnr_db"] - one_log["psnr_db"]) < 1e-3


def wait_for(path, process, timeout=240):
    deadline = time.time() + timeout
    while not Path(path).exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_sigkill_after_a_checkpoint_then_resume(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    process = train_subprocess("--teacher", tiny_teacher, *QUICK, "--log-every", 1, "--steps", 100000,
                               "--outdir", out)
    wait_for(out / "last.pt", process)
    time.sleep(1.0)
    process.kill()
    process.communicate()
    step = torch.load(out / "last.pt", weights_only=True)["train"]["step"]  # intact, whatever the moment
    assert run_train("--resume", out / "last.pt", "--steps", step + 2) == 0
    assert torch.load(out / "last.pt", weights_only=True)["train"]["step"] == step + 2
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_writes_a_checkpoint_and_exits_0(tiny_teacher, tmp_path, signum):
    out = tmp_path / "run"
    process = train_subprocess("--teacher", tiny_teacher, *QUICK, "--log-every", 1000, "--steps", 100000,
                               "--outdir", out)
    wait_for(out / "grids", process)  # set up and training
    time.sleep(2.0)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped at step" in stdout
    assert f"continue: python train.py --resume {out / 'last.pt'} --steps 100000" in stdout
    assert torch.load(out / "last.pt", weights_only=True)["train"]["step"] > 0


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and err.count("\n") == 1, err
    return err


def test_channels_widen_the_student(tiny_teacher, tmp_path, capsys):
    """--channels: the student's widths, instead of the teacher's table without its last entry."""
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--channels", "32,32", "--outdir", tmp_path) == 0
    assert msgan.load(tmp_path / "last.pt").synthesis.channels == [32, 32]
    assert msgan.load(tiny_teacher).synthesis.channels == [32, 16, 16]
    for channels, message in (("32", "1 widths given, 2 needed for 4..8"), ("30,32", "divisible by 4")):
        assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--channels", channels,
                         "--outdir", tmp_path / "bad") == 1
        assert message in one_line_error(capsys)


def test_distilling_without_the_gan_term_leaves_the_discriminator_untrained(tiny_teacher, tmp_path):
    """--gan 0: pixel and wavelet losses only; the discriminator phase is skipped, not run for nothing."""
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--gan", 0, "--outdir", tmp_path) == 0
    state = train_state(tmp_path / "last.pt")[0]
    assert state["opt_d"]["state"] == {} and state["opt_g"]["state"] != {}
    lines = log_lines(tmp_path)
    assert all("d" not in line and "r1" not in line and "gan" not in line for line in lines)
    assert all(math.isfinite(line["l1"]) and math.isfinite(line["l2"]) for line in lines)


def test_init_starts_the_student_from_another_students_synthesis(tiny_teacher, tmp_path, capsys):
    """--init: e.g. follow a teacher trained further without distilling from scratch."""
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", tmp_path / "a") == 0
    # with lr 0 nothing moves, so the new run's EMA student is the --init student
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--lr", 0, "--init", tmp_path / "a" / "last.pt",
                     "--outdir", tmp_path / "b") == 0
    given, started = msgan.load(tmp_path / "a" / "last.pt"), msgan.load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(v, started.state_dict()[k]) for k, v in given.state_dict().items())
    fresh = msgan.student_for(msgan.load(tiny_teacher))
    assert not torch.equal(fresh.synthesis.conv1.conv.weight, started.synthesis.conv1.conv.weight)

    for init, message in ((tiny_teacher, "a StyleGAN2 teacher, not a MobileStyleGAN student"),
                          ("emoji", "not the student of this teacher's geometry"),
                          (tmp_path / "missing.pt", "missing.pt")):
        assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--init", init,
                         "--outdir", tmp_path / "c") == 1
        assert message in one_line_error(capsys)


def test_bad_teachers_are_one_line_errors(tmp_path, capsys, tiny_teacher, ckpt_dir):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    tiny8 = tmp_path / "teacher8.pt"
    msgan.save(tiny8, generator=msgan.Generator(dict(arch="stylegan2", z_dim=8, w_dim=8, mapping_layers=1,
                                                     channels=[16, 16])))
    cases = {tmp_path / "missing.pt": "no such file", bad: "not a readable checkpoint", tiny8: "at least 16x16"}
    for teacher, message in cases.items():
        out = tmp_path / f"out-{teacher.stem}"
        assert run_train("--teacher", teacher, *QUICK, "--steps", 1, "--outdir", out) == 1
        assert message in one_line_error(capsys)
        assert not (out / "last.pt").exists()
    student = tmp_path / "student.pt"
    msgan.save(student, generator=msgan.load(ckpt_dir / "official.pt"))  # a MobileStyleGAN file as teacher
    assert run_train("--teacher", student, *QUICK, "--steps", 1, "--outdir", tmp_path / "o") == 1
    assert "a MobileStyleGAN student, not a StyleGAN2 teacher" in one_line_error(capsys)


def test_unwritable_outdir_and_an_existing_run_are_one_line_errors(tiny_teacher, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 1, "--outdir", a_file / "run") == 1
    assert "not writable" in one_line_error(capsys)
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", tmp_path / "run") == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", tmp_path / "run") == 1
    assert "--resume" in one_line_error(capsys)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_teacher, tmp_path, capsys, monkeypatch):
    distillation_losses = train.Distillation.generator_losses

    def nan_l1_at_step_3(self, g_pass, inputs, step):
        fake, real, losses = distillation_losses(self, g_pass, inputs, step)
        if step == 3:
            losses["l1"] = losses["l1"] * float("nan")
        return fake, real, losses
    monkeypatch.setattr(train.Distillation, "generator_losses", nan_l1_at_step_3)
    out = tmp_path / "run"
    assert run_train("--teacher", tiny_teacher, *QUICK, "--log-every", 1, "--steps", 10, "--outdir", out) == 1
    assert "non-finite l1 loss at step 3" in one_line_error(capsys)
    assert torch.load(out / "last.pt", weights_only=True)["train"]["step"] == 3  # steps 0..2 completed


def test_no_teacher_and_no_default_names_the_flag_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(formats, "WEIGHTS_DIR", str(tmp_path))
    assert run_train("--steps", 1, "--outdir", tmp_path / "run") == 2
    assert "--teacher" in one_line_error(capsys)


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        run_train("--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--teacher", "--steps", "--batch", "--outdir", "--resume", "--vgg", "--mix-prob", "--trunc",
                 "--compile", "--amp", "--seed", "--device", "--log-every"):
        assert flag in text


@pytest.mark.parametrize("args", [["--steps", "0"], ["--batch", "x"], ["--lr", "nan"], ["--trunc", "2"],
                                  ["--aug-p", "-1"]])
def test_bad_flag_values_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(*args)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_without_vgg_weights_the_perceptual_term_is_off_with_one_warning(tiny_teacher, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert out.count("perceptual loss off") == 1
    assert "perceptual" not in log_lines(tmp_path / "run")[-1]


def test_perceptual_term_with_a_vgg_file(tiny_teacher, tmp_path, make_weights):
    vgg_file = tmp_path / "vgg.pt"
    torch.save(make_weights.make_state_dict(str(FID_REF / "vgg16_manifest.json"), FID_WEIGHTS_SEED), vgg_file)
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--vgg", vgg_file,
                     "--outdir", tmp_path / "run") == 0
    assert log_lines(tmp_path / "run")[-1]["perceptual"] > 0


def test_amp_needs_cuda_and_compile_falls_back_with_one_warning(tiny_teacher, tmp_path, capsys, monkeypatch):
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 1, "--amp", "bf16", "--device", "cpu",
                     "--outdir", tmp_path / "amp") == 1
    assert "needs a CUDA device" in one_line_error(capsys)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(torch, "compile", no_compiler)
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--compile", "--outdir", tmp_path / "c") == 0
    out = capsys.readouterr().out
    assert out.count("--compile unavailable (RuntimeError: no working C++ compiler); running eager") == 1


TRAIN_USAGE_ERRORS = [["--steps", "-1"], ["--steps", "0"], ["--steps", "10000000000"], ["--steps", "1e3"],
                      ["--batch", "three"], ["--batch", "99999999"], ["--batch-gpu", "0"], ["--seed", "-1"],
                      ["--seed", str(2**64)], ["--trunc", "nan"], ["--lr", "-1"], ["--val-samples", "0"],
                      ["--log-every", "-5"], ["teacher", "--res", "32"], ["teacher", "--data", "d", "--res", "x"],
                      ["teacher", "--data", "d", "--channels", "64,,32"]]


@pytest.mark.parametrize("argv", TRAIN_USAGE_ERRORS, ids=" ".join)
def test_train_bad_counts_seeds_and_values_are_usage_errors(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_train(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # nothing written


def test_train_full_disk_keeps_the_last_checkpoint(tiny_teacher, tmp_path, capsys, monkeypatch):
    """The second checkpoint write fails half-way (ENOSPC): one line, exit 1, the first checkpoint intact."""
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) <= 2:  # step 1: last.pt and best.pt
            return real_save(obj, f, *args, **kwargs)
        write_then_fail(f)
    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    assert run_train("--teacher", tiny_teacher, *QUICK, "--log-every", 1, "--steps", 5, "--outdir", out) == 1
    assert "No space left on device" in one_line_error(capsys)
    assert torch.load(out / "last.pt", weights_only=True)["train"]["step"] == 1
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]


def test_train_read_only_outdir_is_refused_before_training(tiny_teacher, tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert run_train("--teacher", tiny_teacher, *QUICK, "--steps", 2, "--outdir", tmp_path / "run") == 1
    assert "not writable (Read-only file system)" in one_line_error(capsys)
    assert os.listdir(tmp_path / "run") == []


def test_distilling_an_nvidia_pickle(tmp_path):
    """`python train.py --teacher network-snapshot.pkl`: the public NVIDIA snapshot (64x64, conv_clamp) distils."""
    out = tmp_path / "run"
    assert run_train("--teacher", REF / "nvlabs" / "nvlabs_public.pkl", *QUICK, "--steps", 4, "--outdir", out) == 0
    assert [r["step"] for r in log_lines(out)] == [2, 4]
    student, teacher = msgan.load(out / "last.pt"), msgan.load(out / "last.pt", part="teacher")
    assert student.is_student and student.img_resolution == teacher.img_resolution == 64
    assert teacher.config.get("conv_clamp") == 256  # the teacher keeps NVIDIA's clamp in the checkpoint


# ----------------------------------------------------------------------------------------------
# train.py teacher: a StyleGAN2 teacher from a folder of images


def write_test_images(folder):
    """One image of every kind the loader must take, plus files it must skip."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb).save(folder / "rgb.webp")
    rgba = np.dstack([rgb, np.full((40, 30), 0, np.uint8)])  # fully transparent: must come out white
    Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8).save(folder / "palette.png")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(folder / "white16.png")  # 16-bit: full scale
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_loader_takes_every_mode_and_skips_corrupt_files(tmp_path):
    warnings_seen = []
    images = train.load_image_folder(write_test_images(tmp_path / "data"), 16, warnings_seen.append)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    names = ["clear.png", "gray.png", "palette.png", "rgb.jpg", "rgb.webp", "white16.png"]  # sorted, readable
    by_name = dict(zip(names, images))
    assert (by_name["clear.png"] == 255).all()      # transparency composited on white
    assert (by_name["white16.png"] == 255).all()    # 16-bit scaled, not clipped
    gray = by_name["gray.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert len(warnings_seen) == 1 and "corrupt.png" in warnings_seen[0]


def test_image_loader_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.TrainError, match="no readable image"):
        train.load_image_folder(tmp_path / "empty", 16)
    (tmp_path / "empty" / "bad.png").write_bytes(b"nope")
    with pytest.raises(train.TrainError, match="no readable image"):
        train.load_image_folder(tmp_path / "empty", 16, lambda message: None)
    with pytest.raises(train.TrainError, match="no such folder"):
        train.load_image_folder(tmp_path / "missing", 16)


def test_teacher_training_runs_saves_loads_and_resumes(tmp_path, capsys):
    data = write_test_images(tmp_path / "data")
    out = tmp_path / "run"
    common = ["teacher", "--data", data, "--res", 16, "--channels", "32,16,16", "--z-dim", 16, "--w-dim", 16,
              "--batch", 4, "--log-every", 2, "--val-samples", 6, "--xflip", "--pl-weight", 2, "--pl-every", 2]
    assert run_train(*common, "--steps", 4, "--outdir", out) == 0
    printed = capsys.readouterr().out
    assert "warning: skipping" in printed and "corrupt.png" in printed
    logs = log_lines(out)
    assert [r["step"] for r in logs] == [2, 4]
    assert all(math.isfinite(v) for record in logs for v in record.values())
    assert {"gan", "d", "r1", "pl", "swd_x1000", "aug_p"} <= set(logs[0])  # R1 on step 0 of every 16
    G = msgan.load(out / "last.pt")
    assert not G.is_student and G.img_resolution == 16 and torch.isfinite(G(torch.randn(2, 16))).all()
    # the initial weights are not the run's own random stream: no z of seed 0 is a row of the first mapping layer
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    unit = functools.partial(torch.nn.functional.normalize, dim=1)
    assert (unit(z) @ unit(G.mapping.layers[0].weight).T).abs().max() < 0.9
    assert msgan.load(out / "last.pt", part="teacher").img_resolution == 16  # usable as a --teacher
    assert msgan.load(out / "last.pt", part="discriminator").img_resolution == 16
    assert run_train("teacher", "--data", data, "--resume", out / "last.pt", "--steps", 6) == 0
    assert [r["step"] for r in log_lines(out)] == [2, 4, 6]
    # and the trained teacher distils
    assert run_train("--teacher", out / "last.pt", *QUICK, "--steps", 2, "--outdir", tmp_path / "student") == 0
    assert msgan.load(tmp_path / "student" / "last.pt").is_student


# ----------------------------------------------------------------------------------------------
# train.py project: a photograph into a generator's W+ (the API function, then the command line)


def generated_target(G, seed, psi=0.7):
    """The image [1, 3, S, S] of a known code (W space: the seed's w, truncated), at the projection's size, and
    that code [1, w_dim]."""
    z, _ = sample.seeded_inputs(G, [seed], "const", "cpu")
    with torch.no_grad():
        w = G.truncate(G.mapping(z), psi)
        img = G.synthesis(w, noise_mode="const")
    factor = G.img_resolution // min(train.PROJECT_SIZE, G.img_resolution)
    return torch.nn.functional.avg_pool2d(img, factor) if factor > 1 else img, w


def code_distance(code, w, G):
    """Mean distance of the recovered W+ slots from the true w, relative to the true w's distance from w_avg."""
    return ((code["ws"] - w[:, None]).norm(dim=-1).mean() / (w - G.w_avg).norm()).item()


def test_projection_recovers_the_codes_of_small_networks():
    """Images of known codes of a random 16x16 teacher and of its student come back: in W the very code, in W+ the
    image (W+ has many codes of one image)."""
    torch.manual_seed(0)
    teacher = msgan.Generator(dict(arch="stylegan2", z_dim=16, w_dim=16, mapping_layers=2, channels=[32, 16, 16]))
    teacher.compute_w_avg()
    for G in (teacher.eval(), msgan.student_for(teacher).eval()):
        target, w = generated_target(G, seed=3)
        code = train.project(G, target, steps=300, space="w", log=None)
        assert code["psnr_db"] >= 60 and code_distance(code, w, G) <= 0.01, (G.config["arch"], code["psnr_db"])
    code = train.project(G, target, steps=300, space="w+", log=None)
    assert code["psnr_db"] >= 40 and code["ws"].shape == (1, G.num_ws, G.w_dim)


def test_projection_brings_the_emoji_students_codes_back():
    """In W, the emoji student's image of a known code comes back above 30 dB (54 measured) from a code nearer the
    true one than w_avg (the student draws the same image for many codes: 0.61 of the way measured)."""
    G = msgan.load("emoji")
    target, w = generated_target(G, seed=3)
    code = train.project(G, target, steps=300, space="w", log=None)
    assert code["psnr_db"] >= 30 and code_distance(code, w, G) <= 0.75, (code["psnr_db"], code_distance(code, w, G))


def test_projection_stopped_and_resumed_is_the_projection_run_straight():
    G = msgan.load("emoji")
    target, _ = generated_target(G, seed=5)
    straight = train.project(G, target, steps=60, optimize_noise=True, log=None)
    half = train.project(G, target, steps=60, optimize_noise=True, log=None,
                         on_step=lambda code, step, loss, psnr: step == 29)
    assert half["state"]["step"] == 30
    resumed = train.project(G, target, steps=60, optimize_noise=True, resume=half, log=None)
    assert resumed["state"]["step"] == 60 and resumed["step"] == straight["step"]
    assert torch.equal(resumed["ws"], straight["ws"]) and all(map(torch.equal, resumed["noise"], straight["noise"]))


def run_project(*args):
    return train.main(["project", *map(str, args)])


def test_project_command_brings_an_emoji_image_back_above_30_db(tmp_path, capsys):
    """`python train.py project` on a PNG the emoji student drew: every output written, the code comes back at
    30 dB or more (50 dB measured), and sample.py re-renders it, truncates it and mixes it with seeds."""
    assert sample.main(["--model", "emoji", "--seeds", "3", "--trunc", "0.7", "--outdir", str(tmp_path / "in")]) == 0
    out = tmp_path / "projection"
    assert run_project(tmp_path / "in" / "seed0003.png", "--model", "emoji", "--steps", 300, "--no-compile",
                       "--outdir", out, "--log-every", 100) == 0
    printed = capsys.readouterr().out
    assert re.search(r"step 100/300  loss [\d.]+  psnr [\d.]+ dB  best [\d.]+", printed)
    assert f"re-render it: python sample.py --model emoji --w {out / 'code.pt'}" in printed
    code = torch.load(out / "code.pt", weights_only=True)
    assert code["format"] == "msgan-projection" and code["ws"].shape == (1, 8, 128) and len(code["noise"]) == 5
    assert code["psnr_db"] >= 30 and code["size"] == 32 and code["state"]["step"] == 300
    projection = png(out / "projection.png")
    assert projection.shape == (32, 32, 3) and png(out / "side_by_side.png").shape == (32, 64, 3)
    assert Image.open(out / "progress.gif").n_frames >= 5  # identical frames of a converged code are merged
    assert sample.main(["--model", "emoji", "--w", str(out / "code.pt"), "--outdir", str(tmp_path / "again")]) == 0
    assert np.array_equal(png(tmp_path / "again" / "code.png"), projection)
    assert sample.main(["--model", "emoji", "--w", str(out / "code.pt"), "--trunc", "0.5", "--mix", "coarse",
                        "--seeds", "1-2", "--outdir", str(tmp_path / "mixed")]) == 0
    mixed = [png(tmp_path / "mixed" / f"code-coarse-seed000{s}.png") for s in (1, 2)]
    assert not np.array_equal(mixed[0], mixed[1]) and not np.array_equal(mixed[0], projection)
    # --resume continues the file's run to more steps; without it, an existing projection is not overwritten
    assert run_project(tmp_path / "in" / "seed0003.png", "--model", "emoji", "--steps", 320, "--no-compile",
                       "--resume", out / "code.pt", "--outdir", out) == 0
    assert torch.load(out / "code.pt", weights_only=True)["state"]["step"] == 320
    assert run_project(tmp_path / "in" / "seed0003.png", "--model", "emoji", "--outdir", out) == 1
    assert "--resume" in capsys.readouterr().err


def write_photo(path, mode, size=64):
    array = np.random.default_rng(0).integers(0, 256, (size, size, 4), dtype=np.uint8)
    if mode == "I;16":
        Image.fromarray(array[:, :, 0].astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(array, "RGBA").convert(mode).save(path)
    return path


@pytest.mark.parametrize("mode, says", [("L", "greyscale"), ("RGBA", "transparent"), ("I;16", "16-bit")])
def test_project_refuses_greyscale_transparent_and_16_bit_photos_unless_told_to_convert(tmp_path, capsys, mode, says):
    photo = write_photo(tmp_path / "photo.png", mode)
    assert run_project(photo, "--model", "emoji", "--steps", 2, "--outdir", tmp_path / "refused") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {photo} is {says}") and "--convert" in err
    assert err.count("\n") == 1 and not (tmp_path / "refused").exists()
    assert run_project(photo, "--model", "emoji", "--steps", 2, "--no-compile", "--outdir", tmp_path / "out",
                       "--convert") == 0
    assert f"warning: {photo} is {says}" in capsys.readouterr().out and (tmp_path / "out" / "code.pt").exists()


def test_project_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "corrupt.png").write_bytes(png_bytes()[:300])
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (1, 1)).save(tmp_path / "one_pixel.png")
    for photo, says in ((tmp_path / "missing.png", "no such file"), (tmp_path / "corrupt.png", "not an image"),
                        (tmp_path / "text.jpg", "not an image"), (tmp_path / "one_pixel.png", "too small")):
        out = tmp_path / f"out-{photo.stem}"
        assert run_project(photo, "--model", "emoji", "--steps", 2, "--outdir", out) == 1
        err = capsys.readouterr().err
        assert err.startswith("train.py: error:") and says in err and err.count("\n") == 1, err
        assert not out.exists() or not any(out.iterdir())
    photo = write_photo(tmp_path / "photo.png", "RGB")
    for steps in ("0", "-5", "1e9", "many"):
        with pytest.raises(SystemExit) as e:
            run_project(photo, "--model", "emoji", "--steps", steps)
        assert e.value.code == 2
    assert run_project(photo, "--model", tmp_path / "missing.pt", "--outdir", tmp_path / "m") == 1
    assert "missing.pt" in capsys.readouterr().err


def test_project_ctrl_c_keeps_the_best_code_and_says_how_to_continue(tmp_path):
    photo = write_photo(tmp_path / "photo.png", "RGB")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(TRAIN_PY), "project", str(photo), "--model", "emoji",
                                "--steps", "100000", "--no-compile", "--log-every", "50", "--outdir", str(out)],
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(out / "code.pt", process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped at step" in stdout and f"--resume {out / 'code.pt'} --steps 100000" in stdout
    code = torch.load(out / "code.pt", weights_only=True)
    assert code["state"]["step"] >= 50 and math.isfinite(code["psnr_db"]) and (out / "side_by_side.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_demo_starts_from_a_projection(tmp_path):
    """demo.py --w CODE: with projection=1 a frame is the code's image (mixable, truncatable); without --w, a 400."""
    G = msgan.load("emoji")
    target, _ = generated_target(G, seed=3)
    code = train.project(G, target, steps=20, log=None)
    formats.write_projection(tmp_path / "code.pt", code)
    server = demo.start(argparse.Namespace(model="emoji", compare=None, host="127.0.0.1", port=0, device="cpu",
                                           w=str(tmp_path / "code.pt"), bf16=False))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert json.loads(http_request(f"{server.url}/info")[2])["projection"] is True
        drawn = frame(server.url, seed=9, psi=1, noise="const", projection=1)
        assert np.array_equal(drawn, train.render_code(G, code, 32))
        assert not np.array_equal(frame(server.url, seed=9, psi=1, noise="const", projection=1, mix="coarse",
                                        mix_seed=4), drawn)
    finally:
        server.shutdown()
        server.server_close()


def test_demo_bf16_draws_the_student_in_bfloat16_where_the_hardware_has_it(demo_server_object, monkeypatch):
    """demo.py --bf16: the student's frames come from a bfloat16 network, close to float32's (the teacher stays
    float32)."""
    monkeypatch.setattr(ops, "native_bf16", lambda device: True)
    server = demo.start(argparse.Namespace(model="emoji", compare="emoji-teacher", host="127.0.0.1", port=0,
                                           device="cpu", w=None, bf16=True))
    try:
        assert server.renderer.G.synthesis.const.dtype == torch.bfloat16
        assert server.renderer.teacher.synthesis.const.dtype == torch.float32
        for net in ("student", "teacher"):
            p = demo.frame_parameters(f"seed=5&psi=0.7&noise=const&net={net}")
            float32, bf16 = (png(io.BytesIO(renderer.render(p)[0])).astype(float)
                             for renderer in (demo_server_object.renderer, server.renderer))
            assert 10 * np.log10(255**2 / max(np.mean((float32 - bf16) ** 2), 1e-10)) > 35
    finally:
        server.server_close()


@pytest.mark.slow
def test_a_real_photograph_projected_into_the_ffhq_student(tmp_path, capsys):
    """NASA's portrait of Eileen Collins (public domain; scikit-image ships it as data/astronaut.png), cropped to
    the face as FFHQ frames faces (box (117, 10, 330, 223) of 512x512), projected into the FFHQ student in W+ with
    the default settings and no VGG16 weights: the PSNR at 256x256 rises and ends at 27 dB or more (28 measured,
    in 6 minutes on 2 CPU cores)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("the photograph comes with scikit-image: pip install scikit-image")
    source = Path(spec.submodule_search_locations[0]) / "data" / "astronaut.png"
    Image.open(source).crop((117, 10, 330, 223)).save(tmp_path / "eileen_collins.png")
    out = tmp_path / "out"
    assert run_project(tmp_path / "eileen_collins.png", "--outdir", out, "--log-every", 100) == 0
    psnrs = [float(p) for p in re.findall(r"psnr ([\d.]+) dB", capsys.readouterr().out)]  # every 100 steps
    assert len(psnrs) == 6 and psnrs[-1] == max(psnrs) and psnrs[-1] > psnrs[0] + 4, psnrs
    assert torch.load(out / "code.pt", weights_only=True)["psnr_db"] >= 27


# ----------------------------------------------------------------------------------------------
# demo.py: the HTTP API against a server started in-process on a free port (the shipped emoji student beside its
# teacher), hostile requests, a bounded load test, and a real browser driving `python demo.py` as a user starts it


def http_request(url, method="GET", body=None, headers=None):
    """(status, headers, body) of one request; an error status is an answer here, not an exception."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def frame(url, **params):
    status, headers, body = http_request(f"{url}/render?{urllib.parse.urlencode(params)}")
    assert status == 200, body
    assert headers["Content-Type"] == "image/png" and float(headers["X-Render-Ms"]) > 0
    return np.asarray(Image.open(io.BytesIO(body)))


def raw_request(url, data, read=True):
    """Send bytes as they are over a new connection; the answer's status line (or '' if the server closed)."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(data)
        return connection.makefile("rb").readline().decode("latin1").strip() if read else ""


def test_demo_frames_decode_follow_every_control_and_repeat_exactly(demo_server):
    base = dict(seed=11, psi=1, noise="const")
    student = frame(demo_server, **base)
    assert student.shape == (32, 32, 3) and student.std() > 10
    assert np.array_equal(frame(demo_server, **base), student)                          # the same parameters
    assert np.array_equal(frame(demo_server, **base, walk=0), student)                  # the walk starts there
    for change in (dict(seed=12), dict(psi=0.3), dict(noise="none"), dict(mix="coarse", mix_seed=2),
                   dict(walk=0.5), dict(net="teacher")):
        assert not np.array_equal(frame(demo_server, **{**base, **change}), student), change
    random_noise = frame(demo_server, **{**base, "noise": "random"})
    assert np.array_equal(frame(demo_server, **{**base, "noise": "random"}), random_noise)  # seeded by the seed
    # a frame is what sample.py draws for that seed
    G = msgan.load("emoji").fold()
    with torch.no_grad():
        expected = sample.to_uint8(G(sample.seeded_inputs(G, [11], "const", "cpu")[0]))[0]
    assert np.abs(student.astype(int) - expected).max() <= 1
    status, headers, body = http_request(f"{demo_server}/info")
    info = json.loads(body)
    assert info["networks"] == {"student": "MobileStyleGAN student", "teacher": "StyleGAN2 teacher"}
    assert info["resolution"] == 32 and info["mix_slots"]["fine"] == [7, 8]
    status, headers, page = http_request(demo_server)
    assert status == 200 and b"<title>msgan demo</title>" in page and b"http" not in page  # nothing from elsewhere


@pytest.mark.parametrize("query, says", [
    ("psi=1&noise=const", "missing parameter 'seed'"),
    ("seed=&psi=1&noise=const", "parameter 'seed' is ''"),
    ("seed=-1&psi=1&noise=const", "must be an integer in 0..4294967295"),
    ("seed=4294967296&psi=1&noise=const", "must be an integer"),
    ("seed=1e9&psi=1&noise=const", "must be an integer"),
    ("seed=" + "9" * 5000 + "&psi=1&noise=const", "must be an integer"),
    ("seed=\u00b2&psi=1&noise=const", "must be an integer"),
    ("seed=1&psi=nan&noise=const", "must be a number in -1..2"),
    ("seed=1&psi=1e308&noise=const", "must be a number"),
    ("seed=1&psi=1&noise=loud", "must be const or random or none"),
    ("seed=1&psi=1&noise=const&mix=all", "'mix'"),
    ("seed=1&psi=1&noise=const&walk=-1", "'walk'"),
    ("seed=1&psi=1&noise=const&client=../../etc", "'client'"),
    ("seed=1&seed=2&psi=1&noise=const", "given more than once"),
    ("seed=1&psi=1&noise=const&size=4096", "unknown parameter 'size'"),
])
def test_demo_bad_parameters_are_400_with_a_one_line_reason(demo_server, query, says):
    status, headers, body = http_request(f"{demo_server}/render?{urllib.parse.quote(query, safe='=&')}")
    text = body.decode()
    assert status == 400 and says in text and text.count("\n") == 1 and text.startswith("error: "), text


def test_demo_hostile_requests_get_4xx_and_the_server_keeps_serving(demo_server, capfd):
    assert http_request(f"{demo_server}/etc/passwd")[0] == 404
    assert http_request(f"{demo_server}/../msgan.py")[0] == 404
    assert http_request(f"{demo_server}/render", "POST", b"x" * 10_000_000)[0] == 405  # read, dropped, refused
    assert http_request(f"{demo_server}/", "HEAD")[0] == 405
    assert http_request(f"{demo_server}/info", headers={"Host": "attacker.example"})[0] == 400  # DNS rebinding
    assert raw_request(demo_server, b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").startswith(
        "HTTP/1.1 413")
    assert raw_request(demo_server, b"BREW /pot HTTP/1.1\r\n\r\n").startswith("HTTP/1.1 405")
    assert raw_request(demo_server, b"GET / HTTP/9.9\r\n\r\n").startswith("error: Invalid HTTP version")
    assert raw_request(demo_server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")[9:12] == "414"
    assert raw_request(demo_server, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith("error: Bad request syntax")
    assert http_request(f"{demo_server}/render?seed=1&psi=1&noise=const&net=teacher")[0] == 200
    # many parallel connections: some idle, some mid-request, the rest asking for frames
    address = urllib.parse.urlsplit(demo_server)
    idle = [socket.create_connection((address.hostname, address.port), timeout=30) for _ in range(32)]
    for connection in idle[:16]:
        connection.sendall(b"GET /render?seed=1&psi=1")                                # and never the rest
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda i: http_request(f"{demo_server}/render?seed={i}&psi=1&noise=const")[0],
                                 range(64)))
    for connection in idle:
        connection.close()
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 16
    assert http_request(f"{demo_server}/info")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_demo_draws_only_the_newest_frame_of_each_client(demo_server_object, monkeypatch):
    """While one frame is drawn, five more of one client arrive: the one that is newest when the renderer is
    free is drawn, the four before it are dropped (204). Frames without a client id are never dropped."""
    drawn = []
    real_render = demo_server_object.renderer.render

    def slow_render(params):
        drawn.append(params["seed"])
        time.sleep(0.4)
        return real_render(params)
    monkeypatch.setattr(demo_server_object.renderer, "render", slow_render)
    url = demo_server_object.url

    def ask(seed, client="c1"):
        return http_request(f"{url}/render?seed={seed}&psi=1&noise=const&client={client}")[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(ask, 0)
        time.sleep(0.15)                      # frame 0 is being drawn
        later = [pool.submit(ask, seed) for seed in range(1, 6)]
        for future in later:                  # all five wait; 5 is the newest
            time.sleep(0.02)
        statuses = [first.result()] + [future.result() for future in later]
    assert statuses.count(200) == 2 and statuses.count(204) == 4 and statuses[0] == 200
    assert drawn == [0, statuses.index(200, 1)]
    drawn.clear()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda seed: ask(seed, client=""), range(3))) == [200] * 3
    assert sorted(drawn) == [0, 1, 2]


def test_demo_load_4_clients_x_50_frames(demo_server, capsys):
    """A bounded load test on loopback: no request fails, the server answers after, and the latencies are
    reported (a benchmark line, not an assertion)."""
    def client(index):
        latencies = []
        for request in range(50):
            start = time.perf_counter()
            status = http_request(f"{demo_server}/render?seed={index * 50 + request}&psi=0.7&noise=const"
                                  f"&net={'teacher' if request % 2 else 'student'}&client=load{index}")[0]
            latencies.append((status, time.perf_counter() - start))
        return latencies
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [item for items in pool.map(client, range(4)) for item in items]
    assert [status for status, _ in results] == [200] * 200
    assert http_request(f"{demo_server}/info")[0] == 200
    ms = sorted(1000 * seconds for _, seconds in results)
    with capsys.disabled():
        print(f"\ndemo.py load: 4 clients x 50 frames (emoji student and teacher, 32x32): p50 {ms[99]:.1f} ms, "
              f"p95 {ms[189]:.1f} ms")


DEMO_PY = REPO / "demo.py"


def start_demo(*args):
    """`python demo.py ARGS --port 0` as a user starts it: (the process, the URL it prints)."""
    process = subprocess.Popen([sys.executable, str(DEMO_PY), *args, "--port", "0"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline()
    found = re.search(r"at (http://127\.0\.0\.1:\d+) \(Ctrl-C stops\)$", line.strip())
    if not found:
        process.kill()
        pytest.fail(f"demo.py did not start: {line!r} {process.communicate()[1]!r}")
    return process, found[1]


def stop_demo(process):
    """Ctrl-C: demo.py stops cleanly, exit status 0."""
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == "\ndemo.py: stopped\n", err


def test_demo_py_stops_cleanly_on_ctrl_c_while_frames_are_drawn():
    """Ctrl-C in the middle of 4 clients' frames (teacher and student): exit 0 and one line, never an abort."""
    for attempt in range(3):
        process, url = start_demo("--model", "emoji", "--compare", "emoji-teacher")
        stop = threading.Event()

        def client(k):
            for i in range(10**6):
                if stop.is_set():
                    return
                net = ("student", "teacher")[i % 2]
                try:
                    http_request(f"{url}/render?seed={k * 10**6 + i}&psi=0.7&noise=const&net={net}")
                except Exception:  # the server went away mid-request: whatever the client library makes of that
                    pass
        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(0.5 + 0.3 * attempt)
        try:
            stop_demo(process)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=30)


def test_demo_py_starts_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    process, url = start_demo("--model", "emoji")
    try:
        assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
        assert json.loads(http_request(f"{url}/info")[2])["networks"] == {"student": "MobileStyleGAN student"}
        assert http_request(f"{url}/render?seed=1&psi=1&noise=const&net=teacher")[2] == \
            b"error: no teacher: start demo.py with --compare TEACHER\n"
    finally:
        stop_demo(process)
    other_teacher = tmp_path / "teacher16.pt"
    msgan.save(other_teacher, generator=msgan.Generator(dict(arch="stylegan2", z_dim=16, w_dim=16, mapping_layers=1,
                                                             channels=[16, 16, 16, 16])))
    for args, status, says in ((["--model", tmp_path / "missing.pt"], 1, "missing.pt"),
                               (["--model", "emoji", "--compare", other_teacher], 1, "not the same W+ space"),
                               (["--host", "localhost"], 2, "not an IP address"),
                               (["--port", "70000"], 2, "--port")):
        result = subprocess.run([sys.executable, str(DEMO_PY), *map(str, args)], capture_output=True, text=True)
        assert result.returncode == status and says in result.stderr and "Traceback" not in result.stderr, args
        last = result.stderr.splitlines()[-1]  # argparse's usage above it, for a bad flag
        assert last.startswith("demo.py: error:") and (status == 2 or result.stderr.count("\n") == 1), result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # a closed network: no calls home
READ_PIXELS = """async (id) => {
    const img = document.getElementById(id);
    for (let attempt = 0; ; attempt++) {  // a newer frame may replace the image while it is decoded
        try { await img.decode(); break; } catch (error) { if (attempt === 100) throw error; }
        await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const canvas = Object.assign(document.createElement("canvas"), {width: img.naturalWidth, height: img.naturalHeight});
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
}"""


def test_demo_in_a_real_browser(tmp_path):
    """Headless Chromium on `python demo.py --model emoji --compare emoji-teacher`: teacher and student side by side,
    both change with the seed and with psi, the animation advances, save PNG downloads the frame, and the console
    has no errors. The screenshot of the README is this test's (MSGAN_UPDATE_SCREENSHOT=1 writes it to assets/)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright").sync_playwright
    process, url = start_demo("--model", "emoji", "--compare", "emoji-teacher")
    errors = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 640})
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("Number(document.body.dataset.frames) >= 1")
            student, teacher = page.locator("#img-student").bounding_box(), page.locator("#img-teacher").bounding_box()
            assert student["width"] >= 256 and teacher["x"] >= student["x"] + student["width"]  # side by side

            def pixels():
                return {net: page.evaluate(READ_PIXELS, f"img-{net}") for net in ("student", "teacher")}

            def after(change):
                before = pixels()
                change()
                deadline = time.time() + 30
                now = pixels()
                while any(now[net] == before[net] for net in now) and time.time() < deadline:
                    page.wait_for_timeout(50)
                    now = pixels()
                return before, now
            before, now = after(lambda: page.fill("#seed", "11"))
            assert all(now[net] != before[net] for net in now), "the seed does not change the images"
            before, now = after(lambda: page.locator("#psi").evaluate(
                "slider => { slider.value = 0.4; slider.dispatchEvent(new Event('input')); }"))
            assert all(now[net] != before[net] for net in now), "psi does not change the images"
            frames = int(page.evaluate("document.body.dataset.frames"))
            page.click("#animate")
            seen, deadline = set(), time.time() + 30
            while (len(seen) < 5 or int(page.evaluate("document.body.dataset.frames")) < frames + 10) \
                    and time.time() < deadline:
                seen.add(str(pixels()["student"]))
                page.wait_for_timeout(100)
            page.click("#animate")
            assert int(page.evaluate("document.body.dataset.frames")) >= frames + 10 and len(seen) >= 5
            page.fill("#seed", "11")
            page.locator("#psi").evaluate("slider => { slider.value = 1; slider.dispatchEvent(new Event('input')); }")
            page.wait_for_timeout(1000)
            with page.expect_download() as download:
                page.click("#save")
            saved = np.asarray(Image.open(download.value.path()))
            assert saved.shape == (32, 32, 3)
            assert saved.tolist() == np.array(pixels()["student"]).reshape(32, 32, 4)[:, :, :3].tolist()
            shot = REPO / "assets" / "demo.png" if os.environ.get("MSGAN_UPDATE_SCREENSHOT") == "1" else \
                tmp_path / "demo.png"
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        stop_demo(process)
    assert errors == []


# ----------------------------------------------------------------------------------------------
# The shipped emoji teacher and student (weights/): offline, and what every command does with them


EMOJI_MAX_BYTES = 20 * 2**20  # the shipped emoji teacher and student together


EMOJI_MIN_PSNR_DB = 20.0      # the shipped student against its teacher (23.87 dB measured, see weights/README.md)


def test_shipped_emoji_teacher_and_student_load_offline_and_draw_the_same_images():
    """weights/ ships the emoji teacher (StyleGAN2, 32x32) and the student train.py distilled from it: both load
    by name without a network, they share the mapping, and the student draws the teacher's images."""
    teacher, student = msgan.load("emoji-teacher"), msgan.load("emoji")
    assert sum(os.path.getsize(msgan.pretrained_path(n)) for n in ("emoji-teacher", "emoji")) <= EMOJI_MAX_BYTES
    assert not teacher.is_student and student.is_student
    assert teacher.img_resolution == student.img_resolution == 32 and teacher.z_dim == student.z_dim
    assert all(torch.equal(a, b) for a, b in zip(teacher.mapping.parameters(), student.mapping.parameters()))
    z, _ = sample.seeded_inputs(teacher, list(range(64)), "const", "cpu")  # `sample.py --compare -n 64`'s z
    with torch.no_grad():
        noise = teacher.synthesis.resolve_noise(64, None, "const", "cpu")  # the student reads the maps it has
        psnr = sample.psnr(student(z, noise=noise), teacher(z, noise=noise))
    assert psnr.mean() > EMOJI_MIN_PSNR_DB, psnr.mean()


BF16_MIN_PSNR_DB = 40.0  # a bfloat16 network against itself in float32 (emoji ~47 dB; FFHQ 46.9, min 36.6)


@pytest.mark.parametrize("name", ["emoji", "emoji-teacher"])
def test_a_network_in_bfloat16_draws_its_float32_images_within_40_db(name):
    """G.synthesis.to(torch.bfloat16) (sample.py --bf16): styles and noise (stored, random or passed in float32)
    are cast to the weights' dtype; a student's inference path gives the same image tiled or whole."""
    G = msgan.load(name).requires_grad_(False).fold()
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0))
    noise = [torch.randn(1, 1, r, r, generator=torch.Generator().manual_seed(r)) for r in G.synthesis.noise_resolutions]
    with torch.no_grad():
        w = G.mapping(z)
        float32 = [G.synthesis(w), G.synthesis(w, noise=noise)]
        G.synthesis.to(torch.bfloat16)
        bf16 = [G.synthesis(w), G.synthesis(w, noise=noise)]
        assert G.synthesis(w, noise_mode="random").dtype == torch.bfloat16
        if G.is_student:
            G.synthesis.tile_bytes = msgan.TILE_CANDIDATES[0] // 2**10  # a few rows a tile
            assert torch.equal(G.synthesis(w), bf16[0])
    for a, b in zip(float32, bf16):
        assert b.dtype == torch.bfloat16 and sample.psnr(b.float(), a).min() > BF16_MIN_PSNR_DB


def test_sample_and_onnx_export_of_the_shipped_emoji_student(tmp_path, capsys):
    """`python sample.py --model emoji -n 64` and `python export.py onnx --model emoji` (fewer images here)."""
    assert run_sample("--model", "emoji", "-n", 4, "--outdir", tmp_path / "s") == 0
    assert png(tmp_path / "s" / "seed0003.png").shape == (32, 32, 3)
    export.main(["onnx", "--model", "emoji", "--outdir", str(tmp_path / "e")])  # checks onnxruntime parity itself
    assert sorted(os.listdir(tmp_path / "e")) == ["mapping.onnx", "synthesis.onnx"]
    graph = onnx.load(tmp_path / "e" / "synthesis.onnx").graph  # each inverse Haar is one ConvTranspose
    ops_used = collections.Counter(node.op_type for node in graph.node)
    assert ops_used["ConvTranspose"] == len(msgan.load("emoji").synthesis.blocks) + 1
    assert not ops_used.keys() & {"Slice", "Split", "Sub", "Div"}


def test_train_py_without_a_teacher_distills_the_shipped_emoji_teacher(tmp_path):
    """40 steps from the shipped teacher: the student's validation PSNR rises by over 1.5 dB (seeds 0-2: +2.1 to +2.3)."""
    out = tmp_path / "run"
    assert run_train("--steps", 40, "--batch", 8, "--log-every", 8, "--val-samples", 16, "--lr", "2e-3",
                     "--outdir", out) == 0
    logs = log_lines(out)
    assert logs[-1]["val_distill"] < 0.8 * logs[0]["val_distill"]
    assert logs[-1]["psnr_db"] > logs[0]["psnr_db"] + 1.5
    teacher, shipped = msgan.load(out / "last.pt", part="teacher"), msgan.load("emoji-teacher")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), shipped.state_dict().values()))
    assert msgan.load(out / "last.pt").is_student


def test_train_py_without_a_teacher_or_the_shipped_one_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(formats, "WEIGHTS_DIR", str(tmp_path))
    assert run_train("--steps", 2, "--outdir", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Every command line: bad counts, seeds and psi; an unusable --outdir; Ctrl-C


def run_script(script, argv, capsys):
    """(exit status, stderr) of `python {script}.py *argv`, run in-process."""
    try:
        code = {"sample": sample.main, "export": export.main, "fid": fid.main}[script](list(map(str, argv)))
    except SystemExit as e:
        code = e.code
    return code or 0, capsys.readouterr().err


def assert_one_error_line(err, script):
    """One error line, after argparse's usage (for a usage error) or the progress line (for a run)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len([line for line in lines if "error:" in line or "interrupted" in line]) == 1, err
    assert lines[-1].startswith((f"{script}.py: error: ", f"{script}.py: interrupted")), err


FID_SOURCES = ["a", "b"]  # parsing stops before these are looked at


CLI_USAGE_ERRORS = [  # (script, arguments): a usage error, exit 2
    ("sample", ["-n", "-3"]), ("sample", ["-n", "0"]), ("sample", ["-n", "10000000000"]), ("sample", ["-n", "3.5"]),
    ("sample", ["-n", "three"]), ("sample", ["--batch", "0"]), ("sample", ["--batch", "99999999999"]),
    ("sample", ["--frames", "-1"]), ("sample", ["--interpolate", "--seeds", "0-99", "--frames", "100"]),
    ("sample", ["--seeds", "5-2"]), ("sample", ["--seeds", "1,,2"]), ("sample", ["--seeds", "-4"]),
    ("sample", ["--seeds", "0-99999999999"]), ("sample", ["--seeds", str(2**64)]), ("sample", ["--seed", "-1"]),
    ("sample", ["--seed", str(2**64 - 1), "-n", "2"]),
    ("sample", ["--trunc", "nan"]), ("sample", ["--trunc", "inf"]), ("sample", ["--trunc", "0.7x"]),
    ("export", ["onnx", "--batch", "-1"]), ("export", ["onnx", "--batch", "0"]),
    ("export", ["onnx", "--batch", "1000000000"]), ("export", ["onnx", "--batch", "two"]),
    ("export", ["onnx", "--opset", "nan"]), ("export", ["onnx", "--opset", "99"]),
    ("fid", [*FID_SOURCES, "--batch", "0"]), ("fid", [*FID_SOURCES, "--batch", "100000"]),
    ("fid", [*FID_SOURCES, "--batch", "ten"]), ("fid", [*FID_SOURCES, "--kid-subsets", "-1"]),
    ("fid", [*FID_SOURCES, "--kid-subset-size", "0"]), ("fid", [*FID_SOURCES, "--dims", "1000"]),
    ("fid", ["--model", "m.pt", "--ref", "r", "-n", "-5"]), ("fid", ["--model", "m.pt", "--ref", "r", "-n", "1"]),
    ("fid", ["--model", "m.pt", "--ref", "r", "-n", "10**12"]),
    ("fid", ["--model", "m.pt", "--ref", "r", "-n", "1000000000000"]),
    ("fid", ["--model", "m.pt", "--ref", "r", "--seed", "-1"]),
    ("fid", ["--model", "m.pt", "--ref", "r", "--psi", "nan"]),
    ("fid", ["a", "--save-stats", "stats"]),
]


@pytest.mark.parametrize("script, argv", CLI_USAGE_ERRORS, ids=[" ".join([s, *a]) for s, a in CLI_USAGE_ERRORS])
def test_cli_bad_count_seed_or_psi_is_a_usage_error(script, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_script(script, argv, capsys)
    assert code == 2 and "error:" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.fixture
def fid_inputs(tmp_path, inception_file):
    """Two small image folders and the synthetic Inception: a quick `fid.py` run."""
    return [str(write_pngs(tmp_path / "a", 3, 16, seed=1)), str(write_pngs(tmp_path / "b", 3, 16, seed=2)),
            "--inception", str(inception_file), "--dims", "64", "--device", "cpu"]


def cli_run(script, ckpt_dir, fid_inputs, outdir):
    """The arguments of a small real run of each script that writes into outdir."""
    return {"sample": ["--model", ckpt_dir / "official.pt", "--seeds", "0-3", "--batch", "1", "--outdir", outdir],
            "export": ["onnx", "--model", ckpt_dir / "official.pt", "--outdir", outdir],
            "fid": [fid_inputs[0], "--save-stats", outdir / "stats.npz", *fid_inputs[2:]]}[script]


CLI_FAILURES = {  # name -> (patch applied for the run, what the error line says)
    "outdir is a file": (None, "File exists|Not a directory|not a directory"),
    "read-only outdir": (lambda mp: [mp.setattr(tempfile, f, read_only) for f in ("mkstemp", "mkdtemp")],
                         "Read-only file system"),
    "disk full mid-run": (lambda mp: [mp.setattr(Image.Image, "save", lambda self, fp, *a, **k: write_then_fail(fp)),
                                      mp.setattr(Path, "write_bytes", lambda self, data: write_then_fail(self)),
                                      mp.setattr(onnx, "save", lambda model, f, *a, **k: write_then_fail(f)),
                                      mp.setattr(np, "savez_compressed", lambda f, **k: write_then_fail(f))],
                          "No space left on device"),
}


@pytest.mark.parametrize("failure", CLI_FAILURES)
@pytest.mark.parametrize("script", ["sample", "export", "fid"])
def test_cli_unusable_outdir_is_one_line_exit_1_and_no_partial_file(script, failure, tmp_path, capsys, monkeypatch,
                                                                     ckpt_dir, fid_inputs):
    patch, says = CLI_FAILURES[failure]
    outdir = tmp_path / "out"
    if failure == "outdir is a file":
        outdir.write_text("a file")
        outdir = outdir / "sub" if script == "fid" else outdir
    else:
        outdir.mkdir()
        patch(monkeypatch)
    code, err = run_script(script, cli_run(script, ckpt_dir, fid_inputs, outdir), capsys)
    assert code == 1 and re.search(says, err), err
    assert_one_error_line(err, script)
    if outdir.is_dir():
        assert os.listdir(outdir) == []  # no temp file, no half-written output


@pytest.mark.parametrize("script, where", [("sample", "Progress.update"), ("export", "check_parity"),
                                           ("fid", "activations")])
def test_cli_ctrl_c_in_the_middle_exits_130_and_leaves_no_partial_file(script, where, tmp_path, capsys, monkeypatch,
                                                                       ckpt_dir, fid_inputs):
    """Ctrl-C (a KeyboardInterrupt) halfway: after the first images, in the first parity check, or while Inception
    runs. sample.py keeps the complete images it wrote (the first, and those of batches already being rendered
    alongside it) and starts no other; the others write all or nothing."""
    module = {"sample": sample, "export": export, "fid": fid}[script]
    owner, _, name = where.rpartition(".")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(getattr(module, owner) if owner else module, name, interrupt)
    outdir = tmp_path / "out"
    code, err = run_script(script, cli_run(script, ckpt_dir, fid_inputs, outdir), capsys)
    assert code == 130
    assert_one_error_line(err, script)
    written = sorted(os.listdir(outdir)) if outdir.is_dir() else []
    if script == "sample":
        workers, _ = sample.worker_split(4, compiled=False)
        assert written == [f"seed{s:04d}.png" for s in range(workers)]
        for name in written:
            Image.open(outdir / name).verify()
    else:
        assert written == []


def test_ctrl_c_stops_sample_py_with_130_and_no_partial_file(ckpt_dir, tmp_path):
    """The real signal: SIGINT to `python sample.py` while it writes images."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "sample.py", "--model", ckpt_dir / "official.pt", "-n", "100000",
                                "--batch", "1", "--outdir", out], cwd=Path(__file__).resolve().parent,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(out / "seed0001.png", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert_one_error_line(err, "sample")
    assert not leftovers(out) and not (out / "grid.jpg").exists()
    for png_file in out.iterdir():
        Image.open(png_file).verify()  # every file there is whole


# ----------------------------------------------------------------------------------------------
# Hostile inputs. A corpus of broken, malicious and absurd inputs, made here from the public golden data with a
# fixed seed (no corpus file is committed), for every loader: msgan.load (msgan, rosinality, official and NVIDIA
# files, every part they hold), the random-face wheel import, and fid.py's image folders and stats files.
# The contract, for every case: the loader returns a working result (a float32 network with finite weights that
# runs and draws finite images; images in [0, 1]; finite statistics), or raises its one error type with a one-line
# message that names the file (and a key, where a tensor or config entry was edited), or skips the entry as
# documented. Never another exception, and nothing in a file ever runs.


CORPUS_SEED = 11


LOADED, ERROR, SKIPPED = "loaded", "clean error", "skipped"


CONVERTED = "loaded, with a warning that it converted tensors to float32"


# run() loads path; an error must say one of `says` (a key name, ...); expect: the one outcome allowed, if any
Case = collections.namedtuple("Case", "name path run says expect", defaults=(None, None))


DROPPED = re.compile(r".*(kernel|idwt|device_info).*")  # fixed filters and bookkeeping: the converters drop them


TENSOR_EDITS = {  # edit of one tensor -> the loader refuses it, naming a key (or loads what it means, unharmed)
    "NaN": lambda t, rng: poke(t, rng, float("nan")),
    "inf": lambda t, rng: poke(t, rng, -float("inf")),
    "float64 beyond float32": lambda t, rng: poke(t.double(), rng, 1e300),
    "wrong size": lambda t, rng: torch.zeros(*t.shape[:-1], t.shape[-1] + 1) if t.ndim else torch.zeros(2),
    "wrong rank": lambda t, rng: t[None, None],
    "empty": lambda t, rng: torch.zeros(0),
    "0-dim": lambda t, rng: torch.tensor(0.5),
    "int64": lambda t, rng: t.long(),
    "complex": lambda t, rng: t.to(torch.complex64),
    "a string": lambda t, rng: "0.1 0.2 0.3",
    "None": lambda t, rng: None,
    "a list": lambda t, rng: t.tolist(),
    "a dict": lambda t, rng: {"weight": t},
}


CONVERTED_EDITS = {  # another float precision: loads as float32, with a warning
    "float64": lambda t: t.double(),
    "float16": lambda t: t.half(),
    "bfloat16": lambda t: t.bfloat16(),
}


KEY_EDITS = {  # edit of the dict around a key
    "removed": lambda state, key: state.pop(key),
    "renamed": lambda state, key: state.update({key + "_": state.pop(key)}),
    "extra key": lambda state, key: state.update({key + ".extra": state[key]}),
    "extra key with a newline": lambda state, key: state.update({key + "\nsecond line": state[key]}),
}


BYTE_EDITS = {  # edit of a file's bytes (the error, if any, need not name a key)
    "8 bytes flipped": lambda data, rng: flip_bytes(data, rng, 8),
    "1 byte flipped": lambda data, rng: flip_bytes(data, rng, 1),
    "truncated": lambda data, rng: data[:rng.randrange(len(data))],
    "first 64 bytes random": lambda data, rng: rng.randbytes(64) + data[64:],
    "garbage appended": lambda data, rng: data + rng.randbytes(100_000),
    "empty file": lambda data, rng: b"",
}


def flip_bytes(data, rng, count, start=0):
    data = bytearray(data)
    for _ in range(count):
        data[rng.randrange(start, len(data))] ^= rng.randrange(1, 256)
    return bytes(data)


def numbered(folder, suffix):
    """The next free file name in folder: 0000{suffix}, 0001{suffix}, ..."""
    return folder / f"{len(list(folder.iterdir())):04d}{suffix}"


def assert_working_network(net):
    for key, value in net.state_dict().items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    with torch.no_grad():
        if isinstance(net, msgan.Discriminator):
            out = net(torch.zeros(1, 3, net.img_resolution, net.img_resolution))
            assert out.shape == (1, 1)
        else:
            out = net(torch.randn(1, net.z_dim, generator=torch.Generator().manual_seed(0)))
            assert out.shape == (1, 3, net.img_resolution, net.img_resolution)
    assert torch.isfinite(out).all()


def outcome(case, error_types):
    """LOADED, ERROR or SKIPPED; an AssertionError (or the escaped exception) if the case breaks the contract."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.run()
        except error_types as e:
            message = str(e)
            assert "\n" not in message and str(case.path) in message, f"message {message!r}"
            says = [case.says] if isinstance(case.says, str) else case.says or []
            assert not says or any(s in message for s in says), f"message {message!r} names none of {says[:3]}"
            return ERROR
    if isinstance(result, torch.nn.Module):
        assert_working_network(result)
        converted = any("converted" in str(w.message) for w in caught)
        assert converted == (case.expect == CONVERTED), f"converted: {converted}"  # never a silent dtype change
    return SKIPPED if result is SKIPPED else LOADED


def check_case(case, error_types):
    result = outcome(case, error_types)
    assert case.expect is None or result == case.expect or (result, case.expect) == (LOADED, CONVERTED), \
        f"{result}, expected {case.expect}"
    return result


# --- msgan.load: torch files ----------------------------------------------------------------


def torch_sources(folder, ref, dref, student, teacher, D):
    """(format, checkpoint, part, where its state dict is, the keys that part reads) for msgan.load. An error
    may name a key as the file names it, or, for a missing one, as msgan names it."""
    rosinality = {"g_ema": ref["rosinality"]["checkpoint"]["g_ema"], "latent_avg":
                  ref["rosinality"]["checkpoint"]["latent_avg"], "d": dref["checkpoint"]["d"]}
    official = ref["mobilestylegan"]["checkpoint"]
    msgan.save(folder / "msgan.pt", generator=student, teacher=teacher, discriminator=D)
    msgan_ckpt = torch.load(folder / "msgan.pt", weights_only=True)
    official_keys = {part: [k for k in official["state_dict"] if k.startswith(prefixes)]
                     for part, prefixes in (("generator", ("student.", "mapping_net.", "style_mean")),
                                            ("teacher", ("synthesis_net.", "mapping_net.", "style_mean")))}
    return [
        ("rosinality", rosinality, "generator", ("g_ema",), list(rosinality["g_ema"]), teacher),
        ("rosinality", rosinality, "discriminator", ("d",), list(rosinality["d"]), D),
        ("official", official, "generator", ("state_dict",), official_keys["generator"], student),
        ("official", official, "teacher", ("state_dict",), official_keys["teacher"], teacher),
        *[("msgan", msgan_ckpt, part, (part, "state_dict"), list(msgan_ckpt[part]["state_dict"]), net)
          for part, net in (("generator", student), ("teacher", teacher), ("discriminator", D))],
    ]


def edited(ckpt, where, edit):
    """A copy of ckpt whose dict at ckpt[where[0]][where[1]]... went through edit(dict); the rest is shared."""
    ckpt = dict(ckpt)
    if where:
        ckpt[where[0]] = edited(ckpt[where[0]], where[1:], edit)
    else:
        edit(ckpt)
    return ckpt


def torch_file_case(folder, name, ckpt, part, says, expect=None):
    path = numbered(folder, ".pt")
    torch.save(ckpt, path)
    return Case(name, path, functools.partial(msgan.load, path, part=part), says, expect)


def torch_file_corpus(folder, rng, sources, payload):
    cases = []
    for fmt, ckpt, part, where, keys, net in sources:
        what, names = f"{fmt} {part}", keys + list(net.state_dict())
        for edit_name, edit in TENSOR_EDITS.items():
            for key in rng.sample(keys, 2):
                new = edited(ckpt, where, lambda state: state.update({key: edit(state[key], rng)}))
                cases.append(torch_file_case(folder, f"{what}: {key} {edit_name}", new, part, names))
        used = [key for key in keys if not DROPPED.fullmatch(key)]
        for edit_name, edit in CONVERTED_EDITS.items():
            key = rng.choice(used)
            new = edited(ckpt, where, lambda state: state.update({key: edit(state[key])}))
            cases.append(torch_file_case(folder, f"{what}: {key} as {edit_name}", new, part, names, CONVERTED))
        new = edited(ckpt, where, lambda state: state.update({k: CONVERTED_EDITS["float16"](v)
                                                              for k, v in state.items()}))
        cases.append(torch_file_case(folder, f"{what}: every tensor float16", new, part, names, CONVERTED))
        for edit_name, edit in KEY_EDITS.items():
            key = rng.choice(keys)
            new = edited(ckpt, where, lambda state: edit(state, key))
            cases.append(torch_file_case(folder, f"{what}: {key} {edit_name}", new, part, names))
        new = edited(ckpt, where, lambda state: state.update({rng.choice(keys): payload}))
        cases.append(torch_file_case(folder, f"{what}: a code payload for a tensor", new, part, "exec", ERROR))
        new = edited(ckpt, where[:-1], lambda parent: parent.update({where[-1]: "not a dict"}))
        cases.append(torch_file_case(folder, f"{what}: {where[-1]} is a string", new, part, where[-1], ERROR))
    return cases


MSGAN_CONFIG_EDITS = {  # msgan checkpoint: the config a network is built from
    "generator": {"channels": [[], [0, 8], "512,512", [2**40] * 3, [8] * 40], "z_dim": [-1, 2**31, "512", 5.5],
                  "mapping_layers": [10**9], "arch": ["stylegan3"], "conv_clamp": [float("nan"), -1.0],
                  "folded": ["yes"]},
    "teacher": {"w_dim": [None, 0, True], "conv_clamp": ["256"]},
    "discriminator": {"img_resolution": [48, 2**40], "stddev_group": [0, -4, 2.5], "channels": [None]},
}


def msgan_config_corpus(folder, sources):
    (_, ckpt, *_), = [s for s in sources if s[0] == "msgan" and s[2] == "generator"]
    cases = []
    for part, edits in MSGAN_CONFIG_EDITS.items():
        for key, values in edits.items():
            for value in values:
                new = edited(ckpt, (part, "config"), lambda config: config.update({key: value}))
                cases.append(torch_file_case(folder, f"msgan {part}: config {key} = {value!r}", new, part, key, ERROR))
        new = edited(ckpt, (part,), lambda entry: entry.update(config="not a dict"))
        cases.append(torch_file_case(folder, f"msgan {part}: config is a string", new, part, "config", ERROR))
    for version in (2, "1", torch.ones(3)):
        cases.append(torch_file_case(folder, f"msgan: version {version!r}", {**ckpt, "version": version},
                                     "generator", "version", ERROR))
    return cases


def byte_corpus(folder, rng, files):
    """Every BYTE_EDITS edit of each (file, part), three random variants of the random ones."""
    cases = []
    for source, part in files:
        data = Path(source).read_bytes()
        for edit_name, edit in BYTE_EDITS.items():
            for variant in range(1 if edit_name in ("empty file", "garbage appended") else 3):
                path = numbered(folder, Path(source).suffix)
                path.write_bytes(edit(data, rng))
                cases.append(Case(f"{Path(source).name} ({part}): {edit_name} #{variant}", path,
                                  functools.partial(msgan.load, path, part=part)))
    return cases


# --- msgan.load: NVIDIA pickles -------------------------------------------------------------


def nvidia_tensor_slots(network):
    """(record, field, name) of every tensor of an NVIDIA network, as in its state_dict (key prefix + name)."""
    return [(prefix + name, module.state[field], name) for prefix, module in formats.nvidia_modules(network, "")
            for field in ("_parameters", "_buffers") for name, v in module.state[field].items() if v is not None]


NVIDIA_ATTRIBUTE_EDITS = [  # (network, module key, attribute, value)
    ("G_ema", "", "c_dim", "ten"), ("G_ema", "synthesis.b8", "architecture", 3),
    ("G_ema", "synthesis.b8.conv0", "conv_clamp", "256"), ("G_ema", "synthesis.b8.conv0", "conv_clamp", float("nan")),
    ("G_ema", "mapping.fc0", "bias_gain", None), ("G_ema", "mapping.fc1", "bias_gain", float("inf")),
    ("D", "b4.mbstd", "group_size", 0), ("D", "b4.mbstd", "num_channels", "1"), ("D", "", "c_dim", [1]),
]


def nvidia_corpus(folder, rng, write, payload):
    cases = []

    def add(name, part, says, edit, expect=None):
        snapshot = formats.read_nvidia_pickle(NV_PKL)
        edit(snapshot)
        path = write(snapshot, numbered(folder, ".pkl"))
        cases.append(Case(name, path, functools.partial(msgan.load, path, part=part), says, expect))

    for network, part in (("G_ema", "generator"), ("D", "discriminator")):
        keys = [key for key, _, _ in nvidia_tensor_slots(formats.read_nvidia_pickle(NV_PKL)[network])]
        names = keys + list(msgan.load(NV_PKL, part=part).state_dict())
        edits = {**{name: (edit, None) for name, edit in TENSOR_EDITS.items()},
                 **{name: (lambda t, rng, convert=convert: convert(t), CONVERTED)
                    for name, convert in CONVERTED_EDITS.items()}}
        for edit_name, (edit, expect) in edits.items():
            key = rng.choice([k for k in keys if not k.endswith("resample_filter")])  # checked, not loaded

            def change(snapshot, key=key, edit=edit):
                (_, slots, name), = [s for s in nvidia_tensor_slots(snapshot[network]) if s[0] == key]
                slots[name] = edit(slots[name], rng)
            add(f"NVIDIA {network}: {key} {edit_name}", part, names, change, expect)
        key = rng.choice(keys)

        def remove(snapshot, key=key):
            (_, slots, name), = [s for s in nvidia_tensor_slots(snapshot[network]) if s[0] == key]
            del slots[name]
        add(f"NVIDIA {network}: {key} removed", part, names, remove)
        add(f"NVIDIA {network}: a code payload for the network", part, "exec",
            lambda snapshot: snapshot.update({network: payload}), ERROR)
    for network, module, attribute, value in NVIDIA_ATTRIBUTE_EDITS:
        def change(snapshot, network=network, module=module, attribute=attribute, value=value):
            dict(formats.nvidia_modules(snapshot[network], ""))[module + "." if module else ""].state[attribute] = value
        add(f"NVIDIA {network}: {module or network}.{attribute} = {value!r}",
            "discriminator" if network == "D" else "generator", [attribute, module or attribute], change, ERROR)
    return cases


# --- the random-face wheel ------------------------------------------------------------------


def wheel_corpus(folder, rng, wheel):
    """Damaged and edited copies of the random-face wheel, each imported as msgan.load("ffhq") imports it."""
    data = Path(wheel).read_bytes()
    copies = {
        "truncated in the IR": data[:len(data) // 2],
        "truncated at the end": data[:-100],
        "bytes flipped in the IR": flip_bytes(data, rng, 4, start=len(data) // 10),
        "empty file": b"",
        "not a zip": b"<html>404 Not Found</html>",
    }
    cases = []
    for name, content in copies.items():
        path = folder / f"{len(cases)}-{formats.RANDOM_FACE_WHEEL}"
        path.write_bytes(content)
        cases.append(Case(f"wheel: {name}", path, functools.partial(import_wheel, path)))
    ir = "random_face/data/SynthesisNetwork.bin"
    for name, replace in (("IR edited (one weight)", lambda member, content: flip_bytes(content, rng, 1)
                           if member == ir else content),
                          ("an IR file missing", lambda member, content: None if member == ir else content)):
        path = folder / f"{len(cases)}-{formats.RANDOM_FACE_WHEEL}"
        with zipfile.ZipFile(wheel) as original, zipfile.ZipFile(path, "w") as tampered:  # stored: quick to write
            for member in original.namelist():
                content = replace(member, original.read(member))
                if content is not None:
                    tampered.writestr(member, content)
        cases.append(Case(f"wheel: {name}", path, functools.partial(import_wheel, path), ir, ERROR))
    return cases


# --- fid.py: image folders and stats files --------------------------------------------------


def write_bomb(path, width, height):
    """A PNG that declares width x height pixels (IHDR) and holds none: what a decompression bomb looks like to
    PIL.Image.open, which must refuse it before decoding anything."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def rgb(size=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_animated(path):
    frames = [rgb(seed=i) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


HOSTILE_IMAGES = {  # file name -> (writer, expected outcome, what the message says)
    "cmyk.jpg": (lambda p: rgb().convert("CMYK").save(p), LOADED, None),
    "palette.png": (lambda p: rgb().convert("P").save(p), LOADED, None),
    "palette_transparency.png": (lambda p: rgb().convert("P").save(p, transparency=0), LOADED, None),
    "gray_alpha.png": (lambda p: rgb().convert("LA").save(p), LOADED, None),
    "one_bit.bmp": (lambda p: rgb().convert("1").save(p), LOADED, None),
    "animated.png": (write_animated, LOADED, None),     # first frame, as pytorch-fid
    "animated.webp": (write_animated, LOADED, None),
    "thin.png": (lambda p: Image.new("RGB", (10_000, 1)).save(p), LOADED, None),
    "gray16.png": (lambda p: Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(p), ERROR, "16-bit"),
    "gray16.tif": (lambda p: Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(p), ERROR, "16-bit"),
    "float.tif": (lambda p: Image.fromarray(np.ones((16, 16), np.float32)).save(p), ERROR, "float"),
    "bomb.png": (lambda p: write_bomb(p, 100_000, 100_000), ERROR, "decompression bomb"),
    "just_over_the_limit.png": (lambda p: write_bomb(p, 10_000, 10_000), ERROR, "decompression bomb"),
    "zero_bytes.png": (lambda p: p.write_bytes(b""), ERROR, "cannot read image"),
    "text.jpg": (lambda p: p.write_text("this is not an image"), ERROR, "cannot read image"),
    "truncated.png": (lambda p: p.write_bytes(png_bytes()[:200]), ERROR, "cannot read image"),
    "folder.png": (lambda p: p.mkdir(), SKIPPED, None),
    "dangling_link.png": (lambda p: p.symlink_to(p.parent / "nowhere"), SKIPPED, None),
    "UPPER.PNG": (lambda p: rgb().save(p, format="PNG"), SKIPPED, None),  # pytorch-fid's globs are case-sensitive
}


def png_bytes(image=None):
    buffer = io.BytesIO()
    (image or rgb(64)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_case(folder, name, write, says=None, expect=None):
    """A folder with one good image and the hostile entry `name`, read as fid.py reads an image folder."""
    folder.mkdir()
    rgb(seed=1).save(folder / "good.png")
    write(folder / name)

    def run():
        paths = fid.list_images(folder)
        assert folder / "good.png" in paths
        if folder / name not in paths:
            return SKIPPED
        for batch in fid.folder_batches(paths, 1):
            assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1
        return LOADED
    return Case(f"image folder: {name}", folder / name, run, says, expect)


def image_corpus(folder, rng):
    cases = [image_case(folder / f"named{i}", name, write, says, expect)
             for i, (name, (write, expect, says)) in enumerate(HOSTILE_IMAGES.items())]
    for fmt in ("png", "jpeg", "bmp", "tiff", "webp", "ppm"):
        buffer = io.BytesIO()
        rgb(64).save(buffer, format=fmt.upper())
        for edit_name in ("8 bytes flipped", "1 byte flipped", "truncated", "first 64 bytes random"):
            content = BYTE_EDITS[edit_name](buffer.getvalue(), rng)
            name = f"{edit_name.replace(' ', '_')}.{fmt}"
            cases.append(image_case(folder / f"{fmt}-{len(cases)}", name,
                                    lambda p, content=content: p.write_bytes(content)))
    return cases


HOSTILE_STATS = {  # name -> (the arrays in the file (one: an .npy), what the error says; None: it loads)
    "pytorch-fid's": (dict(mu=np.zeros(8), sigma=np.eye(8)), None),
    "float32": (dict(mu=np.zeros(8, np.float32), sigma=np.eye(8, dtype=np.float32)), None),
    "other keys": (dict(m=np.zeros(8), s=np.eye(8)), "'mu' and 'sigma'"),
    "no sigma": (dict(mu=np.zeros(8)), "'mu' and 'sigma'"),
    "mu 2-D": (dict(mu=np.zeros((8, 8)), sigma=np.eye(8)), "do not fit"),
    "sigma not square": (dict(mu=np.zeros(8), sigma=np.zeros((8, 7))), "do not fit"),
    "sizes differ": (dict(mu=np.zeros(8), sigma=np.eye(9)), "do not fit"),
    "empty": (dict(mu=np.zeros(0), sigma=np.zeros((0, 0))), "do not fit"),
    "strings": (dict(mu=np.array(["0"] * 8), sigma=np.eye(8)), "dtype"),
    "complex": (dict(mu=np.zeros(8, np.complex128), sigma=np.eye(8)), "dtype"),
    "NaN in mu": (dict(mu=np.full(8, np.nan), sigma=np.eye(8)), "NaN"),
    "inf in sigma": (dict(mu=np.zeros(8), sigma=np.diag(np.full(8, np.inf))), "NaN or inf"),
    "objects (a pickle)": (dict(mu=np.array([object()] * 8), sigma=np.eye(8)), "'mu' and 'sigma'"),
    "a .npy, not an .npz": (np.zeros(8), "'mu' and 'sigma'"),
}


def load_stats_checked(path):
    mu, sigma = fid.load_stats(path)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (len(mu), len(mu))
    assert np.isfinite(mu).all() and np.isfinite(sigma).all()
    return LOADED


def write_stats(path, arrays):
    with open(path, "wb") as f:  # a file object: numpy adds no suffix
        if isinstance(arrays, dict):
            np.savez(f, **arrays, allow_pickle=True)  # the writer allows object arrays; fid.py must refuse them
        else:
            np.save(f, arrays)
    return path


def stats_corpus(folder, rng):
    cases = [Case(f"stats: {name}", write_stats(folder / f"{i}.npz", arrays),
                  functools.partial(load_stats_checked, folder / f"{i}.npz"), says, LOADED if says is None else ERROR)
             for i, (name, (arrays, says)) in enumerate(HOSTILE_STATS.items())]
    good = (folder / "0.npz").read_bytes()
    for edit_name, edit in BYTE_EDITS.items():
        for variant in range(1 if edit_name in ("empty file", "garbage appended") else 3):
            path = folder / f"{len(cases)}.npz"
            path.write_bytes(edit(good, rng))
            cases.append(Case(f"stats: {edit_name} #{variant}", path, functools.partial(load_stats_checked, path)))
    return cases


# --- the corpus -----------------------------------------------------------------------------


def test_hostile_corpus_every_loader_loads_or_gives_one_clear_error(tmp_path, ref, dref, student, teacher, D,
                                                                     nvidia_pickler, capsys):
    """At least 300 hostile inputs; the tally is printed. A case that breaks the contract is listed by name."""
    rng = random.Random(CORPUS_SEED)
    marker = tmp_path / "payload-ran"
    folders = {name: tmp_path / name for name in ("torch", "bytes", "nvidia", "wheel", "images", "stats")}
    for folder in folders.values():
        folder.mkdir()
    sources = torch_sources(tmp_path, ref, dref, student, teacher, D)
    originals = [(tmp_path / "rosinality.pt", "generator"), (tmp_path / "official.pt", "teacher"),
                 (tmp_path / "msgan.pt", "discriminator"), (NV_PKL, "generator")]
    torch.save(sources[0][1], originals[0][0])
    torch.save(sources[2][1], originals[1][0])
    wheel = formats.fetch_random_face_wheel(os.path.join(formats.WEIGHTS_DIR, "cache"))
    msgan_errors, fid_errors = (msgan.CheckpointError, msgan.DownloadError), fid.FIDError
    corpus = [*[(case, msgan_errors) for case in [
        *torch_file_corpus(folders["torch"], rng, sources, Payload(marker)),
        *msgan_config_corpus(folders["torch"], sources),
        *byte_corpus(folders["bytes"], rng, originals),
        *nvidia_corpus(folders["nvidia"], rng, nvidia_pickler, Payload(marker)),
        *wheel_corpus(folders["wheel"], rng, wheel)]],
        *[(case, fid_errors) for case in [*image_corpus(folders["images"], rng), *stats_corpus(folders["stats"], rng)]]]
    tally, broken = collections.Counter(), []
    for case, errors in corpus:
        try:
            tally[check_case(case, errors)] += 1
        except Exception as e:  # the contract is broken: go on, and list every such case at the end
            broken.append(f"{case.name}: {type(e).__name__}: {str(e)[:300]}")
    with capsys.disabled():
        print(f"\nhostile corpus: {len(corpus)} cases: {tally[LOADED]} loaded, {tally[ERROR]} clean errors, "
              f"{tally[SKIPPED]} skipped, {len(broken)} broke the contract")
    assert not broken, f"{len(broken)} of {len(corpus)} cases broke the contract:\n" + "\n".join(broken)
    assert len(corpus) >= 300 and not marker.exists()  # no payload ran


@pytest.mark.parametrize("name", HOSTILE_IMAGES)
def test_fid_reads_or_refuses_each_odd_image(tmp_path, name):
    write, expect, says = HOSTILE_IMAGES[name]
    assert check_case(image_case(tmp_path / "folder", name, write, says, expect), fid.FIDError) == expect


@pytest.mark.parametrize("name", HOSTILE_STATS)
def test_fid_reads_or_refuses_each_odd_stats_file(tmp_path, name):
    arrays, says = HOSTILE_STATS[name]
    path = write_stats(tmp_path / "stats.npz", arrays)
    case = Case(name, path, functools.partial(load_stats_checked, path), says, LOADED if says is None else ERROR)
    assert check_case(case, fid.FIDError) == case.expect
