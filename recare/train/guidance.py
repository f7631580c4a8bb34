"""Training targets and losses of METHOD.md section 3: N(d; p), the ESD target, Eq. 13, Eqs. 11-12.

Every tensor here is a batch of noise predictions shaped (B, C, H, W); sums and norms in N(d; p)
run over (C, H, W) per batch element, as the official `project` does (dims -1, -2, -3).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

PROJECTION_DIMS = (-3, -2, -1)   # C, H, W
NORM_EPS = 1e-12                 # F.normalize's default: a zero p gives a zero parallel part


def split_parallel(d: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split d into its parts parallel and orthogonal to p, in float64.

    d_par = <d, p_hat> p_hat with p_hat = p / ||p|| over (C, H, W); d_orth = d - d_par.

    Args:
        d: the guidance direction, (B, C, H, W).
        p: the direction to split against, same shape (the conditional prediction).

    Returns:
        (d_par, d_orth), both float64.
    """
    d, p = d.double(), p.double()
    p_hat = F.normalize(p.flatten(-3), dim=-1, eps=NORM_EPS).view_as(p)
    d_par = (d * p_hat).sum(dim=PROJECTION_DIMS, keepdim=True) * p_hat
    return d_par, d - d_par


def normalized_direction(d: torch.Tensor, p: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """N(d; p) = d_orth + w * d_par (normalised guidance), computed in float64, returned in float64.

    With w = 1 it is d itself (up to float64 rounding); w < 1 damps the part of d along p.

    Args:
        d: the guidance direction (e.g. eps*(c) - eps*(0)).
        p: the conditional prediction d is split against (e.g. eps*(c)).
        weight: w, the weight of the parallel part.
    """
    d_par, d_orth = split_parallel(d, p)
    return d_orth + weight * d_par


def esd_target(eps_c: torch.Tensor, eps_empty: torch.Tensor, eta: float = 2.0, weight: float = 1.0) -> torch.Tensor:
    """ESD's target with normalised guidance: eps*(c) - (eta - 1) * N(eps*(c) - eps*(0); eps*(c)).

    (Official `normalized_guidance(pred_cond=eps*(c), pred_uncond=eps*(0), guidance_scale=eta)`.)

    Args:
        eps_c: frozen model's prediction for the erased concept c.
        eps_empty: frozen model's prediction for the empty prompt.
        eta: negative guidance scale (official 2).
        weight: w in N(d; p).

    Returns:
        The target in float64 (the loss casts it to the prediction's dtype).
    """
    direction = normalized_direction(eps_c - eps_empty, eps_c, weight)
    return eps_c.double() - (eta - 1.0) * direction


def recare_erase_target(
    eps_empty: torch.Tensor,
    eps_anchors: Sequence[torch.Tensor],
    eps_erase: Sequence[torch.Tensor],
    scale: float = 2.0,
    weight: float = 1.0,
) -> torch.Tensor:
    """Eq. 13 in its official form, compositional normalised guidance:

        eps*(0) + (s - 1) * mean_a N(eps*(a) - eps*(0); eps*(a))
                + (-s - 1) * mean_{h'} N(eps*(h') - eps*(0); eps*(h'))

    The anchors pull towards the CARE concept with scale s, every erase concept h' in H pushes away
    with scale -s (official `normalized_compositional_guidance` with scales [-s]*|H| + [s]*|A|).

    Args:
        eps_empty: frozen model's prediction for the empty prompt.
        eps_anchors: frozen predictions for the anchor prompt(s) (one per iteration officially).
        eps_erase: frozen predictions for every h' in H.
        scale: s (official --compositional_guidance_scale 2).
        weight: w in N(d; p).

    Returns:
        The erase target in float64.
    """
    if not eps_anchors or not eps_erase:
        raise ValueError("Eq. 13 needs at least one anchor and one erase concept")
    pull = torch.stack([normalized_direction(a - eps_empty, a, weight) for a in eps_anchors]).mean(0)
    push = torch.stack([normalized_direction(h - eps_empty, h, weight) for h in eps_erase]).mean(0)
    return eps_empty.double() + (scale - 1.0) * pull + (-scale - 1.0) * push


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 at least (half-precision predictions are upcast), mean over all elements."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    return F.mse_loss(prediction.to(dtype), target.detach().to(dtype))


class RecareLoss(NamedTuple):
    total: torch.Tensor    # erase + lambda * retain (Eq. 11)
    erase: torch.Tensor    # MSE(eps_theta(h), Eq. 13 target)
    retain: torch.Tensor   # MSE(eps_theta(r), eps*(r)) (Eq. 12)


def recare_loss(
    pred_erase: torch.Tensor,
    erase_target: torch.Tensor,
    pred_retain: torch.Tensor,
    retain_target: torch.Tensor,
    retain_weight: float = 1.0,
) -> RecareLoss:
    """Eqs. 11-12: L = MSE(eps_theta(h), erase target) + lambda * MSE(eps_theta(r), eps*(r)).

    Args:
        pred_erase: the student's prediction for the erase concept h (carries the gradient).
        erase_target: Eq. 13's target (`recare_erase_target`).
        pred_retain: the student's prediction for the retain prompt r.
        retain_target: the frozen model's prediction for r.
        retain_weight: lambda (official 1).
    """
    erase = mse(pred_erase, erase_target)
    retain = mse(pred_retain, retain_target)
    return RecareLoss(erase + retain_weight * retain, erase, retain)
