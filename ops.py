"""Low-level ops of StyleGAN2 and MobileStyleGAN, in plain PyTorch.

Every op here is the reference implementation: written for clarity, checked against the original
projects' outputs (../shared/reference, see test_msgan.py). Faster variants, where one pays, live
beside their reference and are tested against it: the in-place forms the student's inference path runs, and
CUDA kernels for the teacher's and discriminator's elementwise ops. This file knows nothing about models.

Conventions: tensors are NCHW float; "pad" tuples are (x0, x1, y0, y1) like rosinality's upfirdn2d.
"""
import functools
import math
import os
import platform
import time
import warnings

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
    float32 CUDA tensors go through the CUDA kernel when it is available (see the end of this file).
    """
    if _use_cuda_kernels(x):
        return _BiasLeakyReLU.apply(x, bias, float(gain), None if clamp is None else float(clamp))
    return bias_leaky_relu_reference(x, bias, gain, clamp)


def bias_leaky_relu_reference(x, bias=None, gain=LRELU_GAIN, clamp=None):
    """bias_leaky_relu in plain PyTorch ops, on any device: the specification of the CUDA kernel."""
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
    fixed shape [C, 1, kh, kw] and keep the batch axis dynamic. float32 CUDA tensors go through the CUDA kernel
    when it is available (see the end of this file).
    """
    if _use_cuda_kernels(x):
        return _UpFirDn2d.apply(x, kernel, up, down, tuple(pad))
    return upfirdn2d_reference(x, kernel, up, down, pad)


def upfirdn2d_reference(x, kernel, up=1, down=1, pad=(0, 0, 0, 0)):
    """upfirdn2d in plain PyTorch ops, on any device: the specification of the CUDA kernel."""
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
# Resampling at a fixed grid (the discriminator's affine augmentation)


def grid_sample(x, grid):
    """F.grid_sample(x, grid) (bilinear, zero padding, align_corners=False) with a gradient w.r.t. x that is
    differentiable again on every device: R1 through the augmentation takes that second derivative, and PyTorch's
    CUDA grid sampler has none. The grid is a constant (it gets no gradient).

    At a fixed grid the op is linear in x, y = A x, so its backward is the transpose A^T g (PyTorch's own
    backward kernel) and the backward of that transpose is A again: each is written as the other's gradient.
    """
    return _GridSample.apply(x, grid.detach())


