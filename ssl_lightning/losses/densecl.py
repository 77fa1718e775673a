"""DenseCL's dense contrastive loss (Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", sec. 3.2-3.3): every location of the query view's dense projection against the key view's location
that matches it best in backbone feature space, with a queue of pooled dense keys as negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def dense_correspondence(query_features: torch.Tensor, key_features: torch.Tensor) -> torch.Tensor:
    """For every image and every query location ``i``, ``argmax_j cos(f_q[:, i], f_k[:, j])`` over the key view's
    locations: (B, Sq) indices, from the backbone features (B, C, Sq) and (B, C, Sk) (no gradient)."""
    if query_features.ndim != 3 or key_features.ndim != 3 or query_features.shape[:2] != key_features.shape[:2]:
        raise ValueError(f"dense_correspondence expects (B, C, S) features of one batch and width, got "
                         f"{tuple(query_features.shape)} and {tuple(key_features.shape)}")
    query = F.normalize(query_features.float(), dim=1)
    key = F.normalize(key_features.float(), dim=1)
    return torch.einsum("bcq,bck->bqk", query, key).argmax(dim=2)


def dense_contrastive_loss(query: torch.Tensor, keys: torch.Tensor, matches: torch.Tensor, queue: torch.Tensor,
                           temperature: float = 0.2) -> torch.Tensor:
    """``mean_{b, i} -log exp(q_bi . k_b,m(bi) / t) / (exp(q_bi . k_b,m(bi) / t) + sum_n exp(q_bi . n / t))`` with
    ``q`` (B, D, Sq) the query's dense projections, ``k`` (B, D, Sk) the key encoder's (no gradient), ``m`` the
    (B, Sq) ``matches`` and ``n`` the rows of ``queue`` (K, D, normalized); q and k normalized here, in float32 (or float64)."""
    if query.ndim != 3 or keys.ndim != 3 or matches.shape != (query.shape[0], query.shape[2]):
        raise ValueError(f"dense_contrastive_loss expects query (B, D, Sq), keys (B, D, Sk) and matches (B, Sq), got "
                         f"{tuple(query.shape)}, {tuple(keys.shape)} and {tuple(matches.shape)}")
    with torch.autocast(query.device.type, enabled=False):
        dtype = torch.promote_types(query.dtype, torch.float32)  # float32 logits, float64 kept
        q = F.normalize(query.to(dtype), dim=1)
        k = F.normalize(keys.detach().to(dtype), dim=1)
        positives_keys = k.gather(2, matches[:, None, :].expand(-1, k.shape[1], -1))  # (B, D, Sq)
        positives = (q * positives_keys).sum(dim=1)  # (B, Sq)
        negatives = torch.einsum("bdq,kd->bqk", q, queue.to(dtype))  # (B, Sq, K)
        logits = torch.cat([positives[..., None], negatives], dim=2).flatten(0, 1) / temperature
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
