"""SimCLR views (Chen et al. 2020, appendix A): per-sample (torchvision v2) and batched paths."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from ssl_lightning.transforms import BatchedViews, SimCLRViews, eval_transform
from ssl_lightning.transforms.batched import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    hsv_to_rgb,
    resized_crop_flip,
    rgb_to_hsv,
    sample_crop_boxes,
)

B = 8
CROP_ONLY = SimCLRViews(hflip_p=0, jitter_p=0, grayscale_p=0)


def quiet(**overrides) -> SimCLRViews:
    """The recipe with every random op switched off (full-image crop, all probabilities 0)."""
    fields = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    return SimCLRViews(**{**fields, **overrides})


def images(b: int = B, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def identical(b: int = B, size: int = 32) -> torch.Tensor:
    return images(1, size, size).expand(b, -1, -1, -1).contiguous()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalized(x: torch.Tensor, recipe: SimCLRViews) -> torch.Tensor:
    mean = torch.tensor(recipe.mean).view(-1, 1, 1)
    std = torch.tensor(recipe.std).view(-1, 1, 1)
    return (x.float() / 255 - mean) / std


def unnormalized(y: torch.Tensor, recipe: SimCLRViews) -> torch.Tensor:
    return y * torch.tensor(recipe.std).view(-1, 1, 1) + torch.tensor(recipe.mean).view(-1, 1, 1)


def per_sample_batch(recipe: SimCLRViews, x: torch.Tensor) -> torch.Tensor:
    """The per-sample path as a DataLoader applies it: one call per image."""
    transform = recipe.per_sample()
    return torch.stack([transform(img) for img in x])


def n_distinct(views: torch.Tensor) -> int:
    return len({tuple(v.flatten().tolist()) for v in views})


# --- the recipe -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(scale=(0.5, 1.5)), "scale"),
        (dict(scale=(0.9, 0.1)), "scale"),
        (dict(ratio=(0.0, 1.0)), "ratio"),
        (dict(hflip_p=1.5), "hflip_p"),
        (dict(jitter_p=-0.1), "jitter_p"),
        (dict(grayscale_p=2.0), "grayscale_p"),
        (dict(blur_p=-1.0), "blur_p"),
        (dict(brightness=-0.4), "brightness"),
        (dict(hue=0.6), "hue"),
        (dict(size=0), "size"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
    ],
)
def test_recipe_rejects_bad_fields_by_name(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SimCLRViews(**overrides)


def test_recipe_defaults_follow_the_paper() -> None:
    r = SimCLRViews()
    assert (r.scale, r.hflip_p, r.jitter_p, r.grayscale_p, r.blur_p) == ((0.08, 1.0), 0.5, 0.8, 0.2, 0.5)
    assert (r.brightness, r.contrast, r.saturation, r.hue) == (0.4, 0.4, 0.4, 0.1)
    assert isinstance(r.batched(), BatchedViews)


# --- shapes, dtypes, normalization ---------------------------------------------------------------


def test_output_shapes_and_dtypes() -> None:
    r = SimCLRViews(size=24)
    out = r.batched()(images(4, 40, 48), gen())
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.float32
    view = r.per_sample()(images(1, 50, 40)[0])
    assert view.shape == (3, 24, 24) and view.dtype == torch.float32
    crop, box = r.worker_crop()(images(1, 50, 40)[0])
    assert crop.shape == (3, 24, 24) and crop.dtype == torch.uint8 and box.shape == (5,) and box[4] == 0
    assert r.batched()(torch.stack([crop, crop]), gen(), crop=False).shape == (2, 3, 24, 24)


@pytest.mark.parametrize("path", ["batched", "batched_no_crop", "per_sample"])
def test_no_augmentation_is_plain_normalization(path: str) -> None:
    r, x = quiet(), images()
    if path == "per_sample":
        out = per_sample_batch(r, x)
    else:
        out = r.batched()(x, gen(), crop=path == "batched")
    assert torch.allclose(out, normalized(x, r), atol=1e-5)


def test_eval_transform_center_crops_and_normalizes() -> None:
    r = SimCLRViews()
    transform = eval_transform(32, r.mean, r.std)
    x = images(1)[0]
    assert torch.allclose(transform(x), normalized(x, r), atol=1e-5)
    big = images(1, 64, 80)[0]
    assert transform(big).shape == (3, 32, 32)
    assert eval_transform(32, r.mean, r.std, resize=40)(big).shape == (3, 32, 32)


# --- per-sample randomness -------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [SimCLRViews(), CROP_ONLY], ids=["full", "crop"])
def test_batched_views_differ_between_samples_of_identical_images(recipe: SimCLRViews) -> None:
    out = recipe.batched()(identical(), gen())
    assert n_distinct(out) == B


@pytest.mark.parametrize("recipe", [SimCLRViews(), CROP_ONLY], ids=["full", "crop"])
def test_per_sample_views_differ_between_samples_of_identical_images(recipe: SimCLRViews) -> None:
    torch.manual_seed(0)
    assert n_distinct(per_sample_batch(recipe, identical())) == B


def test_distinctness_check_catches_one_parameter_set_per_batch() -> None:
    # A torchvision v2 transform called on the whole batch draws one crop for all samples.
    torch.manual_seed(0)
    assert n_distinct(CROP_ONLY.per_sample()(identical())) == 1


def test_photometric_ops_draw_per_sample_without_crop() -> None:
    r = quiet(jitter_p=1.0)
    out = r.batched()(identical(), gen(), crop=False)
    assert n_distinct(out) == B


@pytest.mark.parametrize("path", ["batched", "per_sample"])
def test_two_views_of_each_image_differ(path: str) -> None:
    r, x = SimCLRViews(), images()
    if path == "batched":
        g = gen()
        v1, v2 = r.batched()(x, g), r.batched()(x, g)
    else:
        torch.manual_seed(0)
        v1, v2 = per_sample_batch(r, x), per_sample_batch(r, x)
    assert ((v1 - v2).abs().amax(dim=(1, 2, 3)) > 0.1).all()


def test_same_seed_same_views_different_seed_different_views() -> None:
    views, x = SimCLRViews().batched(), images()
    assert torch.equal(views(x, gen(1)), views(x, gen(1)))
    assert not torch.allclose(views(x, gen(1)), views(x, gen(2)))


def test_per_sample_path_is_reproducible_from_the_global_seed() -> None:
    r, x = SimCLRViews(), images(2)
    torch.manual_seed(3)
    first = per_sample_batch(r, x)
    torch.manual_seed(3)
    assert torch.equal(first, per_sample_batch(r, x))
    torch.manual_seed(4)
    assert not torch.allclose(first, per_sample_batch(r, x))


def test_batched_path_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    SimCLRViews().batched()(images(), gen())
    assert torch.equal(torch.get_rng_state(), state)


# --- individual ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [True, False])
def test_flip_equals_torch_flip(crop: bool) -> None:
    r, x = quiet(hflip_p=1.0), images()
    out = r.batched()(x, gen(), crop=crop)
    assert torch.allclose(out, normalized(torch.flip(x, dims=[-1]), r), atol=1e-5)


@pytest.mark.parametrize("path", ["batched", "per_sample"])
def test_grayscale_gives_three_equal_channels(path: str) -> None:
    r, x = quiet(grayscale_p=1.0), images()
    out = r.batched()(x, gen()) if path == "batched" else per_sample_batch(r, x)
    rgb = unnormalized(out, r)
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
    assert not torch.allclose(out, normalized(x, r), atol=0.1)


@pytest.mark.parametrize("path", ["batched", "per_sample"])
def test_blur_only_from_blur_min_size(path: str) -> None:
    x = images()

    def run(recipe: SimCLRViews) -> torch.Tensor:
        return recipe.batched()(x, gen()) if path == "batched" else per_sample_batch(recipe, x)

    small = quiet(blur_p=1.0, blur_sigma=(1.0, 2.0), blur_min_size=96)
    assert torch.allclose(run(small), normalized(x, small), atol=1e-5)
    large = quiet(blur_p=1.0, blur_sigma=(1.0, 2.0), blur_min_size=32)
    blurred = unnormalized(run(large), large)
    assert blurred.diff(dim=-1).abs().mean() < 0.6 * (x.float() / 255).diff(dim=-1).abs().mean()


FACTORS = torch.tensor([0.0, 0.5, 0.9, 1.0, 1.3, 2.0])
SHIFTS = torch.tensor([-0.5, -0.25, -0.05, 0.0, 0.1, 0.45])


@pytest.mark.parametrize(
    "ours, reference, factors",
    [
        (adjust_brightness, TF.adjust_brightness, FACTORS),
        (adjust_contrast, TF.adjust_contrast, FACTORS),
        (adjust_saturation, TF.adjust_saturation, FACTORS),
        (adjust_hue, TF.adjust_hue, SHIFTS),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_ops_match_torchvision_per_sample(ours, reference, factors: torch.Tensor) -> None:
    x = images(len(factors), 16, 16).float() / 255
    expected = torch.stack([reference(img, float(f)) for img, f in zip(x, factors)])
    assert torch.allclose(ours(x, factors), expected, atol=1e-5)


def test_hsv_round_trip() -> None:
    x = images(4, 16, 16).float() / 255
    hsv = rgb_to_hsv(x)
    assert hsv[:, 0].min() >= 0 and hsv[:, 0].max() < 1
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-6)


def test_gaussian_blur_matches_torchvision_per_sample() -> None:
    sigmas = torch.tensor([0.1, 0.5, 1.0, 2.0])
    x = images(len(sigmas), 24, 24).float() / 255
    expected = torch.stack([TF.gaussian_blur(img, [9, 9], [float(s)] * 2) for img, s in zip(x, sigmas)])
    assert torch.allclose(gaussian_blur(x, sigmas, 9), expected, atol=1e-5)


@pytest.mark.parametrize("h, w, size", [(32, 32, 32), (48, 40, 32), (20, 30, 32), (64, 64, 16)])
def test_crop_matches_torchvision_resized_crop(h: int, w: int, size: int) -> None:
    x = images(16, h, w).float() / 255
    u = torch.rand(16, 22, generator=gen())
    boxes = sample_crop_boxes(u[:, :10], u[:, 10:20], u[:, 20:], h, w, (0.08, 1.0), (3 / 4, 4 / 3))
    flip = torch.arange(16) % 2 == 0
    expected = []
    for img, box, f in zip(x, boxes.long().tolist(), flip):
        crop = TF.resized_crop(img, *box, [size, size], antialias=False)
        expected.append(crop.flip(-1) if f else crop)
    assert torch.allclose(resized_crop_flip(x, boxes, flip, size), torch.stack(expected), atol=1e-5)


def test_crop_boxes_follow_torchvision_distribution() -> None:
    n, side, scale, ratio = 4000, 32, (0.08, 1.0), (3 / 4, 4 / 3)
    u = torch.rand(n, 22, generator=gen())
    top, left, h, w = sample_crop_boxes(u[:, :10], u[:, 10:20], u[:, 20:], side, side, scale, ratio).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(side, scale=scale, ratio=ratio)
    ref = torch.tensor([list(rrc.make_params([torch.zeros(3, side, side)]).values()) for _ in range(n)]).float()
    assert abs((h * w).mean() - (ref[:, 2] * ref[:, 3]).mean()) < 0.03 * side * side
    assert abs((w / h).log().mean() - (ref[:, 3] / ref[:, 2]).log().mean()) < 0.03
    assert abs(left.mean() - ref[:, 1].mean()) < 0.5


@pytest.mark.parametrize("h, w, ratio", [(32, 32, (10.0, 10.0)), (32, 32, (0.1, 0.1)), (20, 60, (0.75, 1.33))])
def test_crop_falls_back_to_torchvision_central_crop(h: int, w: int, ratio: tuple[float, float]) -> None:
    u = torch.full((3, 22), 0.999)
    boxes = sample_crop_boxes(u[:, :10], u[:, 10:20], u[:, 20:], h, w, (0.9, 1.0), ratio)
    expected = T.RandomResizedCrop(8, scale=(0.9, 1.0), ratio=ratio).make_params([torch.zeros(3, h, w)])
    assert boxes.tolist() == [[expected["top"], expected["left"], expected["height"], expected["width"]]] * 3


# --- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, crop, shape",
    [
        (torch.rand(2, 3, 32, 32), True, r"\(2, 3, 32, 32\)"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), True, r"\(3, 32, 32\)"),
        (torch.zeros(2, 4, 32, 32, dtype=torch.uint8), True, r"\(2, 4, 32, 32\)"),
        (torch.zeros(2, 3, 40, 40, dtype=torch.uint8), False, r"\(2, 3, 40, 40\)"),
    ],
    ids=["float", "3d", "4-channels", "uncropped"],
)
def test_bad_inputs_raise_with_the_shape(x: torch.Tensor, crop: bool, shape: str) -> None:
    with pytest.raises(ValueError, match=shape):
        SimCLRViews().batched()(x, gen(), crop=crop)


@pytest.mark.slow  # compiling takes about 20 s
def test_compiled_views_equal_eager_views() -> None:
    """``compile_views``: the same views from the compiled elementwise stages (same draws, same recipe)."""
    r = SimCLRViews(blur_min_size=32, solarize_p=0.5, per_view=({"blur_p": 1.0}, {"blur_p": 0.0}))
    x = images().repeat(2, 1, 1, 1)
    eager, boxes = r.batched().with_boxes(x, gen(), views=2)
    compiled, compiled_boxes = r.batched(compile=True).with_boxes(x, gen(), views=2)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert torch.equal(compiled_boxes, boxes)
