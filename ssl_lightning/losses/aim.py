"""AIM's autoregressive pixel loss (El-Nouby et al. 2024, section 3): each token predicts the NEXT patch in
raster order (the targets are the input sequence shifted one position to the left, figure 2), the prefix
patches are not predicted, and each image's loss is the mean over its non-prefix patches of the squared error
against the per-patch normalized pixels (MAE's ``norm_pix_loss``)."""

from __future__ import annotations

import torch

from ssl_lightning.losses.mae import normalize_patches


def aim_loss(
    pred: torch.Tensor, patches: torch.Tensor, prefix_lengths: torch.Tensor, norm_pix_loss: bool = True
) -> torch.Tensor:
    """``mean_b 1/(N - S_b) sum_{k=S_b}^{N-1} mean_pixels (pred[b, k-1] - target[b, k])^2`` (patches numbered
    from 0, so patch ``k`` is predicted by token ``k - 1``; the paper's ``1/(K-S) sum_{k=S+1}^{K}`` numbered from 1).

    Args:
        pred: (B, N - 1, P) predictions of tokens ``0 .. N-2``; ``pred[:, i]`` predicts patch ``i + 1`` (the last
            token predicts nothing).
        patches: (B, N, P) true pixels in raster order (``patchify`` of the images).
        prefix_lengths: (B,) prefix length ``S_b`` of each image, in ``[1, N - 1]``; patches ``0 .. S_b - 1`` are
            the prefix and are not predicted.
        norm_pix_loss: compare with each target patch normalized by its own mean and std.
    """
    batch, num_patches = patches.shape[:2]
    if pred.shape != (batch, num_patches - 1, patches.shape[2]) or prefix_lengths.shape != (batch,):
        raise ValueError(
            f"aim_loss: pred {tuple(pred.shape)} must be patches {tuple(patches.shape)} without the first patch, "
            f"prefix_lengths {tuple(prefix_lengths.shape)} one per image"
        )
    target = normalize_patches(patches)[0] if norm_pix_loss else patches
    per_patch = (pred - target[:, 1:]).pow(2).mean(dim=-1)  # (B, N - 1): entry i is the error on patch i + 1
    predicted = torch.arange(1, num_patches, device=patches.device)
    outside_prefix = (predicted[None, :] >= prefix_lengths[:, None]).to(per_patch.dtype)
    per_image = (per_patch * outside_prefix).sum(dim=1) / outside_prefix.sum(dim=1)
    return per_image.mean()
