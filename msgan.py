"""msgan: MobileStyleGAN and its StyleGAN2 teacher in one readable file.

    import msgan
    G = msgan.load("path/to/checkpoint.pt")          # msgan, rosinality, official MobileStyleGAN file or NVIDIA pickle
    img = G(torch.randn(4, G.z_dim), psi=0.7)        # [4, 3, R, R], about [-1, 1]

Contents, top to bottom: building blocks; the mapping network; the StyleGAN2 synthesis network (the
teacher, numerically identical to rosinality/stylegan2-pytorch); the MobileStyleGAN synthesis network
(the student, numerically identical to bes-dev/MobileStyleGAN.pytorch); the Generator wrapper with the
NVlabs-style API; the StyleGAN2 discriminator and the GAN losses; checkpoint I/O and converters.

W+ layout. Every network here reads a W+ code in the standard StyleGAN2 layout, num_ws = 2*log2(R) - 2
slots: slot 0 drives the 4x4 conv, slot 2k+1 the output head at resolution 2^(k+2) *and* the first
conv of the next resolution, slot 2k+2 the second conv at 2^(k+3). The student uses the same slots for
the resolutions it has, so one code drives teacher and student. The official MobileStyleGAN layout
(3 slots per block) is available with ws_layout="official".
"""
import argparse
import collections
import contextlib
import functools
import hashlib
import io
import math
import numbers
import os
import pickle
import re
import reprlib
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from xml.etree import ElementTree

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops

MAPPING_LR_MUL = 0.01   # the mapping network learns 100x slower (StyleGAN2)
W_AVG_SAMPLES = 4096    # z samples averaged for w_avg when a checkpoint has none
CONST_NOISE_SEED = 0    # seed of the "const" noise of networks whose checkpoint stores none
FORMAT_NAME = "msgan"
FORMAT_VERSION = 1


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

    The network registers one buffer `noise_const.{i}` per styled conv (resolution noise_resolutions[i]).
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
            return noise
        if noise_mode == "const":
            return [getattr(self.noise_const, str(i)) for i in range(count)]
        if noise_mode == "random":
            return [torch.randn(batch, 1, r, r, device=device) for r in self.noise_resolutions]
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
        ws = _expand_ws(ws, self.num_ws, self.w_dim)
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

    def forward(self, x, w):
        demod = self.demodulation() if self.demodulate else None
        return ops.mobile_modulated_conv2d(x, self.weight, self.modulation(w) * self.scale, demod, self.weight_dw)

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

    def forward_inplace(self, x, w, noise):
        """forward of a folded conv without autograd: the bias inside the conv, noise and activation in place."""
        conv = self.conv
        x = ops.mobile_modulated_conv2d_inplace(x, conv.weight, conv.modulation(w) * conv.scale, conv.weight_dw,
                                                self.bias)
        if noise is not None:
            x.add_(self.noise_strength * noise)
        return F.leaky_relu_(x, ops.LRELU_SLOPE)


class ToWavelets(nn.Module):
    """1x1 modulated conv (no demodulation) to 12 Haar coefficients of RGB at half resolution."""

    def __init__(self, in_ch, w_dim):
        super().__init__()
        self.conv = MobileModulatedConv2d(in_ch, 12, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(12))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias[None, :, None, None]

    def forward_inplace(self, x, w):
        """forward without autograd, overwriting x (the modulation is applied to it in place)."""
        return ops.mobile_modulated_conv2d_inplace(x, self.conv.weight, self.conv.modulation(w) * self.conv.scale,
                                                   bias=self.bias)


class IDWTUpsample(nn.Module):
    """x * Linear(w) (no scale factor), then inverse Haar: [B, C, H, W] -> [B, C/4, 2H, 2W]."""

    def __init__(self, ch, w_dim):
        super().__init__()
        self.modulation = nn.Linear(w_dim, ch)
        nn.init.ones_(self.modulation.bias)

    def forward(self, x, w):
        return ops.wavelets_to_img(x * self.modulation(w)[:, :, None, None])

    def forward_inplace(self, x, w):
        """forward without autograd, overwriting x."""
        return ops.wavelets_to_img_inplace(x, self.modulation(w))


