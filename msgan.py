"""msgan: MobileStyleGAN and its StyleGAN2 teacher: the networks, their losses and augmentation.

    import msgan
    G = msgan.load("path/to/checkpoint.pt")          # msgan, rosinality, official MobileStyleGAN file or NVIDIA pickle
    img = G(torch.randn(4, G.z_dim), psi=0.7)        # [4, 3, R, R], about [-1, 1]

Contents, top to bottom: building blocks; the mapping network; the StyleGAN2 synthesis network (the teacher,
numerically identical to rosinality/stylegan2-pytorch); the MobileStyleGAN synthesis network (the student,
numerically identical to bes-dev/MobileStyleGAN.pytorch), then its inference path; the Generator wrapper with the
NVlabs-style API; the StyleGAN2 discriminator and the GAN losses; the distillation losses; the differentiable
augmentation; load and save. What files hold, and how they are read safely, is formats.py's.

W+ layout. Every network here reads a W+ code in the standard StyleGAN2 layout, num_ws = 2*log2(R) - 2
slots: slot 0 drives the 4x4 conv, slot 2k+1 the output head at resolution 2^(k+2) *and* the first
conv of the next resolution, slot 2k+2 the second conv at 2^(k+3). The student uses the same slots for
the resolutions it has, so one code drives teacher and student. The official MobileStyleGAN layout
(3 slots per block) is available with ws_layout="official".
"""
import concurrent.futures
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import formats
import ops
from formats import CheckpointError, DownloadError  # what msgan.load raises: part of msgan's API

MAPPING_LR_MUL = formats.MAPPING_LR_MUL  # the mapping network learns 100x slower (StyleGAN2)
W_AVG_SAMPLES = 4096    # z samples averaged for w_avg when a checkpoint has none
CONST_NOISE_SEED = 0    # seed of the "const" noise of networks whose checkpoint stores none


def default_channels(resolution, channel_multiplier=2):
    """StyleGAN2's channel table (rosinality): {resolution: channels} for 4 .. resolution."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return [table[4 * 2**i] * (channel_multiplier if 4 * 2**i >= 64 else 1)
            for i in range(int(math.log2(resolution)) - 1)]


def num_ws_for(resolution):
    return 2 * int(math.log2(resolution)) - 2


# ----------------------------------------------------------------------------------------------
# Building blocks


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored as N(0, 1)/lr_mul, scaled at run time."""

    def __init__(self, in_dim, out_dim, lr_mul=1.0, bias_init=0.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x):
        if self.activate:
            return ops.bias_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Conv with equalised learning rate (discriminator); bias only when no activation follows."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class MappingNetwork(nn.Module):
    """z [B, z_dim] -> pixel norm -> num_layers x (EqualLinear + lrelu) -> w [B, w_dim]."""

    def __init__(self, z_dim, w_dim, num_layers, lr_mul=MAPPING_LR_MUL):
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualLinear(i, o, lr_mul=lr_mul, activate=True)
                                    for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, z):
        x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # pixel norm
        for layer in self.layers:
            x = layer(x)
        return x