def grid_sample_reference(x, grid):
    """PyTorch's grid sampler: the specification (twice differentiable on the CPU only)."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _GridSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid):
        ctx.save_for_backward(grid)
        ctx.x_shape = x.shape
        return grid_sample_reference(x, grid.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (grid,) = ctx.saved_tensors
        return _GridSampleTranspose.apply(grad, grid, ctx.x_shape), None


class _GridSampleTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, grid, x_shape):
        ctx.save_for_backward(grid)
        # the input's values do not enter the gradient w.r.t. it (the op is linear); only its shape does
        x = grad.new_empty(x_shape)
        grad_x, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad, x, grid.to(grad.dtype), 0, 0, False, [True, False])  # bilinear, zero padding, no corners
        return grad_x

    @staticmethod
    def backward(ctx, grad_grad_x):
        (grid,) = ctx.saved_tensors
        return _GridSample.apply(grad_grad_x, grid), None, None


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


def wavelets_to_img(packed):
    """MobileStyleGAN packing -> image, the inverse of img_to_wavelets: [B, 4C, H, W] -> [B, C, 2H, 2W].

    Channels 0..C-1 hold the low band; channel C + 3*c + k holds band k of colour/channel c. Computed as a
    transposed conv, stride 2, one group (the four bands) per output channel: exporters write it as one Gather and
    one ConvTranspose, which onnxruntime and OpenVINO run faster than elementwise butterflies and interleaving.
    """
    C = int(packed.shape[1]) // 4  # a constant in traced graphs: the filters' shape depends on it
    filters = haar_synthesis_filters(packed.dtype, packed.device).repeat(C, 1, 1, 1)
    return F.conv_transpose2d(packed[:, haar_band_groups(C, packed.device)], filters, stride=2, groups=C)


def haar_band_groups(C, device=None):
    """[4C]: the channel order of a packing [B, 4C, H, W] that puts the four bands of each channel side by side."""
    band = torch.arange(C, device=device)
    return torch.stack([band, C + 3 * band, C + 3 * band + 1, C + 3 * band + 2], dim=1).flatten()


def haar_synthesis_filters(dtype, device=None):
    """[4 bands, 1, 2, 2]: the 2x2 pixels that one unit of each band makes (wavelets_to_img's transposed conv)."""
    # The transform is orthonormal: the synthesis filter of band k is its analysis of the four pixels of a 2x2 block
    pixels = torch.eye(4, dtype=dtype, device=device).view(4, 1, 2, 2)  # one image per pixel
    return img_to_wavelets(pixels).view(4, 4).t().reshape(4, 1, 2, 2)


def wavelets_to_img_inplace(packed, scale=None):
    """Inference form of wavelets_to_img(packed * scale) for the same values to float32 rounding; `packed`
    is used as scratch (overwritten). scale: [B, 4C] per-sample channel factors, or None.

    Here the butterflies (L +- h0) and (h1 +- h2) are written straight into the four phases of the output, in
    packed's memory format (channels-last in the inference path's tiles).
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


# ----------------------------------------------------------------------------------------------
# Running fast: torch.compile where it works, bfloat16 where the hardware has it, huge pages for large activations,
# the CPU's name for tuning


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


def maybe_bfloat16(module, enabled, log):
    """module.to(torch.bfloat16) if asked for and its device computes bfloat16 in hardware (native_bf16); otherwise
    the module, after one warning to `log` if asked for (emulated bfloat16 is slower than float32)."""
    if not enabled:
        return module
    device = next(module.parameters()).device
    if native_bf16(device):
        return module.to(torch.bfloat16)
    log(f"warning: --bf16: no bfloat16 hardware on this {device.type} (AVX512-BF16, AMX); running float32")
    return module


def _cpuinfo():
    """The first CPU's fields in Linux's /proc/cpuinfo ({} elsewhere)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():  # a blank line ends the first CPU's block
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name():
    """The CPU's model name as the OS reports it, e.g. "AMD EPYC (family 25 model 17)" from Linux's /proc/cpuinfo
    (virtual machines often report only the brand: the family and model tell its generations apart), else the
    platform's architecture."""
    fields = _cpuinfo()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    family = f" (family {fields['cpu family']} model {fields.get('model', '?')})" if "cpu family" in fields else ""
    return fields["model name"] + family


def native_bf16(device):
    """Whether `device` computes bfloat16 convolutions in hardware: a CUDA GPU that supports bfloat16, or a CPU
    with AVX512-BF16 or AMX (as Linux reports them). Elsewhere PyTorch emulates bfloat16, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & set(_cpuinfo().get("flags", "").split()))


def use_huge_pages():
    """Ask PyTorch's CPU allocator for transparent huge pages on large tensors (its THP_MEM_ALLOC_ENABLE, read
    at the first large allocation; call this before building networks). A 64 MB activation then costs 32 page
    faults instead of 16,384: out-of-place ops on large images run 2-4x faster. Linux only; elsewhere a no-op.
    Set THP_MEM_ALLOC_ENABLE=0 to opt out."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


# ----------------------------------------------------------------------------------------------
# Optional CUDA kernels for the two ops StyleGAN2's teacher and discriminator spend their elementwise time in:
# bias + leaky ReLU [+ clamp] and upfirdn2d. bias_leaky_relu and upfirdn2d above use them for float32 CUDA
# tensors; they are compiled with nvcc on the first such call (never at import), cached by torch's extension
# builder, and if the build fails one warning is printed and the reference ops run instead. The kernels only
# compute forward formulas; every gradient is expressed with them again (see the autograd Functions), so
# first and second derivatives (R1) go through the kernels too. MSGAN_CUDA_KERNELS=0 turns them off.
# Check them on a GPU machine: `python ops.py` (values and gradients against the reference, and timings).

