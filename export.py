"""Export an msgan generator for deployment, and prove that the exported files compute PyTorch's images.

    python export.py onnx                  # default model "ffhq" -> export/mapping.onnx, export/synthesis.onnx
    python export.py onnx --model ckpt.pt  # any checkpoint msgan.load reads, student or teacher
    python export.py onnx --wplus          # also export/synthesis_wplus.onnx, which reads a W+ code
    python export.py onnx --noise-input    # noise maps become inputs noise_0 .. noise_{N-1} (default: baked in)
    python export.py onnx --int8           # also a student's int8 models: synthesis_int8{,_weights}.onnx
    python export.py torchscript           # traced TorchScript: export/*.torchscript.pt
    python export.py openvino              # ONNX, then OpenVINO IR export/*.xml + *.bin (pip install openvino)
    python export.py coreml                # Core ML export/*.mlpackage (pip install coremltools)

The graphs, each with a dynamic batch axis B:
    mapping          z [B, z_dim]            -> w [B, w_dim]
    synthesis        w [B, w_dim]            -> img [B, 3, R, R]
    synthesis_wplus  ws [B, num_ws, w_dim]   -> img [B, 3, R, R]    (the standard StyleGAN2 W+ layout)
With --noise-input the synthesis graphs also read noise_i [1, 1, S_i, S_i], shared by the batch; without it they add
the model's fixed "const" noise, so the image is a deterministic function of w. img is about [-1, 1] and not
clamped: uint8 = clip(img * 127.5 + 128, 0, 255). The ONNX files carry the model's facts as metadata, among them
w_avg for truncation (w = w_avg + psi * (w - w_avg)). A student is exported in inference form: its fixed
demodulation folded into the weights, and only the wavelet head that makes the image (the others only feed the
distillation loss).

Every file is checked before it is kept: onnx.checker, then the graph runs on random inputs at batch 1 and --batch
in onnxruntime (TorchScript: torch.jit.load; OpenVINO: its CPU runtime) and must match PyTorch to PARITY_ATOL.
Core ML cannot run on Linux: its declared inputs and outputs are checked instead. Files are written to a temp folder
inside --outdir and moved into place only when all of them passed, so a failed run leaves none behind.

--int8 quantises a student's synthesis network two ways, the noise baked in and stored in 8 bits in both:
    synthesis_int8.onnx          the last INT8_BLOCKS blocks in integer arithmetic (uint8 activations, equalised and
                                 calibrated on INT8_CALIBRATION_W mapped w; int8 weights with the style folded in),
                                 the rest float32 with int8 weights (Int8Synthesis); w [1, w_dim]: batch 1 only.
                                 Runs in onnxruntime (one contrib operator, QLinearLeakyRelu)
    synthesis_int8_weights.onnx  int8 weights per output channel, read through DequantizeLinear; activations and
                                 arithmetic float32 (the same size, images close to float32, float32's speed)
The check reports each file's size, its PSNR against synthesis.onnx over INT8_CHECK_SEEDS seeds (instead of a
tolerance) and its speed in onnxruntime beside synthesis.onnx.

The speed benchmark that `python sample.py --bench` prints lives here too (bench, bench_table): it times msgan's
paths beside the exported model in onnxruntime and the official model in OpenVINO.
"""
import argparse
import collections
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

import formats
import msgan
import ops

FORMATS = ("onnx", "torchscript", "openvino", "coreml")
DEFAULT_OPSET = 17        # well supported by onnxruntime and OpenVINO, and by the TorchScript-based exporter
MIN_OPSET, MAX_OPSET = 11, 23  # below 11 ONNX has no Slice with computed bounds; 23 is the exporter's newest
PARITY_ATOL = 1e-4        # float32 export vs PyTorch: reordered float32 sums differ by ~1e-5 on images ~[-1, 1]
PARITY_ATOL_OPENVINO = 1e-3  # its CPU plugin fuses and reorders more: 8e-5 on FFHQ, too close to 1e-4
PARITY_ATOL_FP16 = 0.1    # float16 export vs float32 PyTorch: ~3 significant digits, ~20 layers (FFHQ: 0.025)
TRACE_BATCH = 2           # trace at a batch other than 1, so that no size-1 broadcast is baked into the graph
CHECK_SEED = 0
MAX_BATCH = 1024          # --batch of the check: larger is a typo, and would only run out of memory
MB = 1 << 20
INT8_CALIBRATION_W = 16   # w codes that calibrate the int8 activation ranges (seeded, batch 1)
INT8_CHECK_SEEDS = 64     # seeds of the int8 model's PSNR against float32
BENCH_RESOLUTIONS = (256, 1024)
BENCH_ROUNDS = 5         # batch-1 rounds (half as many at the throughput batch)
BENCH_BATCH = 4          # batch of the img/s column, sample.py's default (at 8 the workers together held ~21 GB)
BENCH_SETTLE_S = 0.3     # idle time before each timed call: the last worker's OpenMP / onnxruntime threads spin
                         # for a while after their work and would otherwise slow the next worker down
WORKER_DIED = "its process ended without answering (killed for memory?)"
BENCH_ONNX = {  # the student paths that run msgan's export: (runtime, file)
    "onnxruntime": ("onnxruntime", "synthesis.onnx"),
    "onnxruntime-int8": ("onnxruntime", "synthesis_int8.onnx"),
    "openvino": ("openvino", "synthesis.onnx"),
}


class ExportError(Exception):
    """A failed check, a converter that gave up, or a missing optional package; main prints it as one line."""


# ----------------------------------------------------------------------------------------------
# What gets exported: thin wrappers that fix each graph's call signature


class MappingGraph(nn.Module):
    """z [B, z_dim] -> w [B, w_dim]. Inputs and outputs stay float32 when the weights are float16."""

    def __init__(self, G):
        super().__init__()
        self.mapping = G.mapping

    def forward(self, z):
        return self.mapping(z.to(self.mapping.layers[0].weight.dtype)).float()


