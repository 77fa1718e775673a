"""Pretext-task operations: rotations, jigsaw permutations and tiles, Lab colour, hole masks and loss."""

import itertools

import pytest
import torch

from ssl_lightning.losses import hidden_region_mse
from ssl_lightning.transforms.pretext import (
    ab_bin_lookup,
    ab_gamut_bins,
    ab_to_bins,
    center_mask,
    extract_tiles,
    lab_to_rgb,
    maximal_hamming_permutations,
    min_hamming_distance,
    normalize_tiles,
    random_boxes_mask,
    rgb_to_lab,
    rotate_batch,
    shuffle_tiles,
)


# ---- rotation ---------------------------------------------------------------------------------
def test_rotation_labels_match_the_rotation_applied() -> None:
    images = torch.randn(3, 2, 5, 5)
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i in range(12):
        source = images[i % 3]
        expected = source
        for _ in range(int(labels[i])):  # one quarter turn counter-clockwise: row r of the result is column W-1-r
            expected = torch.stack([expected[:, :, -1 - r] for r in range(expected.shape[-1])], dim=1)
        assert torch.equal(rotated[i], expected), i
    assert torch.equal(rotated[:3], images)
    assert not torch.equal(rotated[3:6], images)


def test_rotation_needs_square_images() -> None:
    with pytest.raises(ValueError, match=r"square.*\(2, 3, 4, 5\)"):
        rotate_batch(torch.zeros(2, 3, 4, 5))


# ---- jigsaw -----------------------------------------------------------------------------------
def _brute_force_min_distance(perms: list[tuple[int, ...]]) -> int:
    return min(sum(x != y for x, y in zip(p, q)) for p, q in itertools.combinations(perms, 2))


def test_permutation_set_is_maximally_distant_and_reported() -> None:
    perms = maximal_hamming_permutations(100, 9, seed=0)
    assert perms.shape == (100, 9) and perms.dtype == torch.int64
    rows = [tuple(p) for p in perms.tolist()]
    assert all(sorted(p) == list(range(9)) for p in rows), "not permutations of 9 tiles"
    assert len(set(rows)) == 100, "repeated permutations"
    # 6 of an upper bound of 7: at distance 8 a set of permutations of 9 has at most 9!/7! = 72 members
    assert min_hamming_distance(perms) == _brute_force_min_distance(rows) == 6
    assert torch.equal(perms, maximal_hamming_permutations(100, 9, seed=0)), "not deterministic"


@pytest.mark.parametrize("size, tiles", [(24, 4), (10, 4), (30, 9)])
def test_permutation_set_other_sizes(size: int, tiles: int) -> None:
    perms = maximal_hamming_permutations(size, tiles, seed=1)
    rows = [tuple(p) for p in perms.tolist()]
    assert len(set(rows)) == size and all(sorted(p) == list(range(tiles)) for p in rows)
    assert min_hamming_distance(perms) == _brute_force_min_distance(rows)


def test_min_hamming_distance_matches_brute_force_on_random_sets() -> None:
    generator = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(9, generator=generator) for _ in range(30)])
    assert min_hamming_distance(perms) == _brute_force_min_distance([tuple(p) for p in perms.tolist()])


def test_bad_permutation_set_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="num_permutations.*24.*25"):
        maximal_hamming_permutations(25, 4)
    with pytest.raises(ValueError, match="num_tiles.*16"):
        maximal_hamming_permutations(100, 16)


def test_tiles_come_from_their_cells_with_a_gap() -> None:
    b, size, grid, tile = 4, 32, 3, 8  # cells of 10 pixels, 2 spare pixels at the bottom/right
    images = torch.arange(b * 2 * size * size, dtype=torch.float32).view(b, 2, size, size)
    tiles = extract_tiles(images, grid, tile, torch.Generator().manual_seed(0))
    assert tiles.shape == (b, 9, 2, tile, tile)
    offsets = set()
    for s in range(b):
        for t in range(9):
            pixel = int(tiles[s, t, 0, 0, 0]) - s * 2 * size * size
            top, left = divmod(pixel, size)
            assert torch.equal(tiles[s, t], images[s, :, top : top + tile, left : left + tile])
            row, col = divmod(t, grid)  # row-major order, inside the cell up to the gap (2) + spare (2)
            assert 0 <= top - 10 * row <= 4 and 0 <= left - 10 * col <= 4, (s, t, top, left)
            offsets.add((top - 10 * row, left - 10 * col))
    assert len(offsets) > 5, "offsets are not random"


def test_tile_size_larger_than_a_cell_is_named() -> None:
    with pytest.raises(ValueError, match="tile_size.*10.*11"):
        extract_tiles(torch.zeros(1, 3, 32, 32), 3, 11, torch.Generator())


def test_shuffled_tiles_are_unpermuted_back_to_the_original() -> None:
    tiles = torch.randn(5, 9, 3, 4, 4)
    perms = maximal_hamming_permutations(100, 9)[torch.tensor([0, 7, 99, 7, 42])]
    shuffled = shuffle_tiles(tiles, perms)
    for s in range(5):
        for i in range(9):
            assert torch.equal(shuffled[s, i], tiles[s, perms[s, i]])
    assert torch.equal(shuffle_tiles(shuffled, perms.argsort(dim=1)), tiles)
    assert not torch.equal(shuffled, tiles)