TILE_BYTES = 4 * 2**20  # the inference path runs a block in tiles of about this many bytes of features: the
                        # depthwise conv, pointwise conv, noise and activation of a tile then stay in the CPU's cache


def _rows(t, start, stop, sample):
    """Rows [start, stop) of the samples `sample` (a slice) of a [B, C, H, W] map; None and batch-1 maps are shared."""
    return None if t is None else t[sample if t.shape[0] > 1 else slice(None), :, start:stop]


class MobileBlock(nn.Module):
    """IDWT-upsample -> two depthwise-separable styled convs -> wavelet head, at 2x the input size."""

    def __init__(self, in_ch, out_ch, w_dim, folded=False):
        super().__init__()
        self.up = IDWTUpsample(in_ch, w_dim)
        self.conv1 = MobileStyledConv(in_ch // 4, out_ch, w_dim, folded=folded)
        self.conv2 = MobileStyledConv(out_ch, out_ch, w_dim, folded=folded)
        self.to_wavelets = ToWavelets(out_ch, w_dim)

    def tiles(self, batch, resolution):
        """(samples, first row, last row + 1) of the output tiles: the whole batch when its features fit in
        TILE_BYTES, else strips of rows of one sample at a time."""
        row_bytes = resolution * self.conv2.bias.numel() * 4  # one row of one sample's float32 features
        if batch * resolution * row_bytes <= TILE_BYTES:
            return [(slice(None), 0, resolution)]
        rows = max(TILE_BYTES // row_bytes, 1)
        return [(slice(b, b + 1), r0, min(r0 + rows, resolution))
                for b in range(batch) for r0 in range(0, resolution, rows)]

    def forward_inplace(self, x, w_up, w_conv2, noise1, noise2, w_head=None):
        """forward of a folded block without autograd, tile by tile, channels-last (the layout CPU convolutions run
        fastest in: each tile's input is copied into it); x is not modified.

        Returns the features [B, C_out, 2H, 2W], or with w_head the image of the wavelet head [B, 3, 4H, 4W].
        Each conv recomputes the one halo row its 3x3 depthwise kernel reads from a neighbouring tile, so every
        output row is computed exactly as on the whole map (the zero padding only ever lands on image borders).
        """
        B, _, H, W = x.shape
        R = 2 * H
        shape = (B, 3, 2 * R, 2 * R) if w_head is not None else (B, self.conv2.bias.numel(), R, R)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        for sample, r0, r1 in self.tiles(B, R):
            a1, b1 = max(r0 - 1, 0), min(r1 + 1, R)  # conv1 output rows that conv2 reads
            a0, b0 = max(a1 - 1, 0), min(b1 + 1, R)  # upsampled rows that conv1 reads
            lo, hi = a0 // 2, (b0 + 1) // 2          # x rows whose IDWT makes them
            y = self.up.forward_inplace(x[sample, :, lo:hi].clone(memory_format=torch.channels_last),
                                        w_up[sample])[:, :, a0 - 2 * lo:b0 - 2 * lo]
            y = self.conv1.forward_inplace(y, w_up[sample], _rows(noise1, a0, b0, sample))[:, :, a1 - a0:b1 - a0]
            y = self.conv2.forward_inplace(y, w_conv2[sample], _rows(noise2, a1, b1, sample))[:, :, r0 - a1:r1 - a1]
            if w_head is None:
                out[sample, :, r0:r1] = y
            else:
                out[sample, :, 2 * r0:2 * r1] = ops.wavelets_to_img_inplace(
                    self.to_wavelets.forward_inplace(y, w_head[sample]))
        return out


class MobileSynthesis(nn.Module, NoiseMixin):
    """MobileStyleGAN student: const 4x4 -> conv -> blocks (8 .. R/2) -> IDWT of the last wavelet head.

    channels: widths at 4, 8, ..., img_resolution/2 (the teacher's table without its last entry).
    forward returns img [B, 3, R, R], or (img, freq) with return_freq=True, where freq[k] is the
    12-channel Haar output [B, 12, 2^(k+2), 2^(k+2)] of every head (all but the last only feed the
    distillation loss).

    Two paths compute the image: `forward_reference`, the training path, and `forward_inference`, which a
    folded network takes in eager mode under torch.no_grad(): channels-last activations, bias inside the convs,
    noise, activation, modulation and IDWT in place, and each block run in cache-sized tiles (TILE_BYTES). Same
    image to float32 rounding.
    """

    def __init__(self, w_dim, channels, folded=False):
        super().__init__()
        self.w_dim, self.channels, self.folded = w_dim, list(channels), folded
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

    def forward(self, ws, noise=None, noise_mode="const", return_freq=False, ws_layout="standard"):
        # tracers (export) and torch.compile get the reference graph: they fuse its elementwise ops themselves
        if self.folded and not (return_freq or torch.is_grad_enabled() or torch.jit.is_tracing()
                                or torch.compiler.is_compiling()):
            return self.forward_inference(ws, noise, noise_mode, ws_layout)
        return self.forward_reference(ws, noise, noise_mode, return_freq, ws_layout)

    def forward_reference(self, ws, noise=None, noise_mode="const", return_freq=False, ws_layout="standard"):
        (s_conv1, s_head1), block_slots = self.style_slots(ws_layout)
        ws = _expand_ws(ws, self.num_ws if ws_layout == "standard" else self.num_ws_official, self.w_dim)
        noise = self.resolve_noise(ws.shape[0], noise, noise_mode, ws.device)
        x = self.conv1(self.const.expand(ws.shape[0], -1, -1, -1), ws[:, s_conv1], noise[0])
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
        """The image of forward_reference with a folded network's weights, fewer passes and allocations."""
        if not self.folded:
            raise ValueError("forward_inference needs a folded network (fold())")
        (s_conv1, _), block_slots = self.style_slots(ws_layout)
        ws = _expand_ws(ws, self.num_ws if ws_layout == "standard" else self.num_ws_official, self.w_dim)
        noise = self.resolve_noise(ws.shape[0], noise, noise_mode, ws.device)
        x = self.conv1(self.const.expand(ws.shape[0], -1, -1, -1), ws[:, s_conv1], noise[0])  # 4x4: cheap
        last = len(self.blocks) - 1
        for i, (block, (s_up, s_conv2, s_head)) in enumerate(zip(self.blocks, block_slots)):
            x = block.forward_inplace(x, ws[:, s_up], ws[:, s_conv2], noise[2 * i + 1], noise[2 * i + 2],
                                      w_head=ws[:, s_head] if i == last else None)
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


def slice_params(params, start, stop):
    return {k: v[start:stop] for k, v in params.items()}


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
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = torch.where(param["affine"] > 0, warped, x)
    rows = torch.arange(H, device=x.device, dtype=x.dtype)[None, None, :, None] / H    # [1, 1, H, 1]
    cols = torch.arange(W, device=x.device, dtype=x.dtype)[None, None, None, :] / W    # [1, 1, 1, W]
    inside = ((rows >= param["erase_y"]) & (rows < param["erase_y"] + param["erase_h"])
              & (cols >= param["erase_x"]) & (cols < param["erase_x"] + param["erase_w"]))
    return torch.where(inside & (param["erase"] > 0), torch.zeros_like(x), x)


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O. Three formats: msgan's own, rosinality/stylegan2-pytorch, official MobileStyleGAN.


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the offending key/shape."""


def read_checkpoint(path):
    """The raw contents of a checkpoint file (a dict), read with weights_only=True."""
    ckpt = _read(os.fspath(path))
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: unknown checkpoint format (a {type(ckpt).__name__}, not a dict)")
    return ckpt


TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def _read(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file, and not a pretrained model name ({', '.join(PRETRAINED)})")
    try:  # rosinality checkpoints hold their argparse options: allow that one class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
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


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['empty or truncated file'])[0]}"


def _short(value):
    """repr(value) cut to one short line, for messages about values read from a file (which may be huge)."""
    return reprlib.repr(value)


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


def _load_into(make, state, path, what, file_keys=None, own=()):
    """make() with `state` loaded strictly: one clear message for a missing, unexpected, wrongly shaped, non-float or
    non-finite tensor. Tensors of another float precision are converted to the module's (float32), with a warning.

    make: builds the module; it is first built on the meta device, so that keys and shapes are checked before any
    memory is allocated (a config read from a file, or a size read from one tensor, may describe a huge network).
    file_keys: msgan key -> the key's name in the file, so that messages name what the user has.
    own: key prefixes the file may leave out: those keys keep the value make() gave them.
    """
    named = (file_keys or {}).get
    _tensors(state, path, what)
    with torch.device("meta"):
        expected = make().state_dict()
    for key, value in expected.items():
        if key not in state and not key.startswith(own):
            raise CheckpointError(f"{path}: {what}: missing key {named(key, key)!r}")
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {what}: key {named(key, key)!r} has shape {list(state[key].shape)}, "
                                  f"expected {list(value.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: {what}: unexpected key {named(unexpected[0], unexpected[0])!r}")
    loaded, converted = {}, collections.Counter()
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
    if converted:
        counts = " and ".join(f"{n} {dtype}" for dtype, n in sorted(converted.items()))
        warnings.warn(f"{path}: {what}: converted {counts} tensors to float32")
    module = make()
    module.load_state_dict({**module.state_dict(), **loaded})
    return module


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
    G = _load_into(lambda: Generator(config), state, path, "generator", file_keys, own=_generated(state, "w_avg"))
    if "latent_avg" not in ckpt:
        G.compute_w_avg()
    return G


def _generated(state, *keys):
    """What a converted state may leave to the new network (see _load_into's own): `keys`, and the seeded const
    noise when the file stores none (official checkpoints; a file with some noise buffers must have all)."""
    noise = "synthesis.noise_const."
    return keys if any(key.startswith(noise) for key in state) else (*keys, noise)


# official MobileStyleGAN key (after "student.") -> msgan key (after "synthesis.")
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
    return _load_into(lambda: Generator(config), state, path, "generator", file_keys, own=_generated(state))


# ----------------------------------------------------------------------------------------------
# NVIDIA network pickles: network-snapshot-*.pkl of NVlabs/stylegan2-ada-pytorch (and of NVlabs/stylegan3 for
# its stylegan2 config). Each network in such a file is a call torch_utils.persistence._reconstruct_persistent_obj
# (meta), and NVIDIA's loader exec()s the module source that meta carries. msgan never runs or compiles it: a
# restricted unpickler maps the few globals a snapshot needs to inert stand-ins, turns every persistent object
# into an NvidiaObject record and refuses everything else. G_ema and D are then rebuilt from their tensors, and
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


def _nvidia_modules(net, path, prefix="", ancestors=()):
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
            yield from _nvidia_modules(child, path, f"{prefix}{name}.", (*ancestors, net))


def _nvidia_state_dict(net, path):
    """What net.state_dict() would return: each module's parameters, then its persistent buffers."""
    state = {}
    for prefix, module in _nvidia_modules(net, path):
        transient = module.state.get("_non_persistent_buffers_set", set())
        buffers = {k: v for k, v in module.state["_buffers"].items() if k not in transient}
        state.update((prefix + k, v) for k, v in {**module.state["_parameters"], **buffers}.items() if v is not None)
    return state


def _check_nvidia_source(net, path, what):
    """msgan never runs the embedded source, so it rebuilds only networks pickled with a source it knows: a
    modified one (a fork, or a tampered file) may compute something else."""
    known = set(NVIDIA_SOURCES) | set(os.environ.get(NVIDIA_SOURCES_ENV, "").replace(",", " ").split())
    for source in {module.module_src for _, module in _nvidia_modules(net, path)}:
        digest = _sha256(source.encode("utf-8", "surrogatepass"))
        if digest not in known:
            raise CheckpointError(f"{path}: {what} was pickled with a source (sha256 {digest}) that is not a known "
                                  f"NVIDIA release; msgan never runs it, and rebuilds only code it knows (to accept "
                                  f"this one, add its sha256 to ${NVIDIA_SOURCES_ENV})")


def _nvidia_conv_clamp(net, class_names, path, what, skip=()):
    """The one conv_clamp of the layers of the given classes (None: no clamp), as a plain float."""
    clamps = {module.attr("conv_clamp", path, (numbers.Real, type(None)))
              for prefix, module in _nvidia_modules(net, path)
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
    architectures = sorted({block.attr("architecture", path, str) for _, block in _nvidia_modules(G, path)
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
    return _load_into(lambda: Generator(config), state, path, "G_ema", file_keys)


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
    architectures = sorted({block.attr("architecture", path, str) for _, block in _nvidia_modules(D, path)
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
    return _discriminator_from_state(state, path, file_keys, conv_clamp=conv_clamp,
                                     stddev_group=group)


def _from_nvidia(snapshot, path, part):
    """G_ema (the generator people sample; G is the raw training copy) or D of an NVIDIA snapshot."""
    name = "D" if part == "discriminator" else "G_ema"
    net = snapshot.get(name) if isinstance(snapshot, dict) else None
    if not isinstance(net, NvidiaObject):
        raise CheckpointError(f"{path}: not an NVIDIA network snapshot (it holds no {name} network)")
    list(_nvidia_modules(net, path))  # checks the whole tree before anything reads it
    return _nvidia_discriminator(net, path) if name == "D" else _nvidia_generator(net, path)


# ----------------------------------------------------------------------------------------------
# Pretrained models. "ffhq" is the official MobileStyleGAN FFHQ-1024, which its author ships as OpenVINO
# IR inside the PyPI wheel random-face (Apache-2.0). It is fetched with pip, checked by sha256, and
# imported once into msgan's format in weights/; OpenVINO itself is never needed.

WEIGHTS_DIR = os.environ.get("MSGAN_WEIGHTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights"))
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
PRETRAINED = {"ffhq": "ffhq.pt", "emoji-teacher": "emoji-teacher.pt", "emoji": "emoji.pt"}
FETCHED = ("ffhq",)  # made on first use; the others ship in weights/


class DownloadError(RuntimeError):
    """A pretrained model could not be fetched or failed its checksum."""


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def fetch_random_face_wheel(cache_dir):
    """The random-face wheel in cache_dir, downloaded with pip (no dependencies) unless cached intact.

    Several processes may run this at once: each downloads into its own temp folder and renames the checked wheel
    into place, so the cache only ever holds a whole file.
    """
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


def import_random_face(wheel):
    """Rebuild the FFHQ-1024 Generator (folded student + mapping) from the random-face wheel's IR."""
    files = random_face_ir(wheel)
    mapping = _OpenVinoIR(files["MappingNetwork.xml"], files["MappingNetwork.bin"])
    ir = _OpenVinoIR(files["SynthesisNetwork.xml"], files["SynthesisNetwork.bin"])
    with torch.device("meta"):
        template = Generator(FFHQ_CONFIG)
    blocks = len(template.synthesis.blocks)
    state = {k: torch.zeros(v.shape) for k, v in template.state_dict().items()}  # absent: the non-final freq heads
    state.update(_import_mapping(mapping, template.w_dim))
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
    G = _load_into(lambda: Generator(FFHQ_CONFIG), state, wheel, "random-face import")
    G.compute_w_avg()
    return G.eval()


def pretrained_path(name):
    """Path of a pretrained model in WEIGHTS_DIR, fetched and imported on first use.

    Processes that do the first use at once each import the model and rename a complete file into place (see
    atomic_save): all of them succeed, and one whole file stays.
    """
    path = os.path.join(WEIGHTS_DIR, PRETRAINED[name])
    if not os.path.isfile(path) and name not in FETCHED:
        raise CheckpointError(f"{path}: missing; it ships with msgan (restore it with `git checkout weights/`)")
    if not os.path.isfile(path):
        G = import_random_face(fetch_random_face_wheel(os.path.join(WEIGHTS_DIR, "cache")))
        try:
            save(path, generator=G, source=f"{RANDOM_FACE_REQUIREMENT} (OpenVINO IR), imported by msgan")
        except OSError as e:
            raise DownloadError(f"{path}: cannot write the imported model ({e.strerror or e}); make {WEIGHTS_DIR} "
                                "writable, or set MSGAN_WEIGHTS to a writable folder") from None
    return path


def _discriminator_from_state(state, path, file_keys=None, **options):
    """A rosinality-layout D state dict -> Discriminator(..., **options); channels from the tensor shapes."""
    state = _tensors(state, path, "discriminator")
    channels = [_shape(state, "convs.0.0.weight", 4, path, file_keys)[0]]
    while f"convs.{len(channels)}.conv2.1.weight" in state:
        channels.append(_shape(state, f"convs.{len(channels)}.conv2.1.weight", 4, path, file_keys)[0])
    config = dict(img_resolution=4 * 2 ** (len(channels) - 1), channels=channels, **options)
    _check_discriminator_config(config, path, "discriminator")
    state = {k: v for k, v in state.items() if not k.endswith(".kernel")}  # fixed blur buffers
    return _load_into(lambda: Discriminator(**config), state, path, "discriminator", file_keys)


# Limits of the configs msgan builds networks from. A config is read from a file, and is checked before anything is
# built from it: a hostile or corrupt one must give an error, not a huge allocation or a traceback.
# Past these, even building the network on the meta device fails (sizes overflow int64) or takes very long.
MAX_RESOLUTION_LOG2 = 16      # 65536 x 65536, far beyond any GAN
MAX_WIDTH = 2**16             # channels, z_dim, w_dim: 128x StyleGAN2's widest layer
MAX_MAPPING_LAYERS = 64       # StyleGAN2 has 8
GENERATOR_ARCHS = ("stylegan2", "mobilestylegan")


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
    if not _is_count(config.get("stddev_group", Discriminator.STDDEV_GROUP), math.inf):
        raise _config_error(path, what, "stddev_group", config["stddev_group"], "a positive int")
    _check_clamp(config, path, what)


def _build(entry, path, part):
    """A network from a msgan checkpoint's entry {"config", "state_dict"}."""
    if not (isinstance(entry, dict) and "config" in entry and "state_dict" in entry):
        raise CheckpointError(f"{path}: {part} is not a dict with 'config' and 'state_dict'")
    config = entry["config"]
    if part == "discriminator":
        _check_discriminator_config(config, path, part)
        # files written before conv_clamp / stddev_group existed lack them
        make = functools.partial(Discriminator, config["img_resolution"], config["channels"],
                                 config.get("conv_clamp"), config.get("stddev_group", Discriminator.STDDEV_GROUP))
    else:
        _check_generator_config(config, path, part)
        make = functools.partial(Generator, config)
    return _load_into(make, _tensors(entry["state_dict"], path, f"{part} state_dict"), path, part)


def load(src, device="cpu", part="generator"):
    """Load a network from a checkpoint file.

    src: a pretrained model name (see PRETRAINED: "ffhq"), or the path to a msgan,
    rosinality/stylegan2-pytorch or official MobileStyleGAN checkpoint, or to an NVIDIA StyleGAN2-ADA network
    pickle (read without running any of it, see read_nvidia_pickle).
    part: "generator" (the student of an official checkpoint, G_ema of an NVIDIA pickle, else the stored
    generator), "teacher" (the StyleGAN2 network of the file: the teacher of an official or distillation
    checkpoint, else its StyleGAN2 generator) or "discriminator".
    Returns the module in eval mode on `device`, float32 with finite weights (tensors stored in another float
    precision are converted, with a warning). Raises CheckpointError (DownloadError for "ffhq") with a one-line
    reason that names the file and the key; nothing in a file is ever run.
    """
    if part not in ("generator", "teacher", "discriminator"):
        raise ValueError(f"part must be 'generator', 'teacher' or 'discriminator', got {part!r}")
    path = pretrained_path(src) if src in PRETRAINED else os.fspath(src)
    if _is_bare_pickle(path):
        return _from_nvidia(read_nvidia_pickle(path), path, part).to(device).eval()
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        if src in FETCHED:  # e.g. a disk that filled up under an older msgan, which wrote in place
            raise CheckpointError(f"{e}; delete it, and msgan.load({src!r}) imports it again") from None
        raise
    if ckpt.get("format") == FORMAT_NAME:
        if not (isinstance(ckpt.get("version"), int) and ckpt["version"] == FORMAT_VERSION):
            raise CheckpointError(f"{path}: msgan checkpoint version {_short(ckpt.get('version'))} is not supported")
        stored = [k for k in ("generator", "teacher", "discriminator") if k in ckpt]
        generator = ckpt.get("generator")
        if (part == "teacher" and part not in ckpt and isinstance(generator, dict)
                and isinstance(generator.get("config"), dict) and generator["config"].get("arch") == "stylegan2"):
            part = "generator"  # a trained teacher is saved as the file's generator
        if part not in ckpt:
            raise CheckpointError(f"{path}: holds no {part} (it has: {', '.join(stored)})")
        net = _build(ckpt[part], path, part)
    elif "g_ema" in ckpt or "g" in ckpt:
        if part == "discriminator":
            net = _discriminator_from_state(_get(ckpt, "d", path), path)
        else:
            net = _from_rosinality(ckpt, path)
    elif isinstance(ckpt.get("state_dict"), dict) and any(isinstance(k, str) and k.startswith("mapping_net.")
                                                          for k in ckpt["state_dict"]):
        if part == "discriminator":
            state = _tensors(ckpt["state_dict"], path, "state_dict")
            prefix = "loss.gan_loss.m."
            file_keys = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
            net = _discriminator_from_state({k: state[v] for k, v in file_keys.items()}, path, file_keys)
        else:
            net = _from_official(ckpt, path, part)
    else:
        keys = ", ".join(_short(k) for k in list(ckpt)[:5])
        raise CheckpointError(f"{path}: unknown checkpoint format (top-level keys: {keys})")
    return net.to(device).eval()


def _entry(net):
    if isinstance(net, Generator):
        config = net.config
    else:
        config = dict(img_resolution=net.img_resolution, channels=net.channels, conv_clamp=net.conv_clamp,
                      stddev_group=net.stddev_group)
    return {"config": config, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def save(path, generator=None, teacher=None, discriminator=None, **extra):
    """Write a msgan checkpoint atomically (temp file + rename): loadable with weights_only=True."""
    ckpt = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **extra}
    for name, net in (("generator", generator), ("teacher", teacher), ("discriminator", discriminator)):
        if net is not None:
            ckpt[name] = _entry(net)
    atomic_save(ckpt, path)


def maybe_compile(module, enabled, log):
    """torch.compile(module) if asked for and working here; otherwise the module, after one warning to `log`."""
    if not enabled:
        return module
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))  # probes the compiler tool chain once
        return torch.compile(module)
    except Exception as e:  # no C++ compiler, unsupported Python, ...: eager is always correct
        log(f"warning: --compile unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "running eager")
        return module


def use_huge_pages():
    """Ask PyTorch's CPU allocator for transparent huge pages on large tensors (its THP_MEM_ALLOC_ENABLE, read
    at the first large allocation; call this before building networks). A 64 MB activation then costs 32 page
    faults instead of 16,384: out-of-place ops on large images run 2-4x faster. Linux only; elsewhere a no-op.
    Set THP_MEM_ALLOC_ENABLE=0 to opt out."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def atomic_save(obj, path):
    """torch.save through `atomic_file`: never a half-written `path`."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


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
