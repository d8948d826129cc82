"""Tests of or_core.augment against torchvision / lightly, on real CIFAR-10 images."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from or_core import augment as A
from or_core.augment import MultiViewAugment, ViewConfig, ViewParams
from or_core.methods import available_methods

NUM_IMAGES = 16
# The registered methods: method_views gives each one's views.
METHOD_NAMES = available_methods()

# All ops off, the whole image kept: the pipeline reduces to uint8 -> [0, 1] -> normalize.
IDENTITY = ViewConfig(
    size=32,
    min_scale=1.0,
    max_scale=1.0,
    hflip_prob=0.0,
    cj_prob=0.0,
    gray_prob=0.0,
    blur_prob=0.0,
    solarize_prob=0.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)


@pytest.fixture(scope="module")
def images(cifar10_dir: Path) -> torch.Tensor:
    """uint8 (16, 3, 32, 32): the first files of several CIFAR-10 training classes."""
    files = []
    for class_dir in sorted((cifar10_dir / "train").iterdir())[:8]:
        files += sorted(class_dir.glob("*.jpg"))[:2]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[:NUM_IMAGES]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def floats(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def identity_params(n: int, height: int = 32, width: int = 32, **overrides) -> ViewParams:
    """Parameters that keep every image unchanged; ``overrides`` replace fields."""
    fields = dict(
        boxes=torch.tensor([[0, 0, height, width]]).repeat(n, 1),
        flip=torch.zeros(n, dtype=torch.bool),
        cj_apply=torch.zeros(n, dtype=torch.bool),
        cj_factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1),
        cj_order=torch.arange(4).repeat(n, 1),
        gray=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool),
        blur_sigma=torch.ones(n, dtype=torch.float64),
        solarize=torch.zeros(n, dtype=torch.bool),
    )
    fields.update(overrides)
    return ViewParams(**fields)


def per_image(fn, x: torch.Tensor, values) -> torch.Tensor:
    """Apply a single-image torchvision function with one value per image."""
    return torch.stack([fn(img, float(v)) for img, v in zip(x, values)])


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def test_views_have_the_configured_shapes_dtype_and_range(images):
    views = A.method_views("byol", 32)
    out = MultiViewAugment(views)(images, generator=torch.Generator().manual_seed(0))
    assert len(out) == 2
    for view, cfg in zip(out, views):
        assert view.shape == (NUM_IMAGES, 3, 32, 32) and view.dtype == torch.float32
        assert view.is_contiguous() and torch.isfinite(view).all()
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        pixels = view * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    multi = MultiViewAugment(A.method_views("dino", 32))(images)
    assert [v.shape[-1] for v in multi] == [32, 32] + [16] * 6


def test_all_ops_off_and_full_scale_is_the_normalized_input(images, floats):
    out = MultiViewAugment([IDENTITY])(images)[0]
    torch.testing.assert_close(out, floats, atol=1e-6, rtol=0)
    cfg = replace(IDENTITY, mean=A.CIFAR10_MEAN, std=A.CIFAR10_STD)
    expected = TF.normalize(floats, list(A.CIFAR10_MEAN), list(A.CIFAR10_STD))
    torch.testing.assert_close(A.augment_view(images, cfg), expected, atol=1e-5, rtol=0)
    # float input in [0, 1] goes the same way
    torch.testing.assert_close(A.augment_view(floats, cfg), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
BOXES = torch.tensor([[2, 3, 20, 25], [0, 0, 32, 32], [5, 1, 7, 30], [10, 10, 3, 3]])


@pytest.mark.parametrize("size", [32, 24, 8])
@pytest.mark.parametrize("antialias", [False, True])
def test_crop_of_known_box_equals_torchvision_resized_crop(images, floats, size, antialias):
    n = BOXES.shape[0]
    out = A.resized_crop(images[:n], BOXES, size, antialias=antialias)
    expected = torch.stack(
        [
            TF.resized_crop(floats[i], *BOXES[i].tolist(), [size, size], antialias=antialias)
            for i in range(n)
        ]
    )
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_bicubic_crop_equals_torchvision_antialiased_bicubic(images, floats):
    n = BOXES.shape[0]
    out = A.resized_crop(images[:n], BOXES, 16, interpolation="bicubic", antialias=True)
    expected = torch.stack(
        [
            TF.resized_crop(
                floats[i], *BOXES[i].tolist(), [16, 16], T.InterpolationMode.BICUBIC, antialias=True
            )
            for i in range(n)
        ]
    ).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_flip_mirrors_exactly(images):
    n = BOXES.shape[0]
    flip = torch.tensor([True, False, True, True])
    plain = A.resized_crop(images[:n], BOXES, 24)
    flipped = A.resized_crop(images[:n], BOXES, 24, flip=flip)
    assert torch.equal(flipped[flip], plain[flip].flip(-1))
    assert torch.equal(flipped[~flip], plain[~flip])


def test_identical_images_in_a_batch_get_different_crops(images):
    batch = images[:1].repeat(8, 1, 1, 1)
    cfg = replace(A.method_views("byol", 32)[0], cj_prob=0.0, gray_prob=0.0)
    out = A.augment_view(batch, cfg, torch.Generator().manual_seed(1))
    distinct = {tuple(v.flatten()[:64].tolist()) for v in out}
    assert len(distinct) == 8
    boxes = A.sample_view_params(8, 32, 32, cfg, torch.Generator().manual_seed(1)).boxes
    assert len({tuple(b.tolist()) for b in boxes}) > 1


def _torchvision_boxes(n: int, size: tuple[int, int], scale, ratio, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    img = torch.empty(3, *size)
    return torch.tensor([T.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])


@pytest.mark.parametrize("size", [(32, 32), (480, 400)])
def test_crop_scale_and_ratio_statistics_match_torchvision(size):
    height, width = size
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = A.sample_crop_boxes(20000, height, width, scale, ratio, torch.Generator().manual_seed(0))
    ref = _torchvision_boxes(4000, size, scale, ratio, seed=0)
    for boxes in (ours, ref):
        top, left, h, w = boxes.T
        assert (
            (top >= 0).all()
            and (left >= 0).all()
            and (top + h <= height).all()
            and (left + w <= width).all()
        )
    top, left, h, w = ours.double().T
    area = h * w / (height * width)
    log_ratio = torch.log(w / h)
    if height > 100:  # negligible pixel rounding: the configured ranges hold
        assert area.min() >= scale[0] * 0.98 and area.max() <= 1.0
        assert (
            log_ratio.min() >= math.log(ratio[0]) - 0.01
            and log_ratio.max() <= math.log(ratio[1]) + 0.01
        )
        assert area.min() < 0.1 and area.max() > 0.95  # the whole range is used
    r_top, r_left, r_h, r_w = ref.double().T
    r_area = r_h * r_w / (height * width)
    assert abs(area.mean() - r_area.mean()) < 0.02
    assert abs(log_ratio.mean() - torch.log(r_w / r_h).mean()) < 0.02
    # positions uniform over the free range
    free = (height - h + 1).clamp(min=1)
    assert abs(((top + 0.5) / free).mean() - 0.5) < 0.02


def test_crop_fallback_is_torchvision_central_crop():
    # no 4:1..5:1 crop of a square image fits at 90 % of its area: always the fallback
    ours = A.sample_crop_boxes(50, 40, 40, (0.9, 1.0), (4.0, 5.0), torch.Generator().manual_seed(0))
    ref = _torchvision_boxes(1, (40, 40), (0.9, 1.0), (4.0, 5.0), seed=0)
    assert (ours == ref).all()


# ----------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------
def test_grayscale_equals_torchvision_and_only_hits_selected_images(images, floats):
    gray = torch.zeros(NUM_IMAGES, dtype=torch.bool)
    gray[::3] = True
    out = A.augment_view(images, IDENTITY, params=identity_params(NUM_IMAGES, gray=gray))
    expected = TF.rgb_to_grayscale(floats[gray], num_output_channels=3)
    torch.testing.assert_close(out[gray], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[~gray], floats[~gray], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        A.rgb_to_grayscale(floats), TF.rgb_to_grayscale(floats), atol=1e-6, rtol=0
    )


def test_solarize_matches_its_definition(images, floats):
    expected = torch.where(floats >= 0.5, 1.0 - floats, floats)
    assert torch.equal(A.solarize(floats), expected)
    sol = torch.zeros(NUM_IMAGES, dtype=torch.bool)
    sol[1::2] = True
    out = A.augment_view(images, IDENTITY, params=identity_params(NUM_IMAGES, solarize=sol))
    x = A.resized_crop(images, identity_params(NUM_IMAGES).boxes, 32)
    assert torch.equal(out[sol], torch.where(x[sol] >= 0.5, 1.0 - x[sol], x[sol]))
    assert torch.equal(out[~sol], x[~sol])


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (A.adjust_brightness, TF.adjust_brightness),
        (A.adjust_contrast, TF.adjust_contrast),
        (A.adjust_saturation, TF.adjust_saturation),
    ],
)
def test_brightness_contrast_saturation_equal_torchvision_per_sample(floats, ours, theirs):
    factors = torch.linspace(0.0, 1.9, NUM_IMAGES)  # a different factor for every image
    expected = per_image(theirs, floats, factors)
    torch.testing.assert_close(ours(floats, factors), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(floats, 1.3), theirs(floats, 1.3), atol=1e-6, rtol=0)
    assert not torch.allclose(expected[3], theirs(floats[3], float(factors[4])))


def test_hue_shift_equals_torchvision_adjust_hue(floats):
    shifts = torch.linspace(-0.5, 0.5, NUM_IMAGES)
    x = floats.clone()
    x[0, :, :4, :] = 0.3  # grey pixels
    x[1, 0, :4, :] = x[1, 1, :4, :]  # ties of the max channel (R == G)
    expected = per_image(TF.adjust_hue, x, shifts)
    torch.testing.assert_close(A.adjust_hue(x, shifts), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.adjust_hue(x, 0.0), x, atol=1e-6, rtol=0)


def test_color_jitter_applies_each_images_own_random_order(images, floats):
    """Images with different op orders equal torchvision's ops applied in that order."""
    n = 8
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] * 2)
    factors = torch.tensor(
        [[1.7, 0.5, 1.8, 0.3], [0.3, 1.6, 0.2, -0.2]], dtype=torch.float64
    ).repeat(4, 1)
    apply = torch.tensor([True] * 7 + [False])
    cfg = replace(IDENTITY, cj_prob=0.8, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.4)
    params = identity_params(n, cj_apply=apply, cj_factors=factors, cj_order=orders)
    out = A.augment_view(images[:n], cfg, params=params)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        img = floats[i]
        if apply[i]:
            for op in orders[i].tolist():
                img = ops[op](img, float(factors[i, op]))
        torch.testing.assert_close(out[i], img, atol=2e-5, rtol=0)
    fixed = A.augment_view(images[:n], replace(cfg, cj_random_order=False), params=params)
    assert not torch.allclose(fixed[1], out[1], atol=1e-3)  # the order matters (clipping)