def test_tiles_are_normalized_one_by_one() -> None:
    tiles = normalize_tiles(torch.rand(2, 9, 3, 5, 5) * 7 + 3)
    torch.testing.assert_close(tiles.mean(dim=(-3, -2, -1)), torch.zeros(2, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiles.std(dim=(-3, -2, -1), unbiased=False), torch.ones(2, 9), atol=1e-4, rtol=0)


# ---- Lab colour -------------------------------------------------------------------------------
# sRGB primaries in CIE Lab (D65, 2 degrees), as colour-science tables give them
KNOWN_LAB = {
    (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
    (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
    (1.0, 0.0, 0.0): (53.2408, 80.0925, 67.2032),
    (0.0, 1.0, 0.0): (87.7347, -86.1827, 83.1793),
    (0.0, 0.0, 1.0): (32.2970, 79.1875, -107.8602),
    (0.5, 0.5, 0.5): (53.3889, 0.0, 0.0),
}


@pytest.mark.parametrize("rgb", list(KNOWN_LAB), ids=str)
def test_lab_matches_reference_colours(rgb: tuple[float, float, float]) -> None:
    lab = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64).view(3, 1, 1)).flatten()
    torch.testing.assert_close(lab, torch.tensor(KNOWN_LAB[rgb], dtype=torch.float64), atol=0.02, rtol=0)


def test_lab_round_trips_rgb() -> None:
    rgb = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-9, rtol=0)
    rgb32 = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb32)), rgb32, atol=1e-4, rtol=0)


def test_lab_matches_kornia() -> None:
    from kornia import color as kornia_color  # a test dependency (the ``dev`` extra)

    rgb = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(rgb_to_lab(rgb), kornia_color.rgb_to_lab(rgb), atol=1e-3, rtol=0)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(lab_to_rgb(lab), kornia_color.lab_to_rgb(lab), atol=1e-4, rtol=0)


def test_lab_names_a_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\)"):
        rgb_to_lab(torch.zeros(2, 4, 3, 3))


def test_gamut_bins_cover_the_colours_on_a_grid_of_10() -> None:
    bins = ab_gamut_bins(10)
    assert 250 <= bins.shape[0] <= 313, bins.shape
    assert torch.equal(bins, torch.round(bins / 10) * 10)
    assert bins.min(0).values.tolist() == [-90.0, -110.0] and bins.max(0).values.tolist() == [100.0, 90.0]
    ab = rgb_to_lab(torch.rand(1, 3, 64, 64, dtype=torch.float64))[:, 1:].float()
    cells = {tuple(c) for c in (torch.round(ab / 10) * 10).permute(0, 2, 3, 1).reshape(-1, 2).tolist()}
    assert cells <= {tuple(b) for b in bins.tolist()}, "a real colour falls outside the gamut bins"


def test_ab_to_bins_is_the_nearest_bin() -> None:
    bins = ab_gamut_bins(10)
    ab = rgb_to_lab(torch.rand(2, 3, 16, 16, dtype=torch.float64))[:, 1:].float()
    ab = torch.cat([ab, torch.tensor([[[[127.0]], [[-128.0]]]]).expand(1, 2, 16, 16)])  # outside the gamut too
    index = ab_to_bins(ab, ab_bin_lookup(bins, 10), 10)
    assert index.shape == (3, 16, 16)
    for pixel, got in zip(ab.permute(0, 2, 3, 1).reshape(-1, 2), index.flatten()):
        distances = ((bins - pixel) ** 2).sum(1)
        assert distances[got] <= distances.min() + 1e-4 or torch.equal(torch.round(pixel / 10) * 10, bins[got])


# ---- inpainting -------------------------------------------------------------------------------
def test_center_mask_hides_the_central_quarter() -> None:
    mask = center_mask(2, 32, 32, 0.5, torch.device("cpu"))
    assert mask.shape == (2, 1, 32, 32) and mask.dtype == torch.bool
    assert mask.sum() == 2 * 16 * 16 and mask[:, :, 8:24, 8:24].all()


def test_random_boxes_are_per_sample_and_inside_the_image() -> None:
    mask = random_boxes_mask(16, 20, 24, 0.25, 3, torch.Generator().manual_seed(0))
    assert mask.shape == (16, 1, 20, 24)
    hidden = mask.sum(dim=(1, 2, 3))
    assert ((hidden >= 5 * 6) & (hidden <= 3 * 5 * 6)).all()  # 5x6 boxes, possibly overlapping
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1, "every sample got the same holes"
    again = random_boxes_mask(16, 20, 24, 0.25, 3, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    with pytest.raises(ValueError, match="hole_fraction"):
        random_boxes_mask(1, 8, 8, 1.5, 1, torch.Generator())


def _slow_hidden_region_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    total, count = 0.0, 0
    b, c, h, w = target.shape
    for s, ch, i, j in itertools.product(range(b), range(c), range(h), range(w)):
        if mask[s, 0, i, j]:
            total += float(prediction[s, ch, i, j] - target[s, ch, i, j]) ** 2
            count += 1
    return total / count


def test_inpainting_loss_counts_the_hole_only() -> None:
    target = torch.randn(2, 3, 6, 6)
    mask = center_mask(2, 6, 6, 0.5, torch.device("cpu"))
    outside = target + torch.randn_like(target) * ~mask
    assert hidden_region_mse(outside, target, mask) == 0
    inside = target.clone()
    inside[1, 2, 3, 3] += 1.0
    assert mask[1, 0, 3, 3] and hidden_region_mse(inside, target, mask) > 0
    prediction = torch.randn_like(target)
    assert hidden_region_mse(prediction, target, mask).item() == pytest.approx(
        _slow_hidden_region_mse(prediction, target, mask), rel=1e-5
    )