CUDA_SOURCE = r"""
#include <cuda_runtime.h>

// y = clamp(lrelu(x + bias[c]) * gain, +-clamp); x, y: [N, C, inner] contiguous; bias may be null;
// clamp < 0 means no clamp.
__global__ void bias_lrelu_kernel(float* y, const float* x, const float* bias, long long n, int channels,
                                  long long inner, float slope, float gain, float clamp) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float v = x[i] + (bias ? bias[(i / inner) % channels] : 0.f);
        v = (v > 0.f ? v : v * slope) * gain;
        if (clamp >= 0.f) v = fminf(fmaxf(v, -clamp), clamp);
        y[i] = v;
    }
}

// dx = dy * d(lrelu * gain)/dx, read from the forward output y (same sign as x + bias, as gain > 0);
// zero where the clamp was hit.
__global__ void bias_lrelu_grad_kernel(float* dx, const float* dy, const float* y, long long n, float slope,
                                       float gain, float clamp) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float g = y[i] > 0.f ? gain : gain * slope;
        dx[i] = (clamp >= 0.f && fabsf(y[i]) >= clamp) ? 0.f : dy[i] * g;
    }
}

// out[m, oy, ox] = sum_{j, i} P[oy*down + j, ox*down + i] * k[kh-1-j, kw-1-i], where P is x[m] upsampled by
// zero insertion (x[m, y, x] at (y*up, x*up)) and shifted by the pads (py0, px0; negative pads crop).
__global__ void upfirdn2d_kernel(float* out, const float* x, const float* k, long long n, int H, int W, int kh,
                                 int kw, int up, int down, int px0, int py0, int outH, int outW) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n;
         o += (long long)blockDim.x * gridDim.x) {
        int ox = o % outW, oy = (o / outW) % outH;
        long long m = o / ((long long)outW * outH);
        const float* xm = x + m * H * W;
        float acc = 0.f;
        for (int j = 0; j < kh; ++j) {
            int uy = oy * down + j - py0;  // row in the upsampled image
            if (uy < 0 || uy % up != 0 || uy / up >= H) continue;
            for (int i = 0; i < kw; ++i) {
                int ux = ox * down + i - px0;
                if (ux < 0 || ux % up != 0 || ux / up >= W) continue;
                acc += xm[(uy / up) * W + ux / up] * k[(kh - 1 - j) * kw + (kw - 1 - i)];
            }
        }
        out[o] = acc;
    }
}

static int blocks_for(long long n) { return (int)((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535); }

void launch_bias_lrelu(float* y, const float* x, const float* bias, long long n, int channels, long long inner,
                       float slope, float gain, float clamp, cudaStream_t stream) {
    if (n > 0) bias_lrelu_kernel<<<blocks_for(n), 256, 0, stream>>>(y, x, bias, n, channels, inner, slope, gain, clamp);
}

void launch_bias_lrelu_grad(float* dx, const float* dy, const float* y, long long n, float slope, float gain,
                            float clamp, cudaStream_t stream) {
    if (n > 0) bias_lrelu_grad_kernel<<<blocks_for(n), 256, 0, stream>>>(dx, dy, y, n, slope, gain, clamp);
}

void launch_upfirdn2d(float* out, const float* x, const float* k, long long n, int H, int W, int kh, int kw,
                      int up, int down, int px0, int py0, int outH, int outW, cudaStream_t stream) {
    if (n > 0) upfirdn2d_kernel<<<blocks_for(n), 256, 0, stream>>>(out, x, k, n, H, W, kh, kw, up, down, px0, py0,
                                                                 outH, outW);
}
"""

CPP_SOURCE = r"""
#include <ATen/cuda/CUDAContext.h>

void launch_bias_lrelu(float*, const float*, const float*, long long, int, long long, float, float, float,
                       cudaStream_t);
void launch_bias_lrelu_grad(float*, const float*, const float*, long long, float, float, float, cudaStream_t);
void launch_upfirdn2d(float*, const float*, const float*, long long, int, int, int, int, int, int, int, int, int,
                      int, cudaStream_t);

// x: [N, C, ...] contiguous float32 CUDA; bias: [C] or an empty tensor.
torch::Tensor bias_lrelu(torch::Tensor x, torch::Tensor bias, double slope, double gain, double clamp) {
    auto y = torch::empty_like(x);
    long long inner = x.dim() > 2 ? x.numel() / (x.size(0) * x.size(1)) : 1;
    launch_bias_lrelu(y.data_ptr<float>(), x.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
                      x.numel(), (int)x.size(1), inner, (float)slope, (float)gain, (float)clamp,
                      at::cuda::getCurrentCUDAStream());
    return y;
}

torch::Tensor bias_lrelu_grad(torch::Tensor dy, torch::Tensor y, double slope, double gain, double clamp) {
    auto dx = torch::empty_like(y);
    launch_bias_lrelu_grad(dx.data_ptr<float>(), dy.data_ptr<float>(), y.data_ptr<float>(), y.numel(),
                           (float)slope, (float)gain, (float)clamp, at::cuda::getCurrentCUDAStream());
    return dx;
}

// x: [M, H, W] contiguous float32 CUDA; k: [kh, kw]; returns [M, outH, outW].
torch::Tensor upfirdn2d(torch::Tensor x, torch::Tensor k, int64_t up, int64_t down, int64_t px0, int64_t py0,
                        int64_t outH, int64_t outW) {
    auto out = torch::empty({x.size(0), outH, outW}, x.options());
    launch_upfirdn2d(out.data_ptr<float>(), x.data_ptr<float>(), k.data_ptr<float>(), out.numel(),
                     (int)x.size(1), (int)x.size(2), (int)k.size(0), (int)k.size(1), (int)up, (int)down,
                     (int)px0, (int)py0, (int)outH, (int)outW, at::cuda::getCurrentCUDAStream());
    return out;
}
"""