class SynthesisGraph(nn.Module):
    """w [B, w_dim] or ws [B, num_ws, w_dim], then one tensor per noise map if they are inputs -> img [B, 3, R, R].

    Without noise arguments the model's const noise buffers are used, and the exporter bakes them in as constants.
    """

    def __init__(self, G):
        super().__init__()
        self.synthesis = G.synthesis

    def forward(self, w, *noise):
        dtype = self.synthesis.const.dtype
        noise = [n.to(dtype) for n in noise] or None
        return self.synthesis(w.to(dtype), noise=noise, noise_mode="const").float()


def make_inputs(G, graph, batch, noise_input, gen, device):
    """Random inputs of one graph: z, or realistic w / ws (the mapping of random z), then random noise maps."""
    if graph == "mapping":
        return {"z": torch.randn(batch, G.z_dim, generator=gen).to(device)}
    slots = G.num_ws if graph == "synthesis_wplus" else 1
    with torch.no_grad():
        w = G.mapping(torch.randn(batch * slots, G.z_dim, generator=gen).to(device))
    inputs = {"ws": w.view(batch, slots, G.w_dim)} if graph == "synthesis_wplus" else {"w": w}
    if noise_input:
        for i, r in enumerate(G.synthesis.noise_resolutions):
            inputs[f"noise_{i}"] = torch.randn(1, 1, r, r, generator=gen).to(device)
    return inputs


def metadata(G, args):
    """What a deployer needs to know, stored in each ONNX file."""
    sizes = {"img_resolution": G.img_resolution, "z_dim": G.z_dim, "w_dim": G.w_dim, "num_ws": G.num_ws}
    return {"msgan.model": os.path.basename(str(args.model)), "arch": G.config["arch"],
            **{key: str(value) for key, value in sizes.items()},
            "noise": "inputs" if args.noise_input else "baked const", "dtype": "float16" if args.fp16 else "float32",
            "w_avg": json.dumps(G.w_avg.float().tolist())}


# ----------------------------------------------------------------------------------------------
# Exporters: each writes one graph to `path`


@contextlib.contextmanager
def quiet_tracing():
    """Hide the tracer's warnings: they flag Python checks on the fixed sizes (w_dim, num_ws, noise sizes).
    The one size that varies, the batch, is proven dynamic by the check, which runs two batch sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", DeprecationWarning)
        yield


def first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def export_onnx(module, inputs, output_name, path, opset, meta):
    # The TorchScript-based exporter (dynamo=False): the dynamo one needs onnxscript, not a dependency of msgan.
    axes = {name: {0: "batch"} for name in [*inputs, output_name] if not name.startswith("noise_")}
    try:
        with quiet_tracing():
            torch.onnx.export(module, tuple(inputs.values()), path, input_names=list(inputs),
                              output_names=[output_name], dynamic_axes=axes, opset_version=opset, dynamo=False)
    except torch.onnx.OnnxExporterError as e:
        raise ExportError(f"{os.path.basename(path)}: the ONNX exporter failed ({first_line(e)})") from None
    model = onnx.load(path)
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, path)
    onnx.checker.check_model(path, full_check=True)


def export_torchscript(module, inputs, path):
    with quiet_tracing():
        torch.jit.save(torch.jit.trace(module, tuple(inputs.values())), path)


def export_openvino(ov, onnx_path, xml_path):
    # read_model, not convert_model: the latter folds each layer's noise map and bias into one [1, C, H, W]
    # constant (FFHQ: a 273 MB .bin for 31 MB of weights; the runtime folds them when it compiles, either way).
    # compress_to_fp16=False: by default OpenVINO would store float32 weights as float16
    ov.save_model(ov.Core().read_model(onnx_path), xml_path, compress_to_fp16=False)


def export_coreml(ct, module, inputs, output_name, path):
    """Via torch.export: coremltools' TorchScript frontend fails on traced shape arithmetic with numpy 2."""
    # noise maps keep batch 1: torch.export cannot express the broadcast rule "1 or B" for an axis
    batch = torch.export.Dim("batch", min=1)
    noise = [name for name in inputs if name.startswith("noise_")]
    dynamic = ({0: batch}, (None,) * len(noise)) if noise else ({0: batch},)
    try:
        program = torch.export.export(module.eval(), tuple(inputs.values()), dynamic_shapes=dynamic)
        mlmodel = ct.convert(program.run_decompositions({}), inputs=[ct.TensorType(name=n) for n in inputs],
                             outputs=[ct.TensorType(name=output_name)], convert_to="mlprogram",
                             compute_precision=ct.precision.FLOAT32)  # --fp16 already made the weights float16
    except Exception as e:  # a converter's refusal, whatever its type, is one line for the user
        raise ExportError(f"{os.path.basename(path)}: coremltools cannot convert the model ({first_line(e)})") from None
    mlmodel.save(path)
    return mlmodel


# ----------------------------------------------------------------------------------------------
# Checks


def check_parity(label, run, cases, atol, resolution=None):
    """Run an exported graph on each (inputs, expected) case; fail if it strays from PyTorch by more than atol."""
    report = []
    for feeds, expected in cases:
        batch = len(next(iter(feeds.values())))
        start = time.perf_counter()
        out = np.asarray(run(feeds))
        ms_per_image = (time.perf_counter() - start) * 1000 / batch  # the last, largest batch is reported
        if out.shape != expected.shape:
            raise ExportError(f"{label}: output shape {list(out.shape)} at batch {batch}, "
                              f"expected {list(expected.shape)}")
        diff = float(np.abs(out - expected).max())
        report.append(f"batch {batch} max|diff| {diff:.1e}")
        if not diff <= atol:  # also catches NaN
            raise ExportError(f"{label}: differs from PyTorch at batch {batch}: max|diff| {diff:.3g} > atol {atol:g}")
    at = f" at {resolution}x{resolution}" if resolution else ""
    print(f"  {label}: {', '.join(report)} (atol {atol:g}); {ms_per_image:.3g} ms/image{at} (batch {batch})")