def make_const_noise(resolutions, seed=CONST_NOISE_SEED):
    """Fixed N(0, 1) noise maps [1, 1, r, r], one per styled conv, reproducible from a seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, r, r, generator=g) for r in resolutions]


class NoiseMixin:
    """Noise handling shared by both synthesis networks.

    The network registers one buffer `noise_const.{i}` per styled conv (resolution noise_resolutions[i]); noise and
    styles are cast to the weights' dtype (a network computes in its own, e.g. after .to(torch.bfloat16)).
    """

    def _register_noise(self, resolutions):
        self.noise_resolutions = list(resolutions)
        self.noise_const = nn.Module()  # a namespace, so the buffers are saved as noise_const.{i}
        for i, n in enumerate(make_const_noise(resolutions)):
            self.noise_const.register_buffer(str(i), n)

    def resolve_noise(self, batch, noise, noise_mode, device):
        """The noise maps for one forward: an explicit list, or per noise_mode ("const"/"random"/"none")."""
        count = len(self.noise_resolutions)
        if noise is not None:
            if len(noise) < count:
                raise ValueError(f"noise: expected a list of {count} tensors, got {len(noise)}")
            noise = list(noise)[:count]  # a student accepts its teacher's longer list
            for i, (n, r) in enumerate(zip(noise, self.noise_resolutions)):
                if n.ndim != 4 or n.shape[1] != 1 or n.shape[2:] != (r, r) or n.shape[0] not in (1, batch):
                    raise ValueError(f"noise[{i}]: expected shape [1 or {batch}, 1, {r}, {r}], got {list(n.shape)}")
            return [n.to(self.const.dtype) for n in noise]
        if noise_mode == "const":
            return [getattr(self.noise_const, str(i)) for i in range(count)]
        if noise_mode == "random":
            return [torch.randn(batch, 1, r, r, device=device, dtype=self.const.dtype) for r in self.noise_resolutions]
        if noise_mode == "none":
            return [None] * count
        raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")


def _add_noise(x, strength, noise):
    return x if noise is None else x + strength * noise


def _expand_ws(ws, num_ws, w_dim):
    """[B, w_dim] or [B, num_ws, w_dim] -> [B, num_ws, w_dim]."""
    if ws.ndim == 2 and ws.shape[1] == w_dim:
        return ws[:, None].expand(-1, num_ws, -1)
    if ws.ndim == 3 and ws.shape[1:] == (num_ws, w_dim):
        return ws
    raise ValueError(f"ws: expected [B, {w_dim}] or [B, {num_ws}, {w_dim}], got {list(ws.shape)}")


# ----------------------------------------------------------------------------------------------
# StyleGAN2 synthesis network (the teacher), as rosinality's Generator


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv: style = EqualLinear(w) (bias 1), per-sample demodulation."""

    def __init__(self, in_ch, out_ch, kernel_size, w_dim, demodulate=True, upsample=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(w_dim, in_ch, bias_init=1)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.demodulate, self.upsample = demodulate, upsample
        if upsample:  # blur after the transposed conv; x4 keeps the DC gain of a 2x upsample
            self.register_buffer("blur_kernel", ops.make_blur_kernel() * 4, persistent=False)

    def forward(self, x, w):
        return ops.modulated_conv2d(x, self.weight * self.scale, self.modulation(w), self.demodulate,
                                    self.upsample, getattr(self, "blur_kernel", None))


class StyledConv(nn.Module):
    """Modulated conv -> + noise_strength * noise -> bias + lrelu * sqrt(2) [-> clamp to +-conv_clamp]."""

    def __init__(self, in_ch, out_ch, w_dim, upsample=False, conv_clamp=None):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.conv_clamp = conv_clamp

    def forward(self, x, w, noise):
        x = _add_noise(self.conv(x, w), self.noise_strength, noise)
        return ops.bias_leaky_relu(x, self.bias, clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB [clamped to +-conv_clamp], added to the upsampled RGB skip."""

    def __init__(self, in_ch, w_dim, upsample_skip=True, conv_clamp=None):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))
        self.conv_clamp = conv_clamp
        if upsample_skip:
            self.register_buffer("blur_kernel", ops.make_blur_kernel() * 4, persistent=False)

    def forward(self, x, w, skip=None):
        rgb = self.conv(x, w) + self.bias[None, :, None, None]
        if self.conv_clamp is not None:  # NVIDIA clamps each head's own output, not the running image
            rgb = rgb.clamp(-self.conv_clamp, self.conv_clamp)
        if skip is not None:
            rgb = rgb + ops.upfirdn2d(skip, self.blur_kernel, up=2, pad=(2, 1, 2, 1))
        return rgb


class StyleGAN2Synthesis(nn.Module, NoiseMixin):
    """StyleGAN2 synthesis: const 4x4 -> (upsampling conv, conv, to_rgb) per resolution -> RGB skips.

    channels: widths at 4, 8, ..., img_resolution. conv_clamp: None (rosinality, official MobileStyleGAN) or
    NVIDIA's clamp of every styled conv and to-RGB output to +-conv_clamp (StyleGAN2-ADA: 256).
    """

    def __init__(self, w_dim, channels, conv_clamp=None):
        super().__init__()
        self.w_dim, self.channels = w_dim, list(channels)
        self.img_resolution = 4 * 2 ** (len(channels) - 1)
        self.num_ws = num_ws_for(self.img_resolution)
        self.const = nn.Parameter(torch.randn(1, channels[0], 4, 4))
        self.conv1 = StyledConv(channels[0], channels[0], w_dim, conv_clamp=conv_clamp)
        self.to_rgb1 = ToRGB(channels[0], w_dim, upsample_skip=False, conv_clamp=conv_clamp)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.convs.append(StyledConv(c_in, c_out, w_dim, upsample=True, conv_clamp=conv_clamp))
            self.convs.append(StyledConv(c_out, c_out, w_dim, conv_clamp=conv_clamp))
            self.to_rgbs.append(ToRGB(c_out, w_dim, conv_clamp=conv_clamp))
        self._register_noise([4] + [4 * 2**(i // 2 + 1) for i in range(len(self.convs))])

    def forward(self, ws, noise=None, noise_mode="const"):
        ws = _expand_ws(ws, self.num_ws, self.w_dim).to(self.const.dtype)
        noise = self.resolve_noise(ws.shape[0], noise, noise_mode, ws.device)
        x = self.conv1(self.const.expand(ws.shape[0], -1, -1, -1), ws[:, 0], noise[0])
        rgb = self.to_rgb1(x, ws[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):  # resolution 2^(k+3)
            x = self.convs[2 * k](x, ws[:, 2 * k + 1], noise[2 * k + 1])
            x = self.convs[2 * k + 1](x, ws[:, 2 * k + 2], noise[2 * k + 2])
            rgb = to_rgb(x, ws[:, 2 * k + 3], rgb)
        return rgb


# ----------------------------------------------------------------------------------------------
# MobileStyleGAN synthesis network (the student), as bes-dev/MobileStyleGAN.pytorch


class MobileModulatedConv2d(nn.Module):
    """MobileStyleGAN modulated conv: full k x k, or depthwise k x k + pointwise 1x1 (depthwise=True).

    The style enters only as input modulation, style = Linear(w) * 1/sqrt(in*k*k) (plain nn.Linear,
    bias 1, for the depthwise conv too). Demodulation, when on, is a fixed per-output-channel factor
    computed from the weights and the `style_inv` buffer (a random stand-in for the style). A *folded*
    conv (demodulate=False on a styled conv) holds `weight` pre-multiplied by that factor: the
    inference form, and the form the official FFHQ release ships.
    """

    def __init__(self, in_ch, out_ch, kernel_size, w_dim, depthwise=False, demodulate=True):
        super().__init__()
        self.modulation = nn.Linear(w_dim, in_ch)
        nn.init.ones_(self.modulation.bias)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        if depthwise:
            self.weight_dw = nn.Parameter(torch.randn(in_ch, 1, kernel_size, kernel_size))
            self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1))  # pointwise
        else:
            self.weight_dw = None
            self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.demodulate = demodulate
        if demodulate:
            self.register_buffer("style_inv", torch.randn(in_ch))

    def demodulation(self):
        return ops.fixed_demodulation(self.weight, self.style_inv * self.scale, self.weight_dw)

    def styles(self, w):
        return self.modulation(w) * self.scale  # [B, I]

    def forward(self, x, w):
        demod = self.demodulation() if self.demodulate else None
        return ops.mobile_modulated_conv2d(x, self.weight, self.styles(w), demod, self.weight_dw)

    @torch.no_grad()
    def fold_demodulation(self):
        """Multiply the fixed demodulation into the weights (same outputs, less work per call)."""
        if self.demodulate:
            self.weight.mul_(self.demodulation()[:, None, None, None])
            self.demodulate = False
            del self.style_inv


class MobileStyledConv(nn.Module):
    """Mobile modulated conv -> + noise_strength * noise -> + bias -> lrelu(0.2) (no gain, unlike StyleGAN2)."""

    def __init__(self, in_ch, out_ch, w_dim, depthwise=True, folded=False):
        super().__init__()
        self.conv = MobileModulatedConv2d(in_ch, out_ch, 3, w_dim, depthwise, demodulate=not folded)
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x, w, noise):
        return ops.bias_leaky_relu(_add_noise(self.conv(x, w), self.noise_strength, noise), self.bias, gain=1.0)


class ToWavelets(nn.Module):
    """1x1 modulated conv (no demodulation) to 12 Haar coefficients of RGB at half resolution."""

    def __init__(self, in_ch, w_dim):
        super().__init__()
        self.conv = MobileModulatedConv2d(in_ch, 12, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(12))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias[None, :, None, None]


class IDWTUpsample(nn.Module):
    """x * Linear(w) (no scale factor), then inverse Haar: [B, C, H, W] -> [B, C/4, 2H, 2W]."""

    def __init__(self, ch, w_dim):
        super().__init__()
        self.modulation = nn.Linear(w_dim, ch)
        nn.init.ones_(self.modulation.bias)

    def forward(self, x, w):
        return ops.wavelets_to_img(x * self.modulation(w)[:, :, None, None])


class MobileBlock(nn.Module):
    """IDWT-upsample -> two depthwise-separable styled convs -> wavelet head, at 2x the input size."""

    def __init__(self, in_ch, out_ch, w_dim, folded=False):
        super().__init__()
        self.up = IDWTUpsample(in_ch, w_dim)
        self.conv1 = MobileStyledConv(in_ch // 4, out_ch, w_dim, folded=folded)
        self.conv2 = MobileStyledConv(out_ch, out_ch, w_dim, folded=folded)
        self.to_wavelets = ToWavelets(out_ch, w_dim)


class MobileSynthesis(nn.Module, NoiseMixin):
    """MobileStyleGAN student: const 4x4 -> conv -> blocks (8 .. R/2) -> IDWT of the last wavelet head.

    channels: widths at 4, 8, ..., img_resolution/2 (the teacher's table without its last entry).
    forward returns img [B, 3, R, R], or (img, freq) with return_freq=True, where freq[k] is the
    12-channel Haar output [B, 12, 2^(k+2), 2^(k+2)] of every head (all but the last only feed the
    distillation loss).

    Two paths compute the image: `forward_reference`, the training path, and `forward_inference`, which a
    folded network takes under torch.no_grad() in eager mode (the next section). Same image to float32 rounding.
    """

    def __init__(self, w_dim, channels, folded=False):
        super().__init__()
        self.w_dim, self.channels, self.folded = w_dim, list(channels), folded
        self.tile_bytes = TILE_BYTES  # the inference path's tile size (tune_tiling chooses it for the machine)
        self.img_resolution = 4 * 2 ** len(channels)
        self.num_ws = num_ws_for(self.img_resolution)
        self.num_ws_official = 3 * (len(channels) - 1) + 2
        self.const = nn.Parameter(torch.randn(1, channels[0], 4, 4))
        self.conv1 = MobileStyledConv(channels[0], channels[0], w_dim, depthwise=False, folded=folded)
        self.to_wavelets1 = ToWavelets(channels[0], w_dim)
        self.blocks = nn.ModuleList(MobileBlock(c_in, c_out, w_dim, folded)
                                    for c_in, c_out in zip(channels[:-1], channels[1:]))
        self._register_noise([4] + [8 * 2**(i // 2) for i in range(2 * len(self.blocks))])

    def style_slots(self, ws_layout):
        """W+ slot of (conv1, to_wavelets1) and of (up and conv1, conv2, to_wavelets) per block."""
        if ws_layout == "standard":  # the teacher's sharing: head at R and first conv at 2R read one slot
            return (0, 1), [(2 * i + 1, 2 * i + 2, 2 * i + 3) for i in range(len(self.blocks))]
        if ws_layout == "official":  # 3 slots per block; the last slot is never read
            return (0, 1), [(3 * i + 1, 3 * i + 2, 3 * i + 3) for i in range(len(self.blocks))]
        raise ValueError(f"ws_layout must be 'standard' or 'official', got {ws_layout!r}")

    def start(self, ws, noise, noise_mode, ws_layout):
        """What both paths begin with: (the 4x4 conv's output [B, C, 4, 4], ws [B, slots, w_dim], the noise list)."""
        (s_conv1, _), _ = self.style_slots(ws_layout)
        ws = _expand_ws(ws, self.num_ws if ws_layout == "standard" else self.num_ws_official, self.w_dim)
        ws = ws.to(self.const.dtype)
        noise = self.resolve_noise(ws.shape[0], noise, noise_mode, ws.device)
        return self.conv1(self.const.expand(ws.shape[0], -1, -1, -1), ws[:, s_conv1], noise[0]), ws, noise

    def forward(self, ws, noise=None, noise_mode="const", return_freq=False, ws_layout="standard"):
        # tracers (export) and torch.compile get the reference graph: they fuse its elementwise ops themselves
        if self.folded and not (return_freq or torch.is_grad_enabled() or torch.jit.is_tracing()
                                or torch.compiler.is_compiling()):
            return self.forward_inference(ws, noise, noise_mode, ws_layout)
        return self.forward_reference(ws, noise, noise_mode, return_freq, ws_layout)

    def forward_reference(self, ws, noise=None, noise_mode="const", return_freq=False, ws_layout="standard"):
        (_, s_head1), block_slots = self.style_slots(ws_layout)
        x, ws, noise = self.start(ws, noise, noise_mode, ws_layout)
        freq = [self.to_wavelets1(x, ws[:, s_head1])] if return_freq else []
        for i, (block, (s_up, s_conv2, s_head)) in enumerate(zip(self.blocks, block_slots)):
            x = block.up(x, ws[:, s_up])
            x = block.conv1(x, ws[:, s_up], noise[2 * i + 1])
            x = block.conv2(x, ws[:, s_conv2], noise[2 * i + 2])
            if return_freq or i == len(self.blocks) - 1:  # only the last head makes the image
                freq.append(block.to_wavelets(x, ws[:, s_head]))
        img = ops.wavelets_to_img(freq[-1])
        return (img, freq) if return_freq else img

    @torch.no_grad()
    def forward_inference(self, ws, noise=None, noise_mode="const", ws_layout="standard"):
        """The image of forward_reference with a folded network's weights, by the inference path below."""
        if not self.folded:
            raise ValueError("forward_inference needs a folded network (fold())")
        _, block_slots = self.style_slots(ws_layout)
        x, ws, noise = self.start(ws, noise, noise_mode, ws_layout)  # the 4x4 conv: cheap, by the reference
        last = len(self.blocks) - 1
        for i, (block, (s_up, s_conv2, s_head)) in enumerate(zip(self.blocks, block_slots)):
            x = block_inference(block, x, ws[:, s_up], ws[:, s_conv2], noise[2 * i + 1], noise[2 * i + 2],
                                self.tile_bytes, w_head=ws[:, s_head] if i == last else None)
        return x

    def fold(self):
        """Switch to the inference form: demodulation folded into the weights (identical outputs)."""
        for m in self.modules():
            if isinstance(m, MobileModulatedConv2d):
                m.fold_demodulation()
        self.folded = True
        return self


def standard_to_official_ws(ws, num_blocks):
    """Standard W+ [B, 2*num_blocks+4, D] -> official MobileStyleGAN W+ [B, 3*num_blocks+2, D]."""
    idx = [0] + [j for i in range(num_blocks) for j in (2 * i + 1, 2 * i + 2, 2 * i + 3)] + [2 * num_blocks + 1]
    return ws[:, idx]


# ----------------------------------------------------------------------------------------------
# The student's inference path: MobileSynthesis.forward_inference, for a folded network without autograd. It
# computes forward_reference's image to float32 rounding in fewer passes over memory: channels-last activations
# (the layout CPU convolutions run fastest in), the bias inside the convolutions, noise, activation, modulation
# and inverse Haar transform in place, and each block in tiles of about `tile_bytes` of features, so that a tile's
# depthwise conv, pointwise conv, noise and activation stay in the CPU's cache. The best tile size depends on the
# machine (its caches, and what else shares them): tune_tiling measures it once per machine, as cuDNN's benchmark
# mode chooses a convolution algorithm, and caches the choice. Every tile size gives the same image.

TILE_BYTES = 8 * 2**20  # an untuned network's tiles: the best of 1-32 MB on a Zen 4 EPYC (1 MB L2/core, 32 MB L3)
TILE_CANDIDATES = [mb * 2**20 for mb in (1, 2, 4, 8, 16, 32)] + [2**62]  # 2**62: whole maps, no tiling
TILE_TIMING_ROUNDS = 3  # tune_tiling keeps the fastest of this many alternating rounds per tile size


def _rows(t, start, stop, sample):
    """Rows [start, stop) of the samples `sample` (a slice) of a [B, C, H, W] map; None and batch-1 maps are shared."""
    return None if t is None else t[sample if t.shape[0] > 1 else slice(None), :, start:stop]


def styled_conv_inplace(layer, x, styles, noise):
    """MobileStyledConv.forward of a folded layer: the bias inside the conv, noise and activation in place."""
    x = ops.mobile_modulated_conv2d_inplace(x, layer.conv.weight, styles, layer.conv.weight_dw, layer.bias)
    if noise is not None:
        x.add_(layer.noise_strength * noise)
    return F.leaky_relu_(x, ops.LRELU_SLOPE)


def block_tiles(block, batch, resolution, tile_bytes):
    """(samples, first row, last row + 1) of the output tiles of `block`: the whole batch when its features fit in
    tile_bytes, else strips of rows of one sample at a time."""
    row_bytes = resolution * block.conv2.bias.numel() * block.conv2.bias.element_size()  # one row of one sample
    if batch * resolution * row_bytes <= tile_bytes:
        return [(slice(None), 0, resolution)]
    rows = max(tile_bytes // row_bytes, 1)
    return [(slice(b, b + 1), r0, min(r0 + rows, resolution))
            for b in range(batch) for r0 in range(0, resolution, rows)]


def block_inference(block, x, w_up, w_conv2, noise1, noise2, tile_bytes, w_head=None):
    """MobileBlock of a folded network, tile by tile, channels-last (each tile's input is copied into it); x is
    not modified. Returns the features [B, C_out, 2H, 2W], or with w_head the image of the wavelet head
    [B, 3, 4H, 4W].

    Each conv recomputes the one halo row its 3x3 depthwise kernel reads from a neighbouring tile, so every output
    row is computed exactly as on the whole map (the zero padding only ever lands on image borders).
    """
    B, _, H, W = x.shape
    R = 2 * H
    shape = (B, 3, 2 * R, 2 * R) if w_head is not None else (B, block.conv2.bias.numel(), R, R)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    s_up, s_conv1, s_conv2 = block.up.modulation(w_up), block.conv1.conv.styles(w_up), block.conv2.conv.styles(w_conv2)
    s_head = None if w_head is None else block.to_wavelets.conv.styles(w_head)  # once per block, not per tile
    for sample, r0, r1 in block_tiles(block, B, R, tile_bytes):
        a1, b1 = max(r0 - 1, 0), min(r1 + 1, R)  # conv1 output rows that conv2 reads
        a0, b0 = max(a1 - 1, 0), min(b1 + 1, R)  # upsampled rows that conv1 reads
        lo, hi = a0 // 2, (b0 + 1) // 2          # x rows whose IDWT makes them
        y = x[sample, :, lo:hi].clone(memory_format=torch.channels_last)
        y = ops.wavelets_to_img_inplace(y, s_up[sample])[:, :, a0 - 2 * lo:b0 - 2 * lo]
        y = styled_conv_inplace(block.conv1, y, s_conv1[sample], _rows(noise1, a0, b0, sample))[:, :, a1 - a0:b1 - a0]
        y = styled_conv_inplace(block.conv2, y, s_conv2[sample], _rows(noise2, a1, b1, sample))[:, :, r0 - a1:r1 - a1]
        if w_head is None:
            out[sample, :, r0:r1] = y
        else:
            head = block.to_wavelets  # ToWavelets.forward, overwriting y (modulated in place)
            wavelets = ops.mobile_modulated_conv2d_inplace(y, head.conv.weight, s_head[sample], bias=head.bias)
            out[sample, :, 2 * r0:2 * r1] = ops.wavelets_to_img_inplace(wavelets)
    return out


@torch.no_grad()
def tune_tiling(G, workers=1, cache=formats.TILING_CACHE, log=None):
    """Set the fastest tile size of a folded student's inference path on this machine, and return it (a teacher or
    an unfolded student: None, nothing done).

    Times forward_inference of one random code with each of TILE_CANDIDATES in alternating rounds, `workers` forwards
    at once on torch's current threads (as sample.py runs its batches), and keeps the tile size of the fastest round
    (a shared machine only ever adds time, so the fastest round is the least disturbed). One sample is
    representative of any batch: a block whose batch outgrows a tile is tiled one sample at a time. The choice is
    cached in the JSON file `cache` (None: no cache) under the CPU, threads, workers, geometry and dtype, so each
    machine times once; `log` gets one line when it does (a cache that cannot be written is not an error).
    """
    S = G.synthesis
    if not (G.is_student and S.folded):
        return None
    device = G.w_avg.device
    key = (f"{ops.cpu_name()}; {torch.get_num_threads()} threads x {workers}; {device.type}; channels {S.channels}; "
           f"{str(S.const.dtype).removeprefix('torch.')}")
    cached = formats.read_tiling(cache).get(key) if cache else None
    if cached is not None:
        S.tile_bytes = cached
        return cached
    start = time.perf_counter()
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(0)).to(device))
    seconds = {tile: [] for tile in TILE_CANDIDATES}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in range(1 + TILE_TIMING_ROUNDS):  # the first round warms up
            for tile in TILE_CANDIDATES:
                S.tile_bytes = tile
                t0 = time.perf_counter()
                list(pool.map(lambda _: S.forward_inference(ws), range(workers)))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[tile].append(time.perf_counter() - t0)
    S.tile_bytes = min(TILE_CANDIDATES, key=lambda tile: min(seconds[tile][1:]))
    where = "not cached"
    if cache:
        try:
            formats.write_tiling(cache, key, S.tile_bytes)
            where = f"cached in {cache}"
        except OSError as e:
            where = f"not cached: {e}"
    if log:
        tiles = "whole maps" if S.tile_bytes >= 2**62 else f"{S.tile_bytes / 2**20:g} MB"
        log(f"inference tiles for this machine: {tiles} (timed in {time.perf_counter() - start:.1f} s, {where})")
    return S.tile_bytes


# ----------------------------------------------------------------------------------------------
# Generator: mapping + synthesis, NVlabs-style API


class Generator(nn.Module):
    """z -> w (mapping) -> image (synthesis), with truncation around w_avg.

    config: dict(arch="stylegan2"|"mobilestylegan", z_dim, w_dim, mapping_layers, channels[, folded]
    [, conv_clamp]); everything needed to rebuild the network, saved with its weights. conv_clamp (teacher
    only, default None) is set for networks imported from NVIDIA pickles.
    """

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        arch = config["arch"]
        self.z_dim, self.w_dim = config["z_dim"], config["w_dim"]
        self.mapping = MappingNetwork(self.z_dim, self.w_dim, config["mapping_layers"])
        if arch == "stylegan2":
            self.synthesis = StyleGAN2Synthesis(self.w_dim, config["channels"], config.get("conv_clamp"))
        elif arch == "mobilestylegan":
            self.synthesis = MobileSynthesis(self.w_dim, config["channels"], folded=config.get("folded", False))
        else:
            raise ValueError(f"unknown generator arch {arch!r}")
        self.num_ws = self.synthesis.num_ws
        self.img_resolution = self.synthesis.img_resolution
        self.register_buffer("w_avg", torch.zeros(self.w_dim))

    @property
    def is_student(self):
        return isinstance(self.synthesis, MobileSynthesis)

    def truncate(self, w, psi, cutoff=None):
        """w_avg + psi * (w - w_avg); an exact no-op for psi == 1. Works on [B, D] and [B, num_ws, D].

        cutoff: truncate only the W+ slots [0, cutoff), the coarse ones (NVIDIA's truncation_cutoff);
        the result is then always [B, num_ws, D].
        """
        if cutoff is None:
            return w if psi == 1 else self.w_avg.lerp(w, psi)
        ws = _expand_ws(w, self.num_ws, self.w_dim)
        if psi == 1:
            return ws
        return torch.cat([self.w_avg.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], dim=1)

    @torch.no_grad()
    def compute_w_avg(self, samples=W_AVG_SAMPLES, seed=0):
        z = torch.randn(samples, self.z_dim, generator=torch.Generator().manual_seed(seed))
        self.w_avg.copy_(self.mapping(z.to(self.w_avg.device)).mean(0))

    def forward(self, z, psi=1.0, noise_mode="const", noise=None, cutoff=None):
        return self.synthesis(self.truncate(self.mapping(z), psi, cutoff), noise=noise, noise_mode=noise_mode)

    def fold(self):
        """Inference form of a student (demodulation folded into the weights); a teacher is unchanged."""
        if self.is_student and not self.synthesis.folded:
            self.synthesis.fold()
            self.config["folded"] = True
        return self


def student_for(teacher, channels=None):
    """A fresh MobileStyleGAN student for a StyleGAN2 teacher: the teacher's z_dim, w_dim, mapping network (copied
    and frozen), w_avg and const noise (a prefix of the teacher's list), and widths `channels` at 4, 8, ..., R/2
    (default: the teacher's without its last entry, the original's rule)."""
    if teacher.img_resolution < 16:
        raise ValueError(f"teacher resolution {teacher.img_resolution}: the student needs at least 16x16")
    if channels is not None and len(channels) != len(teacher.synthesis.channels) - 1:
        raise ValueError(f"student widths {channels}: {len(channels)} widths given, "
                         f"{len(teacher.synthesis.channels) - 1} needed for 4..{teacher.img_resolution // 2}")
    channels = channels or teacher.synthesis.channels[:-1]
    if any(c % 4 for c in channels[:-1]):
        raise ValueError(f"student widths {channels}: the student's IDWT needs widths divisible by 4")
    student = Generator(dict(arch="mobilestylegan", z_dim=teacher.z_dim, w_dim=teacher.w_dim,
                             mapping_layers=len(teacher.mapping.layers), channels=channels))
    student.mapping.load_state_dict(teacher.mapping.state_dict())
    student.w_avg.copy_(teacher.w_avg)
    for i in range(len(student.synthesis.noise_resolutions)):
        getattr(student.synthesis.noise_const, str(i)).copy_(getattr(teacher.synthesis.noise_const, str(i)))
    student.mapping.requires_grad_(False)
    return student


# ----------------------------------------------------------------------------------------------
# StyleGAN2 discriminator (rosinality's, the one the official MobileStyleGAN uses) and GAN losses.
# Module names follow rosinality's nn.Sequential layout so its state dicts load unchanged.


class Blur(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad
        self.register_buffer("kernel", ops.make_blur_kernel(), persistent=False)

    def forward(self, x):
        return ops.upfirdn2d(x, self.kernel, pad=self.pad)


class FusedLeakyReLU(nn.Module):
    def __init__(self, ch, clamp=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(ch))
        self.clamp = clamp

    def forward(self, x):
        return ops.bias_leaky_relu(x, self.bias, clamp=self.clamp)


def conv_layer(in_ch, out_ch, kernel_size, downsample=False, activate=True, bias=True, clamp=None):
    """[Blur] -> EqualConv2d -> [bias + lrelu [+ clamp]]; downsampling is blur + stride-2 conv."""
    layers = []
    if downsample:  # pads make (H + p0 + p1 - 3 - k) // 2 + 1 = H / 2 for the 4-tap blur
        p = (4 - 2) + (kernel_size - 1)
        layers.append(Blur(((p + 1) // 2, p // 2, (p + 1) // 2, p // 2)))
    layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=2 if downsample else 1,
                              padding=0 if downsample else kernel_size // 2, bias=bias and not activate))
    if activate:
        layers.append(FusedLeakyReLU(out_ch, clamp))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """(conv2(conv1(x)) + skip(x)) / sqrt(2). NVIDIA scales both branches by sqrt(0.5) instead and clamps conv2 at
    conv_clamp * sqrt(0.5) after that scale: the same as clamping conv2 at conv_clamp here, before the sum."""

    def __init__(self, in_ch, out_ch, conv_clamp=None):
        super().__init__()
        self.conv1 = conv_layer(in_ch, in_ch, 3, clamp=conv_clamp)
        self.conv2 = conv_layer(in_ch, out_ch, 3, downsample=True, clamp=conv_clamp)
        self.skip = conv_layer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False)  # never clamped

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: image [B, 3, R, R] -> logits [B, 1].

    channels: widths at R, R/2, ..., 4 (rosinality's table by default). Minibatch stddev over groups of
    min(B, stddev_group) samples, strided like rosinality's view(G, -1, ...): the batch must be divisible by it.
    conv_clamp: None (rosinality) or NVIDIA's clamp of every activated conv output (StyleGAN2-ADA: 256).
    """

    STDDEV_GROUP = 4  # rosinality's, and StyleGAN2-ADA's default

    def __init__(self, img_resolution, channels=None, conv_clamp=None, stddev_group=STDDEV_GROUP):
        super().__init__()
        if channels is None:
            channels = default_channels(img_resolution)[::-1]
        self.img_resolution, self.channels = img_resolution, list(channels)
        self.conv_clamp, self.stddev_group = conv_clamp, stddev_group
        self.config = dict(img_resolution=img_resolution, channels=self.channels, conv_clamp=conv_clamp,
                           stddev_group=stddev_group)  # Discriminator(**config) rebuilds it: saved with its weights
        self.convs = nn.Sequential(conv_layer(3, channels[0], 1, clamp=conv_clamp),
                                   *(ResBlock(i, o, conv_clamp) for i, o in zip(channels[:-1], channels[1:])))
        c4 = channels[-1]
        self.final_conv = conv_layer(c4 + 1, c4, 3, clamp=conv_clamp)
        self.final_linear = nn.Sequential(EqualLinear(c4 * 16, c4, activate=True), EqualLinear(c4, 1))

    def minibatch_stddev(self, x):
        """Append one channel: the stddev over each sample's group, averaged over C, H, W."""
        B, C, H, W = x.shape
        group = min(B, self.stddev_group)
        if B % group:
            raise ValueError(f"discriminator batch {B} is not divisible by the stddev group {group}")
        y = x.reshape(group, -1, C, H, W)                            # sample j is in group j mod (B/group)
        s = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean([1, 2, 3])  # [B/group]
        return torch.cat([x, s.repeat(group)[:, None, None, None].expand(B, 1, H, W)], dim=1)

    def forward(self, img):
        x = self.final_conv(self.minibatch_stddev(self.convs(img)))
        return self.final_linear(x.flatten(1))


def d_logistic_loss(real_logits, fake_logits):
    """Non-saturating discriminator loss: softplus(D(fake)) + softplus(-D(real)), each averaged."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating_loss(fake_logits):
    return F.softplus(-fake_logits).mean()


def r1_penalty(D, real):
    """Mean over the batch of ||grad_x D(x)||^2 at the real images (rosinality's d_r1_loss)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------
# Distillation losses (official MobileStyleGAN, core/loss/distiller_loss.py and perceptual_loss.py)

PERCEPTUAL_SIZE = 256  # both images are resized to this before VGG16 (official)


def distillation_loss(freq, teacher_img):
    """Pixel + wavelet L1 and L2 of every student wavelet head against the teacher image.

    freq: the student's heads, freq[k] [B, 12, s, s]; teacher_img [B, 3, R, R]. For each head the teacher
    image is resized to 2s (bilinear, align_corners=True, no antialias: the official choice) and compared
    with the head's IDWT (pixels) and with the head itself (Haar coefficients of the resized image).
    Returns {"l1", "l2"} (unweighted sums over heads of element means) plus each term as
    "{l1|l2}_{rgb|freq}/{k}".
    """
    terms = {}
    for k, head in enumerate(freq):
        pred_rgb = ops.wavelets_to_img(head)                                       # [B, 3, 2s, 2s]
        target_rgb = F.interpolate(teacher_img, size=pred_rgb.shape[-1], mode="bilinear", align_corners=True)
        target_freq = ops.img_to_wavelets(target_rgb)                              # [B, 12, s, s]
        terms[f"l1_rgb/{k}"] = F.l1_loss(pred_rgb, target_rgb)
        terms[f"l1_freq/{k}"] = F.l1_loss(head, target_freq)
        terms[f"l2_rgb/{k}"] = F.mse_loss(pred_rgb, target_rgb)
        terms[f"l2_freq/{k}"] = F.mse_loss(head, target_freq)
    for norm in ("l1", "l2"):  # summed in the official order: rgb_0, freq_0, rgb_1, freq_1, ...
        terms[norm] = sum(terms[f"{norm}_{kind}/{k}"] for k in range(len(freq)) for kind in ("rgb", "freq"))
    return terms


def perceptual_loss(img, teacher_img, vgg, size=PERCEPTUAL_SIZE):
    """Sum over VGG16 taps of the L1 distance between the features of student and teacher images.

    As the official code: both resized to `size` (bilinear, align_corners=False), the raw [-1, 1]-ish
    values fed to the network without ImageNet normalisation, no gradient through the teacher branch.
    vgg: a module returning a dict of feature maps (fid.VGG16, passed in so msgan does not depend on fid).
    """
    pred = vgg(F.interpolate(img, size=size, mode="bilinear", align_corners=False))
    with torch.no_grad():
        target = vgg(F.interpolate(teacher_img, size=size, mode="bilinear", align_corners=False))
    return sum(F.l1_loss(pred[name], target[name]) for name in pred)


# ----------------------------------------------------------------------------------------------
# Differentiable augmentation for the GAN terms (the official kornia pipeline, in plain torch):
# horizontal flip, random affine, random erasing, each applied to a sample with probability p.
# Parameters are drawn separately (augment_params) so that a training step can draw them for its whole
# global batch up front and hand every rank or gradient-accumulation round its slice.

AUG_ROTATE_DEG = 20.0            # rotation uniform in [-20, 20] degrees about the centre
AUG_TRANSLATE = (0.1, 0.3)       # |dx| < 0.1 W, |dy| < 0.3 H
AUG_SCALE = (0.7, 1.2)           # isotropic scale
AUG_ERASE_AREA = (0.02, 0.33)    # erased rectangle: fraction of the image area ...
AUG_ERASE_RATIO = (0.3, 3.3)     # ... and aspect ratio h / w, log-uniform


def augment_params(n, p, generator=None):
    """Random parameters for n samples: a dict of [n] float tensors (CPU, float32)."""
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    params = {name: (torch.rand(n, generator=generator) < p).float() for name in ("flip", "affine", "erase")}
    params["angle"] = uniform(-AUG_ROTATE_DEG, AUG_ROTATE_DEG) * math.pi / 180
    params["dx"] = uniform(-AUG_TRANSLATE[0], AUG_TRANSLATE[0])     # fractions of the width / height
    params["dy"] = uniform(-AUG_TRANSLATE[1], AUG_TRANSLATE[1])
    params["scale"] = uniform(*AUG_SCALE)
    area = uniform(*AUG_ERASE_AREA)
    ratio = torch.exp(uniform(math.log(AUG_ERASE_RATIO[0]), math.log(AUG_ERASE_RATIO[1])))
    params["erase_h"] = torch.sqrt(area * ratio).clamp(max=1)      # fractions of H and W
    params["erase_w"] = torch.sqrt(area / ratio).clamp(max=1)
    params["erase_y"] = torch.rand(n, generator=generator) * (1 - params["erase_h"])
    params["erase_x"] = torch.rand(n, generator=generator) * (1 - params["erase_w"])
    return params


def augment(x, params):
    """Apply flip -> affine -> erase to x [B, C, H, W] (square) with params from augment_params.

    Differentiable in x. A sample whose op is off passes through that op unchanged (bit-exact).
    """
    B, C, H, W = x.shape
    param = {k: v.to(x.device, x.dtype)[:, None, None, None] for k, v in params.items()}  # [B, 1, 1, 1] each
    x = torch.where(param["flip"] > 0, x.flip(3), x)
    # output pixel q = s R (p - c) + c + t; grid_sample wants the input point of every output point:
    # p = (s R)^-1 (q - t), in normalised coordinates (align_corners=False, centre 0, width 2).
    angle, scale = params["angle"].to(x), params["scale"].to(x)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    t = torch.stack([2 * params["dx"], 2 * params["dy"]], dim=1).to(x)                    # [B, 2]
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # [B, 2, 2] = R(-a) / s
    theta = torch.cat([inverse, -(inverse @ t[:, :, None])], dim=2)                      # [B, 2, 3]
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    warped = ops.grid_sample(x, grid)
    x = torch.where(param["affine"] > 0, warped, x)
    rows = torch.arange(H, device=x.device, dtype=x.dtype)[None, None, :, None] / H    # [1, 1, H, 1]
    cols = torch.arange(W, device=x.device, dtype=x.dtype)[None, None, None, :] / W    # [1, 1, 1, W]
    inside = ((rows >= param["erase_y"]) & (rows < param["erase_y"] + param["erase_h"])
              & (cols >= param["erase_x"]) & (cols < param["erase_x"] + param["erase_w"]))
    return torch.where(inside & (param["erase"] > 0), torch.zeros_like(x), x)


# ----------------------------------------------------------------------------------------------
# Load and save (the formats themselves are formats.py's)


def load(src, device="cpu", part="generator"):
    """Load a network from a checkpoint file.

    src: a pretrained model name ("ffhq", "emoji", "emoji-teacher"), or the path to a msgan,
    rosinality/stylegan2-pytorch or official MobileStyleGAN checkpoint, or to an NVIDIA StyleGAN2-ADA network
    pickle (read without running any of it, see formats.read_nvidia_pickle).
    part: "generator" (the student of an official checkpoint, G_ema of an NVIDIA pickle, else the stored
    generator), "teacher" (the StyleGAN2 network of the file: the teacher of an official or distillation
    checkpoint, else its StyleGAN2 generator) or "discriminator".
    Returns the module in eval mode on `device`, float32 with finite weights (tensors stored in another float
    precision are converted, with a warning). Raises CheckpointError (DownloadError for "ffhq") with a one-line
    reason that names the file and the key; nothing in a file is ever run.
    """
    if part not in ("generator", "teacher", "discriminator"):
        raise ValueError(f"part must be 'generator', 'teacher' or 'discriminator', got {part!r}")
    path = pretrained_path(src) if src in formats.PRETRAINED else os.fspath(src)
    try:
        data = formats.read_network(path, part)
    except CheckpointError as e:
        if src in formats.FETCHED:  # a damaged import (a disk that filled up, an edit): importing it again mends it
            raise CheckpointError(f"{e}; delete it, and msgan.load({src!r}) imports it again") from None
        raise
    return build(data).to(device).eval()


def build(data):
    """The network a file holds (formats.NetworkData), its tensors checked against it before any is loaded."""
    if data.kind == "generator":
        make = functools.partial(Generator, data.config)
    else:
        make = functools.partial(Discriminator, **data.config)
    with torch.device("meta"):  # keys and shapes are checked before memory is allocated for the network
        expected = make().state_dict()
    state = formats.checked_state(data, expected)
    net = make()
    net.load_state_dict({**net.state_dict(), **state})  # keys the file may lack (data.own) keep their values
    if data.kind == "generator" and "w_avg" not in state:
        net.compute_w_avg()
    return net


def save(path, generator=None, teacher=None, discriminator=None, **extra):
    """Write a msgan checkpoint atomically (temp file + rename): loadable with weights_only=True."""
    networks = {"generator": generator, "teacher": teacher, "discriminator": discriminator}
    formats.write_checkpoint(path, {part: (net.config, net.state_dict()) for part, net in networks.items()
                                    if net is not None}, **extra)


def pretrained_path(name):
    """Path of a pretrained model in formats.WEIGHTS_DIR; "ffhq" is imported there from the official release on
    first use. Processes that do the first use at once each import it and rename a complete file into place (see
    formats.atomic_file): all of them succeed, and one whole file stays."""
    path = formats.pretrained_file(name)
    if not os.path.isfile(path):
        G = build(formats.import_random_face(formats.fetch_random_face_wheel()))
        try:
            save(path, generator=G, source=f"{formats.RANDOM_FACE_REQUIREMENT} (OpenVINO IR), imported by msgan")
        except OSError as e:
            raise DownloadError(f"{path}: cannot write the imported model ({e.strerror or e}); make "
                                f"{formats.WEIGHTS_DIR} writable, or set MSGAN_WEIGHTS to a writable folder") from None
    return path
