"""iBOT's losses (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", sec. 3.2, eq. 1-2):
self-distillation of the [CLS] token across views (DINO's) and of the masked patch tokens within a view (MIM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cross_view_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temperature: float
) -> torch.Tensor:
    """``L_[CLS]``: the mean over (teacher crop g, student crop v != g) pairs and samples of
    ``H(P_t(g), P_s(v)) = -sum_k P_t log softmax(s_v / tau_s)`` (DINO's eq. 3 with the teacher's distributions
    given, so the centering can be an EMA center or Sinkhorn-Knopp).

    Args:
        student_logits: one (B, K) head output per student crop, the global crops first, in the order of
            ``teacher_probs`` (student crop ``g`` is skipped against teacher crop ``g``).
        teacher_probs: one (B, K) teacher distribution per global crop (no gradient flows into them).
    With ``teacher_probs = softmax((g_t - C) / tau_t)`` this is ``losses.dino.dino_loss``.
    """
    if not teacher_probs or len(student_logits) < len(teacher_probs):
        raise ValueError(f"need at least one teacher crop and as many student crops, got {len(student_logits)} "
                         f"student and {len(teacher_probs)} teacher crops")
    shape = teacher_probs[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in (*student_logits, *teacher_probs)):
        raise ValueError(f"every crop must share one (B, K) shape, got student {[tuple(s.shape) for s in student_logits]}"
                         f" and teacher {[tuple(t.shape) for t in teacher_probs]}")
    log_p_student = F.log_softmax(torch.stack(list(student_logits)).float() / student_temperature, dim=-1)  # (V, B, K)
    teacher = torch.stack(list(teacher_probs)).detach().float()  # (G, B, K)
    cross = torch.stack([-(p * log_p_student).sum(dim=-1).mean(dim=-1) for p in teacher])  # (G, V)
    same_view = torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
    return cross[~same_view].mean()


def masked_patch_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) weights of the patch loss for a mask (B, N) (True: masked): ``1 / (B * n_i)`` on the ``n_i`` masked
    patches of image ``i``, 0 elsewhere. The reference's average over an image's masked patches, then over the B
    images of the batch (an image without masked patches adds 0 to that mean, as in the reference)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (B, N), got shape {tuple(mask.shape)}")
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask / (counts * mask.shape[0])


def ibot_patch_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, student_temperature: float
) -> torch.Tensor:
    """``L_MIM = sum_j w_j H(P_t(j), P_s(j))`` over patch tokens ``j`` (eq. 1: the student's output at a masked
    patch of a view against the teacher's at the same patch of the unmasked view).

    Args:
        student_logits: (..., K) student head outputs of the patches.
        teacher_probs: (..., K) the teacher's centered and sharpened distributions of the same patches.
        weights: (...) ``masked_patch_weights`` (0 on unmasked patches: their outputs do not count).
    The leading shape may be (B, N) (every patch) or (M,) (only the masked rows, ``weights`` taken at them).
    Every rank averages its own images; DDP's gradient average then gives the global batch's mean.
    """
    if student_logits.shape != teacher_probs.shape or student_logits.shape[:-1] != weights.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher probabilities "
                         f"{tuple(teacher_probs.shape)} and weights {tuple(weights.shape)} do not match")
    log_p_student = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    cross_entropy = -(teacher_probs.detach().float() * log_p_student).sum(dim=-1)
    return (cross_entropy * weights).sum()