def check_coreml(mlmodel, label, inputs, output_name):
    """Core ML runs only on Apple's systems: check the declared inputs and outputs instead of the numbers."""
    spec = mlmodel.get_spec().description
    declared = {i.name: list(i.type.multiArrayType.shape) for i in spec.input}
    expected = {name: [1, *t.shape[1:]] for name, t in inputs.items()}  # a dynamic batch is declared as 1
    outputs = [o.name for o in spec.output]
    if declared != expected or outputs != [output_name]:
        raise ExportError(f"{label}: declares inputs {declared} and outputs {outputs}, "
                          f"expected {expected} and {[output_name]}")
    print(f"  {label}: inputs {declared}, output {output_name!r} (not run: Core ML needs macOS/iOS)")


def size_of(path):
    if os.path.isdir(path):  # an .mlpackage is a folder
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


@contextlib.contextmanager
def staging(outdir):
    """A temp folder inside outdir; its files are moved into outdir only if the block finishes without error."""
    try:
        os.makedirs(outdir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=outdir)
    except OSError as e:
        raise OSError(f"cannot write to the output directory {outdir}: {e.strerror or e}") from None
    try:
        yield tmp
        with formats.interrupts_held():  # a Ctrl-C here would leave a removed .mlpackage not yet replaced
            for name in sorted(os.listdir(tmp)):
                dest = os.path.join(outdir, name)
                if os.path.isdir(dest):  # os.replace cannot overwrite a non-empty folder (an older .mlpackage)
                    shutil.rmtree(dest)
                os.replace(os.path.join(tmp, name), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def optional_import(package, purpose):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ExportError(f"{purpose} needs the optional package {package}, which is not installed "
                          f"(pip install {package})") from None


# ----------------------------------------------------------------------------------------------
# int8: a student's synthesis network with its last blocks in integer arithmetic
#
# Static quantisation in the usual form (one uint8 range per activation tensor, calibrated once) fits this network
# badly: the style scales every channel of every layer by a per-sample factor, so each sample has its own
# per-channel ranges (onnxruntime's tool, QDQ with every convolution in int8, gives 22 dB on FFHQ). Int8Synthesis
# quantises the form in which the style does not reach the activations:
#   - the style goes into the weights: each pointwise conv reads W * style (per sample, quantised to int8 per output
#     channel in the graph), after a depthwise conv that reads unmodulated activations; the IDWT's modulation goes
#     into the weights of its transposed conv the same way;
#   - every uint8 tensor is equalised: channel c holds x_c / e_c, e_c its largest magnitude in calibration, and the
#     neighbouring weights carry e (exact: per-channel factors commute with depthwise convs and leaky ReLU), so the
#     tensor's one range serves all channels;
#   - the noise is one more uint8 input channel of the pointwise conv (weight noise_strength), the bias is inside
#     the conv, leaky ReLU maps uint8 to uint8 by table: within a block only the IDWT (a transposed conv between
#     DequantizeLinear and QuantizeLinear) computes in float.
# Only the last INT8_BLOCKS blocks, where the pixels and the time are, run so; the earlier ones run in float32
# with int8 weights. Each op below computes in PyTorch exactly what its ONNX operator computes in onnxruntime
# (QuantizeLinear, DequantizeLinear, QLinearConv, and onnxruntime's QLinearLeakyRelu), so the module's forward is
# the exported model's specification. Its weights are per sample, so the model takes a batch of one.

INT8_BLOCKS = 3  # FFHQ: the 128-512 px blocks, ~70% of float32's time; more blocks cost quality, fewer cost speed


def _constant(g, value, dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def quantize(x, scale, zero):
    return (torch.round(x / scale) + zero).clamp(0, 255).to(torch.uint8)


def dequantize(q, scale, zero):
    return (q.float() - zero) * scale


def quantize_rows(w):
    """Symmetric int8, one scale per output channel (dim 0): (int8 weights, scales [O])."""
    scale = w.abs().flatten(1).amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8), scale


class Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero):
        return quantize(x, scale, zero)

    @staticmethod
    def symbolic(g, x, scale, zero):
        return g.op("QuantizeLinear", x, _constant(g, scale, torch.float32), _constant(g, zero, torch.uint8))


class Dequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zero):
        return dequantize(q, scale, zero)

    @staticmethod
    def symbolic(g, q, scale, zero):
        return g.op("DequantizeLinear", q, _constant(g, scale, torch.float32), _constant(g, zero, torch.uint8))


class DequantizeRows(torch.autograd.Function):
    """int8 weights with one scale per output channel -> float32 (a stored weight, read in the graph)."""

    @staticmethod
    def forward(ctx, q, scale):
        return q.float() * scale.view(-1, *[1] * (q.dim() - 1))

    @staticmethod
    def symbolic(g, q, scale):
        return g.op("DequantizeLinear", q, scale, axis_i=0)


class QLinearConv(torch.autograd.Function):
    """uint8 x (x_scale, x_zero) * int8 w (scale per output channel) + int32 bias -> uint8 (y_scale, y_zero)."""

    @staticmethod
    def forward(ctx, x, x_scale, x_zero, w, w_scale, bias, y_scale, y_zero, groups, pad):
        # the int32 sum, exactly: |products| <= 255 * 127, summed over a fan-in up to 512 stay below 2**24
        bias = None if bias is None else bias.float()
        acc = F.conv2d(x.float() - x_zero, w.float(), bias, padding=pad, groups=groups)
        return quantize(acc * (x_scale * w_scale / y_scale).view(1, -1, 1, 1), 1.0, y_zero)

    @staticmethod
    def symbolic(g, x, x_scale, x_zero, w, w_scale, bias, y_scale, y_zero, groups, pad):
        w_zero = g.op("Expand", _constant(g, [0], torch.int8), g.op("Shape", w_scale))
        inputs = [x, _constant(g, x_scale, torch.float32), _constant(g, x_zero, torch.uint8), w, w_scale, w_zero,
                  _constant(g, y_scale, torch.float32), _constant(g, y_zero, torch.uint8)]
        return g.op("QLinearConv", *inputs, *([] if bias is None else [bias]), group_i=groups, pads_i=[pad] * 4)


class QLinearLeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_scale, x_zero, y_scale, y_zero):
        return quantize(F.leaky_relu(dequantize(x, x_scale, x_zero), ops.LRELU_SLOPE), y_scale, y_zero)

    @staticmethod
    def symbolic(g, x, x_scale, x_zero, y_scale, y_zero):
        y = g.op("com.microsoft::QLinearLeakyRelu", x, _constant(g, x_scale, torch.float32),
                 _constant(g, x_zero, torch.uint8), _constant(g, y_scale, torch.float32),
                 _constant(g, y_zero, torch.uint8), alpha_f=ops.LRELU_SLOPE)
        y.setType(x.type())  # elementwise: x's shape and dtype (the exporter cannot infer a contrib op's)
        return y


class Range:
    """How a uint8 tensor holds x: x_c / e_c = (q - zero) * scale, with per-channel factors e [C]."""

    def __init__(self, e, lo, hi):
        self.e, self.lo, self.hi = e, lo, hi
        self.scale = max(hi - lo, 1e-8) / 255
        self.zero = int(round(-lo / self.scale))

    @classmethod
    def calibrated(cls, lo, hi, equalise=True):
        """From per-channel minima and maxima [C] seen in calibration."""
        e = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-8) if equalise else torch.ones_like(lo)
        return cls(e, min(float((lo / e).min()), 0.0), max(float((hi / e).max()), 0.0))

    def permuted(self, order):
        return Range(self.e[order], self.lo, self.hi)

    def leaky_relu(self):
        return Range(self.e, ops.LRELU_SLOPE * self.lo, self.hi)


class Int8Synthesis(nn.Module):
    """w [1, w_dim] -> img [1, 3, R, R] of a folded student, its last INT8_BLOCKS blocks in int8 (see above).

    Calibration runs the float network on `calibration_w` and records, per channel, the extremes of every tensor
    that is held in uint8: the first int8 block's input, each IDWT output, depthwise output and pre-activation.
    """

    def __init__(self, G, calibration_w):
        super().__init__()
        self.S = S = G.synthesis
        self.first = max(len(S.blocks) - INT8_BLOCKS, 0)
        extremes = {}
        with torch.no_grad():
            for w in calibration_w:
                self.forward_float(w, extremes)
        self.ranges = {key: Range.calibrated(lo, hi, equalise=key != "head") for key, (lo, hi) in extremes.items()}
        # the weights of the int8 layers, stored int8 (per output channel) and read through DequantizeRows
        self.weights = {name: quantize_rows(p.detach()) for name, p in S.named_parameters()
                        if name.startswith(tuple(f"blocks.{i}." for i in range(self.first, len(S.blocks))))
                        and (name.endswith("conv.weight") or name.endswith("conv.weight_dw"))}
        self.noise = {}  # (block, conv) -> (uint8 noise map on the depthwise output's range, its factor e)
        for i in range(self.first, len(S.blocks)):
            for j in (1, 2):
                noise, r = getattr(S.noise_const, str(2 * i + j)), self.ranges[f"{i}.dw{j}"]
                reach = max(min(-r.lo, r.hi), (r.hi - r.lo) / 8)  # room on either side of the zero point
                e = float(noise.abs().max()) / reach
                self.noise[i, j] = quantize(noise / e, r.scale, r.zero), e

    @staticmethod
    def record(extremes, key, t):
        lo, hi = t.amin((0, 2, 3)), t.amax((0, 2, 3))
        if key in extremes:
            lo, hi = torch.minimum(lo, extremes[key][0]), torch.maximum(hi, extremes[key][1])
        extremes[key] = lo, hi

    def forward_float(self, w, extremes):
        """forward_reference's image, recording the extremes of the tensors to quantise."""
        S = self.S
        _, slots = S.style_slots("standard")
        x, ws, noise = S.start(w, None, "const", "standard")
        for i, (block, (s_up, s_conv2, s_head)) in enumerate(zip(S.blocks, slots)):
            if i == self.first:
                self.record(extremes, f"{i}.in", x)
            x = block.up(x, ws[:, s_up])
            if i >= self.first:
                self.record(extremes, f"{i}.up", x)
            for j, (layer, slot) in enumerate([(block.conv1, s_up), (block.conv2, s_conv2)], 1):
                depthwise = F.conv2d(x, layer.conv.weight_dw, padding=1, groups=x.shape[1])
                y = F.conv2d(depthwise * layer.conv.styles(ws[:, slot])[:, :, None, None], layer.conv.weight,
                             layer.bias) + layer.noise_strength * noise[2 * i + j]
                if i >= self.first:
                    self.record(extremes, f"{i}.dw{j}", depthwise)
                    self.record(extremes, f"{i}.pre{j}", y)
                x = F.leaky_relu(y, ops.LRELU_SLOPE)
        wavelets = block.to_wavelets(x, ws[:, s_head])
        self.record(extremes, "head", wavelets)
        return ops.wavelets_to_img(wavelets)

    def up(self, block, x, r_in, styles, i):
        """IDWT of x * styles: uint8 in (channels in ops.haar_band_groups order), uint8 out."""
        r_up, C = self.ranges[f"{i}.up"], int(block.up.modulation.out_features) // 4
        scale = styles[0, ops.haar_band_groups(C)] * r_in.e / r_up.e.repeat_interleave(4)  # [4C]
        filters = ops.haar_synthesis_filters(torch.float32, x.device).repeat(C, 1, 1, 1) * scale.view(-1, 1, 1, 1)
        x = F.conv_transpose2d(Dequantize.apply(x, r_in.scale, r_in.zero), filters, stride=2, groups=C)
        return Quantize.apply(x, r_up.scale, r_up.zero), r_up

    def weight(self, name):
        return DequantizeRows.apply(*self.weights[name])

    def styled_conv(self, layer, x, r_in, styles, i, j, order=None):
        """MobileStyledConv on uint8 x; `order` reorders the output channels (for the next IDWT's groups)."""
        conv, r_dw, r_pre = layer.conv, self.ranges[f"{i}.dw{j}"], self.ranges[f"{i}.pre{j}"]
        name = f"blocks.{i}.conv{j}.conv"
        channels = int(conv.weight_dw.shape[0])
        # Depthwise: static weights, equalised from the input's factors to the output's.
        w, w_scale = quantize_rows(self.weight(f"{name}.weight_dw") * (r_in.e / r_dw.e).view(-1, 1, 1, 1))
        x = QLinearConv.apply(x, r_in.scale, r_in.zero, w, w_scale, None, r_dw.scale, r_dw.zero, channels, 1)
        # Pointwise: the style and the equalisation in the weights, the noise as one more input channel.
        noise, noise_e = self.noise[i, j]
        x = torch.cat([x, noise], 1)
        weight = torch.cat([self.weight(f"{name}.weight")[:, :, 0, 0] * (styles[0] * r_dw.e)[None],
                            (layer.noise_strength * noise_e).expand(conv.weight.shape[0], 1)], 1)  # [O, I + 1]
        bias = layer.bias
        if order is not None:
            weight, bias, r_pre = weight[order], bias[order], r_pre.permuted(order)
        w, w_scale = quantize_rows((weight / r_pre.e[:, None])[:, :, None, None])
        bias = torch.round(bias / r_pre.e / (r_dw.scale * w_scale)).to(torch.int32)
        x = QLinearConv.apply(x, r_dw.scale, r_dw.zero, w, w_scale, bias, r_pre.scale, r_pre.zero, 1, 0)
        r_out = r_pre.leaky_relu()
        return QLinearLeakyReLU.apply(x, r_pre.scale, r_pre.zero, r_out.scale, r_out.zero), r_out

    def forward(self, w):
        S = self.S
        _, slots = S.style_slots("standard")
        x, ws, noise = S.start(w, None, "const", "standard")
        last = len(S.blocks) - 1
        for i, (block, (s_up, s_conv2, s_head)) in enumerate(zip(S.blocks, slots)):
            if i < self.first:  # float32
                x = block.up(x, ws[:, s_up])
                x = block.conv1(x, ws[:, s_up], noise[2 * i + 1])
                x = block.conv2(x, ws[:, s_conv2], noise[2 * i + 2])
                continue
            if i == self.first:
                order = ops.haar_band_groups(int(block.up.modulation.out_features) // 4)
                r = self.ranges[f"{i}.in"].permuted(order)
                x = Quantize.apply(x[:, order] / r.e.view(1, -1, 1, 1), r.scale, r.zero)
            x, r = self.up(block, x, r, block.up.modulation(ws[:, s_up]), i)
            x, r = self.styled_conv(block.conv1, x, r, block.conv1.conv.styles(ws[:, s_up]), i, 1)
            order = None if i == last else ops.haar_band_groups(int(block.conv2.bias.numel()) // 4)
            x, r = self.styled_conv(block.conv2, x, r, block.conv2.conv.styles(ws[:, s_conv2]), i, 2, order)
        # The wavelet head: uint8 in, wavelets dequantised for the last (float) IDWT.
        head, r_head = block.to_wavelets, self.ranges["head"]
        styles = head.conv.styles(ws[:, s_head])[0] * r.e
        weight = self.weight(f"blocks.{last}.to_wavelets.conv.weight")[:, :, 0, 0] * styles[None]
        w, w_scale = quantize_rows(weight[:, :, None, None])
        bias = torch.round(head.bias / (r.scale * w_scale)).to(torch.int32)
        x = QLinearConv.apply(x, r.scale, r.zero, w, w_scale, bias, r_head.scale, r_head.zero, 1, 0)
        return ops.wavelets_to_img(Dequantize.apply(x, r_head.scale, r_head.zero))


def mapped_w(G, seeds):
    """[1, w_dim] float32 arrays: the mapping network's w of each seed's z."""
    with torch.no_grad():
        return [G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))
                          .to(G.w_avg.device)).cpu().numpy() for seed in seeds]