def test_blur_equals_torchvision_gaussian_blur(images, floats):
    sigmas = torch.linspace(0.1, 2.0, NUM_IMAGES, dtype=torch.float64)
    expected = torch.stack(
        [TF.gaussian_blur(img, [13, 13], [float(s)] * 2) for img, s in zip(floats, sigmas)]
    )
    torch.testing.assert_close(A.gaussian_blur(floats, sigmas, 13), expected, atol=2e-6, rtol=0)
    blur = torch.arange(NUM_IMAGES) % 2 == 0
    cfg = replace(IDENTITY, blur_prob=0.5, blur_sigmas=(0.1, 2.0))
    assert A.blur_kernel_size(cfg) == 13  # +-3 sigma of the widest blur
    assert A.blur_kernel_size(replace(cfg, size=4)) == 7  # reflect padding stays < size
    out = A.augment_view(
        images, cfg, params=identity_params(NUM_IMAGES, blur=blur, blur_sigma=sigmas)
    )
    torch.testing.assert_close(out[blur], expected[blur], atol=2e-6, rtol=0)
    torch.testing.assert_close(out[~blur], floats[~blur], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_views_other_seed_other_views(images):
    augment = MultiViewAugment(A.method_views("simclr", 32))
    first = augment(images, generator=torch.Generator().manual_seed(7))
    second = augment(images, generator=torch.Generator().manual_seed(7))
    third = augment(images, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], third[0])