@functools.cache
def cuda_kernels():
    """The compiled extension (functions bias_lrelu, bias_lrelu_grad, upfirdn2d), or None: disabled, or the
    build failed (one warning). Built on first call, so only code that runs on a CUDA device pays for it."""
    if os.environ.get("MSGAN_CUDA_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline("msgan_ops", cpp_sources=CPP_SOURCE, cuda_sources=CUDA_SOURCE,
                           functions=["bias_lrelu", "bias_lrelu_grad", "upfirdn2d"],
                           extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:  # no nvcc, no compiler, a CUDA/torch mismatch: the reference ops are always right
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"msgan: CUDA kernels unavailable ({type(e).__name__}: {first}); using the PyTorch "
                      "reference ops", stacklevel=2)
        return None


def _use_cuda_kernels(x):
    """float32 on CUDA, in eager mode (tracers and torch.compile need the reference ops), kernels built."""
    return (x.is_cuda and x.dtype == torch.float32 and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and cuda_kernels() is not None)


class _BiasLeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, gain, clamp):
        x = x.contiguous()
        empty = x.new_empty(0)
        y = cuda_kernels().bias_lrelu(x, empty if bias is None else bias.contiguous(), LRELU_SLOPE, gain,
                                      -1.0 if clamp is None else clamp)
        ctx.save_for_backward(y)
        ctx.gain, ctx.clamp, ctx.has_bias = gain, clamp, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = _BiasLeakyReLUGrad.apply(dy, y, ctx.gain, ctx.clamp)
        dbias = dx.sum([d for d in range(dx.ndim) if d != 1]) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, dbias, None, None


class _BiasLeakyReLUGrad(torch.autograd.Function):
    """dx = dy * mask(y): linear in dy, and the mask is piecewise constant, so its own gradient is the same op."""

    @staticmethod
    def forward(ctx, dy, y, gain, clamp):
        ctx.save_for_backward(y)
        ctx.gain, ctx.clamp = gain, clamp
        return cuda_kernels().bias_lrelu_grad(dy.contiguous(), y, LRELU_SLOPE, gain, -1.0 if clamp is None else clamp)

    @staticmethod
    def backward(ctx, ddx):
        (y,) = ctx.saved_tensors
        return _BiasLeakyReLUGrad.apply(ddx, y, ctx.gain, ctx.clamp), None, None, None


def upfirdn2d_grad_args(in_shape, kernel_shape, up, down, pad):
    """(up, down, pad) of the upfirdn2d, with the flipped kernel, that computes the input gradient of
    upfirdn2d(x [.., H, W], kernel, up, down, pad) from its output gradient: the op is linear, and its transpose
    zero-inserts by `down`, filters with the flipped kernel, and keeps every `up`-th sample."""
    H, W = in_shape[-2:]
    kh, kw = kernel_shape
    x0, x1, y0, y1 = pad
    out_h = (H * up + y0 + y1 - kh) // down + 1
    out_w = (W * up + x0 + x1 - kw) // down + 1
    gx0, gy0 = kw - 1 - x0, kh - 1 - y0
    gx1 = (W - 1) * up + kw - out_w * down - gx0  # makes the gradient exactly [H, W]
    gy1 = (H - 1) * up + kh - out_h * down - gy0
    return down, up, (gx0, gx1, gy0, gy1)