INT8_MODELS = {  # file -> how it is quantised (its "dtype" metadata)
    "synthesis_int8.onnx": "int8 (the last blocks in uint8 activations and int8 weights; the rest int8 weights)",
    "synthesis_int8_weights.onnx": "int8 weights per channel, float32 activations",
}


def quantize_int8(G, float_path, path):
    """A folded student -> synthesis_int8.onnx: Int8Synthesis calibrated on the w of seeds 1000.. (apart from the
    check's 0..), its remaining float32 weights stored int8 as in the weights-only model."""
    calibration_w = [torch.from_numpy(w) for w in mapped_w(G, range(1000, 1000 + INT8_CALIBRATION_W))]
    module = Int8Synthesis(copy.deepcopy(G).float().cpu(), calibration_w).eval()
    try:
        with quiet_tracing(), torch.no_grad():
            torch.onnx.export(module, (calibration_w[0],), path, input_names=["w"], output_names=["img"],
                              opset_version=DEFAULT_OPSET, custom_opsets={"com.microsoft": 1}, dynamo=False)
    except torch.onnx.OnnxExporterError as e:
        raise ExportError(f"synthesis_int8.onnx: the ONNX exporter failed ({first_line(e)})") from None
    model = onnx.load(path)
    store_weights_int8(model)
    finish_int8(model, float_path, path)


def quantize_int8_weights(float_path, path):
    """synthesis.onnx -> the same graph with every Conv and Gemm weight stored int8 (symmetric, one scale per output
    channel) and read through a DequantizeLinear; the activations and arithmetic stay float32."""
    model = onnx.load(float_path)
    store_weights_int8(model)
    finish_int8(model, float_path, path)


def store_weights_int8(model):
    """Every constant Conv and Gemm weight of an ONNX model to int8 (symmetric, one scale per output channel), read
    through a DequantizeLinear."""
    weights = {init.name: init for init in model.graph.initializer}
    for node in [node for node in model.graph.node if node.op_type in ("Conv", "Gemm")]:
        init = weights.pop(node.input[1], None)  # None: not a constant, or shared and already stored
        if init is None:
            continue
        # the output channels: Conv [O, I, kh, kw]; Gemm's B [N, K] with transB, else [K, N]
        transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)
        axis = 1 if transposed else 0
        values = onnx.numpy_helper.to_array(init)
        others = tuple(d for d in range(values.ndim) if d != axis)
        scale = (np.maximum(np.abs(values).max(axis=others), 1e-12) / 127).astype(np.float32)
        store_int8(model, init, values / np.expand_dims(scale, others), scale, axis)