def test_resuming_from_a_saved_generator_state_continues_the_stream(images):
    augment = MultiViewAugment(A.method_views("byol", 32))
    gen = torch.Generator().manual_seed(3)
    augment(images, generator=gen)
    state = gen.get_state()
    expected = augment(images, generator=gen)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, augment(images, generator=resumed)))


def test_ops_fire_with_their_probabilities():
    cfg = ViewConfig(
        size=32, hflip_prob=0.5, cj_prob=0.8, gray_prob=0.2, blur_prob=0.1, solarize_prob=0.3
    )
    p = A.sample_view_params(20000, 32, 32, cfg, torch.Generator().manual_seed(0))
    for mask, prob in (
        (p.flip, 0.5),
        (p.cj_apply, 0.8),
        (p.gray, 0.2),
        (p.blur, 0.1),
        (p.solarize, 0.3),
    ):
        assert abs(mask.double().mean().item() - prob) < 0.015
    low, high = p.cj_factors.min(0).values, p.cj_factors.max(0).values
    assert torch.allclose(low, torch.tensor([0.6, 0.6, 0.8, -0.1], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(high, torch.tensor([1.4, 1.4, 1.2, 0.1], dtype=torch.float64), atol=1e-3)
    assert (p.blur_sigma >= 0.1).all() and (p.blur_sigma <= 2.0).all()
    assert (p.cj_order.sort(dim=1).values == torch.arange(4)).all()  # permutations
    assert len({tuple(o) for o in p.cj_order.tolist()}) == 24


def test_repeated_calls_do_not_overwrite_earlier_views(images):
    """The CPU scratch memory is reused between calls; returned views must not alias it."""
    augment = MultiViewAugment(A.method_views("swav", 32, n_local_views=2))
    first = augment(images, generator=torch.Generator().manual_seed(0))
    kept = [v.clone() for v in first]
    augment(images[:5], generator=torch.Generator().manual_seed(1))  # other batch size
    augment(images, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    fresh = MultiViewAugment(A.method_views("swav", 32, n_local_views=2), cache_scratch=False)
    again = fresh(images, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ----------------------------------------------------------------------------------------------
# Rows of a batch (each process of a multi-process run augments only its shard)
# ----------------------------------------------------------------------------------------------
BATCH_ROWS = [(0, 32), (0, 16), (16, 32), (5, 13), (31, 32), (0, 1)]


@pytest.fixture(scope="module")
def imagenette_images(imagenette_dir: Path) -> torch.Tensor:
    """uint8 (32, 3, 64, 64): the first 4 Imagenette-64 training files of 8 classes."""
    files = []
    for class_dir in sorted((imagenette_dir / "train").iterdir())[:8]:
        files += sorted(class_dir.iterdir())[:4]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _ops_hit_some_but_not_all(views: list[ViewConfig], n: int, generator: torch.Generator) -> set[str]:
    """The ops (blur, solarize, gray, colour jitter) that hit some but not all of ``n`` images."""
    hit = set()
    for cfg in views:
        p = A.sample_view_params(n, 64, 64, cfg, generator)
        for name in ("blur", "solarize", "gray", "cj_apply"):
            if 0 < int(getattr(p, name).sum()) < n:
                hit.add(name)
    return hit


# Rows [a, b) augmented alone and the whole batch run the same per-image arithmetic, except in
# the matrix products over images: the crop's and the blur's batched products and the contrast's
# grey levels (channel means of the k images it hits @ the luma weights). BLAS kernels may block
# such work by the number of images, so an entry can be summed in another order: on an AVX-512
# Xeon, MKL's matrix-vector kernel rounds a row differently for some k (1 ulp; whatever
# ATEN_CPU_CAPABILITY and the thread count), while its batched products did not change. The
# entries are pixel values (<= 1: every row of weights sums to 1, non-negative but for bicubic's
# lobes), so each is off by a few float32 ulps of 1 (eps = 1.2e-7). The ops after a product are
# elementwise or per image: they pass such a difference on, scaled by their slope (jitter
# factors up to 1.8, the contrast and saturation blends |f| + |1 - f| <= 2.6, the hue rotation
# more where the chroma is small), and may round the result differently once more.
# Normalization multiplies pixels by 1 / std (up to 4.5) and rounds twice at the output's
# magnitude |v| (up to 2.7). Hence, per value,
#     |rows - whole| <= ROW_EPS * eps * (1 / std_c + |v|),   ROW_EPS = 32,
# 32 eps in pixel units (a few ulps per product, times the slopes) plus 32 at the output.
# Measured on that Xeon (torch 2.14.1, BATCH_ROWS below, 0.4-1.6 % of the values differing): at
# most 1.3 eps for BYOL, 3.3 for DINO and SwAV (bicubic, strong hue jitter), 0.1 of the bound.
# A wrong parameter moves values by ~1: the controls below (another random stream, the
# neighbouring rows' parameters) are ~2e5 times the bound.
ROW_EPS = 32


def _rounding_ratio(part: list[torch.Tensor], whole: list[torch.Tensor], views: list[ViewConfig], a: int, b: int) -> float:
    """``max |part - whole[a:b]| / (ROW_EPS eps (1 / std_c + |whole|))`` over all views and values."""
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    for p, w, cfg in zip(part, whole, views, strict=True):
        w = w[a:b].double()
        bound = ROW_EPS * eps * (1.0 / torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1) + w.abs())
        worst = max(worst, ((p.double() - w).abs() / bound).max().item())
    return worst


def _record_applied_params(monkeypatch: pytest.MonkeyPatch) -> list[ViewParams]:
    """The parameters MultiViewAugment applies, view by view, appended to the returned list (a spy
    on its per-view function ``A._augment_hc``)."""
    applied: list[ViewParams] = []
    augment_hc = A._augment_hc

    def spy(xh, value_scale, cfg, params, ws):
        applied.append(params)
        return augment_hc(xh, value_scale, cfg, params, ws)

    monkeypatch.setattr(A, "_augment_hc", spy)
    return applied


def _same_params(part: list[ViewParams], whole: list[ViewParams], a: int, b: int) -> bool:
    """Whether ``part`` are rows [a, b) of ``whole``, every field of every view equal (exactly:
    the same draws from the same generator, on the CPU)."""
    return len(part) == len(whole) and all(
        torch.equal(p, w[a:b]) for pv, wv in zip(part, whole) for p, w in zip(pv, wv, strict=True)
    )


@pytest.mark.parametrize("method", ["byol", "dino", "swav"])  # blur + solarize; multi-crop, bicubic
def test_rows_of_a_batch_equal_those_rows_of_the_whole_batch_to_float32_rounding(imagenette_images, method, monkeypatch):
    """Views of rows [a, b) with the parameters drawn for the whole batch are rows [a, b) of the
    whole batch's views: the very parameters (crops, flips, jitter, blur, ...) of those rows,
    values within ROW_EPS float32 ulps (above), and the generator ends where a whole-batch call
    leaves it. Another random stream, or the parameters of the neighbouring rows, fail both."""
    images, seed = imagenette_images, 5
    views = A.method_views(method, 80)  # above 64 px: the blur is on
    n = images.shape[0]
    assert {"blur", "gray", "cj_apply"} <= _ops_hit_some_but_not_all(views, n, torch.Generator().manual_seed(seed))
    if method != "swav":
        assert "solarize" in _ops_hit_some_but_not_all(views, n, torch.Generator().manual_seed(seed))
    applied = _record_applied_params(monkeypatch)
    augment = MultiViewAugment(views)
    generator = torch.Generator().manual_seed(seed)
    whole = augment(images, generator=generator)
    whole_params, after_whole = applied[:], generator.get_state()
    assert len(whole_params) == len(views)
    for a, b in BATCH_ROWS:
        applied.clear()
        generator = torch.Generator().manual_seed(seed)
        rows = augment(images[a:b], generator=generator, rows=(a, b), total=n)
        assert [v.shape[0] for v in rows] == [b - a] * len(views)
        assert _same_params(applied, whole_params, a, b), (a, b)
        ratio = _rounding_ratio(rows, whole, views, a, b)
        assert ratio <= 1, f"rows {(a, b)}: {ratio:.3g} times the float32 rounding bound"
        assert torch.equal(generator.get_state(), after_whole)

    # Negative controls: rows [0, 16) from another random stream, and with the parameters of
    # rows [1, 17) (an off-by-one shard): other parameters, and values far outside the bound.
    for seed_, rows_ in ((seed + 1, (0, 16)), (seed, (1, 17))):
        applied.clear()
        wrong = augment(images[0:16], generator=torch.Generator().manual_seed(seed_), rows=rows_, total=n)
        assert not _same_params(applied, whole_params, 0, 16)
        assert _rounding_ratio(wrong, whole, views, 0, 16) > 1e3, (seed_, rows_)


def test_rows_must_describe_the_images_given(imagenette_images):
    augment = MultiViewAugment(A.method_views("byol", 64))
    images = imagenette_images[:8]
    with pytest.raises(ValueError, match="needs total"):
        augment(images, rows=(0, 8))
    for rows, total in (((0, 7), 16), ((10, 18), 16), ((-1, 7), 16)):
        with pytest.raises(ValueError, match="do not describe the 8 images"):
            augment(images, rows=rows, total=total)
    # without rows the images are the first rows of the batch
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first = augment(images, generator=gen_a, total=16)
    again = augment(images, generator=gen_b, rows=(0, 8), total=16)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


# ----------------------------------------------------------------------------------------------
# Per-method recipes
# ----------------------------------------------------------------------------------------------
def _lightly_transforms(method: str) -> list:
    from lightly.transforms import (
        BYOLTransform,
        DINOTransform,
        MoCoV2Transform,
        SimCLRTransform,
        SimSiamTransform,
        SwaVTransform,
        VICRegTransform,
        WMSETransform,
    )
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

    if method == "ressl":  # lightly has no ReSSL transform: its two views from BYOL's, as set
        strong = BYOLView1Transform(gaussian_blur=0.5)  # solo-learn augmentations/ressl.yaml
        weak = BYOLView2Transform(cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0,
                                  solarization_prob=0.0)
        return [strong, weak]
    if method == "vibcreg":  # solo-learn vibcreg.yaml: VICReg's views at scale (0.2, 1), no blur
        return list(VICRegTransform(min_scale=0.2, gaussian_blur=0.0).transforms)
    cls = {
        "all4one": BYOLTransform,
        "byol": BYOLTransform,
        "byol_whitening": BYOLTransform,
        "barlowtwins": BYOLTransform,
        "deepclusterv2": SimCLRTransform,
        "simclr": SimCLRTransform,
        "nnclr": SimCLRTransform,
        "mocov2": MoCoV2Transform,
        "mocov3": BYOLTransform,
        "nnbyol": BYOLTransform,
        "nnsiam": BYOLTransform,
        "simsiam": SimSiamTransform,
        "vicreg": VICRegTransform,
        "wmse": WMSETransform,
        "dino": DINOTransform,
        "swav": SwaVTransform,
    }[method]
    return list(cls().transforms)


def _describe_lightly(view) -> dict:
    """The parameters of one lightly view transform (a nest of Compose / .transform)."""
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.solarize import RandomSolarization

    found: dict = {"blur_prob": 0.0, "solarize_prob": 0.0, "order": []}

    def walk(t) -> None:
        if isinstance(t, T.Compose):
            for inner in t.transforms:
                walk(inner)
        elif isinstance(t, T.RandomResizedCrop):
            found.update(
                size=t.size[0],
                scale=tuple(t.scale),
                ratio=tuple(t.ratio),
                interpolation=getattr(t.interpolation, "value", t.interpolation),
            )
        elif isinstance(t, T.RandomHorizontalFlip):
            found["hflip_prob"] = t.p
        elif isinstance(t, T.RandomApply):
            (jitter,) = t.transforms
            found["cj_prob"] = t.p
            found["cj"] = (
                jitter.brightness[1] - 1,
                jitter.contrast[1] - 1,
                jitter.saturation[1] - 1,
                jitter.hue[1],
            )
        elif isinstance(t, T.RandomGrayscale):
            found["gray_prob"] = t.p
        elif isinstance(t, GaussianBlur):
            found.update(blur_prob=t.prob, blur_sigmas=tuple(t.sigmas))
            found["order"].append("blur")
        elif isinstance(t, RandomSolarization):
            found["solarize_prob"] = t.prob
            found["order"].append("solarize")
        elif isinstance(t, T.Normalize):
            found.update(mean=tuple(t.mean), std=tuple(t.std))
        elif not isinstance(t, T.Transform) and hasattr(t, "transform"):  # lightly's view classes
            walk(t.transform)

    walk(view)
    return found


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_views_equal_lightlys_transform_defaults(method):
    pytest.importorskip("lightly")
    views = A.method_views(method, 224)
    lightly_views = _lightly_transforms(method)
    assert len(views) == len(lightly_views)
    for ours, theirs in zip(views, lightly_views):
        ref = _describe_lightly(theirs)
        assert ours.size == ref["size"]
        assert (ours.min_scale, ours.max_scale) == pytest.approx(ref["scale"])
        assert (ours.min_ratio, ours.max_ratio) == pytest.approx(ref["ratio"])
        assert ours.interpolation == ref["interpolation"]
        assert ours.hflip_prob == ref["hflip_prob"] and ours.gray_prob == ref["gray_prob"]
        assert ours.cj_prob == ref["cj_prob"]
        assert (ours.cj_bright, ours.cj_contrast, ours.cj_sat, ours.cj_hue) == pytest.approx(
            ref["cj"]
        )
        assert ours.blur_prob == ref["blur_prob"] and ours.solarize_prob == ref["solarize_prob"]
        if ref["blur_prob"] > 0:
            assert ours.blur_sigmas == pytest.approx(ref["blur_sigmas"])
        if ref["blur_prob"] > 0 and ref["solarize_prob"] > 0:
            assert ours.solarize_before_blur == (ref["order"] == ["solarize", "blur"])
        assert ours.mean == pytest.approx(ref["mean"]) and ours.std == pytest.approx(ref["std"])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_views_for_cifar_sized_images(images, method):
    views = A.method_views(method, 32)
    multi_crop = method in ("dino", "swav")
    assert len(views) == (8 if multi_crop else 2)
    assert [v.size for v in views] == [32, 32] + ([16] * 6 if multi_crop else [])
    for v in views:
        assert v.blur_prob == 0.0  # lightly's CIFAR benchmarks: no blur
        assert v.mean == A.CIFAR10_MEAN and v.std == A.CIFAR10_STD
    out = MultiViewAugment(views)(images[:4], generator=torch.Generator().manual_seed(0))
    assert [o.shape for o in out] == [(4, 3, v.size, v.size) for v in views]
    assert len(A.method_views(method, 64, n_local_views=3)) == (5 if multi_crop else 2)


def test_method_specific_defaults():
    byol = A.method_views("byol", 32)
    assert (byol[0].solarize_prob, byol[1].solarize_prob) == (0.0, 0.2)
    assert (byol[0].cj_bright, byol[0].cj_contrast, byol[0].cj_sat, byol[0].cj_hue) == (
        0.4,
        0.4,
        0.2,
        0.1,
    )
    big = A.method_views("byol", 96)
    assert (big[0].blur_prob, big[1].blur_prob) == (1.0, 0.1) and big[0].mean == A.IMAGENET_MEAN
    assert A.method_views("barlowtwins", 32) == byol
    assert A.method_views("nnclr", 32) == A.method_views("simclr", 32)
    assert A.method_views("mocov2", 32) == A.method_views("moco", 32)
    dino = A.method_views("dino", 32)
    assert (dino[0].min_scale, dino[0].max_scale, dino[2].min_scale, dino[2].max_scale) == (
        0.4,
        1.0,
        0.05,
        0.4,
    )
    assert [A.method_views("dino", s)[2].size for s in (224, 128, 96, 64)] == [96, 56, 40, 24]
    custom = A.method_views("simclr", 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert custom[0].mean == (0.5, 0.5, 0.5) and custom[0].std == (0.25, 0.25, 0.25)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        A.method_views("byl", 32)
    for name in METHOD_NAMES:
        assert name in str(error.value)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="min_scale"):
        ViewConfig(size=32, min_scale=0.5, max_scale=0.2)
    with pytest.raises(ValueError, match="cj_hue"):
        ViewConfig(size=32, cj_hue=0.7)
    with pytest.raises(ValueError, match="gray_prob"):
        ViewConfig(size=32, gray_prob=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        ViewConfig(size=32, interpolation="nearest")
    with pytest.raises(ValueError, match="B, 3, H, W"):
        MultiViewAugment([IDENTITY])(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cuda_views_equal_cpu_views(images, method):
    """One seeded generator gives the same views on CUDA as on the CPU, to float rounding:
    the parameters are drawn on the CPU and only the pixel arithmetic runs on the device."""
    augment = MultiViewAugment(A.method_views(method, 32))
    cpu = augment(images, generator=torch.Generator().manual_seed(3))
    gpu = augment(images.cuda(), generator=torch.Generator().manual_seed(3))
    assert len(gpu) == len(cpu)
    for ours, reference in zip(gpu, cpu):
        assert ours.device.type == "cuda" and ours.dtype == reference.dtype
        error = (ours.cpu() - reference).abs()
        # normalized pixels (std ~0.25): a rounding difference of 1e-3 in [0, 1] is ~4e-3 here
        assert error.max().item() < 1e-2, f"{method}: max |cuda - cpu| = {error.max().item():.2e}"
        assert error.mean().item() < 1e-4, f"{method}: mean |cuda - cpu| = {error.mean().item():.2e}"
