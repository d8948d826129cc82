"""Batched, per-sample random image augmentations for self-supervised pretraining.

A whole uint8 batch ``(B, 3, H, W)`` is augmented at once on its own device (CPU or CUDA);
every image gets its own random parameters. The ops and their defaults follow lightly's
per-method transforms (``lightly.transforms.*``), which apply torchvision / PIL ops to one
PIL image at a time in DataLoader workers:

    random resized crop -> horizontal flip -> colour jitter (prob p) -> random grayscale
    -> Gaussian blur (prob p) -> solarization (prob p) -> normalization

Design (each choice won an A/B timing on a small CPU; measurements:
results/benchmarks/NOTES.md#batched-augmentation):

* **Crop + resize + flip + uint8->float as two batched matmuls.** Every crop box becomes
  two small per-sample resampling matrices ``Wy (S, H)`` and ``Wx (S, W)``; the view is
  ``Wy @ img @ Wx^T``. The matrices hold the separable filter weights (bilinear: triangle;
  bicubic: Keys a=-0.5), restricted to the crop box and renormalized, so borders are
  clamped to the crop exactly as ``torchvision.transforms.v2.functional.resized_crop``
  does; with ``antialias=True`` the filter is widened on downscaling like PIL /
  torchvision's antialias. The horizontal flip reverses the rows of ``Wx`` and the 1/255
  of the uint8->float conversion is folded into ``Wy``: both free. Faster than
  ``torchvision.ops.roi_align`` and ``affine_grid + grid_sample``, which both read pixels
  outside the crop when upscaling.
* **Ops run only on the images they hit** (``index_select`` into scratch memory, in-place
  op, ``index_copy_``): the cost scales with the probability and untouched images stay
  bit-exact. Per-image factors are ``(B, 1, 1, 1)`` tensors.
* **Hue shift without an HSV image**: only the hexagonal hue ``6h`` is computed, then each
  output channel is ``v - (v - min) * T((n_c + 6h') mod 6)`` with ``T`` the HSV trapezoid;
  equal to torchvision's ``adjust_hue`` within float rounding, and far faster than looping
  it over the images.
* **No ``torch.where`` / bool masks in the hot loops** (on CPU ``where`` and products with
  bool tensors are not vectorized; a float mask + ``lerp`` is); solarization at 0.5 is
  ``min(x, 1 - x)`` (exact).
* **No fresh multi-MB temporaries** (in-place ops, ``out=`` into ``Workspace`` buffers kept
  between calls): on the CPU a fresh allocation is often page-faulted in (see ``Workspace``).
* **Gaussian blur as a matmul with per-sample banded matrices** that include the reflect
  padding (``G @ x @ G^T``), exact vs torchvision's ``gaussian_blur``; as fast as a
  separable grouped convolution at 32 px and faster at 224 px.
* All random parameters are drawn on the CPU from one ``torch.Generator`` (if given) in a
  fixed order, so a seeded generator gives the same parameters on any device, and saving
  ``generator.get_state()`` in a checkpoint makes a resumed run exact. On CUDA they are
  sent over from pinned memory without stream syncs.
* **Every op works image by image** (per-sample matrices, per-image reductions, subsets
  gathered by index), so an image's views do not depend on the rest of its batch. A process
  of a multi-process run therefore augments only its rows of the global batch
  (``augment(images, generator, rows=(a, b), total=B)``): the parameters are drawn
  for all ``B`` images, as in one process, and those of rows ``[a, b)`` applied: the views
  equal rows ``[a, b)`` of the whole batch's up to float32 rounding (the contrast's grey level
  is a small matrix product whose rounding the BLAS may choose by the number of rows).

Throughput (``benchmarks/augment.py``): on a CPU, an order of magnitude more images/s than
lightly's ``BYOLTransform`` in a ``DataLoader``. Intra-op threads: the tensors here are small
(~0.8 M elements at batch 256), so when the CPU is busy with other work several OpenMP threads
spin-wait on each other and one thread (``torch.set_num_threads(1)``) can be the fastest.

Deliberate differences to lightly's PIL pipeline (all documented where they occur):
the Gaussian blur is a true Gaussian with a fixed kernel size (PIL approximates it with box
filters); intermediate results stay float (PIL re-quantizes to uint8 after every op).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiViewAugment",
    "ViewConfig",
    "ViewParams",
    "Workspace",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augment_view",
    "blur_kernel_size",
    "gaussian_blur",
    "method_views",
    "normalize",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "sample_view_params",
    "slice_view_params",
    "solarize",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Per-channel pixel statistics of the CIFAR-10 training set.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale (PIL uses the same, rounded).
_GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

# Colour-jitter op ids, in torchvision's ColorJitter order.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewConfig:
    """Augmentation parameters of one view (one output crop per input image).

    Attributes:
        size: Output side length S (square views, like lightly's ``input_size``).
        min_scale, max_scale: Range of the crop area relative to the image area.
        min_ratio, max_ratio: Range of the crop aspect ratio w/h (sampled log-uniformly).
        hflip_prob: Probability of a horizontal flip.
        cj_prob: Probability that colour jitter is applied to an image.
        cj_bright, cj_contrast, cj_sat: Jitter strengths s; factors are drawn from
            ``U[max(0, 1 - s), 1 + s]`` (torchvision's ColorJitter); 0 disables the op.
        cj_hue: Hue strength h <= 0.5; the shift is drawn from ``U[-h, h]``.
        cj_random_order: Apply the four jitter ops in an independent random order per image,
            like torchvision's ColorJitter (which lightly uses). ``False`` uses the fixed
            order brightness, contrast, saturation, hue (slightly cheaper).
        gray_prob: Probability of conversion to grayscale (3 equal channels).
        blur_prob: Probability of a Gaussian blur.
        blur_sigmas: Range of the blur's standard deviation in output pixels (uniform).
        blur_kernel: Odd kernel size; ``None`` -> ``2 * ceil(3 * max sigma) + 1`` (13 for
            sigma <= 2), i.e. +-3 sigma of the widest blur, independent of the image size,
            because lightly's PIL blur also takes sigma in pixels and has no kernel size.
            Capped to ``2 * size - 1`` (reflect padding must be smaller than the image).
        solarize_prob: Probability of solarization (threshold 0.5 on [0, 1], PIL's 128).
        solarize_before_blur: Order of those two ops (lightly's VICReg solarizes first).
        interpolation: ``"bilinear"`` or ``"bicubic"`` (lightly's DINO uses bicubic). Bicubic
            uses Keys' a=-0.5 with the taps renormalized inside the crop (PIL, and
            torchvision's antialiased bicubic), and the result is clamped to [0, 1].
        antialias: Widen the resampling filter when downscaling (PIL always does; so does
            torchvision's RandomResizedCrop by default). Irrelevant when upscaling.
        mean, std: Normalization statistics.
    """

    size: int
    min_scale: float = 0.08
    max_scale: float = 1.0
    min_ratio: float = 3.0 / 4.0
    max_ratio: float = 4.0 / 3.0
    hflip_prob: float = 0.5
    cj_prob: float = 0.8
    cj_bright: float = 0.4
    cj_contrast: float = 0.4
    cj_sat: float = 0.2
    cj_hue: float = 0.1
    cj_random_order: bool = True
    gray_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigmas: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    solarize_prob: float = 0.0
    solarize_before_blur: bool = False
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(
                f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}"
            )
        if not 0.0 < self.min_ratio <= self.max_ratio:
            raise ValueError(
                f"need 0 < min_ratio <= max_ratio, got {self.min_ratio}, {self.max_ratio}"
            )
        for name in ("hflip_prob", "cj_prob", "gray_prob", "blur_prob", "solarize_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        for name in ("cj_bright", "cj_contrast", "cj_sat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.cj_hue <= 0.5:
            raise ValueError(f"cj_hue must lie in [0, 0.5], got {self.cj_hue}")
        if not 0.0 < self.blur_sigmas[0] <= self.blur_sigmas[1]:
            raise ValueError(f"need 0 < blur_sigmas[0] <= blur_sigmas[1], got {self.blur_sigmas}")
        if self.blur_kernel is not None and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0):
            raise ValueError(f"blur_kernel must be a positive odd integer, got {self.blur_kernel}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 entries each, std positive")


def blur_kernel_size(cfg: ViewConfig) -> int:
    """The odd Gaussian kernel size a view uses (see ``ViewConfig.blur_kernel``)."""
    k = (
        cfg.blur_kernel
        if cfg.blur_kernel is not None
        else 2 * math.ceil(3.0 * cfg.blur_sigmas[1]) + 1
    )
    return min(k, 2 * cfg.size - 1)


# --------------------------------------------------------------------------------------
# Random parameters (always drawn on the CPU, in a fixed order)
# --------------------------------------------------------------------------------------


class ViewParams(NamedTuple):
    """Per-image random parameters of one view; all CPU tensors of leading size B.

    ``boxes`` is ``(B, 4)`` int64 ``(top, left, height, width)``; ``cj_factors`` is ``(B, 4)``
    (brightness, contrast, saturation factors and hue shift); ``cj_order`` is ``(B, 4)``, row
    b a permutation of the op ids 0..3; ``blur_sigma`` is ``(B,)``; the rest are bool masks.
    """

    boxes: Tensor
    flip: Tensor
    cj_apply: Tensor
    cj_factors: Tensor
    cj_order: Tensor
    gray: Tensor
    blur: Tensor
    blur_sigma: Tensor
    solarize: Tensor


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None
) -> Tensor:
    """float64 samples of U[low, high) on the CPU."""
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> Tensor:
    """Bool mask, True with probability p (drawn even for p in {0, 1}: fixed RNG use)."""
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """Crop boxes sampled like torchvision's ``RandomResizedCrop.get_params``, vectorized.

    For every image, ``attempts`` candidates (area fraction ~ U[scale], log aspect ratio
    ~ U[log ratio]) are drawn at once; the first candidate that fits is taken, at a uniform
    random position. Images without a fitting candidate fall back to torchvision's central
    crop (whole image, clipped to the ratio range). Sizes are rounded half-to-even, as
    Python's ``round`` in torchvision.

    Returns:
        ``(n, 4)`` int64 tensor of ``(top, left, height, width)`` on the CPU.
    """
    area = float(height * width)
    target = area * _uniform((n, attempts), scale[0], scale[1], generator)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # first True (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    position = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.floor(position[:, 0] * (height - h + 1))
    left = torch.floor(position[:, 1] * (width - w + 1))

    # Fallback: central crop of the whole image, clipped to the aspect-ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = fits.any(dim=1)
    top = torch.where(ok, top, float((height - fh) // 2))
    left = torch.where(ok, left, float((width - fw) // 2))
    h = torch.where(ok, h, float(fh))
    w = torch.where(ok, w, float(fw))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def _jitter_factors(n: int, cfg: ViewConfig, generator: torch.Generator | None) -> Tensor:
    """(n, 4) brightness, contrast, saturation factors and hue shifts (torchvision ranges)."""
    cols = [
        _uniform((n,), max(0.0, 1.0 - s), 1.0 + s, generator)
        for s in (cfg.cj_bright, cfg.cj_contrast, cfg.cj_sat)
    ]
    cols.append(_uniform((n,), -cfg.cj_hue, cfg.cj_hue, generator))
    return torch.stack(cols, dim=1)


def sample_view_params(
    n: int, height: int, width: int, cfg: ViewConfig, generator: torch.Generator | None = None
) -> ViewParams:
    """Draw all random parameters of one view for n images of size height x width.

    Every parameter is drawn for every image whether or not its op fires, so the amount of
    randomness consumed per call is fixed (reproducible, resumable streams).
    """
    boxes = sample_crop_boxes(
        n, height, width, (cfg.min_scale, cfg.max_scale), (cfg.min_ratio, cfg.max_ratio), generator
    )
    flip = _bernoulli(n, cfg.hflip_prob, generator)
    cj_apply = _bernoulli(n, cfg.cj_prob, generator)
    cj_factors = _jitter_factors(n, cfg, generator)
    # argsort of iid uniforms: a uniformly random permutation per row (torch.randperm(4)).
    cj_order = torch.argsort(torch.rand((n, 4), generator=generator), dim=1)
    gray = _bernoulli(n, cfg.gray_prob, generator)
    blur = _bernoulli(n, cfg.blur_prob, generator)
    blur_sigma = _uniform((n,), cfg.blur_sigmas[0], cfg.blur_sigmas[1], generator)
    sol = _bernoulli(n, cfg.solarize_prob, generator)
    return ViewParams(boxes, flip, cj_apply, cj_factors, cj_order, gray, blur, blur_sigma, sol)


def slice_view_params(params: ViewParams, start: int, stop: int) -> ViewParams:
    """The parameters of images ``start`` to ``stop - 1`` of a batch's ``params`` (views, no
    copy)."""
    return ViewParams(*(field[start:stop] for field in params))


# --------------------------------------------------------------------------------------
# Scratch memory
# --------------------------------------------------------------------------------------


class Workspace:
    """Named scratch tensors, reused across calls when ``cache`` is True.

    On the CPU a fresh multi-MB tensor is often new memory from the OS, page-faulted in on
    first touch, which glibc returns when it is freed; on a small VM that cost is large.
    Keeping the scratch tensors alive between calls removes it without touching the
    process' malloc settings (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``).
    CUDA's caching allocator already reuses memory, so there ``cache=False``
    (plain ``torch.empty``) is the default.

    Buffers are flat and grow to the largest size requested; ``get`` returns a view of the
    prefix. Names used at the same time must differ. Not thread-safe.
    """

    def __init__(self, cache: bool = True) -> None:
        self.cache = cache
        self._buffers: dict[str, Tensor] = {}

    def get(
        self,
        name: str,
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A tensor of ``shape`` (uninitialized contents) for scratch use under ``name``."""
        if not self.cache:
            return torch.empty(tuple(shape), device=device, dtype=dtype)
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.device != device or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, device=device, dtype=dtype)
            self._buffers[name] = buf
        return buf[:numel].view(tuple(shape))


def _default_workspace(device: torch.device) -> Workspace:
    return Workspace(cache=False)


def _to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Move a small CPU tensor (parameters, indices) to ``device`` without a stream sync.

    A copy from pageable host memory to CUDA synchronizes the stream (the CPU would wait
    for all queued GPU work, e.g. the previous training step, ~30 times per view); from
    pinned memory with ``non_blocking=True`` it is asynchronous.
    """
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _const(values: Sequence[float], like: Tensor) -> Tensor:
    """A small constant tensor with ``like``'s device and dtype."""
    return _to_device(torch.tensor(values, dtype=like.dtype), like.device)


# --------------------------------------------------------------------------------------
# Geometry: crop + resize + flip as two batched matrix products
# --------------------------------------------------------------------------------------


def _filter_(d: Tensor, interpolation: str) -> Tensor:
    """Resampling kernel of |d|, in place where possible: triangle or Keys cubic a=-0.5."""
    d = d.abs_()
    if interpolation == "bilinear":
        return d.neg_().add_(1.0).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return torch.where(d <= 1.0, near, torch.where(d < 2.0, far, torch.zeros_like(d)))


def _resample_matrix(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    reverse: Tensor | None,
    interpolation: str,
    antialias: bool,
    out: Tensor | None = None,
) -> Tensor:
    """Per-sample 1-D resampling matrices ``(n, out_size, in_size)``.

    Row i of sample b resamples the interval ``[start_b, start_b + length_b)`` of the input
    axis at output pixel i (pixel centres, i.e. ``align_corners=False``); ``reverse`` flips
    the output order. Weights outside the interval are dropped and each row renormalized,
    which reproduces torch's edge clamping for bilinear and PIL's/torch's antialiased
    resampling (filter widened by the scale factor when downscaling).
    """
    device, dtype = start.device, torch.float32
    scale = length / out_size  # (n,) input pixels per output pixel
    pos = torch.arange(out_size, device=device, dtype=dtype).expand(start.shape[0], out_size)
    if reverse is not None:
        pos = torch.where(reverse[:, None], (out_size - 1) - pos, pos)
    centre = (pos + 0.5) * scale[:, None]  # (n, out) in crop coordinates
    # pixel centres of the input axis in crop coordinates: (n, 1, in)
    pix = (
        torch.arange(in_size, device=device, dtype=dtype)[None, None, :]
        - start[:, None, None]
        + 0.5
    )
    d = torch.sub(pix, centre[:, :, None], out=out)
    if antialias:
        d = d.div_(scale.clamp(min=1.0)[:, None, None])
    weights = _filter_(d, interpolation)
    inside = ((pix > 0.0) & (pix < length[:, None, None])).to(
        dtype
    )  # (n, 1, in): the crop interval
    weights = weights.mul_(inside)  # float mask: multiplying by a bool tensor is not vectorized
    return weights.div_(weights.sum(dim=2, keepdim=True))


def _separable_hc(xh: Tensor, wy: Tensor, wx: Tensor, ws: Workspace, tag: str) -> Tensor:
    """``wy[b] @ x[b, c] @ wx[b]^T`` for all images b and channels c.

    ``xh`` is the input in ``(B, H, C, W)`` layout; returns ``(B, S, C, T)`` (a workspace
    buffer). Both products are plain ``bmm`` over B with the channels folded into the
    matrices (``(S,H) @ (H, C*W)``, then ``(S*C, W) @ (W, T)``), so no weight is replicated
    per channel and no transposing copy is needed, unlike a broadcasting
    ``torch.matmul(wy[:, None], x) @ wx[:, None]^T`` (which materializes the weights per
    channel and runs B * C tiny GEMMs).
    """
    n, h, c, w = xh.shape
    s, t = wy.shape[1], wx.shape[1]
    rows = torch.bmm(wy, xh.view(n, h, c * w), out=ws.get(tag + "rows", (n, s, c * w), xh.device))
    out = torch.bmm(
        rows.view(n, s * c, w),
        wx.transpose(1, 2),
        out=ws.get(tag + "out", (n, s * c, t), xh.device),
    )
    return out.view(n, s, c, t)


def _to_hc_layout(images: Tensor, ws: Workspace) -> tuple[Tensor, float]:
    """float32 copy of a ``(B, C, H, W)`` batch in ``(B, H, C, W)`` layout, and its scale.

    The dtype conversion and the layout change are one pass; uint8 data is not divided by
    255 here (the scale is folded into the resampling matrix instead).
    """
    n, c, h, w = images.shape
    xh = ws.get("input", (n, h, c, w), images.device)
    xh.copy_(images.permute(0, 2, 1, 3))
    return xh, (1.0 / 255.0 if images.dtype == torch.uint8 else 1.0)


def _crop_hc(
    xh: Tensor,
    value_scale: float,
    boxes: Tensor,
    size: int,
    flip: Tensor | None,
    interpolation: str,
    antialias: bool,
    ws: Workspace,
) -> Tensor:
    """Resized crops of a ``(B, H, C, W)`` float input as a ``(B, C, S, S)`` workspace tensor."""
    n, height, c, width = xh.shape
    device = xh.device
    boxes = _to_device(boxes, device, torch.float32)
    rev = _to_device(flip, device) if flip is not None else None
    wy = _resample_matrix(
        boxes[:, 0],
        boxes[:, 2],
        height,
        size,
        None,
        interpolation,
        antialias,
        ws.get("wy", (n, size, height), device),
    )
    wx = _resample_matrix(
        boxes[:, 1],
        boxes[:, 3],
        width,
        size,
        rev,
        interpolation,
        antialias,
        ws.get("wx", (n, size, width), device),
    )
    if value_scale != 1.0:
        wy.mul_(value_scale)  # fold the uint8 -> [0, 1] scaling into the (small) matrix
    out = _separable_hc(xh, wy, wx, ws, "crop_")  # (B, S, C, S)
    x = ws.get("x", (n, c, size, size), device)
    x.copy_(out.permute(0, 2, 1, 3))
    if interpolation == "bicubic":
        x.clamp_(0.0, 1.0)  # cubic overshoot; PIL clamps to the uint8 range as well
    return x


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int,
    flip: Tensor | None = None,
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> Tensor:
    """Crop every image to its own box, resize to ``size x size`` and optionally flip it.

    Args:
        images: ``(B, C, H, W)`` uint8 (scaled by 1/255) or float in [0, 1], any device.
        boxes: ``(B, 4)`` integer ``(top, left, height, width)`` boxes inside the images.
        size: Output side length S.
        flip: Optional ``(B,)`` bool mask of images to flip horizontally (after resizing).
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        antialias: Widen the filter when downscaling (as PIL / torchvision antialias).

    Returns:
        ``(B, C, S, S)`` float32 on the images' device; equal (to float rounding) to
        ``torchvision.transforms.v2.functional.resized_crop`` of each box (bilinear, either
        antialias setting), followed by ``hflip``. On CUDA with TF32 matmuls enabled
        (``torch.backends.cuda.matmul.allow_tf32``) the products run in TF32, ~1e-3 relative.
    """
    ws = _default_workspace(images.device)
    xh, value_scale = _to_hc_layout(images, ws)
    return _crop_hc(xh, value_scale, boxes, size, flip, interpolation, antialias, ws)


# --------------------------------------------------------------------------------------
# Colour ops on float [0, 1] batches with per-sample factors.
# The underscore versions work in place on a contiguous x (B, 3, H, W), with factors (B,)
# and scratch tensors from a Workspace (no multi-MB allocation per call).
# --------------------------------------------------------------------------------------


def _per_sample(f: Tensor, x: Tensor) -> Tensor:
    return _to_device(f, x.device, x.dtype).view(-1, 1, 1, 1)


def _plane(x: Tensor, ws: Workspace, name: str) -> Tensor:
    return ws.get(name, (x.shape[0], 1, x.shape[2], x.shape[3]), x.device, x.dtype)


def _gray_into(x: Tensor, out: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's weights) into ``out`` (B,1,H,W)."""
    r, g, b = x.unbind(dim=1)
    torch.mul(r, _GRAY_WEIGHTS[0], out=out[:, 0])
    return out.add_(g.unsqueeze(1), alpha=_GRAY_WEIGHTS[1]).add_(
        b.unsqueeze(1), alpha=_GRAY_WEIGHTS[2]
    )


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of ``(B, 3, H, W)`` as ``(B, 1, H, W)``."""
    return _gray_into(x, torch.empty_like(x[:, :1]))


def _brightness_(x: Tensor, factor: Tensor, ws: Workspace) -> Tensor:
    # factor >= 0 keeps x >= 0: only the upper clamp is needed.
    return x.mul_(_per_sample(factor, x)).clamp_(max=1.0)


def _contrast_(x: Tensor, factor: Tensor, ws: Workspace) -> Tensor:
    """Blend with the mean grey level: ``clamp(f * x + (1 - f) * mean(gray(x)), 0, 1)``."""
    f = _per_sample(factor, x)
    # Mean of the grayscale image = luma of the channel means (one reduction, no gray image).
    weights = _const(_GRAY_WEIGHTS, x)
    mean = (x.mean(dim=(2, 3)) @ weights).view(-1, 1, 1, 1)
    # mul_ + add_ of (B,1,1,1) factors: a fused addcmul with such broadcast operands is not
    # vectorized on the CPU.
    return x.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)


def _saturation_(x: Tensor, factor: Tensor, ws: Workspace) -> Tensor:
    """Blend with the grayscale image: ``clamp(f * x + (1 - f) * gray(x), 0, 1)``."""
    f = _per_sample(factor, x)
    gray = _gray_into(x, _plane(x, ws, "plane0")).mul_(1.0 - f)
    # Fused f * x + gray: fine here, as the gray operand is a plane, not a scalar broadcast.
    return torch.addcmul(gray, x, f, out=x).clamp_(0.0, 1.0)


def _hue_(x: Tensor, shift: Tensor, ws: Workspace) -> Tensor:
    """Rotate the HSV hue of every image by its shift (fraction of a full turn), in place.

    With v = max, m = min and C = v - m over the channels, HSV->RGB is
    ``out_c = v - C * T((n_c + 6h) mod 6)``, n = (5, 3, 1), ``T(k) = clamp(min(k, 4 - k), 0, 1)``.
    A hue rotation leaves v and C unchanged, so only ``6h`` is computed from RGB; no HSV
    tensor is built. All temporaries live in the workspace (fresh ones, ``torch.where`` for
    the sector choice and torchvision's ``adjust_hue`` looped over the images were slower).
    """
    v = torch.amax(x, dim=1, keepdim=True, out=_plane(x, ws, "plane0"))
    chroma = torch.amin(x, dim=1, keepdim=True, out=_plane(x, ws, "plane1"))
    chroma = torch.sub(v, chroma, out=chroma)
    r, g, b = x.unbind(dim=1)
    v1, c1 = v[:, 0], chroma[:, 0]
    tmp = ws.get("hue_tmp", x.shape, x.device, x.dtype)
    t0, t1, t2 = tmp.unbind(dim=1)
    # 6 * hue in [-1, 5): sector of the maximal channel (R, then G, then B on ties, like
    # torchvision / PIL). Grey pixels (C == 0) get numerator 0, so they stay grey.
    torch.sub(g, b, out=t0)
    torch.sub(b, r, out=t1).add_(c1, alpha=2.0)
    torch.sub(r, g, out=t2).add_(c1, alpha=4.0)
    # Select with float 0/1 masks and lerp (exact at weights 0 and 1): a bool ``==`` +
    # ``torch.where`` is slower on CPU (where is not vectorized).
    mask = _plane(x, ws, "plane2")[:, 0]
    torch.lerp(t2, t1, torch.eq(v1, g, out=mask), out=t2)
    torch.lerp(t2, t0, torch.eq(v1, r, out=mask), out=t2)
    t2.div_(torch.clamp(c1, min=1e-12, out=t1))
    offsets = _const([5.0, 3.0, 1.0], x).view(1, 3, 1, 1)
    k = torch.add(t2.unsqueeze(1), offsets + 6.0 * _per_sample(shift, x), out=x)  # x is free now
    # k mod 6 as k - 6 floor(k / 6): torch.remainder is ~10x slower on CPU.
    k.add_(torch.mul(k, 1.0 / 6.0, out=tmp).floor_(), alpha=-6.0)
    torch.minimum(k, torch.mul(k, -1.0, out=tmp).add_(4.0), out=k).clamp_(0.0, 1.0)
    return torch.addcmul(v, chroma, k, value=-1.0, out=x)


def _grayscale_(x: Tensor, ws: Workspace) -> Tensor:
    return x.copy_(_gray_into(x, _plane(x, ws, "plane0")).expand_as(x))


def _solarize_(x: Tensor, ws: Workspace) -> Tensor:
    """In-place ``min(x, 1 - x)`` (see ``solarize``)."""
    tmp = ws.get("sol_tmp", x.shape, x.device, x.dtype)
    return torch.minimum(x, torch.mul(x, -1.0, out=tmp).add_(1.0), out=x)


_JITTER_OPS: dict[int, Callable[[Tensor, Tensor, Workspace], Tensor]] = {
    _BRIGHTNESS: _brightness_,
    _CONTRAST: _contrast_,
    _SATURATION: _saturation_,
    _HUE: _hue_,
}


def _as_factor(value: float | Tensor, n: int) -> Tensor:
    return value if isinstance(value, Tensor) else torch.full((n,), float(value))


def _out_of_place(
    op: Callable[[Tensor, Tensor, Workspace], Tensor], x: Tensor, factor: float | Tensor
) -> Tensor:
    x = x.to(torch.float32, copy=True).contiguous()
    return op(x, _as_factor(factor, x.shape[0]), _default_workspace(x.device))


def adjust_brightness(x: Tensor, factor: float | Tensor) -> Tensor:
    """Per-sample ``clamp(x * f, 0, 1)``; x float ``(B, 3, H, W)`` in [0, 1], f scalar or (B,)."""
    return _out_of_place(_brightness_, x, factor)


def adjust_contrast(x: Tensor, factor: float | Tensor) -> Tensor:
    """Per-sample blend with each image's mean grey level (torchvision semantics)."""
    return _out_of_place(_contrast_, x, factor)


def adjust_saturation(x: Tensor, factor: float | Tensor) -> Tensor:
    """Per-sample blend with each image's grayscale version (torchvision semantics)."""
    return _out_of_place(_saturation_, x, factor)


def adjust_hue(x: Tensor, shift: float | Tensor) -> Tensor:
    """Per-sample HSV hue rotation by ``shift`` in [-0.5, 0.5] (torchvision semantics)."""
    return _out_of_place(_hue_, x, shift)


def solarize(x: Tensor) -> Tensor:
    """Invert pixels >= 0.5 (PIL's ``solarize(threshold=128)`` on [0, 1] data).

    ``where(x >= 0.5, 1 - x, x) == min(x, 1 - x)`` exactly; the latter is two vectorized
    kernels, where ``torch.where`` is not vectorized on the CPU.
    """
    return torch.minimum(x, 1.0 - x)


def _gaussian_matrix(sigma: Tensor, size: int, kernel: int) -> Tensor:
    """``(n, size, size)`` 1-D Gaussian blur matrices with reflect padding folded in."""
    device = sigma.device
    half = kernel // 2
    taps = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    w = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    w = w / w.sum(dim=1, keepdim=True)  # (n, K), as torchvision's Gaussian kernel
    idx = torch.arange(size, device=device)[:, None] + taps.to(torch.int64)[None, :]  # (S, K)
    idx = idx.abs()  # reflect at 0 (edge pixel not repeated, like F.pad(mode="reflect"))
    idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)
    n = sigma.shape[0]
    mat = torch.zeros(n, size, size, device=device, dtype=torch.float32)
    return mat.scatter_add_(2, idx.expand(n, size, kernel), w[:, None, :].expand(n, size, kernel))


def _blur_(x: Tensor, sigma: Tensor, kernel_size: int, ws: Workspace) -> Tensor:
    """In-place per-sample Gaussian blur of a contiguous square batch (see gaussian_blur)."""
    n, c, h, _ = x.shape
    g = _gaussian_matrix(_to_device(sigma, x.device, torch.float32), h, kernel_size)
    xh = ws.get("blur_in", (n, h, c, h), x.device)
    xh.copy_(x.permute(0, 2, 1, 3))
    return x.copy_(_separable_hc(xh, g, g, ws, "blur_").permute(0, 2, 1, 3))


def gaussian_blur(x: Tensor, sigma: float | Tensor, kernel_size: int) -> Tensor:
    """Per-sample Gaussian blur of a square float batch ``(B, C, S, S)``.

    Equal (to float rounding) to ``torchvision.transforms.v2.functional.gaussian_blur``
    with ``kernel_size`` and each image's sigma (reflect padding). Implemented as
    ``G @ x @ G^T`` with per-sample banded ``G`` that include the reflect padding: one
    batched matmul pair instead of a reflect pad + two grouped convolutions (as fast at
    32 px, faster at 224 px).
    """
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"gaussian_blur expects square images, got {h}x{w}")
    if kernel_size % 2 == 0 or kernel_size > 2 * h - 1:
        raise ValueError(f"kernel_size must be odd and < 2 * size, got {kernel_size}")
    x = x.to(torch.float32, copy=True).contiguous()
    return _blur_(x, _as_factor(sigma, n), kernel_size, _default_workspace(x.device))


def _normalize_into(x: Tensor, mean: Sequence[float], std: Sequence[float], out: Tensor) -> Tensor:
    scale = _const([1.0 / s for s in std], x).view(1, -1, 1, 1)
    shift = _const([-m / s for m, s in zip(mean, std)], x).view(1, -1, 1, 1)
    # mul + add_ rather than one addcmul with (1, 3, 1, 1) operands, whose broadcast path is
    # not vectorized.
    return torch.mul(x, scale, out=out).add_(shift)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel (computed as ``x * (1 / std) + (-mean / std)``)."""
    return _normalize_into(x, mean, std, torch.empty_like(x))


# --------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------


def _apply_subset_(
    x: Tensor, mask: Tensor, fn: Callable[..., Tensor], ws: Workspace, *args: Tensor
) -> None:
    """``x[mask] = fn(x[mask], *(a[mask] for a in args), ws)`` in place.

    ``mask`` and ``args`` are CPU tensors of leading size B. Only the selected images are
    gathered (into a workspace buffer) and processed, so the others stay bit-exact and the
    work scales with the probability; nothing happens if none is selected.
    """
    cpu_idx = mask.nonzero().squeeze(1)
    k = cpu_idx.numel()
    if k == 0:
        return
    if k == x.shape[0]:
        fn(x, *args, ws)
        return
    idx = _to_device(cpu_idx, x.device)
    sub = torch.index_select(x, 0, idx, out=ws.get("subset", (k, *x.shape[1:]), x.device, x.dtype))
    fn(sub, *(a[cpu_idx] for a in args), ws)
    x.index_copy_(0, idx, sub)


def _color_jitter_(x: Tensor, p: ViewParams, cfg: ViewConfig, ws: Workspace) -> None:
    """torchvision's ``RandomApply([ColorJitter(...)], p)`` for every image, in place.

    With ``cfg.cj_random_order`` each image gets its own random order of the four ops, as
    torchvision's ColorJitter draws ``randperm(4)`` per call; otherwise the order is
    brightness, contrast, saturation, hue. Without clipping to [0, 1] the four ops commute
    (each is ``x -> a x + b (1, 1, 1)``, a > 0, or a hue rotation, which is invariant under
    such maps), so the order only changes clipped pixels -- but those are common at
    SimCLR's strengths, hence the random order by default.

    Batched: the selected images are gathered once into a workspace buffer; for each of
    the 4 order slots the buffer is re-sorted (one ``index_select``) so that the images
    applying the same op in that slot are contiguous, and each op runs once on its slice;
    one ``index_copy_`` writes the result back. That is 2-5 index ops per view instead of a
    gather + scatter per (slot, op) group (16 + 16), with identical output.
    """
    strengths = (cfg.cj_bright, cfg.cj_contrast, cfg.cj_sat, cfg.cj_hue)
    active = [strengths[op] > 0 for op in range(4)]  # torchvision skips 0-strength ops
    sel = p.cj_apply.nonzero().squeeze(1)
    if not any(active) or sel.numel() == 0:
        return
    k = sel.numel()
    order = p.cj_order[sel] if cfg.cj_random_order else torch.arange(4).expand(k, 4)
    factors = p.cj_factors[sel]
    rows = torch.arange(k)  # rows[i]: which selected image buffer row i holds
    names = ["cj_a", "cj_b"]  # ping-pong scratch buffers; names[0] holds buf
    buf = torch.index_select(
        x, 0, _to_device(sel, x.device), out=ws.get(names[0], (k, *x.shape[1:]), x.device, x.dtype)
    )
    for slot in range(4):
        ops = order[rows, slot]
        resort = torch.argsort(ops, stable=True)
        if not torch.equal(resort, torch.arange(k)):
            names.reverse()
            buf = torch.index_select(
                buf,
                0,
                _to_device(resort, x.device),
                out=ws.get(names[0], buf.shape, x.device, x.dtype),
            )
            rows, ops = rows[resort], ops[resort]
        counts = torch.bincount(ops, minlength=4).tolist()
        start = 0
        for op in range(4):
            stop = start + counts[op]
            if active[op] and stop > start:
                _JITTER_OPS[op](buf[start:stop], factors[rows[start:stop], op], ws)
            start = stop
    x.index_copy_(0, _to_device(sel[rows], x.device), buf)


def _augment_hc(
    xh: Tensor, value_scale: float, cfg: ViewConfig, params: ViewParams, ws: Workspace
) -> Tensor:
    """One view from an input already in ``(B, H, C, W)`` float layout (see augment_view)."""
    x = _crop_hc(
        xh, value_scale, params.boxes, cfg.size, params.flip, cfg.interpolation, cfg.antialias, ws
    )
    _color_jitter_(x, params, cfg, ws)
    _apply_subset_(x, params.gray, _grayscale_, ws)
    kernel = blur_kernel_size(cfg)

    def blur(sub: Tensor, sigma: Tensor, ws_: Workspace) -> Tensor:
        return _blur_(sub, sigma, kernel, ws_)

    blur_step = (params.blur, blur, params.blur_sigma)
    sol_step = (params.solarize, _solarize_)
    for mask, fn, *args in (
        (sol_step, blur_step) if cfg.solarize_before_blur else (blur_step, sol_step)
    ):
        _apply_subset_(x, mask, fn, ws, *args)
    out = torch.empty_like(x)  # fresh memory: returned to the caller
    return _normalize_into(x, cfg.mean, cfg.std, out)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")


@torch.no_grad()
def augment_view(
    images: Tensor,
    cfg: ViewConfig,
    generator: torch.Generator | None = None,
    params: ViewParams | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """One augmented, normalized view ``(B, 3, S, S)`` float32 of a uint8 batch.

    Args:
        images: ``(B, 3, H, W)`` uint8 (or float in [0, 1]) on any device.
        cfg: The view's configuration.
        generator: CPU generator for the random parameters (default: torch's global one).
        params: Pre-drawn parameters (from ``sample_view_params``); then no randomness is
            drawn.
        workspace: Scratch memory to reuse across calls (see ``Workspace``).
    """
    _check_images(images)
    n, _, height, width = images.shape
    if params is None:
        params = sample_view_params(n, height, width, cfg, generator)
    ws = workspace if workspace is not None else _default_workspace(images.device)
    xh, value_scale = _to_hc_layout(images, ws)
    return _augment_hc(xh, value_scale, cfg, params, ws)


def _batch_rows(n: int, rows: tuple[int, int] | None, total: int | None) -> tuple[int, int, int]:
    """``(start, stop, total)`` of ``n`` images that are rows ``rows`` of a batch of ``total``.

    Raises:
        ValueError: ``rows`` does not hold ``n`` rows of ``range(total)``.
    """
    if rows is not None and total is None:
        raise ValueError("rows needs total, the size of the whole batch")
    start, stop = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
    total = n if total is None else int(total)
    if stop - start != n or not 0 <= start <= stop <= total:
        raise ValueError(
            f"rows {(start, stop)} of a batch of {total} images do not describe the {n} images "
            "given"
        )
    return start, stop, total


class MultiViewAugment(nn.Module):
    """Augment a uint8 batch into several views, each image with its own random parameters.

    Example::

        aug = MultiViewAugment(method_views("byol", 32))
        gen = torch.Generator().manual_seed(0)
        view1, view2 = aug(images_uint8.cuda(), generator=gen)

    The module has no parameters or buffers. ``generator`` (a CPU generator) makes the
    output reproducible; checkpoint ``generator.get_state()`` to resume a run exactly.
    On the CPU the module keeps its scratch tensors between calls (``cache_scratch``,
    default: only for CPU inputs, see ``Workspace``), so one instance must not be called
    from several threads at once.
    """

    def __init__(self, views: Sequence[ViewConfig], cache_scratch: bool | None = None) -> None:
        super().__init__()
        if not views:
            raise ValueError("need at least one ViewConfig")
        self.views: tuple[ViewConfig, ...] = tuple(views)
        self.cache_scratch = cache_scratch
        self._workspace = Workspace(cache=True)

    @classmethod
    def from_method(cls, method: str, image_size: int, **kwargs: Any) -> MultiViewAugment:
        """Shortcut for ``MultiViewAugment(method_views(method, image_size, **kwargs))``."""
        return cls(method_views(method, image_size, **kwargs))

    def _workspace_for(self, device: torch.device) -> Workspace:
        cache = device.type == "cpu" if self.cache_scratch is None else self.cache_scratch
        return self._workspace if cache else Workspace(cache=False)

    @torch.no_grad()
    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        rows: tuple[int, int] | None = None,
        total: int | None = None,
    ) -> list[Tensor]:
        """Return ``[view_0, view_1, ...]``, each ``(B, 3, S_i, S_i)`` float32, contiguous.

        The parameters of all views are drawn first (view by view, from ``generator``),
        then the input is converted to float once and shared by the views.

        Args:
            images: ``(B, 3, H, W)`` uint8 (or float in [0, 1]): a whole batch, or with
                ``rows`` and ``total`` the rows ``[start, stop)`` of a batch of ``total``
                images (``B = stop - start``).
            generator: CPU generator for the random parameters (default: torch's global one).
            rows: ``(start, stop)``: which rows of the batch ``images`` holds (default
                ``(0, B)``); needs ``total``.
            total: the size of the whole batch (default ``B``). The parameters are drawn
                for all ``total`` images, exactly as a call on the whole batch draws them
                (same generator use), and only rows ``[start, stop)`` are augmented: the
                views equal rows ``[start, stop)`` of the views of the whole batch, up to
                float32 rounding (every op works image by image; the same parameters are
                applied, the kernels may differ with the number of rows). What a
                process of a multi-process run uses to augment only its shard of the
                global batch.
        """
        _check_images(images)
        n, _, height, width = images.shape
        start, stop, total = _batch_rows(n, rows, total)
        params = [sample_view_params(total, height, width, cfg, generator) for cfg in self.views]
        if (start, stop) != (0, total):
            params = [slice_view_params(p, start, stop) for p in params]
        ws = self._workspace_for(images.device)
        xh, value_scale = _to_hc_layout(images, ws)
        return [_augment_hc(xh, value_scale, cfg, p, ws) for cfg, p in zip(self.views, params)]

    def extra_repr(self) -> str:
        return "\n".join(repr(v) for v in self.views)


# --------------------------------------------------------------------------------------
# The views of a method
# --------------------------------------------------------------------------------------


def method_views(
    method: str,
    image_size: int,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    n_local_views: int = 6,
) -> list[ViewConfig]:
    """The views method ``method`` trains on at ``image_size``: its
    :meth:`~or_core.methods.base.SSLMethod.views`, lightly 1.6's transform for the method.

    ``method`` is a registered method name or alias, compared loosely (``"moco"``,
    ``"MoCo-v2"`` and ``"mocov2"`` are MoCo v2). Small images (``image_size <= 64``) get no
    Gaussian blur and, unless ``mean``/``std`` are given, the CIFAR-10 statistics; multi-crop
    methods (DINO, SwaV) add ``n_local_views`` local crops.

    Raises:
        ValueError: unknown method (the message lists the valid ones).
    """
    from or_core.methods import find_method  # the methods build on this module

    return find_method(method).views(image_size, mean=mean, std=std, n_local_views=n_local_views)
