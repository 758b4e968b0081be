"""Low-level ops of StyleGAN2 and MobileStyleGAN, in plain PyTorch.

Every op here is the reference implementation: written for clarity, checked against the original
projects' outputs (../shared/reference, see test_msgan.py). Faster variants, where one pays, live
beside their reference and are tested against it. This file knows nothing about models.

Conventions: tensors are NCHW float; "pad" tuples are (x0, x1, y0, y1) like rosinality's upfirdn2d.
"""
import math

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2          # leaky-ReLU slope used everywhere in StyleGAN2 and MobileStyleGAN
LRELU_GAIN = math.sqrt(2)  # StyleGAN2 rescales after the activation to keep the variance ~1
DEMOD_EPS = 1e-8           # added under the rsqrt of demodulation (both projects)


# ----------------------------------------------------------------------------------------------
# Bias + activation


def bias_leaky_relu(x, bias=None, gain=LRELU_GAIN, clamp=None):
    """StyleGAN2's fused bias + leaky-ReLU(0.2) * gain; bias [C] is added along dim 1.

    clamp: if set, the result is clamped to [-clamp, clamp] last (the order of NVIDIA's bias_act).
    """
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    x = F.leaky_relu(x, LRELU_SLOPE)
    x = x if gain == 1 else x * gain
    return x if clamp is None else x.clamp(-clamp, clamp)


# ----------------------------------------------------------------------------------------------
# FIR filtering: upfirdn2d


