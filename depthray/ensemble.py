"""Test-time ensembling of affine-invariant depth members (pure functions, torch).

Marigold's members each carry their own unknown scale and shift. Like diffusers'
``ensemble_depth`` we give member i parameters (s_i, t_i) and minimise the pairwise
disagreement of the aligned members

    sum_{i<j} mean((s_i x_i + t_i - s_j x_j - t_j)^2),

where x_i is member i min-max normalised to [0,1] (diffusers' initialisation). The
objective is a quadratic form in p = (s, t), so instead of scipy BFGS with numerical
gradients (hundreds of full-resolution medians) we solve it in closed form: it only needs
the members' Gram matrix, one [E,P]x[P,E] product. The trivial solution s = 0 and the two
gauge directions (a common scale and shift of all members) are fixed by the constraints
mean(s) = 1 and mean(t) = 0; diffusers fixes the same gauge with its [0,1] regulariser, and
both finish by normalising the fused depth to [0,1], so the gauge never reaches the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REDUCTIONS = ("median", "mean")


@dataclass
class EnsembleResult:
    depth: torch.Tensor  # [V,h,w] fused, each view normalised to [0,1]
    uncertainty: torch.Tensor  # [V,h,w] >= 0, MAD (median) or std (mean), in output units
    scale: torch.Tensor  # [V,E] per-member scale applied to the normalised member
    shift: torch.Tensor  # [V,E] per-member shift


def normalize_members(members: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each member to [0,1]: [V,E,h,w] -> [V,E,h,w]."""
    flat = members.flatten(2)  # [V,E,P]
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(members)


def solve_alignment(members: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form joint scale/shift per member that makes members agree.

    members: [V,E,h,w] (already normalised). Returns scale, shift: [V,E] each, with
    mean(scale) = 1 and mean(shift) = 0 per view.
    """
    v, e = members.shape[:2]
    x = members.flatten(2).to(torch.float64)  # [V,E,P]
    n_pix = x.shape[2]
    gram = x @ x.transpose(1, 2) / n_pix  # [V,E,E]  E[x_i x_j]
    mu = x.mean(dim=2)  # [V,E]             E[x_i]

    # K[a,b] = E[f_a f_b] for features f = (x_1..x_E, 1..1); objective = p^T (E*D - K) p,
    # where D keeps only the entries of K that couple a member with itself.
    k = torch.empty(v, 2 * e, 2 * e, dtype=torch.float64, device=members.device)
    k[:, :e, :e] = gram
    k[:, :e, e:] = mu.unsqueeze(2).expand(v, e, e)
    k[:, e:, :e] = mu.unsqueeze(1).expand(v, e, e)
    k[:, e:, e:] = 1.0
    eye = torch.eye(e, dtype=torch.float64, device=members.device)
    d = torch.zeros_like(k)
    d[:, :e, :e] = gram * eye
    d[:, :e, e:] = torch.diag_embed(mu)
    d[:, e:, :e] = torch.diag_embed(mu)
    d[:, e:, e:] = eye
    q = e * d - k  # [V,2E,2E], positive semi-definite
    q = q + ridge * torch.eye(2 * e, dtype=torch.float64, device=members.device)

    # KKT system of: minimise p^T q p  subject to  sum(s) = E, sum(t) = 0.
    c = torch.zeros(v, 2, 2 * e, dtype=torch.float64, device=members.device)
    c[:, 0, :e] = 1.0
    c[:, 1, e:] = 1.0
    kkt = torch.zeros(v, 2 * e + 2, 2 * e + 2, dtype=torch.float64, device=members.device)
    kkt[:, : 2 * e, : 2 * e] = 2 * q
    kkt[:, : 2 * e, 2 * e :] = c.transpose(1, 2)
    kkt[:, 2 * e :, : 2 * e] = c
    rhs = torch.zeros(v, 2 * e + 2, 1, dtype=torch.float64, device=members.device)
    rhs[:, 2 * e, 0] = float(e)
    p = torch.linalg.solve(kkt, rhs)[:, : 2 * e, 0]  # [V,2E]
    return p[:, :e].to(members.dtype), p[:, e:].to(members.dtype)


def fuse(aligned: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse aligned members [V,E,h,w] -> depth, uncertainty [V,h,w]."""
    if reduction == "median":
        depth = aligned.median(dim=1).values  # [V,h,w]
        uncertainty = (aligned - depth.unsqueeze(1)).abs().median(dim=1).values
    elif reduction == "mean":
        depth = aligned.mean(dim=1)
        uncertainty = aligned.std(dim=1, unbiased=False)
    else:
        raise ValueError(f"ensemble_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return depth, uncertainty


def ensemble_depth(members: torch.Tensor, reduction: str = "median") -> EnsembleResult:
    """Align, fuse and normalise ensemble members.

    members: [V,E,h,w] affine-invariant depth, E members for each of V views.
    With E = 1 the member is returned as is (it is already in [0,1]) with zero
    uncertainty, exactly like diffusers with ensemble_size=1.
    """
    if members.ndim != 4:
        raise ValueError(f"members must be [V,E,h,w], got {tuple(members.shape)}")
    v, e = members.shape[:2]
    members = members.float()
    if e == 1:
        ones = torch.ones(v, 1, dtype=members.dtype, device=members.device)
        return EnsembleResult(members[:, 0], torch.zeros_like(members[:, 0]), ones, ones * 0)

    # 1. Normalise each member to [0,1] so the solve is well conditioned.
    x = normalize_members(members)  # [V,E,h,w]
    # 2. Joint scale/shift per member, closed form.
    scale, shift = solve_alignment(x)  # [V,E], [V,E]
    aligned = x * scale[:, :, None, None] + shift[:, :, None, None]  # [V,E,h,w]
    # 3. Fuse members; uncertainty in the same units as the fused depth.
    depth, uncertainty = fuse(aligned, reduction)  # [V,h,w] x2
    # 4. Normalise the fused depth to [0,1]; uncertainty follows the same scale.
    flat = depth.flatten(1)
    lo = flat.amin(dim=1)[:, None, None]
    rng = (flat.amax(dim=1)[:, None, None] - lo).clamp_min(1e-6)
    depth = (depth - lo) / rng
    uncertainty = uncertainty / rng
    return EnsembleResult(depth.clamp(0.0, 1.0), uncertainty, scale, shift)