def finish_int8(model, float_path, path):
    """Noise maps to int8, the float model's metadata plus the dtype, saved and checked."""
    int8_noise(model)
    props = {p.key: p.value for p in onnx.load(float_path, load_external_data=False).metadata_props}
    onnx.helper.set_model_props(model, {**props, "dtype": INT8_MODELS[os.path.basename(path)]})
    onnx.save(model, path)
    onnx.checker.check_model(path, full_check=True)


def store_int8(model, init, steps, scale, axis=None):
    """Replace the float initializer init by round(steps) in int8 and a DequantizeLinear that multiplies back by
    scale (one scale, or one per index of axis)."""
    quantised = np.clip(np.round(steps), -127, 127).astype(np.int8)
    model.graph.initializer.remove(init)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(quantised, f"{init.name}_int8"),
                                    onnx.numpy_helper.from_array(scale, f"{init.name}_scale")])
    model.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", [f"{init.name}_int8", f"{init.name}_scale"],
                                                     [init.name], name=f"{init.name}_DequantizeLinear",
                                                     **({} if axis is None else {"axis": axis})))


def int8_noise(model):
    """Store the baked noise maps (the float constants that Add nodes read, each noise_strength * noise) as int8
    with one scale each: a quarter of their bytes, a step of ~1/30 of the noise's standard deviation (the biases,
    which Add nodes read too, stay float: they are tiny)."""
    readers = collections.defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            readers[name].add(node.op_type)
    for init in list(model.graph.initializer):
        if (init.data_type != onnx.TensorProto.FLOAT or readers[init.name] != {"Add"} or len(init.dims) != 4
                or init.dims[1] != 1):  # noise maps are [1, 1, H, W]
            continue
        values = onnx.numpy_helper.to_array(init)
        scale = np.float32(max(float(np.abs(values).max()), 1e-12) / 127)
        store_int8(model, init, values / scale, scale)