def make_blur_kernel(taps=(1, 3, 3, 1)):
    """Separable 2-D FIR kernel from 1-D taps, normalised to sum 1 (rosinality's make_kernel)."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0, 0, 0)):
    """Upsample by zero insertion, pad (negative pads crop), convolve with `kernel`, downsample.

    x: [B, C, H, W]; kernel: [kh, kw] (true convolution: the kernel is flipped);
    pad: (x0, x1, y0, y1). Output: [B, C, (H*up + y0 + y1 - kh) // down + 1, (W*up + x0 + x1 - kw) // down + 1].
    The filter is one depthwise conv (groups = C): 5-10x faster on CPU than folding the channels into
    the batch. C is a constant of each layer, taken as a plain int so that exporters see a weight of
    fixed shape [C, 1, kh, kw] and keep the batch axis dynamic.
    """
    x0, x1, y0, y1 = pad
    C, H, W = x.shape[1:]
    if up > 1:  # zero insertion: every pixel followed by up-1 zeros along each axis
        x = F.pad(x.reshape(-1, C, H, 1, W, 1), [0, up - 1, 0, 0, 0, up - 1])  # [B, C, H, up, W, up]
        x = x.reshape(-1, C, H * up, W * up)
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    weight = kernel.flip(0, 1).to(x.dtype)[None, None].expand(int(C), 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=C)


# ----------------------------------------------------------------------------------------------
# Orthonormal Haar wavelets (db1), in the coefficient layout of pytorch_wavelets / MobileStyleGAN:
# low [B, C, H, W] and high [B, C, 3, H, W], bands 0 = top-bottom, 1 = left-right, 2 = diagonal.


def haar_dwt(x):
    """[B, C, 2H, 2W] -> (low [B, C, H, W], high [B, C, 3, H, W])."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # each 2x2 block is [[a, b],
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  #                    [c, d]]
    low = (a + b + c + d) / 2
    high = torch.stack([(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], dim=2)
    return low, high


def haar_idwt(low, high):
    """Exact inverse of haar_dwt: (low [B, C, H, W], high [B, C, 3, H, W]) -> [B, C, 2H, 2W]."""
    h0, h1, h2 = high.unbind(2)
    a = (low + h0 + h1 + h2) / 2
    b = (low + h0 - h1 - h2) / 2
    c = (low - h0 + h1 - h2) / 2
    d = (low - h0 - h1 + h2) / 2
    B, C, H, W = low.shape
    top = torch.stack([a, b], dim=-1).reshape(B, C, H, 2 * W)     # interleave columns
    bottom = torch.stack([c, d], dim=-1).reshape(B, C, H, 2 * W)
    return torch.stack([top, bottom], dim=-2).reshape(B, C, 2 * H, 2 * W)  # interleave rows


def wavelets_to_img(packed):
    """MobileStyleGAN packing -> image: [B, 4C, H, W] -> [B, C, 2H, 2W].

    Channels 0..C-1 hold the low band; channel C + 3*c + k holds band k of colour/channel c.
    """
    B, C4, H, W = packed.shape
    C = C4 // 4
    return haar_idwt(packed[:, :C], packed[:, C:].reshape(B, C, 3, H, W))


def wavelets_to_img_inplace(packed, scale=None):
    """Inference form of wavelets_to_img(packed * scale) for the same values to float32 rounding; `packed`
    is used as scratch (overwritten). scale: [B, 4C] per-sample channel factors, or None.

    The reference interleaves four stacked tensors; here the butterflies (L +- h0) and (h1 +- h2) are
    written straight into the four phases of the output, which keeps packed's memory format.
    """
    B, C4, H, W = packed.shape
    C = C4 // 4
    packed.mul_(0.5 if scale is None else scale[:, :, None, None] * 0.5)  # the 1/2 of the orthonormal Haar
    low, h0, h1, h2 = packed[:, :C], packed[:, C::3], packed[:, C + 1::3], packed[:, C + 2::3]
    p, q, r, t = low + h0, low - h0, h1 + h2, h1 - h2                        # [B, C, H, W] each
    memory_format = (torch.channels_last if packed.is_contiguous(memory_format=torch.channels_last)
                     and not packed.is_contiguous() else torch.contiguous_format)
    out = torch.empty(B, C, 2 * H, 2 * W, dtype=packed.dtype, device=packed.device, memory_format=memory_format)
    phases = out.unflatten(3, (W, 2)).unflatten(2, (H, 2))                   # [B, C, H, 2, W, 2] view
    torch.add(p, r, out=phases[:, :, :, 0, :, 0])
    torch.sub(p, r, out=phases[:, :, :, 0, :, 1])
    torch.add(q, t, out=phases[:, :, :, 1, :, 0])
    torch.sub(q, t, out=phases[:, :, :, 1, :, 1])
    return out


def img_to_wavelets(img):
    """Inverse of wavelets_to_img: [B, C, 2H, 2W] -> [B, 4C, H, W]."""
    low, high = haar_dwt(img)
    return torch.cat([low, high.flatten(1, 2)], dim=1)


# ----------------------------------------------------------------------------------------------
# Modulated convolutions


def modulated_conv2d(x, weight, styles, demodulate=True, upsample=False, blur_kernel=None):
    """StyleGAN2 modulated convolution, per-sample demodulation (rosinality's ModulatedConv2d).

    x: [B, I, H, W]; weight: [O, I, k, k], already multiplied by its equalised-lr scale;
    styles: [B, I]. With upsample, a stride-2 transposed conv (weight not flipped) followed by a
    blur with `blur_kernel` (already scaled by 4) and pad (1, 1): output [B, O, 2H, 2W].

    Computed in the "non-fused" form: modulate activations, run one conv with the shared weight,
    demodulate the outputs. Mathematically identical to the grouped-conv form of the paper, and
    2-3x faster on CPU.
    """
    x = x * styles[:, :, None, None]
    if upsample:
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)  # [B, O, 2H+1, 2W+1]
        x = upfirdn2d(x, blur_kernel, pad=(1, 1, 1, 1))               # [B, O, 2H, 2W]
    else:
        x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    if demodulate:
        # sum over (I, kh, kw) of (weight * style)^2 = (style^2) @ (weight^2 summed over kh, kw)
        w2 = weight.pow(2).sum([2, 3])                                # [O, I]
        demod = torch.rsqrt(styles.pow(2) @ w2.t() + DEMOD_EPS)       # [B, O]
        x = x * demod[:, :, None, None]
    return x


def fixed_demodulation(weight, style_inv, weight_dw=None):
    """MobileStyleGAN's input-independent demodulation factor per output channel.

    weight: [O, I, k, k] (full conv) or [O, I, 1, 1] pointwise weight with weight_dw [I, 1, k, k];
    style_inv: [I], the fixed stand-in for the style (already multiplied by the conv scale).
    Returns [O]: rsqrt(sum_{i,kh,kw} (style_inv[i] * W[o, i, kh, kw])^2 + eps), W the effective weight.
    """
    w2 = weight.pow(2).sum([2, 3])                                    # [O, I]
    if weight_dw is not None:
        w2 = w2 * weight_dw.pow(2).sum([1, 2, 3])[None, :]            # sum_k (p * d_k)^2 = p^2 sum_k d_k^2
    return torch.rsqrt(w2 @ style_inv.pow(2) + DEMOD_EPS)


def mobile_modulated_conv2d(x, weight, styles, demod=None, weight_dw=None):
    """MobileStyleGAN (depthwise-separable) modulated convolution.

    x: [B, I, H, W]; styles: [B, I] (already scaled); weight: [O, I, k, k] for a full conv, or the
    pointwise [O, I, 1, 1] weight after a depthwise weight_dw [I, 1, k, k] (padding k // 2);
    demod: [O] or None. The style only modulates the input; demodulation is a fixed per-output-channel
    factor (see fixed_demodulation), which can therefore be folded into `weight` for inference.
    """
    x = x * styles[:, :, None, None]
    if weight_dw is not None:
        x = F.conv2d(x, weight_dw, padding=weight_dw.shape[-1] // 2, groups=x.shape[1])
    x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    if demod is not None:
        x = x * demod[None, :, None, None]
    return x


def mobile_modulated_conv2d_inplace(x, weight, styles, weight_dw=None, bias=None):
    """Inference form of mobile_modulated_conv2d with demodulation folded into `weight`, plus a bias: the same
    values to float32 rounding in fewer passes over the activations. With a depthwise conv the style scales
    its output in place (a per-channel factor commutes with a per-channel conv), so x is left unchanged;
    without, x itself is scaled in place (overwritten). Convolutions keep x's memory format.
    """
    if weight_dw is None:
        x = x.mul_(styles[:, :, None, None])
    else:
        x = F.conv2d(x, weight_dw, padding=weight_dw.shape[-1] // 2, groups=x.shape[1])
        x.mul_(styles[:, :, None, None])
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
