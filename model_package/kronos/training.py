"""Fine-tuning losses of the two Kronos networks, identical to upstream's training scripts.

Tokenizer: reconstruct normalised windows through the quantiser and back,
    loss = (mse(z_pre, x) + mse(z_all, x) + bsq_loss) / 2
    (z_pre decoded from the s1 bits alone, z_all from all bits; bsq_loss = commitment +
    entropy penalty). Validation upstream uses mse(z_all, x) alone: `recon_all`.
Predictor: next-token cross-entropy on both sub-tokens of a tokenised window,
    inputs positions 0..T-2 (with their own calendar features), targets positions 1..T-1,
    loss = (CE(s1) + CE(s2)) / 2.

Both functions honour the networks' mode: dropout and the causal s2 head in training mode,
neither in eval mode (the reference numbers in tests/fixtures/kronos-training-tiny).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import Kronos
from .tokenizer import KronosTokenizer


def tokenizer_loss(tokenizer: KronosTokenizer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [B, T, d_in] normalised windows -> {loss, recon_pre, recon_all, bsq_loss} (scalars)."""
    z_pre, z_all, z_unit = tokenizer.reconstruct(x)
    recon_pre = F.mse_loss(z_pre, x)
    recon_all = F.mse_loss(z_all, x)
    bsq = tokenizer.bsq_loss(z_unit)
    return {"loss": (recon_pre + recon_all + bsq) / 2, "recon_pre": recon_pre, "recon_all": recon_all, "bsq_loss": bsq}


def predictor_loss(
    model: Kronos,
    s1: torch.Tensor,
    s2: torch.Tensor,
    stamp: torch.Tensor,
    teacher_forcing: bool = True,
    generator: torch.Generator | None = None,
    causal_s2: bool | None = None,
) -> dict[str, torch.Tensor]:
    """(s1, s2) [B, T] token ids, stamp [B, T, 5] -> {loss, ce_s1, ce_s2} (scalars).

    With `teacher_forcing` the s2 head sees the true next s1 ids; without it, s1 ids sampled
    from the model (`generator`, else the global RNG), as upstream's fine-tuning does.
    `causal_s2=None` keeps upstream's rule (causal s2 head in training mode only); True gives
    an eval-mode loss without the s2 head's look-ahead (what validation should measure).
    """
    target_s1, target_s2 = s1[:, 1:], s2[:, 1:]  # [B, T-1]
    s1_logits, s2_logits = model.forward_train(
        s1[:, :-1], s2[:, :-1], stamp[:, :-1], target_s1 if teacher_forcing else None, generator, causal_s2
    )
    ce_s1 = F.cross_entropy(s1_logits.reshape(-1, s1_logits.shape[-1]), target_s1.reshape(-1))
    ce_s2 = F.cross_entropy(s2_logits.reshape(-1, s2_logits.shape[-1]), target_s2.reshape(-1))
    return {"loss": (ce_s1 + ce_s2) / 2, "ce_s1": ce_s1, "ce_s2": ce_s2}