def onnxruntime_session(ort, path, threads=0):
    """An onnxruntime CPU session (threads 0: its default). An int8 model gets the option that lets onnxruntime
    fold the DequantizeLinear of each constant weight once at load (without it, every call dequantises them: the
    weights-only model takes ~1.15x the time at 1024 px, synthesis_int8.onnx ~1.1x). Neither model has patterns
    of QuantizeLinear and DequantizeLinear for onnxruntime to fuse, which is all the option turns off besides."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if os.path.basename(path) in INT8_MODELS:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check_int8(ort, G, float_path, paths):
    """Run each int8 model beside the float32 one on INT8_CHECK_SEEDS seeds: sizes, PSNR (images clamped to
    [-1, 1], as they are shown) and speed at batch 1."""
    sessions = [onnxruntime_session(ort, path) for path in [float_path, *paths]]
    psnrs, seconds = [[] for _ in paths], [0.0] * len(sessions)
    for w in mapped_w(G, range(INT8_CHECK_SEEDS)):
        images = []
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            images.append(np.clip(session.run(None, {"w": w})[0], -1, 1))
            seconds[i] += time.perf_counter() - start
        for path_psnrs, image in zip(psnrs, images[1:]):
            path_psnrs.append(10 * math.log10(4 / max(float(np.mean((image - images[0]) ** 2)), 1e-10)))
    for path, session, path_psnrs, time_s in zip(paths, sessions[1:], psnrs, seconds[1:]):
        name = os.path.basename(path)
        batch = 1 if session.get_inputs()[0].shape[0] == 1 else 2  # synthesis_int8.onnx: per-sample weights
        images = session.run(None, {"w": np.concatenate(mapped_w(G, range(batch)))})[0]
        if images.shape != (batch, 3, G.img_resolution, G.img_resolution) or not np.isfinite(images).all():
            raise ExportError(f"{name}: batch {batch} gives {list(images.shape)} or non-finite values")
        print(f"  {name}: {size_of(path) / size_of(float_path):.2f}x the float32 file; PSNR against it "
              f"{statistics.mean(path_psnrs):.2f} dB (min {min(path_psnrs):.2f}) over seeds 0-{INT8_CHECK_SEEDS - 1}; "
              f"{1000 * time_s / INT8_CHECK_SEEDS:.3g} ms/image against {1000 * seconds[0] / INT8_CHECK_SEEDS:.3g}")


# ----------------------------------------------------------------------------------------------
# The export


def export_graph(args, G, G_export, graph, tmp, runtimes, gen):
    """Export one graph into tmp in args.format and check it against PyTorch (the float32 model G)."""
    ort, ov, ct = runtimes
    wrapper = MappingGraph if graph == "mapping" else SynthesisGraph
    module, reference = wrapper(G_export), wrapper(G)
    output_name, resolution = ("w", None) if graph == "mapping" else ("img", G.img_resolution)
    atol = PARITY_ATOL_FP16 if args.fp16 else PARITY_ATOL
    example = make_inputs(G, graph, TRACE_BATCH, args.noise_input, gen, args.device)
    cases = []
    for batch in sorted({1, args.batch}):
        inputs = make_inputs(G, graph, batch, args.noise_input, gen, args.device)
        with torch.no_grad():
            expected = reference(*inputs.values()).cpu().numpy()
        cases.append(({name: t.cpu().numpy() for name, t in inputs.items()}, expected))

    if args.format in ("onnx", "openvino"):
        path = os.path.join(tmp, f"{graph}.onnx")
        export_onnx(module, example, output_name, path, args.opset, metadata(G, args))
        print(f"  {graph}.onnx: onnx.checker ok")
        if ort is not None:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            check_parity(f"{graph}.onnx in onnxruntime", lambda feeds: session.run(None, feeds)[0], cases, atol,
                         resolution)
    if args.format == "openvino":
        xml = os.path.join(tmp, f"{graph}.xml")
        export_openvino(ov, path, xml)
        # f32: on a CPU with bf16 support OpenVINO would otherwise compute in bf16
        compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        check_parity(f"{graph}.xml in OpenVINO", lambda feeds: compiled(feeds)[0], cases,
                     max(atol, PARITY_ATOL_OPENVINO), resolution)
    if args.format == "torchscript":
        path = os.path.join(tmp, f"{graph}.torchscript.pt")
        export_torchscript(module, example, path)
        loaded = torch.jit.load(path, map_location=args.device)

        def run(feeds):
            with torch.no_grad():
                return loaded(*(torch.from_numpy(v).to(args.device) for v in feeds.values())).cpu().numpy()
        check_parity(f"{graph}.torchscript.pt", run, cases, atol, resolution)
    if args.format == "coreml":
        mlmodel = export_coreml(ct, module, example, output_name, os.path.join(tmp, f"{graph}.mlpackage"))
        check_coreml(mlmodel, f"{graph}.mlpackage", example, output_name)


def export(args):
    if args.int8:
        optional_import("onnxruntime", "export.py --int8")
    ov = optional_import("openvino", "export.py openvino") if args.format == "openvino" else None
    ct = optional_import("coremltools", "export.py coreml") if args.format == "coreml" else None
    ort = None
    if args.format in ("onnx", "openvino"):
        try:
            import onnxruntime as ort
        except ImportError:
            print("export.py: warning: onnxruntime is not installed, so the ONNX files are checked with onnx.checker "
                  "but not run (pip install onnxruntime)", file=sys.stderr)
    G = msgan.load(args.model, device=args.device, part="teacher" if args.teacher else "generator")
    G = G.fold().requires_grad_(False)  # a student's fixed demodulation goes into its weights; a teacher is unchanged
    if args.int8 and not G.is_student:
        raise ExportError(f"--int8 quantises a MobileStyleGAN student; {args.model} is a StyleGAN2 teacher")
    kind = "MobileStyleGAN student (demodulation folded)" if G.is_student else "StyleGAN2 teacher"
    print(f"export.py: {args.model}: {kind}, {G.img_resolution}x{G.img_resolution}, z_dim {G.z_dim}, "
          f"w_dim {G.w_dim}, num_ws {G.num_ws}; noise: {'inputs' if args.noise_input else 'baked const'}; "
          f"{'float16' if args.fp16 else 'float32'}")
    G_export = copy.deepcopy(G).half() if args.fp16 else G
    gen = torch.Generator().manual_seed(CHECK_SEED)
    with staging(args.outdir) as tmp:
        for graph in ["mapping", "synthesis"] + (["synthesis_wplus"] if args.wplus else []):
            export_graph(args, G, G_export, graph, tmp, (ort, ov, ct), gen)
        if args.int8:
            float_path, paths = os.path.join(tmp, "synthesis.onnx"), [os.path.join(tmp, n) for n in INT8_MODELS]
            quantize_int8(G, float_path, paths[0])
            quantize_int8_weights(float_path, paths[1])
            check_int8(ort, G, float_path, paths)
        written = [f"{os.path.join(args.outdir, name)} ({size_of(os.path.join(tmp, name)) / MB:.1f} MB)"
                   for name in sorted(os.listdir(tmp))]
    print("wrote " + ", ".join(written))


# ----------------------------------------------------------------------------------------------
# Benchmark (`python sample.py --bench`): msgan's paths against the exported model in its runtimes. Every
# (model, path) runs in its own worker process, so that each one's peak RSS is its own; the workers take turns,
# one forward each per round, so that drift on a shared machine hits all alike.


def bench_config(kind, res):
    """Geometry of the benchmarked networks (random weights: the speed does not depend on them)."""
    if kind == "teacher":  # rosinality's StyleGAN2 (channel multiplier 2), as the official teacher
        return dict(arch="stylegan2", z_dim=512, w_dim=512, mapping_layers=8, channels=msgan.default_channels(res))
    channels = formats.FFHQ_CONFIG["channels"][:int(math.log2(res)) - 2]  # the FFHQ student, cut at res
    return dict(arch="mobilestylegan", z_dim=512, w_dim=512, mapping_layers=8, channels=channels)


def bench_generator(kind, res):
    torch.manual_seed(0)
    return msgan.Generator(bench_config(kind, res)).requires_grad_(False)


def bench_runner(kind, res, path, device, onnx_path):
    """A function ws -> images for one (model, path), built inside its worker."""
    if path == "openvino":  # the official FFHQ-1024 IR from the random-face wheel, or msgan's synthesis.onnx
        import openvino as ov
        if kind == "official":
            files = formats.random_face_ir(os.path.join(formats.WEIGHTS_DIR, "cache", formats.RANDOM_FACE_WHEEL))
            model = ov.Core().read_model(model=files["SynthesisNetwork.xml"],
                                         weights=ov.Tensor(np.frombuffer(files["SynthesisNetwork.bin"], np.uint8)))
        else:
            model = ov.Core().read_model(onnx_path)
        compiled = {}

        def run_openvino(w):  # one compiled model per batch size (the official IR's batch is static)
            if len(w) not in compiled:
                model.reshape({model.inputs[0].get_any_name(): [len(w), w.shape[1]]})
                config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
                compiled[len(w)] = ov.Core().compile_model(model, "CPU", config)
            return compiled[len(w)](w.numpy())[0]
        return run_openvino
    if path in BENCH_ONNX:
        import onnxruntime as ort
        session = onnxruntime_session(ort, onnx_path, torch.get_num_threads())
        if session.get_inputs()[0].shape[0] == 1:  # the int8 model: a batch is one call per sample
            return lambda w: np.concatenate([session.run(None, {"w": w[i:i + 1].numpy()})[0] for i in range(len(w))])
        return lambda w: session.run(None, {"w": w.numpy()})[0]
    # every student path runs the folded network (the form sample.py loads): the rows differ only by their path
    G = bench_generator(kind, res).to(device).fold()
    if path == "reference":
        return G.synthesis.forward_reference if kind == "student" else G.synthesis
    if path == "compiled":
        return torch.compile(G.synthesis)
    if path == "inference-bf16":  # sample.py --bf16
        G.synthesis.to(torch.bfloat16)
    msgan.tune_tiling(G)  # as sample.py runs it: tiles timed once per machine (cached)
    return G.synthesis


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
        student = (["reference", "inference"] + (["inference-bf16"] if ops.native_bf16(torch.device(device)) else [])
                   + (["compiled"] if compile else []))
        if device == "cpu":
            student += [path for path, (runtime, _) in BENCH_ONNX.items() if available[runtime]]
        paths += [("student", res, path) for path in student]
    wheel = os.path.join(formats.WEIGHTS_DIR, "cache", formats.RANDOM_FACE_WHEEL)
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
            onnx_path = None
            if row["model"] == "student" and row["path"] in BENCH_ONNX:
                # in a process of its own: Linux keeps a process's peak RSS across fork and exec, so a parent that
                # exported a large model would hand its peak to every worker started after
                os.makedirs(os.path.join(tmp, f"{row['model']}{row['res']}"), exist_ok=True)
                onnx_path = os.path.join(tmp, f"{row['model']}{row['res']}", BENCH_ONNX[row["path"]][1])
                exporter = context.Process(target=bench_export_onnx, args=(row["model"], row["res"], onnx_path))
                exporter.start()
                exporter.join()
            conn, child = context.Pipe()
            process = context.Process(target=bench_worker, daemon=True,
                                      args=(child, row["model"], row["res"], row["path"], device, onnx_path))
            process.start()
            child.close()  # the worker's end lives in the worker alone: if it dies, recv here raises EOFError
            try:
                reply = conn.recv()
            except EOFError:
                reply = WORKER_DIED
            if reply != "ready":
                row["error"] = reply
            workers.append((row, conn, process))
        live = [(row, conn) for row, conn, _ in workers if "error" not in row]

        def ask(row, conn, request):
            """The worker's answer, or None after recording its error (it has exited)."""
            if "error" not in row:
                time.sleep(BENCH_SETTLE_S if request[0] == "run" else 0)
                try:
                    conn.send(request)
                    reply = conn.recv()
                except (EOFError, OSError):
                    reply = WORKER_DIED
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


