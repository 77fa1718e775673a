"""The token-level ViT API (``TimmViT.embed / keep_patches / encode / pool``) and the shared random masks that
iBOT, DINOv2, I-JEPA, SimMIM, MSN and AIM build on."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.backbones import build_backbone, check_divisible, require_vit
from ssl_lightning.nn.masking import kept_indices, masked_count, masked_indices, random_mask, step_generator

VIT = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", **VIT, reg_tokens=2).eval()


def test_token_path_equals_forward(vit: torch.nn.Module) -> None:
    images = torch.randn(3, 3, 16, 16)
    assert vit.num_prefix_tokens == 3  # [CLS] and two registers
    tokens = vit.encode(vit.embed(images))
    assert tokens.shape == (3, 3 + 16, 32)
    torch.testing.assert_close(vit.pool(tokens), vit(images))
    torch.testing.assert_close(vit.class_token(tokens), tokens[:, 0])
    assert vit.patch_tokens(tokens).shape == (3, 16, 32)


def test_masked_patches_are_replaced_before_the_positions(vit: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = mask[1, 0] = True
    token = torch.randn(32)
    changed = images.clone()
    changed[0, :, 4:8, 4:8] += 5.0  # patch 5 of image 0 (row 1, column 1)
    changed[1, :, 0:4, 0:4] -= 3.0  # patch 0 of image 1
    embedded, embedded_changed = vit.embed(images, mask, token), vit.embed(changed, mask, token)
    torch.testing.assert_close(embedded, embedded_changed)
    plain = vit.embed(images)
    # a masked patch's token is the mask token plus its position; the others are unchanged
    torch.testing.assert_close(embedded[0, 3 + 5], plain[0, 3 + 5] - vit.model.patch_embed(images)[0, 1, 1] + token)
    assert torch.equal(embedded[:, 3:][~mask], plain[:, 3:][~mask])


def test_dropped_patches_never_reach_the_blocks(vit: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 16, 16)
    mask = random_mask(2, 16, 0.5, step_generator(torch.device("cpu"), 0, 1), torch.device("cpu"))
    keep = kept_indices(mask)
    changed = images.clone()
    for image in range(2):
        for patch in masked_indices(mask)[image].tolist():
            row, col = divmod(patch, 4)
            changed[image, :, 4 * row: 4 * row + 4, 4 * col: 4 * col + 4] = torch.randn(3, 4, 4) * 10
    out = vit.encode(vit.keep_patches(vit.embed(images), keep))
    assert out.shape == (2, 3 + 8, 32)
    torch.testing.assert_close(out, vit.encode(vit.keep_patches(vit.embed(changed), keep)))
    assert not torch.allclose(vit.encode(vit.embed(images)), vit.encode(vit.embed(changed)))


def test_attention_mask_makes_earlier_tokens_blind_to_later_ones(vit: torch.nn.Module) -> None:
    tokens = vit.embed(torch.randn(1, 3, 16, 16))
    length = tokens.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    changed = tokens.clone()
    changed[:, -1] += torch.randn(32)  # not a constant shift: LayerNorm would remove it
    torch.testing.assert_close(vit.encode(tokens, causal)[:, :-1], vit.encode(changed, causal)[:, :-1])
    assert not torch.allclose(vit.encode(tokens)[:, 0], vit.encode(changed)[:, 0])


def test_random_mask_counts_and_indices_match_a_loop() -> None:
    generator = step_generator(torch.device("cpu"), 3, 0, 7)
    mask = random_mask(5, 20, 0.3, generator, torch.device("cpu"))
    assert mask.shape == (5, 20) and mask.sum(dim=1).tolist() == [6] * 5
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    for image in range(5):
        assert kept_indices(mask)[image].tolist() == [p for p in range(20) if not mask[image, p]]
        assert masked_indices(mask)[image].tolist() == [p for p in range(20) if mask[image, p]]
    assert masked_count(20, 0.3) == 6  # the count a caller passes to skip the check and its host read
    assert torch.equal(kept_indices(mask, 20 - masked_count(20, 0.3)), kept_indices(mask))
    assert torch.equal(masked_indices(mask, masked_count(20, 0.3)), masked_indices(mask))
    again = random_mask(5, 20, 0.3, step_generator(torch.device("cpu"), 3, 0, 7), torch.device("cpu"))
    assert torch.equal(mask, again)
    other_rank = random_mask(5, 20, 0.3, step_generator(torch.device("cpu"), 3, 1, 7), torch.device("cpu"))
    assert not torch.equal(mask, other_rank)


def test_bad_settings_name_themselves() -> None:
    with pytest.raises(ValueError, match="mask_ratio must lie in"):
        random_mask(2, 16, 1.0, torch.Generator(), torch.device("cpu"))
    with pytest.raises(ValueError, match="same number of unmasked"):
        kept_indices(torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="IBOT needs a ViT backbone .*cifar_resnet18"):
        require_vit(build_backbone("cifar_resnet18", base_width=4), "IBOT", "cifar_resnet18")
    with pytest.raises(ValueError, match="views.size=30 is not divisible by the patch size 4"):
        check_divisible(30, 4, "views.size")
    with pytest.raises(ValueError, match="image_size 18 is not divisible by patch_size 4"):
        build_backbone("vit_tiny", **{**VIT, "image_size": 18})
