"""SwAV's codes and loss (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments"): Sinkhorn-Knopp equipartition of the batch over the prototypes (sec. 3.1, eq. 3
and appendix A.1) and the swapped prediction between crops (eq. 1-2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_max_, all_reduce_sum_


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes (N, K) of this rank's samples from their prototype scores (N, K), in float32.

    ``Q = exp(scores / epsilon)`` is scaled ``iterations`` times so that every prototype gets the same total
    mass over the GLOBAL batch (rows of the paper's K x B matrix sum to 1/K: these sums are all-reduced
    across ranks) and then every sample 1/B; the result is multiplied by B, so each sample's code sums
    to 1 and each prototype gets about B/K (exactly at convergence). B, the global number of samples, is
    all-reduced too, so ranks may hold different numbers of rows (e.g. slices of a queue). A DDP run gives
    one process's codes on the full batch. The global maximum score is subtracted before ``exp`` (a
    constant factor, removed by the normalization) so that large scores cannot overflow; a score more than
    about ``87 * epsilon`` below it underflows to 0 in float32, which cosine scores in [-1, 1] never are
    for ``epsilon >= 0.025``.
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"sinkhorn_knopp expects scores of shape (N, K) with N > 0, got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs epsilon > 0 and iterations >= 1, got {epsilon} and {iterations}")
    scores = scores.float()
    q = torch.exp((scores - all_reduce_max_(scores.max())) / epsilon)
    num_prototypes = q.shape[1]
    totals = all_reduce_sum_(torch.stack([q.sum(), q.new_tensor(q.shape[0])]))  # total mass, global B
    q /= totals[0]
    num_samples = totals[1]
    for _ in range(iterations):
        q /= all_reduce_sum_(q.sum(dim=0, keepdim=True)) * num_prototypes  # each prototype: mass 1/K
        q /= q.sum(dim=1, keepdim=True) * num_samples  # each sample: mass 1/B
    return q * num_samples


def swav_loss(
    scores: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int],
    temperature: float = 0.1,
) -> torch.Tensor:
    """The swapped prediction loss: the code of each assignment crop is predicted from every OTHER crop.

    ``scores[v]`` (B, K) are crop ``v``'s scores against the normalized prototypes (with gradient);
    ``codes[j]`` (B, K) is the code of crop ``crops_for_assign[j]`` (a constant). The loss is the mean over
    assignment crops of the mean over the other crops of the cross-entropy
    ``-sum_k q_k log softmax(scores / temperature)_k``, averaged over this rank's samples (as the paper's code).
    """
    if len(codes) != len(crops_for_assign) or not codes:
        raise ValueError(f"swav_loss needs one code per assignment crop, got {len(codes)} codes for {list(crops_for_assign)}")
    if len(scores) < 2 or any(not 0 <= i < len(scores) for i in crops_for_assign):
        raise ValueError(f"crops_for_assign {list(crops_for_assign)} must index the {len(scores)} crops (at least 2)")
    shape = scores[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in [*scores, *codes]):
        raise ValueError(f"swav_loss expects scores and codes of one shape (B, K), got "
                         f"{[tuple(t.shape) for t in scores]} and {[tuple(t.shape) for t in codes]}")
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for code, crop in zip(codes, crops_for_assign):
        others = [lp for v, lp in enumerate(log_probs) if v != crop]
        loss = loss + sum(-(code * lp).sum(dim=1).mean() for lp in others) / len(others)
    return loss / len(codes)