def bench_export_onnx(kind, res, path):
    """msgan's own synthesis.onnx (the file `export.py onnx` writes), or from it an int8 model of `export.py onnx
    --int8`, for the paths that run msgan's export."""
    G = bench_generator(kind, res).fold()
    float_path = os.path.join(os.path.dirname(path), "synthesis.onnx")
    if not os.path.exists(float_path):
        with torch.no_grad():
            export_onnx(SynthesisGraph(G), {"w": torch.randn(1, G.w_dim)}, "img", float_path, DEFAULT_OPSET, {})
    if path != float_path:
        quantize_int8(G, float_path, path)


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
        float32 = [path for path in student if "int8" not in path and "bf16" not in path]
        best = min(float32, key=student.get, default=None)
        teacher, official = ms.get(("teacher", res, "reference")), ms.get(("official", res, "openvino"))
        if best and teacher:
            lines.append(f"\n{res}px: teacher / student ({best}) = {teacher / student[best]:.1f}x")
        for path in dict.fromkeys([best, "inference", "inference-bf16", "openvino"]):
            if path in student and official:
                lines.append(f"{res}px: msgan {path} / official OpenVINO (float32) = {student[path] / official:.2f}")
        if "inference" in student and "reference" in student:
            lines.append(f"{res}px: inference path / reference path = "
                         f"{student['inference'] / student['reference']:.2f}")
        if "inference-bf16" in student and "inference" in student:
            lines.append(f"{res}px: inference path bfloat16 / float32 = "
                         f"{student['inference-bf16'] / student['inference']:.2f}")
        if "onnxruntime-int8" in student and "onnxruntime" in student:
            lines.append(f"{res}px: onnxruntime int8 / float32 = "
                         f"{student['onnxruntime-int8'] / student['onnxruntime']:.2f}")
    machine = ops.cpu_name()
    lines.append(f"({threads} threads, {machine}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')})")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Export an msgan generator (mapping + synthesis) and check the result.")
    p.add_argument("format", choices=FORMATS, help="onnx, torchscript, openvino (via ONNX) or coreml")
    p.add_argument("--model", default="ffhq", help="model name or checkpoint path, as for msgan.load (default: ffhq)")
    p.add_argument("--teacher", action="store_true", help="the StyleGAN2 teacher of an official/msgan checkpoint")
    p.add_argument("--outdir", default="export", help="output directory (default: export)")
    p.add_argument("--wplus", action="store_true", help="also export synthesis_wplus (input ws [B, num_ws, w_dim])")
    p.add_argument("--noise-input", action="store_true", help="noise maps as inputs noise_i instead of baked constants")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic; inputs/outputs stay float32")
    p.add_argument("--int8", action="store_true", help="also synthesis_int8.onnx and synthesis_int8_weights.onnx: "
                   "a student quantised to int8, all through or in its weights only (onnx only; needs onnxruntime)")
    p.add_argument("--device", default="cpu", help="device that traces and computes the reference (default: cpu)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the check, besides 1 (default: 2)")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= MAX_BATCH:
        p.error(f"--batch must be between 1 and {MAX_BATCH}")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        p.error(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}")
    if args.int8 and (args.format != "onnx" or args.fp16 or args.noise_input):
        p.error("--int8 goes with onnx, float32 weights and baked noise (not --fp16 or --noise-input)")
    return args


def main(argv=None):
    args = parse_args(argv)
    ops.use_huge_pages()
    try:
        export(args)
    except (ExportError, ValueError, OSError, msgan.DownloadError) as e:  # msgan.CheckpointError is a ValueError
        print(f"export.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # staging() has removed the temp folder: no partial model is left
        print("\nexport.py: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
