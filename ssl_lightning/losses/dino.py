"""DINO's self-distillation loss, teacher centering and teacher temperature (Caron et al. 2021, "Emerging
Properties in Self-Supervised Vision Transformers", sec. 3.1, eq. 2-4 and algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_mean_


def dino_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """``sum over x in global crops, x' != x of H(P_t(x), P_s(x'))`` averaged over the pairs and the samples (eq. 3).

    Args:
        student_logits: one (B, K) head output per crop, the global crops first (they come in the same order
            as ``teacher_logits``, and a student crop is skipped against the teacher output of the same crop).
        teacher_logits: one (B, K) teacher head output per global crop; no gradient flows into them.
        center: (1, K) or (K,) center ``C`` subtracted from the teacher outputs.
        student_temperature, teacher_temperature: ``tau_s`` and ``tau_t``.

    ``P_t = softmax((g_t - C) / tau_t)`` (centering and sharpening), ``P_s = softmax(g_s / tau_s)``. Every rank
    averages its own samples; the gradient average of DDP then gives the global batch's mean.
    """
    if not teacher_logits or len(student_logits) < len(teacher_logits):
        raise ValueError(
            f"need at least one teacher crop and as many student crops, got {len(student_logits)} student and "
            f"{len(teacher_logits)} teacher crops"
        )
    shape = teacher_logits[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in (*student_logits, *teacher_logits)):
        raise ValueError(
            f"every crop's logits must share one (B, K) shape, got student {[tuple(s.shape) for s in student_logits]} "
            f"and teacher {[tuple(t.shape) for t in teacher_logits]}"
        )
    if center.numel() != shape[1]:
        raise ValueError(f"center must have K={shape[1]} entries, got shape {tuple(center.shape)}")
    log_p_student = F.log_softmax(torch.stack(list(student_logits)).float() / student_temperature, dim=-1)  # (V, B, K)
    teacher = torch.stack(list(teacher_logits)).detach().float()
    p_teacher = F.softmax((teacher - center.reshape(1, 1, -1)) / teacher_temperature, dim=-1)  # (G, B, K)
    # cross[g, v]: mean cross-entropy between teacher crop g and student crop v (one (V, B, K) product per g)
    cross = torch.stack([-(p * log_p_student).sum(dim=-1).mean(dim=-1) for p in p_teacher])
    same_view = torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
    return cross[~same_view].mean()


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temperature: float) -> torch.Tensor:
    """Mean entropy of the teacher's ``P_t = softmax((g_t - C) / tau_t)`` over the rows of ``teacher_logits`` (N, K).

    The paper's collapse diagnostic (sec. 5.3, fig. 7): ``log K`` when the teacher collapses to the uniform
    distribution, 0 when it collapses to one dimension. ``dino_loss`` minus this (same center, every teacher crop
    paired with the same number of student crops) is the mean ``KL(P_t || P_s)``, which falls to 0 in both collapses.
    """
    if teacher_logits.ndim != 2 or teacher_logits.shape[1] != center.numel():
        raise ValueError(
            f"teacher_logits must be (N, K={center.numel()}) for a center of shape {tuple(center.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    logits = (teacher_logits.float() - center.reshape(1, -1)) / teacher_temperature
    return -(F.softmax(logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """``C <- m C + (1 - m) mean of the teacher outputs over the global batch`` (eq. 4), in place.

    ``teacher_logits`` (N, K) are this rank's teacher outputs (all global crops). Sums and counts are averaged
    over ranks, so every rank gets the center that one process computes on the full batch.
    """
    if teacher_logits.ndim != 2 or teacher_logits.shape[1] != center.numel():
        raise ValueError(
            f"teacher_logits must be (N, K={center.numel()}) for a center of shape {tuple(center.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    count = teacher_logits.new_full((1,), teacher_logits.shape[0], dtype=center.dtype)
    stats = all_reduce_mean_(torch.cat([teacher_logits.to(center.dtype).sum(dim=0), count]))
    center.mul_(momentum).add_((stats[:-1] / stats[-1]).view_as(center), alpha=1.0 - momentum)
    return center


def teacher_temperature(epoch: int, warmup_temperature: float, temperature: float, warmup_epochs: int) -> float:
    """``tau_t`` of an epoch: linear from ``warmup_temperature`` at epoch 0 to ``temperature`` at epoch
    ``warmup_epochs - 1``, then constant (sec. 3.1 and appendix: 0.04 -> 0.07 over the first 30 epochs;
    the values of ``np.linspace(warmup_temperature, temperature, warmup_epochs)`` of the reference code)."""
    if epoch >= warmup_epochs:
        return temperature
    return warmup_temperature + (temperature - warmup_temperature) * epoch / max(1, warmup_epochs - 1)