class _UpFirDn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, up, down, pad):
        B, C, H, W = x.shape
        x0, x1, y0, y1 = pad
        kh, kw = kernel.shape
        out_h, out_w = (H * up + y0 + y1 - kh) // down + 1, (W * up + x0 + x1 - kw) // down + 1
        out = cuda_kernels().upfirdn2d(x.reshape(B * C, H, W).contiguous(), kernel.to(x).contiguous(),
                                       up, down, x0, y0, out_h, out_w)
        ctx.save_for_backward(kernel)
        ctx.args = (x.shape, up, down, pad)
        return out.view(B, C, out_h, out_w)

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        shape, up, down, pad = ctx.args
        g_up, g_down, g_pad = upfirdn2d_grad_args(shape, kernel.shape, up, down, pad)
        return _UpFirDn2d.apply(grad, kernel.flip(0, 1), g_up, g_down, g_pad), None, None, None, None


def check_cuda_kernels(device="cuda", timing_runs=20):
    """The CUDA kernels against the reference ops on StyleGAN2's shapes: values, gradients and second-order
    gradients (as R1 takes them) to float32 rounding, and the time of forward + backward of each. Returns the
    report lines; raises AssertionError on a mismatch or RuntimeError if the kernels are unavailable."""
    if cuda_kernels() is None:
        raise RuntimeError("the CUDA kernels are unavailable here (see the warning above)")
    g = torch.Generator(device=device).manual_seed(0)
    blur = make_blur_kernel().to(device)
    cases = [  # (name, reference, kernel path, input shape)
        ("bias_lrelu [64, 512]", lambda x, b: bias_leaky_relu_reference(x, b), lambda x, b: bias_leaky_relu(x, b),
         (64, 512)),
        ("bias_lrelu clamp 256", lambda x, b: bias_leaky_relu_reference(x * 300, b, clamp=256.0),
         lambda x, b: bias_leaky_relu(x * 300, b, clamp=256.0), (8, 128, 64, 64)),
        ("upfirdn2d up 2 (ToRGB skip)", lambda x, b: upfirdn2d_reference(x, blur * 4, up=2, pad=(2, 1, 2, 1)),
         lambda x, b: upfirdn2d(x, blur * 4, up=2, pad=(2, 1, 2, 1)), (8, 3, 128, 128)),
        ("upfirdn2d blur (upsampling conv)", lambda x, b: upfirdn2d_reference(x, blur * 4, pad=(1, 1, 1, 1)),
         lambda x, b: upfirdn2d(x, blur * 4, pad=(1, 1, 1, 1)), (8, 64, 129, 129)),
        ("upfirdn2d down 2", lambda x, b: upfirdn2d_reference(x, blur, down=2, pad=(1, 1, 1, 1)),
         lambda x, b: upfirdn2d(x, blur, down=2, pad=(1, 1, 1, 1)), (8, 64, 128, 128)),
    ]
    lines = []
    for name, reference, fast, shape in cases:
        x = torch.randn(*shape, device=device, generator=g, requires_grad=True)
        b = torch.randn(shape[1], device=device, generator=g, requires_grad=True)
        results = []
        for fn in (reference, fast):
            y = fn(x, b)
            gx, gb = torch.autograd.grad(y.square().sum(), (x, b), create_graph=True, allow_unused=True)
            ggx, = torch.autograd.grad(gx.square().sum(), x)  # R1-style second order
            results.append((y, gx, ggx, gb))
        for what, want, got in zip(("value", "grad", "grad of grad", "bias grad"), *results):
            if want is not None:
                scale = want.abs().max().item() or 1.0
                error = (got - want).abs().max().item()
                assert error <= 1e-5 * scale, f"{name}: {what} differs by {error:.3g} (scale {scale:.3g})"
        times = []
        for fn in (reference, fast):
            for run in range(timing_runs + 1):
                if run == 1:  # after one warm-up
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                fn(x, b).sum().backward()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / timing_runs * 1000)
        lines.append(f"{name:34} ok   reference {times[0]:7.3f} ms   kernel {times[1]:7.3f} ms   "
                     f"({times[0] / times[1]:.2f}x)")
    return lines


if __name__ == "__main__":  # python ops.py: check and time the CUDA kernels on this machine's GPU
    print("\n".join(check_cuda_kernels()))
